"""The fast pretraining data path (issue 7): image files -> cropped uint8 batches -> L input and soft targets.

Two ways to get there, chosen by ``data_path`` (``--data-path`` in the trainer):

* ``"device"`` (what ``"auto"`` picks on CUDA when nvJPEG works and fewer than
  :data:`AUTO_WORKERS_MIN_CORES` cores are available): DataLoader workers only read each file's bytes; a
  producer thread decodes the whole batch in one call on the GPU (batched nvJPEG, TorchCodec's or torchvision's),
  resizes, crops and mirrors every image there, stacks them, makes the batch channels-last and computes
  L, ab and the soft targets, all on a side CUDA stream, one or two batches ahead of the training step.
  Files that are not JPEG, or that the batched call rejects, are decoded on the CPU one by one and moved;
  files nothing can decode are skipped and named, as in the plain path.
* ``"workers"`` (what ``"auto"`` picks otherwise; the faster path where the cores allow): DataLoader
  worker processes decode (libjpeg-turbo), resize, crop and mirror each image, as
  ``ssl_colorize.pretrain`` always did, and compute ab on the loss grid and its soft encoding in the
  collate step (1/stride^2 of the pixels: cheap on a CPU). For a CPU trainer they compute L too, so the
  training process only runs the network; for a GPU trainer the uint8 batch and the targets travel in
  pinned memory and L is computed on a side stream (on an H100 the targets computed on the GPU took
  1.7 ms of a 15 ms alexnet_lab step, time the network then waited for).

Nothing about the crops changes between the paths (DESIGN.md, "data moves left to right once"): each
sample's crop window and mirror come from :func:`~ssl_colorize.data.transforms.random_crop_flip` with a
generator seeded by the sampler's per-sample seed (the trainer's resumable order), and Lab / targets are
:func:`ssl_colorize.color.rgb_to_lab` and :func:`ssl_colorize.targets.soft_encode` on the loss grid
(docs/protocols.md sections 1 and 2). ``tests/test_fast_path.py`` checks that the paths agree with each other,
with the trainer's own dataset, with scikit-image's Lab and with a scikit-learn soft encoding. One caveat
on CUDA: nvJPEG's IDCT and chroma upsampling are not libjpeg-turbo's, so a decoded pixel may differ by a
few levels from the CPU decoder's; everything after decoding is the same arithmetic.

The loader (:class:`ssl_colorize.data.loader.PretrainLoader`) consumes a
sampler of ``(index, sample_seed)`` items, such as the trainer's ``ResumableSampler``, and yields
:class:`PretrainBatch` objects whose tensors are on the training device.
"""

from __future__ import annotations

import itertools
import os
from contextlib import suppress
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ssl_colorize.color import rgb_to_lab, rgb_to_lightness
from ssl_colorize.data.decode import decode_jpegs, decode_rgb
from ssl_colorize.data.images import ImageFiles, Sample, SkippedFile
from ssl_colorize.data.transforms import RESIZE_MODES, random_crop_flip, resize_for_crop
from ssl_colorize.targets import DEFAULT_K, DEFAULT_SIGMA, decimate, soft_encode


DATA_PATHS = ("auto", "workers", "device")
_JPEG_MAGIC = b"\xff\xd8\xff"  # start-of-image marker + the next marker's 0xFF
_SEED_MODULUS = 2**63  # torch.Generator seeds must fit in 64 bits


# ----------------------------------------------------------------------------------------------
# The per-image and per-batch steps, shared by every path
# ----------------------------------------------------------------------------------------------

def crop_image(image: torch.Tensor, crop: int, resize: int | None, seed: int, resize_mode: str = "shorter") -> torch.Tensor:
    """One training view of a uint8 (3, H, W) image on any device: resized to ``resize`` (when given;
    ``resize_mode`` "shorter": the shorter side, "squash": both sides, as the released 256x256 LMDB), then
    a ``crop`` x ``crop`` window and a mirror drawn from a generator seeded with ``seed``. The window is
    drawn on the CPU, so a GPU image gets exactly the CPU path's crop (both data paths call this)."""
    image = resize_for_crop(image, resize, resize_mode)
    return random_crop_flip(image, crop, torch.Generator().manual_seed(int(seed) % _SEED_MODULUS))


@dataclass(frozen=True)
class TargetSpec:
    """What the data path computes besides the crops: L, ab on the loss grid and (``encode``) the soft
    encoding. ``grid_stride`` is the encoder's ``output_stride`` (docs/protocols.md section 2)."""

    grid_stride: int
    k: int = DEFAULT_K
    sigma: float = DEFAULT_SIGMA
    encode: bool = True

    def __post_init__(self) -> None:
        if self.grid_stride < 1:
            raise ValueError(f"TargetSpec: grid_stride must be a positive integer, got {self.grid_stride}")


def _check_images(images: torch.Tensor, name: str) -> None:
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"{name}: expected uint8 (N, 3, H, W) images, got {images.dtype} {tuple(images.shape)}")


def lightness_input(images: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 RGB (N, 3, H, W) -> the network's input L (N, 1, H, W) in [0, 100].

    Contiguous (or channels-last when asked), so that a CPU network fed it does not switch to
    channels-last throughout (measured 1.5x slower for alexnet_lab at 64 px on this project's CPU).
    """
    _check_images(images, "lightness_input")
    L = rgb_to_lightness(images.float().div_(255.0), validate=False)
    return L.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def grid_targets(images: torch.Tensor, spec: TargetSpec) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """uint8 RGB (N, 3, H, W) -> (ab on the loss grid, its soft encoding ``(indices, weights)`` or None).

    The loss grid keeps every ``grid_stride``-th pixel with no averaging (docs/protocols.md section 2), and Lab
    is a per-pixel function, so converting the kept pixels alone gives the same ab as converting the
    whole image and decimating: 1/stride^2 of the work (1/64 for AlexNet), cheap enough for a CPU worker.
    """
    _check_images(images, "grid_targets")
    grid = decimate(images, spec.grid_stride)
    ab = rgb_to_lab(grid.float().div_(255.0), validate=False)[:, 1:].contiguous()
    # ab of uint8 RGB: inside the neighbour table's square, so soft_encode skips its range check (a GPU sync).
    encoded = soft_encode(ab, k=spec.k, sigma=spec.sigma, from_srgb=True) if spec.encode else None
    return ab, encoded


def prepare_targets(
    images: torch.Tensor, spec: TargetSpec, channels_last: bool = False
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """uint8 RGB (N, 3, H, W) on its device -> (L (N, 1, H, W) in [0, 100], ab on the loss grid, soft
    encoding ``(indices, weights)`` or None): :func:`lightness_input` and :func:`grid_targets`, the same
    values as ``ssl_colorize.pretrain.lab_inputs`` followed by the loss's ``soft_encode(ab, k, sigma)``.
    """
    return lightness_input(images, channels_last), *grid_targets(images, spec)


@dataclass
class PretrainBatch:
    """A training batch. ``images``: uint8 (N, 3, crop, crop); with targets also ``L`` (N, 1, crop, crop),
    ``ab`` (N, 2, h, w) on the loss grid and ``encoded`` = soft_encode(ab). ``skipped`` names the files
    that could not be decoded. Field names follow :class:`ssl_colorize.data.images.Batch`."""

    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    skipped: list[str] = field(default_factory=list)
    L: torch.Tensor | None = None
    ab: torch.Tensor | None = None
    encoded: tuple[torch.Tensor, torch.Tensor] | None = None

    def tensors(self) -> list[torch.Tensor]:
        out = [self.images, self.labels, self.indices]
        out += [t for t in (self.L, self.ab) if t is not None]
        out += list(self.encoded) if self.encoded is not None else []
        return out

    def _map(self, fn) -> "PretrainBatch":
        return PretrainBatch(
            fn(self.images), fn(self.labels), fn(self.indices), list(self.skipped),
            None if self.L is None else fn(self.L), None if self.ab is None else fn(self.ab),
            None if self.encoded is None else (fn(self.encoded[0]), fn(self.encoded[1])),
        )

    def pin_memory(self) -> "PretrainBatch":
        """Called by DataLoader(pin_memory=True): page-locked host memory for asynchronous copies."""
        return self._map(lambda t: t.pin_memory())

    def to(self, device: torch.device, non_blocking: bool = False) -> "PretrainBatch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))


def _empty_batch(crop: int, skipped: list[str], device: torch.device | str = "cpu") -> PretrainBatch:
    return PretrainBatch(
        torch.empty(0, 3, crop, crop, dtype=torch.uint8, device=device),
        torch.empty(0, dtype=torch.long, device=device), torch.empty(0, dtype=torch.long, device=device), skipped,
    )


# ----------------------------------------------------------------------------------------------
# "workers": decode and crop in worker processes (targets too when training on the CPU)
# ----------------------------------------------------------------------------------------------

class SeededCrops(Dataset):
    """Decoded and cropped images; an item is ``(index, sample_seed)`` (the trainer's sampler).

    Returns a :class:`~ssl_colorize.data.images.Sample` holding the crop, or a ``SkippedFile`` for a file
    that cannot be decoded.
    """

    def __init__(self, files: ImageFiles, crop: int, resize: int | None, resize_mode: str = "shorter"):
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"SeededCrops: resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
        self.files, self.crop, self.resize, self.resize_mode = files, int(crop), resize, resize_mode

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item):
        index, seed = item
        sample = self.files[index]
        if isinstance(sample, Sample):
            sample.image = crop_image(sample.image, self.crop, self.resize, seed, self.resize_mode)
        return sample


class CropCollate:
    """Stack a worker's crops into a :class:`PretrainBatch`; with a :class:`TargetSpec`, also compute
    ab on the loss grid and its soft encoding there, and L too when ``lightness`` (a CPU trainer: the
    batch is then final). For a GPU trainer L is left to the GPU: a full-resolution float image would
    quadruple the bytes to copy, and its few elementwise operations cost the GPU next to nothing."""

    def __init__(self, crop: int, targets: TargetSpec | None = None, lightness: bool = True):
        self.crop, self.targets, self.lightness = int(crop), targets, lightness

    def __call__(self, items: list) -> PretrainBatch:
        good = [s for s in items if isinstance(s, Sample)]
        skipped = [s.path for s in items if isinstance(s, SkippedFile)]
        if not good:
            return _empty_batch(self.crop, skipped)
        batch = PretrainBatch(
            torch.stack([s.image for s in good]),
            torch.tensor([s.label for s in good], dtype=torch.long),
            torch.tensor([s.index for s in good], dtype=torch.long),
            skipped,
        )
        if self.targets is not None:
            batch.ab, batch.encoded = grid_targets(batch.images, self.targets)
            if self.lightness:
                batch.L = lightness_input(batch.images)
        return batch


# ----------------------------------------------------------------------------------------------
# "device": read bytes in workers, decode the batch at once on the device
# ----------------------------------------------------------------------------------------------

@dataclass
class EncodedSample:
    data: torch.Tensor  # uint8 (num_bytes,), the file as it is on disk
    label: int
    index: int
    seed: int
    path: str


@dataclass
class EncodedBatch:
    """A batch of undecoded files. Their bytes travel from the worker as one buffer (``buffer``, with
    ``offsets``): each tensor that crosses a process boundary costs a shared-memory segment and a file
    descriptor, and one per file was measured to throttle the path."""

    buffer: torch.Tensor
    offsets: list[int]
    labels: list[int]
    indices: list[int]
    seeds: list[int]
    paths: list[str]
    skipped: list[str]

    @property
    def data(self) -> list[torch.Tensor]:
        """Each file's bytes: views of ``buffer``."""
        return [self.buffer[a:b] for a, b in zip(self.offsets[:-1], self.offsets[1:])]


class EncodedFiles(Dataset):
    """The files' bytes, not decoded; an item is ``(index, sample_seed)``. Unreadable or empty files
    come back as ``SkippedFile``."""

    def __init__(self, files: ImageFiles):
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item):
        index, seed = item
        path = self.files.paths[index]
        try:
            data = Path(path).read_bytes()
        except OSError:
            return SkippedFile(str(path))
        if not data:
            return SkippedFile(str(path))
        return EncodedSample(torch.frombuffer(bytearray(data), dtype=torch.uint8), self.files.labels[index],
                             index, int(seed), str(path))


def collate_encoded(items: list) -> EncodedBatch:
    good = [s for s in items if isinstance(s, EncodedSample)]
    sizes = [s.data.numel() for s in good]
    offsets = [0, *itertools.accumulate(sizes)]
    buffer = torch.cat([s.data for s in good]) if good else torch.empty(0, dtype=torch.uint8)
    return EncodedBatch(
        buffer, offsets, [s.label for s in good], [s.index for s in good], [s.seed for s in good],
        [s.path for s in good], [s.path for s in items if isinstance(s, SkippedFile)],
    )


def _is_jpeg(data: torch.Tensor) -> bool:
    return data.numel() >= 3 and data[:3].numpy().tobytes() == _JPEG_MAGIC


def _decode_one(data: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """One file: a JPEG on the device when it is a CUDA device, else (or when that fails) the CPU
    decoder (libjpeg-turbo / libpng / ...), moved to the device. None when nothing can decode it."""
    if device.type == "cuda" and _is_jpeg(data):
        # A CMYK or corrupt JPEG makes nvJPEG raise; the CPU decoder below may still read it.
        with suppress(RuntimeError):
            return decode_jpegs([data], device)[0]
    try:
        return decode_rgb(data).to(device)
    except (RuntimeError, ValueError, OSError):
        return None


def decode_batch(data: list[torch.Tensor], device: torch.device | str) -> list[torch.Tensor | None]:
    """Decode encoded images to uint8 (3, H, W) tensors on ``device``; None for an undecodable file.

    The JPEGs are decoded in one call (batched nvJPEG on CUDA; on the CPU the same libjpeg-turbo decoder
    as :func:`~ssl_colorize.data.images.read_image`). The batched call fails as a whole when one file is
    bad, so then, and for other formats, files are decoded one by one.
    """
    device = torch.device(device)
    out: list[torch.Tensor | None] = [None] * len(data)
    jpegs = [i for i, d in enumerate(data) if _is_jpeg(d)]
    if jpegs:
        with suppress(RuntimeError):  # a bad file in the batch: the loop below finds it
            decoded = decode_jpegs([data[i] for i in jpegs], device)
            for i, image in zip(jpegs, decoded):
                out[i] = image
    for i, image in enumerate(out):
        if image is None:
            out[i] = _decode_one(data[i], device)
    return out


@lru_cache(maxsize=None)
def device_decode_available(device: str) -> bool:
    """Whether the decoder (TorchCodec's or torchvision's, ssl_colorize.data.decode) can decode a JPEG on
    ``device`` (a CUDA build with nvJPEG); checked once."""
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        decode_jpegs([_probe_jpeg()], dev)
    except RuntimeError:
        return False
    return True


def _probe_jpeg() -> torch.Tensor:
    """A 16x16 grey JPEG's bytes (Pillow's encoder: no dependency on a deprecated torchvision encoder)."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (128, 128, 128)).save(buffer, "JPEG")
    return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)


#: "auto" keeps decoding on the CPU when this process may use at least this many cores. Measured on an
#: H100 with 16 cores (8 workers, results/throughput.csv): the workers path fed alexnet_lab at 180 px
#: 5369 img/s (1.3% of the step waiting for data) against 4932 img/s for nvJPEG decoding, which shares
#: the GPU with the step; one worker decodes, crops and encodes ~870 img/s, so fewer cores cannot keep
#: such a GPU busy and the device path (~4500 img/s alone, one core) is then the faster one.
AUTO_WORKERS_MIN_CORES = 8


def available_cores() -> int:
    """Cores this process may run on (SLURM's --cpus-per-task, taskset), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


#: Most loader workers the trainer starts when ``--workers`` is not given.
MAX_DEFAULT_WORKERS = 8


def default_workers(cores: int | None = None) -> int:
    """The trainer's loader workers when ``--workers`` is not given: the cores this process may use
    (``cores``, default :func:`available_cores`: under SLURM its ``--cpus-per-task``, not the node's
    count) less one for the training process itself, at most :data:`MAX_DEFAULT_WORKERS`."""
    cores = available_cores() if cores is None else cores
    return max(0, min(MAX_DEFAULT_WORKERS, cores - 1))


def resolve_data_path(name: str, device: torch.device | str, cores: int | None = None) -> str:
    """``--data-path`` -> "workers" or "device". "auto": "device" on a CUDA device whose torchvision
    decodes JPEGs there when fewer than :data:`AUTO_WORKERS_MIN_CORES` cores (``cores``, default
    :func:`available_cores`) are available, else "workers". "device" on the CPU is allowed (the batched
    decode then runs in the training process; the tests use it to compare the paths)."""
    device = torch.device(device)
    if name not in DATA_PATHS:
        raise ValueError(f"--data-path must be one of {DATA_PATHS}, got {name!r}")
    if name == "auto":
        cores = available_cores() if cores is None else cores
        few_cores = cores < AUTO_WORKERS_MIN_CORES
        return "device" if few_cores and device_decode_available(str(device)) else "workers"
    if name == "device" and device.type == "cuda" and not device_decode_available(str(device)):
        raise ValueError(f"--data-path device: this torchvision cannot decode JPEGs on {device} (no nvJPEG); "
                         "use --data-path workers")
    return name

