"""The linear probe's command line (ssl_colorize.benchmarks.linear_probe): one-line errors before any
work, the run folder contract, --checkpoint references, the encoder card's defaults, and what a run
reports (unreadable files named, a readable one-layer plot, clean learning rates).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

from ssl_colorize.benchmarks import linear_probe
from ssl_colorize.checkpoint import save_checkpoint
from ssl_colorize.checkpoint_ref import CheckpointRef, parse_checkpoint_ref
from ssl_colorize.engine.cli import UsageError
from ssl_colorize.engine.probe_report import plot_accuracy_vs_layer
from ssl_colorize.engine.probe_settings import resolve_settings
from ssl_colorize.engine.probe_train import clean_lr, format_lr
from ssl_colorize.models.cards import get_card

from test_probe import make_imagefolder

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return make_imagefolder(tmp_path_factory.mktemp("data") / "tinyset")


def quick(data: Path, *extra: str) -> list[str]:
    return ["--checkpoint", "random:alexnet_lab", "--layer", "conv1", "--data", str(data), "--crop", "64",
            "--resize", "72", "--epochs", "1", "--batch-size", "6", "--workers", "0", "--device", "cpu", *extra]


def refused(capsys, argv: list[str]) -> str:
    """Run the command line; it must stop with exit 2 and one stderr line, which is returned."""
    with pytest.raises(SystemExit) as exit_info:
        linear_probe.cli(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# ----------------------------------------------------------------------------------------------
# Bad options: one line naming the option and value, exit 2, nothing written
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra,expected", [
    (("--crop", "0"), "--crop 0: must be > 0"),
    (("--lr", "0"), "--lr 0.0: must be > 0"),
    (("--epochs", "-1"), "--epochs -1: must be >= 0"),
    (("--batch-size", "0"), "--batch-size 0: must be > 0"),
    (("--wd", "-0.1"), "--wd -0.1: must be >= 0"),
    (("--layer", "conv9"), "--layer 'conv9': unknown tap(s) ['conv9']"),
    (("--layer", "res2"), "available taps: ['conv1', 'conv2', 'conv3', 'conv4', 'conv5', 'fc6', 'fc7']"),
    (("--checkpoint", "missing.pth"), "--checkpoint missing.pth: no such file or folder"),
    (("--checkpoint", "random:vgg99"), "--checkpoint random:vgg99: unknown encoder 'vgg99'"),
    (("--input", "grey-rgb"), "--input grey-rgb: input mode 'grey-rgb' is for RGB encoders"),
    (("--lr-steps", "3"), "--lr-steps 3: every step must lie strictly between 0 and --epochs 1"),
    (("--resize", "32"), "--resize 32: is smaller than --crop 64"),
    (("--crop", "8"), "--crop 8: crop 8 is too small for AlexNetLab to reach taps ['conv1']"),
    (("--geometry", "wide"), "--geometry wide: "),
    (("--checkpoint", "random", "--encoder", "resnet50_lab", "--geometry", "transfer"),
     "--geometry transfer: encoder 'resnet50_lab' has no"),
    (("--resume",), "--resume needs --out"),
    (("--protocol", "bilinear"), "--protocol: invalid choice: 'bilinear'"),
    (("--pool", "avg", "--protocol", "zhang"), "--pool avg: contradicts --protocol zhang"),
])
def test_bad_options_stop_before_any_work(tiny_data, tmp_path, monkeypatch, capsys, extra, expected):
    monkeypatch.chdir(tmp_path)
    argv = quick(tiny_data, *extra)
    if "--checkpoint" in extra:  # the later --checkpoint wins; keep the list readable
        argv = argv[2:]
    err = refused(capsys, argv)
    assert err.startswith("linear_probe: error: ") and expected in err
    assert not list(tmp_path.iterdir())  # no run folder, no results table, no plot


def test_missing_data_and_unwritable_outputs_are_named(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("x")
    assert "--data nowhere: no such folder" in refused(capsys, ["--checkpoint", "random", "--data", "nowhere"])
    err = refused(capsys, ["--checkpoint", "random", "--out-csv", "a_file/rows.csv"])
    assert "--out-csv a_file/rows.csv" in err and "cannot be made" in err
    err = refused(capsys, ["--checkpoint", "random", "--out", "a_file"])
    assert "--out a_file: is a file, not a folder" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="tensorboard is installed here")
def test_tensorboard_without_the_package_is_one_line(tiny_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    err = refused(capsys, quick(tiny_data, "--tensorboard"))
    assert "--tensorboard" in err and "pip install tensorboard" in err


def test_module_and_launcher_behave_the_same(tmp_path):
    """``python -m ssl_colorize.benchmarks.linear_probe`` and ``python benchmarks/linear_probe.py``."""
    for command in ([sys.executable, "-m", "ssl_colorize.benchmarks.linear_probe"],
                    [sys.executable, str(REPO / "benchmarks" / "linear_probe.py")]):
        done = subprocess.run([*command, "--checkpoint", "random", "--crop", "0"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and done.stderr.strip() == "linear_probe: error: --crop 0: must be > 0"
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------
# The run folder
# ----------------------------------------------------------------------------------------------

def test_a_used_run_folder_is_refused_without_resume_or_overwrite(tiny_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = quick(tiny_data, "--out", "run", "--no-plot")
    first = linear_probe.cli(argv)
    assert first["run_id"] == "run" and first["out"] == Path("run")
    assert json.loads((tmp_path / "run" / "config.json").read_text())["encoder"] == "alexnet_lab"
    capsys.readouterr()
    before = (tmp_path / "run" / "checkpoint.pth").stat().st_mtime_ns
    err = refused(capsys, argv)
    assert "--out run already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert (tmp_path / "run" / "checkpoint.pth").stat().st_mtime_ns == before  # untouched
    again = linear_probe.cli([*argv, "--overwrite", "--run-id", "second"])
    assert again["run_id"] == "second"
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["run_id"] == "second"


def test_default_run_folder_is_under_the_current_folder(tiny_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = linear_probe.cli(quick(tiny_data, "--no-plot"))
    assert result["out"].parent == tmp_path / "runs" / "linear_probe"
    assert (result["out"] / "summary.json").is_file() and result["csv"] == Path("results/linear_probe.csv")


# ----------------------------------------------------------------------------------------------
# --checkpoint references
# ----------------------------------------------------------------------------------------------

def _fake_checkpoint(path: Path, name: str = "colornet") -> Path:
    """A checkpoint's self-description without weights (enough to read its model name)."""
    return save_checkpoint(path, {"model": {"name": name, "kwargs": {}}, "state_dict": {}, "step": 0})


def test_checkpoint_refs_round_trip(tmp_path):
    random_ref = parse_checkpoint_ref("random:alexnet_lab")
    assert random_ref == CheckpointRef("random", None, "alexnet_lab", "random:alexnet_lab")
    assert random_ref.label == "random" and random_ref.model_name() == "alexnet_lab"
    assert parse_checkpoint_ref("random", encoder="resnet50_lab").model_name() == "resnet50_lab"
    a, b = random_ref.load(seed=3), parse_checkpoint_ref("random", encoder="alexnet_lab").load(seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))

    file_ref = parse_checkpoint_ref(str(_fake_checkpoint(tmp_path / "snap.pth")))
    assert (file_ref.kind, file_ref.path, file_ref.label) == ("file", tmp_path / "snap.pth", str(tmp_path / "snap.pth"))
    assert file_ref.model_name() == "colornet"
    run = tmp_path / "pretrain-run"
    _fake_checkpoint(run / "checkpoint.pth", "resnet50_lab")
    folder_ref = parse_checkpoint_ref(str(run), option="--init")
    assert (folder_ref.kind, folder_ref.path, folder_ref.label) == ("folder", run / "checkpoint.pth", str(run))
    assert folder_ref.model_name() == "resnet50_lab"
    # Parsing the label again names the same weights.
    assert parse_checkpoint_ref(folder_ref.label).path == folder_ref.path


def test_bad_checkpoint_refs_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match=r"^--init nope\.pth: no such file or folder"):
        parse_checkpoint_ref("nope.pth", option="--init")
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(UsageError, match="without a checkpoint.pth"):
        parse_checkpoint_ref(str(tmp_path / "empty_run"))
    with pytest.raises(UsageError, match="names another encoder than --encoder colornet"):
        parse_checkpoint_ref("random:alexnet_lab", encoder="colornet")
    with pytest.raises(UsageError, match="random needs an encoder"):
        parse_checkpoint_ref("random").model_name()
    torn = tmp_path / "torn.pth"
    torn.write_bytes(b"not a checkpoint")
    with pytest.raises(UsageError, match=r"--checkpoint .*torn\.pth: cannot read"):
        parse_checkpoint_ref(str(torn)).model_name()
    with pytest.raises(UsageError, match="holds a 'colornet', not --encoder 'alexnet_lab'"):
        parse_checkpoint_ref(str(_fake_checkpoint(tmp_path / "c.pth")), encoder="alexnet_lab").model_name()


def test_layer_is_checked_against_the_checkpoints_encoder(tiny_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    checkpoint = _fake_checkpoint(tmp_path / "resnet.pth", "resnet50_lab")
    err = refused(capsys, ["--checkpoint", str(checkpoint), "--layer", "conv5", "--data", str(tiny_data)])
    assert "--layer 'conv5'" in err and "'res5'" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resnet.pth"]


# ----------------------------------------------------------------------------------------------
# Defaults from the encoder card
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("encoder", ["alexnet_lab", "resnet50_lab", "alexnet_rgb_torchvision"])
def test_real_data_defaults_come_from_the_card(tiny_data, encoder):
    args = linear_probe.get_args_parser().parse_args(["--checkpoint", f"random:{encoder}", "--data", str(tiny_data)])
    args.input = "auto"
    settings = resolve_settings(args)
    card = get_card(encoder)
    assert settings["crop"] == card.probe.crop and settings["wd"] == card.probe.weight_decay
    assert settings["epochs"] == 28 and settings["batch_size"] == 256 and settings["resize"] == 256
    assert settings["input_mode"] == "auto"
    assert settings["protocol"] == card.probe.protocol == ("goyal" if encoder == "resnet50_lab" else "zhang")


@pytest.mark.parametrize("extra,protocol", [
    ((), "zhang"), (("--protocol", "max"), "max"), (("--pool", "bilinear"), "zhang"), (("--pool", "avg"), "goyal"),
    (("--pool", "max", "--protocol", "max"), "max"),
])
def test_protocol_option_and_the_deprecated_pool_alias(tiny_data, extra, protocol):
    args = linear_probe.get_args_parser().parse_args(["--checkpoint", "random:alexnet_lab", "--data", str(tiny_data),
                                                      *extra])
    args.input = "auto"
    assert resolve_settings(args)["protocol"] == protocol


def test_pool_is_hidden_from_help():
    text = linear_probe.get_args_parser().format_help()
    assert "--protocol" in text and "zhang" in text and "--pool" not in text


def test_input_grey_rgb_reaches_an_rgb_encoder_as_grey(tiny_data):
    args = linear_probe.get_args_parser().parse_args(
        ["--checkpoint", "random:alexnet_rgb_torchvision", "--data", str(tiny_data), "--input", "grey-rgb"])
    linear_probe.validate(args)
    assert resolve_settings(args)["input_mode"] == "grey"


# ----------------------------------------------------------------------------------------------
# What a run reports
# ----------------------------------------------------------------------------------------------

def test_unreadable_files_are_counted_and_named(tmp_path, monkeypatch, capsys):
    data = make_imagefolder(tmp_path / "broken", per_class=(6, 3))
    (data / "train" / "boat" / "boat_0.jpg").write_bytes(b"not a jpeg")
    (data / "val" / "cloud" / "cloud_1.png").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    result = linear_probe.cli(quick(data, "--out", "run", "--no-plot"))
    err = capsys.readouterr().err
    assert "boat_0.jpg" in err and "cloud_1.png" in err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["skipped_files"] == 2
    assert sorted(Path(p).name for p in summary["skipped"]) == ["boat_0.jpg", "cloud_1.png"]
    assert result["metrics"]["conv1"]["n"] == 8  # 9 val images, one unreadable
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["skipped_files"] for r in log if r["kind"] == "epoch"] == [2]
    named = {(r["where"], Path(f).name) for r in log if r["kind"] == "skipped" for f in r["files"]}
    assert named == {("epoch 1", "boat_0.jpg"), ("validation", "cloud_1.png")}


def test_zero_epochs_scores_the_untrained_heads(tiny_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = linear_probe.cli(quick(tiny_data, "--epochs", "0", "--out", "run", "--no-plot"))
    assert result["metrics"]["conv1"]["n"] == 9 and len(result["rows"]) == 2
    assert json.loads(result["rows"][0].hparams)["iterations"] == 0
    assert not (tmp_path / "run" / "log.jsonl").exists()  # no training, nothing to log


def test_learning_rates_print_without_float_noise():
    lr = 0.01 * 0.1 ** 2
    assert lr != 1e-4 and format_lr(lr) == "1e-04" and clean_lr(lr) == 1e-4
    assert format_lr(0.0025) == "2.5e-03" and format_lr(0.01) == "1e-02" and format_lr(0.1234) == "1.234e-01"


def test_a_one_layer_plot_is_a_labelled_bar_with_its_title(tmp_path):
    table = pd.DataFrame([{"method": "ours: alexnet_lab random", "kind": "ours", "protocol": "goyal",
                           "conv1": 41.25, "runs": 1}])
    title = "linear probes on a-dataset-with-a-rather-long-name-indeed: top-1 at conv1"
    png = plot_accuracy_vs_layer(table, tmp_path / "one.png", title)
    width, height = Image.open(png).size
    assert width > 400 and height > 100  # a figure, not a clipped sliver
    two = table.assign(conv2=50.0)
    assert plot_accuracy_vs_layer(two, tmp_path / "two.png", "two layers").is_file()
    with pytest.raises(ValueError, match="no layer columns"):
        plot_accuracy_vs_layer(table.drop(columns="conv1"), tmp_path / "none.png", "none")


class _FakeSummaryWriter:
    """Stands in for torch.utils.tensorboard.SummaryWriter (tensorboard is an optional dependency)."""

    made: list = []

    def __init__(self, log_dir: str, purge_step: int | None = None) -> None:
        self.log_dir, self.purge_step, self.scalars, self.closed = log_dir, purge_step, [], False
        _FakeSummaryWriter.made.append(self)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, value, step))

    def close(self) -> None:
        self.closed = True


def test_tensorboard_gets_the_scalars_of_the_log(tiny_data, tmp_path, monkeypatch):
    import types

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = _FakeSummaryWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    monkeypatch.chdir(tmp_path)
    args = linear_probe.get_args_parser().parse_args(quick(tiny_data, "--out", "run", "--no-plot", "--tensorboard",
                                                           "--log-every", "1"))
    linear_probe.main(args)
    (writer,) = _FakeSummaryWriter.made
    assert writer.log_dir == str(Path("run") / "tensorboard") and writer.purge_step == 1 and writer.closed
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    expected = [(f"{r['kind']}/{k}", v, r["step"]) for r in log for k, v in r.items()
                if k not in ("step", "kind", "epoch") and isinstance(v, (int, float))]
    assert writer.scalars == expected and ("epoch/val_top1_conv1", log[-1]["val_top1_conv1"], 3) in expected
