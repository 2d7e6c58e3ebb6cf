"""The released pretraining recipes (issue 13): what each recipe resolves to, and the pieces that make
the released training's details: bias parameter groups, BatchNorm averaging, squashed images."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from ssl_colorize.data import ImageFiles
from ssl_colorize.data.fast_path import crop_image
from ssl_colorize.data.loader import PretrainLoader
from ssl_colorize.data.transforms import resize_for_crop
from ssl_colorize.models import create_model
from ssl_colorize.pretrain import cli, get_args_parser, main
from ssl_colorize.training.pretext import (
    ResumableSampler, make_adam, parameter_groups, resolve_config, set_batchnorm_momentum_,
)


def config(*argv):
    return resolve_config(get_args_parser().parse_args(list(argv)))


# ------------------------------------------------------------------------------------ the recipes
def test_paper_recipes_resolve_to_the_released_values(tmp_path):
    alexnet = config("--encoder", "alexnet_lab", "--data", str(tmp_path))
    # train_alexnet/solver0..3.prototxt and train_val.prototxt (richzhang/colorization)
    assert (alexnet["steps"], alexnet["batch_size"], alexnet["crop"], alexnet["lr"]) == (450_000, 80, 180, 3e-5)
    assert alexnet["lr_steps"] == (240_000, 300_000, 400_000)
    assert [alexnet["lr"] * f for f in alexnet["lr_factors"]] == pytest.approx([1e-5, 3e-6, 1e-6])
    assert (alexnet["bias_lr_mult"], alexnet["bias_decay_mult"]) == (2.0, 0.0)
    assert (alexnet["loss_reduction"], alexnet["init"], alexnet["resize_mode"], alexnet["resize"]) == (
        "mean", "kmeans", "squash", 256)
    assert alexnet["bn_momentum"] == pytest.approx(1 - 0.999)  # moving_average_fraction 0.999
    colornet = config("--encoder", "colornet", "--data", str(tmp_path))
    # train/solver.prototxt: step policy, gamma 0.1, stepsize 225000, max_iter 500000; train_val_v2: 176 px x 40
    assert (colornet["steps"], colornet["batch_size"], colornet["crop"], colornet["lr"]) == (500_000, 40, 176, 3e-5)
    assert colornet["lr_steps"] == (225_000, 450_000) and colornet["lr_factors"] == pytest.approx((0.1, 0.01))
    assert colornet["betas"] == (0.9, 0.99) and colornet["weight_decay"] == 1e-3
    assert (colornet["bias_lr_mult"], colornet["bias_decay_mult"]) == (1.0, 1.0)  # no param blocks
    assert (colornet["loss_reduction"], colornet["init"], colornet["resize_mode"]) == ("sum", "kmeans", "squash")
    # every detail is an option
    plain = config("--encoder", "colornet", "--data", str(tmp_path), "--loss-reduction", "mean", "--init", "default",
                   "--resize-mode", "shorter", "--bn-momentum", "0.1", "--bias-lr-mult", "2", "--bias-decay-mult", "0")
    assert (plain["loss_reduction"], plain["init"], plain["resize_mode"], plain["bn_momentum"]) == (
        "mean", "default", "shorter", 0.1)
    assert (plain["bias_lr_mult"], plain["bias_decay_mult"]) == (2.0, 0.0)


def test_builtin_recipe_keeps_its_plain_pytorch_choices():
    """The built-in default's 120 steps are measured and probed as they are (docs/builtin-results.md)."""
    cfg = config("--encoder", "alexnet_lab")
    assert (cfg["steps"], cfg["batch_size"], cfg["crop"], cfg["resize"], cfg["lr"]) == (120, 32, 64, 80, 1e-3)
    assert (cfg["init"], cfg["loss_reduction"], cfg["resize_mode"]) == ("default", "mean", "shorter")
    assert (cfg["bias_lr_mult"], cfg["bias_decay_mult"], cfg["bn_momentum"]) == (1.0, 1.0, 0.1)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Conv2d(2, 2, 1))
    assert len(parameter_groups(model, 1e-3, 1e-3)) == 1  # the plain optimizer, as before


@pytest.mark.parametrize("argv,needle", [(["--bn-momentum", "0"], "--bn-momentum 0"),
                                         (["--bn-momentum", "1.5"], "--bn-momentum 1.5"),
                                         (["--bias-lr-mult", "-1"], "--bias-lr-mult -1"),
                                         (["--bias-decay-mult", "-2"], "--bias-decay-mult -2")])
def test_bad_recipe_options_fail_with_one_line(tmp_path, capsys, argv, needle):
    with pytest.raises(SystemExit) as exit_info:
        cli(["--out", str(tmp_path / "r"), *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and "Traceback" not in err[0], err
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------ biases: lr x2, no decay
def test_bias_groups_have_twice_the_lr_and_no_decay():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, affine=False), nn.Conv2d(4, 3, 1))
    optimizer = make_adam(model, 1e-3, (0.9, 0.999), 1e-2, torch.device("cpu"), bias_lr_mult=2.0, bias_decay_mult=0.0)
    weights, biases = optimizer.param_groups
    assert {id(p) for p in weights["params"]} == {id(model[0].weight), id(model[2].weight)}
    assert {id(p) for p in biases["params"]} == {id(model[0].bias), id(model[2].bias)}
    assert (weights["lr"], weights["weight_decay"]) == (1e-3, 1e-2)
    assert (biases["lr"], biases["weight_decay"]) == (2e-3, 0.0)
    # The update itself: with a zero gradient only the decay moves a parameter, and Adam's first step
    # moves it by lr (its direction normalised): weights move by 1e-3, biases not at all.
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    moved = [(p.detach() - b).abs().max().item() for p, b in zip(model.parameters(), before)]
    assert moved[0] == pytest.approx(1e-3, rel=1e-3) and moved[2] == pytest.approx(1e-3, rel=1e-3)
    assert moved[1] == 0.0 and moved[3] == 0.0
    # ... and a bias with a gradient moves by 2 lr in Adam's first step
    optimizer = make_adam(model, 1e-3, (0.9, 0.999), 0.0, torch.device("cpu"), bias_lr_mult=2.0, bias_decay_mult=0.0)
    bias = model[2].bias.detach().clone()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    assert (bias - model[2].bias.detach()).abs().min().item() == pytest.approx(2e-3, rel=1e-3)


def test_every_model_bias_is_in_the_bias_group():
    model = create_model("alexnet_lab")
    weights, biases = parameter_groups(model, 1.0, 1.0, bias_lr_mult=2.0, bias_decay_mult=0.0)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in biases["params"]) == sorted(n for n in names.values() if n.endswith(".bias"))
    assert all(p.dim() > 1 for p in weights["params"])
    assert len(weights["params"]) + len(biases["params"]) == len(names)


# ------------------------------------------------------------------------------- BatchNorm averaging
@pytest.mark.parametrize("name", ["alexnet_lab", "colornet"])
def test_batchnorm_momentum_is_set_on_every_batchnorm(name):
    model = create_model(name)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert set_batchnorm_momentum_(model, 0.001) == len(norms) > 0
    assert all(m.momentum == 0.001 for m in norms)


def test_torch_momentum_is_caffes_moving_average_but_for_the_initial_value():
    """Caffe's BatchNorm (moving_average_fraction f): s = f s + 1, sum = f sum + batch statistic, used as
    sum / s. torch with momentum 1 - f from (mean 0, var 1): r_T = f^T r_0 + (1 - f^T) * Caffe's estimate."""
    f, steps = 0.999, 30
    bn = nn.BatchNorm1d(3, momentum=1 - f)
    rng = np.random.default_rng(0)
    s, mean_sum, var_sum = 0.0, np.zeros(3), np.zeros(3)
    for _ in range(steps):
        x = rng.normal(2.0, 3.0, size=(16, 3))
        bn(torch.tensor(x, dtype=torch.float32))
        s = f * s + 1
        mean_sum = f * mean_sum + x.mean(axis=0)
        var_sum = f * var_sum + x.var(axis=0) * 16 / 15  # Caffe's m / (m - 1) correction, as torch's
    decay = f ** steps
    np.testing.assert_allclose(bn.running_mean.numpy(), (1 - decay) * mean_sum / s, rtol=1e-5)
    np.testing.assert_allclose(bn.running_var.numpy(), decay * 1.0 + (1 - decay) * var_sum / s, rtol=1e-5)


# ---------------------------------------------------------------------------------- squashed images
def test_squash_gives_256_square_and_shorter_keeps_the_aspect():
    image = torch.zeros(3, 200, 300, dtype=torch.uint8)
    image[:, :, 150:] = 255  # the right half white
    squashed = resize_for_crop(image, 256, "squash")
    assert squashed.shape == (3, 256, 256)  # 3:2 -> 1:1, the aspect changed
    assert squashed[0, 100, 120].item() == 0 and squashed[0, 100, 136].item() == 255  # the edge moved to x=128
    shorter = resize_for_crop(image, 256, "shorter")
    assert shorter.shape == (3, 256, 384)  # 3:2 kept
    assert shorter[0, 100, 186].item() == 0 and shorter[0, 100, 198].item() == 255  # the edge at x=192
    with pytest.raises(ValueError, match="resize mode"):
        resize_for_crop(image, 256, "stretch")
    crop = crop_image(image, 176, 256, seed=3, resize_mode="squash")
    assert crop.shape == (3, 176, 176)


def test_both_data_paths_squash_alike(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (30 + 10 * i, 60, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    files = ImageFiles(tmp_path)
    batches = {}
    for path in ("workers", "device"):  # the device path runs its batched decode on the CPU here
        sampler = ResumableSampler(len(files), 4, seed=1)
        batches[path] = next(iter(PretrainLoader(files, sampler, 4, 32, 40, "cpu", path, resize_mode="squash")))
    assert torch.equal(batches["workers"].images, batches["device"].images)
    direct = [crop_image(resize_for_crop(files[int(i)].image, 40, "squash"), 32, None, seed)
              for i, seed in ResumableSampler(len(files), 4, seed=1)]
    assert torch.equal(batches["workers"].images, torch.stack(direct))
    with pytest.raises(ValueError, match="resize_mode"):
        PretrainLoader(files, sampler, 4, 32, 40, "cpu", "workers", resize_mode="stretch")


# ----------------------------------------------------------------------------- the trainer uses them
@pytest.mark.filterwarnings("ignore:kmeans_init_")  # 8 tiny images give fewer patches than filters: expected
def test_a_paper_recipe_run_applies_its_details(tmp_path):
    """colornet's paper recipe on a small folder, shrunk: k-means init, summed loss, squashed images, BN
    momentum 0.001 (in the run's config and in the checkpoint's optimizer)."""
    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (data / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(data / c / f"{i}.jpg")
    args = get_args_parser().parse_args(["--encoder", "colornet", "--data", str(data), "--out", str(tmp_path / "r"),
                                         "--crop", "32", "--resize", "40", "--batch-size", "2", "--steps", "1",
                                         "--workers", "0", "--no-progress", "--bias-lr-mult", "2"])
    result = main(args)
    assert np.isfinite(result["loss"])
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert (cfg["init"], cfg["loss_reduction"], cfg["resize_mode"], cfg["bn_momentum"]) == ("kmeans", "sum", "squash", 0.001)
    groups = torch.load(tmp_path / "r" / "checkpoint.pth", weights_only=False)["optimizer"]["param_groups"]
    assert [g["lr"] / groups[0]["lr"] for g in groups] == [1.0, 2.0]
    shutil.rmtree(tmp_path / "r")  # a colornet checkpoint with Adam's moments is ~0.4 GB
