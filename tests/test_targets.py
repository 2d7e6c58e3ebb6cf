"""Bins, soft encoding, prior, rebalancing and annealed-mean decoding (docs/protocols.md sections 1-2)."""

import numpy as np
import pytest
import torch
from sklearn.neighbors import NearestNeighbors

from ssl_colorize import targets
from ssl_colorize.targets import (
    annealed_mean,
    bin_centers,
    estimate_prior,
    grey_mask,
    load_prior,
    nearest_bin,
    rebalance_weights,
    save_prior,
    soft_encode,
)


def test_bins_and_prior_are_the_shipped_ones():
    centers = bin_centers()
    assert centers.shape == (313, 2)
    assert centers[120].tolist() == [0.0, 0.0]
    assert centers[:, 0].min() == -90 and centers[:, 0].max() == 100
    assert centers[:, 1].min() == -110 and centers[:, 1].max() == 100
    prior = load_prior()
    assert prior.shape == (313,)
    assert abs(float(prior.sum()) - 1) < 1e-6
    assert int(prior.argmax()) == 120 and abs(float(prior.max()) - 0.2012) < 1e-3
    assert bool((prior > 0).all())


def test_rebalance_weights_published_range():
    prior = load_prior(dtype=torch.float64)
    w = rebalance_weights(prior)
    assert abs(float((prior * w).sum()) - 1.0) < 1e-9
    assert int(w.argmin()) == 120
    assert round(float(w.min()), 4) == 0.0965
    assert round(float(w.max()), 3) == 6.175
    # lambda = 1 is a uniform weighting, lambda = 0 the inverse prior.
    assert torch.allclose(rebalance_weights(prior, lam=1.0), torch.ones(313, dtype=torch.float64))
    inverse = 1 / prior
    assert torch.allclose(rebalance_weights(prior, lam=0.0), inverse / (prior * inverse).sum())


@pytest.mark.parametrize("k", [1, 5, 10])
def test_soft_encode_matches_brute_force_nearest_neighbours(k):
    rng = np.random.default_rng(k)
    # Anywhere in [-128, 127], far outside the gamut included.
    ab = torch.from_numpy(rng.uniform(-128, 127, size=(3, 2, 17, 19))).float()
    indices, weights = soft_encode(ab, k=k, sigma=5.0)
    assert indices.shape == weights.shape == (3, k, 17, 19)
    points = ab.permute(0, 2, 3, 1).reshape(-1, 2).double().numpy()
    centers = bin_centers(dtype=torch.float64).numpy()
    dist, ref_idx = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(centers).kneighbors(points)
    ours = indices.permute(0, 2, 3, 1).reshape(-1, k).numpy()
    for row_ours, row_ref in zip(ours, ref_idx):
        assert set(row_ours) == set(row_ref)
    ref_w = np.exp(-(dist**2) / (2 * 5.0**2))
    ref_w /= ref_w.sum(1, keepdims=True)
    # Compare weights bin by bin (the order of equidistant bins may differ).
    ours_w = weights.permute(0, 2, 3, 1).reshape(-1, k).double().numpy()
    for i in range(len(points)):
        ref_map = dict(zip(ref_idx[i], ref_w[i]))
        np.testing.assert_allclose([ref_map[j] for j in ours[i]], ours_w[i], atol=1e-5)


def test_soft_encode_weights_far_outside_the_gamut_are_finite():
    ab = torch.tensor([[[[127.0, -128.0]], [[127.0, -128.0]]]])
    idx, w = soft_encode(ab)
    assert torch.isfinite(w).all() and torch.allclose(w.sum(1), torch.ones(1, 1, 2))


def test_every_srgb_colour_lies_in_the_neighbour_table():
    """soft_encode(from_srgb=True) skips the out-of-table check: every one of the 256^3 sRGB colours must
    have its ab inside the tabulated square, and the encoding of such ab must not change without it."""
    from ssl_colorize.color import rgb_to_lab

    levels = torch.arange(256, dtype=torch.float32) / 255
    g, b = torch.meshgrid(levels, levels, indexing="ij")
    lo, hi = torch.full((2,), float("inf")), torch.full((2,), -float("inf"))
    for r in levels:  # one 256 x 256 slice of the cube at a time
        ab = rgb_to_lab(torch.stack([torch.full_like(g, float(r)), g, b])[None], validate=False)[0, 1:].reshape(2, -1)
        lo, hi = torch.minimum(lo, ab.min(1).values), torch.maximum(hi, ab.max(1).values)
    table_lo, table_hi = targets._CELL_LO, targets._CELL_LO + targets._CELLS * targets._CELL_SIZE
    assert (lo > table_lo).all() and (hi < table_hi).all(), (lo, hi)
    rgb = torch.randint(0, 256, (2, 3, 16, 16), generator=torch.Generator().manual_seed(0)).float() / 255
    ab = rgb_to_lab(rgb, validate=False)[:, 1:]
    checked, unchecked = soft_encode(ab), soft_encode(ab, from_srgb=True)
    assert torch.equal(checked[0], unchecked[0]) and torch.equal(checked[1], unchecked[1])


def test_nearest_bin_on_grid_points():
    centers = bin_centers()
    ab = centers.T[None, :, None, :]  # every centre as a pixel
    assert torch.equal(nearest_bin(ab)[0, 0], torch.arange(313))


def test_annealed_mean_t1_is_the_mean_and_small_t_the_mode():
    torch.manual_seed(0)
    logits = torch.randn(2, 313, 3, 4) * 3
    probs = torch.softmax(logits, 1)
    expected = torch.einsum("nqhw,qc->nchw", probs, bin_centers())
    assert torch.allclose(annealed_mean(logits, T=1.0), expected, atol=1e-4)
    mode = bin_centers()[logits.argmax(1)].permute(0, 3, 1, 2)
    assert torch.allclose(annealed_mean(logits, T=1e-3), mode, atol=1e-2)
    # Lower temperature: further from the centre of mass, i.e. more saturated on average here.
    assert annealed_mean(logits, T=0.38).norm(dim=1).mean() > annealed_mean(logits, T=1.0).norm(dim=1).mean()


def test_grey_mask_threshold():
    ab = torch.zeros(3, 2, 4, 4)
    ab[1, 0, 2, 2] = 5.0  # on the threshold: still grey
    ab[2, 1, 0, 3] = -5.5  # above it: colourful
    assert grey_mask(ab).tolist() == [True, True, False]


def test_estimate_prior_streams_and_round_trips(tmp_path):
    # Two solid-colour images: the histogram is exactly their two bins (before smoothing).
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 200
    grey = np.full((8, 8, 3), 128, np.uint8)
    prior = estimate_prior([red, torch.from_numpy(grey).permute(2, 0, 1)], sigma=5.0)
    assert prior.shape == (313,) and bool((prior > 0).all())
    assert abs(float(prior.sum()) - 1) < 1e-5
    red_bin = int(nearest_bin(torch.tensor([[[[0.0]], [[0.0]]]])))  # grey -> bin of (0, 0)
    assert red_bin == 120
    assert int(prior.argmax()) in {120, int(nearest_bin(_lab_ab(red)).flatten()[0])}
    # Smoothing by hand: counts 1/2, 1/2 on two bins, spread by exp(-d^2 / 50), normalised.
    counts = torch.zeros(313, dtype=torch.float64)
    counts[120] += 0.5
    counts[int(nearest_bin(_lab_ab(red)).flatten()[0])] += 0.5
    c = bin_centers(dtype=torch.float64)
    kernel = torch.exp(-torch.cdist(c, c) ** 2 / 50)
    by_hand = (kernel @ counts).clamp(min=1e-12)
    by_hand /= by_hand.sum()
    assert torch.allclose(prior.double(), by_hand, rtol=1e-4, atol=1e-9)
    path = save_prior(tmp_path / "prior.csv", prior)
    assert torch.allclose(load_prior(path), prior / prior.sum())


def _lab_ab(image: np.ndarray) -> torch.Tensor:
    from ssl_colorize.color import rgb_to_lab

    return rgb_to_lab(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255)[:, 1:]


def test_load_prior_rejects_bad_files(tmp_path):
    bad = tmp_path / "short.csv"
    bad.write_text("0.5\n0.5\n")
    with pytest.raises(ValueError, match="313"):
        load_prior(bad)
    with pytest.raises(ValueError, match="not found"):
        load_prior(tmp_path / "missing.csv")


def test_bad_ab_shapes():
    with pytest.raises(ValueError, match=r"\(N, 2, H, W\)"):
        soft_encode(torch.zeros(1, 3, 2, 2))
    with pytest.raises(ValueError, match="floating"):
        soft_encode(torch.zeros(1, 2, 2, 2, dtype=torch.long))
    assert targets.DEFAULT_K == 10
