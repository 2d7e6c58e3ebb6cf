"""The colorization losses (docs/protocols.md section 2, paper eq. 2 and 4).

The classification loss is L = -(1/D) sum_p v_p sum_q Z_pq log softmax(x_p)_q, with Z the soft target
(k non-zero entries per pixel) and v_p the rebalancing weight of the pixel's nearest bin. Because the k
weights of Z sum to 1, each pixel's term is  v_p * (logsumexp(x_p) - sum_j w_pj x_p,idx_pj):
a log-normaliser per pixel and a gather of k logits. Nothing of size (pixels x 313) is built besides
the gradient itself, (softmax(x) - Z) * v / D, written directly in the same pass as the forward.

The reduction (the divisor D) is ``"mean"``: D = P, the number of pixels on the loss grid (Caffe's
``normalize: True``, what the released AlexNet-Lab train_val.prototxt asks of its loss), or ``"sum"``:
D = N, the number of images, i.e. the sum over each image's grid averaged over the batch. ``"sum"``
is what the released layer computes: richzhang/colorization ``resources/softmax_cross_entropy_loss_layer.cpp``
(and ``.cu``), Forward ``loss / num`` over all N x Q x H x W entries, Backward ``(p - t) * loss_weight / num``;
the layer reads no ``loss_param`` (no ``normalize`` / ``normalization``), so nothing else divides.
Two things the released net does differently, neither of which changes the gradient: its layer reports
sum t (log t - log p), the KL divergence, i.e. our cross-entropy minus the targets' entropy (a constant of
the data), and the rebalancing weights v_p act on the gradient only (``ClassRebalanceMultLayer`` in
``resources/caffe_traininglayers.py`` passes the logits through and multiplies the gradient), so its
logged loss is unweighted where ours is weighted.
"""

from __future__ import annotations

import math

import torch

from ssl_colorize.targets import DEFAULT_K, DEFAULT_SIGMA, soft_encode

#: ``reduction`` of the losses: the mean over the grid's pixels, or the released layer's sum over each
#: image's grid, averaged over the images (see the module docstring).
REDUCTIONS = ("mean", "sum")

# Logits per chunk for the log-normaliser and the softmax of the gradient: bounds the scratch
# memory however large the batch. On the CPU one image per chunk (it stays in cache); on a GPU ~8 M
# logits (32 MB in float32, 8 images at the paper's 313 x 56 x 56), so the work is a few large kernels
# instead of one small launch per image.
_CHUNK_LOGITS_CUDA = 1 << 23


def _chunk_images(logits: torch.Tensor) -> int:
    if logits.device.type == "cpu":
        return 1
    per_image = max(1, logits[:1].numel())
    return max(1, _CHUNK_LOGITS_CUDA // per_image)


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    """float32 for half/bfloat16/float32 logits (autocast), float64 for float64."""
    return torch.promote_types(logits.dtype, torch.float32)


class _SoftTargetCrossEntropy(torch.autograd.Function):
    """Forward: sum over pixels of v_p * (lse_p - <w_p, x_p[idx_p]>), divided by ``divisor`` (D).
    Backward: (softmax - Z) * v * g / D.

    When the logits need a gradient, the forward pass also writes it, for an upstream gradient of 1,
    in the same pass over each chunk: exp(x - max) is both the log-normaliser's sum and, once divided by
    that sum, the softmax. The exponentials are then computed once instead of twice (forward, then
    backward), which was most of the loss's CPU time. Backward hands that tensor over (scaled by the
    upstream gradient when it is not 1); a second backward through the same graph (retain_graph)
    recomputes it from the saved logits.
    """

    @staticmethod
    def forward(ctx, logits, indices, weights, pixel_weights, divisor):
        dtype = _compute_dtype(logits)
        same_dtype = logits.dtype == dtype
        lse = torch.empty((logits.shape[0],) + tuple(logits.shape[2:]), dtype=dtype, device=logits.device)
        target_dot = torch.empty_like(lse)  # sum_j w_pj x_p,idx_pj
        want_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(logits) if want_grad else None
        step = _chunk_images(logits)
        for start in range(0, logits.shape[0], step):
            sl = slice(start, start + step)
            x = logits[sl].to(dtype)
            # Gathered while the chunk is in cache, and reduced at once: no (N, k, H, W) buffer.
            target_dot[sl] = (weights[sl].to(dtype) * x.gather(1, indices[sl])).sum(1)
            out = grad[sl] if want_grad and same_dtype else None
            shifted, peak, total = _exp_shifted(x, out)
            lse[sl] = (peak + total.log()).squeeze(1)
            if want_grad:
                _softmax_minus_target_(shifted, total, indices[sl], weights[sl], _pixel_scale(pixel_weights, sl, total, divisor))
                if not same_dtype:
                    grad[sl] = shifted
        per_pixel = lse - target_dot
        if pixel_weights is not None:
            per_pixel = per_pixel * pixel_weights
        ctx.save_for_backward(logits, indices, weights, pixel_weights, lse)
        ctx.precomputed_grad, ctx.divisor = grad, divisor
        return per_pixel.sum() / divisor

    @staticmethod
    def backward(ctx, grad_output):
        grad, ctx.precomputed_grad = ctx.precomputed_grad, None
        if grad is not None:
            return _scaled(grad, grad_output), None, None, None, None
        return _recomputed_grad(ctx, grad_output), None, None, None, None


def _exp_shifted(x: torch.Tensor, out: torch.Tensor | None = None):
    """exp(x - max_q x) over dim 1 (written into ``out`` when given), the max, and the sum of the exps."""
    peak = x.amax(dim=1, keepdim=True)
    shifted = torch.sub(x, peak, out=out).exp_()
    return shifted, peak, shifted.sum(dim=1, keepdim=True)


def _pixel_scale(pixel_weights, sl: slice, total: torch.Tensor, divisor: int) -> torch.Tensor:
    """v_p / D for the chunk, shaped (chunk, 1, H, W)."""
    weights = pixel_weights[sl, None] if pixel_weights is not None else torch.ones_like(total)
    return weights / divisor


def _softmax_minus_target_(shifted, total, indices, weights, scale) -> torch.Tensor:
    """In place: exp(x - max) -> (softmax(x) - Z) * scale, the gradient of a chunk (Z: k weights at indices)."""
    shifted.mul_(scale / total)
    return shifted.scatter_add_(1, indices, -(weights.to(shifted.dtype) * scale))


def _recomputed_grad(ctx, grad_output: torch.Tensor) -> torch.Tensor:
    """The forward pass's gradient, recomputed from the saved logits with the same arithmetic (so a
    repeated backward gives the same values bit for bit), times the upstream gradient."""
    logits, indices, weights, pixel_weights, lse = ctx.saved_tensors
    grad = torch.empty_like(logits)
    step = _chunk_images(logits)
    for start in range(0, logits.shape[0], step):
        sl = slice(start, start + step)
        shifted, _, total = _exp_shifted(logits[sl].to(lse.dtype))
        _softmax_minus_target_(shifted, total, indices[sl], weights[sl], _pixel_scale(pixel_weights, sl, total, ctx.divisor))
        grad[sl] = shifted
    return _scaled(grad, grad_output)


def _scaled(grad: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    # On the CPU the common upstream gradient of exactly 1 costs no pass; on a GPU reading it would cost
    # a device sync, and a multiplication costs next to nothing.
    if grad_output.device.type != "cpu" or float(grad_output) != 1.0:
        grad.mul_(grad_output.to(grad.dtype))
    return grad


def _check_logits_ab(logits: torch.Tensor, ab: torch.Tensor, name: str) -> None:
    if logits.dim() != 4 or ab.dim() != 4 or ab.shape[1] != 2:
        raise ValueError(f"{name}: expected logits (N, Q, H, W) and ab (N, 2, H, W), got {tuple(logits.shape)} and {tuple(ab.shape)}")
    if logits.shape[0] != ab.shape[0] or logits.shape[2:] != ab.shape[2:]:
        raise ValueError(
            f"{name}: logits {tuple(logits.shape)} and ab {tuple(ab.shape)} must share N, H and W "
            "(decimate ab or resize the logits to the loss grid first)"
        )


def _divisor(reduction: str, per_pixel_shape: tuple[int, ...], name: str) -> int:
    """D of the reduction for a (N, H, W) grid: N * H * W ("mean") or N ("sum")."""
    if reduction == "mean":
        return max(1, math.prod(per_pixel_shape))
    if reduction == "sum":
        return max(1, per_pixel_shape[0])
    raise ValueError(f"{name}: reduction must be one of {REDUCTIONS}, got {reduction!r}")


def soft_cross_entropy(
    logits: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    pixel_weights: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy of (N, Q, H, W) logits against sparse soft targets, any number of classes Q.

    ``indices`` / ``weights``: (N, k, H, W) the classes each pixel's target puts mass on and that mass
    (summing to 1 per pixel); ``pixel_weights``: optional (N, H, W) factor per pixel (rebalancing, grey
    images); ``reduction``: "mean" (over the pixels) or "sum" (over each image's grid, mean over the
    images: the released ``SoftmaxCrossEntropyLoss``).
    """
    divisor = _divisor(reduction, (logits.shape[0],) + tuple(logits.shape[2:]), "soft_cross_entropy")
    return _SoftTargetCrossEntropy.apply(logits, indices, weights, pixel_weights, divisor)


def soft_target_cross_entropy(
    logits: torch.Tensor,
    ab: torch.Tensor,
    class_weights: torch.Tensor | None = None,
    k: int = DEFAULT_K,
    sigma: float = DEFAULT_SIGMA,
    image_weights: torch.Tensor | None = None,
    encoded: tuple[torch.Tensor, torch.Tensor] | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Each pixel's cross-entropy against its soft target (paper eq. 2), reduced by ``reduction``.

    Args:
        logits: (N, 313, H, W) class scores on the loss grid.
        ab: (N, 2, H, W) ground-truth ab on the same grid.
        class_weights: optional (313,) rebalancing weights; each pixel is multiplied by the weight of
            its nearest bin (paper eq. 4). ``None`` is the loss without rebalancing.
        image_weights: optional (N,) per-image factor, e.g. 0 for grey images.
        encoded: optional precomputed ``soft_encode(ab, k, sigma)`` (the data path may compute it).
        reduction: "mean" over the pixels, or "sum" over each image's grid and mean over the images
            (the released layer; see the module docstring).
    """
    _check_logits_ab(logits, ab, "soft_target_cross_entropy")
    if logits.shape[1] != 313:
        raise ValueError(f"soft_target_cross_entropy: expected 313 classes, got {logits.shape[1]}")
    indices, weights = encoded if encoded is not None else soft_encode(ab, k=k, sigma=sigma)
    pixel_weights = None
    if class_weights is not None:
        pixel_weights = class_weights.to(device=logits.device, dtype=_compute_dtype(logits))[indices[:, 0]]
    if image_weights is not None:
        factor = image_weights.to(device=logits.device, dtype=_compute_dtype(logits))[:, None, None]
        pixel_weights = factor.expand(-1, *logits.shape[2:]) if pixel_weights is None else pixel_weights * factor
    return soft_cross_entropy(logits, indices, weights, pixel_weights, reduction)


def l2_loss(pred_ab: torch.Tensor, ab: torch.Tensor, image_weights: torch.Tensor | None = None,
            reduction: str = "mean") -> torch.Tensor:
    """Regression baseline (paper eq. 1): 1/2 ||pred - ab||^2 per pixel, mean over the pixels ("mean") or
    summed over each image's grid and averaged over the images ("sum")."""
    _check_logits_ab(pred_ab, ab, "l2_loss")
    per_pixel = 0.5 * (pred_ab.float() - ab.float()).pow(2).sum(1)
    if image_weights is not None:
        per_pixel = per_pixel * image_weights.to(per_pixel)[:, None, None]
    return per_pixel.sum() / _divisor(reduction, tuple(per_pixel.shape), "l2_loss")
