"""What every throughput measurement shares: the device, timing statistics, memory readings, JPEG files.

``ms_per_step`` is the median over the timed steps after the warm-up steps (mean and minimum are kept
beside it), with a synchronisation of the step's CUDA stream after each step. ``peak_host_mb`` is the
measuring process's ``ru_maxrss`` (each measurement runs in its own process, see
:mod:`ssl_colorize.throughput.runner`, so the peak is its own).
"""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path

import numpy as np
import torch


def resolve_device(name: str) -> torch.device:
    """--device -> a torch.device; a CUDA device always carries its index (torch.cuda.set_device needs one).
    ValueError naming the option when the name is not a device or CUDA is missing."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"--device {name}: {exc}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    elif device.type != "cpu":
        raise ValueError(f"--device {name}: only cpu and cuda devices are measured")
    return device


def device_description(device: torch.device) -> str:
    """GPU name, or the CPU model and its core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):  # no /proc/cpuinfo: keep platform's name
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model} ({os.cpu_count()} cpus)"


def setup(job: dict) -> torch.device:
    """Threads, seeds and the device's fast-math settings of one measurement process."""
    if job["threads"]:
        torch.set_num_threads(job["threads"])
    torch.manual_seed(0)
    np.random.seed(0)
    device = resolve_device(job["device"])
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def sync(device: torch.device) -> None:
    """Wait for this thread's stream: the step's work (and, through the events it waited on, the data
    path's work on that batch), not the data path's work on the batches it prefetches."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def step_stats(seconds: list[float], images: int) -> dict:
    """ms_per_step is the median over the timed steps (robust to a neighbour's burst on a shared
    machine); the mean and the fastest step are kept beside it."""
    ms = 1e3 * np.asarray(seconds, dtype=np.float64)
    median = float(np.median(ms))
    return {"ms_per_step": median, "images_per_s": images / (median / 1e3),
            "ms_mean": float(ms.mean()), "ms_min": float(ms.min())}


def peak_host_mb() -> float:
    """This process's peak resident memory (Linux reports ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def peak_children_mb() -> float:
    """The largest finished child process's peak resident memory (data-loading workers)."""
    import resource

    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0


def peak_device_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def proc_status_mb(field: str) -> float | None:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in MiB; None where there is no procfs."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


#: JPEGs written in the calling process; more are shared out to worker processes (3,600 take about
#: 25 s on one core).
JPEGS_IN_PROCESS = 256


def _jpeg_plan(photo_sizes: list[tuple[int, int]], count: int, short_side: int, seed: int) -> list[tuple]:
    """Per JPEG: (photo index, crop box, output size, mirror), drawn in order from one seeded generator."""
    rng = np.random.default_rng(seed)
    plan = []
    for i in range(count):
        w, h = photo_sizes[i % len(photo_sizes)]
        aspect = rng.uniform(1.0, 4 / 3)
        box_short = int(rng.uniform(0.4, 1.0) * min(w, h, max(w, h) / aspect))
        box_long = int(box_short * aspect)
        bw, bh = (box_long, box_short) if rng.random() < 0.5 else (box_short, box_long)
        bw, bh = min(bw, w), min(bh, h)
        x0, y0 = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
        scale = short_side / min(bw, bh)
        size = (max(short_side, round(bw * scale)), max(short_side, round(bh * scale)))
        plan.append((i % len(photo_sizes), (x0, y0, x0 + bw, y0 + bh), size, bool(rng.random() < 0.5)))
    return plan


def _write_planned(folder: str, first: int, plan: list[tuple]) -> None:
    """Write planned JPEGs ``first``, ``first + 1`` ... (in a worker process, or in this one)."""
    from PIL import Image

    from ssl_colorize.data import builtin_photos

    photos = [Image.fromarray(a) for a in builtin_photos().values()]
    for i, (photo, box, size, mirror) in enumerate(plan, start=first):
        image = photos[photo].crop(box).resize(size, Image.BILINEAR)
        if mirror:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        image.save(Path(folder) / f"img_{i:05d}.jpg", format="JPEG", quality=90)


def write_jpegs(folder: Path, count: int, short_side: int = 256, seed: int = 0) -> Path:
    """``count`` JPEGs (quality 90) whose shorter side is ``short_side`` and longer side up to 4/3 of it:
    random crops at random scales, mirrored at random, of the built-in photographs (real photo content,
    so decoding costs what photographs cost). The same files whatever the number of processes writing them."""
    import concurrent.futures
    import multiprocessing

    from ssl_colorize.data import builtin_photos

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    plan = _jpeg_plan([(a.shape[1], a.shape[0]) for a in builtin_photos().values()], count, short_side, seed)
    processes = min(os.cpu_count() or 1, -(-count // JPEGS_IN_PROCESS))
    if processes <= 1:
        _write_planned(str(folder), 0, plan)
        return folder
    chunk = -(-count // processes)
    with concurrent.futures.ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        jobs = [pool.submit(_write_planned, str(folder), start, plan[start : start + chunk])
                for start in range(0, count, chunk)]
        for job in jobs:
            job.result()
    return folder


def jpeg_paths(folder: str | os.PathLike) -> list[Path]:
    """The JPEG files of a folder, sorted."""
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".jpg", ".jpeg") and p.is_file())


class CyclingSampler(torch.utils.data.Sampler):
    """``count`` items ``(index, sample_seed)``: seeded permutations of the files, one after another
    (the trainer's sampler, without its resume bookkeeping)."""

    def __init__(self, num_items: int, count: int, seed: int = 0):
        self.num_items, self.count, self.seed = num_items, count, seed

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        position, epoch = 0, 0
        while position < self.count:
            order = torch.randperm(self.num_items, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
            for index in order.tolist():
                if position >= self.count:
                    return
                yield index, (self.seed * 1_000_003 + epoch) * 10_000_019 + position
                position += 1
            epoch += 1


def comma_list(text: str) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``."""
    return [item.strip() for item in text.split(",") if item.strip()]
