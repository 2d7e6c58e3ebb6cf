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
from ssl_colorize.throughput import machine, measure, report, runner, trainer, worker_cost
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
    (["--trainer-variants", "default;--no-such 1"], "--trainer-variants 'default;--no-such 1': variant '--no-such 1': "
                                                    "ssl_colorize.pretrain refuses it: unrecognized arguments: --no-such 1"),
    (["--trainer-variants", "--workers 0;--steps 3"], "variant '--steps 3': --steps is set by the benchmark itself"),
    (["--trainer-variants", "--workers x"], "variant '--workers x': ssl_colorize.pretrain refuses it: argument --workers"),
    (["--trainer-variants", "default; default"], "variant 'default' is named twice"),
    (["--trainer-variants", " ; "], "--trainer-variants ' ; ': name at least one configuration"),
    (["--skip", "reference,compute"], "--skip reference,compute: unknown row 'compute'; choose from reference, trainer_folder"),
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
    median, overall, count = trainer.steady_rate(records, warmup=3)  # steps 3-4 include warm-up step 3
    assert (median, count) == (25.0, 2)
    assert overall == pytest.approx(4 / (2 / 30 + 2 / 20))  # the window's images over its time
    assert trainer.steady_rate(records, warmup=0)[2] == 4
    with pytest.raises(ValueError, match="no rate record"):
        trainer.steady_rate(records, warmup=8)


def test_data_wait_share_of_the_window():
    # Steps 3-4 at 20 img/s (batch 2: 0.1 s per step) waiting 10 ms per step, steps 5-6 at 10 img/s waiting 50 ms.
    records = [{"step": 2, "images_per_sec": 1.0, "data_wait_ms": 500.0},
               {"step": 4, "images_per_sec": 20.0, "data_wait_ms": 10.0},
               {"step": 6, "images_per_sec": 10.0, "data_wait_ms": 50.0}]
    assert trainer.data_wait_share(records, warmup=2, batch=2) == pytest.approx((2 * 0.01 + 2 * 0.05) / (2 * 0.1 + 2 * 0.2))
    assert trainer.data_wait_share([{"step": 4, "images_per_sec": 1.0}], warmup=0, batch=2) is None


def test_epoch_boundaries_are_counted_over_the_window_only():
    records = [{"step": s, "images_per_sec": 1.0, "epoch": e} for s, e in ((2, 0), (4, 1), (6, 1), (8, 2), (10, 3))]
    assert trainer.epoch_boundaries(records, warmup=4) == 2  # the window (steps 5-10) starts in epoch 1, ends in 3
    assert trainer.epoch_boundaries(records, warmup=0) == 3
    assert trainer.epoch_boundaries([{k: v for k, v in r.items() if k != "epoch"} for r in records], 4) is None


def test_pretrain_measurements_in_process(jpegs):
    job = {**PRETRAIN_JOB, "jpeg_dir": str(jpegs)}
    compute = runner.run_job_here({**job, "variant": "compute"})
    # FLOPs: a training step is the forward and about twice as much again for the backward.
    assert compute["gflops_per_image"] > 0
    assert 2.0 < compute["train_gflops_per_image"] / compute["gflops_per_image"] < 3.2
    listed = runner.run_job_here({**job, "variant": "trainer", "trainer_options": [], "measure_data": True})
    assert listed["images_per_s"] > 0 and listed["log_records"] == 2 and listed["ignored_options"] == []
    assert listed["ms_per_step"] == pytest.approx(1e3 * job["batch"] / listed["images_per_s"])
    assert listed["data_only_images_per_s"] > 0 and listed["data_path"] == "workers"
    assert (listed["data_only_skipped_batches"], listed["data_only_timed_batches"]) == (1, 2)  # no worker: nothing ahead
    assert listed["worker_cost"]["per_worker_images_per_s"] > 0 and listed["epoch_boundaries"] == 0
    assert 0 <= listed["data_wait_share"] <= 1
    reference = runner.run_job_here({**job, "variant": "reference"})
    assert reference["images_per_s"] > 0 and 0 <= reference["data_wait_share"] <= 1
    assert reference["data_only_images_per_s"] > 0 and reference["peak_host_mb"] > 0


def test_the_trainer_runs_with_its_public_options(tmp_path):
    from ssl_colorize import pretrain

    argv = trainer.trainer_argv({**PRETRAIN_JOB, "jpeg_dir": "unused"}, tmp_path / "list.txt", tmp_path / "run", 1)
    args, ignored = trainer.parse_trainer_args(pretrain.get_args_parser(), argv)
    assert ignored == [] and args.steps == 3 and args.ckpt_every == 3 and args.log_every == 1 and args.no_progress
    with pytest.raises(RuntimeError, match="--no-such-option"):
        trainer.parse_trainer_args(pretrain.get_args_parser(), [*argv, "--no-such-option"])
    # A configuration's options come last, so that they win over the benchmark's.
    job = {**PRETRAIN_JOB, "jpeg_dir": "unused", "trainer_options": ["--workers", "3", "--log-every", "2"]}
    args, _ = trainer.parse_trainer_args(pretrain.get_args_parser(), trainer.trainer_argv(job, tmp_path, tmp_path / "run", 1))
    assert args.workers == 3 and args.log_every == 2


def test_trainer_variants_are_named_by_their_options():
    assert trainer.parse_variants("default") == [("trainer", [])]
    assert trainer.parse_variants(" default ; --workers  0;--log-every 2;") == [
        ("trainer", []), ("trainer[--workers 0]", ["--workers", "0"]), ("trainer[--log-every 2]", ["--log-every", "2"])]
    with pytest.raises(ValueError, match="refuses it: unrecognized arguments: --no-such"):
        trainer.parse_variants("default;--no-such")
    with pytest.raises(ValueError, match="--data is set by the benchmark"):
        trainer.parse_variants("--data=elsewhere")


def test_machine_rate_and_model_flop_utilisation():
    # The H200 figures: 51.7 GFLOP per image x 3,350 img/s = 173.2 TFLOP/s, 21.9% of 790 TFLOP/s.
    achieved = machine.achieved_tflops(51.7, 3350)
    assert achieved == pytest.approx(173.195)
    assert machine.utilisation(achieved, 790.0) == pytest.approx(0.219234, rel=1e-5)
    assert machine.utilisation(achieved, None) is None
    assert machine.describe(achieved, {"matmul_tflops": 790.0, "matmul_dtype": "bf16"}) == (
        "173.2 TFLOP/s achieved, 21.9% of the measured bf16 matrix rate")
    assert machine.describe(0.0412, None) == "41.2 GFLOP/s achieved"
    # A clock that advances 0.5 s per reading: each of the 64^3 products "takes" 0.5 s, 2 x 64^3 FLOPs.
    ticks = iter(0.5 * i for i in range(100))
    rate = machine.matmul_rate(torch.device("cpu"), size=64, warmup=1, repeats=3, clock=lambda: next(ticks))
    assert rate["matmul_tflops"] == pytest.approx(2 * 64**3 / 0.5 / 1e12) and rate["matmul_ms"] == pytest.approx(500)
    assert (rate["matmul_size"], rate["matmul_dtype"], rate["matmul_repeats"]) == (64, "fp32", 3)


def test_data_only_window_skips_the_prefetched_batches(jpegs):
    from ssl_colorize.data import ImageFiles
    from ssl_colorize.data.loader import PretrainLoader

    consumed, readings = [], []

    def batches():
        for i in range(100):
            consumed.append(i)
            yield i

    def clock():  # the time is the number of batches taken so far
        readings.append(len(consumed))
        return float(len(consumed))

    rate = trainer.steady_window_rate(batches(), skip=9, timed=12, images_per_batch=4, clock=clock)
    assert readings == [9, 21] and len(consumed) == 21  # timed from the 10th batch to the 21st
    assert rate == pytest.approx(12 * 4 / 12)
    files = ImageFiles(jpegs)
    sampler = measure.CyclingSampler(len(files), 8)
    for workers, ahead in ((0, 0), (2, 8)):  # the DataLoader's prefetch: 4 batches per worker
        loader = PretrainLoader(files, sampler, 2, 32, 40, "cpu", "workers", workers=workers)
        assert trainer.batches_ahead(loader) == ahead
    # A CUDA loader's producer thread holds its own batches ahead (none when the step takes them inline).
    from types import SimpleNamespace

    cuda = SimpleNamespace(workers=8, prefetch=2, device=torch.device("cuda"), mode="workers", hand_off="thread",
                           host_loader=lambda: SimpleNamespace(prefetch_factor=4))
    assert trainer.batches_ahead(cuda) == 8 * 4 + 2
    assert trainer.batches_ahead(SimpleNamespace(**{**vars(cuda), "hand_off": "inline"})) == 8 * 4


def test_worker_stages_and_their_rates(jpegs):
    # Hand-computed: 0.7 + 0.7 + 0.01 + 1.05 ms per image = 2.46 ms: 406.5 img/s per worker, 8 workers 3252;
    # without the targets 1.41 ms: 709.2 and 5674.
    rates = worker_cost.worker_rates({"read_decode": 7e-4, "resize_crop": 7e-4, "stack": 1e-5, "targets": 1.05e-3}, 8)
    assert rates["per_worker_images_per_s"] == pytest.approx(1 / 2.46e-3)
    assert rates["loader_bound_images_per_s"] == pytest.approx(8 / 2.46e-3)
    assert rates["per_worker_images_per_s_no_targets"] == pytest.approx(1 / 1.41e-3)
    assert rates["loader_bound_images_per_s_no_targets"] == pytest.approx(8 / 1.41e-3)
    assert worker_cost.worker_rates({"read_decode": 1, "resize_crop": 1, "stack": 1, "targets": 1}, 0)[
        "loader_bound_images_per_s"] == pytest.approx(0.25)  # no workers: the training process loads
    threads = torch.get_num_threads()
    cost = worker_cost.measure_worker(str(jpegs), 32, 40, "squash", 8, 3, workers=2, lightness=False)
    assert torch.get_num_threads() == threads  # one thread while timing, as a worker; restored after
    stages = [cost[f"{name}_ms"] for name in ("read_decode", "resize_crop", "stack", "targets")]
    assert all(ms > 0 for ms in stages[:2]) and all(ms >= 0 for ms in stages[2:]) and cost["images_timed"] == 6
    assert 1e3 / sum(stages) == pytest.approx(cost["per_worker_images_per_s"])
    assert cost["loader_bound_images_per_s"] == pytest.approx(2 * cost["per_worker_images_per_s"])


def test_the_folder_run_reads_an_image_folder(jpegs, tmp_path):
    from ssl_colorize.data import ImageFiles

    root = trainer.write_image_folder(measure.jpeg_paths(jpegs), tmp_path / "folder")
    files = ImageFiles(root)
    assert files.classes == ["class0"] and set(files.labels) == {0} and len(files) == 6
    assert [p.read_bytes() for p in files.paths] == [p.read_bytes() for p in measure.jpeg_paths(jpegs)]
    # 6 files of batch 2 (no preview held out below 65 files): 3 steps per epoch, a window of 3 epochs.
    steps = trainer.trainer_steps(2, 6, 2)
    assert (trainer.folder_batches_per_epoch(6, 2), steps, trainer.folder_batches_per_epoch(3600, 80)) == (3, 9, 44)
    job = {**PRETRAIN_JOB, "jpeg_dir": str(jpegs), "variant": "trainer_folder", "steps": steps, "folder_images": 6}
    result = runner.run_job_here(job)
    assert result["images_per_s"] > 0 and result["overall_images_per_s"] > 0
    assert result["epoch_boundaries"] == 3  # the window (steps 2-10) ends in epoch 3 (a list run stays in epoch 0)


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
         "--jpeg-dir", str(jpegs), "--target-images-per-s", "1e9", "--trainer-variants", "default;--log-every 2"])
    rep = report.Report(torch.device("cpu"), 1)
    pretrain_section.run_section(args, torch.device("cpu"), {"device": "cpu", "threads": 1, "workers": 0}, rep)
    assert [r["variant"] for r in rep.rows] == [
        "machine/matmul", "resnet50_lab/compute", "resnet50_lab/reference", "resnet50_lab/trainer",
        "resnet50_lab/trainer[--log-every 2]", "resnet50_lab/trainer_folder"]
    matmul = json.loads(rep.rows[0]["settings"])["matmul_tflops"]
    compute, listed, other, folder = (rep.rows[i] for i in (1, 3, 4, 5))
    settings = json.loads(listed["settings"])
    assert settings["crop"] == 32 and settings["batch"] == 2 and settings["train_gflops_per_image"] > 0
    assert settings["steps"] == 9 and settings["data_only_images_per_s"] > 0 and "worker_cost" in settings
    assert listed["ratio"] == pytest.approx(listed["images_per_s"] / rep.rows[2]["images_per_s"])
    assert settings["vs_compute"] == pytest.approx(listed["images_per_s"] / compute["images_per_s"])
    assert settings["mfu"] == pytest.approx(settings["train_gflops_per_image"] * listed["images_per_s"] / 1e3 / matmul)
    assert json.loads(compute["settings"])["mfu"] > 0
    assert json.loads(other["settings"])["trainer_options"] == ["--log-every", "2"]
    assert json.loads(other["settings"])["log_every"] == 2 and "worker_cost" not in json.loads(other["settings"])
    folder_settings = json.loads(folder["settings"])
    assert folder_settings["folder_images"] == 6 and folder_settings["epoch_boundaries"] == 3
    assert folder_settings["vs_list"] == pytest.approx(folder_settings["overall_images_per_s"] / settings["overall_images_per_s"])
    assert rep.verdicts[0].startswith("pretrain_trainer_resnet50_lab: ratio ") and "[target >= 3x" in rep.verdicts[0]
    assert rep.verdicts[1].startswith("data_path_resnet50_lab: ratio ")
    assert rep.verdicts[2].startswith("epoch_boundary_resnet50_lab: ratio ") and "[target >= 0.95x" in rep.verdicts[2]
    assert rep.notes[0].startswith("machine: fp32 matrix rate ")
    assert "the compute-only bound" in rep.notes[1] and "% of the measured fp32 matrix rate" in rep.notes[1]
    assert "[target >= 1e+09 img/s: not met]" in rep.notes[1]
    assert "data path alone" in rep.notes[2] and "per worker" in rep.notes[2]
    assert rep.notes[3].startswith("resnet50_lab trainer[--log-every 2]: ")
    assert "trainer_folder: an ImageFolder of 6 JPEGs (3 steps per epoch), 3 epoch boundaries" in rep.notes[4]
    assert "[target: within 5% of the list run: " in rep.notes[4]
    assert folder["images_per_s"] == pytest.approx(folder_settings["overall_images_per_s"])
    assert measure.jpeg_paths(jpegs)  # a --jpeg-dir of ours is kept


def test_skip_leaves_out_the_reference_and_folder_rows(jpegs, monkeypatch):
    """--skip reference,trainer_folder: compute and the trainer rows only, no comparison that needs the reference."""
    monkeypatch.setattr(pretrain_section, "run_all", lambda jobs, progress: [runner.run_job_here(j) for j in jobs])
    args = throughput.get_args_parser().parse_args(
        ["--encoders", "resnet50_lab", "--crop", "32", "--batch-size", "2", "--steps", "1", "--warmup", "0",
         "--jpeg-dir", str(jpegs), "--skip", "reference,trainer_folder"])
    rep = report.Report(torch.device("cpu"), 1)
    pretrain_section.run_section(args, torch.device("cpu"), {"device": "cpu", "threads": 1, "workers": 0}, rep)
    assert [r["variant"] for r in rep.rows] == ["machine/matmul", "resnet50_lab/compute", "resnet50_lab/trainer"]
    assert rep.rows[2]["ratio"] is None and json.loads(rep.rows[2]["settings"])["vs_compute"] > 0
    assert rep.verdicts == [] and "the compute-only bound" in rep.notes[1] and "data path alone" in rep.notes[2]


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
