"""What every encoder shares: named taps, input normalisation, forward_taps and the logits' loss grid.

An encoder is a chain of named *stages* (``conv1``, ``pool1``, ``conv2``, ...) followed by a 313-way
``head``. Some stages are *taps*: their outputs can be read by probes and transfer heads
(DESIGN.md, "Contracts that keep it simple"). :meth:`Encoder.forward_taps` walks the stages in order
and stops at the deepest requested tap, so asking for ``conv2`` never runs ``conv3`` and beyond.

Input conventions (COMMON brief, "Existing shared API"):

* ``input_space == "L"``: the L channel in Lab units, shape (N, 1, H, W), values in [0, 100].
  It is normalised inside the model as ``(L - 50) / 100``, i.e. into [-0.5, 0.5]. This is the
  PyTorch port's convention; the released Caffe models used ``L - 50`` ([-50, 50], docs/protocols.md
  section 1). Every layer that sees the input is followed by a BatchNorm, so the two conventions give
  the same function once trained; the choice only changes the scale at which conv1's weights live
  (and hence the effective step size of Adam and the pull of weight decay on conv1). Weights ported
  from the Caffe models therefore need conv1's weights multiplied by 100 to be used here.
* ``input_space == "rgb"``: RGB in [0, 1], shape (N, 3, H, W), normalised with the ImageNet
  mean / std that torchvision's models were trained with.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ssl_colorize.targets import NUM_BINS

#: L normalisation: (L - L_CENTER) / L_SCALE (see the module docstring for the Caffe difference).
L_CENTER = 50.0
L_SCALE = 100.0
#: torchvision's ImageNet normalisation for RGB encoders.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

INPUT_SPACES = ("L", "rgb")


class Tap(NamedTuple):
    """A readable feature map: its channel count and its stride in input pixels."""

    channels: int
    stride: int


class Encoder(nn.Module):
    """Base class: subclasses build their stages and fill ``taps``, ``probe_taps``, ``output_stride``.

    Subclass contract:

    * register each stage as an attribute and list the attribute names, in execution order, in
      ``self.stage_names`` (or override :meth:`stages` when the modules live elsewhere);
    * ``self.taps``: ordered dict ``name -> Tap`` (every tap name is a stage name), shallowest first;
    * ``self.probe_taps``: the five taps used by conv1..conv5-style probes;
    * ``self.output_stride``: the loss-grid factor (docs/protocols.md section 2): ground-truth ab is
      decimated by this factor and :meth:`logits_at` brings the logits onto that grid;
    * ``self.head``: the 313-way pretext head applied after the last stage (absent when
      ``has_colour_head`` is False, in which case :meth:`forward` raises).
    """

    #: Whether forward() produces 313-way colour logits. Encoders that are only feature
    #: extractors (e.g. a supervised torchvision AlexNet) set this to False.
    has_colour_head: bool = True

    def __init__(self, input_space: str = "L") -> None:
        super().__init__()
        if input_space not in INPUT_SPACES:
            raise ValueError(f"input_space must be one of {INPUT_SPACES}, got {input_space!r}")
        self.input_space = input_space
        self.stage_names: tuple[str, ...] = ()
        self.taps: dict[str, Tap] = {}
        self.probe_taps: tuple[str, ...] = ()
        self.output_stride: int = 1
        self.num_bins = NUM_BINS
        if input_space == "rgb":
            # Non-persistent: the constants are not weights and stay out of the state_dict.
            self.register_buffer("rgb_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("rgb_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @staticmethod
    def head_channels(out_channels: int) -> int:
        """The pretext head's width: 313 colour logits, or 2 (ab itself) for the L2 regression baseline."""
        if out_channels not in (NUM_BINS, 2):
            raise ValueError(f"out_channels must be {NUM_BINS} (classification) or 2 (L2 regression on ab), got {out_channels}")
        return out_channels

    # ----------------------------------------------------------------------------------- input
    @property
    def in_chans(self) -> int:
        """Channels the model expects: 1 for L, 3 for RGB."""
        return 1 if self.input_space == "L" else 3

    def normalize_input(self, x: torch.Tensor) -> torch.Tensor:
        """Check the input's shape and map it from its public units to what conv1 sees."""
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            expected = "(N, 1, H, W) L in [0, 100]" if self.input_space == "L" else "(N, 3, H, W) RGB in [0, 1]"
            raise ValueError(
                f"{type(self).__name__} expects input {expected}, got a tensor of shape {tuple(x.shape)}"
            )
        if self.input_space == "L":
            return (x - L_CENTER) / L_SCALE
        return (x - self.rgb_mean) / self.rgb_std

    # ---------------------------------------------------------------------------------- stages
    def stages(self) -> Iterator[tuple[str, Callable[[torch.Tensor], torch.Tensor]]]:
        """The (name, module) stages in execution order."""
        for name in self.stage_names:
            yield name, getattr(self, name)

    def _run_stages(self, x: torch.Tensor) -> torch.Tensor:
        h = self.normalize_input(x)
        for _, stage in self.stages():
            h = stage(h)
        return h

    # ------------------------------------------------------------------------------------ taps
    def resolve_taps(self, taps: str | Iterable[str]) -> list[str]:
        """Validate tap names; return them without duplicates, shallowest first.

        Raises ValueError naming the unknown taps and listing the available ones.
        """
        names = [taps] if isinstance(taps, str) else list(taps)
        if not names:
            raise ValueError(f"no tap requested; {type(self).__name__} has taps {list(self.taps)}")
        unknown = [name for name in names if name not in self.taps]
        if unknown:
            raise ValueError(
                f"unknown tap(s) {unknown} for {type(self).__name__}; available taps: {list(self.taps)}"
            )
        wanted = set(names)
        return [name for name in self.taps if name in wanted]

    def forward_taps(self, x: torch.Tensor, taps: str | Iterable[str]) -> dict[str, torch.Tensor]:
        """The requested feature maps (post-ReLU), computed up to the deepest requested tap only.

        Returns a dict ``tap name -> (N, C, h, w)`` in depth order.
        """
        ordered = self.resolve_taps(taps)
        wanted = set(ordered)
        deepest = ordered[-1]
        out: dict[str, torch.Tensor] = {}
        h = self.normalize_input(x)
        for name, stage in self.stages():
            h = stage(h)
            if name in wanted:
                out[name] = h
                if name == deepest:
                    break
        return out

    # ---------------------------------------------------------------------------------- logits
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """313-way colour logits at the network's native resolution, (N, 313, h, w)."""
        if not self.has_colour_head:
            raise RuntimeError(
                f"{type(self).__name__} has no colour head: it is a feature extractor; "
                "use forward_taps(x, taps) to read its features"
            )
        return self.head(self._run_stages(x))

    def loss_grid_size(self, height: int, width: int) -> tuple[int, int]:
        """The loss grid for an input of height x width: every ``output_stride``-th pixel.

        Matches ``ab[..., ::s, ::s]`` (ssl_colorize.targets.decimate), i.e. ceil(H / s) x ceil(W / s).
        """
        s = self.output_stride
        return math.ceil(height / s), math.ceil(width / s)

    def logits_at(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Colour logits on the loss grid: ``forward(x)`` passed through :func:`resize_logits`.

        ``size`` defaults to :meth:`loss_grid_size` of the input. The colorization net and the
        ResNet produce logits on that grid natively (no resize happens); the AlexNet variant's
        logits (12x12 for a 180 crop) are bilinearly resized to it (23x23), as the released code's
        Resize layer did (docs/protocols.md section 2). Under DistributedDataParallel call the wrapper
        instead, ``resize_logits(ddp_model(x), model.loss_grid_size(H, W))``, so DDP sees the forward.
        """
        if size is None:
            size = self.loss_grid_size(x.shape[-2], x.shape[-1])
        return resize_logits(self(x), size)


def resize_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinearly resize (N, Q, h, w) logits to ``size``; a no-op when they already have it.

    ``align_corners=True``: the logit grid and the decimated ab grid both start at input pixel 0 and
    are evenly spaced, so their corners coincide (for AlexNet at 180, logit i sits near input pixel
    16 i and loss-grid cell j at 8 j, i.e. cell j <-> logit j / 2 exactly).
    """
    size = (int(size[0]), int(size[1]))
    if tuple(logits.shape[-2:]) == size:
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=True)


def init_conv_weights_(module: nn.Module, head: nn.Module | None = None, head_std: float = 0.01) -> None:
    """Seeded-random default init: He-normal convs (fan-in, ReLU gain), zero biases.

    The ``head`` (the 313-way classifier) gets a small Gaussian, N(0, head_std), so the initial
    colour distribution is close to uniform. Data-dependent k-means init
    (ssl_colorize.kmeans_init) can overwrite this afterwards.
    """
    head_params = set()
    if head is not None:
        head_params = {id(p) for p in head.parameters()}
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            if id(m.weight) in head_params:
                nn.init.normal_(m.weight, std=head_std)
            else:
                # ConvTranspose2d stores (in, out/groups, kh, kw), so torch's "fan_out" (dim 0 x
                # kernel) is the count of inputs that feed it: the fan-in in the usual sense.
                mode = "fan_out" if isinstance(m, nn.ConvTranspose2d) else "fan_in"
                nn.init.kaiming_normal_(m.weight, mode=mode, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
