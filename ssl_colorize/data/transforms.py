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
