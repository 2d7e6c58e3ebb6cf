"""The colorization losses (PROTOCOL.md section 2, paper eq. 2 and 4).

The classification loss is L = -(1/P) sum_p v_p sum_q Z_pq log softmax(x_p)_q, with Z the soft target
(k non-zero entries per pixel) and v_p the rebalancing weight of the pixel's nearest bin. Because the k
weights of Z sum to 1, each pixel's term is  v_p * (logsumexp(x_p) - sum_j w_pj x_p,idx_pj):
a log-normaliser per pixel and a gather of k logits. Nothing of size (pixels x 313) is built besides
the gradient itself, which backward writes directly: (softmax(x) - Z) * v / P.
"""

from __future__ import annotations

import torch

from ssl_colorize.targets import DEFAULT_K, DEFAULT_SIGMA, soft_encode

# Logits per chunk for the log-normaliser and the softmax of the backward pass: bounds the scratch
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


def _logsumexp_chunked(logits: torch.Tensor) -> torch.Tensor:
    """logsumexp over dim 1 in at least float32, a few images at a time -> (N, H, W)."""
    dtype = _compute_dtype(logits)
    out = torch.empty((logits.shape[0],) + tuple(logits.shape[2:]), dtype=dtype, device=logits.device)
    step = _chunk_images(logits)
    for start in range(0, logits.shape[0], step):
        out[start : start + step] = torch.logsumexp(logits[start : start + step].to(dtype), dim=1)
    return out


class _SoftTargetCrossEntropy(torch.autograd.Function):
    """Forward: mean over pixels of v_p * (lse_p - <w_p, x_p[idx_p]>). Backward: (softmax - Z) * v * g / P."""

    @staticmethod
    def forward(ctx, logits, indices, weights, pixel_weights):
        lse = _logsumexp_chunked(logits)
        gathered = logits.gather(1, indices).to(lse.dtype)
        per_pixel = lse - (weights.to(lse.dtype) * gathered).sum(1)
        if pixel_weights is not None:
            per_pixel = per_pixel * pixel_weights
        ctx.save_for_backward(logits, indices, weights, pixel_weights, lse)
        return per_pixel.mean()

    @staticmethod
    def backward(ctx, grad_output):
        logits, indices, weights, pixel_weights, lse = ctx.saved_tensors
        num_pixels = lse.numel()
        scale = grad_output.to(lse.dtype) / num_pixels
        per_pixel_scale = scale * (pixel_weights if pixel_weights is not None else torch.ones_like(lse))
        grad = torch.empty_like(logits)
        same_dtype = logits.dtype == lse.dtype
        # With a non-negative scale (always, in training) it is folded into the exponent:
        # s * exp(x - lse) = exp(x - (lse - log s)), which saves a pass over the logits. The sign is only
        # read where it costs no device sync (CPU); elsewhere the scale is a separate multiplication.
        fold = same_dtype and grad_output.device.type == "cpu" and float(grad_output) >= 0
        if fold:
            shift = lse - torch.log(per_pixel_scale)  # log 0 = -inf: a zero-weight pixel gets exp(-inf) = 0
        step = _chunk_images(logits)
        for start in range(0, logits.shape[0], step):
            sl = slice(start, start + step)
            if fold:
                chunk = torch.sub(logits[sl], shift[sl, None], out=grad[sl]).exp_()
                chunk.scatter_add_(1, indices[sl], -(weights[sl].to(lse.dtype) * per_pixel_scale[sl, None]))
                continue
            if same_dtype:  # softmax written straight into the gradient, no scratch
                chunk = torch.sub(logits[sl], lse[sl, None], out=grad[sl]).exp_()
            else:  # bf16/half logits: the softmax in float32, one chunk at a time
                chunk = torch.exp(logits[sl].to(lse.dtype) - lse[sl, None])
            chunk.scatter_add_(1, indices[sl], -weights[sl].to(lse.dtype))
            chunk.mul_(per_pixel_scale[sl, None])
            if not same_dtype:
                grad[sl] = chunk
        return grad, None, None, None


def _check_logits_ab(logits: torch.Tensor, ab: torch.Tensor, name: str) -> None:
    if logits.dim() != 4 or ab.dim() != 4 or ab.shape[1] != 2:
        raise ValueError(f"{name}: expected logits (N, Q, H, W) and ab (N, 2, H, W), got {tuple(logits.shape)} and {tuple(ab.shape)}")
    if logits.shape[0] != ab.shape[0] or logits.shape[2:] != ab.shape[2:]:
        raise ValueError(
            f"{name}: logits {tuple(logits.shape)} and ab {tuple(ab.shape)} must share N, H and W "
            "(decimate ab or resize the logits to the loss grid first)"
        )


def soft_target_cross_entropy(
    logits: torch.Tensor,
    ab: torch.Tensor,
    class_weights: torch.Tensor | None = None,
    k: int = DEFAULT_K,
    sigma: float = DEFAULT_SIGMA,
    image_weights: torch.Tensor | None = None,
    encoded: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Mean over pixels of each pixel's cross-entropy against its soft target (paper eq. 2).

    Args:
        logits: (N, 313, H, W) class scores on the loss grid.
        ab: (N, 2, H, W) ground-truth ab on the same grid.
        class_weights: optional (313,) rebalancing weights; each pixel is multiplied by the weight of
            its nearest bin (paper eq. 4). ``None`` is the loss without rebalancing.
        image_weights: optional (N,) per-image factor, e.g. 0 for grey images.
        encoded: optional precomputed ``soft_encode(ab, k, sigma)`` (the data path may compute it).
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
    return _SoftTargetCrossEntropy.apply(logits, indices, weights, pixel_weights)


def l2_loss(pred_ab: torch.Tensor, ab: torch.Tensor, image_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Regression baseline (paper eq. 1): mean over pixels of 1/2 ||pred - ab||^2."""
    _check_logits_ab(pred_ab, ab, "l2_loss")
    per_pixel = 0.5 * (pred_ab.float() - ab.float()).pow(2).sum(1)
    if image_weights is not None:
        per_pixel = per_pixel * image_weights.to(per_pixel)[:, None, None]
    return per_pixel.mean()
