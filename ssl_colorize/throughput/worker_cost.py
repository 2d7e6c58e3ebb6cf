"""Where one data-loading worker's time goes (issue 14): does the trainer's loader bind on this machine?

A DataLoader worker of the ``workers`` data path is one process with one torch thread. Here, in one
process and one thread, on the benchmark's JPEGs, each stage is timed per image as that worker runs it:

* ``read_decode``: ``ImageFiles[i]`` (read the file, decode to uint8 RGB);
* ``resize_crop``: :func:`~ssl_colorize.data.fast_path.crop_image` with the encoder card's resize and
  resize mode and a per-sample seed, as :class:`~ssl_colorize.data.fast_path.SeededCrops` calls it;
* ``stack``: :class:`~ssl_colorize.data.fast_path.CropCollate` without targets (the batch alone);
* ``targets``: what :class:`CropCollate` with a :class:`TargetSpec` adds (ab on the loss grid and its
  soft encoding; L too for a CPU trainer, not for a CUDA one).

One worker's rate is one image over the sum; ``workers`` of them bound the loader at ``workers`` times
that, or at the rate without ``targets`` if the targets moved to the GPU.
"""

from __future__ import annotations

import time

import torch

#: Images timed per stage (the decoded images are held in memory: about 0.25 MB each at 256 px).
MAX_IMAGES = 256
#: Collate calls timed per variant (the stage is per batch; its median is divided by the batch).
COLLATE_REPEATS = 5


def _per_image(seconds: float, images: int) -> float:
    return seconds / max(images, 1)


def stage_times(files, crop: int, resize: int | None, resize_mode: str, targets, batch: int,
                lightness: bool, images: int = MAX_IMAGES, clock=time.perf_counter) -> dict:
    """Seconds per image of each stage (``read_decode``, ``resize_crop``, ``stack``, ``targets``) on the
    first ``images`` of ``files`` (an :class:`~ssl_colorize.data.images.ImageFiles`), in this thread."""
    from ssl_colorize.data.fast_path import CropCollate, crop_image
    from ssl_colorize.data.images import Sample

    count = min(images, len(files))
    if count == 0:
        raise ValueError("stage_times: no image to time")
    files[0]  # the decoder's one-time start-up is no image's cost
    start = clock()
    samples = [files[i] for i in range(count)]
    read_decode = clock() - start
    samples = [s for s in samples if isinstance(s, Sample)]
    if not samples:
        raise ValueError("stage_times: no image could be decoded")
    start = clock()
    for i, sample in enumerate(samples):
        sample.image = crop_image(sample.image, crop, resize, seed=i, resize_mode=resize_mode)
    resize_crop = clock() - start

    # Batches as the sampler makes them (cycling over the crops when there are fewer than a batch).
    batch_items = [samples[i % len(samples)] for i in range(batch)]

    def collate_seconds(collate) -> float:
        collate(batch_items)  # first call: the soft encoding's one-time tables
        runs = []
        for _ in range(COLLATE_REPEATS):
            start = clock()
            collate(batch_items)
            runs.append(clock() - start)
        return sorted(runs)[len(runs) // 2]

    stack = collate_seconds(CropCollate(crop, None, lightness=False))
    full = collate_seconds(CropCollate(crop, targets, lightness=lightness))
    stack = min(stack, full)  # the targets' share cannot be negative, whatever the noise
    return {"read_decode": _per_image(read_decode, count), "resize_crop": _per_image(resize_crop, len(samples)),
            "stack": _per_image(stack, batch), "targets": _per_image(full - stack, batch), "images": count}


def worker_rates(stages: dict, workers: int) -> dict:
    """Per-worker images/s (all stages; without the targets) and the loader bounds of ``workers``
    processes (0 workers: the training process itself loads, one of it)."""
    total = stages["read_decode"] + stages["resize_crop"] + stages["stack"] + stages["targets"]
    without_targets = total - stages["targets"]
    processes = max(workers, 1)
    return {"per_worker_images_per_s": 1 / total, "per_worker_images_per_s_no_targets": 1 / without_targets,
            "loader_bound_images_per_s": processes / total,
            "loader_bound_images_per_s_no_targets": processes / without_targets}


def measure_worker(jpeg_dir: str, crop: int, resize: int | None, resize_mode: str, stride: int, batch: int,
                   workers: int, lightness: bool, images: int = MAX_IMAGES) -> dict:
    """:func:`stage_times` (in milliseconds per image) and :func:`worker_rates`, with one torch thread
    as a DataLoader worker has (this process's thread count is restored after)."""
    from ssl_colorize.data import ImageFiles
    from ssl_colorize.data.fast_path import TargetSpec
    from ssl_colorize.targets import DEFAULT_K, DEFAULT_SIGMA

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        stages = stage_times(ImageFiles(jpeg_dir), crop, resize, resize_mode, TargetSpec(stride, DEFAULT_K, DEFAULT_SIGMA),
                             batch, lightness, images)
    finally:
        torch.set_num_threads(threads)
    out = {f"{name}_ms": 1e3 * stages[name] for name in ("read_decode", "resize_crop", "stack", "targets")}
    return {**out, "images_timed": stages["images"], "collate_lightness": lightness, **worker_rates(stages, workers)}


def describe(cost: dict, workers: int, compute_images_per_s: float) -> str:
    """The note: per-image stage costs, one worker's rate, the loader's bound beside compute only."""
    bound, no_targets = cost["loader_bound_images_per_s"], cost["loader_bound_images_per_s_no_targets"]
    binds = "the workers bind" if bound < compute_images_per_s else "the workers do not bind"
    return (f"one worker (1 thread) spends per image {cost['read_decode_ms']:.2f} ms read+decode, "
            f"{cost['resize_crop_ms']:.2f} resize+crop, {cost['stack_ms']:.3f} stack, {cost['targets_ms']:.2f} targets "
            f"({cost['images_timed']} images): {cost['per_worker_images_per_s']:.0f} img/s per worker; "
            f"{max(workers, 1)} worker(s) bound the loader at {bound:.0f} img/s ({no_targets:.0f} with the targets on "
            f"the device) against compute only {compute_images_per_s:.1f} img/s: {binds}")
