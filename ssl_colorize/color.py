"""sRGB <-> CIE Lab on batched tensors (docs/protocols.md section 1).

The conversion is the one the released code used through ``skimage.color.rgb2lab``: the sRGB transfer
curve, the sRGB -> XYZ matrix for a D65 white, and the CIE f(t) with its linear toe. Everything is
elementwise torch, so it runs on any device and dtype, inside autograd, with no per-pixel Python.

Shapes: ``(..., 3, H, W)``; RGB in [0, 1]; L in [0, 100], a and b in raw Lab units.
"""

from __future__ import annotations

import torch

# sRGB (linear) -> XYZ for the D65 white, the matrix scikit-image uses.
_XYZ_FROM_RGB = (
    (0.412453, 0.357580, 0.180423),
    (0.212671, 0.715160, 0.072169),
    (0.019334, 0.119193, 0.950227),
)
_D65_WHITE = (0.95047, 1.0, 1.08883)

# CIE constants: f(t) = t^(1/3) above (6/29)^3, else t * 7.787 + 16/116.
_EPSILON = 0.008856
_KAPPA = 7.787
_F_THRESHOLD = 0.2068966  # f(_EPSILON): where the inverse switches branch

_CACHE: dict = {}


def _constants(device: torch.device, dtype: torch.dtype):
    key = (device, dtype)
    if key not in _CACHE:
        xyz_from_rgb = torch.tensor(_XYZ_FROM_RGB, dtype=torch.float64)
        rgb_from_xyz = torch.linalg.inv(xyz_from_rgb)
        white = torch.tensor(_D65_WHITE, dtype=torch.float64)
        _CACHE[key] = tuple(t.to(device=device, dtype=dtype) for t in (xyz_from_rgb, rgb_from_xyz, white))
    return _CACHE[key]


def _first_bad_index(mask: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in torch.nonzero(mask)[0].tolist())


def _validate(x: torch.Tensor, name: str, value_range: tuple[float, float] | None) -> None:
    """Raise ValueError saying what is wrong with ``x`` and where."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor (float32/float64/...), got dtype {x.dtype}")
    if x.dim() < 3 or x.shape[-3] != 3:
        raise ValueError(f"{name}: expected shape (..., 3, H, W), got {tuple(x.shape)}")
    nan = torch.isnan(x)
    if bool(nan.any()):
        raise ValueError(f"{name}: input contains NaN, first at index {_first_bad_index(nan)}")
    if value_range is not None:
        lo, hi = value_range
        bad = (x < lo) | (x > hi)
        if bool(bad.any()):
            where = _first_bad_index(bad)
            raise ValueError(
                f"{name}: values must lie in [{lo}, {hi}]; found {float(x[where]):.6g} at index {where} "
                f"(min {float(x.min()):.6g}, max {float(x.max()):.6g})"
            )


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.movedim(-3, -1)


def _channels_first(x: torch.Tensor) -> torch.Tensor:
    return x.movedim(-1, -3)


def rgb_to_lab(rgb: torch.Tensor, validate: bool = True) -> torch.Tensor:
    """sRGB in [0, 1], shape (..., 3, H, W) -> Lab (L in [0, 100]), same shape, dtype and device.

    ``validate=False`` skips the input checks, which cost a device sync; the training data path,
    whose input is known-good uint8 / 255, uses it.
    """
    if validate:
        _validate(rgb, "rgb_to_lab", (0.0, 1.0))
    xyz_from_rgb, _, white = _constants(rgb.device, rgb.dtype)
    x = _channels_last(rgb)
    # sRGB transfer curve. The pow branch sees its input clamped so its gradient is finite everywhere.
    linear = torch.where(x > 0.04045, ((x.clamp(min=0.04045) + 0.055) / 1.055) ** 2.4, x / 12.92)
    xyz = (linear @ xyz_from_rgb.T) / white
    f = torch.where(xyz > _EPSILON, xyz.clamp(min=_EPSILON) ** (1.0 / 3.0), _KAPPA * xyz + 16.0 / 116.0)
    fx, fy, fz = f.unbind(-1)
    lab = torch.stack((116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)), dim=-1)
    return _channels_first(lab)


def rgb_to_lightness(rgb: torch.Tensor, validate: bool = True) -> torch.Tensor:
    """sRGB in [0, 1], shape (..., 3, H, W) -> the L channel of :func:`rgb_to_lab`, shape (..., 1, H, W).

    L depends on Y alone (L = 116 f(Y / Y_n) - 16), so only the middle row of the sRGB -> XYZ matrix
    is needed: the network's full-resolution input costs a third of the Lab arithmetic, while a and b
    are only ever needed on the loss grid (docs/protocols.md sections 1 and 2).
    """
    if validate:
        _validate(rgb, "rgb_to_lightness", (0.0, 1.0))
    xyz_from_rgb, _, white = _constants(rgb.device, rgb.dtype)
    linear = torch.where(rgb > 0.04045, ((rgb.clamp(min=0.04045) + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    y_row = (xyz_from_rgb[1] / white[1]).reshape(3, 1, 1)
    y = (linear * y_row).sum(dim=-3, keepdim=True)
    f = torch.where(y > _EPSILON, y.clamp(min=_EPSILON) ** (1.0 / 3.0), _KAPPA * y + 16.0 / 116.0)
    return 116.0 * f - 16.0


def lab_to_rgb(lab: torch.Tensor, clip: bool = True, validate: bool = True) -> torch.Tensor:
    """Lab, shape (..., 3, H, W) -> sRGB, clipped to [0, 1] (as scikit-image's lab2rgb) unless clip=False.

    Out-of-gamut Lab (most ab at extreme L) maps outside [0, 1] before the clip; negative Z is
    clamped to 0 as scikit-image does.
    """
    if validate:
        _validate(lab, "lab_to_rgb", None)
    _, rgb_from_xyz, white = _constants(lab.device, lab.dtype)
    L, a, b = _channels_last(lab).unbind(-1)
    fy = (L + 16.0) / 116.0
    fx = a / 500.0 + fy
    fz = (fy - b / 200.0).clamp(min=0.0)
    f = torch.stack((fx, fy, fz), dim=-1)
    xyz = torch.where(f > _F_THRESHOLD, f.clamp(min=_F_THRESHOLD) ** 3, (f - 16.0 / 116.0) / _KAPPA) * white
    linear = xyz @ rgb_from_xyz.T
    srgb = torch.where(
        linear > 0.0031308, 1.055 * linear.clamp(min=0.0031308) ** (1.0 / 2.4) - 0.055, 12.92 * linear
    )
    if clip:
        srgb = srgb.clamp(0.0, 1.0)
    return _channels_first(srgb)


def split_lab(lab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., 3, H, W) Lab -> (L of shape (..., 1, H, W), ab of shape (..., 2, H, W))."""
    return lab[..., :1, :, :], lab[..., 1:, :, :]


def fit_ab_to_gamut(L: torch.Tensor, ab: torch.Tensor, iterations: int = 14) -> torch.Tensor:
    """Shrink each pixel's ab towards grey just enough for (L, ab) to be a displayable sRGB colour.

    Clipping an out-of-gamut colour to [0, 1] changes its lightness; reducing its chroma instead keeps
    L exactly (grey, ab = 0, is in gamut for every L in [0, 100]). The largest scale s in [0, 1] with
    (L, s * ab) in gamut is found per pixel by bisection. L (..., 1, H, W), ab (..., 2, H, W).
    """
    lo = torch.zeros_like(L)
    hi = torch.ones_like(L)
    lo = torch.where(_in_gamut(L, ab), hi, lo)  # pixels already in gamut keep s = 1
    for _ in range(iterations):
        mid = (lo + hi) / 2
        ok = _in_gamut(L, ab * mid)
        lo = torch.where(ok, mid, lo)
        hi = torch.where(ok, hi, mid)
    return ab * lo


def _in_gamut(L: torch.Tensor, ab: torch.Tensor, tolerance: float = 1e-6) -> torch.Tensor:
    rgb = lab_to_rgb(torch.cat((L, ab), dim=-3), clip=False, validate=False)
    return ((rgb >= -tolerance) & (rgb <= 1 + tolerance)).all(dim=-3, keepdim=True)
