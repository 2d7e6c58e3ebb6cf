"""Image decoding: TorchCodec where it is installed, torchvision's decoders otherwise.

torchvision 0.29 deprecates its image decoders in favour of TorchCodec's (from torchcodec 0.16), which
take the same encoded bytes and give the same uint8 (C, H, W) tensors, batched nvJPEG on CUDA included.
Every reader of the suite decodes through this module, so when torchvision drops its decoders nothing
else changes. The backend:

* ``auto`` (default): ``torchcodec`` when ``import torchcodec.decoders`` works, else ``torchvision``;
* the environment variable ``SSL_COLORIZE_DECODER=torchcodec|torchvision`` forces one (a worker process
  inherits it); :func:`set_backend` does the same inside a process.

torchvision's deprecation warning is not silenced: a run that falls back to it says so once, which is
the user's cue to ``pip install torchcodec`` (the ``ssl_colorize[torchcodec]`` extra).
"""

from __future__ import annotations

import importlib
import os
from functools import lru_cache

import torch

BACKENDS = ("auto", "torchcodec", "torchvision")
ENV_VAR = "SSL_COLORIZE_DECODER"

_forced: str | None = None
# BMP, TIFF (both byte orders) and the binary / ASCII PPM / PGM headers: formats neither backend decodes.
_PILLOW_ONLY_MAGIC = (b"BM", b"II*\x00", b"MM\x00*", b"P6", b"P5", b"P3", b"P2")


@lru_cache(maxsize=None)
def torchcodec_available() -> bool:
    try:
        importlib.import_module("torchcodec.decoders")
    except (ImportError, OSError, RuntimeError):  # not installed, or its libraries do not load here
        return False
    return True


def set_backend(name: str | None) -> None:
    """Force a backend in this process (None: back to the environment variable or ``auto``)."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown image decoder {name!r}; choose one of {', '.join(BACKENDS)}")
    global _forced
    _forced = name


def backend() -> str:
    """The backend in use: ``torchcodec`` or ``torchvision``."""
    name = _forced or os.environ.get(ENV_VAR, "auto") or "auto"
    if name not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={name!r}: choose one of {', '.join(BACKENDS)}")
    if name == "torchcodec" and not torchcodec_available():
        raise ValueError(f"{ENV_VAR}=torchcodec but torchcodec cannot be imported (pip install torchcodec)")
    if name == "auto":
        return "torchcodec" if torchcodec_available() else "torchvision"
    return name


def decode_rgb(data: torch.Tensor) -> torch.Tensor:
    """Encoded bytes (a 1-D uint8 tensor) -> uint8 (3, H, W) RGB on the CPU.

    JPEG, PNG, WebP, GIF (first frame), AVIF, HEIC through the backend; formats the backend does not
    recognise (BMP, TIFF, PPM) through Pillow. Raises RuntimeError, ValueError or OSError for data
    nothing can decode.
    """
    if data[:4].numpy().tobytes().startswith(_PILLOW_ONLY_MAGIC):
        return _decode_with_pillow(data)
    return _decode_with_backend(data)


def _decode_with_pillow(data: torch.Tensor) -> torch.Tensor:
    import io

    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(data.numpy().tobytes())) as image:
        rgb = np.asarray(image.convert("RGB"))
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()


def _decode_with_backend(data: torch.Tensor) -> torch.Tensor:
    if backend() == "torchcodec":
        from torchcodec.decoders import decode_image

        image = decode_image(data, mode="RGB")
        return image[0] if image.dim() == 4 else image  # animated formats: the first frame
    from torchvision.io import ImageReadMode, decode_image

    return decode_image(data, mode=ImageReadMode.RGB)


def decode_jpegs(data: list[torch.Tensor], device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """JPEG bytes -> uint8 (3, H, W) RGB tensors on ``device``, in one call (batched nvJPEG on CUDA).

    The call fails as a whole (RuntimeError) when one of the files cannot be decoded.
    """
    device = torch.device(device)
    if backend() == "torchcodec":
        from torchcodec.decoders import decode_jpeg

        return list(decode_jpeg(list(data), mode="RGB", device=device))
    from torchvision.io import ImageReadMode, decode_jpeg

    return list(decode_jpeg(list(data), mode=ImageReadMode.RGB, device=device))
