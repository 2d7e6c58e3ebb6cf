"""Image decoding through TorchCodec or torchvision (ssl_colorize.data.decode), against Pillow."""

import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_colorize.data import decode
from ssl_colorize.data.images import read_image

BACKENDS = [
    "torchvision",
    pytest.param("torchcodec", marks=pytest.mark.skipif(not decode.torchcodec_available(),
                                                         reason="torchcodec is not installed")),
]


@pytest.fixture
def backend(request):
    decode.set_backend(request.param)
    yield request.param
    decode.set_backend(None)


def _encoded(image: Image.Image, fmt: str, **kwargs) -> torch.Tensor:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)


def _pillow_rgb(data: torch.Tensor) -> np.ndarray:
    with Image.open(io.BytesIO(data.numpy().tobytes())) as image:
        return np.asarray(image.convert("RGB")).transpose(2, 0, 1)


def _photo(seed=0, size=(48, 32)) -> Image.Image:
    rng = np.random.default_rng(seed)
    smooth = rng.random((size[1] // 8, size[0] // 8, 3))
    return Image.fromarray((smooth * 255).astype(np.uint8)).resize(size, Image.BILINEAR)


LOSSLESS = {
    "png_rgb": lambda: _encoded(_photo(), "PNG"),
    "png_grey": lambda: _encoded(_photo().convert("L"), "PNG"),
    "png_palette": lambda: _encoded(_photo().convert("P", palette=Image.ADAPTIVE, colors=16), "PNG"),
    "png_rgba": lambda: _encoded(_photo().convert("RGBA"), "PNG"),
    "bmp": lambda: _encoded(_photo(), "BMP"),
    "tiff": lambda: _encoded(_photo(), "TIFF"),
    "ppm": lambda: _encoded(_photo(), "PPM"),
}


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("kind", sorted(LOSSLESS))
def test_lossless_formats_decode_to_pillows_pixels(backend, kind):
    data = LOSSLESS[kind]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        image = decode.decode_rgb(data)
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 48)
    assert np.array_equal(image.numpy(), _pillow_rgb(data))


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_jpeg_single_and_batched_agree_with_pillow(backend):
    jpegs = [_encoded(_photo(seed), "JPEG", quality=90) for seed in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        singles = [decode.decode_rgb(d) for d in jpegs]
        batched = decode.decode_jpegs(jpegs)
    for data, single, batch in zip(jpegs, singles, batched):
        assert torch.equal(single, batch)
        # libjpeg builds differ in IDCT / upsampling rounding by a level or two at most
        assert np.abs(single.numpy().astype(int) - _pillow_rgb(data).astype(int)).max() <= 3


@pytest.mark.skipif(not decode.torchcodec_available(), reason="torchcodec is not installed")
def test_backends_give_the_same_pixels():
    data = _encoded(_photo(5, (64, 40)), "JPEG", quality=85)
    decode.set_backend("torchvision")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from_torchvision = decode.decode_rgb(data)
        decode.set_backend("torchcodec")
        from_torchcodec = decode.decode_rgb(data)
    finally:
        decode.set_backend(None)
    assert torch.equal(from_torchvision, from_torchcodec)


def test_auto_prefers_torchcodec_and_torchvision_warns(monkeypatch):
    monkeypatch.delenv(decode.ENV_VAR, raising=False)
    assert decode.backend() == ("torchcodec" if decode.torchcodec_available() else "torchvision")
    monkeypatch.setenv(decode.ENV_VAR, "torchvision")
    assert decode.backend() == "torchvision"
    # the deprecation is the user's cue to install torchcodec: not silenced by the suite
    with pytest.warns(DeprecationWarning, match="TorchCodec"):
        decode.decode_rgb(_encoded(_photo(), "PNG"))


def test_bad_backend_names_and_undecodable_bytes(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="unknown image decoder"):
        decode.set_backend("opencv")
    monkeypatch.setenv(decode.ENV_VAR, "pillow")
    with pytest.raises(ValueError, match=decode.ENV_VAR):
        decode.backend()
    monkeypatch.delenv(decode.ENV_VAR)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0" + b"0" * 64)
    with pytest.raises((RuntimeError, ValueError, OSError)):
        read_image(bad)
