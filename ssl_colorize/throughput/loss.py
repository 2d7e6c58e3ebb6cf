"""Section ``loss`` (issue 2): soft encoding + class-rebalanced cross-entropy, forward and backward.

On a paper-sized batch (40 x 313 x 56 x 56 logits, ab 40 x 2 x 56 x 56). Ours:
``ssl_colorize.losses.soft_target_cross_entropy`` (``targets.soft_encode`` inside). Reference: the
released code's Python layers (:mod:`ssl_colorize.reference`, docs/protocols.md section 2).

Reported: time per step, and each variant's peak memory beyond the logits and their gradient. That
memory is measured around the first full-size forward + backward (after a one-pixel call that builds
one-time tables: our candidate-bin table, as the reference's ball tree is built beforehand), before any
warm-up can leave freed memory cached in the allocator: the kernel's resident-set high-water mark is
reset (``/proc/self/clear_refs``, Linux >= 4.0) with the logits already allocated, and the extra memory
is ``VmHWM`` afterwards minus ``VmRSS`` before minus the gradient's size. On CUDA the same is done with
``torch.cuda.reset_peak_memory_stats`` (around the second call, after one-time workspaces exist) /
``max_memory_allocated``.
"""

from __future__ import annotations

import time

import torch

from ssl_colorize.targets import DEFAULT_K, DEFAULT_SIGMA, NUM_BINS
from ssl_colorize.throughput import measure
from ssl_colorize.throughput.report import TARGETS, Report
from ssl_colorize.throughput.runner import run_all

VARIANTS = ("reference", "ours")
REFERENCE_PATH = ("sklearn NearestNeighbors(10, ball_tree) on the CPU, dense float64 target, argmax prior boost, "
                  "log_softmax cross-entropy")
OURS_PATH = "ssl_colorize.losses.soft_target_cross_entropy (targets.soft_encode)"


def random_ab(n: int, size: int, device: torch.device) -> torch.Tensor:
    """ab of natural-image-like statistics: mostly near grey, a colourful tail, some beyond the gamut."""
    g = torch.Generator().manual_seed(1)
    ab = torch.randn(n, 2, size, size, generator=g) * 25 + torch.randn(n, 2, 1, 1, generator=g) * 15
    return ab.clamp(-110, 110).to(device)


def run_job(job: dict) -> dict:
    """One variant, 'ours' or 'reference': time per forward + backward and extra peak memory."""
    from ssl_colorize.losses import soft_target_cross_entropy
    from ssl_colorize.reference import ReferenceEncoder, reference_loss
    from ssl_colorize.targets import load_prior, rebalance_weights

    if job["variant"] not in VARIANTS:
        raise ValueError(f"unknown loss variant {job['variant']!r}")
    device = measure.setup(job)
    n, size = job["batch"], job["size"]
    reference = ReferenceEncoder()
    class_weights = rebalance_weights(load_prior()).to(device)
    ab = random_ab(n, size, device)
    logits = torch.randn(n, NUM_BINS, size, size, device=device).requires_grad_(True)
    grad_mb = logits.numel() * logits.element_size() / 2**20

    def loss_of(x: torch.Tensor, target_ab: torch.Tensor) -> torch.Tensor:
        if job["variant"] == "ours":
            return soft_target_cross_entropy(x, target_ab, class_weights)
        return reference_loss(x, target_ab, reference)

    def once() -> None:
        logits.grad = None
        loss_of(logits, ab).backward()

    # One-time set-up out of the measurement, as the reference's ball tree is built above: our
    # candidate-bin table (built on first use) and torch's kernels, on a one-pixel-square batch.
    tiny = torch.randn(1, NUM_BINS, 1, 1, device=device, requires_grad=True)
    loss_of(tiny, ab[:1, :, :1, :1]).backward()
    del tiny
    # Host memory: the first call, from a state holding the logits only (nothing freed is cached yet).
    measure.sync(device)
    rss_before = measure.proc_status_mb("VmRSS")
    hwm_reset = measure.reset_peak_rss()
    once()
    measure.sync(device)
    hwm = measure.proc_status_mb("VmHWM")
    extra_host = hwm - rss_before - grad_mb if hwm_reset and hwm is not None and rss_before is not None else None
    # Device memory: the second call, so one-time allocations (cuBLAS workspaces) are not counted; the
    # allocator's counters report live tensors only, whatever it keeps cached.
    extra_device = None
    if device.type == "cuda":
        logits.grad = None
        torch.cuda.reset_peak_memory_stats(device)
        device_before = torch.cuda.memory_allocated(device) / 2**20
        once()
        measure.sync(device)
        extra_device = torch.cuda.max_memory_allocated(device) / 2**20 - device_before - grad_mb
    # Time: warm-up calls, then the timed ones.
    times = []
    for rep in range(job["warmup"] + job["steps"]):
        measure.sync(device)
        start = time.perf_counter()
        once()
        measure.sync(device)
        if rep >= job["warmup"]:
            times.append(time.perf_counter() - start)
    return {**measure.step_stats(times, n), "extra_host_mb": extra_host, "extra_device_mb": extra_device,
            "logits_mb": grad_mb, "peak_host_mb": measure.peak_host_mb(), "peak_device_mb": measure.peak_device_mb(device)}


def run_section(args, device: torch.device, common: dict, report: Report) -> None:
    steps = args.steps if args.steps is not None else (5 if args.quick else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    job = {**common, "section": "loss", "batch": args.loss_batch, "size": args.loss_size, "steps": steps, "warmup": warmup}
    results = dict(zip(VARIANTS, run_all([{**job, "variant": v} for v in VARIANTS], not args.no_progress)))
    ours, ref = results["ours"], results["reference"]
    settings = {"logits": [args.loss_batch, NUM_BINS, args.loss_size, args.loss_size], "logits_mb": ours["logits_mb"],
                "k": DEFAULT_K, "sigma": DEFAULT_SIGMA, "rebalanced": True, "steps": steps, "warmup": warmup}
    speed = ref["ms_per_step"] / ours["ms_per_step"]
    for name, result, path, ratio in (("reference", ref, REFERENCE_PATH, 1.0), ("ours", ours, OURS_PATH, speed)):
        report.add("loss", name, {**settings, "extra_host_mb": result["extra_host_mb"],
                                  "extra_device_mb": result["extra_device_mb"], "path": path}, result, ratio)
    report.verdict(f"loss_speed_{report.kind}", speed, f"{ours['ms_per_step']:.0f} ms", f"{ref['ms_per_step']:.0f} ms",
                   TARGETS[f"loss_speed_{report.kind}"])
    label = "device" if device.type == "cuda" else "host"
    ours_extra, ref_extra = ours[f"extra_{label}_mb"], ref[f"extra_{label}_mb"]
    if ours_extra is None or ref_extra is None:
        report.notes.append("loss extra host memory: not measurable here (no /proc/self/clear_refs)")
        return
    mem_ratio = max(ours_extra, 0.0) / ref_extra if ref_extra > 0 else float("nan")
    report.verdict(f"loss_extra_{label}_memory", mem_ratio, f"{ours_extra:.0f} MB", f"{ref_extra:.0f} MB",
                   TARGETS["loss_extra_memory"], at_least=False)
    if device.type == "cuda" and ours["extra_host_mb"] is not None:
        report.notes.append(f"loss extra host memory: ours {ours['extra_host_mb']:.0f} MB, "
                            f"reference {ref['extra_host_mb']:.0f} MB (the reference's dense target is built on the host)")
