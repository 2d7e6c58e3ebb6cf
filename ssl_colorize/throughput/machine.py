"""The machine's dense matrix-multiply rate, and the model FLOP utilisation measured against it (issue 14).

A training step's achieved FLOP/s (FLOPs per image counted with ``FlopCounterMode`` x images per
second) means little alone; over what the same device reaches on large square matrix products in the
step's precision (bf16 on CUDA, as the trainer's autocast; float32 on a CPU) it is the model FLOP
utilisation: the share of the machine the step uses.
"""

from __future__ import annotations

import statistics
import time

import torch

from ssl_colorize.throughput import measure

#: (side of the square matrices, dtype, untimed warm-up products) per device type: large enough to reach
#: the device's peak (an H100/H200 needs thousands; one CPU core is at its peak well below 1024); on a GPU
#: enough warm-up (about 30 ms) for its clocks to rise from idle.
MATMUL_SIZES = {"cuda": (8192, torch.bfloat16, 20), "cpu": (1024, torch.float32, 3)}
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def matmul_rate(device: torch.device, size: int | None = None, dtype: torch.dtype | None = None,
                warmup: int | None = None, repeats: int = 10, clock=time.perf_counter) -> dict:
    """The median TFLOP/s of ``repeats`` synchronised ``size`` x ``size`` x ``size`` products (2 size^3
    FLOPs each) after ``warmup`` untimed ones, by default the device type's :data:`MATMUL_SIZES`."""
    default_size, default_dtype, default_warmup = MATMUL_SIZES["cuda" if device.type == "cuda" else "cpu"]
    size, dtype = size or default_size, dtype or default_dtype
    warmup = default_warmup if warmup is None else warmup
    g = torch.Generator().manual_seed(3)
    a = torch.randn(size, size, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=g).to(device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    seconds = []
    for i in range(warmup + repeats):
        measure.sync(device)
        start = clock()
        torch.mm(a, b, out=out)
        measure.sync(device)
        if i >= warmup:
            seconds.append(clock() - start)
    median = statistics.median(seconds)
    return {"matmul_tflops": 2 * size**3 / median / 1e12, "matmul_ms": 1e3 * median, "matmul_size": size,
            "matmul_dtype": DTYPE_NAMES.get(dtype, str(dtype)), "matmul_repeats": repeats, "matmul_warmup": warmup}


def run_job(job: dict) -> dict:
    """The ``pretrain`` section's ``matmul`` measurement, in its own process (threads as the others)."""
    device = measure.setup(job)
    return {**matmul_rate(device, job.get("matmul_size"), warmup=job.get("matmul_warmup"),
                          repeats=job.get("matmul_repeats", 10)),
            "peak_host_mb": measure.peak_host_mb(), "peak_device_mb": measure.peak_device_mb(device)}


def achieved_tflops(train_gflops_per_image: float, images_per_s: float) -> float:
    """TFLOP/s a training step reaches: its FLOPs per image (forward + loss + backward) x images per second."""
    return train_gflops_per_image * images_per_s / 1e3


def utilisation(achieved: float, matmul_tflops: float | None) -> float | None:
    """Model FLOP utilisation: achieved TFLOP/s over the measured matrix rate (None when not measured)."""
    return achieved / matmul_tflops if matmul_tflops else None


def describe(achieved: float, matmul: dict | None) -> str:
    """``173.2 TFLOP/s achieved, 21.9% of the measured bf16 matrix rate`` (the second part when measured)."""
    text = f"{flop_rate(achieved)} achieved"
    share = utilisation(achieved, matmul and matmul.get("matmul_tflops"))
    if share is not None:
        text += f", {100 * share:.1f}% of the measured {matmul['matmul_dtype']} matrix rate"
    return text


def flop_rate(tflops: float) -> str:
    """``12.3 TFLOP/s``, or in GFLOP/s below one TFLOP/s (a CPU)."""
    return f"{tflops:.1f} TFLOP/s" if tflops >= 1 else f"{1e3 * tflops:.1f} GFLOP/s"
