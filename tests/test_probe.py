"""Linear probes (docs/protocols.md section 4): geometry, the frozen-encoder guard, the whole benchmark path,
resumption after a kill, and bad input. (The command line, the run folder and --checkpoint references:
tests/test_probe_cli.py.)

Small on purpose: a 3-class ImageFolder of 72x80 images, 64 px crops, a few iterations.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from skimage.color import rgb2lab

from ssl_colorize import results
from ssl_colorize.benchmarks import linear_probe
from ssl_colorize.engine.cli import UsageError
from ssl_colorize.models import create_model
from ssl_colorize.heads.probe import FrozenEncoderGuard, MultiTapProbe, encoder_input
from ssl_colorize.heads.probe_pool import TapPool, avg_pool_geometry, probe_grid

CLASSES = ("apple", "boat", "cloud")


def _image(rng: np.random.Generator, label: int) -> np.ndarray:
    """A 72x80 image whose class shows in brightness pattern and hue (so probes have something to find)."""
    h, w = 72, 80
    yy, xx = np.mgrid[0:h, 0:w]
    base = rng.uniform(0.2, 0.8, size=3)
    pattern = [(xx // 8) % 2, (yy // 8) % 2, ((xx + yy) // 10) % 2][label]
    img = base[None, None, :] * (0.6 + 0.4 * pattern[..., None])
    img[..., label] = np.clip(img[..., label] + 0.3, 0, 1)
    img += rng.normal(0, 0.03, size=img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def make_imagefolder(root: Path, per_class=(6, 3), classes=CLASSES, val_suffix=".png") -> Path:
    """root/train/<class>/*.jpg (JPEG via PIL) and root/val/<class>/*.png (lossless, for exact references)."""
    rng = np.random.default_rng(7)
    for split, count, suffix in (("train", per_class[0], ".jpg"), ("val", per_class[1], val_suffix)):
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.fromarray(_image(rng, label % 3)).save(folder / f"{name}_{i}{suffix}")
    return root


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return make_imagefolder(tmp_path_factory.mktemp("data") / "tinyset")


def probe_args(data: Path, tmp: Path, *extra: str, name: str = "run"):
    argv = [
        "--checkpoint", "random", "--encoder", "alexnet_lab", "--layer", "all", "--data", str(data),
        "--crop", "64", "--resize", "72", "--epochs", "1", "--batch-size", "6", "--workers", "0",
        "--device", "cpu", "--out", str(tmp / name), "--out-csv", str(tmp / "results" / "probe.csv"), "--no-plot",
        *extra,
    ]
    return linear_probe.get_args_parser().parse_args(argv)


# ----------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------

def test_alexnet_feature_sizes_at_227_match_the_protocol_table():
    encoder = create_model("alexnet_lab", geometry="transfer")
    probe = MultiTapProbe(encoder, encoder.probe_taps, num_classes=1000, crop=227, pool="avg")
    info = probe.describe()
    # docs/protocols.md section 4 table: map at 227 -> pooled grid -> dims.
    expected = {
        "conv1": ((96, 55, 55), 10, 9600),
        "conv2": ((256, 27, 27), 6, 9216),
        "conv3": ((384, 13, 13), 5, 9600),
        "conv4": ((384, 13, 13), 5, 9600),
        "conv5": ((256, 13, 13), 6, 9216),
    }
    for tap, (shape, grid, dims) in expected.items():
        assert probe.shapes[tap] == shape
        assert info[tap]["grid"] == [grid, grid]
        assert info[tap]["feature_dim"] == dims
    # Goyal et al.'s fixed AlexNet kernels (conv1 k19 s4, conv2 k12 s3, conv3/4 k9 s1, conv5 k8 s1).
    goyal = {"conv1": (19, 4), "conv2": (12, 3), "conv3": (9, 1), "conv4": (9, 1), "conv5": (8, 1)}
    for tap, (k, s) in goyal.items():
        assert info[tap]["kernel"] == [k, k] and info[tap]["stride"] == [s, s]
    # One image through everything, batch 1 (heads in eval mode): the pooled features have those sizes.
    probe.eval()
    image = torch.randint(0, 256, (1, 3, 227, 227), dtype=torch.uint8)
    maps = probe.encoder_features(image)
    for tap, (_, _, dims) in expected.items():
        assert probe.heads[tap].features(maps[tap]).shape == (1, dims)
    assert all(out.shape == (1, 1000) for out in probe(image).values())


def test_resnet_grids_follow_goyal():
    # Goyal et al.: conv1 12x12x64, res2 6x6, res3 4x4, res4 3x3, res5 2x2 (8-9k dims).
    for channels, grid in ((64, 12), (256, 6), (512, 4), (1024, 3), (2048, 2)):
        assert probe_grid(channels, (56, 56)) == (grid, grid)
        assert 8000 <= channels * grid * grid <= 9700
    assert probe_grid(96, (7, 9)) == (7, 9)  # never more than the map


@pytest.mark.parametrize("size,grid", [(55, 10), (27, 6), (13, 5), (13, 6), (26, 10), (112, 12), (14, 2), (6, 6)])
def test_avg_pool_windows_cover_the_map_and_match_a_hand_mean(size, grid):
    kernel, stride = avg_pool_geometry(size, grid)
    assert (size - kernel) // stride + 1 == grid
    covered = set()
    for i in range(grid):
        covered.update(range(i * stride, i * stride + kernel))
    assert covered == set(range(size))  # every pixel of the map is in some window
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    pooled = TapPool("avg", (size, size), (grid, grid))(x)
    for i in range(grid):
        for j in range(grid):
            window = x[..., i * stride : i * stride + kernel, j * stride : j * stride + kernel]
            torch.testing.assert_close(pooled[..., i, j], window.mean(dim=(-2, -1)))


def test_max_matches_hand_windows():
    # (The zhang / goyal poolings against naive loops: tests/test_probe_protocols.py.)
    size, grid = 13, 5
    x = torch.randn(1, 4, size, size, dtype=torch.float64)
    maxed = TapPool("max", (size, size), (grid, grid))(x)
    for i in range(grid):
        for j in range(grid):
            rows = slice(math.floor(i * size / grid), math.ceil((i + 1) * size / grid))
            cols = slice(math.floor(j * size / grid), math.ceil((j + 1) * size / grid))
            torch.testing.assert_close(maxed[0, :, i, j], x[0, :, rows, cols].amax(dim=(-2, -1)))


def test_encoder_input_L_and_grey_agree_with_scikit_image():
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, size=(2, 3, 8, 8), dtype=np.uint8)
    images = torch.from_numpy(array)
    lightness = encoder_input(images, "L")
    reference = np.stack([rgb2lab(a.transpose(1, 2, 0) / 255.0)[..., 0] for a in array])
    np.testing.assert_allclose(lightness[:, 0].numpy(), reference, atol=2e-3)
    grey = encoder_input(images, "grey")
    assert torch.allclose(grey[:, 0], grey[:, 1]) and torch.allclose(grey[:, 1], grey[:, 2])
    grey_lab = np.stack([rgb2lab(g.permute(1, 2, 0).double().numpy()) for g in grey])
    np.testing.assert_allclose(grey_lab[..., 0], reference, atol=2e-2)
    np.testing.assert_allclose(grey_lab[..., 1:], 0.0, atol=2e-2)
    torch.testing.assert_close(encoder_input(images, "rgb"), images.float() / 255)


# ----------------------------------------------------------------------------------------------
# The frozen-encoder guard
# ----------------------------------------------------------------------------------------------

def test_guard_passes_for_eval_forwards_and_trips_when_bn_statistics_move():
    encoder = create_model("alexnet_lab", geometry="transfer").eval()
    guard = FrozenEncoderGuard(encoder)
    x = torch.rand(4, 1, 64, 64) * 100
    with torch.no_grad():
        encoder.forward_taps(x, ["conv5"])
    guard.check()  # eval-mode forwards leave every tensor alone
    encoder.train()  # deliberately unfrozen: BatchNorm statistics move on the next forward
    with torch.no_grad():
        encoder.forward_taps(x, ["conv2"])
    with pytest.raises(RuntimeError) as excinfo:
        guard.check()
    message = str(excinfo.value)
    assert "conv1.bn.running_mean" in message and "conv2.bn.num_batches_tracked" in message
    assert "conv3" not in message  # conv3 was never reached


def test_training_with_an_unfrozen_encoder_fails_loudly(tiny_data, tmp_path, monkeypatch):
    # A probe whose train() lets the encoder follow the heads into train mode: BN statistics drift.
    monkeypatch.setattr(MultiTapProbe, "train", lambda self, mode=True: torch.nn.Module.train(self, mode))
    with pytest.raises(RuntimeError, match=r"frozen encoder changed.*running_mean"):
        linear_probe.main(probe_args(tiny_data, tmp_path))
    assert len(results.read_rows(tmp_path / "results" / "probe.csv")) == 0  # no rows from a void run


def test_training_that_touches_an_encoder_weight_fails_loudly(tiny_data, tmp_path, monkeypatch):
    original = MultiTapProbe.training_step

    def step_and_nudge(self, images, labels, optimizer):
        stats = original(self, images, labels, optimizer)
        self.encoder.conv5.conv.weight.data.mul_(1.0 + 1e-6)  # as an optimizer over the encoder would
        return stats

    monkeypatch.setattr(MultiTapProbe, "training_step", step_and_nudge)
    with pytest.raises(RuntimeError, match=r"conv5\.conv\.weight"):
        linear_probe.main(probe_args(tiny_data, tmp_path))


# ----------------------------------------------------------------------------------------------
# The whole path
# ----------------------------------------------------------------------------------------------

def _reference_top1(result: dict, data: Path, tap: str) -> tuple[float, int]:
    """Top-1 of the trained head recomputed independently: PIL decode, numpy centre crop, scikit-image Lab.

    Returns (accuracy in %, number of near-ties whose argmax could flip with float32 rounding).
    """
    probe = result["probe"].eval()
    crops, labels = [], []
    for label, name in enumerate(CLASSES):
        for path in sorted((data / "val" / name).glob("*.png")):
            array = np.asarray(Image.open(path).convert("RGB"))  # 72 x 80: shorter side is the resize
            top, left = (72 - 64) // 2, (80 - 64) // 2
            crops.append(rgb2lab(array[top : top + 64, left : left + 64] / 255.0)[..., :1])
            labels.append(label)
    lightness = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        logits = probe.heads[tap](probe.encoder.forward_taps(lightness, [tap])[tap])
    top2 = logits.topk(2, dim=1).values
    ties = int(((top2[:, 0] - top2[:, 1]) < 1e-3).sum())
    correct = (logits.argmax(1) == torch.tensor(labels)).sum().item()
    return 100.0 * correct / len(labels), ties


def test_main_end_to_end_writes_the_rows(tiny_data, tmp_path):
    result = linear_probe.main(probe_args(tiny_data, tmp_path, "--run-id", "e2e", "--seed", "3"))
    table = results.read_rows(tmp_path / "results" / "probe.csv")
    assert len(table) == 5 * 2
    assert set(table["tap"]) == {"conv1", "conv2", "conv3", "conv4", "conv5"}
    assert set(table["metric"]) == {"top1", "top5"}
    for column, value in (("run_id", "e2e"), ("benchmark", "linear_probe"), ("checkpoint", "random"),
                          ("encoder", "alexnet_lab"), ("dataset", "tinyset"), ("split", "val"),
                          ("protocol", "zhang")):
        assert set(table[column]) == {value}, column
    assert set(table["seed"]) == {3}
    assert table["code_version"].str.len().min() > 0 and table["time"].str.len().min() > 0
    for _, row in table.iterrows():
        hp = json.loads(row["hparams"])
        assert hp["protocol"] == "zhang" and hp["crop"] == 64 and hp["num_classes"] == 3 and hp["n_val"] == 9
        assert hp["feature_dim"] == hp["channels"] * hp["grid"][0] * hp["grid"][1]
        assert hp["iterations"] == 18 // 6 and hp["geometry"] == "transfer" and hp["input_mode"] == "L"
    values = table.pivot(index="tap", columns="metric", values="value")
    # Three classes: top-5 is top-3, i.e. always right; top-1 is a multiple of 1/9.
    assert (values["top5"] == 100.0).all()
    for tap, value in values["top1"].items():
        assert abs(value * 9 / 100 - round(value * 9 / 100)) < 1e-3  # rows keep 4 decimals
        reference, ties = _reference_top1(result, tiny_data, tap)
        assert abs(value - reference) <= 100.0 * ties / 9 + 1e-3, tap
    assert result["log"] == tmp_path / "run" / "log.jsonl" and "val_top1_conv5" in result["log"].read_text()
    for name in ("checkpoint.pth", "config.json", "summary.json"):
        assert (tmp_path / "run" / name).is_file(), name
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["skipped_files"] == 0 and summary["taps"] == ["conv1", "conv2", "conv3", "conv4", "conv5"]
    assert not list(tmp_path.rglob("*.lock"))  # appending rows leaves no lock files behind


class SimulatedKill(BaseException):
    """Raised mid-training to stand in for SIGKILL / preemption."""


def test_resume_after_a_kill_reproduces_the_uninterrupted_run(tiny_data, tmp_path, monkeypatch, capsys):
    # 3 batches per epoch; saves at each epoch's end and every 5 iterations; a log record every iteration.
    common = ("--epochs", "2", "--save-every-iters", "5", "--log-every", "1", "--layer", "conv1,conv3")
    whole = linear_probe.main(probe_args(tiny_data, tmp_path, *common, "--run-id", "whole", name="whole"))

    original = MultiTapProbe.training_step
    calls = {"n": 0}

    def dying_step(self, *a, **kw):
        if calls["n"] == 4:  # dies in iteration 5: iteration 4 is logged, the last save was at 3
            raise SimulatedKill
        calls["n"] += 1
        return original(self, *a, **kw)

    monkeypatch.setattr(MultiTapProbe, "training_step", dying_step)
    with pytest.raises(SimulatedKill):
        linear_probe.main(probe_args(tiny_data, tmp_path, *common, "--run-id", "killed", name="killed"))
    monkeypatch.setattr(MultiTapProbe, "training_step", original)
    assert max(r["step"] for r in read_log(tmp_path / "killed")) == 4  # a record past the checkpoint
    capsys.readouterr()
    resumed = linear_probe.main(probe_args(tiny_data, tmp_path, *common, "--run-id", "killed", "--resume",
                                           name="killed"))
    assert "resuming killed from" in capsys.readouterr().out
    assert resumed["metrics"] == whole["metrics"]
    for name, tensor in whole["probe"].heads.state_dict().items():
        assert torch.equal(tensor, resumed["probe"].heads.state_dict()[name]), name
    # log.jsonl holds the uninterrupted run's records, none twice (iteration 4 was cut, then redone).
    strip = [{k: v for k, v in r.items() if k != "elapsed_s"} for r in read_log(tmp_path / "whole")]
    assert [{k: v for k, v in r.items() if k != "elapsed_s"} for r in read_log(tmp_path / "killed")] == strip
    table = results.read_rows(tmp_path / "results" / "probe.csv")
    mine = table[table["run_id"] == "killed"]
    assert len(mine) == 2 * 2  # rows written once, by the run that finished
    # Rerunning a finished run neither trains again nor duplicates its rows.
    again = linear_probe.main(probe_args(tiny_data, tmp_path, *common, "--run-id", "killed", "--resume", name="killed"))
    assert again["metrics"] == whole["metrics"]
    assert len(results.read_rows(tmp_path / "results" / "probe.csv").query("run_id == 'killed'")) == 4
    # A resume with different settings is refused, naming the setting.
    with pytest.raises(UsageError, match="lr: checkpoint 0.01 vs now 0.5"):
        linear_probe.main(probe_args(tiny_data, tmp_path, *common, "--lr", "0.5", "--resume", name="killed"))


def read_log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------

def test_missing_split_folder_is_named(tmp_path):
    data = make_imagefolder(tmp_path / "noval", per_class=(2, 1))
    for f in (data / "val").rglob("*"):
        if f.is_file():
            f.unlink()
    for d in sorted((data / "val").rglob("*"), reverse=True):
        d.rmdir()
    (data / "val").rmdir()
    with pytest.raises(UsageError, match=r"no val/ folder"):
        linear_probe.main(probe_args(data, tmp_path))


def test_mismatched_classes_are_named(tmp_path):
    data = make_imagefolder(tmp_path / "mismatch", per_class=(2, 1))
    (data / "val" / "cloud").rename(data / "val" / "clouds")
    with pytest.raises(UsageError, match=r"different classes.*only in train/: \['cloud'\].*only in val/: \['clouds'\]"):
        linear_probe.main(probe_args(data, tmp_path))


def test_images_outside_class_folders_are_refused(tmp_path):
    data = make_imagefolder(tmp_path / "loose", per_class=(2, 1))
    Image.fromarray(np.zeros((72, 80, 3), np.uint8)).save(data / "val" / "stray.jpg")
    with pytest.raises(UsageError, match=r"val/ holds 1 image\(s\) outside class folders"):
        linear_probe.main(probe_args(data, tmp_path))


def test_unknown_layer_lists_the_encoder_taps(tiny_data, tmp_path):
    with pytest.raises(UsageError, match=r"--layer 'conv9'.*available taps: \['conv1', 'conv2', 'conv3', 'conv4', "
                                         r"'conv5', 'fc6', 'fc7'\]"):
        linear_probe.main(probe_args(tiny_data, tmp_path, "--layer", "conv9"))


def test_rgb_input_modes_are_for_rgb_encoders(tiny_data, tmp_path):
    with pytest.raises(UsageError, match=r"--input grey-rgb: input mode 'grey-rgb' is for RGB encoders"):
        linear_probe.main(probe_args(tiny_data, tmp_path, "--input", "grey-rgb"))
    # The old spelling is still understood (a hidden alias), with the same answer.
    with pytest.raises(UsageError, match=r"--input grey-rgb: input mode 'grey-rgb' is for RGB encoders"):
        linear_probe.main(probe_args(tiny_data, tmp_path, "--input-mode", "grey"))


def test_rgb_encoder_probe_sees_rgb(tiny_data):
    encoder = create_model("alexnet_rgb_torchvision")
    probe = MultiTapProbe(encoder, ["conv1", "conv2"], num_classes=3, crop=64)
    assert probe.input_mode == "rgb"
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    direct = encoder.forward_taps(images.float() / 255, ["conv2"])["conv2"]
    torch.testing.assert_close(probe.encoder_features(images)["conv2"], direct)
    grey = MultiTapProbe(encoder, ["conv1"], num_classes=3, crop=64, input_mode="grey")
    assert grey.input_mode == "grey"
    assert not F.mse_loss(grey.encoder_features(images)["conv1"], probe.encoder_features(images)["conv1"]) == 0
