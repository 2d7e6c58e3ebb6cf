"""The three linear-probe protocols (docs/protocols.md section 4, docs/linear-probes.md) against
independent computations written here: naive loops over the released formulas and hand-computed
cases, for every AlexNet and ResNet-50 probe tap; per-channel normalisation; the bias learning rate.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ssl_colorize.benchmarks import linear_probe
from ssl_colorize.heads.probe import MultiTapProbe
from ssl_colorize.heads.probe_pool import caffe_resize, pool_features
from ssl_colorize.models import create_model

from test_probe import make_imagefolder

# Map sizes at the card's crop (227 AlexNets, 224 ResNet-50) and the published grids per tap.
ALEXNET_MAPS = {"conv1": 55, "conv2": 27, "conv3": 13, "conv4": 13, "conv5": 13}
TORCHVISION_ALEXNET_MAPS = {"conv1": 56, "conv2": 27, "conv3": 13, "conv4": 13, "conv5": 13}
ALEXNET_GRIDS = {"conv1": 10, "conv2": 6, "conv3": 5, "conv4": 5, "conv5": 6}
RESNET_MAPS = {"conv1": 112, "res2": 56, "res3": 28, "res4": 14, "res5": 14}
RESNET_GRIDS = {"conv1": 12, "res2": 6, "res3": 4, "res4": 3, "res5": 2}
# Goyal et al. / VISSL: (kernel, stride, padding).
ALEXNET_GOYAL = {"conv1": (19, 4, 0), "conv2": (12, 3, 0), "conv3": (9, 1, 0), "conv4": (9, 1, 0), "conv5": (8, 1, 0)}
RESNET_GOYAL = {"conv1": (10, 10, 4), "res2": (16, 8, 0), "res3": (13, 5, 0), "res4": (8, 3, 0), "res5": (12, 2, 0)}

CASES = (
    [("alexnet_lab", tap, size, ALEXNET_GRIDS[tap], ALEXNET_GOYAL[tap]) for tap, size in ALEXNET_MAPS.items()]
    + [("alexnet_rgb_torchvision", tap, size, ALEXNET_GRIDS[tap], ALEXNET_GOYAL[tap])
       for tap, size in TORCHVISION_ALEXNET_MAPS.items()]
    + [("resnet50_lab", tap, size, RESNET_GRIDS[tap], RESNET_GOYAL[tap]) for tap, size in RESNET_MAPS.items()]
)


# ----------------------------------------------------------------------------------------------
# Independent references
# ----------------------------------------------------------------------------------------------

def caffe_resize_loops(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Caffe's Resize layer (height / width given, crop 0) as its Forward_cpu loops run: along x a
    tent blur of radius R = 1 / scale when scale < 1, then linear sampling at i / scale; then along y."""

    def one_axis(rows: list[list[float]], out: int) -> list[list[float]]:
        size = len(rows[0])
        scale = (out - 1.0) / (size - 1)
        if scale < 1:
            radius = 1.0 / max(scale, 0.01)
            whole = int(radius)
            norm = (2 * whole + 1) * radius - whole * (whole + 1)
            blurred = []
            for row in rows:
                new = []
                for x in range(size):
                    total = radius * row[x]
                    r = 1
                    while r < radius:
                        left = row[x - r] if x - r >= 0 else row[0]
                        right = row[x + r] if x + r < size else row[size - 1]
                        total += (radius - r) * (left + right)
                        r += 1
                    new.append(total / norm)
                blurred.append(new)
            rows = blurred
        result = []
        for row in rows:
            new = []
            for i in range(out):
                p = min(max(i / scale, 0.0), size - 1.0)
                i0 = int(p)
                i1 = min(i0 + 1, size - 1)
                w = i1 - p
                new.append(w * row[i0] + (1 - w) * row[i1])
            result.append(new)
        return result

    along_x = one_axis(image.tolist(), out_w)  # H rows of out_w
    columns = [list(c) for c in zip(*along_x)]  # out_w columns of H
    along_y = one_axis(columns, out_h)  # out_w rows of out_h
    return np.array(along_y).T


def avg_pool_loops(image: np.ndarray, kernel: int, stride: int, padding: int) -> np.ndarray:
    """Average over kernel x kernel windows of the zero-padded map, padding counted in the mean."""
    size = image.shape[0]
    padded = np.zeros((size + 2 * padding, size + 2 * padding))
    padded[padding:padding + size, padding:padding + size] = image
    out = (size + 2 * padding - kernel) // stride + 1
    result = np.zeros((out, out))
    for i in range(out):
        for j in range(out):
            result[i, j] = padded[i * stride:i * stride + kernel, j * stride:j * stride + kernel].sum() / kernel ** 2
    return result


def max_pool_loops(image: np.ndarray, grid: int) -> np.ndarray:
    """Adaptive max pooling: window i covers [floor(i n / g), ceil((i + 1) n / g))."""
    size = image.shape[0]
    bounds = [(math.floor(i * size / grid), math.ceil((i + 1) * size / grid)) for i in range(grid)]
    return np.array([[image[r0:r1, c0:c1].max() for c0, c1 in bounds] for r0, r1 in bounds])


# ----------------------------------------------------------------------------------------------
# Pooling of every tap
# ----------------------------------------------------------------------------------------------

def test_caffe_resize_hand_case():
    # 3 -> 2: scale 1/2, tent radius 2, weights (1, 2, 1) / 4 with edge replication; samples at 0 and 2.
    x = torch.tensor([[1.0, 2.0, 4.0]], dtype=torch.float64).reshape(1, 1, 1, 3)
    out = caffe_resize(x, (1, 2))
    torch.testing.assert_close(out.flatten(), torch.tensor([(3 * 1 + 2) / 4, (2 + 3 * 4) / 4], dtype=torch.float64))
    # Same size: the identity (scale 1, no blur).
    y = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(caffe_resize(y, (5, 5)), y)


@pytest.mark.parametrize("encoder,tap,size,grid,goyal", CASES)
def test_each_protocol_matches_the_naive_loops(encoder, tap, size, grid, goyal):
    channels = 2  # the pooling is per channel: two are enough, and keep the loops quick
    x = torch.randn(3, channels, size, size, generator=torch.Generator().manual_seed(size + grid))
    expected = {
        "zhang": [[caffe_resize_loops(x[n, c].double().numpy(), grid, grid) for c in range(channels)] for n in range(3)],
        "goyal": [[avg_pool_loops(x[n, c].double().numpy(), *goyal) for c in range(channels)] for n in range(3)],
        "max": [[max_pool_loops(x[n, c].double().numpy(), grid) for c in range(channels)] for n in range(3)],
    }
    for protocol, reference in expected.items():
        features = pool_features(x, tap, protocol, encoder)
        reference = torch.tensor(np.array(reference), dtype=torch.float32)
        assert reference.shape[-1] == grid, (protocol, reference.shape)
        assert features.shape == (3, channels * grid * grid), protocol
        torch.testing.assert_close(features, reference.flatten(1), atol=1e-5, rtol=1e-5, msg=f"{protocol} {tap}")


def test_zhang_differs_from_point_sampled_bilinear():
    # The reason for the port: a plain align_corners=False bilinear resize is another pooling.
    x = torch.randn(1, 4, 55, 55, generator=torch.Generator().manual_seed(0))
    ours = pool_features(x, "conv1", "zhang", "alexnet_lab")
    plain = torch.nn.functional.interpolate(x, size=(10, 10), mode="bilinear", align_corners=False).flatten(1)
    assert (ours - plain).norm() / ours.norm() > 0.1


# ----------------------------------------------------------------------------------------------
# Heads: per-channel statistics, card defaults, the bias learning rate
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("protocol", ["zhang", "goyal", "max"])
def test_heads_normalise_per_channel(protocol):
    encoder = create_model("alexnet_lab", geometry="transfer")
    probe = MultiTapProbe(encoder, ["conv1"], num_classes=4, crop=227, protocol=protocol)
    head = probe.heads["conv1"]
    assert head.bn.running_mean.shape == (96,) and head.bn.running_var.shape == (96,)
    assert head.feature_dim == 96 * 10 * 10
    # One training-mode forward: the statistics are the channel means over batch and grid.
    maps = torch.randn(4, 96, 55, 55, generator=torch.Generator().manual_seed(1))
    head.train()
    head(maps)
    pooled = head.pool(maps)
    torch.testing.assert_close(head.bn.running_mean, 0.1 * pooled.mean(dim=(0, 2, 3)), atol=1e-6, rtol=1e-5)


def test_protocol_defaults_come_from_the_card():
    alexnet = create_model("alexnet_lab", geometry="transfer")
    assert MultiTapProbe(alexnet, ["conv5"], 3, crop=227).protocol == "zhang"
    resnet = create_model("resnet50_lab")
    probe = MultiTapProbe(resnet, ["res5"], 3, crop=224)
    assert probe.protocol == "goyal"
    info = probe.describe()["res5"]
    assert info["kernel"] == [12, 12] and info["stride"] == [2, 2] and info["grid"] == [2, 2]
    # The old pool names still work (bilinear -> zhang, avg -> goyal).
    assert MultiTapProbe(alexnet, ["conv5"], 3, crop=227, pool="bilinear").protocol == "zhang"
    assert MultiTapProbe(alexnet, ["conv5"], 3, crop=227, protocol="avg").protocol == "goyal"


def test_training_gives_biases_twice_the_lr_and_no_decay(tmp_path, monkeypatch):
    data = make_imagefolder(tmp_path / "tinyset")
    trainings = []

    class Recording(linear_probe.ProbeTraining):
        def fit(self, loader_kw):
            trainings.append(self)
            return super().fit(loader_kw)

    monkeypatch.setattr(linear_probe, "ProbeTraining", Recording)
    argv = ["--checkpoint", "random:alexnet_lab", "--layer", "conv1,conv5", "--data", str(data), "--crop", "64",
            "--resize", "72", "--epochs", "1", "--batch-size", "6", "--workers", "0", "--device", "cpu",
            "--lr", "0.02", "--wd", "0.001", "--lr-steps", "0.5", "--out", str(tmp_path / "run"),
            "--out-csv", str(tmp_path / "probe.csv"), "--no-plot"]
    result = linear_probe.main(linear_probe.get_args_parser().parse_args(argv))
    assert {row.protocol for row in result["rows"]} == {"zhang"}
    groups = trainings[0].optimizer.param_groups
    probe = result["probe"]
    weights = {id(head.fc.weight) for head in probe.heads.values()}
    biases = {id(head.fc.bias) for head in probe.heads.values()}
    by_kind = {("weights" if {id(p) for p in g["params"]} == weights else
                "biases" if {id(p) for p in g["params"]} == biases else "other"): g for g in groups}
    assert set(by_kind) == {"weights", "biases"}
    # The last step ran after the 0.5-epoch step: lr 0.002 for weights, 0.004 for biases.
    assert by_kind["weights"]["lr"] == pytest.approx(0.002) and by_kind["biases"]["lr"] == pytest.approx(0.004)
    assert by_kind["weights"]["weight_decay"] == 0.001 and by_kind["biases"]["weight_decay"] == 0.0
