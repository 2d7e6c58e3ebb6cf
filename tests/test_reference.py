"""ssl_colorize.reference: the released code's way, as the ground truth our fast paths are checked against.

The reference must agree with our loss (value and gradient), with our crops and with our grey test, or
the throughput benchmark would compare unequal work.
"""

from __future__ import annotations

import numpy as np
import torch

from ssl_colorize.data.transforms import random_crop_flip
from ssl_colorize.losses import soft_target_cross_entropy
from ssl_colorize.reference import (
    GREY_THRESHOLD,
    ReferenceEncoder,
    crop_window,
    dense_cross_entropy,
    reference_loss,
)
from ssl_colorize.targets import GREY_THRESHOLD as OUR_GREY_THRESHOLD
from ssl_colorize.targets import NUM_BINS, bin_centers, grey_mask, load_prior, rebalance_weights


def _ab(n: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 2, size, size, generator=g, dtype=torch.float64) * 30).clamp(-100, 100)


def test_reference_loss_is_our_loss_value_and_gradient():
    ab = _ab(3, 6)
    ab[1] = 0.5 * torch.sign(ab[1])  # a grey image: weight 0 in both
    logits = torch.randn(3, NUM_BINS, 6, 6, generator=torch.Generator().manual_seed(1), requires_grad=True)
    ours_logits = logits.detach().clone().requires_grad_(True)
    reference = reference_loss(logits, ab.float(), ReferenceEncoder())
    ours = soft_target_cross_entropy(ours_logits, ab.float(), rebalance_weights(load_prior()),
                                     image_weights=(~grey_mask(ab.float())).float())
    reference.backward()
    ours.backward()
    assert torch.allclose(ours.detach(), reference.detach(), rtol=1e-4, atol=1e-5)
    assert torch.allclose(ours_logits.grad, logits.grad, rtol=1e-3, atol=1e-7)
    assert logits.grad[1].abs().max() == 0  # the grey image contributes nothing


def test_soft_encoding_weights_and_nearest_first():
    encoder = ReferenceEncoder(k=5, sigma=5.0)
    centers = bin_centers(dtype=torch.float64).numpy()
    points = centers[[0, 100, 200]] + 0.1
    idx, weights = encoder.encode_flat(points)
    assert idx.shape == weights.shape == (3, 5)
    assert list(idx[:, 0]) == [0, 100, 200]  # the nearest centre comes first
    assert np.allclose(weights.sum(1), 1.0) and (np.diff(weights, axis=1) <= 1e-12).all()
    dense = encoder.encode_dense(_ab(2, 3).numpy())
    assert dense.shape == (2, NUM_BINS, 3, 3) and np.allclose(dense.sum(1), 1.0, atol=1e-6)
    assert ((dense > 0).sum(1) == 5).all()


def test_grey_test_and_dense_loss():
    ab = np.zeros((2, 2, 4, 4))
    ab[0, 0, 1, 1] = GREY_THRESHOLD + 0.5  # one colourful pixel makes a colour image
    ab[1, 1, 2, 2] = GREY_THRESHOLD - 0.5
    assert GREY_THRESHOLD == OUR_GREY_THRESHOLD
    assert ReferenceEncoder.non_grey(ab).tolist() == [1.0, 0.0]
    # A one-hot target and uniform logits: the loss is log(313) times the mean pixel weight.
    target = torch.zeros(1, NUM_BINS, 2, 2)
    target[:, 7] = 1
    loss = dense_cross_entropy(torch.zeros(1, NUM_BINS, 2, 2), target, torch.full((1, 2, 2), 0.5))
    assert torch.isclose(loss, torch.tensor(0.5 * np.log(NUM_BINS), dtype=torch.float32))


def test_crop_window_is_random_crop_flip():
    image = torch.arange(3 * 20 * 30, dtype=torch.int32).reshape(3, 20, 30)
    for seed in (0, 1, 7, 2**64 - 3):
        top, left, mirror = crop_window(20, 30, 12, seed)
        ours = random_crop_flip(image, 12, torch.Generator().manual_seed(seed % 2**63))
        window = image[:, top : top + 12, left : left + 12]
        assert torch.equal(ours, window.flip(-1) if mirror else window)
