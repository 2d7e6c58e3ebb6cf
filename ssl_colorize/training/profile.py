"""``--profile N``: where a training step's time goes, from ``torch.profiler`` over N steps of the run itself.

Issue 14 asks where the trainer loses time against its own compute (host work per step, syncs, the
loader hand-off, the scheduler, logging). The trainer marks its phases (``data``, ``forward+loss``,
``backward``, ``optimizer``, ``bookkeeping``, ``checkpoint``) with :meth:`StepProfiler.region`; after
:data:`SKIP_STEPS` steps (loader start, cuDNN autotuning, CUDA graph capture) N steps are recorded and
``<run folder>/profile/`` gets:

* ``trace.json``: the Chrome trace (open in https://ui.perfetto.dev or chrome://tracing): every host op,
  every kernel, both CUDA streams, the phases as named ranges;
* ``ops.txt``: ``key_averages()`` as a table, the heaviest ops first (by device time on CUDA);
* ``summary.json`` / ``summary.txt``: wall time per step, host time per phase per step, and on CUDA the
  device's busy time per step (kernels and copies) and its idle share, the number that says whether the
  step is bound by the GPU or by the host.

Regions cost nothing when no profile is being recorded (a ``nullcontext``).
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function, schedule

from ssl_colorize.atomic import atomic_write

#: Steps run before the recorded ones: the loader's workers start, cuDNN picks its algorithms, and
#: ``--compile reduce-overhead`` captures its CUDA graphs in the first steps.
SKIP_STEPS = 10
#: Steps of the profiler's own warm-up (recorded, then dropped) before the active window.
PROFILER_WARMUP = 1
#: The trainer's phases, in step order.
PHASES = ("data", "forward+loss", "backward", "optimizer", "bookkeeping", "checkpoint")


def _device_time_us(event) -> float:
    """Self device time of a key_averages() entry, in microseconds (the field's name changed in torch 2.4)."""
    for name in ("self_device_time_total", "self_cuda_time_total"):
        value = getattr(event, name, None)
        if value is not None:
            return float(value)
    return 0.0


def summarize(events, steps: int, wall_seconds: float, cuda: bool) -> dict:
    """The summary of ``steps`` recorded steps from ``prof.key_averages()`` entries (anything with ``key``,
    ``cpu_time_total`` and a self device time): host ms per phase per step, and on CUDA the device's busy
    ms per step (the sum of every op's self device time: kernels and copies; two streams running at once
    count twice, so busy can exceed the wall time) and its idle share of the wall time."""
    per_step = 1e3 / steps
    phases = {e.key: e.cpu_time_total / 1e3 / steps for e in events if e.key in PHASES}
    summary = {
        "steps": steps,
        "wall_ms_per_step": wall_seconds * per_step,
        "host_ms_per_step": {name: phases.get(name, 0.0) for name in PHASES},
    }
    # Host time in no phase: the loop's own Python between them, and the profiler's step marks.
    summary["host_unmarked_ms_per_step"] = max(0.0, summary["wall_ms_per_step"] - sum(summary["host_ms_per_step"].values()))
    if cuda:
        busy = sum(_device_time_us(e) for e in events) / 1e3 / steps
        summary["device_busy_ms_per_step"] = busy
        summary["device_idle_share"] = max(0.0, 1.0 - busy / summary["wall_ms_per_step"])
    return summary


def summary_text(summary: dict) -> str:
    lines = [f"profile: {summary['steps']} steps, {summary['wall_ms_per_step']:.2f} ms per step (wall)"]
    for name, ms in summary["host_ms_per_step"].items():
        lines.append(f"  host {name:<13} {ms:8.2f} ms per step")
    lines.append(f"  host in no phase   {summary['host_unmarked_ms_per_step']:8.2f} ms per step")
    if "device_busy_ms_per_step" in summary:
        lines.append(f"  device busy        {summary['device_busy_ms_per_step']:8.2f} ms per step "
                     f"(idle {100 * summary['device_idle_share']:.1f}% of the wall time)")
    return "\n".join(lines)


class StepProfiler:
    """Records ``steps`` training steps after :data:`SKIP_STEPS`, then writes the files listed in the module
    docstring to ``folder``. ``steps`` 0 or None: a disabled profiler whose methods do nothing."""

    def __init__(self, folder: Path, steps: int | None, device: torch.device):
        self.folder, self.steps, self.cuda = Path(folder), steps or 0, device.type == "cuda"
        self.written: Path | None = None
        self._calls, self._window_start, self._window_end = 0, None, None
        self._profile = None
        if self.steps:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
            self._profile = profile(
                activities=activities,
                schedule=schedule(wait=SKIP_STEPS, warmup=PROFILER_WARMUP, active=self.steps, repeat=1),
                on_trace_ready=self._write)
            self._profile.start()

    @property
    def enabled(self) -> bool:
        return self._profile is not None

    def region(self, name: str):
        """A named range in the trace around one phase of the step (nothing when disabled)."""
        return record_function(name) if self._profile is not None else nullcontext()

    def step(self) -> None:
        """Called after each training step."""
        if self._profile is None:
            return
        self._calls += 1
        first_active = SKIP_STEPS + PROFILER_WARMUP
        if self._calls == first_active:
            self._sync()
            self._window_start = time.perf_counter()
        elif self._calls == first_active + self.steps:
            self._sync()
            self._window_end = time.perf_counter()
        self._profile.step()

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def _write(self, prof) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        end = self._window_end if self._window_end is not None else time.perf_counter()
        events = prof.key_averages()
        summary = summarize(events, self.steps, end - self._window_start, self.cuda)
        sort_by = "self_device_time_total" if self.cuda else "self_cpu_time_total"  # torch >= 2.4 names
        prof.export_chrome_trace(str(self.folder / "trace.json"))
        with atomic_write(self.folder / "ops.txt", "w") as handle:
            handle.write(events.table(sort_by=sort_by, row_limit=40) + "\n")
        with atomic_write(self.folder / "summary.json", "w") as handle:
            json.dump(summary, handle, indent=1)
        with atomic_write(self.folder / "summary.txt", "w") as handle:
            handle.write(summary_text(summary) + "\n")
        self.written = self.folder

    def close(self) -> str | None:
        """Stops the profiler; returns a line for the user (where the profile is, or why there is none)."""
        if self._profile is None:
            return None
        self._profile.stop()
        self._profile = None
        if self.written is not None:
            return f"{summary_text(json.loads((self.written / 'summary.json').read_text()))}\nprofile: written to {self.written}"
        return (f"profile: none written: the run ended before the {SKIP_STEPS} skipped + {PROFILER_WARMUP} warm-up "
                f"+ {self.steps} profiled steps")
