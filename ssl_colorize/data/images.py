"""Image files on disk as a dataset: an ImageFolder root (ImageNet's train/, Places205) or a list file.

Decoding is TorchCodec's where it is installed, torchvision's otherwise (libjpeg-turbo / libpng ...;
:mod:`ssl_colorize.data.decode`), straight to a uint8 CHW tensor; Pillow reads the formats neither
decodes (BMP, TIFF, PPM). A file that cannot be
decoded is skipped, never fatal: the dataset yields a :class:`SkippedFile` for it, :func:`collate_skipping`
drops it and counts it, and the trainer reports the count and the names (issue 3, "Bad input"). Only
data where nothing is readable stops the trainer, with one line naming it and a few of its files
(``ssl_colorize.training.pretext``, issue 16).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import Dataset

from ssl_colorize.data.decode import decode_rgb

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff", ".gif")


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _scan(folder: Path) -> list[Path]:
    found = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs.sort()
        found.extend(Path(root) / f for f in sorted(files) if _is_image(f))
    return found


def find_images(source: str | os.PathLike) -> tuple[list[Path], list[int], list[str]]:
    """List the images of ``source`` -> (paths, labels, class names).

    ``source`` is a folder (an ImageFolder root: each sub-folder is a class; images directly inside
    the root get label -1) or a text file with one image path per line (relative paths are taken from
    the list file's folder; '#' starts a comment; labels are -1).
    Raises ValueError naming ``source`` when it is missing or holds no image.
    """
    source = Path(source)
    if not source.exists():
        raise ValueError(f"data source not found: {source}")
    if source.is_file():
        paths = []
        for line in source.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                path = Path(line)
                paths.append(path if path.is_absolute() else source.parent / path)
        if not paths:
            raise ValueError(f"image list {source} names no image")
        return paths, [-1] * len(paths), []
    classes = sorted(d.name for d in source.iterdir() if d.is_dir() and not d.name.startswith("."))
    paths, labels = [], []
    for f in sorted(source.iterdir()):
        if f.is_file() and _is_image(f.name):
            paths.append(f)
            labels.append(-1)
    for label, name in enumerate(classes):
        for path in _scan(source / name):
            paths.append(path)
            labels.append(label)
    if not paths:
        raise ValueError(f"data folder {source} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return paths, labels, classes


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """Decode an image file to a uint8 (3, H, W) RGB tensor (grey and palette images are expanded)."""
    data = torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8)
    if data.numel() == 0:
        raise ValueError(f"empty file: {path}")
    return decode_rgb(data)


@dataclass
class Sample:
    image: torch.Tensor  # uint8 (3, H, W)
    label: int
    index: int


class ImageFiles(Dataset):
    """Images of a folder or list file; ``transform`` maps a uint8 (3, H, W) tensor to another.

    ``__getitem__`` returns a :class:`Sample`, or ``None`` (with the path recorded by the collate
    function) when the file cannot be decoded.
    """

    def __init__(self, source: str | os.PathLike, transform: Callable | None = None):
        self.source = Path(source)
        self.paths, self.labels, self.classes = find_images(source)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        path = self.paths[index]
        try:
            image = read_image(path)
        except (RuntimeError, ValueError, OSError):
            return SkippedFile(str(path))
        if self.transform is not None:
            image = self.transform(image)
        return Sample(image, self.labels[index], index)


@dataclass
class SkippedFile:
    path: str


@dataclass
class Batch:
    images: torch.Tensor  # uint8 (N, 3, H, W)
    labels: torch.Tensor  # long (N,)
    indices: torch.Tensor  # long (N,)
    skipped: list[str]

    def pin_memory(self):
        return Batch(self.images.pin_memory(), self.labels.pin_memory(), self.indices.pin_memory(), self.skipped)


def collate_skipping(items: list) -> Batch:
    """Stack the decodable samples; list the files that were skipped."""
    good = [s for s in items if isinstance(s, Sample)]
    skipped = [s.path for s in items if isinstance(s, SkippedFile)]
    if not good:
        return Batch(torch.empty(0, 3, 0, 0, dtype=torch.uint8), torch.empty(0, dtype=torch.long),
                     torch.empty(0, dtype=torch.long), skipped)
    return Batch(
        torch.stack([s.image for s in good]),
        torch.tensor([s.label for s in good], dtype=torch.long),
        torch.tensor([s.index for s in good], dtype=torch.long),
        skipped,
    )
