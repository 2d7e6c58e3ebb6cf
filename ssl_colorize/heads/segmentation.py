"""FCN-32s on an encoder (Long et al.; docs/protocols.md section 5): the encoder run fully convolutionally up
to its segmentation tap (from its card), dropout, a 1x1 "score" convolution to 21 classes
(zero-initialised, as FCN), and bilinear sampling of the score map at every input pixel's position.

As the released net (richzhang/colorization ``feature_learning_tests/segmentation/train_val.prototxt``):

* conv1 ``pad: 100``: the input is padded by ``pad`` pixels with the value the encoder normalises to
  zero (Caffe pads the mean-free input with zeros);
* ``drop6`` / ``drop7`` (``dropout_ratio: 0.5``, Caffe's element-wise Dropout): dropout after every
  stage the card's ``transfer.dropout_after`` names before the tap (fc6 for alexnet_lab), and before
  the score layer (after the tap: drop7);
* ``score-fr``: a 1x1 convolution to 21 classes without a ``weight_filler`` / ``bias_filler``, i.e.
  Caffe's default constant 0: zero-initialised;
* ``upsample`` (Deconvolution, ``kernel_size: 63``, ``stride: 32``, ``lr_mult: 0``, bilinear weights
  from ``surgery.interp`` in ``solve.py``) then ``crop`` to the input: each pixel gets the linear
  interpolation of the two nearest score cells in each direction, and beyond the first / last cell
  centre the one cell fades linearly to zero over 32 pixels (the deconvolution's kernel has no other
  cell to add). :meth:`FCN32s.forward` samples the zero-bordered score map exactly there
  (:func:`feature_geometry`: output cell i is centred on input pixel offset + stride * i, 113 + 32 i
  for AlexNet's fc7 in padded coordinates): the deconvolution and its crop in one step.

"Colour input" (``colour_input=True``, L encoders only): ``conv1_ab``, a second conv1 on the colour
channels with the same geometry as the encoder's first convolution, zero-initialised weights and bias
(no fillers: Caffe's constant 0), summed with the L branch's conv1 output (``conv1_lab``, Eltwise sum;
here before its BatchNorm and ReLU). Ours feeds it a, b / 100 (two channels); the released file feeds it
one channel, ``data_ab`` = 0.693 (a + b) (a fixed 1x1 convolution with ``num_output: 1``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ssl_colorize.color import rgb_to_lab
from ssl_colorize.data.voc import SEG_CLASSES
from ssl_colorize.heads.probe import encoder_input
from ssl_colorize.models.cards import card_of

AB_SCALE = 100.0  # ab enters the colour branch as ab / 100, about the range of the normalised L


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def feature_geometry(encoder: nn.Module, tap: str) -> tuple[tuple[float, float], int]:
    """((offset_y, offset_x), stride): output cell i of ``tap`` is centred on input pixel offset + stride * i.

    Walks the convolutions and poolings of the stages up to ``tap`` in order: each adds
    (dilation * (kernel - 1) / 2 - padding) * (the stride so far) to the offset. For branching
    stages (ResNet blocks) every term is zero (centred kernels, "same" padding), so the offset is 0
    whatever the walk counts; the stride is the tap's declared one.
    """
    offset = [0.0, 0.0]
    jump = [1, 1]
    for name, stage in encoder.stages():
        for m in stage.modules():
            if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
                k, s, p = _pair(m.kernel_size), _pair(m.stride), _pair(m.padding)
                d = _pair(m.dilation) if isinstance(m, (nn.Conv2d, nn.MaxPool2d)) else (1, 1)
                for axis in range(2):
                    offset[axis] += (d[axis] * (k[axis] - 1) / 2 - p[axis]) * jump[axis]
                    jump[axis] *= s[axis]
        if name == tap:
            break
    return (offset[0], offset[1]), encoder.taps[tap].stride


def seg_tap(encoder: nn.Module) -> str:
    """The tap the FCN scores: the card's (fc7 for alexnet_lab, whose fc6 / fc7 are convolutions; the
    deepest convolutional tap otherwise: res5, or conv5 for torchvision's AlexNet with Linear fc layers)."""
    return card_of(encoder).transfer.segmentation_tap


def inner_dropout_stages(encoder: nn.Module, tap: str) -> list[str]:
    """The stages before ``tap`` that the card follows by dropout (alexnet_lab at fc7: fc6, the released
    ``drop6``); the tap's own dropout (``drop7``) is the one before the score layer."""
    names = [name for name, _ in encoder.stages()]
    before = names[: names.index(tap)] if tap in names else []
    return [name for name in card_of(encoder).transfer.dropout_after if name in before]


def default_pad(tap: str) -> int:
    """FCN's conv1 pad of 100 when the FCN scores fc7 (AlexNet's fc6 is a 6x6 convolution: the pad lets
    small images still reach one fc7 cell); 0 for the taps of "same"-padded stages (conv5, res5)."""
    return 100 if tap == "fc7" else 0


def first_conv(encoder: nn.Module) -> nn.Conv2d:
    for m in encoder.modules():
        if isinstance(m, nn.Conv2d):
            return m
    raise ValueError(f"{type(encoder).__name__} has no convolution for the colour branch to join")


class FCN32s(nn.Module):
    """Encoder -> feature tap -> dropout -> 1x1 score (21) -> bilinear sampling at every input pixel."""

    def __init__(self, encoder: nn.Module, tap: str, pad: int, pad_values: tuple[float, ...],
                 num_classes: int = len(SEG_CLASSES), dropout: float = 0.5, colour_input: bool = False):
        super().__init__()
        self.encoder, self.tap, self.pad = encoder, tap, int(pad)
        self.register_buffer("pad_values", torch.tensor(pad_values).view(1, -1, 1, 1), persistent=False)
        self.dropout_p = float(dropout)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()  # drop7 (element-wise, as Caffe)
        stages = dict(encoder.stages())
        self._dropout_hooks = [stages[name].register_forward_hook(self._drop_after_stage)
                               for name in inner_dropout_stages(encoder, tap)] if dropout > 0 else []
        self.score = nn.Conv2d(encoder.taps[tap].channels, num_classes, 1)
        nn.init.zeros_(self.score.weight)
        nn.init.zeros_(self.score.bias)
        (self.offset_y, self.offset_x), self.stride = feature_geometry(encoder, tap)
        self.ab_conv: nn.Conv2d | None = None
        self._ab: torch.Tensor | None = None
        if colour_input:
            conv = first_conv(encoder)
            self.ab_conv = nn.Conv2d(2, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                                     dilation=conv.dilation)
            nn.init.zeros_(self.ab_conv.weight)  # starts as the grey model exactly
            nn.init.zeros_(self.ab_conv.bias)
            conv.register_forward_hook(self._add_ab)

    def _drop_after_stage(self, module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        return F.dropout(output, self.dropout_p, training=self.training)

    def _add_ab(self, module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        if self._ab is None:
            raise RuntimeError("the colour-input FCN needs ab: call model(x, ab)")
        return output + self.ab_conv(self._ab)

    def _sample_grid(self, out_h: int, out_w: int, height: int, width: int, device) -> torch.Tensor:
        """Where each input pixel falls on the score map bordered by one zero cell (sizes out + 2)."""
        def axis(n_in: int, n_out: int, offset: float) -> torch.Tensor:
            u = (torch.arange(n_in, device=device, dtype=torch.float32) + self.pad - offset) / self.stride
            return (u + 1) / (n_out + 1) * 2 - 1  # cell u of the map is cell u + 1 of the bordered one

        gy, gx = axis(height, out_h, self.offset_y), axis(width, out_w, self.offset_x)
        return torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1)  # (H, W, 2) as (x, y)

    def forward(self, x: torch.Tensor, ab: torch.Tensor | None = None) -> torch.Tensor:
        """x: encoder input (N, C, H, W) in its units; ab: (N, 2, H, W) for the colour variant.
        Returns (N, 21, H, W) logits aligned with the input pixels."""
        height, width = x.shape[-2:]
        if self.pad:
            x = F.pad(x - self.pad_values, [self.pad] * 4) + self.pad_values
        if self.ab_conv is not None:
            if ab is None:
                raise ValueError("--colour-input: the model needs the ab channels")
            self._ab = F.pad(ab / AB_SCALE, [self.pad] * 4)
        try:
            features = self.encoder.forward_taps(x, [self.tap])[self.tap]
        finally:
            self._ab = None
        scores = self.score(self.dropout(features))
        grid = self._sample_grid(scores.shape[-2], scores.shape[-1], height, width, x.device)
        grid = grid[None].expand(scores.shape[0], -1, -1, -1)
        # The zero border: past the last cell centre the value fades to 0 over one cell, as the released
        # bilinear deconvolution's; further out both neighbours are the (clamped) zero border.
        bordered = F.pad(scores, [1, 1, 1, 1])
        return F.grid_sample(bordered, grid, mode="bilinear", padding_mode="border", align_corners=True)


def model_inputs(images: torch.Tensor, mode: str, colour: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """uint8 RGB (N, 3, H, W) on the device -> (encoder input, ab or None)."""
    if colour:
        lab = rgb_to_lab(images.float() / 255.0, validate=False)
        return lab[:, :1], lab[:, 1:]
    return encoder_input(images, mode), None
