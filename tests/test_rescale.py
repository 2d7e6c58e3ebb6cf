"""Krähenbühl et al.'s between-layer rescaling (ssl_colorize.engine.rescale) on a tiny AlexNet-like chain.

What magic_init's calibrateGradientRatio promises, checked against statistics computed here
independently (plain autograd, in Caffe's units): after an update the gradient-to-weight ratios of all
layers are equal for the top diff it measured, and the network's function is kept up to one positive
factor on its output (conv / ReLU / max-pool chains are positively homogeneous).
"""

import math
from collections import OrderedDict

import pytest
import torch
from torch import nn

from ssl_colorize.engine.rescale import (
    absorb_batchnorm_, rescale_encoder_, unsupported_reason,
)
from ssl_colorize.models.base import Encoder, Tap


def block(c_in, c_out, k, groups=1, bn="after_conv"):
    layers = OrderedDict(conv=nn.Conv2d(c_in, c_out, k, padding=k // 2, groups=groups))
    if bn == "after_conv":
        layers["bn"] = nn.BatchNorm2d(c_out, affine=False)
    layers["relu"] = nn.ReLU(inplace=True)
    if bn == "after_relu":  # colornet's placement: cannot be absorbed into the convolution
        layers["bn"] = nn.BatchNorm2d(c_out, affine=False)
    return nn.Sequential(layers)


class Tiny(Encoder):
    """conv1 - pool - conv2 (grouped) - pool - fc6 (a 4x4 conv to 1x1), BatchNorm after each conv."""

    def __init__(self, space="L", bn="after_conv"):
        super().__init__(input_space=space)
        self.conv1 = block(self.in_chans, 8, 3, bn=bn)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = block(8, 16, 3, groups=2, bn=bn)
        self.pool2 = nn.MaxPool2d(2)
        self.fc6 = nn.Sequential(OrderedDict(conv=nn.Conv2d(16, 32, 4), bn=nn.BatchNorm2d(32, affine=False),
                                             relu=nn.ReLU(inplace=True)))
        self.stage_names = ("conv1", "pool1", "conv2", "pool2", "fc6")
        self.taps = {"conv1": Tap(8, 1), "conv2": Tap(16, 2), "fc6": Tap(32, 16)}
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():  # statistics far from the identity, as after pretraining
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.copy_(torch.randn(m.num_features, generator=generator))
                    m.running_var.copy_(torch.rand(m.num_features, generator=generator) * 3 + 0.2)
        self.eval()


def images(space, n=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1 if space == "L" else 3, 16, 16, generator=generator)
    return x * 100 if space == "L" else x


def top_layer(channels=32, outputs=64, seed=3):
    top = nn.Conv2d(channels, outputs, 1)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        top.weight.copy_(torch.randn(top.weight.shape, generator=generator) * 0.01)
        top.bias.fill_(1.0)
    return top


def caffe_ratios(encoder, top, x, diff, input_gain=None):
    """sqrt(mean(dW^2) / mean(W^2)) per layer for the top diff ``diff``, in the released net's units:
    data_l computes g L - 50 g (L in [0, 100]) and conv1 reads it, so conv1's Caffe weights are ours
    / (100 g). Written without ssl_colorize.engine.rescale."""
    convs = [m for m in encoder.modules() if isinstance(m, nn.Conv2d)] + [top]
    weights = [c.weight.detach().clone().requires_grad_(True) for c in convs]
    names = ["conv1", "conv2", "fc6", "top"]
    data_l = None
    if input_gain is not None:
        data_l = torch.tensor(float(input_gain), dtype=torch.float64, requires_grad=True)
        caffe_conv1 = (weights[0].detach().double() / (100 * input_gain)).requires_grad_(True)
        h = data_l * x.double() - 50 * input_gain  # data_l: weight g, and its own bias (-50 g) as a constant
        h = nn.functional.conv2d(h, caffe_conv1, convs[0].bias.double(), padding=1)
    else:
        h = nn.functional.conv2d(encoder.normalize_input(x).double(), weights[0].double(), convs[0].bias.double(),
                                 padding=1)
    h = encoder.pool1(torch.relu(h))
    h = nn.functional.conv2d(h, weights[1].double(), convs[1].bias.double(), padding=1, groups=2)
    h = encoder.pool2(torch.relu(h))
    h = torch.relu(nn.functional.conv2d(h, weights[2].double(), convs[2].bias.double()))
    out = nn.functional.conv2d(h, weights[3].double(), convs[3].bias.double())
    leaves = [caffe_conv1 if data_l is not None else weights[0]] + weights[1:]
    grads = torch.autograd.grad((out * diff.double()).sum(), leaves + ([data_l] if data_l is not None else []))
    ratios = {n: float((g.pow(2).mean() / w.detach().double().pow(2).mean()).sqrt())
              for n, g, w in zip(names, grads, leaves)}
    if data_l is not None:
        ratios["data_l"] = abs(float(grads[-1])) / abs(input_gain)
    return ratios


def test_absorbing_batchnorm_keeps_the_function():
    encoder = Tiny()
    x = images("L")
    before = encoder.forward_taps(x, ["fc6"])["fc6"]
    absorbed = absorb_batchnorm_(encoder, "fc6")
    assert absorbed == ["conv1.bn", "conv2.bn", "fc6.bn"]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in encoder.modules())
    torch.testing.assert_close(encoder.forward_taps(x, ["fc6"])["fc6"], before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("space", ["L", "rgb"])
def test_one_update_equalises_the_ratios_it_measured_and_keeps_the_function(space):
    encoder, x, top = Tiny(space), images(space), top_layer()
    before = encoder.forward_taps(x, ["fc6"])["fc6"].detach()
    seed = 5
    report = rescale_encoder_(encoder, "fc6", [x], iterations=1, seed=seed, top=top)
    assert report.iterations == 1 and report.images == 16
    expected = (["data_l"] if space == "L" else []) + ["conv1.conv", "conv2.conv", "fc6.conv", "top"]
    assert report.layers == expected
    # the function is kept: the tap is multiplied by one positive factor, the product of the layers'
    after = encoder.forward_taps(x, ["fc6"])["fc6"].detach()
    assert report.output_factor == pytest.approx(math.prod(report.weight_factors[n] for n in expected[:-1]))
    torch.testing.assert_close(after, before * report.output_factor, rtol=1e-4, atol=1e-5 * after.abs().max())
    # biases follow the scale of their input (the adj of calibrateGradientRatio): each layer's bias
    # factor is the product of its own and all earlier weight factors
    running = 1.0
    for name in expected:
        running *= report.weight_factors[name]
        assert report.bias_factors[name] == pytest.approx(running, rel=1e-4)
    # the defining property: for the top diff it measured (the first N(0, 1) draw of Generator(seed)),
    # every layer's ratio is now the same
    with torch.no_grad():
        out_shape = top(encoder.forward_taps(x, ["fc6"])["fc6"]).shape
    diff = torch.randn(out_shape, generator=torch.Generator().manual_seed(seed))
    gain = report.weight_factors["data_l"] if space == "L" else None
    ratios = caffe_ratios(encoder, top, x, diff, input_gain=gain)
    values = list(ratios.values())
    assert max(values) / min(values) == pytest.approx(1.0, abs=1e-3), ratios
    # ... while before the update they were far apart
    assert max(report.ratios_before.values()) / min(report.ratios_before.values()) > 5


def rms_ratios(encoder, top, x, draws=12, seed=11):
    """The ratios' root mean square over ``draws`` top diffs: the statistic without one draw's noise."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        shape = top(encoder.forward_taps(x, ["fc6"])["fc6"]).shape
    total = {}
    for _ in range(draws):
        for name, r in caffe_ratios(encoder, top, x, torch.randn(shape, generator=generator)).items():
            total[name] = total.get(name, 0.0) + r * r / draws
    return {name: math.sqrt(v) for name, v in total.items()}


def spread(ratios):
    return max(ratios.values()) / min(ratios.values())


def test_the_full_calibration_evens_the_ratios_out_and_pulls_the_output_std_to_one():
    torch.manual_seed(0)
    encoder = Tiny("rgb")
    torch.manual_seed(0)
    absorbed = Tiny("rgb")  # the same weights, BatchNorm absorbed: the statistic is defined on those
    absorb_batchnorm_(absorbed, "fc6")
    x, top = images("rgb"), top_layer()
    before = rms_ratios(absorbed, top, x)
    report = rescale_encoder_(encoder, "fc6", [x[:8], x[8:]], seed=0, top=top)  # batches are concatenated
    assert report.iterations == 10 or report.converged
    after = rms_ratios(encoder, top, x)
    # one draw's noise keeps magic_init's 1% criterion out of reach on a net this small; on average
    # over draws the ratios are within a small factor, where they were spread over more than 50
    assert spread(before) > 50 and spread(after) < 2.5, (before, after)
    # target = geometric mean x output_std ** (1 / n): each iteration halves log(output std)
    assert report.output_std_before < 0.01 and abs(math.log(report.output_std_after)) < 0.02
    assert not any(isinstance(m, nn.BatchNorm2d) for m in encoder.modules())


def test_only_feed_forward_chains_are_rescaled():
    assert unsupported_reason(Tiny(), "fc6") is None
    colornet_like = Tiny(bn="after_relu")
    assert "does not follow a convolution" in unsupported_reason(colornet_like, "fc6")

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            return x + self.conv(x)

    residual = Tiny()
    residual.pool1 = nn.Sequential(Residual(), nn.MaxPool2d(2))
    assert "Residual" in unsupported_reason(residual, "fc6")
    with pytest.raises(ValueError, match="feed-forward"):
        rescale_encoder_(residual, "fc6", [images("L")])
