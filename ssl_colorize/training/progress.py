"""What a training run tells its user: the time it will take, a progress bar, optional TensorBoard
scalars, and at the end where the checkpoint is and what to run next (issue 16)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from tqdm import tqdm


#: Steps left out of the time estimate: the first one also starts the loader's workers.
WARMUP_STEPS = 1
#: Steps measured (after the warm-up) before the estimate is printed.
MEASURED_STEPS = 3


def duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``2 h 07 min``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Progress:
    """The bar, the time estimate and the scalars of one run (only the main process shows them).

    ``start_step``: where the run (re)starts; ``stop_at``: where it stops. After
    :data:`WARMUP_STEPS` + :data:`MEASURED_STEPS` steps one line gives the measured time per step and
    the time left (the bar's own estimate follows the rate from then on).
    """

    def __init__(self, start_step: int, stop_at: int, total_steps: int, *, show_bar: bool, main_process: bool,
                 tensorboard_dir: Path | None = None):
        self.start_step, self.stop_at, self.main_process = start_step, stop_at, main_process
        self.bar = tqdm(total=total_steps, initial=start_step, desc="pretrain", unit="step", dynamic_ncols=True,
                        disable=not (main_process and show_bar))
        self.started = time.perf_counter()
        self._measure_from: float | None = None
        self.writer = None
        if tensorboard_dir is not None and main_process:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: events past the checkpoint a resumed run restarts from are dropped, as log.jsonl's.
            self.writer = SummaryWriter(str(tensorboard_dir), purge_step=start_step + 1 if start_step else None)

    def say(self, line: str, err: bool = False) -> None:
        if self.main_process:
            tqdm.write(line, file=sys.stderr if err else sys.stdout)
            (sys.stderr if err else sys.stdout).flush()

    def step(self, step: int) -> None:
        self.bar.update(1)
        done = step - self.start_step
        if done == WARMUP_STEPS:
            self._measure_from = time.perf_counter()
        elif done == WARMUP_STEPS + MEASURED_STEPS and self._measure_from is not None and step < self.stop_at:
            per_step = (time.perf_counter() - self._measure_from) / MEASURED_STEPS
            left = self.stop_at - step
            self.say(f"pretrain: {per_step:.2f} s/step measured over steps {step - MEASURED_STEPS + 1}-{step}: "
                     f"about {duration(per_step * left)} for the {left} steps left")

    def scalars(self, step: int, record: dict) -> None:
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_sec']:.1f}",
                             data_ms=f"{record['data_wait_ms']:.1f}")
        if self.writer is not None:
            self.writer.add_scalar("train/loss", record["loss"], step)
            self.writer.add_scalar("train/data_wait_ms", record["data_wait_ms"], step)
            self.writer.add_scalar("train/lr", record["lr"], step)
            self.writer.add_scalar("train/images_per_sec", record["images_per_sec"], step)

    def close(self) -> float:
        """Closes the bar and the scalar file; returns the seconds this process ran."""
        self.bar.close()
        if self.writer is not None:
            self.writer.close()
        return time.perf_counter() - self.started


def next_steps(checkpoint: Path) -> list[str]:
    """The commands a finished pretraining leads to, with its checkpoint filled in."""
    return [f"python -m ssl_colorize.benchmarks.linear_probe --checkpoint {checkpoint}    # probe its features",
            f"python -m ssl_colorize.colorize IMAGE... --checkpoint {checkpoint}    # colorize photos"]
