"""Krähenbühl et al.'s between-layer rescaling (ICLR 2016), as the released colorization models got it.

The released AlexNet was post-processed before every transfer test (richzhang/colorization,
``train_alexnet/postprocess_model.sh``, the script behind ``alexnet_release_450000_nobn_rs.caffemodel``):

1. ``resources/batch_norm_absorb.py``: every BatchNorm absorbed into the convolution before it;
2. ``magic_init_mod.py train_val_nobn_rs.prototxt ... -l <nobn model> -nit 10 -cs``: with the weights
   loaded, the ``-cs`` ("correct for scaling") step, ``calibrateGradientRatio`` of philkr/magic_init
   (``magic_init.py``). ``-nit`` only reaches the k-means init, which is skipped for a loaded model.

What ``calibrateGradientRatio(net, NIT=1)`` does, read from philkr/magic_init ``magic_init.py``:

* data: ONE forward batch from the prototxt's data layer (NIT=1; ``train_val_nobn_rs.prototxt``: 80
  ImageNet training images, random 227 crops, mirrored), kept and reused for every iteration;
* layers: every layer with parameters up to the last layer that is not a loss, in order. In
  ``train_val_nobn_rs.prototxt`` these are ``data_l`` (a 1x1 convolution, weight 1 and bias -50, that
  centres L), conv1-conv5, fc6, fc7 and a throw-away ``fc8_`` (1x1 convolution, 1000 outputs, weights
  N(0, 0.01), bias 1; later replaced by the VOC classifier);
* statistic: per layer, ratio = sqrt(mean(dW^2) / mean(W^2)) over its weights (biases excluded), the
  gradients from a back-propagated N(0, 1) random "top diff" on the last layer's output (a new draw
  every iteration);
* target: the geometric mean of the ratios times ``output_std ** (1 / n_layers)``, where
  ``output_std`` is the mean over output channels of the last layer's standard deviation;
* at most 10 iterations; it stops when every ``|log(ratio) / log(target) - 1| < 0.01``;
* update, layer by layer in a new forward pass: the biases are first multiplied by how much the
  layer's input scale (mean |input|) changed because of the layers before it, then the weights and
  biases by ``sqrt(ratio / target)``.

For a chain of convolutions, ReLUs and max-pools (positively homogeneous) each update multiplies the
network's output by a positive constant and nothing else: the function is kept up to that factor, and
the ratios of all layers become equal (the defining property). ``output_std`` in the target drives
that output factor so that the output's standard deviation approaches 1 over the iterations.

Our models keep BatchNorm as modules and normalise L inside the model as ``(L - 50) / 100``. Here:
BatchNorm is absorbed into the convolution before it and replaced by ``nn.Identity`` (step 1);
``data_l`` is a virtual layer, a scalar gain on the normalised input, whose ratio and conv1's are
computed in Caffe's units (conv1's input there is 100x ours, so its ratio is 100^2 x ours); at the end
the gain is folded into conv1's weights (exact: ``data_l`` stays homogeneous). RGB encoders have no
``data_l`` (Caffe subtracts the mean in the data layer) and their ratios are in our units. The
throw-away ``fc8_`` is a 1x1 convolution on the feature tap, dropped afterwards. The data are the
caller's (the VOC recipe passes trainval images with its training augmentation). ``data_l`` has one
weight, so its ratio is one |Gaussian| per draw: the 1% criterion is rarely met and the loop usually
runs its 10 iterations, in the released code as here.

Supported encoders: stages made of ``nn.Sequential`` containers of convolutions / linear layers,
BatchNorm right after a convolution, ReLU, pooling, dropout and identities, up to the tap (AlexNet-style
chains). Anything else (residual blocks, BatchNorm after a ReLU) is refused: the method is defined for
feed-forward chains ("works best for feed-forward networks", philkr/magic_init README).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from ssl_colorize.models.base import L_SCALE

LOG = logging.getLogger("ssl_colorize.rescale")

#: calibrateGradientRatio's loop: at most 10 iterations, stop when every log-ratio is within 1%.
MAX_ITERATIONS = 10
TOLERANCE = 0.01
#: The throw-away top layer of train_val_nobn_rs.prototxt (``fc8_``): 1000 outputs, N(0, 0.01), bias 1.
TOP_OUTPUTS, TOP_STD, TOP_BIAS = 1000, 0.01, 1.0
#: The name of the virtual input layer (the released prototxt's L-centring convolution).
INPUT_LAYER = "data_l"

PARAMETER_TYPES = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)
_HOMOGENEOUS_TYPES = (nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Identity, nn.Dropout,
                      nn.Flatten)
_BATCHNORM = nn.modules.batchnorm._BatchNorm


@dataclass
class RescaleReport:
    """What the rescaling did: per layer the total factor of its weights and of its bias."""

    layers: list[str]
    weight_factors: dict[str, float]
    bias_factors: dict[str, float]
    iterations: int  # ratio measurements made (the loop's iterations)
    converged: bool  # stopped by the 1% criterion rather than by the iteration limit
    ratios_before: dict[str, float]
    ratios_last: dict[str, float]  # the last measurement (before the last update if not converged)
    output_std_before: float
    output_std_after: float
    images: int
    output_factor: float = 1.0  # the encoder's tap output is multiplied by this (the throw-away top excluded)
    absorbed_batchnorms: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # magic_init's "not homogeneous?" remarks

    def as_dict(self) -> dict:
        return dict(self.__dict__)

    def lines(self) -> list[str]:
        """One line per layer for the run's log."""
        out = [f"rescale ({self.images} images, {self.iterations} iteration(s), "
               f"{'converged' if self.converged else 'stopped at the iteration limit'}; output std "
               f"{self.output_std_before:.4g} -> {self.output_std_after:.4g}; tap features x{self.output_factor:.4g})"]
        for name in self.layers:
            out.append(f"  {name}: weights x{self.weight_factors[name]:.4g}, bias x{self.bias_factors[name]:.4g}, "
                       f"ratio {self.ratios_before[name]:.4g} -> {self.ratios_last[name]:.4g}")
        return out


# ----------------------------------------------------------------------------------------------
# Structure: which encoders, which layers
# ----------------------------------------------------------------------------------------------

def _stages_to(encoder: nn.Module, tap: str) -> list[tuple[str, nn.Module]]:
    stages = []
    for name, stage in encoder.stages():
        stages.append((name, stage))
        if name == tap:
            return stages
    raise ValueError(f"{type(encoder).__name__} has no stage {tap!r}")


def _leaves(module: nn.Module, where: str) -> list[tuple[str, nn.Module]]:
    """Leaf modules of a stage in execution order; ValueError for anything but Sequential containers."""
    if isinstance(module, nn.Sequential):
        return [leaf for name, child in module.named_children() for leaf in _leaves(child, f"{where}.{name}")]
    if isinstance(module, PARAMETER_TYPES + _HOMOGENEOUS_TYPES + (_BATCHNORM,)):
        return [(where, module)]
    raise ValueError(f"{where} is a {type(module).__name__}: the rescaling is defined for feed-forward chains "
                     "of convolutions, BatchNorm, ReLU and pooling")


def unsupported_reason(encoder: nn.Module, tap: str) -> str | None:
    """Why :func:`rescale_encoder_` cannot run on ``encoder`` up to ``tap`` (None: it can)."""
    try:
        _chain(encoder, tap)
    except ValueError as exc:
        return str(exc)
    return None


def _chain(encoder: nn.Module, tap: str) -> list[tuple[str, nn.Module]]:
    """(name, leaf) in execution order up to the tap, after checking that every BatchNorm follows a layer."""
    chain = [leaf for name, stage in _stages_to(encoder, tap) for leaf in _leaves(stage, name)]
    for i, (name, module) in enumerate(chain):
        if isinstance(module, _BATCHNORM) and (i == 0 or not isinstance(chain[i - 1][1], (nn.Conv2d, nn.Linear))):
            raise ValueError(f"{name} does not follow a convolution: it cannot be absorbed into one")
    if not any(isinstance(m, PARAMETER_TYPES) for _, m in chain):
        raise ValueError(f"no convolution or linear layer up to {tap}")
    return chain


def absorb_batchnorm_(encoder: nn.Module, tap: str) -> list[str]:
    """Absorb every BatchNorm (its running statistics, as in eval mode) into the layer before it and
    replace it by ``nn.Identity`` (resources/batch_norm_absorb.py); the function is unchanged.

    Returns the names of the absorbed BatchNorms.
    """
    chain = _chain(encoder, tap)
    absorbed = []
    with torch.no_grad():
        for i, (name, bn) in enumerate(chain):
            if not isinstance(bn, _BATCHNORM):
                continue
            layer = chain[i - 1][1]
            inv_std = torch.rsqrt(bn.running_var.double() + bn.eps)
            gain = inv_std * (bn.weight.double() if bn.affine else 1.0)
            shift = -bn.running_mean.double() * gain + (bn.bias.double() if bn.affine else 0.0)
            if layer.bias is None:
                layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0], dtype=layer.weight.dtype,
                                                      device=layer.weight.device))
            shape = (-1,) + (1,) * (layer.weight.dim() - 1)
            layer.weight.mul_(gain.to(layer.weight.dtype).view(shape))
            layer.bias.copy_((layer.bias.double() * gain + shift).to(layer.bias.dtype))
            _replace(encoder, bn, nn.Identity())
            absorbed.append(name)
    return absorbed


def _replace(root: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Replace every registration of ``old`` under ``root`` (views over the same modules included)."""
    parents = list(root.modules()) + [m for _, stage in root.stages() for m in stage.modules()]  # views too
    for parent in parents:
        for child_name, child in list(parent.named_children()):
            if child is old:
                setattr(parent, child_name, new)


# ----------------------------------------------------------------------------------------------
# The calibration (calibrateGradientRatio)
# ----------------------------------------------------------------------------------------------

def released_top(channels: int, generator: torch.Generator) -> nn.Conv2d:
    """The throw-away ``fc8_`` of train_val_nobn_rs.prototxt: 1x1 conv, 1000 outputs, N(0, 0.01), bias 1."""
    with torch.random.fork_rng(devices=[]):  # the module's own default init must not draw from the global RNG
        top = nn.Conv2d(channels, TOP_OUTPUTS, 1)
    with torch.no_grad():
        top.weight.copy_(torch.randn(top.weight.shape, generator=generator) * TOP_STD)
        top.bias.fill_(TOP_BIAS)
    return top


class _Net:
    """The encoder up to the tap, the virtual input layer (a scalar gain) and the throw-away top."""

    def __init__(self, encoder: nn.Module, tap: str, top: nn.Module, has_input_layer: bool):
        self.encoder, self.tap, self.top = encoder, tap, top
        self.stages = [stage for _, stage in _stages_to(encoder, tap)]
        chain = _chain(encoder, tap)
        self.names = [name for name, m in chain if isinstance(m, PARAMETER_TYPES)] + ["top"]
        self.modules = [m for _, m in chain if isinstance(m, PARAMETER_TYPES)] + [top]
        self.has_input_layer = has_input_layer
        if has_input_layer:
            self.names.insert(0, INPUT_LAYER)
        self.gain = 1.0  # the virtual data_l's weight (Caffe units: 1 at the start)
        # Caffe's units: conv1 sees data_l's output, L - 50 = L_SCALE x our normalised input.
        self.units = {name: 1.0 for name in self.names}
        if has_input_layer:
            self.units[self.names[1]] = L_SCALE ** 2

    def layer_modules(self) -> dict[str, nn.Module]:
        return dict(zip(self.names[1:] if self.has_input_layer else self.names, self.modules))

    def forward(self, x: torch.Tensor, gain: float, track_input: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(conv1's input, top output); with ``track_input`` conv1's input is a leaf that requires grad."""
        h = self.encoder.normalize_input(x) * gain
        if track_input:
            h = h.detach().requires_grad_(True)
        first = h
        for stage in self.stages:
            h = stage(h)
        return first, self.top(h)


def _input_scales(net: _Net, data: torch.Tensor, update=None) -> tuple[dict[str, float], torch.Tensor]:
    """mean |input| of every layer over ``data`` (one forward); ``update(name, module, scale)`` runs in each
    layer's pre-hook before the layer computes (the layer-by-layer update pass). Returns the scales and the
    top output."""
    scales: dict[str, float] = {}
    handles = []
    for name, module in net.layer_modules().items():
        def hook(module, args, name=name):
            scales[name] = float(args[0].abs().mean())
            if update is not None:
                update(name, module, scales[name])
        handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            if net.has_input_layer:
                scales[INPUT_LAYER] = float(data.abs().mean())  # data_l's input: L itself
                if update is not None:
                    update(INPUT_LAYER, None, scales[INPUT_LAYER])
            _, out = net.forward(data, net.gain)
    finally:
        for h in handles:
            h.remove()
    return scales, out


def _output_std(out: torch.Tensor) -> float:
    """Mean over output channels of the standard deviation over images and positions (numpy's std: ddof 0)."""
    flat = out.transpose(0, 1).reshape(out.shape[1], -1)
    return float(flat.double().std(dim=1, unbiased=False).mean())


def gradient_ratios(net: _Net, data: torch.Tensor, generator: torch.Generator, chunk: int = 16) -> dict[str, float]:
    """sqrt(mean(dW^2) / mean(W^2)) per layer (Caffe's units) for one N(0, 1) top diff, summed over images."""
    weights = [m.weight for m in net.modules]
    flags = [w.requires_grad for w in weights]
    grads: list[torch.Tensor | None] = [None] * len(weights)
    gain_grad = 0.0
    try:
        for w in weights:
            w.requires_grad_(True)
        with torch.enable_grad():
            for start in range(0, data.shape[0], chunk):
                x = data[start:start + chunk]
                first, out = net.forward(x, net.gain, track_input=True)
                diff = torch.randn(out.shape, generator=generator).to(out)
                found = torch.autograd.grad((out * diff).sum(), weights + [first])
                grads = [f if g is None else g + f for g, f in zip(grads, found[:-1])]
                if net.has_input_layer:
                    # data_l computes w L + b (L in [0, 100]) and conv1 sees it / L_SCALE here, so
                    # dLoss/dw = sum dLoss/d(conv1 input) * L / L_SCALE.
                    gain_grad += float((found[-1].double() * x.double()).sum()) / L_SCALE
    finally:
        for w, flag in zip(weights, flags):
            w.requires_grad_(flag)
    ratios = {}
    named = dict(zip(net.layer_modules(), grads))
    for name, module in net.layer_modules().items():
        # sqrt(mean(dW^2) / mean(W^2)) = |dW| / |W| (same count)
        g, w = named[name], module.weight.detach()
        ratios[name] = float(torch.linalg.vector_norm(g) / torch.linalg.vector_norm(w)) * net.units[name]
    if net.has_input_layer:  # one weight: |dW| / |W|
        ratios[INPUT_LAYER] = abs(gain_grad) / abs(net.gain)
    for name, r in ratios.items():
        if not (math.isfinite(r) and r > 0):
            raise ValueError(f"rescale: the gradient-to-weight ratio of {name} is {r}: the layer is dead on these images")
    return {name: ratios[name] for name in net.names}


def calibrate_gradient_ratios_(net: _Net, data: torch.Tensor, generator: torch.Generator, *,
                               iterations: int = MAX_ITERATIONS, tolerance: float = TOLERANCE) -> dict:
    """calibrateGradientRatio (philkr/magic_init) on ``net`` in place; returns what it measured and did."""
    names = net.names
    weight_factor = {n: 1.0 for n in names}
    bias_factor = {n: 1.0 for n in names}
    bottom_scale, out = _input_scales(net, data)
    output_std = std_before = _output_std(out)
    ratios_before = ratios = None
    converged, measured, notes = False, 0, []
    for _ in range(iterations):
        ratios = gradient_ratios(net, data, generator)
        measured += 1
        ratios_before = ratios_before or dict(ratios)
        log_ratios = torch.tensor([math.log(ratios[n]) for n in names], dtype=torch.float64)
        log_target = float(log_ratios.mean()) + math.log(output_std) / len(names)
        if bool(((log_ratios / log_target - 1).abs() < tolerance).all()):
            converged = True
            break

        def update(name, module, current, ratios=ratios, log_target=log_target):
            adj = current / bottom_scale[name]  # the input's scale change from the layers below
            bottom_scale[name] = current
            scale = math.sqrt(math.exp(math.log(ratios[name]) - log_target))
            weight_factor[name] *= scale
            bias_factor[name] *= adj * scale
            if module is None:  # data_l: weight and bias (-50 w) scale together, adj is 1 (raw data)
                net.gain *= scale
                return
            module.weight.mul_(scale)
            if module.bias is not None:
                module.bias.mul_(adj * scale)

        _, out = _input_scales(net, data, update)
        new_std = _output_std(out)
        if abs(math.log(output_std) - math.log(new_std)) > 0.25:
            # magic_init prints a warning here; for a homogeneous chain it is expected while output_std
            # (part of the target) pulls the output's scale towards 1.
            notes.append(f"output std {output_std:.4g} -> {new_std:.4g}")
        output_std = new_std
    return dict(weight_factors=weight_factor, bias_factors=bias_factor, iterations=measured, converged=converged,
                ratios_before=ratios_before, ratios_last=ratios, output_std_before=std_before,
                output_std_after=output_std, notes=notes)


def rescale_encoder_(encoder: nn.Module, tap: str, batches: Iterable[torch.Tensor], *,
                     iterations: int = MAX_ITERATIONS, tolerance: float = TOLERANCE, seed: int = 0,
                     top: nn.Module | None = None) -> RescaleReport:
    """The released post-processing of ``encoder`` up to ``tap``, in place: BatchNorm absorbed, then the
    gradient-ratio calibration (``magic_init.py -cs``) on ``batches`` (model-input tensors, concatenated:
    the statistics of one batch, as NIT=1). ``top``: the throw-away last layer (default: the released
    ``fc8_``, seeded by ``seed``); the N(0, 1) top diffs are seeded by ``seed`` too. The encoder is left
    in eval mode. ValueError for an encoder that is not a feed-forward chain (:func:`unsupported_reason`).
    """
    why = unsupported_reason(encoder, tap)
    if why:
        raise ValueError(f"rescale: {why}")
    batches = [b.float() for b in batches]
    if not batches or sum(b.shape[0] for b in batches) < 1:
        raise ValueError("rescale: no images")
    data = torch.cat(batches, dim=0)
    encoder.eval()
    absorbed = absorb_batchnorm_(encoder, tap)
    generator = torch.Generator().manual_seed(seed)
    if top is None:
        top = released_top(encoder.taps[tap].channels, generator)
    device = next(encoder.parameters()).device
    data, top = data.to(device), top.to(device).eval()
    net = _Net(encoder, tap, top, has_input_layer=encoder.input_space == "L")
    result = calibrate_gradient_ratios_(net, data, generator, iterations=iterations, tolerance=tolerance)
    if net.has_input_layer:  # fold data_l's gain into conv1: conv1(g x) = (g W) x, its bias untouched
        with torch.no_grad():
            net.modules[0].weight.mul_(net.gain)
    output_factor = math.prod(f for name, f in result["weight_factors"].items() if name != "top")
    report = RescaleReport(layers=list(net.names), images=int(data.shape[0]), output_factor=output_factor,
                           absorbed_batchnorms=absorbed, **result)
    for line in report.notes:
        LOG.debug("rescale: %s", line)
    return report


def encoder_output_factor(report: RescaleReport) -> float:
    """The factor the rescaling multiplied the encoder's tap output by (the throw-away top excluded)."""
    return math.prod(f for name, f in report.weight_factors.items() if name != "top")
