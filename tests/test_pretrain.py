"""The pretext trainer: resume equivalence, DDP equivalence, bad input, run-folder contents."""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_colorize.checkpoint import load_checkpoint, load_encoder, save_checkpoint
from ssl_colorize.data.loader import PretrainLoader
from ssl_colorize.engine.cli import UsageError
from ssl_colorize.models import create_model
from ssl_colorize.pretrain import cli, get_args_parser, main
from ssl_colorize.training.pretext import ResumableSampler, UnreadableGuard

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _free_disk_after_test(request):
    """Each AlexNet checkpoint is ~0.7 GB (weights + Adam moments): drop a test's files once it is done."""
    yield
    tmp = request.node.funcargs.get("tmp_path")
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)
TINY = ["--crop", "64", "--resize", "72", "--batch-size", "4", "--workers", "0", "--no-progress", "--log-every", "1"]


def run(tmp_path, name, *extra):
    args = get_args_parser().parse_args(["--out", str(tmp_path / name), *TINY, *extra])
    return main(args)


def make_folder(root: Path, n_per_class=6, classes=("a", "b"), seed=0):
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            array = rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)
            array[:20] = (200, 30, 30) if c == "a" else (30, 30, 200)
            Image.fromarray(array).save(root / c / f"{i}.jpg")
    return root


def weights(path):
    return load_checkpoint(path)["state_dict"]


def assert_same_weights(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=atol, rtol=1e-5), key


def read_log(folder):
    return [json.loads(line) for line in (Path(folder) / "log.jsonl").read_text().splitlines()]


def usage_error(capsys, argv):
    """Run the command line in this process: -> its one stderr line (exit status 2 asserted)."""
    with pytest.raises(SystemExit) as exit_info:
        cli(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def test_builtin_run_leaves_checkpoint_log_preview_and_snapshots(tmp_path, capsys):
    result = run(tmp_path, "r", "--steps", "6", "--ckpt-every", "3", "--snapshot-every", "3")
    out = Path(result["out"])
    printed = capsys.readouterr().out
    assert "s/step measured over steps 2-4" in printed and "for the 2 steps left" in printed  # the time it takes
    assert f"checkpoint {out / 'checkpoint.pth'}" in printed  # where the result is, and what to run next
    assert f"ssl_colorize.benchmarks.linear_probe --checkpoint {out / 'checkpoint.pth'}" in printed
    assert (out / "checkpoint.pth").is_file() and (out / "config.json").is_file()
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert all(r["images_per_sec"] > 0 and r["lr"] > 0 and r["data_wait_ms"] >= 0 for r in log)
    previews = sorted(out.glob("preview_step*.png"))
    assert [p.name for p in previews] == ["preview_step0000003.png", "preview_step0000006.png"]
    w, h = Image.open(previews[-1]).size
    assert h == 3 * 64 and w == 8 * 64  # rows: grey, ours, truth; 8 held-out images
    assert sorted(p.name for p in (out / "snapshots").iterdir()) == ["step_0000003.pth", "step_0000006.pth"]
    ckpt = load_checkpoint(out / "checkpoint.pth")
    assert ckpt["step"] == 6 and ckpt["model"]["name"] == "alexnet_lab"
    assert ckpt["bins"].shape == (313, 2) and ckpt["prior"].shape == (313,)
    for key in ("optimizer", "scheduler", "rng", "data_state", "config", "version"):
        assert key in ckpt
    model = load_encoder(out / "checkpoint.pth")  # rebuilt with no extra flags
    assert not model.training


def test_resume_after_stop_equals_uninterrupted(tmp_path):
    full = run(tmp_path, "full", "--steps", "6", "--ckpt-every", "2")
    assert not (tmp_path / "full" / "snapshots").exists()  # built-in runs keep the rolling checkpoint only
    run(tmp_path, "split", "--steps", "6", "--ckpt-every", "2", "--stop-after", "3")
    assert load_checkpoint(tmp_path / "split" / "checkpoint.pth")["step"] == 3
    with open(tmp_path / "split" / "log.jsonl", "a") as log:  # a kill after logging step 4, before its checkpoint
        log.write(json.dumps({"step": 4, "loss": 1.0}) + "\n" + '{"step": 5, "lo')
    resumed = run(tmp_path, "split", "--steps", "6", "--ckpt-every", "2", "--resume")
    assert resumed["step"] == 6
    assert [r["step"] for r in read_log(tmp_path / "split")] == [1, 2, 3, 4, 5, 6]
    assert read_log(tmp_path / "split")[3]["loss"] != 1.0  # the resumed run's record, not the stale one
    assert resumed["loss"] == pytest.approx(full["loss"], rel=1e-5)
    assert_same_weights(weights(tmp_path / "full" / "checkpoint.pth"), weights(tmp_path / "split" / "checkpoint.pth"))


def test_resume_after_a_real_kill(tmp_path):
    """SIGKILL a training process mid-run; resuming reaches the uninterrupted run's weights."""
    common = [*TINY, "--steps", "6", "--ckpt-every", "2", "--encoder", "alexnet_lab"]
    full = run(tmp_path, "full", "--steps", "6", "--ckpt-every", "6")
    out = tmp_path / "killed"
    # One intra-op thread, as in this process (conftest): the same reduction order, the same floats.
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ssl_colorize.pretrain", "--out", str(out), *common], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline:
        log = out / "log.jsonl"
        # Past the checkpoint at step 2, which a background thread writes: its file is there once it landed.
        if log.exists() and len(log.read_text().splitlines()) >= 3 and (out / "checkpoint.pth").exists():
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step_at_kill = load_checkpoint(out / "checkpoint.pth")["step"]
    assert 2 <= step_at_kill < 6
    resumed = run(tmp_path, "killed", "--steps", "6", "--ckpt-every", "2", "--resume")
    assert resumed["step"] == 6
    assert [r["step"] for r in read_log(out)] == [1, 2, 3, 4, 5, 6]  # no step twice after kill + resume
    assert resumed["loss"] == pytest.approx(full["loss"], rel=1e-5)
    assert_same_weights(weights(tmp_path / "full" / "checkpoint.pth"), weights(out / "checkpoint.pth"))


def test_two_process_ddp_equals_one_process_on_the_global_batch(tmp_path):
    steps = ["--steps", "2", "--ckpt-every", "1", "--snapshot-every", "1"]
    run(tmp_path, "single", *steps)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29561",
           "-m", "ssl_colorize.pretrain", "--out", str(tmp_path / "ddp"), *TINY, *steps]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ddp_log = [json.loads(line) for line in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    single_log = [json.loads(line) for line in (tmp_path / "single" / "log.jsonl").read_text().splitlines()]
    assert len(ddp_log) == len(single_log) == 2
    for a, b in zip(ddp_log, single_log):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    assert json.loads((tmp_path / "ddp" / "config.json").read_text())["world_size"] == 2
    # The first step's gradient (Adam's first moment after one step, 0.1 g) agrees to 0.1% of its
    # norm; the update, which in Adam's first step is lr * sign(g), is the same in all but a handful of
    # elements whose gradient is ~0; the second step's loss above shows the update acted alike. Biases of
    # convolutions that feed a BatchNorm are left out: BatchNorm cancels them, so their gradient is
    # float noise (~1e-9) that Adam's lr * sign(gradient)-like first step turns into moves of size lr.
    # (Later steps are not compared weight by weight for the same reason: such noise in elements with
    # near-zero gradient grows into per-cent differences without changing the loss.)
    single_ckpt = load_checkpoint(tmp_path / "single" / "snapshots" / "step_0000001.pth")
    ddp_ckpt = load_checkpoint(tmp_path / "ddp" / "snapshots" / "step_0000001.pth")
    torch.manual_seed(0)  # the trainer's own seeded initialisation
    initial = create_model("alexnet_lab")
    names = [name for name, _ in initial.named_parameters()]
    compared = 0
    for index, single_state in single_ckpt["optimizer"]["state"].items():
        single_m, ddp_m = single_state["exp_avg"], ddp_ckpt["optimizer"]["state"][index]["exp_avg"]
        if single_m.norm() < 1e-6:
            continue  # a bias before a BatchNorm
        compared += 1
        assert (single_m - ddp_m).norm() <= 1e-3 * single_m.norm(), names[index]
        w0 = initial.state_dict()[names[index]]
        single_update = single_ckpt["state_dict"][names[index]] - w0
        ddp_update = ddp_ckpt["state_dict"][names[index]] - w0
        lr = single_ckpt["optimizer"]["param_groups"][0]["lr"]
        differing = ((single_update - ddp_update).abs() > 0.1 * lr).float().mean()
        assert differing <= 1e-3, (names[index], float(differing))
    assert compared >= 8  # every conv / fc weight and the head


def test_corrupt_and_non_image_files_are_skipped_and_counted(tmp_path, capsys, monkeypatch):
    data = make_folder(tmp_path / "data", n_per_class=8)
    (data / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (data / "b" / "empty.png").write_bytes(b"")
    (data / "b" / "notes.txt").write_text("not an image")
    loaders = []
    original = PretrainLoader.host_loader
    monkeypatch.setattr(PretrainLoader, "host_loader", lambda self: loaders.append(self) or original(self))
    result = main(get_args_parser().parse_args(
        ["--data", str(data), "--out", str(tmp_path / "r"), *TINY, "--steps", "8", "--ckpt-every", "8"]))
    assert result["step"] == 8
    assert max(r["epoch"] for r in read_log(tmp_path / "r")) >= 1  # 18 files, 4 a batch: past one epoch ...
    assert len(loaders) == 1  # ... with one DataLoader for the whole run
    assert result["skipped"] >= 2  # both bad files were met at least once in 8 steps over 18 files
    err = capsys.readouterr().err
    assert "broken.jpg" in err and "empty.png" in err and "skipped" in err


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_missing_or_empty_data_fails_before_training(tmp_path, make, capsys):
    data = tmp_path / "data"
    if make == "empty":
        (data / "class").mkdir(parents=True)
    line = usage_error(capsys, ["--data", str(data), "--out", str(tmp_path / "r"), *TINY, "--steps", "2"])
    assert f"--data {data}" in line
    assert not (tmp_path / "r").exists()


def test_a_folder_with_nothing_readable_stops_at_once(tmp_path):
    """Issue 16: 40 text files named .jpg: one line naming the folder, exit 2, in seconds, nothing written."""
    data = tmp_path / "data"
    data.mkdir()
    for i in range(40):
        (data / f"photo_{i:02d}.jpg").write_text("not an image\n")
    cmd = [sys.executable, "-m", "ssl_colorize.pretrain", "--data", str(data), "--out", str(tmp_path / "r"),
           "--batch-size", "4", "--no-progress"]
    started = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and str(data) in lines[0] and "photo_00.jpg" in lines[0], lines
    assert time.time() - started < 60
    assert not (tmp_path / "r").exists() and not (tmp_path / "runs").exists()


def test_unreadable_guard_counts_files_in_a_row():
    guard = UnreadableGuard("data/", num_files=5000)
    assert guard.limit == 1000
    for _ in range(99):
        guard.update([f"bad{i}.jpg" for i in range(10)], decoded=0)
    guard.update(["x.jpg"], decoded=3)  # a batch with a readable image ends the run of bad files
    for _ in range(99):
        guard.update([f"bad{i}.jpg" for i in range(10)], decoded=0)
    with pytest.raises(UsageError, match=r"--data data/: 1000 files in a row .*bad0\.jpg"):
        guard.update([f"bad{i}.jpg" for i in range(10)], decoded=0)
    small = UnreadableGuard("small/", num_files=6)  # fewer files than the bound: all of them
    small.update(["a.jpg", "b.jpg", "c.jpg", "d.jpg"], decoded=0)
    with pytest.raises(UsageError, match="6 files in a row"):
        small.update(["e.jpg", "f.jpg"], decoded=0)


def test_endless_sampler_runs_the_epochs_one_after_the_other():
    epochs = []
    for epoch in range(3):
        one = ResumableSampler(10, 3, seed=7)
        one.set_position(epoch, 0)
        epochs += list(one)
    endless = ResumableSampler(10, 3, seed=7, endless=True)
    items = iter(endless)
    assert [next(items) for _ in range(27)] == epochs  # 3 batches of 3 per epoch (one image left out)
    resumed = ResumableSampler(10, 3, seed=7, endless=True)
    resumed.set_position(1, 2)  # resumed in the middle of the second epoch
    items = iter(resumed)
    assert [next(items) for _ in range(12)] == epochs[15:]
    assert epochs[:9] != epochs[9:18]  # each epoch its own order


def test_used_run_folder_is_refused_and_overwrite_starts_clean(tmp_path, capsys):
    argv = ["--out", str(tmp_path / "r"), *TINY, "--steps", "2", "--ckpt-every", "2"]
    cli(argv)
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir() if p.is_file()}
    line = usage_error(capsys, argv)
    assert "--resume" in line and "--overwrite" in line and str(tmp_path / "r") in line
    assert {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir() if p.is_file()} == before
    (tmp_path / "r" / "mine.txt").write_text("not the run's")  # the user's own file in the folder
    result = cli([*argv, "--overwrite", "--lr", "3e-4"])
    assert result["step"] == 2
    assert [r["step"] for r in read_log(tmp_path / "r")] == [1, 2]  # a fresh log, from step 0
    assert json.loads((tmp_path / "r" / "config.json").read_text())["lr"] == 3e-4
    assert (tmp_path / "r" / "mine.txt").read_text() == "not the run's"


def test_bad_options_fail_before_any_work(tmp_path, capsys):
    (tmp_path / "file").write_text("a file")
    (tmp_path / "bad_prior.csv").write_text("0.5\n0.5\n")  # 2 values, not 313
    for extra, needle in ((["--encoder", "vgg99"], "vgg99"), (["--lr", "-1"], "--lr -1"), (["--crop", "8"], "--crop 8"),
                          (["--prior", str(tmp_path / "nope.csv")], "--prior"), (["--lam", "1.5"], "--lam 1.5"),
                          (["--prior", str(tmp_path / "bad_prior.csv")], "313 values"),
                          (["--steps", "0"], "--steps 0"), (["--ckpt-every", "0"], "--ckpt-every 0"),
                          (["--k", "0"], "--k 0"), (["--sigma", "0"], "--sigma 0"), (["--betas", "0.9"], "--betas"),
                          (["--lr-steps", "5,8", "--lr-factors", "0.1"], "--lr-factors"),
                          (["--data", str(tmp_path / "missing")], "--data"), (["--device", "tpu"], "--device tpu"),
                          (["--out-csv", str(tmp_path / "file" / "x.csv")], "--out-csv"),
                          (["--resume", "--overwrite"], "--resume"), (["--targets-on", "gpu"], "--targets-on"),
                          (["--steps", "5", "--profile", "3"], "--profile 3"), (["--profile", "0"], "--profile 0")):
        line = usage_error(capsys, ["--out", str(tmp_path / "r"), *extra])
        assert needle in line, line
    assert not (tmp_path / "r").exists()
    if importlib.util.find_spec("tensorboard") is None:
        assert "pip install tensorboard" in usage_error(capsys, ["--out", str(tmp_path / "r"), "--tensorboard"])


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed")
def test_tensorboard_scalars_beside_the_log(tmp_path):
    run(tmp_path, "tb", "--steps", "2", "--tensorboard")
    assert list((tmp_path / "tb" / "tensorboard").glob("events.out.tfevents.*"))


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    save_checkpoint(path, {"model": {"name": "x"}, "state_dict": {"w": torch.ones(3)}})

    def dying_save(obj, handle, *a, **k):
        handle.write(b"partial bytes")
        raise KeyboardInterrupt  # as if killed half-way through the write

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"model": {"name": "y"}, "state_dict": {"w": torch.zeros(3)}})
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["state_dict"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]


def test_l2_and_plain_losses_train(tmp_path):
    for loss in ("l2", "plain"):
        result = run(tmp_path, loss, "--steps", "2", "--loss", loss, "--compile", "none")
        assert np.isfinite(result["loss"])
    assert load_encoder(tmp_path / "l2" / "checkpoint.pth").head.out_channels == 2
