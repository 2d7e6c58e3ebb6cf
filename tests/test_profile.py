"""``ssl_colorize.pretrain --profile N``: torch.profiler over N steps of the trainer's own loop."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest

from ssl_colorize.pretrain import get_args_parser, main
from ssl_colorize.training.profile import PHASES, PROFILER_WARMUP, SKIP_STEPS, StepProfiler, summarize

TINY = ["--crop", "64", "--resize", "72", "--batch-size", "4", "--workers", "0", "--no-progress"]


def test_profile_of_the_trainers_loop(tmp_path, capsys):
    steps = SKIP_STEPS + PROFILER_WARMUP + 2
    out = tmp_path / "run"
    main(get_args_parser().parse_args(["--out", str(out), *TINY, "--steps", str(steps), "--profile", "2",
                                       "--ckpt-every", str(steps), "--log-every", str(steps)]))
    printed = capsys.readouterr().out
    folder = out / "profile"
    assert f"profile: written to {folder}" in printed and "ms per step (wall)" in printed
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["steps"] == 2 and set(summary["host_ms_per_step"]) == set(PHASES)
    host = summary["host_ms_per_step"]
    assert host["forward+loss"] > 0 and host["backward"] > 0 and host["optimizer"] > 0
    # The phases are disjoint parts of a step: together they fit in the step's wall time. No checkpoint
    # falls in the recorded steps (the only one is at the last step, after them).
    assert sum(host.values()) <= summary["wall_ms_per_step"] * 1.05
    assert summary["host_unmarked_ms_per_step"] == pytest.approx(max(0.0, summary["wall_ms_per_step"] - sum(host.values())))
    assert host["checkpoint"] == 0
    assert "device_busy_ms_per_step" not in summary  # a CPU run
    trace = json.loads((folder / "trace.json").read_text())
    names = {event.get("name") for event in trace["traceEvents"]}
    assert set(PHASES) - {"checkpoint"} <= names and any(str(n).startswith("ProfilerStep#") for n in names)
    assert "Name" in (folder / "ops.txt").read_text()
    shutil.rmtree(tmp_path, ignore_errors=True)  # an AlexNet checkpoint with Adam's moments


def test_cuda_summary_busy_and_idle_shares():
    """Hand-computed: 4 steps in 100 ms of wall time, kernels 60 ms in all (the self device times summed)."""
    def entry(key, cpu_us, device_us):
        return SimpleNamespace(key=key, cpu_time_total=cpu_us, self_device_time_total=device_us)

    events = [entry("data", 8_000, 0), entry("forward+loss", 20_000, 0), entry("aten::convolution", 10_000, 40_000),
              entry("aten::mm", 1_000, 20_000)]
    summary = summarize(events, steps=4, wall_seconds=0.1, cuda=True)
    assert summary["wall_ms_per_step"] == pytest.approx(25.0)
    assert summary["host_ms_per_step"]["data"] == pytest.approx(2.0)
    assert summary["host_ms_per_step"]["forward+loss"] == pytest.approx(5.0)
    assert summary["host_ms_per_step"]["backward"] == 0.0
    assert summary["host_unmarked_ms_per_step"] == pytest.approx(25.0 - 2.0 - 5.0)
    assert summary["device_busy_ms_per_step"] == pytest.approx(15.0)
    assert summary["device_idle_share"] == pytest.approx(0.4)


def test_a_disabled_profiler_does_nothing(tmp_path):
    import torch

    profiler = StepProfiler(tmp_path / "profile", None, torch.device("cpu"))
    assert not profiler.enabled
    with profiler.region("data"):
        profiler.step()
    assert profiler.close() is None and not (tmp_path / "profile").exists()
