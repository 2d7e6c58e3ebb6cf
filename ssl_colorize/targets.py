"""The 313 ab bins, soft targets, the ImageNet prior, class rebalancing and annealed-mean decoding.

docs/protocols.md sections 1 and 2. Every function works on batched tensors on whatever device the input
lives on; the neighbour search is a chunked brute force over the 313 centres, so memory stays bounded
(a chunk of pixels x 313 at a time) and nothing dense of size (pixels x 313) outlives a chunk.
"""

from __future__ import annotations

import os
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F

NUM_BINS = 313
GRID_STEP = 10.0
DEFAULT_K = 10  # the released code's K; the paper's "5" is a typo (docs/protocols.md section 2)
DEFAULT_SIGMA = 5.0
DEFAULT_LAMBDA = 0.5
DEFAULT_TEMPERATURE = 0.38
GREY_THRESHOLD = 5.0

# Pixels per chunk of the neighbour search (brute force: 16k x 313 floats, 20 MB of scratch). The grid
# search uses smaller chunks on the CPU, where its scratch adds to the loss's peak memory (8k pixels:
# about 2 MB), and larger ones on a GPU, where each chunk costs a dozen kernel launches.
_CHUNK_PIXELS = 16384
_GRID_CHUNK_PIXELS_CPU, _GRID_CHUNK_PIXELS_GPU = 8192, 65536


@lru_cache(maxsize=None)
def _read_resource_csv(name: str) -> np.ndarray:
    text = resources.files("ssl_colorize").joinpath("resources", name).read_text()
    return np.loadtxt(text.splitlines(), delimiter=",", dtype=np.float64, ndmin=1)


def bin_centers(device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (313, 2) ab bin centres, in the released code's order (row 120 is (0, 0))."""
    return torch.as_tensor(_read_resource_csv("pts_in_hull.csv"), dtype=dtype, device=device)


def load_prior(
    path: str | os.PathLike | None = None, device: torch.device | str | None = None, dtype=torch.float32
) -> torch.Tensor:
    """The (313,) prior over the bins: the shipped ImageNet prior, or one saved by :func:`save_prior`.

    Accepts the CSV written by :func:`save_prior` (one value per line) or a NumPy ``.npy`` file such
    as the released ``prior_probs.npy``.
    """
    if path is None:
        values = _read_resource_csv("prior_probs.csv")
    else:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"prior file not found: {path}")
        try:
            values = np.load(path) if path.suffix == ".npy" else np.loadtxt(path, delimiter=",", ndmin=1)
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read a prior from {path}: {exc}") from exc
        values = np.asarray(values, dtype=np.float64).reshape(-1)
    if values.shape != (NUM_BINS,):
        raise ValueError(f"a prior must have {NUM_BINS} values, got {values.shape[0]} ({path or 'shipped'})")
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ValueError(f"a prior must be finite and positive in every bin ({path or 'shipped'})")
    return torch.as_tensor(values / values.sum(), dtype=dtype, device=device)


def save_prior(path: str | os.PathLike, prior: torch.Tensor) -> Path:
    """Write a prior as CSV (one value per line, bin order), atomically."""
    from ssl_colorize.atomic import atomic_write

    path = Path(path)
    with atomic_write(path, "w") as handle:
        np.savetxt(handle, prior.detach().double().cpu().numpy(), fmt="%.17g")
    return path


def _check_ab(ab: torch.Tensor, name: str) -> None:
    if not isinstance(ab, torch.Tensor) or not ab.is_floating_point():
        raise ValueError(f"{name}: ab must be a floating-point tensor, got {getattr(ab, 'dtype', type(ab))}")
    if ab.dim() != 4 or ab.shape[1] != 2:
        raise ValueError(f"{name}: ab must have shape (N, 2, H, W), got {tuple(ab.shape)}")


# The neighbour search uses the bins' grid: ab space is cut into 2.5 x 2.5 cells; for each cell a short
# list holds every bin that can be among the k nearest of *some* point of the cell. A bin can only be
# if its distance to the cell's nearest point is at most U, where U is the k-th smallest distance
# from a bin to the cell's farthest point (at least k bins are within U of every point of the cell).
# With the 313 bins and k = 10 the lists hold 10 to 17 bins, so each pixel ranks at most 17 candidates
# instead of 313. Pixels outside the tabulated square fall back to the brute-force search.
_CELL_LO, _CELL_SIZE, _CELLS = -130.0, 2.5, 104  # cells cover [-130, 130) in a and in b
_MAX_CANDIDATES = 64  # above this (large k) the table does not pay: brute force
_FAR = 1e6  # coordinate of the padding "bin" that fills short candidate lists


@lru_cache(maxsize=None)
def _candidate_table(k: int) -> np.ndarray | None:
    """(cells * cells, M) candidate bin indices per cell (padded with index 313), or None if M is too large."""
    centers = _read_resource_csv("pts_in_hull.csv").reshape(-1, 2)
    rows = []
    for i in range(_CELLS):
        for j in range(_CELLS):
            lo = np.array([_CELL_LO + i * _CELL_SIZE, _CELL_LO + j * _CELL_SIZE])
            hi = lo + _CELL_SIZE
            nearest_gap = np.maximum(0.0, np.maximum(lo - centers, centers - hi))
            farthest_gap = np.maximum(np.abs(centers - lo), np.abs(centers - hi))
            d_near = np.hypot(nearest_gap[:, 0], nearest_gap[:, 1])
            d_far = np.hypot(farthest_gap[:, 0], farthest_gap[:, 1])
            bound = np.sort(d_far)[k - 1]
            rows.append(np.flatnonzero(d_near <= bound + 1e-9))
    width = max(len(r) for r in rows)
    if width > _MAX_CANDIDATES:
        return None
    table = np.full((len(rows), width), NUM_BINS, dtype=np.int64)
    for row, candidates in zip(table, rows):
        row[: len(candidates)] = candidates
    return table


def _nearest_bins_brute(ab: torch.Tensor, k: int) -> torch.Tensor:
    """k nearest of all 313 centres per pixel of ab (P, 2), ranked by ||c||^2 - 2 <ab, c>."""
    centers = bin_centers(ab.device, ab.dtype)
    center_sq = (centers * centers).sum(1)
    indices = torch.empty(ab.shape[0], k, dtype=torch.long, device=ab.device)
    for start in range(0, ab.shape[0], _CHUNK_PIXELS):
        chunk = ab[start : start + _CHUNK_PIXELS]
        score = torch.addmm(center_sq, chunk, centers.T, alpha=-2.0)  # (chunk, 313)
        indices[start : start + _CHUNK_PIXELS] = score.topk(k, dim=1, largest=False, sorted=True).indices
    return indices


def _nearest_bins(ab: torch.Tensor, k: int, from_srgb: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """k nearest centres for every pixel: (indices (P, k), squared distances (P, k)), nearest first.

    ab is (P, 2) float32. Distances are exact: (a - a_c)^2 + (b - b_c)^2 of the chosen centres.
    ``from_srgb``: ab of sRGB colours, which all lie inside the tabulated square (a in [-86.2, 98.3],
    b in [-107.9, 94.5], against the square's [-130, 130); tests/test_targets.py converts the whole
    256^3 cube), so the check for pixels outside it is skipped: on a GPU that check reads a flag back
    to the host, a sync per batch.
    """
    table = _candidate_table(k)
    centers = bin_centers(ab.device, ab.dtype)
    indices = torch.empty(ab.shape[0], k, dtype=torch.long, device=ab.device)
    dist_sq = torch.empty(ab.shape[0], k, dtype=ab.dtype, device=ab.device)
    if table is None:
        indices = _nearest_bins_brute(ab, k)
        diff = centers[indices] - ab[:, None, :]
        return indices, (diff * diff).sum(-1)
    table_t = _device_table(k, ab.device)
    padded = torch.cat([centers, centers.new_full((1, 2), _FAR)])
    # a and b apart: two flat lookups are cheaper than gathering (chunk, M, 2) rows of the table.
    center_a, center_b = padded[:, 0].contiguous(), padded[:, 1].contiguous()
    point_a, point_b = ab[:, 0], ab[:, 1]
    inside = torch.empty(ab.shape[0], dtype=torch.bool, device=ab.device)
    chunk_pixels = _GRID_CHUNK_PIXELS_CPU if ab.device.type == "cpu" else _GRID_CHUNK_PIXELS_GPU
    for start in range(0, ab.shape[0], chunk_pixels):
        sl = slice(start, start + chunk_pixels)
        cell = torch.floor((ab[sl] - _CELL_LO) / _CELL_SIZE).long()
        inside[sl] = ((cell >= 0) & (cell < _CELLS)).all(1)
        cell_id = cell[:, 0].clamp(0, _CELLS - 1) * _CELLS + cell[:, 1].clamp(0, _CELLS - 1)
        candidates = table_t.index_select(0, cell_id)  # (chunk, M)
        flat = candidates.reshape(-1)
        da = center_a.index_select(0, flat).view(candidates.shape) - point_a[sl, None]
        db = center_b.index_select(0, flat).view(candidates.shape) - point_b[sl, None]
        top = (da * da + db * db).topk(k, dim=1, largest=False, sorted=True)
        indices[sl] = candidates.gather(1, top.indices)
        dist_sq[sl] = top.values
    if not from_srgb and not bool(inside.all()):
        outside = ~inside
        far_indices = _nearest_bins_brute(ab[outside], k)
        diff = centers[far_indices] - ab[outside][:, None, :]
        indices[outside], dist_sq[outside] = far_indices, (diff * diff).sum(-1)
    return indices, dist_sq


_DEVICE_TABLES: dict = {}


def _device_table(k: int, device: torch.device) -> torch.Tensor:
    key = (k, str(device))
    if key not in _DEVICE_TABLES:
        _DEVICE_TABLES[key] = torch.from_numpy(_candidate_table(k)).to(device)
    return _DEVICE_TABLES[key]


def soft_encode(
    ab: torch.Tensor, k: int = DEFAULT_K, sigma: float = DEFAULT_SIGMA, from_srgb: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft-encode ab (N, 2, H, W) on the 313 bins (docs/protocols.md section 2).

    Returns ``(indices, weights)``, each (N, k, H, W): the k nearest bin centres (nearest first) and
    Gaussian weights exp(-d^2 / 2 sigma^2), normalised to sum 1 over k. The weights are computed as a
    softmax of -d^2 / 2 sigma^2, which is the same quantity but never underflows to 0/0 for ab far
    outside the gamut. ``from_srgb``: the caller vouches that ab comes from sRGB colours (the data path's
    uint8 images), which spares a GPU the device-to-host sync of the out-of-range check.
    """
    _check_ab(ab, "soft_encode")
    if not 1 <= k <= NUM_BINS:
        raise ValueError(f"soft_encode: k must be in [1, {NUM_BINS}], got {k}")
    if sigma <= 0:
        raise ValueError(f"soft_encode: sigma must be positive, got {sigma}")
    n, _, h, w = ab.shape
    with torch.no_grad():
        flat = ab.detach().float().permute(0, 2, 3, 1).reshape(-1, 2)
        indices, dist_sq = _nearest_bins(flat, k, from_srgb)
        # softmax(-d^2 / 2 sigma^2) over the k, spelled out and in place: the nearest (column 0) has the
        # largest score, so exp(0) = 1 is in every sum; torch.softmax over 10 columns was 4x slower on
        # the CPU, and a new tensor would add to the loss's peak memory.
        weights = dist_sq.sub_(dist_sq[:, :1].clone()).mul_(-1.0 / (2.0 * sigma * sigma)).exp_()
        weights /= weights.sum(dim=1, keepdim=True)
    indices = indices.reshape(n, h, w, k).permute(0, 3, 1, 2)
    weights = weights.reshape(n, h, w, k).permute(0, 3, 1, 2).to(ab.dtype)
    return indices, weights


def nearest_bin(ab: torch.Tensor) -> torch.Tensor:
    """Index of the nearest bin centre for every pixel of ab (N, 2, H, W) -> (N, H, W) long."""
    _check_ab(ab, "nearest_bin")
    n, _, h, w = ab.shape
    with torch.no_grad():
        flat = ab.detach().float().permute(0, 2, 3, 1).reshape(-1, 2)
        indices, _ = _nearest_bins(flat, 1)
    return indices.reshape(n, h, w)


def decimate(ab: torch.Tensor, factor: int) -> torch.Tensor:
    """Every ``factor``-th pixel, no averaging: the loss grid of the released code (docs/protocols.md section 2)."""
    return ab[..., ::factor, ::factor]


def grey_mask(ab: torch.Tensor, threshold: float = GREY_THRESHOLD) -> torch.Tensor:
    """(N,) bool, True for a grey image: no pixel of its (decimated) ab has |a| or |b| above threshold.

    The released code gives such images weight 0 in the loss (docs/protocols.md section 2).
    """
    _check_ab(ab, "grey_mask")
    return ~(ab.abs() > threshold).flatten(1).any(dim=1)


def rebalance_weights(prior: torch.Tensor, lam: float = DEFAULT_LAMBDA) -> torch.Tensor:
    """Class-rebalancing weights w ~ ((1 - lam) p + lam / Q)^-1, scaled so that sum(p * w) = 1.

    docs/protocols.md section 2 (paper eq. 4). With the shipped prior: min 0.0965 at (0, 0), max 6.175.
    """
    if prior.dim() != 1 or prior.shape[0] != NUM_BINS:
        raise ValueError(f"rebalance_weights: prior must have shape ({NUM_BINS},), got {tuple(prior.shape)}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"rebalance_weights: lam must be in [0, 1], got {lam}")
    p = prior.double() / prior.double().sum()
    w = 1.0 / ((1.0 - lam) * p + lam / NUM_BINS)
    w = w / (p * w).sum()
    return w.to(prior.dtype)


def annealed_mean(logits: torch.Tensor, T: float = DEFAULT_TEMPERATURE) -> torch.Tensor:
    """Annealed-mean point estimate (paper eq. 5): logits (N, 313, H, W) -> ab (N, 2, H, W).

    f_T(z) = exp(log z / T) / sum_q exp(log z_q / T) with z = softmax(logits) is softmax(logits / T);
    T = 1 gives the mean, T -> 0 the mode. The released deploy net used T = 1 / 2.606 = 0.3837.
    """
    if logits.dim() != 4 or logits.shape[1] != NUM_BINS:
        raise ValueError(f"annealed_mean: logits must have shape (N, {NUM_BINS}, H, W), got {tuple(logits.shape)}")
    if not T > 0:
        raise ValueError(f"annealed_mean: temperature must be positive, got {T}")
    probs = torch.softmax(logits.float() / T, dim=1)
    centers = bin_centers(logits.device, probs.dtype)
    return torch.einsum("nqhw,qc->nchw", probs, centers)


def _bin_smoothing_kernel(sigma: float) -> torch.Tensor:
    centers = bin_centers(dtype=torch.float64)
    dist_sq = torch.cdist(centers, centers).pow(2)
    return torch.exp(-dist_sq / (2.0 * sigma * sigma))


def smooth_histogram(counts: torch.Tensor, sigma: float = DEFAULT_SIGMA, floor: float = 1e-12) -> torch.Tensor:
    """Counts over the bins -> a smoothed prior: Gaussian (sigma in ab units) over the bin centres,
    normalised, with a floor so that no bin is exactly zero (every weight 1/p stays finite)."""
    p = counts.double().cpu()
    if p.sum() <= 0:
        raise ValueError("estimate_prior: no coloured pixel was seen; cannot estimate a prior")
    p = p / p.sum()
    smoothed = _bin_smoothing_kernel(sigma) @ p
    smoothed = smoothed.clamp(min=floor)
    return smoothed / smoothed.sum()


def _as_rgb_batch(image, device) -> torch.Tensor:
    """Accepts a uint8 HxWx3 array, a (3, H, W) or (N, 3, H, W) tensor (uint8 or float in [0, 1])."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] < 3:
            raise ValueError(f"estimate_prior: expected an HxWx3 image, got shape {image.shape}")
        image = torch.from_numpy(np.ascontiguousarray(image[..., :3])).permute(2, 0, 1)
    if not isinstance(image, torch.Tensor):
        raise ValueError(f"estimate_prior: unsupported image type {type(image).__name__}")
    if image.dim() == 3:
        image = image[None]
    image = image.to(device)
    if image.dtype == torch.uint8:
        image = image.float() / 255.0
    return image.float()


def estimate_prior(
    images: Iterable,
    device: torch.device | str | None = None,
    sigma: float = DEFAULT_SIGMA,
    max_pixels_per_image: int | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """The empirical ab prior over the 313 bins from any iterable of images, streamed on ``device``.

    Each pixel counts for its nearest bin (histogram via bincount on the device); the histogram is then
    smoothed with a sigma-5 Gaussian over the bins (as the shipped prior was [author]) and floored so no
    bin is zero. ``max_pixels_per_image`` subsamples pixels with a fixed stride to bound the cost.
    """
    from ssl_colorize.color import rgb_to_lab  # local: targets does not otherwise need colour

    device = torch.device(device) if device is not None else torch.device("cpu")
    counts = torch.zeros(NUM_BINS, dtype=torch.float64, device=device)
    iterator = images
    if progress:
        from tqdm import tqdm

        iterator = tqdm(images, desc="prior", unit="img")
    for image in iterator:
        rgb = _as_rgb_batch(image, device)
        ab = rgb_to_lab(rgb)[:, 1:]
        if max_pixels_per_image is not None:
            stride = max(1, int((ab.shape[-1] * ab.shape[-2] / max_pixels_per_image) ** 0.5))
            ab = decimate(ab, stride)
        counts += torch.bincount(nearest_bin(ab).flatten(), minlength=NUM_BINS).double()
    return smooth_histogram(counts, sigma).float()


def class_weight_lookup(class_weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Per-pixel rebalancing weight v(h, w) = w[q*] from nearest-bin indices of any shape."""
    return class_weights.to(indices.device)[indices]


def resize_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of logits to the loss grid (the AlexNet variant's 313 logits, docs/protocols.md section 2)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
