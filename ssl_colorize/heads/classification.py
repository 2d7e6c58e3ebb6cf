"""The VOC classification head (Krähenbühl et al.'s fine-tuning; docs/protocols.md section 5) and its loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ssl_colorize.data.voc import VOC_CLASSES


class VOCClassifier(nn.Module):
    """Encoder -> the feature tap (global-average-pooled when spatial) -> new fc8 (20 logits).

    fc8's weights are N(0, ``std``) and its bias 0.1: the released code's init of its new layers.
    """

    def __init__(self, encoder: nn.Module, tap: str, num_classes: int = len(VOC_CLASSES), std: float = 0.01):
        super().__init__()
        self.encoder = encoder
        self.tap = tap
        self.fc8 = nn.Linear(encoder.taps[tap].channels, num_classes)
        nn.init.normal_(self.fc8.weight, std=std)
        nn.init.constant_(self.fc8.bias, 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.encoder.forward_taps(x, [self.tap])[self.tap]
        return self.fc8(features.mean(dim=(2, 3)))


def masked_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sigmoid cross-entropy over the labels that are not ignored (target 0), summed and divided by
    the batch size (the released code's loss normalisation). Targets: +1 present, -1 absent, 0 ignored."""
    mask = (targets != 0).to(logits.dtype)
    positive = (targets > 0).to(logits.dtype)
    loss = F.binary_cross_entropy_with_logits(logits, positive, reduction="none")
    return (loss * mask).sum() / logits.shape[0]
