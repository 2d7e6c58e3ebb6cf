"""Section ``probe`` (issue 4): the linear probe's step, five taps read in one frozen pass (one
``forward_taps`` + five heads, :class:`ssl_colorize.heads.probe.MultiTapProbe`) against five single-tap runs.

Two comparisons: with the data each run reads (JPEG files: decode, resize to 256, random crop + mirror;
five single-tap runs read the data five times), and on a synthetic batch already on the device (the
network and the heads alone).
"""

from __future__ import annotations

import shutil
import time

import torch

from ssl_colorize.throughput import measure
from ssl_colorize.throughput.report import TARGETS, Report
from ssl_colorize.throughput.runner import run_all

DATA = {"jpeg": "JPEG files: decode, resize 256, random crop, per run",
        "synthetic": "synthetic uint8 batch on the device"}


def run_job(job: dict) -> dict:
    """One variant: 'one_pass' (five taps, one frozen forward) or 'single_tap' (five runs)."""
    from ssl_colorize.data import ImageFiles, read_image
    from ssl_colorize.data.transforms import random_crop_flip, resize_shorter
    from ssl_colorize.heads.probe import MultiTapProbe
    from ssl_colorize.models import create_model, get_card

    device = measure.setup(job)
    # The probe reads the encoder in its transfer geometry (the card says which construction arguments).
    kwargs = get_card(job["encoder"]).transfer.model_kwargs
    encoder = create_model(job["encoder"], **kwargs).to(device).eval()
    taps = list(encoder.probe_taps)
    crop, batch, classes = job["crop"], job["batch"], job["classes"]
    groups = [taps] if job["variant"] == "one_pass" else [[tap] for tap in taps]
    probes = [MultiTapProbe(encoder, group, classes, crop).to(device) for group in groups]
    optimizers = [torch.optim.SGD(p.heads.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4) for p in probes]
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, classes, (batch,), generator=g).to(device)
    files = ImageFiles(job["jpeg_dir"]) if job.get("jpeg_dir") else None
    synthetic = torch.randint(0, 256, (batch, 3, crop, crop), dtype=torch.uint8, generator=g).to(device)

    def load_batch(step: int) -> torch.Tensor:
        if files is None:
            return synthetic
        paths = [files.paths[(step * batch + i) % len(files)] for i in range(batch)]
        return torch.stack([random_crop_flip(resize_shorter(read_image(p), 256), crop, g) for p in paths]).to(device)

    for probe in probes:
        probe.train()
    times = []
    for i in range(job["warmup"] + job["steps"]):
        measure.sync(device)
        start = time.perf_counter()
        for probe, optimizer in zip(probes, optimizers):
            probe.training_step(load_batch(i), labels, optimizer)
        measure.sync(device)
        if i >= job["warmup"]:
            times.append(time.perf_counter() - start)
    return {**measure.step_stats(times, batch), "taps": taps,
            "peak_host_mb": measure.peak_host_mb(), "peak_device_mb": measure.peak_device_mb(device)}


def run_section(args, device: torch.device, common: dict, report: Report) -> None:
    from ssl_colorize.throughput.pretrain import prepare_jpegs

    # --quick keeps a batch of 96: at 16 the five heads' 1000-way SGD updates, the same in both variants,
    # hide the difference (measured here: 2.1x at 16, 3.5x at 96); two timed steps bound the time.
    steps = args.steps if args.steps is not None else (2 if args.quick else 20)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5)
    batch = args.probe_batch or (96 if args.quick else 256)
    job = {**common, "section": "probe", "encoder": args.probe_encoder, "crop": args.probe_crop, "batch": batch,
           "classes": args.probe_classes, "steps": steps, "warmup": warmup}
    folder, temporary = prepare_jpegs(args, batch * (steps + warmup))
    plan = [(data, variant) for data in DATA for variant in ("single_tap", "one_pass")]
    jobs = [{**job, "variant": variant, "jpeg_dir": str(folder) if data == "jpeg" else None} for data, variant in plan]
    try:
        results = dict(zip(plan, run_all(jobs, not args.no_progress)))
    finally:
        if temporary:
            shutil.rmtree(folder, ignore_errors=True)
    for data, description in DATA.items():
        one, five = results[(data, "one_pass")], results[(data, "single_tap")]
        settings = {"encoder": args.probe_encoder, "crop": args.probe_crop, "batch": batch, "classes": args.probe_classes,
                    "steps": steps, "warmup": warmup, "taps": one["taps"], "protocol": "card default",
                    "heads": "ssl_colorize.heads.probe.MultiTapProbe / ProbeHead", "data": description}
        ratio = five["ms_per_step"] / one["ms_per_step"]
        report.add("probe", f"single_tap (five runs, {data})", settings, five, 1.0)
        report.add("probe", f"one_pass (five taps, {data})", settings, one, ratio)
        report.verdict("probe_one_pass" if data == "jpeg" else "probe_one_pass_compute_only", ratio,
                       f"{one['ms_per_step']:.0f} ms for five taps", f"{five['ms_per_step']:.0f} ms for five single-tap runs",
                       TARGETS["probe_one_pass"] if data == "jpeg" else None)
