"""Losses against their dense textbook definitions (paper eq. 1, 2, 4), values and gradients."""

import numpy as np
import pytest
import torch

from ssl_colorize.losses import l2_loss, soft_target_cross_entropy
from ssl_colorize.targets import load_prior, rebalance_weights, soft_encode


def dense_reference(logits, ab, class_weights=None, image_weights=None, k=10, sigma=5.0):
    """The released code's way: a dense 313-channel soft target and a full log-softmax."""
    idx, w = soft_encode(ab, k=k, sigma=sigma)
    target = torch.zeros_like(logits).scatter_(1, idx, w.to(logits.dtype))
    per_pixel = -(target * torch.log_softmax(logits, 1)).sum(1)
    if class_weights is not None:
        per_pixel = per_pixel * class_weights.to(logits.dtype)[idx[:, 0]]
    if image_weights is not None:
        per_pixel = per_pixel * image_weights.to(logits.dtype)[:, None, None]
    return per_pixel.mean()


@pytest.mark.parametrize("rebalanced", [False, True])
@pytest.mark.parametrize("with_image_weights", [False, True])
@pytest.mark.parametrize("factor", [3.0, -2.0])  # a negative upstream gradient takes the unfolded path
def test_cross_entropy_value_and_gradient_equal_dense_definition(rebalanced, with_image_weights, factor):
    torch.manual_seed(0)
    n, h, w = 5, 3, 4  # 5 images: more than one chunk of the chunked log-normaliser
    ab = torch.empty(n, 2, h, w).uniform_(-110, 110)
    class_weights = rebalance_weights(load_prior()) if rebalanced else None
    image_weights = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.5]) if with_image_weights else None
    logits = torch.randn(n, 313, h, w, dtype=torch.float64, requires_grad=True)
    ours = soft_target_cross_entropy(logits, ab, class_weights, image_weights=image_weights)
    (grad_ours,) = torch.autograd.grad(ours * factor, logits)
    ref_logits = logits.detach().clone().requires_grad_()
    ref = dense_reference(ref_logits, ab, class_weights, image_weights)
    (grad_ref,) = torch.autograd.grad(ref * factor, ref_logits)
    assert torch.allclose(ours.double(), ref, rtol=1e-5)
    assert torch.allclose(grad_ours, grad_ref, atol=1e-9, rtol=1e-5)


def test_cross_entropy_gradcheck():
    torch.manual_seed(1)
    ab = torch.empty(1, 2, 2, 2).uniform_(-50, 50)
    logits = torch.randn(1, 313, 2, 2, dtype=torch.float64, requires_grad=True)
    weights = rebalance_weights(load_prior())
    assert torch.autograd.gradcheck(lambda x: soft_target_cross_entropy(x, ab, weights), (logits,))


def test_cross_entropy_minimum_is_the_target_entropy():
    ab = torch.tensor([[[[12.3]], [[-41.0]]]])
    idx, w = soft_encode(ab)
    logits = torch.full((1, 313, 1, 1), -1e4, dtype=torch.float64).scatter(1, idx, w.double().log())
    entropy = -(w * w.log()).sum()
    assert torch.allclose(soft_target_cross_entropy(logits, ab), entropy.double(), atol=1e-6)


def test_l2_loss_value_and_gradient():
    torch.manual_seed(2)
    pred = torch.randn(2, 2, 3, 3, requires_grad=True)
    ab = torch.randn(2, 2, 3, 3)
    loss = l2_loss(pred, ab)
    assert torch.allclose(loss, 0.5 * ((pred - ab) ** 2).sum(1).mean())
    (grad,) = torch.autograd.grad(loss, pred)
    assert torch.allclose(grad, (pred - ab).detach() / (2 * 3 * 3))


def test_mismatched_grids_are_rejected():
    with pytest.raises(ValueError, match="share N, H and W"):
        soft_target_cross_entropy(torch.zeros(1, 313, 4, 4), torch.zeros(1, 2, 8, 8))


def test_repeated_backward_recomputes_the_same_gradient():
    """The forward pass writes the gradient; a second backward (retain_graph) recomputes it, bit for bit."""
    torch.manual_seed(2)
    ab = torch.empty(3, 2, 4, 4).uniform_(-100, 100)
    logits = torch.randn(3, 313, 4, 4, requires_grad=True)
    loss = soft_target_cross_entropy(logits, ab, rebalance_weights(load_prior()))
    (first,) = torch.autograd.grad(loss * 2.5, logits, retain_graph=True)
    (second,) = torch.autograd.grad(loss * 2.5, logits)
    assert torch.equal(first, second)
    with torch.no_grad():  # no gradient wanted: none is written, the value is the same
        assert torch.equal(soft_target_cross_entropy(logits, ab, rebalance_weights(load_prior())), loss.detach())


def released_softmax_cross_entropy_layer(logits, target, boost):
    """The released layer as its source computes it, with numpy (richzhang/colorization
    resources/softmax_cross_entropy_loss_layer.cpp / .cu and ClassRebalanceMultLayer in
    resources/caffe_traininglayers.py): -> (the value it reports, the gradient it sends to the logits).

    Forward: p = softmax over the channel axis; loss = sum over every (n, q, h, w) with target > 0 of
    target * (log target - log p), divided by num = N. Backward: (p - target) * loss_weight / num (loss_weight
    1), which ClassRebalanceMultLayer multiplies by the pixel's boost; its forward passes the logits as is.
    """
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    prob = shifted / shifted.sum(axis=1, keepdims=True)
    num = logits.shape[0]
    loss = 0.0
    for p, t in zip(prob.ravel(), target.ravel()):  # the layer's loop over count = N * Q * H * W entries
        if t > 0:
            loss -= t * (np.log(p) - np.log(t))
    grad = (prob - target) / num * boost[:, None]
    return loss / num, grad


def test_sum_reduction_is_the_released_layer_on_a_hand_computed_case():
    """2 images, a 2x2 grid, 3 bins: the released layer's gradient, and its value up to the targets'
    entropy (it reports KL(target || p), we the cross-entropy; the difference does not depend on the logits)."""
    from ssl_colorize.losses import soft_cross_entropy

    logits = np.array([[[[0.5, -1.0], [2.0, 0.0]], [[1.5, 0.3], [-0.7, 0.0]], [[-2.0, 1.1], [0.4, 3.0]]],
                       [[[0.0, 0.2], [1.0, -1.0]], [[0.1, 0.1], [2.5, 0.9]], [[1.2, -0.4], [0.0, 0.6]]]])
    target = np.array([[[[0.6, 0.0], [1.0, 0.2]], [[0.3, 0.5], [0.0, 0.3]], [[0.1, 0.5], [0.0, 0.5]]],
                       [[[0.0, 0.25], [0.7, 0.1]], [[1.0, 0.25], [0.2, 0.1]], [[0.0, 0.5], [0.1, 0.8]]]])
    boost = np.array([[[1.0, 2.0], [0.5, 1.0]], [[3.0, 1.0], [1.0, 0.0]]])  # rebalancing x non-grey mask
    released_value, released_grad = released_softmax_cross_entropy_layer(logits, target, boost)
    unweighted_value, _ = released_softmax_cross_entropy_layer(logits, target, np.ones_like(boost))
    assert released_value == unweighted_value  # the boost acts on the gradient only

    indices = torch.arange(3).view(1, 3, 1, 1).expand(2, 3, 2, 2).contiguous()  # every bin, its target mass
    x = torch.tensor(logits, requires_grad=True)
    loss = soft_cross_entropy(x, indices, torch.tensor(target), torch.tensor(boost), reduction="sum")
    loss.backward()
    np.testing.assert_allclose(x.grad.numpy(), released_grad, rtol=1e-12, atol=1e-15)
    plain = soft_cross_entropy(torch.tensor(logits), indices, torch.tensor(target), reduction="sum")
    entropy = -sum(t * np.log(t) for t in target.ravel() if t > 0) / 2
    assert float(plain) == pytest.approx(released_value + entropy, rel=1e-12)
    # "mean" divides by the N x H x W = 8 pixels instead of N = 2: the grid's 4 pixels apart
    mean = soft_cross_entropy(torch.tensor(logits), indices, torch.tensor(target), reduction="mean")
    assert float(mean) == pytest.approx(float(plain) / 4, rel=1e-12)


def test_reductions_of_the_public_losses():
    torch.manual_seed(3)
    ab = torch.empty(3, 2, 4, 5).uniform_(-80, 80)
    logits = torch.randn(3, 313, 4, 5, dtype=torch.float64)
    weights = rebalance_weights(load_prior())
    mean = soft_target_cross_entropy(logits, ab, weights)
    total = soft_target_cross_entropy(logits, ab, weights, reduction="sum")
    assert torch.allclose(total, mean * 20)  # 4 x 5 pixels per image
    pred = torch.randn(3, 2, 4, 5)
    assert torch.allclose(l2_loss(pred, ab, reduction="sum"), 20 * l2_loss(pred, ab))
    with pytest.raises(ValueError, match="reduction"):
        soft_target_cross_entropy(logits, ab, reduction="max")
