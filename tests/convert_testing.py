"""Fixture writers and reference forward passes for tests/test_convert.py.

Each writer produces a file in a released format with random weights under the released key names and
shapes (from the released layer lists: richzhang/colorization colorizers/eccv16.py,
models/colorization_deploy_v2.prototxt, models/alexnet_deploy_lab.prototxt; VISSL's alexnet_colorization
and resnext trunks). Each reference forward is written here from those same layer lists with
torch.nn.functional, independent of ssl_colorize.models.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ssl_colorize.convert.caffe_schema import write_caffemodel

# The colorization network: per block, the convs' (in, out, stride, dilation); 3x3, padding = dilation.
COLOR_BLOCKS = [
    [(1, 64, 1, 1), (64, 64, 2, 1)],
    [(64, 128, 1, 1), (128, 128, 2, 1)],
    [(128, 256, 1, 1), (256, 256, 1, 1), (256, 256, 2, 1)],
    [(256, 512, 1, 1), (512, 512, 1, 1), (512, 512, 1, 1)],
    [(512, 512, 1, 2), (512, 512, 1, 2), (512, 512, 1, 2)],
    [(512, 512, 1, 2), (512, 512, 1, 2), (512, 512, 1, 2)],
    [(512, 512, 1, 1), (512, 512, 1, 1), (512, 512, 1, 1)],
]
EPS = 1e-5


def _conv_weight(gen: torch.Generator, c_out: int, c_in: int, k: int) -> torch.Tensor:
    # He-scaled so that activations stay O(1) through the whole net.
    return torch.randn(c_out, c_in, k, k, generator=gen) * (2.0 / (c_in * k * k)) ** 0.5


def _bn(gen: torch.Generator, c: int, negative: bool = True) -> dict[str, torch.Tensor]:
    gamma = torch.rand(c, generator=gen) + 0.5
    if negative:  # some negative scales: the converter must carry their sign
        gamma[::7] *= -1
    return {"weight": gamma, "bias": torch.randn(c, generator=gen) * 0.1,
            "running_mean": torch.randn(c, generator=gen) * 0.1,
            "running_var": torch.rand(c, generator=gen) + 0.5}


# ------------------------------------------------------------------------------------- eccv16
def eccv16_state(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for block, convs in enumerate(COLOR_BLOCKS, start=1):
        for i, (c_in, c_out, _, _) in enumerate(convs):
            state[f"model{block}.{2 * i}.weight"] = _conv_weight(gen, c_out, c_in, 3)
            state[f"model{block}.{2 * i}.bias"] = torch.randn(c_out, generator=gen) * 0.1
        for key, value in _bn(gen, convs[-1][1]).items():
            state[f"model{block}.{2 * len(convs)}.{key}"] = value
        state[f"model{block}.{2 * len(convs)}.num_batches_tracked"] = torch.tensor(0)
    state["model8.0.weight"] = torch.randn(512, 256, 4, 4, generator=gen) * (2.0 / (512 * 4)) ** 0.5
    state["model8.0.bias"] = torch.randn(256, generator=gen) * 0.1
    for index, (c_in, c_out, k) in ((2, (256, 256, 3)), (4, (256, 256, 3)), (6, (256, 313, 1))):
        state[f"model8.{index}.weight"] = _conv_weight(gen, c_out, c_in, k)
        state[f"model8.{index}.bias"] = torch.randn(c_out, generator=gen) * 0.1
    state["model_out.weight"] = torch.randn(2, 313, 1, 1, generator=gen)
    return state


def eccv16_reference(state: dict[str, torch.Tensor], lightness: torch.Tensor) -> torch.Tensor:
    """The port's forward up to model8 (its 313 logits, before softmax / model_out)."""
    h = (lightness - 50.0) / 100.0
    for block, convs in enumerate(COLOR_BLOCKS, start=1):
        for i, (_, _, stride, dilation) in enumerate(convs):
            h = F.relu(F.conv2d(h, state[f"model{block}.{2 * i}.weight"], state[f"model{block}.{2 * i}.bias"],
                                stride=stride, padding=dilation, dilation=dilation))
        bn = f"model{block}.{2 * len(convs)}"
        h = F.batch_norm(h, state[f"{bn}.running_mean"], state[f"{bn}.running_var"], state[f"{bn}.weight"],
                         state[f"{bn}.bias"], training=False, eps=EPS)
    h = F.relu(F.conv_transpose2d(h, state["model8.0.weight"], state["model8.0.bias"], stride=2, padding=1))
    h = F.relu(F.conv2d(h, state["model8.2.weight"], state["model8.2.bias"], padding=1))
    h = F.relu(F.conv2d(h, state["model8.4.weight"], state["model8.4.bias"], padding=1))
    return F.conv2d(h, state["model8.6.weight"], state["model8.6.bias"])


# ------------------------------------------------------------------------------- caffe colornet
def caffe_colornet_layers(seed: int = 0) -> list[tuple[str, str, list[str], list[np.ndarray]]]:
    """colorization_deploy_v2's weighted layers: (name, type, bottoms, blobs)."""
    gen = torch.Generator().manual_seed(seed)
    layers = []
    bottom = "data_l"
    for block, convs in enumerate(COLOR_BLOCKS, start=1):
        for i, (c_in, c_out, _, _) in enumerate(convs, start=1):
            name = "bw_conv1_1" if (block, i) == (1, 1) else f"conv{block}_{i}"
            weight = _conv_weight(gen, c_out, c_in, 3)
            if (block, i) == (1, 1):
                weight = weight / 100.0  # Caffe's input is L - 50, not (L - 50) / 100
            layers.append((name, "Convolution", [bottom], [weight.numpy(), (torch.randn(c_out, generator=gen) * 0.1).numpy()]))
            bottom = f"conv{block}_{i}"
        c = convs[-1][1]
        factor = float(torch.rand(1, generator=gen) * 900 + 100)  # the moving-average normaliser
        mean = torch.randn(c, generator=gen) * 0.1
        var = torch.rand(c, generator=gen) + 0.5
        layers.append((f"{bottom}norm", "BatchNorm", [bottom],
                       [(mean * factor).numpy(), (var * factor).numpy(), np.array([factor], dtype=np.float32)]))
        bottom = f"{bottom}norm"
    deconv = torch.randn(512, 256, 4, 4, generator=gen) * (2.0 / (512 * 4)) ** 0.5
    layers.append(("conv8_1", "Deconvolution", [bottom], [deconv.numpy(), (torch.randn(256, generator=gen) * 0.1).numpy()]))
    for name, bottom, c_in, c_out, k in (("conv8_2", "conv8_1", 256, 256, 3), ("conv8_3", "conv8_2", 256, 256, 3),
                                         ("conv8_313", "conv8_3", 256, 313, 1)):
        layers.append((name, "Convolution", [bottom],
                       [_conv_weight(gen, c_out, c_in, k).numpy(), (torch.randn(c_out, generator=gen) * 0.1).numpy()]))
    layers.append(("conv8_313_rh", "Scale", ["conv8_313"], [np.array([2.606], dtype=np.float32)]))
    layers.append(("class8_ab", "Convolution", ["class8_313_rh"],
                   [torch.randn(2, 313, 1, 1, generator=gen).numpy(), np.zeros(2, dtype=np.float32)]))
    return layers


def caffe_colornet_reference(layers, lightness: torch.Tensor) -> torch.Tensor:
    """colorization_deploy_v2 on data_l = L - 50, up to conv8_313."""
    blobs = {name: [torch.from_numpy(b) for b in weights] for name, _, _, weights in layers}
    h = lightness - 50.0
    for block, convs in enumerate(COLOR_BLOCKS, start=1):
        for i, (_, _, stride, dilation) in enumerate(convs, start=1):
            w, b = blobs["bw_conv1_1" if (block, i) == (1, 1) else f"conv{block}_{i}"]
            h = F.relu(F.conv2d(h, w, b, stride=stride, padding=dilation, dilation=dilation))
        mean, var, factor = blobs[f"conv{block}_{len(convs)}norm"]
        h = (h - (mean / factor).view(1, -1, 1, 1)) / torch.sqrt((var / factor).view(1, -1, 1, 1) + EPS)
    h = F.relu(F.conv_transpose2d(h, *blobs["conv8_1"], stride=2, padding=1))
    h = F.relu(F.conv2d(h, *blobs["conv8_2"], padding=1))
    h = F.relu(F.conv2d(h, *blobs["conv8_3"], padding=1))
    return F.conv2d(h, *blobs["conv8_313"])


# ------------------------------------------------------------------------------- caffe alexnet
# alexnet_deploy_lab: name -> (out, in per group, kernel, stride, pad, groups, pool after)
ALEXNET = [
    ("conv1", 96, 1, 11, 4, 0, 1, True),
    ("conv2", 256, 48, 5, 1, 2, 2, True),
    ("conv3", 384, 256, 3, 1, 1, 1, False),
    ("conv4", 384, 192, 3, 1, 1, 2, False),
    ("conv5", 256, 192, 3, 1, 1, 2, True),
    ("fc6", 4096, 256, 6, 1, 0, 1, False),
    ("fc7", 4096, 4096, 1, 1, 0, 1, False),
]


def caffe_alexnet_layers(seed: int = 0, with_bn: bool = False):
    """alexnet_deploy_lab's weighted layers. ``with_bn``: a BatchNorm reading each conv (the training
    net's layout, before the release folded them) and fc6 stored as an InnerProduct (4096 x 9216)."""
    gen = torch.Generator().manual_seed(seed)
    layers = [("data_l", "Convolution", ["img_l"], [np.ones((1, 1, 1, 1), np.float32), np.array([-50.0], np.float32)])]
    bottom = "data_l"
    for name, c_out, c_in, k, _, _, _, pooled in ALEXNET:
        weight = _conv_weight(gen, c_out, c_in, k)
        if name == "conv1":
            weight = weight / 50.0  # inputs of +-50
        kind = "Convolution"
        if with_bn and name == "fc6":
            weight, kind = weight.reshape(c_out, -1), "InnerProduct"
        layers.append((name, kind, [bottom], [weight.numpy(), (torch.randn(c_out, generator=gen) * 0.1).numpy()]))
        if with_bn:
            factor = 999.98
            mean, var = torch.randn(c_out, generator=gen) * 0.1, torch.rand(c_out, generator=gen) + 0.5
            layers.append((f"{name}_bn", "BatchNorm", [name], [(mean * factor).numpy(), (var * factor).numpy(),
                                                              np.array([factor], np.float32)]))
        bottom = {"conv1": "pool1", "conv2": "pool2", "conv5": "pool5"}.get(name, name)
    return layers


def caffe_alexnet_reference(layers, lightness: torch.Tensor) -> dict[str, torch.Tensor]:
    """alexnet_deploy_lab at 227: the post-ReLU outputs of conv1 ... fc7 (Caffe pools round up)."""
    blobs = {name: [torch.from_numpy(b) for b in weights] for name, _, _, weights in layers}
    h = F.conv2d(lightness, *blobs["data_l"])
    out = {}
    for name, c_out, c_in, k, stride, pad, groups, pooled in ALEXNET:
        weight, bias = blobs[name]
        h = F.conv2d(h, weight.reshape(c_out, c_in, k, k), bias, stride=stride, padding=pad, groups=groups)
        if f"{name}_bn" in blobs:
            mean, var, factor = blobs[f"{name}_bn"]
            h = (h - (mean / factor).view(1, -1, 1, 1)) / torch.sqrt((var / factor).view(1, -1, 1, 1) + EPS)
        h = F.relu(h)
        out[name] = h
        if pooled:
            h = F.max_pool2d(h, 3, stride=2, ceil_mode=True)
    return out


# -------------------------------------------------------------------------------------- VISSL
VISSL_ALEXNET = {0: ALEXNET[0], 2: ALEXNET[1], 4: ALEXNET[2], 5: ALEXNET[3], 6: ALEXNET[4]}


def vissl_alexnet_trunk(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    trunk = {}
    for index, (name, c_out, c_in, k, _, _, _, _) in VISSL_ALEXNET.items():
        weight = _conv_weight(gen, c_out, c_in, k)
        trunk[f"_feature_blocks.{index}.0.weight"] = weight / 50.0 if name == "conv1" else weight
        trunk[f"_feature_blocks.{index}.0.bias"] = torch.randn(c_out, generator=gen) * 0.1
        for key, value in _bn(gen, c_out).items():
            trunk[f"_feature_blocks.{index}.1.{key}"] = value
        trunk[f"_feature_blocks.{index}.1.num_batches_tracked"] = torch.tensor(5)
    return trunk


def vissl_alexnet_reference(trunk, lightness: torch.Tensor) -> dict[str, torch.Tensor]:
    """VISSL's AlexNetColorization on L - 50 (floor-mode pools): post-ReLU conv1 ... conv5."""
    h = lightness - 50.0
    out = {}
    for index, (name, _, _, _, stride, pad, groups, pooled) in VISSL_ALEXNET.items():
        p = f"_feature_blocks.{index}"
        h = F.conv2d(h, trunk[f"{p}.0.weight"], trunk[f"{p}.0.bias"], stride=stride, padding=pad, groups=groups)
        h = F.relu(F.batch_norm(h, trunk[f"{p}.1.running_mean"], trunk[f"{p}.1.running_var"], trunk[f"{p}.1.weight"],
                                trunk[f"{p}.1.bias"], training=False, eps=EPS))
        out[name] = h
        if pooled:
            h = F.max_pool2d(h, 3, stride=2)
    return out


RESNET_STAGES = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 1))  # (width, blocks, stride); layer4 stride 1


def vissl_resnet_trunk(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    trunk = {"_feature_blocks.conv1.weight": _conv_weight(gen, 64, 1, 7) / 50.0}
    for key, value in _bn(gen, 64, negative=False).items():
        trunk[f"_feature_blocks.bn1.{key}"] = value
    c_in = 64
    for stage, (width, blocks, _) in enumerate(RESNET_STAGES, start=1):
        for block in range(blocks):
            p = f"_feature_blocks.layer{stage}.{block}"
            shapes = {"conv1": (width, c_in, 1), "conv2": (width, width, 3), "conv3": (width * 4, width, 1)}
            for conv, (c_out, cin, k) in shapes.items():
                trunk[f"{p}.{conv}.weight"] = _conv_weight(gen, c_out, cin, k)
                bn = _bn(gen, c_out, negative=False)
                if conv == "conv3":  # keep the residual sums O(1)
                    bn["weight"] = bn["weight"] * 0.2
                for key, value in bn.items():
                    trunk[f"{p}.bn{conv[-1]}.{key}"] = value
            if block == 0:
                trunk[f"{p}.downsample.0.weight"] = _conv_weight(gen, width * 4, c_in, 1)
                for key, value in _bn(gen, width * 4, negative=False).items():
                    trunk[f"{p}.downsample.1.{key}"] = value
            c_in = width * 4
    return trunk


def vissl_resnet_reference(trunk, lightness: torch.Tensor, res5_dilations=(1, 1, 1)) -> dict[str, torch.Tensor]:
    """torchvision's Bottleneck ResNet-50 on L - 50 (VISSL's LAYER4_STRIDE 1): conv1 and res2 ... res5.

    ``res5_dilations``: the 3x3 dilation of each res5 block (VISSL's and ours: none).
    """
    def bn(h, p):
        return F.batch_norm(h, trunk[f"{p}.running_mean"], trunk[f"{p}.running_var"], trunk[f"{p}.weight"],
                            trunk[f"{p}.bias"], training=False, eps=EPS)

    h = F.relu(bn(F.conv2d(lightness - 50.0, trunk["_feature_blocks.conv1.weight"], stride=2, padding=3),
                  "_feature_blocks.bn1"))
    out = {"conv1": h}
    h = F.max_pool2d(h, 3, stride=2, padding=1)
    for stage, (_, blocks, stride) in enumerate(RESNET_STAGES, start=1):
        for block in range(blocks):
            p = f"_feature_blocks.layer{stage}.{block}"
            s = stride if block == 0 else 1
            d = res5_dilations[block] if stage == 4 else 1
            y = F.relu(bn(F.conv2d(h, trunk[f"{p}.conv1.weight"]), f"{p}.bn1"))
            y = F.relu(bn(F.conv2d(y, trunk[f"{p}.conv2.weight"], stride=s, padding=d, dilation=d), f"{p}.bn2"))
            y = bn(F.conv2d(y, trunk[f"{p}.conv3.weight"]), f"{p}.bn3")
            shortcut = h
            if block == 0:
                shortcut = bn(F.conv2d(h, trunk[f"{p}.downsample.0.weight"], stride=s), f"{p}.downsample.1")
            h = F.relu(y + shortcut)
        out[f"res{stage + 1}"] = h
    return out


def assert_close(ours: torch.Tensor, reference: torch.Tensor, tol: float = 1e-4) -> None:
    """Equal to ``tol``, relative to the reference's scale (random nets can reach values of a few tens)."""
    assert ours.shape == reference.shape, (ours.shape, reference.shape)
    scale = max(1.0, float(reference.abs().max()))
    error = float((ours - reference).abs().max())
    assert error <= tol * scale, f"max |ours - reference| = {error:.3g} for values up to {scale:.3g}"


def write_caffe(path, layers) -> None:
    write_caffemodel(path, layers)
