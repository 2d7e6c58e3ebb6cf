"""Encoders: registry, taps, geometries, parameter counts and the k-means data-dependent init.

Expected sizes come from the Caffe output-size formulas and docs/protocols.md section 3, computed here
independently of torch; k-means and whitening are checked against scikit-learn and numpy.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torchvision
from sklearn.cluster import KMeans
from sklearn.metrics import pairwise_distances_argmin
from torch import nn

from ssl_colorize.kmeans_init import _kmeans, _whitening, kmeans_init_
from ssl_colorize.models import Tap, create_model, list_models, resize_logits
from ssl_colorize.models.base import Encoder

# Small inputs keep every test fast on a 2-core CPU (COMMON brief).
TEST_SIZE = {"alexnet_lab": 64, "colornet": 32, "resnet50_lab": 64, "alexnet_rgb_torchvision": 64}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _input(model: Encoder, size: int, batch: int = 2) -> torch.Tensor:
    if model.input_space == "L":
        return torch.rand(batch, 1, size, size) * 100.0
    return torch.rand(batch, 3, size, size)


# ---------------------------------------------------------------------------------------- registry
def test_registry_has_the_four_encoders():
    assert {"alexnet_lab", "colornet", "resnet50_lab", "alexnet_rgb_torchvision"} <= set(list_models())
    assert list_models() == sorted(list_models())


def test_unknown_model_raises_listing_known_names():
    with pytest.raises(ValueError) as info:
        create_model("no_such_net")
    for name in list_models():
        assert name in str(info.value)


def test_unknown_argument_raises_value_error():
    with pytest.raises(ValueError, match="alexnet_lab"):
        create_model("alexnet_lab", depth=3)


@pytest.mark.parametrize("name", list_models())
def test_model_contract_attributes(name):
    model = create_model(name)
    assert isinstance(model, Encoder)
    assert model.input_space in ("L", "rgb")
    assert len(model.probe_taps) == 5 and set(model.probe_taps) <= set(model.taps)
    assert all(isinstance(t, Tap) for t in model.taps.values())
    strides = [t.stride for t in model.taps.values()]
    assert model.output_stride >= 1
    # taps are listed shallowest first: strides never shrink along the probe taps
    probe_strides = [model.taps[t].stride for t in model.probe_taps]
    assert probe_strides == sorted(probe_strides) and min(strides) >= 1
    assert model.model_spec["name"] == name


# ---------------------------------------------------------------------------- forward / backward
@pytest.mark.parametrize("name", list_models())
def test_forward_backward_and_tap_shapes(name):
    model = create_model(name).train()
    size = TEST_SIZE[name]
    x = _input(model, size)
    feats = model.forward_taps(x, list(model.taps))
    assert list(feats) == list(model.taps)  # depth order
    for tap, out in feats.items():
        assert out.dim() == 4 and out.shape[0] == 2
        assert out.shape[1] == model.taps[tap].channels
    for tap in model.probe_taps:
        h, w = feats[tap].shape[-2:]
        expected = size / model.taps[tap].stride
        assert abs(h - expected) <= 2 and abs(w - expected) <= 2, (tap, h, expected)
    if model.has_colour_head:
        assert model(x).shape[:2] == (2, 313)
        on_grid = model.logits_at(x)
        assert tuple(on_grid.shape) == (2, 313, *model.loss_grid_size(size, size))
        loss = on_grid.logsumexp(dim=1).mean()
    else:
        with pytest.raises(RuntimeError, match="no colour head"):
            model(x)
        loss = sum(f.mean() for f in feats.values())
    loss.backward()
    grads = [(n, p.grad) for n, p in model.named_parameters() if not n.startswith("net.classifier.6")]
    missing = [n for n, g in grads if g is None]
    assert not missing, missing
    assert all(torch.isfinite(g).all() for _, g in grads)


@pytest.mark.parametrize("name", ["colornet", "resnet50_lab"])
def test_native_logits_lie_on_the_loss_grid(name):
    model = create_model(name).eval()
    x = _input(model, 64, batch=1)
    with torch.no_grad():
        logits = model(x)
    grid = (len(range(0, 64, model.output_stride)),) * 2  # ab[..., ::s, ::s]
    assert tuple(logits.shape[-2:]) == grid == model.loss_grid_size(64, 64)


@pytest.mark.parametrize("name", list_models())
def test_forward_taps_stops_at_the_deepest_requested_tap(name):
    model = create_model(name).eval()
    ran: list[str] = []
    stages = list(model.stages())
    handles = [stage.register_forward_hook(lambda *_, n=n: ran.append(n)) for n, stage in stages]
    if hasattr(model, "head"):
        handles.append(model.head.register_forward_hook(lambda *_: ran.append("head")))
    target = model.probe_taps[1]
    with torch.no_grad():
        out = model.forward_taps(_input(model, TEST_SIZE[name], batch=1), [target])
    for h in handles:
        h.remove()
    assert list(out) == [target]
    names = [n for n, _ in stages]
    assert ran == names[: names.index(target) + 1]


@pytest.mark.parametrize("name", list_models())
def test_unknown_tap_raises_listing_taps(name):
    model = create_model(name)
    with pytest.raises(ValueError) as info:
        model.forward_taps(_input(model, TEST_SIZE[name], batch=1), ["conv1", "nope"])
    for tap in model.taps:
        assert tap in str(info.value)
    assert "nope" in str(info.value)


def test_wrong_input_channels_raise():
    model = create_model("alexnet_lab")
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        model(torch.rand(1, 3, 64, 64))


@pytest.mark.parametrize("name", list_models())
def test_model_spec_round_trip(name):
    model = create_model(name).eval()
    clone = create_model(**model.model_spec).eval()
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert shapes == {k: v.shape for k, v in clone.state_dict().items()}
    clone.load_state_dict(model.state_dict())
    x = _input(model, TEST_SIZE[name], batch=1)
    with torch.no_grad():
        a = model.forward_taps(x, model.probe_taps)
        b = clone.forward_taps(x, model.probe_taps)
    for tap in model.probe_taps:
        torch.testing.assert_close(a[tap], b[tap])


# ------------------------------------------------------------------------------------- colornet
def _conv_params(c_in: int, c_out: int, k: int) -> int:
    return c_in * c_out * k * k + c_out


def test_colornet_has_32_2_million_parameters():
    model = create_model("colornet")
    count = sum(p.numel() for p in model.parameters())
    # docs/protocols.md section 3 table, with a bias on every conv (Caffe's default)
    chans = [1, 64, 64, 128, 128, 256, 256, 256] + [512] * 12
    expected = sum(_conv_params(a, b, 3) for a, b in zip(chans[:-1], chans[1:]))
    expected += _conv_params(512, 256, 4) + 2 * _conv_params(256, 256, 3) + _conv_params(256, 313, 1)
    assert count == expected
    assert abs(count - 32.2e6) / 32.2e6 < 0.01


# -------------------------------------------------------------------------------------- alexnet
def _caffe_conv(size: int, k: int, s: int = 1, p: int = 0, d: int = 1) -> int:
    return (size + 2 * p - (d * (k - 1) + 1)) // s + 1


def _caffe_pool(size: int, k: int, s: int, p: int = 0) -> int:
    out = math.ceil((size + 2 * p - k) / s) + 1
    if p > 0 and (out - 1) * s >= size + p:  # Caffe: the last window must start inside the image
        out -= 1
    return out


def test_alexnet_transfer_geometry_matches_caffenet_at_227():
    model = create_model("alexnet_lab", geometry="transfer").eval()
    with torch.no_grad():
        feats = model.forward_taps(torch.rand(1, 1, 227, 227) * 100, list(model.taps))
        logits = model(torch.rand(1, 1, 227, 227) * 100)
    shapes = {k: tuple(v.shape[1:]) for k, v in feats.items()}
    # docs/protocols.md sections 3 and 4
    assert shapes["conv1"] == (96, 55, 55)
    assert shapes["conv2"] == (256, 27, 27)
    assert shapes["conv3"] == (384, 13, 13)
    assert shapes["conv4"] == (384, 13, 13)
    assert shapes["conv5"] == (256, 13, 13)
    assert shapes["fc6"] == shapes["fc7"] == (4096, 1, 1)
    assert tuple(logits.shape) == (1, 313, 1, 1)


def test_alexnet_train_geometry_at_180():
    model = create_model("alexnet_lab", geometry="train").eval()
    # the released train_val.prototxt, layer by layer
    s = _caffe_conv(180, 11, 4, 5)
    s = _caffe_pool(s, 3, 2, 1)
    s = _caffe_conv(s, 5, 1, 2)
    s = _caffe_pool(s, 3, 2, 1)
    s = _caffe_conv(_caffe_conv(_caffe_conv(s, 3, 1, 1), 3, 1, 1), 3, 1, 1)
    s = _caffe_pool(s, 3, 1, 1)
    s = _caffe_conv(s, 6, 1, 5, 2)
    x = torch.rand(2, 1, 180, 180) * 100
    with torch.no_grad():
        logits = model(x)
        on_grid = model.logits_at(x)
    assert tuple(logits.shape) == (2, 313, s, s) == (2, 313, 12, 12)
    grid = len(range(0, 180, 8))  # the released code's stride-8 subsampling of ab
    assert tuple(on_grid.shape) == (2, 313, grid, grid)
    # corners coincide (align_corners=True): the resize only fills in between
    torch.testing.assert_close(on_grid[..., 0, 0], logits[..., 0, 0])
    torch.testing.assert_close(on_grid[..., -1, -1], logits[..., -1, -1])
    torch.testing.assert_close(model.logits_at(x, (12, 12)), logits)
    torch.testing.assert_close(resize_logits(logits, (grid, grid)), on_grid)  # the DDP-friendly spelling
    assert resize_logits(logits, (12, 12)) is logits


def test_alexnet_geometries_share_weights():
    train = create_model("alexnet_lab", geometry="train")
    transfer = create_model("alexnet_lab", geometry="transfer")
    transfer.load_state_dict(train.state_dict())  # strict: identical keys and shapes
    x = torch.rand(1, 1, 227, 227) * 100
    switched = create_model("alexnet_lab", geometry="train").eval()
    switched.load_state_dict(train.state_dict())
    switched.set_geometry("transfer")
    assert switched.model_spec["kwargs"]["geometry"] == "transfer"
    assert switched.taps["fc6"].stride == 32 and train.taps["fc6"].stride == 16
    with torch.no_grad():
        a = switched.forward_taps(x, ["conv5", "fc7"])
        b = transfer.eval().forward_taps(x, ["conv5", "fc7"])
    torch.testing.assert_close(a["conv5"], b["conv5"])
    torch.testing.assert_close(a["fc7"], b["fc7"])
    assert create_model(**switched.model_spec).geometry == "transfer"
    with pytest.raises(ValueError, match="geometry"):
        switched.set_geometry("fcn")


def test_alexnet_parameter_count_and_options():
    model = create_model("alexnet_lab")
    expected = (
        _conv_params(1, 96, 11)
        + _conv_params(48, 256, 5)
        + _conv_params(256, 384, 3)
        + _conv_params(192, 384, 3)
        + _conv_params(192, 256, 3)
        + _conv_params(256, 4096, 6)
        + _conv_params(4096, 4096, 1)
        + _conv_params(4096, 313, 1)
    )
    assert sum(p.numel() for p in model.parameters()) == expected
    assert not any(isinstance(m, nn.LocalResponseNorm) for m in model.modules())
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 7 and not any(m.affine for m in norms)
    assert (model.conv2.conv.groups, model.conv4.conv.groups, model.conv5.conv.groups) == (2, 2, 2)
    rgb = create_model("alexnet_lab", in_chans=3)
    assert rgb.input_space == "rgb" and rgb.conv1.conv.in_channels == 3
    with pytest.raises(ValueError, match="in_chans"):
        create_model("alexnet_lab", in_chans=2)


# --------------------------------------------------------------------------------------- resnet
def test_resnet_last_stage_stride_option():
    x = torch.rand(1, 1, 64, 64) * 100
    stride1 = create_model("resnet50_lab").eval()
    plain = create_model("resnet50_lab", stride1_last_stage=False).eval()
    with torch.no_grad():
        assert stride1.forward_taps(x, ["res5"])["res5"].shape[-1] == 64 // 16
        assert plain.forward_taps(x, ["res5"])["res5"].shape[-1] == 64 // 32
    assert (stride1.output_stride, plain.output_stride) == (16, 32)
    plain.load_state_dict(stride1.state_dict())  # same weights, only the strides differ


def test_torchvision_alexnet_loads_a_local_state_dict(tmp_path):
    reference = torchvision.models.alexnet(weights=None).eval()
    path = tmp_path / "alexnet.pth"
    torch.save(reference.state_dict(), path)
    model = create_model("alexnet_rgb_torchvision", weights_path=str(path)).eval()
    assert "weights_path" not in model.model_spec["kwargs"]
    x = torch.rand(2, 3, 224, 224)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model.imagenet_logits(x), reference((x - mean) / std))
        conv5 = model.forward_taps(x, ["conv5"])["conv5"]
        torch.testing.assert_close(conv5, reference.features[:12]((x - mean) / std))
    assert tuple(conv5.shape) == (2, 256, 13, 13)
    with pytest.raises(ValueError, match="weights_path"):
        create_model("alexnet_rgb_torchvision", weights_path=str(tmp_path / "missing.pth"))


# ------------------------------------------------------------------------------- k-means init
def test_kmeans_matches_sklearn_quality():
    rng = np.random.default_rng(0)
    points = rng.normal(size=(1500, 6)).astype(np.float32)
    k = 12
    ours = _kmeans(torch.from_numpy(points), k, iters=30, generator=torch.Generator().manual_seed(0)).numpy()
    assign = pairwise_distances_argmin(points, ours)
    ours_inertia = float(((points - ours[assign]) ** 2).sum())
    sk = KMeans(n_clusters=k, n_init=1, random_state=0).fit(points)
    assert ours_inertia <= 1.1 * sk.inertia_
    # a Lloyd fixed point (up to the last step): each centroid is close to the mean of its cluster
    for c in range(k):
        members = points[assign == c]
        if len(members):
            assert np.linalg.norm(members.mean(axis=0) - ours[c]) < 0.1


@pytest.mark.parametrize("n", [400, 20])  # covariance path (n >= D) and Gram path (n < D)
def test_whitening_gives_identity_covariance(n):
    rng = np.random.default_rng(1)
    mixing = rng.normal(size=(30, 30))
    x = (rng.normal(size=(n, 30)) @ mixing + 5.0).astype(np.float32)
    eps_rel = 1e-3
    mean, basis, scale = _whitening(torch.from_numpy(x), eps_rel=eps_rel)
    z = (((torch.from_numpy(x) - mean) @ basis) * scale).numpy()
    assert z.shape[1] == min(30, n - 1)  # centred data has rank min(D, n - 1)
    # regularised ZCA: component i keeps variance lambda_i / (lambda_i + eps), eps = eps_rel * mean(lambda)
    lam = np.linalg.eigvalsh(np.cov(x.astype(np.float64), rowvar=False, bias=True))[-z.shape[1] :]
    expected = np.diag(lam / (lam + eps_rel * lam.mean()))
    np.testing.assert_allclose(np.cov(z, rowvar=False, bias=True), expected, atol=2e-3)


def _pre_activation_stats(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    outs: dict[str, torch.Tensor] = {}
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    # clone: the in-place ReLUs that follow would otherwise overwrite what we read
    handles = [m.register_forward_hook(lambda _m, _i, o, n=n: outs.__setitem__(n, o.clone())) for n, m in layers]
    with torch.no_grad():
        model.eval()(x)
    for h in handles:
        h.remove()
    return {n: (o.mean(dim=(0, 2, 3)), o.std(dim=(0, 2, 3), unbiased=False)) for n, o in outs.items()}


@pytest.mark.parametrize("name,size", [("alexnet_lab", 96), ("colornet", 32)])
def test_kmeans_init_standardises_every_layer(name, size):
    model = create_model(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # images with spatial structure: smoothed noise in L units
    x = nn.functional.avg_pool2d(torch.rand(4, 1, size, size) * 100, 5, 1, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few patches for the 4096-wide layers: expected here
        kmeans_init_(model, x, progress=False)
    assert model.training  # the mode is restored
    stats = _pre_activation_stats(model, x)
    for layer, (mean, std) in stats.items():
        if layer == "head":
            continue
        assert mean.abs().max() < 1e-3, layer
        assert (std - 1).abs().max() < 1e-3, layer
    after = model.state_dict()
    for key, value in before.items():
        if key.endswith(".weight") and not key.startswith("head"):
            assert not torch.allclose(after[key], value), key
        if key.startswith("head"):
            assert torch.equal(after[key], value), key


def test_kmeans_init_filters_are_matched_to_data_clusters():
    # Input patches drawn from 4 fixed 3x3 patterns: conv1's 4 filters should each respond most
    # strongly to a different pattern (k-means recovers the modes).
    rng = np.random.default_rng(2)
    patterns = rng.normal(size=(4, 3, 3)).astype(np.float32)
    tiles = rng.integers(0, 4, size=(8, 6, 6))
    images = np.stack([np.block([[patterns[t] for t in row] for row in tiles[i]])[None] for i in range(8)])
    assert images.shape == (8, 1, 18, 18)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, stride=3))
    kmeans_init_(net, torch.from_numpy(images), skip=[], progress=False)
    responses = net(torch.from_numpy(patterns)[:, None]).detach()[:, :, 0, 0]  # (pattern, filter)
    assert sorted(responses.argmax(dim=0).tolist()) == [0, 1, 2, 3]


def test_kmeans_init_rejects_bad_arguments():
    model = create_model("alexnet_lab")
    with pytest.raises(ValueError, match="max_patches"):
        kmeans_init_(model, torch.rand(1, 1, 64, 64), max_patches=1)
    with pytest.raises(ValueError, match="no data"):
        kmeans_init_(model, [])


def test_resnet50_lab_res5_is_stride_1_without_dilation_as_goyal_et_al():
    # Goyal et al. / VISSL (LAYER4_STRIDE: 1): res5 keeps res4's 14x14 at 224 and no convolution is dilated.
    model = create_model("resnet50_lab").eval()
    dilated = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.dilation != (1, 1)]
    assert dilated == []
    with torch.no_grad():
        maps = model.forward_taps(torch.rand(1, 1, 224, 224) * 100, ["res4", "res5"])
    assert tuple(maps["res4"].shape[-2:]) == tuple(maps["res5"].shape[-2:]) == (14, 14)
    assert model.taps["res5"].stride == 16
    # the stride-2 network (stride1_last_stage=False) has the same weights' shapes: checkpoints stay loadable
    plain = create_model("resnet50_lab", stride1_last_stage=False)
    assert {k: v.shape for k, v in plain.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
