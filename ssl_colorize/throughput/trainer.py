"""The ``pretrain`` section's trainer measurements: the command users run, as they run it (issue 14).

* ``trainer``: the very function the CLI calls, ``ssl_colorize.pretrain.main`` on a parsed argument
  namespace, reading a JPEG list file (``--data LIST --steps N --log-every K --out DIR --no-progress``),
  once per configuration of ``--trainer-variants`` (extra trainer options, e.g. ``--compile
  reduce-overhead``). The rate is read from the run's ``log.jsonl`` (``images_per_sec`` records) over the
  steady window after the warm-up steps: the median record, and the window's images over its time.
  The first configuration's job also times the trainer's data path alone over a steady window
  (:func:`steady_window_rate`) and where one worker's time goes (:mod:`ssl_colorize.throughput.worker_cost`).
* ``trainer_folder``: the same trainer on an ImageFolder (``<tmp>/folder/class0/`` holding the
  benchmark's JPEGs), long enough that the window holds several epoch boundaries: its rate against the
  list run's says what an epoch boundary costs.
"""

from __future__ import annotations

import collections
import json
import os
import shlex
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ssl_colorize.targets import DEFAULT_K, DEFAULT_SIGMA
from ssl_colorize.throughput import measure

#: Images the trainer holds out of a data set larger than 64 for its previews (ssl_colorize.training.pretext.build_data).
HELD_OUT = 8
#: Epochs the folder run's window spans at least (so it holds two or three epoch boundaries).
FOLDER_EPOCHS = 3
#: Trainer options the measurement can do without (the rest are its public contract): left out, with a
#: note, should a version of ``ssl_colorize.pretrain`` not have them.
OPTIONAL_TRAINER_OPTIONS = ("--workers", "--ckpt-every", "--compile")
#: Trainer options the benchmark sets itself (what is measured and where): a variant may not change them.
RESERVED_TRAINER_OPTIONS = ("--encoder", "--data", "--out", "--steps", "--batch-size", "--crop", "--device",
                            "--resume", "--overwrite", "--stop-after", "--ckpt-every", "--out-csv")
DEFAULT_VARIANT = "default"
#: Batches the data path alone is timed over at most (beyond 4 per worker): 100 x 80 images are seconds.
DATA_ONLY_BATCHES = 100


# ------------------------------------------------------------------------------------------------
# The configurations of --trainer-variants
# ------------------------------------------------------------------------------------------------

def variant_name(options: list[str], text: str) -> str:
    """``trainer`` for the default options, ``trainer[--compile reduce-overhead]`` otherwise."""
    return "trainer" if not options else f"trainer[{' '.join(text.split())}]"


def parse_variants(text: str) -> list[tuple[str, list[str]]]:
    """``"default;--workers 0"`` -> ``[("trainer", []), ("trainer[--workers 0]", ["--workers", "0"])]``.

    ValueError (naming the variant) for unbalanced quotes, an option the benchmark sets itself, a
    repeated variant, an option ``ssl_colorize.pretrain`` refuses, or no variant at all."""
    from ssl_colorize import pretrain
    from ssl_colorize.engine.cli import check_args

    variants = []
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        try:
            options = [] if part == DEFAULT_VARIANT else shlex.split(part)
        except ValueError as exc:
            raise ValueError(f"variant {part!r}: {exc}") from None
        reserved = [o for o in options if o.split("=", 1)[0] in RESERVED_TRAINER_OPTIONS]
        if reserved:
            raise ValueError(f"variant {part!r}: {reserved[0].split('=', 1)[0]} is set by the benchmark itself "
                             f"(it may not change: {', '.join(RESERVED_TRAINER_OPTIONS)})")
        refused = check_args(pretrain.get_args_parser(), None, ["--data", "LIST", "--out", "RUN", *options])
        if refused:
            refused = refused.split(": error: ", 1)[-1].removesuffix(" (see --help)")
            raise ValueError(f"variant {part!r}: ssl_colorize.pretrain refuses it: {refused}")
        name = variant_name(options, part)
        if name in (n for n, _ in variants):
            raise ValueError(f"variant {part!r} is named twice")
        variants.append((name, options))
    if not variants:
        raise ValueError(f"name at least one configuration ({DEFAULT_VARIANT!r}: the trainer's defaults)")
    return variants


# ------------------------------------------------------------------------------------------------
# The run and its log
# ------------------------------------------------------------------------------------------------

def steady_window(records: list[dict], warmup: int) -> list[dict]:
    """The ``log.jsonl`` rate records of the steady window, each with ``steps`` (those it covers): a
    record counts when all its steps come after the ``warmup`` steps."""
    window, previous = [], 0
    for record in sorted((r for r in records if "images_per_sec" in r), key=lambda r: r["step"]):
        if previous >= warmup:
            window.append({**record, "steps": record["step"] - previous})
        previous = record["step"]
    if not window:
        raise ValueError(f"log.jsonl holds no rate record after the {warmup} warm-up steps")
    return window


def steady_rate(records: list[dict], warmup: int) -> tuple[float, float, int]:
    """(median, overall) images per second over the steady window's records, and their count.
    ``overall`` is the window's images over its time (the step-weighted harmonic mean of the rates): it
    includes every step of the window, an epoch boundary's slow one too, which a median may miss."""
    window = steady_window(records, warmup)
    rates = [float(r["images_per_sec"]) for r in window]
    overall = sum(r["steps"] for r in window) / sum(r["steps"] / float(r["images_per_sec"]) for r in window)
    return statistics.median(rates), overall, len(window)


def epoch_boundaries(records: list[dict], warmup: int) -> int | None:
    """Epoch boundaries the steady window crossed, from the records' ``epoch`` (None when not logged)."""
    window = steady_window(records, warmup)
    if any("epoch" not in r for r in window):
        return None
    first_step = window[0]["step"] - window[0]["steps"]  # the window starts after this step
    before = sorted((r for r in records if "images_per_sec" in r and r["step"] <= first_step), key=lambda r: r["step"])
    return window[-1]["epoch"] - (before[-1].get("epoch", 0) if before else 0)


def data_wait_share(records: list[dict], warmup: int, batch: int) -> float | None:
    """The share of the steady window the loop spent waiting for its next batch, from the records'
    ``data_wait_ms`` (per step); None when the trainer does not log it."""
    window = steady_window(records, warmup)
    if any("data_wait_ms" not in r for r in window):
        return None
    waited = sum(r["steps"] * r["data_wait_ms"] / 1e3 for r in window)
    return waited / sum(r["steps"] * batch / float(r["images_per_sec"]) for r in window)


def trainer_argv(job: dict, data: Path, out: Path, log_every: int) -> list[str]:
    """The command line of the trainer's run (``ssl_colorize.pretrain``'s public options), then the
    variant's own options. The rolling checkpoint and its preview come at the last step only, after
    the timed window."""
    total = job["warmup"] + job["steps"]
    argv = ["--encoder", job["encoder"], "--data", str(data), "--steps", str(total),
            "--batch-size", str(job["batch"]), "--crop", str(job["crop"]), "--device", job["device"],
            "--log-every", str(log_every), "--out", str(out), "--no-progress",
            "--workers", str(job["workers"]), "--ckpt-every", str(total)]
    argv += ["--compile", job["compile"]] if job.get("compile") else []
    return argv + list(job.get("trainer_options", []))


def parse_trainer_args(parser, argv: list[str]):
    """(namespace, optional options the trainer does not know); any other unknown option is an error."""
    args, unknown = parser.parse_known_args(argv)
    flags = [a for a in unknown if a.startswith("--")]
    missing = [f for f in flags if f not in OPTIONAL_TRAINER_OPTIONS]
    if missing:
        raise RuntimeError(f"ssl_colorize.pretrain no longer takes {missing}: update ssl_colorize.throughput.trainer")
    return args, flags


def folder_batches_per_epoch(images: int, batch: int) -> int:
    """Steps per epoch of the trainer on an ImageFolder of ``images`` files (it holds some out, drops the last batch)."""
    return max(1, (images - (HELD_OUT if images > 64 else 0)) // batch)


def trainer_steps(steps: int, folder_images: int, batch: int) -> int:
    """Timed steps of every trainer run: ``steps``, or more so that the folder run's window spans
    :data:`FOLDER_EPOCHS` epochs (the list runs time the same window, for a like-for-like ratio)."""
    return max(steps, FOLDER_EPOCHS * folder_batches_per_epoch(folder_images, batch))


def write_image_folder(paths: list[Path], root: Path) -> Path:
    """An ImageFolder ``root/class0/`` holding ``paths`` (hard links, copies where links fail): what
    ``ImageFiles`` reads as one class, as ImageNet's train/ is read."""
    folder = root / "class0"
    folder.mkdir(parents=True)
    for path in paths:
        try:
            os.link(path, folder / path.name)
        except OSError:  # another file system, or links not allowed
            shutil.copyfile(path, folder / path.name)
    return root


def _run_trainer(job: dict, work: Path) -> tuple[list[dict], list[str], int]:
    """Run ``ssl_colorize.pretrain.main`` on the job's data (a list file, or an ImageFolder for
    ``trainer_folder``) in ``work``; (log.jsonl records, ignored options, log_every)."""
    from ssl_colorize import pretrain

    total = job["warmup"] + job["steps"]
    paths = measure.jpeg_paths(job["jpeg_dir"])
    if job["variant"] == "trainer_folder":
        data = write_image_folder(paths[: job.get("folder_images") or len(paths)], work / "folder")
    else:  # the list repeats the files: one epoch covers the run, no epoch boundary inside the window
        needed = (total + 1) * job["batch"] + HELD_OUT
        data = work / "images.txt"
        data.write_text("".join(f"{paths[i % len(paths)]}\n" for i in range(needed)))
    log_every = max(1, job["steps"] // 10)  # ten rate records in the window: enough for a median
    args, ignored = parse_trainer_args(pretrain.get_args_parser(), trainer_argv(job, data, work / "run", log_every))
    if hasattr(pretrain, "validate"):  # the entry-point convention: checks first, then main
        pretrain.validate(args)
    pretrain.main(args)
    records = [json.loads(line) for line in (work / "run" / "log.jsonl").read_text().splitlines() if line.strip()]
    return records, ignored, args.log_every  # a variant may set its own --log-every


# ------------------------------------------------------------------------------------------------
# The data path alone
# ------------------------------------------------------------------------------------------------

def steady_window_rate(batches, skip: int, timed: int, images_per_batch: int, sync=lambda: None,
                       clock=time.perf_counter) -> float:
    """Images per second over ``timed`` batches of ``batches`` after the first ``skip`` (start-up and
    the batches prefetched meanwhile, which would make the loader look faster than it keeps up)."""
    for _ in range(skip):
        next(batches)
    sync()
    start = clock()
    for _ in range(timed):
        next(batches)
    sync()
    return timed * images_per_batch / (clock() - start)


def batches_ahead(loader) -> int:
    """Batches a :class:`~ssl_colorize.data.loader.PretrainLoader` may hold ready before it is asked:
    each worker's DataLoader prefetch, plus the producer thread's (CUDA or the device path, handed off
    by a thread)."""
    prefetch = loader.host_loader().prefetch_factor  # built, not iterated: no worker starts
    ahead = loader.workers * prefetch if loader.workers and prefetch else 0
    producer = loader.device.type == "cuda" or loader.mode == "device"
    if producer and getattr(loader, "hand_off", "thread") == "thread":  # inline: no producer thread
        ahead += loader.prefetch
    return ahead


def data_only_rate(job: dict, device: torch.device, stride: int) -> tuple[float, str, dict]:
    """Images per second of the trainer's data path alone (the path 'auto' picks) over a steady
    window: (rate, path, window) where the window skips :func:`batches_ahead` + 1 batches and times
    ``max(steps, 4 x workers)``, steps at most :data:`DATA_ONLY_BATCHES`."""
    from ssl_colorize.data import ImageFiles
    from ssl_colorize.data.fast_path import TargetSpec, resolve_data_path
    from ssl_colorize.data.loader import PretrainLoader

    files = ImageFiles(job["jpeg_dir"])
    path = resolve_data_path("auto", device)

    def make_loader(count: int) -> PretrainLoader:
        return PretrainLoader(files, measure.CyclingSampler(len(files), count * job["batch"], seed=7), job["batch"],
                              job["crop"], job["resize"], device, path, workers=job["workers"],
                              channels_last=device.type == "cuda", targets=TargetSpec(stride, DEFAULT_K, DEFAULT_SIGMA),
                              resize_mode=job.get("resize_mode", "shorter"))

    skip = batches_ahead(make_loader(1)) + 1
    timed = max(min(job["steps"], DATA_ONLY_BATCHES), 4 * job["workers"])
    iterator = iter(make_loader(skip + timed))
    rate = steady_window_rate(iterator, skip, timed, job["batch"], lambda: measure.sync(device))
    collections.deque(iterator, maxlen=0)  # the loader ends; its workers are joined
    return rate, path, {"data_only_skipped_batches": skip, "data_only_timed_batches": timed}


def job_trainer(job: dict, device: torch.device) -> dict:
    """A ``trainer`` or ``trainer_folder`` measurement; with ``measure_data``, the data path alone and
    one worker's costs first."""
    from ssl_colorize.models import create_model
    from ssl_colorize.throughput import worker_cost

    result = {}
    if job.get("measure_data"):
        stride = create_model(job["encoder"]).output_stride
        result["worker_cost"] = worker_cost.measure_worker(
            job["jpeg_dir"], job["crop"], job["resize"], job.get("resize_mode", "shorter"), stride, job["batch"],
            job["workers"], lightness=device.type == "cpu")
        rate, path, window = data_only_rate(job, device, stride)
        result.update({"data_only_images_per_s": rate, "data_path": path, **window})
    work = Path(tempfile.mkdtemp(prefix="throughput-trainer-"))
    try:
        records, ignored, log_every = _run_trainer(job, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    median, overall, count = steady_rate(records, job["warmup"])
    return {**result, "images_per_s": median, "ms_per_step": 1e3 * job["batch"] / median, "overall_images_per_s": overall,
            "log_records": count, "log_every": log_every, "ignored_options": ignored,
            "epoch_boundaries": epoch_boundaries(records, job["warmup"]),
            "data_wait_share": data_wait_share(records, job["warmup"], job["batch"])}
