"""Losses against their dense textbook definitions (paper eq. 1, 2, 4), values and gradients."""

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
