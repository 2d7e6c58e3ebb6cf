"""ssl_colorize.benchmarks.throughput and its sections (ssl_colorize.throughput), at toy sizes on the CPU.

No timed assertions: speed targets live in the benchmark's output only. What is checked: the error
convention, the sizes taken from the encoder cards, the steady-window rate read from a trainer's
log.jsonl, each measurement run in process, a section's rows and verdicts, and one tiny CLI run.
"""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys

import pytest
import torch

from ssl_colorize.benchmarks import throughput
from ssl_colorize.models import get_card
from ssl_colorize.throughput import measure, report, runner
from ssl_colorize.throughput import pretrain as pretrain_section
from ssl_colorize.throughput import probe as probe_section

PRETRAIN_JOB = {"section": "pretrain", "device": "cpu", "threads": 1, "workers": 0, "encoder": "resnet50_lab",
                "crop": 32, "batch": 2, "steps": 2, "warmup": 1, "resize": 40}


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    return measure.write_jpegs(tmp_path_factory.mktemp("throughput") / "jpegs", 6, short_side=40)


@pytest.mark.parametrize("argv,message", [
    (["--sections", "loss,speed"], "--sections loss,speed: unknown section 'speed'"),
    (["--sections", ","], "--sections ','"),
    (["--steps", "0"], "--steps 0: must be > 0"),
    (["--warmup", "-1"], "--warmup -1: must be >= 0"),
    (["--crop", "16"], "--crop 16: must be >= 32"),
    (["--probe-batch", "1"], "--probe-batch 1: must be >= 2"),
    (["--encoders", "nope"], "--encoders nope: unknown encoder 'nope'"),
    (["--encoders", "colornet,alexnet_rgb_torchvision"], "alexnet_rgb_torchvision has no colour head"),
    (["--sections", "probe", "--probe-encoder", "nope"], "--probe-encoder nope: unknown encoder"),
    (["--device", "cuda:7" if not torch.cuda.is_available() else "nonsense"], "--device"),
])
def test_mistakes_are_one_line_exit_2_and_nothing_written(tmp_path, capsys, argv, message):
    out_csv = tmp_path / "sub" / "t.csv"
    with pytest.raises(SystemExit) as exc:
        throughput.cli([*argv, "--out-csv", str(out_csv), "--no-progress"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "sub").exists()


def test_out_csv_must_be_a_throughput_table(tmp_path, capsys):
    other = tmp_path / "other.csv"
    other.write_text("section,value\nloss,1\n")
    with pytest.raises(SystemExit):
        throughput.cli(["--sections", "loss", "--out-csv", str(other)])
    assert "is not a throughput table" in capsys.readouterr().err
    assert other.read_text() == "section,value\nloss,1\n"
    (tmp_path / "folder").mkdir()
    with pytest.raises(SystemExit):
        throughput.cli(["--sections", "loss", "--out-csv", str(tmp_path / "folder")])
    assert "is a folder" in capsys.readouterr().err


def test_pretrain_sizes_come_from_the_cards():
    for name in ("alexnet_lab", "colornet", "resnet50_lab"):
        recipe = get_card(name).pretrain
        assert pretrain_section.sizes(name, quick=False) == (recipe.crop, recipe.batch_size)
        assert pretrain_section.sizes(name, quick=True) == (64, max(4, recipe.batch_size // 10))
        assert pretrain_section.sizes(name, quick=True, crop=48, batch=3) == (48, 3)
    with pytest.raises(ValueError, match="no colour head"):
        pretrain_section.sizes("alexnet_rgb_torchvision", quick=False)


def test_steady_rate_skips_the_warm_up_records():
    records = [{"step": 2, "images_per_sec": 1.0}, {"step": 4, "images_per_sec": 10.0},
               {"step": 6, "images_per_sec": 30.0}, {"step": 8, "images_per_sec": 20.0}, {"step": 8, "loss": 1.0}]
    median, overall, count = pretrain_section.steady_rate(records, warmup=3)  # steps 3-4 include warm-up step 3
    assert (median, count) == (25.0, 2)
    assert overall == pytest.approx(4 / (2 / 30 + 2 / 20))  # the window's images over its time
    assert pretrain_section.steady_rate(records, warmup=0)[2] == 4
    with pytest.raises(ValueError, match="no rate record"):
        pretrain_section.steady_rate(records, warmup=8)


def test_pretrain_measurements_in_process(jpegs):
    job = {**PRETRAIN_JOB, "jpeg_dir": str(jpegs)}
    compute = runner.run_job_here({**job, "variant": "compute"})
    # FLOPs: a training step is the forward and about twice as much again for the backward.
    assert compute["gflops_per_image"] > 0
    assert 2.0 < compute["train_gflops_per_image"] / compute["gflops_per_image"] < 3.2
    trainer = runner.run_job_here({**job, "variant": "trainer"})
    assert trainer["images_per_s"] > 0 and trainer["log_records"] == 2 and trainer["ignored_options"] == []
    assert trainer["ms_per_step"] == pytest.approx(1e3 * job["batch"] / trainer["images_per_s"])
    assert trainer["data_only_images_per_s"] > 0 and trainer["data_path"] == "workers"
    reference = runner.run_job_here({**job, "variant": "reference"})
    assert reference["images_per_s"] > 0 and 0 <= reference["data_wait_share"] <= 1
    assert reference["data_only_images_per_s"] > 0 and reference["peak_host_mb"] > 0


def test_the_trainer_runs_with_its_public_options(tmp_path):
    from ssl_colorize import pretrain

    argv = pretrain_section.trainer_argv({**PRETRAIN_JOB, "jpeg_dir": "unused"}, tmp_path / "list.txt", tmp_path / "run", 1)
    args, ignored = pretrain_section.parse_trainer_args(pretrain.get_args_parser(), argv)
    assert ignored == [] and args.steps == 3 and args.ckpt_every == 3 and args.log_every == 1 and args.no_progress
    with pytest.raises(RuntimeError, match="--no-such-option"):
        pretrain_section.parse_trainer_args(pretrain.get_args_parser(), [*argv, "--no-such-option"])


def test_probe_measurements_in_process(jpegs):
    job = {"section": "probe", "device": "cpu", "threads": 1, "encoder": "alexnet_lab", "crop": 99, "batch": 2,
           "classes": 5, "steps": 1, "warmup": 0, "jpeg_dir": str(jpegs)}
    for variant in ("one_pass", "single_tap"):
        result = runner.run_job_here({**job, "variant": variant})
        assert result["taps"] == ["conv1", "conv2", "conv3", "conv4", "conv5"] and result["ms_per_step"] > 0


def test_pretrain_section_rows_verdicts_and_notes(jpegs, monkeypatch, capsys):
    """The section's assembly, with the measurements run in this process."""
    monkeypatch.setattr(pretrain_section, "run_all", lambda jobs, progress: [runner.run_job_here(j) for j in jobs])
    args = throughput.get_args_parser().parse_args(
        ["--encoders", "resnet50_lab", "--crop", "32", "--batch-size", "2", "--steps", "1", "--warmup", "0",
         "--jpeg-dir", str(jpegs), "--target-images-per-s", "1e9"])
    rep = report.Report(torch.device("cpu"), 1)
    pretrain_section.run_section(args, torch.device("cpu"), {"device": "cpu", "threads": 1, "workers": 0}, rep)
    assert [r["variant"] for r in rep.rows] == ["resnet50_lab/compute", "resnet50_lab/reference", "resnet50_lab/trainer"]
    trainer = rep.rows[2]
    settings = json.loads(trainer["settings"])
    assert settings["crop"] == 32 and settings["batch"] == 2 and settings["train_gflops_per_image"] > 0
    assert trainer["ratio"] == pytest.approx(trainer["images_per_s"] / rep.rows[1]["images_per_s"])
    assert settings["vs_compute"] == pytest.approx(trainer["images_per_s"] / rep.rows[0]["images_per_s"])
    assert rep.verdicts[0].startswith("pretrain_trainer_resnet50_lab: ratio ") and "[target >= 3x" in rep.verdicts[0]
    assert rep.verdicts[1].startswith("data_path_resnet50_lab: ratio ")
    assert "the compute-only bound" in rep.notes[0] and "FLOP/s achieved" in rep.notes[0]
    assert "[target >= 1e+09 img/s: not met]" in rep.notes[0]
    assert measure.jpeg_paths(jpegs)  # a --jpeg-dir of ours is kept


def test_probe_section_rows_and_verdicts(monkeypatch, tmp_path):
    seen = []

    def fake_run_all(jobs, progress):
        seen.extend(jobs)
        return [{"ms_per_step": 10.0 if j["variant"] == "single_tap" else 2.0, "images_per_s": 1.0,
                 "taps": ["conv1"]} for j in jobs]

    monkeypatch.setattr(probe_section, "run_all", fake_run_all)
    args = throughput.get_args_parser().parse_args(["--jpeg-dir", str(tmp_path / "j"), "--jpeg-count", "2",
                                                    "--jpeg-size", "40", "--probe-batch", "2"])
    rep = report.Report(torch.device("cpu"), 1)
    probe_section.run_section(args, torch.device("cpu"), {"device": "cpu", "threads": 1, "workers": 0}, rep)
    assert len(seen) == 4 and {j["jpeg_dir"] is None for j in seen} == {True, False}
    assert rep.verdicts[0] == ("probe_one_pass: ratio 5.0x (ours 2 ms for five taps, reference 10 ms for five "
                               "single-tap runs) [target >= 3x: met]")


def test_cli_writes_rows_and_verdicts(tmp_path):
    out_csv = tmp_path / "results" / "throughput.csv"
    proc = subprocess.run(
        [sys.executable, "-m", "ssl_colorize.benchmarks.throughput", "--quick", "--sections", "loss", "--loss-batch", "2",
         "--loss-size", "16", "--steps", "1", "--warmup", "0", "--threads", "1", "--no-progress", "--out-csv", str(out_csv)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out_csv) as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    assert reader.fieldnames == report.CSV_COLUMNS
    assert [r["variant"] for r in rows] == ["reference", "ours"]
    assert all(r["section"] == "loss" and r["torch"] == torch.__version__ for r in rows)
    assert float(rows[1]["ratio"]) > 0 and float(rows[0]["ms_per_step"]) > 0
    settings = json.loads(rows[1]["settings"])
    assert settings["logits"] == [2, 313, 16, 16] and settings["extra_host_mb"] is not None
    lines = proc.stdout.strip().splitlines()
    pattern = re.compile(r"^[a-z_]+: ratio (\d+\.\d+x|n/a) \(ours [^,]+, reference [^)]+\)")
    assert pattern.match(lines[-2]) and lines[-2].startswith("loss_speed_cpu:")
    assert pattern.match(lines[-1]) and lines[-1].startswith("loss_extra_host_memory:")
    assert not (tmp_path / "runs").exists()  # nothing else written in the working folder


def test_launcher_and_module_refuse_alike(tmp_path):
    """``python benchmarks/throughput.py`` is ``python -m ssl_colorize.benchmarks.throughput``."""
    from pathlib import Path

    launcher = Path(__file__).resolve().parent.parent / "benchmarks" / "throughput.py"
    errors = []
    for command in ([str(launcher)], ["-m", "ssl_colorize.benchmarks.throughput"]):
        proc = subprocess.run([sys.executable, *command, "--sections", "nope"], capture_output=True, text=True,
                              timeout=60, cwd=tmp_path)
        assert proc.returncode == 2 and proc.stdout == ""
        errors.append(proc.stderr)
    assert errors[0] == errors[1] == "throughput: error: --sections nope: unknown section 'nope'; choose from loss, pretrain, probe\n"
