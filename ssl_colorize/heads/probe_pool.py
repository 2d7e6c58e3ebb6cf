"""How a linear probe reduces a tap's maps to about 9k features (docs/protocols.md section 4).

Three published protocols, named as the ``protocol`` column of our result rows names them:

* ``zhang``: the released split-brain / colorization probe
  (``feature_learning_tests/linear/train_val.prototxt`` in richzhang/colorization): each map is shrunk
  with Caffe's ``Resize`` layer to a fixed grid (AlexNet conv1 10x10, conv2 6x6, conv3 / conv4 5x5,
  conv5 6x6), then a per-channel ``BatchNorm`` and an ``InnerProduct``. :func:`caffe_resize_matrix`
  ports that layer's arithmetic (the interpolation layer of the Caffe fork the released scripts ran
  on, the one that also carries the ``ColorConv`` layer): a tent prefilter of radius 1/scale with
  edge replication, then linear interpolation on a grid whose corners are aligned
  (scale = (out - 1) / (in - 1)).
* ``goyal``: fixed-kernel average pooling (Goyal et al. 2019, VISSL): AlexNet at 227 conv1 k19 s4,
  conv2 k12 s3, conv3 / conv4 k9 s1, conv5 k8 s1; ResNet-50 at 224 conv1 k10 s10 p4, res2 k16 s8,
  res3 k13 s5, res4 k8 s3, res5 k12 s2. Padding counts in the mean (PyTorch's AvgPool2d default,
  which VISSL uses).
* ``max``: adaptive max pooling to the ``zhang`` grids (DeepCluster-style code).

Every protocol normalises per channel afterwards (:class:`ssl_colorize.heads.probe.ProbeHead`).
The grids and kernels per tap live on the encoder cards (``card.probe.grids`` /
``card.probe.avg_pools``); a tap without a card entry, or a map whose size the card's kernel does
not take to the card's grid (another crop), falls back to the rules :func:`probe_grid` and
:func:`avg_pool_geometry`, and :meth:`TapPool.describe` records what ran.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

#: The probe protocols (the ``protocol`` column of linear-probe result rows).
PROTOCOLS = ("zhang", "goyal", "max")
#: The old ``--pool`` names -> protocols (``--pool`` stays as a hidden alias).
LEGACY_POOL = {"bilinear": "zhang", "avg": "goyal", "max": "max"}
#: The old pooling names, still accepted by :class:`TapPool` (the VOC SVM's ``--pool``).
POOL_MODES = ("avg", "bilinear", "max")
#: Features per tap after pooling: "about 9k dims" (docs/protocols.md section 4); 9216 = 256 x 6 x 6.
TARGET_DIMS = 9216


def protocol_name(name: str) -> str:
    """A protocol or an old pool name -> the protocol; ValueError otherwise."""
    name = LEGACY_POOL.get(name, name)
    if name not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS} (or an old pool name {POOL_MODES}), got {name!r}")
    return name


# ----------------------------------------------------------------------------------------------
# Geometry rules (fallbacks when the card has no entry for a tap or crop)
# ----------------------------------------------------------------------------------------------

def probe_grid(channels: int, map_size: Sequence[int], target_dims: int = TARGET_DIMS) -> tuple[int, int]:
    """The pooled grid of a tap: side round(sqrt(target_dims / channels)), at most the map's size.

    For AlexNet (96, 256, 384, 384, 256 channels) this is 10, 6, 5, 5, 6, the docs/protocols.md section 4
    table; for ResNet-50 (64, 256, 512, 1024, 2048) 12, 6, 4, 3, 2, Goyal et al.'s grids.
    """
    if channels <= 0:
        raise ValueError(f"probe_grid: channels must be positive, got {channels}")
    side = max(1, math.floor(math.sqrt(target_dims / channels) + 0.5))
    height, width = int(map_size[0]), int(map_size[1])
    return min(side, height), min(side, width)


def avg_pool_geometry(size: int, grid: int) -> tuple[int, int]:
    """(kernel, stride) of an average pooling taking a side of ``size`` to ``grid`` outputs.

    stride = max(1, ceil(size / grid) - 2) and kernel = size - (grid - 1) * stride: overlapping windows
    that together cover the whole map, the last one ending on its border. This reproduces Goyal et
    al.'s fixed AlexNet kernels at 227 (55 -> 10: k19 s4; 27 -> 6: k12 s3; 13 -> 5: k9 s1;
    13 -> 6: k8 s1). ``grid == size`` is the identity (k1 s1).
    """
    if not 1 <= grid <= size:
        raise ValueError(f"avg_pool_geometry: grid {grid} must lie in [1, {size}] for a map side of {size}")
    if grid == size:
        return 1, 1
    stride = max(1, math.ceil(size / grid) - 2)
    kernel = size - (grid - 1) * stride
    return kernel, stride


# ----------------------------------------------------------------------------------------------
# Caffe's Resize layer
# ----------------------------------------------------------------------------------------------

def caffe_resize_matrix(in_size: int, out_size: int) -> torch.Tensor:
    """The (out_size, in_size) float64 matrix of Caffe's ``Resize`` layer along one axis.

    Ported from the layer's ``Reshape`` / ``Forward_cpu`` (crop 0, ``height`` / ``width`` given):

    * scale = (out - 1) / (in - 1): the first and last samples sit on the first and last pixels;
    * when scale < 1 the axis is first blurred by a tent of radius R = 1 / max(scale, 0.01):
      ``out[x] = (R in[x] + sum_{1 <= r < R} (R - r) (in[x - r] + in[x + r])) / norm`` with indices
      clamped to the border (edge replication) and norm = (2 iR + 1) R - iR (iR + 1), iR = int(R),
      the sum of the weights;
    * then output i samples position p = i / scale, clamped to [0, in - 1], linearly between
      i0 = int(p) and i1 = min(i0 + 1, in - 1): ``(i1 - p) in[i0] + (1 - (i1 - p)) in[i1]``.

    The layer applies this along x, then along y, so a map is ``M_y @ map @ M_x.T``. This is the
    layer's CPU code; its GPU kernel gives the same result up to a radius of 12 and caps larger radii
    at 10 (every released AlexNet tap has a radius of at most 6; only ResNet-50 res5 under ``zhang``,
    radius 13, an extension of ours, would differ). Caffe works in
    float32; this matrix is float64 (the results agree to float32 rounding). A single output (out 1,
    where Caffe's scale would be 0 / 0) takes the blurred first pixel, the limit of the formula.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"caffe_resize_matrix: sizes must be positive, got {in_size} -> {out_size}")
    if in_size == 1:
        return torch.ones(out_size, 1, dtype=torch.float64)
    scale = (out_size - 1) / (in_size - 1)
    blur = torch.eye(in_size, dtype=torch.float64)
    if scale < 1:
        radius = 1.0 / max(scale, 0.01)
        whole = int(radius)
        norm = (2 * whole + 1) * radius - whole * (whole + 1)
        blur = torch.zeros(in_size, in_size, dtype=torch.float64)
        for x in range(in_size):
            blur[x, x] += radius
            r = 1
            while r < radius:
                blur[x, max(x - r, 0)] += radius - r
                blur[x, min(x + r, in_size - 1)] += radius - r
                r += 1
        blur /= norm
    lerp = torch.zeros(out_size, in_size, dtype=torch.float64)
    for i in range(out_size):
        position = min(max(i / scale if scale > 0 else 0.0, 0.0), in_size - 1.0)
        first = int(position)
        second = min(first + 1, in_size - 1)
        weight = second - position
        lerp[i, first] += weight
        lerp[i, second] += 1.0 - weight
    return lerp @ blur


def caffe_resize(x: torch.Tensor, size: Sequence[int], rows: torch.Tensor | None = None,
                 cols: torch.Tensor | None = None) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, size[0], size[1]) as Caffe's ``Resize`` layer computes it.

    ``rows`` / ``cols``: the two :func:`caffe_resize_matrix` results when the caller keeps them."""
    rows = caffe_resize_matrix(x.shape[-2], int(size[0])) if rows is None else rows
    cols = caffe_resize_matrix(x.shape[-1], int(size[1])) if cols is None else cols
    rows, cols = rows.to(x.device, x.dtype), cols.to(x.device, x.dtype)
    return torch.einsum("oh,nchw,pw->ncop", rows, x, cols)


# ----------------------------------------------------------------------------------------------
# One tap's pooling
# ----------------------------------------------------------------------------------------------

def _pair(value) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


class TapPool(nn.Module):
    """Reduce a (N, C, H, W) tap to (N, C, gh, gw) by a protocol (or an old pool name).

    ``avg_pool``: (kernel, stride, padding) of the ``goyal`` pooling; used when it takes the map to
    ``grid``, else the kernel / stride come from :func:`avg_pool_geometry`.
    """

    def __init__(self, mode: str, map_size: Sequence[int], grid: Sequence[int],
                 avg_pool: Sequence[int] | None = None) -> None:
        super().__init__()
        self.mode = protocol_name(mode)
        self.map_size = _pair(map_size)
        self.grid = _pair(grid)
        self.kernel: tuple[int, int] | None = None
        self.stride: tuple[int, int] | None = None
        self.padding = (0, 0)
        if self.mode == "goyal":
            if avg_pool is not None and all(
                (n + 2 * avg_pool[2] - avg_pool[0]) // avg_pool[1] + 1 == g and avg_pool[0] <= n + 2 * avg_pool[2]
                for n, g in zip(self.map_size, self.grid)
            ):
                kernel, stride, padding = (int(v) for v in avg_pool)
                self.kernel, self.stride, self.padding = (kernel, kernel), (stride, stride), (padding, padding)
            else:
                (kh, sh), (kw, sw) = (avg_pool_geometry(n, g) for n, g in zip(self.map_size, self.grid))
                self.kernel, self.stride = (kh, kw), (sh, sw)
        if self.mode == "zhang":  # built once; not in the state_dict (they follow from the shapes)
            self.register_buffer("rows", caffe_resize_matrix(self.map_size[0], self.grid[0]).float(), persistent=False)
            self.register_buffer("cols", caffe_resize_matrix(self.map_size[1], self.grid[1]).float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.map_size:
            raise ValueError(
                f"TapPool built for {self.map_size[0]}x{self.map_size[1]} maps got {x.shape[-2]}x{x.shape[-1]}: "
                "train and test crops must have the same size"
            )
        if self.mode == "goyal":
            # Padding counts in the mean (count_include_pad): PyTorch's AvgPool2d default, as in VISSL.
            return F.avg_pool2d(x, self.kernel, self.stride, self.padding, count_include_pad=True)
        if self.mode == "zhang":
            return caffe_resize(x, self.grid, self.rows, self.cols)
        return F.adaptive_max_pool2d(x, self.grid)

    def describe(self) -> dict:
        out = {"protocol": self.mode, "map": list(self.map_size), "grid": list(self.grid)}
        if self.kernel is not None:
            out.update(kernel=list(self.kernel), stride=list(self.stride), padding=list(self.padding))
        return out

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.describe().items())


def tap_pool(protocol: str, tap: str, channels: int, map_size: Sequence[int], card=None,
             target_dims: int = TARGET_DIMS) -> TapPool:
    """The pooling of ``tap`` under ``protocol``: the card's grid and kernel for the tap when it has
    them (``card``: an :class:`ssl_colorize.models.cards.EncoderCard` or None), else the rules."""
    height, width = _pair(map_size)
    grids = card.probe.grids if card is not None else {}
    avg_pools = card.probe.avg_pools if card is not None else {}
    if tap in grids:
        grid = (min(grids[tap], height), min(grids[tap], width))
    else:
        grid = probe_grid(channels, (height, width), target_dims)
    return TapPool(protocol, (height, width), grid, avg_pools.get(tap))


def pool_features(x: torch.Tensor, tap: str, protocol: str, encoder_name: str) -> torch.Tensor:
    """The flattened probe features (N, C * gh * gw) of a batch ``x`` of ``tap``'s maps, pooled as
    ``protocol`` pools that tap of encoder ``encoder_name`` (its card's grids and kernels)."""
    from ssl_colorize.models.cards import get_card

    pool = tap_pool(protocol, tap, x.shape[1], x.shape[-2:], get_card(encoder_name))
    return torch.flatten(pool(x), 1)
