"""Colour-quality metrics (docs/protocols.md section 6, paper Table 1).

- Raw accuracy AuC: the share of pixels whose predicted ab lies within an L2 distance t of the ground
  truth, for t = 0, 1, ..., 150, integrated over t (trapezoid rule) and normalised so a perfect
  prediction scores 100.
- Class-rebalanced AuC: the same with each pixel weighted by 1 / prior of its ground-truth bin
  (lambda = 0), so rare saturated colours count as much as common desaturated ones.
- Colourfulness: Hasler & Suesstrunk's (2003) M = sigma_rgyb + 0.3 mu_rgyb, on 8-bit RGB scale, to
  judge desaturation (the L2 loss's sepia look scores low).
"""

from __future__ import annotations

import torch

from ssl_colorize.targets import nearest_bin

AUC_MAX_THRESHOLD = 150


def accuracy_curve(
    pred_ab: torch.Tensor,
    gt_ab: torch.Tensor,
    weights: torch.Tensor | None = None,
    max_threshold: int = AUC_MAX_THRESHOLD,
) -> torch.Tensor:
    """(max_threshold + 1,) weighted share of pixels with ||pred - gt||_2 <= t, for t = 0..max_threshold.

    pred_ab, gt_ab: (N, 2, H, W); weights: optional (N, H, W) per-pixel weights.
    """
    if pred_ab.shape != gt_ab.shape or pred_ab.dim() != 4 or pred_ab.shape[1] != 2:
        raise ValueError(f"accuracy_curve: pred and gt must both be (N, 2, H, W); got {tuple(pred_ab.shape)} and {tuple(gt_ab.shape)}")
    dist = (pred_ab.double() - gt_ab.double()).pow(2).sum(1).sqrt().flatten()
    w = torch.ones_like(dist) if weights is None else weights.double().flatten().to(dist.device)
    if w.shape != dist.shape:
        raise ValueError(f"accuracy_curve: weights must be (N, H, W) = {tuple(gt_ab.shape[:1] + gt_ab.shape[2:])}, got {tuple(weights.shape)}")
    # A pixel at distance d is counted for every threshold t >= ceil(d): histogram over ceil(d), cumsum.
    first_threshold = torch.ceil(dist).clamp(max=max_threshold + 1).long()
    hist = torch.zeros(max_threshold + 2, dtype=torch.float64, device=dist.device)
    hist.index_add_(0, first_threshold, w)
    return hist.cumsum(0)[: max_threshold + 1] / w.sum()


def auc(
    pred_ab: torch.Tensor,
    gt_ab: torch.Tensor,
    weights: torch.Tensor | None = None,
    max_threshold: int = AUC_MAX_THRESHOLD,
) -> float:
    """Area under the accuracy-vs-threshold curve, in percent (100 = perfect)."""
    curve = accuracy_curve(pred_ab, gt_ab, weights, max_threshold)
    area = torch.trapezoid(curve, dx=1.0) / max_threshold
    return float(100.0 * area)


def rebalanced_pixel_weights(gt_ab: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """(N, H, W) weights 1 / p(q*) of each pixel's ground-truth bin: the class-rebalanced AuC's weighting."""
    return 1.0 / prior.to(gt_ab.device).double()[nearest_bin(gt_ab)]


def rebalanced_auc(pred_ab: torch.Tensor, gt_ab: torch.Tensor, prior: torch.Tensor) -> float:
    """Class-rebalanced AuC (docs/protocols.md section 6)."""
    return auc(pred_ab, gt_ab, rebalanced_pixel_weights(gt_ab, prior))


def colourfulness(rgb: torch.Tensor) -> torch.Tensor:
    """Hasler & Suesstrunk colourfulness per image: rgb (N, 3, H, W) in [0, 1] -> (N,), 0 for grey."""
    if rgb.dim() != 4 or rgb.shape[1] != 3:
        raise ValueError(f"colourfulness: expected (N, 3, H, W), got {tuple(rgb.shape)}")
    r, g, b = (255.0 * rgb.double()).unbind(1)
    rg = (r - g).flatten(1)
    yb = (0.5 * (r + g) - b).flatten(1)
    std = (rg.var(1, unbiased=False) + yb.var(1, unbiased=False)).sqrt()
    mean = (rg.mean(1).pow(2) + yb.mean(1).pow(2)).sqrt()
    return std + 0.3 * mean


def mean_chroma(ab: torch.Tensor) -> torch.Tensor:
    """Mean ab magnitude sqrt(a^2 + b^2) per image: (N, 2, H, W) -> (N,)."""
    return ab.double().pow(2).sum(1).sqrt().flatten(1).mean(1)
