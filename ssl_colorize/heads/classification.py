"""The VOC classification head (Krähenbühl et al.'s fine-tuning; docs/protocols.md section 5) and its loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ssl_colorize.data.voc import VOC_CLASSES


class VOCClassifier(nn.Module):
    """Encoder -> the feature tap (global-average-pooled when spatial) -> new fc8 (20 logits).

    fc8's weights are N(0, ``std``) and its bias 0.1: the released code's init of its new layers
    (philkr/voc-classification ``src/train_cls.py``, ``--random-from drop7``: weights N(0, 0.01),
    biases 0.1). ``dropout_after``: stages followed by dropout with probability ``dropout`` while this
    module is in training mode (the released net's drop6 / drop7 after relu6 / relu7, ratio 0.5; the
    encoder card's ``transfer.dropout_after``), whatever the fine-tuning scope: Caffe's dropout layers
    run in the TRAIN net even when the layers before them do not learn. In eval mode: none.
    """

    def __init__(self, encoder: nn.Module, tap: str, num_classes: int = len(VOC_CLASSES), std: float = 0.01,
                 dropout: float = 0.0, dropout_after: tuple[str, ...] = ()):
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        stages = list(encoder.stage_names)
        if tap not in stages:
            raise ValueError(f"{type(encoder).__name__} has no stage {tap!r}")
        reached = stages[: stages.index(tap) + 1]
        unknown = [name for name in dropout_after if name not in reached]
        if unknown:
            raise ValueError(f"dropout after {unknown}: not a stage up to the tap {tap} ({reached})")
        self.encoder = encoder
        self.tap = tap
        self.dropout = dropout
        self.dropout_after = tuple(dropout_after)
        self.fc8 = nn.Linear(encoder.taps[tap].channels, num_classes)
        nn.init.normal_(self.fc8.weight, std=std)
        nn.init.constant_(self.fc8.bias, 0.1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The tap's feature map, with dropout after the named stages in training mode."""
        if not (self.dropout > 0 and self.dropout_after):
            return self.encoder.forward_taps(x, [self.tap])[self.tap]
        h = self.encoder.normalize_input(x)
        for name, stage in self.encoder.stages():
            h = stage(h)
            if name in self.dropout_after:
                h = F.dropout(h, self.dropout, self.training)
            if name == self.tap:
                break
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc8(self.features(x).mean(dim=(2, 3)))


def masked_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sigmoid cross-entropy over the labels that are not ignored (target 0), summed and divided by
    the batch size (the released code's loss normalisation). Targets: +1 present, -1 absent, 0 ignored."""
    mask = (targets != 0).to(logits.dtype)
    positive = (targets > 0).to(logits.dtype)
    loss = F.binary_cross_entropy_with_logits(logits, positive, reduction="none")
    return (loss * mask).sum() / logits.shape[0]
