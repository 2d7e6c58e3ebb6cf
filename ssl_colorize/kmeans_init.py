"""Data-dependent k-means initialisation (Krähenbühl, Doersch, Donahue, Darrell, ICLR 2016).

The released colorization models start from this init (docs/protocols.md section 3). Layer by layer, in
execution order, each convolution (or linear layer) is set from the data that actually reaches it:

1. **k-means weights** (the paper's data-driven init): sample patches of the layer's input (the
   receptive field of one output unit, with the layer's own kernel, stride, padding and dilation),
   ZCA-whiten them, run k-means with one centroid per output channel (per group for grouped convs)
   and use each centroid as a matched filter in whitened space: response = <whitened patch,
   centroid>, i.e. raw filter ``W_zca @ c``.
2. **within-layer scaling** (the paper's Algorithm 1): rescale each output channel's filter and set
   its bias so that, on the same data, the layer's output (before any BatchNorm / ReLU) has zero mean
   and unit variance per channel. Layers without a bias can only be scaled (unit variance).

Transposed convolutions (colornet's conv8_1) have no patch-space interpretation: they get Gaussian
weights, then the same within-layer scaling. The pretext head (``model.head``) keeps its random init
by default. The paper's *between-layer* rescaling (equalising the gradient-to-weight ratios across
layers) is a separate step and is not done here.

Because every layer's input is produced by the layers already initialised, one forward pass per layer
is run (stopped right after the layer's input is known). BatchNorm running statistics are reset
first and the model runs in eval mode, so each BatchNorm is (almost exactly) the identity while
layers are being fitted, which is consistent with the standardised outputs the init produces.

Cost per layer: whitening O(n D min(n, D)) and k-means O(iters n k r), for n sampled patches of
dimension D (rank r <= min(n, D)) and k filters. With a handful of small images on a CPU this takes
seconds; for ImageNet-scale inits run it on the GPU with a few hundred images.

Against the released code (philkr/magic_init ``magic_init.py`` with ``-t kmeans``, which the
colorization models were initialised with: richzhang/colorization train_alexnet/run_init.sh runs
``magic_init_mod.py train_val_mi.prototxt mi.caffemodel -nit 10 -t kmeans``; train/readme (1) for
colornet's init_v2.caffemodel). The same: layer by layer in execution order on the data reaching the
layer, whitening, k-means in whitened space with the centroids as filters, grouped convolutions per
group, transposed convolutions Gaussian ("elwise"), then each output channel divided by its standard
deviation and its bias set to ``-mean / std + b`` (``output_mean`` = b; magic_init's default ``-b`` is
0.1, :data:`MAGIC_INIT_BIAS`, which ``ssl_colorize.pretrain`` passes). Where it differs:

- patches: magic_init gathers a layer's inputs through random Gaussian projections in output space
  (oversampled to a full basis) and maps the result back; we unfold the patches directly (the same
  space, with the layer's own padding and stride);
- whitening: magic_init eigen-decomposes D^T D (not divided by n), keeps the top ``out_channels``
  components, scales them by 1 / sqrt(s + 1e-3) and L2-normalises every whitened sample; we keep every
  component of the data's subspace, regularised relative to the mean eigenvalue (``whiten_eps``), and
  do not normalise the samples;
- k-means: scikit-learn's MiniBatchKMeans (batch 10 x k) with k = the number of kept components; we
  run ``iters`` Lloyd iterations with k = out_channels;
- data: magic_init runs ``-nit 10`` batches of the train prototxt's own data layer (AlexNet-Lab: 10 x 80
  random 180 px crops) in Caffe's TRAIN phase, where BatchNorm (which it does not support, and warns
  about) normalises with the batch statistics; we use the images given (the trainer: 64 centre crops)
  with BatchNorm reset and in eval mode (almost the identity);
- layers: the released AlexNet-Lab init (train_val_mi.prototxt) covers conv1..conv5 only; fc6 / fc7
  then come from train_val.prototxt's fillers (Gaussian std 0.005, bias 1) and fc8 from Caffe's default
  (zeros). We initialise every convolution and fc layer but the pretext head, which keeps its random
  init (``skip``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

#: Layer types kmeans_init_ initialises.
INIT_TYPES = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)
#: magic_init's default output mean ``-b`` / ``--bias`` 0.1 (philkr/magic_init magic_init.py, main()).
MAGIC_INIT_BIAS = 0.1


class _InputCaptured(Exception):
    """Raised by a forward pre-hook to stop the forward pass once a layer's input is known."""

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__("input captured")
        self.value = value


def kmeans_init_(
    model: nn.Module,
    batches: torch.Tensor | Iterable[torch.Tensor],
    *,
    max_patches: int = 10000,
    iters: int = 10,
    whiten_eps: float = 1e-2,
    skip: Iterable[nn.Module] | None = None,
    seed: int = 0,
    progress: bool = True,
    output_mean: float = 0.0,
) -> nn.Module:
    """Initialise ``model`` in place from data; returns the model.

    Args:
        model: any module; Encoders (ssl_colorize.models) are run with forward(), or with
            forward_taps over all taps when they have no colour head.
        batches: input images in the model's public units (e.g. L in [0, 100]): one (N, C, H, W)
            tensor or an iterable of them (concatenated; keep it small, a few to a few hundred images).
        max_patches: patches sampled per layer for whitening and k-means.
        iters: Lloyd iterations of k-means.
        whiten_eps: ZCA regulariser, relative to the mean eigenvalue of the patch covariance.
        skip: modules (and everything inside them) to leave alone; default ``model.head`` if any.
        seed: seeds patch sampling, k-means seeding and the Gaussian fills.
        progress: show a tqdm bar over the layers.
        output_mean: the mean each layer's output channels are given (through their bias; layers
            without a bias are only scaled). magic_init's default is :data:`MAGIC_INIT_BIAS`.
    """
    if max_patches < 2:
        raise ValueError(f"kmeans_init_: max_patches must be >= 2, got {max_patches}")
    if iters < 1:
        raise ValueError(f"kmeans_init_: iters must be >= 1, got {iters}")
    if whiten_eps <= 0:
        raise ValueError(f"kmeans_init_: whiten_eps must be > 0, got {whiten_eps}")
    device = next(model.parameters()).device
    data = _stack_batches(batches).to(device)
    run = _runner(model)
    skipped = _skipped_modules(model, skip)
    layers = [m for m in model.modules() if isinstance(m, INIT_TYPES) and id(m) not in skipped]
    generator = torch.Generator().manual_seed(seed)

    was_training = model.training
    model.eval()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
    try:
        with torch.no_grad():
            for layer in tqdm(layers, desc="k-means init", unit="layer", disable=not progress):
                inputs = _capture_input(run, layer, data)
                if inputs is None:
                    warnings.warn(f"kmeans_init_: {type(layer).__name__} never ran on the data; left as is")
                    continue
                if isinstance(layer, nn.ConvTranspose2d):
                    layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator).to(layer.weight))
                else:
                    layer.weight.copy_(_kmeans_weight(layer, inputs, max_patches, iters, whiten_eps, generator))
                if layer.bias is not None:
                    layer.bias.zero_()
                _standardise_outputs_(layer, inputs, output_mean)
    finally:
        model.train(was_training)
    return model


# ------------------------------------------------------------------------------ running the model
def _stack_batches(batches: torch.Tensor | Iterable[torch.Tensor]) -> torch.Tensor:
    if isinstance(batches, torch.Tensor):
        data = batches
    else:
        parts = [b for b in batches]
        if not parts:
            raise ValueError("kmeans_init_: no data batches given")
        data = torch.cat(parts, dim=0)
    if data.dim() != 4 or data.shape[0] < 1:
        raise ValueError(f"kmeans_init_: batches must be (N, C, H, W) tensors, got shape {tuple(data.shape)}")
    return data.float()


def _runner(model: nn.Module) -> Callable[[torch.Tensor], object]:
    if getattr(model, "has_colour_head", True) or not hasattr(model, "forward_taps"):
        return model
    taps = list(model.taps)
    return lambda x: model.forward_taps(x, taps)


def _skipped_modules(model: nn.Module, skip: Iterable[nn.Module] | None) -> set[int]:
    if skip is None:
        head = getattr(model, "head", None)
        skip = [head] if isinstance(head, nn.Module) else []
    return {id(m) for root in skip for m in root.modules()}


def _capture_input(run: Callable[[torch.Tensor], object], layer: nn.Module, data: torch.Tensor) -> torch.Tensor | None:
    """The tensor ``layer`` receives when the model runs on ``data`` (None if it never runs)."""

    def hook(_module: nn.Module, args: tuple) -> None:
        raise _InputCaptured(args[0].detach())

    handle = layer.register_forward_pre_hook(hook)
    try:
        run(data)
    except _InputCaptured as captured:
        return captured.value
    finally:
        handle.remove()
    return None


# ----------------------------------------------------------------------------- patches and k-means
def _sample_patches(layer: nn.Module, inputs: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """(n_sampled, D) input patches of ``layer``, D = in_channels * kh * kw (channel-major, like unfold)."""
    if isinstance(layer, nn.Linear):
        rows = inputs.reshape(-1, inputs.shape[-1])
        pick = torch.randperm(rows.shape[0], generator=generator)[:n].to(rows.device)
        return rows[pick]
    if isinstance(layer.padding, str):
        raise ValueError(f"kmeans_init_: string padding {layer.padding!r} of {layer} is not supported")
    per_image = -(-n // inputs.shape[0])  # ceil
    chunks = []
    for image in inputs:  # unfold one image at a time: memory stays one image's patches
        cols = F.unfold(
            image[None],
            kernel_size=layer.kernel_size,
            dilation=layer.dilation,
            padding=layer.padding,
            stride=layer.stride,
        )[0]  # (D, L)
        pick = torch.randperm(cols.shape[1], generator=generator)[:per_image].to(cols.device)
        chunks.append(cols[:, pick].T)
    patches = torch.cat(chunks, dim=0)
    if patches.shape[0] > n:
        patches = patches[torch.randperm(patches.shape[0], generator=generator)[:n].to(patches.device)]
    return patches


def _whitening(patches: torch.Tensor, eps_rel: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ZCA whitening of (n, D) patches in the data's own subspace.

    Returns (mean (D,), basis V (D, r), scale d (r,)) such that z = ((x - mean) @ V) * d has identity
    covariance up to the regulariser: d = 1 / sqrt(lambda + eps), eps = eps_rel * mean(lambda). ZCA's
    final rotation back (@ V.T) preserves distances, so k-means runs on z directly.
    """
    x = patches.float()
    mean = x.mean(dim=0)
    x = x - mean
    n, dim = x.shape
    if dim <= n:
        evals, evecs = torch.linalg.eigh(x.T @ x / n)  # (D,), (D, D)
        basis = evecs
    else:  # fewer patches than dimensions: eigen-decompose the (n, n) Gram matrix instead
        evals, u = torch.linalg.eigh(x @ x.T / n)
        basis = x.T @ u  # columns have norm sqrt(n * lambda)
        basis = basis / basis.norm(dim=0).clamp_min(1e-30)
    # Drop the null space (and float32 round-off around it): it carries no data.
    keep = evals > evals.max().clamp_min(1e-30) * 1e-6
    evals, basis = evals[keep], basis[:, keep]
    eps = eps_rel * evals.mean() if evals.numel() else torch.tensor(1.0, dtype=x.dtype)
    scale = 1.0 / torch.sqrt(evals + eps)
    return mean, basis, scale


def _kmeans(z: torch.Tensor, k: int, iters: int, generator: torch.Generator) -> torch.Tensor:
    """Lloyd's k-means on rows of z (n, r), seeded with k distinct random rows; returns (k, r) centroids.

    An empty cluster is re-seeded with the point farthest from its current centroid.
    """
    n = z.shape[0]
    if k > n:
        raise ValueError(f"k-means needs at least k={k} points, got {n}")
    centroids = z[torch.randperm(n, generator=generator)[:k].to(z.device)].clone()
    z_sq = (z * z).sum(dim=1)
    for _ in range(iters):
        assign, dist = _nearest(z, z_sq, centroids)
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, assign, z)
        empty = counts == 0
        centroids = sums / counts.clamp_min(1).unsqueeze(1).to(z.dtype)
        if empty.any():
            far = dist.argsort(descending=True)[: int(empty.sum())]
            centroids[empty] = z[far]
    return centroids


def _nearest(z: torch.Tensor, z_sq: torch.Tensor, centroids: torch.Tensor, chunk: int = 4096):
    """Index of, and squared distance to, the nearest centroid for each row of z (chunked over rows)."""
    c_sq = (centroids * centroids).sum(dim=1)
    assign = torch.empty(z.shape[0], dtype=torch.long, device=z.device)
    dist = torch.empty(z.shape[0], dtype=z.dtype, device=z.device)
    for start in range(0, z.shape[0], chunk):
        part = z[start : start + chunk]
        d = z_sq[start : start + chunk, None] - 2.0 * part @ centroids.T + c_sq[None]
        best, idx = d.min(dim=1)
        assign[start : start + chunk] = idx
        dist[start : start + chunk] = best.clamp_min(0)
    return assign, dist


def _kmeans_weight(
    layer: nn.Conv2d | nn.Linear,
    inputs: torch.Tensor,
    max_patches: int,
    iters: int,
    whiten_eps: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """The layer's weight from k-means centroids of its whitened input patches, group by group."""
    groups = getattr(layer, "groups", 1)
    weight = layer.weight
    k = weight.shape[0] // groups
    patches = _sample_patches(layer, inputs, max_patches, generator)
    dim_g = patches.shape[1] // groups
    filters = []
    for g in range(groups):
        x = patches[:, g * dim_g : (g + 1) * dim_g]
        mean, basis, scale = _whitening(x, whiten_eps)
        z = ((x - mean) @ basis) * scale
        k_fit = min(k, z.shape[0])
        centroids = _kmeans(z, k_fit, iters, generator)
        if k_fit < k:
            warnings.warn(
                f"kmeans_init_: {type(layer).__name__}{tuple(weight.shape)} has {k} filters per group but only "
                f"{z.shape[0]} patches; {k - k_fit} filters are random directions in whitened space"
            )
            fill = torch.randn(k - k_fit, z.shape[1], generator=generator).to(z)
            centroids = torch.cat([centroids, fill], dim=0)
        # Matched filter in whitened space: <z, c> = (x - mean) @ (basis * scale) @ c.
        filters.append(centroids @ (basis * scale).T)  # (k, dim_g)
    return torch.cat(filters, dim=0).reshape(weight.shape).to(weight)


def _standardise_outputs_(layer: nn.Module, inputs: torch.Tensor, output_mean: float = 0.0) -> None:
    """Rescale each output channel (and set its bias) for mean ``output_mean``, unit variance on ``inputs``."""
    out = layer(inputs)
    channel_dim = 1 if out.dim() == 4 else out.dim() - 1
    reduce = [d for d in range(out.dim()) if d != channel_dim]
    mean = out.mean(dim=reduce)
    std = out.std(dim=reduce, unbiased=False)
    # A channel that is constant on the data cannot be given unit variance: only centre it.
    scale = torch.where(std > 1e-6, 1.0 / std.clamp_min(1e-6), torch.ones_like(std))
    weight = layer.weight
    if isinstance(layer, nn.ConvTranspose2d):  # (in, out / groups, kh, kw): output channels on dim 1
        groups = layer.groups
        w = weight.view(groups, weight.shape[0] // groups, weight.shape[1], *weight.shape[2:])
        w.mul_(scale.view(groups, 1, -1, *([1] * (weight.dim() - 2))))
    else:
        weight.mul_(scale.view(-1, *([1] * (weight.dim() - 1))))
    if layer.bias is not None:
        layer.bias.copy_(-mean * scale + output_mean)
