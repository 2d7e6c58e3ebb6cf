"""Colour-quality metrics (docs/protocols.md section 6) against hand computations and NumPy references."""

import math

import numpy as np
import pytest
import torch

from ssl_colorize.color import rgb_to_lab
from ssl_colorize.data import center_crop, ensure_builtin_photos, read_image, resize_shorter
from ssl_colorize.inference import decode_grid
from ssl_colorize.metrics import accuracy_curve, auc, colourfulness, rebalanced_auc, rebalanced_pixel_weights
from ssl_colorize.targets import annealed_mean, bin_centers, load_prior


def _ab_pixels(points):
    """[(a, b), ...] -> ab tensor (1, 2, 1, P)."""
    return torch.tensor(points, dtype=torch.float64).T.reshape(1, 2, 1, -1)


def _numpy_auc(distances, weights=None):
    """Independent reference: accuracy at t = 0..150, trapezoid rule, normalised to 100."""
    d = np.asarray(distances, dtype=np.float64)
    w = np.ones_like(d) if weights is None else np.asarray(weights, dtype=np.float64)
    t = np.arange(151)
    curve = ((d[:, None] <= t[None, :]) * w[:, None]).sum(0) / w.sum()
    return 100.0 * np.trapezoid(curve) / 150.0


def test_auc_single_pixel_hand_computation():
    # One pixel at distance 30 (a 3-4-5 triangle: (18, 24)): the curve is 0 for t < 30 and 1 from 30 on.
    # Trapezoids: 120 full unit steps (30..150) plus the half step between 29 and 30: 120.5 / 150.
    gt = _ab_pixels([(0.0, 0.0)])
    pred = _ab_pixels([(18.0, 24.0)])
    assert auc(pred, gt) == pytest.approx(100.0 * 120.5 / 150.0, abs=1e-9)
    # Exact prediction: 1 everywhere -> 100; a miss beyond 150 -> 0.
    assert auc(gt, gt) == pytest.approx(100.0)
    assert auc(_ab_pixels([(200.0, 0.0)]), gt) == pytest.approx(0.0)
    # A fractional distance (10.5) counts from t = 11: 139 full steps + a half.
    assert auc(_ab_pixels([(10.5, 0.0)]), gt) == pytest.approx(100.0 * 139.5 / 150.0, abs=1e-9)


def test_auc_mixture_matches_numpy_reference():
    rng = np.random.default_rng(0)
    gt = torch.from_numpy(rng.uniform(-80, 80, size=(2, 2, 5, 7)))
    pred = torch.from_numpy(rng.uniform(-80, 80, size=(2, 2, 5, 7)))
    distances = torch.linalg.vector_norm(pred - gt, dim=1).flatten().numpy()
    assert auc(pred, gt) == pytest.approx(_numpy_auc(distances), abs=1e-9)
    weights = torch.from_numpy(rng.uniform(0.1, 3.0, size=(2, 5, 7)))
    assert auc(pred, gt, weights) == pytest.approx(_numpy_auc(distances, weights.flatten().numpy()), abs=1e-9)
    curve = accuracy_curve(pred, gt)
    assert curve.shape == (151,) and bool((curve[1:] >= curve[:-1]).all())


def test_rebalanced_auc_weights_pixels_by_inverse_prior():
    # Two pixels on bin centres: (0, 0), the commonest bin, predicted exactly; the rarest bin predicted
    # 200 ab units away, so it is wrong at every threshold t <= 150.
    centers = bin_centers(dtype=torch.float64)
    prior = load_prior(dtype=torch.float64)
    common, rare = 120, int(torch.argmin(prior))
    assert tuple(centers[common].tolist()) == (0.0, 0.0)
    gt = _ab_pixels([tuple(centers[common].tolist()), tuple(centers[rare].tolist())])
    far = centers[rare] + torch.tensor([200.0, 0.0], dtype=torch.float64)
    pred = _ab_pixels([(0.0, 0.0), tuple(far.tolist())])
    w_common, w_rare = 1.0 / float(prior[common]), 1.0 / float(prior[rare])
    # Raw: one of two pixels right at every threshold -> 50. Rebalanced: the rare pixel dominates.
    assert auc(pred, gt) == pytest.approx(50.0)
    assert rebalanced_auc(pred, gt, prior) == pytest.approx(100.0 * w_common / (w_common + w_rare), abs=1e-9)
    weights = rebalanced_pixel_weights(gt, prior)
    assert weights.flatten().tolist() == pytest.approx([w_common, w_rare])


def test_grey_prediction_pattern_on_natural_photos():
    """Paper Table 1: grey scores a high raw AuC (89.1) but a low rebalanced one (58.0)."""
    paths = sorted(ensure_builtin_photos().glob("*.jpg"))
    images = torch.stack([center_crop(resize_shorter(read_image(p), 48), 48) for p in paths])
    gt = rgb_to_lab(images.double() / 255.0)[:, 1:]
    grey = torch.zeros_like(gt)
    prior = load_prior(dtype=torch.float64)
    raw, rebalanced = auc(grey, gt), rebalanced_auc(grey, gt, prior)
    distances = torch.linalg.vector_norm(gt, dim=1).flatten().numpy()
    assert raw == pytest.approx(_numpy_auc(distances), abs=1e-9)
    assert raw > 80.0, "natural photographs are mostly desaturated: grey is close in raw ab distance"
    assert rebalanced < raw - 10.0, "rebalancing weights the rare saturated pixels that grey misses"
    assert auc(gt, gt) == pytest.approx(100.0) and rebalanced_auc(gt, gt, prior) == pytest.approx(100.0)


def test_temperature_one_is_the_mean_over_bin_centres():
    torch.manual_seed(0)
    logits = torch.randn(2, 313, 3, 4, dtype=torch.float64) * 3.0
    centers = bin_centers(dtype=torch.float64).numpy()
    z = logits.numpy()
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    mean = np.einsum("nqhw,qc->nchw", p, centers)
    assert annealed_mean(logits, T=1.0).numpy() == pytest.approx(mean, abs=1e-4)
    assert decode_grid(logits.float(), 1.0).numpy() == pytest.approx(mean, abs=1e-4)
    # T -> 0 is the mode: with a clear maximum the annealed mean lands on that bin's centre.
    peaked = torch.zeros(1, 313, 1, 1)
    peaked[0, 40] = 2.0
    assert annealed_mean(peaked, T=0.01)[0, :, 0, 0].tolist() == pytest.approx(centers[40].tolist(), abs=1e-3)
    # Lower T -> farther from the mean, towards the more saturated mode: chroma grows monotonically.
    chroma = [float(annealed_mean(logits.float(), T=t).norm(dim=1).mean()) for t in (1.0, 0.38, 0.1)]
    assert chroma[0] < chroma[1] < chroma[2]


def test_colourfulness_hand_computation():
    # Pixels pure red (255, 0, 0) and pure blue (0, 0, 255):
    # rg = R - G = [255, 0]; yb = (R + G) / 2 - B = [127.5, -255].
    # sigma_rg = 127.5, sigma_yb = 191.25 (population std); mu_rg = 127.5, mu_yb = -63.75.
    rgb = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]]).reshape(1, 3, 1, 2)
    expected = math.sqrt(127.5**2 + 191.25**2) + 0.3 * math.sqrt(127.5**2 + 63.75**2)
    assert float(colourfulness(rgb)[0]) == pytest.approx(expected, rel=1e-9)
    grey = torch.full((2, 3, 4, 4), 0.5)
    assert colourfulness(grey).tolist() == pytest.approx([0.0, 0.0])
    with pytest.raises(ValueError, match="colourfulness"):
        colourfulness(torch.rand(3, 4, 4))
