"""Geometric transforms on uint8 (3, H, W) tensors: resize, random crop with mirroring, centre crop."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def resize_shorter(image: torch.Tensor, size: int) -> torch.Tensor:
    """Resize so the shorter side is ``size`` (bilinear, antialiased), keeping the aspect ratio."""
    h, w = image.shape[-2:]
    if min(h, w) == size:
        return image
    scale = size / min(h, w)
    new = (max(size, round(h * scale)), max(size, round(w * scale)))
    out = F.interpolate(image[None].float(), size=new, mode="bilinear", antialias=True, align_corners=False)
    return out[0].round_().clamp_(0, 255).to(torch.uint8)


def resize_square(image: torch.Tensor, size: int) -> torch.Tensor:
    """Resize both sides to ``size`` (bilinear, antialiased as :func:`resize_shorter`): the aspect ratio is not
    kept. The released colorization training LMDBs held images squashed so (256x256, richzhang/colorization
    train/readme (d)), as Caffe's ``convert_imageset --resize_height --resize_width`` writes them."""
    h, w = image.shape[-2:]
    if (h, w) == (size, size):
        return image
    out = F.interpolate(image[None].float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out[0].round_().clamp_(0, 255).to(torch.uint8)


#: How the pretraining views resize an image before cropping (``--resize-mode``).
RESIZE_MODES = ("squash", "shorter")


def resize_for_crop(image: torch.Tensor, size: int | None, mode: str = "shorter") -> torch.Tensor:
    """``mode`` "shorter": :func:`resize_shorter`; "squash": :func:`resize_square`; ``size`` None or 0: as is."""
    if not size:
        return image
    if mode == "shorter":
        return resize_shorter(image, size)
    if mode == "squash":
        return resize_square(image, size)
    raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")


def random_crop_flip(image: torch.Tensor, crop: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random ``crop`` x ``crop`` window and a mirror with probability 1/2 (images smaller than the
    crop are first resized up to it)."""
    if min(image.shape[-2:]) < crop:
        image = resize_shorter(image, crop)
    h, w = image.shape[-2:]
    top = int(torch.randint(0, h - crop + 1, (1,), generator=generator))
    left = int(torch.randint(0, w - crop + 1, (1,), generator=generator))
    image = image[:, top : top + crop, left : left + crop]
    if bool(torch.rand(1, generator=generator) < 0.5):
        image = image.flip(-1)
    return image


def center_crop(image: torch.Tensor, crop: int) -> torch.Tensor:
    if min(image.shape[-2:]) < crop:
        image = resize_shorter(image, crop)
    h, w = image.shape[-2:]
    top, left = (h - crop) // 2, (w - crop) // 2
    return image[:, top : top + crop, left : left + crop]


class TrainTransform:
    """Resize the shorter side to ``resize`` (if given), then random crop + mirror (pretraining, probes)."""

    def __init__(self, crop: int, resize: int | None = None):
        self.crop, self.resize = crop, resize

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if self.resize:
            image = resize_shorter(image, self.resize)
        return random_crop_flip(image, self.crop)


class EvalTransform:
    """Resize the shorter side to ``resize`` (if given), then the centre crop."""

    def __init__(self, crop: int, resize: int | None = None):
        self.crop, self.resize = crop, resize

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if self.resize:
            image = resize_shorter(image, self.resize)
        return center_crop(image, self.crop)


# Fine-tuning crops (VOC classification, docs/protocols.md section 5): the image rescaled by a random
# factor, a random window padded with a fill colour (the mean colour: zero after the encoder's
# normalisation, as Caffe's padding after mean subtraction) where the image is smaller, a mirror.

def rescale(image: torch.Tensor, factor: float) -> torch.Tensor:
    """Both sides times ``factor`` (bilinear; antialiased when shrinking)."""
    h, w = image.shape[-2:]
    size = (max(1, round(h * factor)), max(1, round(w * factor)))
    if size == (h, w):
        return image
    out = F.interpolate(image[None].float(), size=size, mode="bilinear", antialias=factor < 1, align_corners=False)
    return out[0].round_().clamp_(0, 255).to(torch.uint8)


def pad_to(image: torch.Tensor, crop: int, fill: tuple[int, ...]) -> torch.Tensor:
    """Pad (centred) with ``fill`` so both sides are at least ``crop``."""
    h, w = image.shape[-2:]
    ph, pw = max(0, crop - h), max(0, crop - w)
    if not ph and not pw:
        return image
    out = torch.empty(image.shape[0], h + ph, w + pw, dtype=image.dtype)
    out[:] = torch.tensor(fill, dtype=image.dtype)[:, None, None]
    out[:, ph // 2: ph // 2 + h, pw // 2: pw // 2 + w] = image
    return out


def random_scale_crop(image: torch.Tensor, crop: int, scales: tuple[float, float], fill: tuple[int, ...],
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Rescale by a factor uniform in ``scales``, a random ``crop`` window (padded if needed), mirror at 1/2."""
    factor = scales[0] + (scales[1] - scales[0]) * float(torch.rand(1, generator=generator))
    return random_crop_flip(pad_to(rescale(image, factor), crop, fill), crop, generator)


def pad_center_crop(image: torch.Tensor, crop: int, fill: tuple[int, ...]) -> torch.Tensor:
    """The centre ``crop`` window of the unscaled image, padded with ``fill`` where it is smaller."""
    image = pad_to(image, crop, fill)
    h, w = image.shape[-2:]
    top, left = (h - crop) // 2, (w - crop) // 2
    return image[:, top: top + crop, left: left + crop]


class ScaleCropFlip:
    """Training crops for fine-tuning: :func:`random_scale_crop` from the global generator."""

    def __init__(self, crop: int, scales: tuple[float, float], fill: tuple[int, ...]):
        self.crop, self.scales, self.fill = crop, scales, fill

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return random_scale_crop(image, self.crop, self.scales, self.fill)


class SeededTestCrops:
    """``n`` random crops drawn as in training, then the centre crop: (n + 1, 3, crop, crop).

    ``crops(image, index)`` draws from a generator seeded by (seed, image index): the evaluation is
    reproducible whatever the worker count.
    """

    def __init__(self, crop: int, scales: tuple[float, float], n: int, seed: int, fill: tuple[int, ...]):
        self.crop, self.scales, self.n, self.seed, self.fill = crop, scales, n, seed, fill

    def __call__(self, image: torch.Tensor, index: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        views = [random_scale_crop(image, self.crop, self.scales, self.fill, generator) for _ in range(self.n)]
        return torch.stack(views + [pad_center_crop(image, self.crop, self.fill)])
