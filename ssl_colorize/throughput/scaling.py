"""Before booking a cluster: gradient bytes all-reduced per step and the step time to expect on many GPUs.

    python -m ssl_colorize.throughput.scaling                      # every pretrainable encoder
    python -m ssl_colorize.throughput.scaling --step-ms alexnet_lab=14.2 --nodes 1,4

Data-parallel pretraining (``torchrun`` / SLURM, ``ssl_colorize.distributed``) keeps the per-GPU batch
of the recipe and all-reduces every trainable parameter's gradient once per step, in float32 (autocast
runs the matrix products in bf16, but the parameters and their gradients stay float32). The estimate:

* bytes per step ``S`` = 4 x the trainable parameters, counted on the model itself;
* one node of ``g`` GPUs (ring all-reduce over NVLink): each GPU sends and receives 2 (g-1)/g x S bytes,
  so the all-reduce takes at least 2 (g-1)/g x S / B_nvlink;
* ``m`` nodes (hierarchical, as NCCL does with one InfiniBand NIC per GPU): a reduce-scatter and an
  all-gather inside each node (the time above) plus an all-reduce of each GPU's 1/g shard across the
  nodes over its own NIC, 2 (m-1)/m x S/g / B_ib;
* the step: between ``max(compute, all-reduce)`` (DDP overlaps the all-reduce of each gradient bucket
  with the rest of the backward pass) and ``compute + all-reduce`` (no overlap).

The link rates are the published per-direction peaks (below); what NCCL reaches is lower, so the
all-reduce times are lower bounds and the step times best cases. The single-GPU compute step comes
from ``results/throughput.csv`` (the newest CUDA row ``pretrain <encoder>/compute``) or ``--step-ms``.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ssl_colorize.engine.cli import ArgumentParser, UsageError, check_input_file, check_positive, fail, run_cli

#: Published per-direction link rates in bytes/s. NVLink 4 on H100 / H200 SXM: 900 GB/s per GPU, both
#: directions together (NVIDIA H100 and H200 datasheets) -> 450 GB/s each way. InfiniBand NDR: 400 Gb/s
#: per port (NVIDIA ConnectX-7 datasheet), one port per GPU on DGX H100 / H200 nodes -> 50 GB/s each way.
NVLINK4_BYTES_PER_S = 450e9
INFINIBAND_NDR_BYTES_PER_S = 50e9
GPUS_PER_NODE = 8
FLOAT32_BYTES = 4


def gradient_bytes(model: nn.Module) -> int:
    """Bytes all-reduced per step: every trainable parameter's float32 gradient."""
    return FLOAT32_BYTES * sum(p.numel() for p in model.parameters() if p.requires_grad)


def allreduce_seconds(num_bytes: float, gpus_per_node: int, nodes: int,
                      nvlink: float = NVLINK4_BYTES_PER_S, infiniband: float = INFINIBAND_NDR_BYTES_PER_S) -> float:
    """Lower bound of one all-reduce of ``num_bytes`` (see the module docstring); 0 on a single GPU."""
    if gpus_per_node < 1 or nodes < 1:
        raise ValueError(f"gpus_per_node and nodes must be >= 1, got {gpus_per_node}, {nodes}")
    g, m = gpus_per_node, nodes
    intra = 2 * (g - 1) / g * num_bytes / nvlink
    inter = 2 * (m - 1) / m * (num_bytes / g) / infiniband
    return intra + inter


@dataclass(frozen=True)
class ScalingEstimate:
    encoder: str
    batch_per_gpu: int
    gradient_mb: float
    gpus: int
    compute_ms: float
    allreduce_ms: float

    @property
    def step_ms_best(self) -> float:  # the all-reduce fully hidden behind the backward pass
        return max(self.compute_ms, self.allreduce_ms)

    @property
    def step_ms_worst(self) -> float:  # no overlap at all
        return self.compute_ms + self.allreduce_ms

    def images_per_s(self, step_ms: float) -> float:
        return self.gpus * self.batch_per_gpu / (step_ms / 1e3)


def estimate(encoder: str, model: nn.Module, batch_per_gpu: int, compute_ms: float, gpus_per_node: int,
             nodes: int) -> ScalingEstimate:
    num_bytes = gradient_bytes(model)
    return ScalingEstimate(encoder, batch_per_gpu, num_bytes / 2**20, gpus_per_node * nodes, compute_ms,
                           1e3 * allreduce_seconds(num_bytes, gpus_per_node, nodes))


def measured_compute_ms(table: str | os.PathLike) -> dict[str, tuple[float, str]]:
    """encoder -> (ms per step, device) of the newest CUDA ``pretrain <encoder>/compute`` row."""
    found: dict[str, tuple[str, float, str]] = {}
    with open(table, newline="") as handle:
        for row in csv.DictReader(handle):
            variant = row.get("variant", "")
            if row.get("section") != "pretrain" or not variant.endswith("/compute"):
                continue
            if not any(word in row.get("device", "") for word in ("NVIDIA", "H100", "H200", "A100")):
                continue
            encoder = variant.split("/")[0]
            if encoder not in found or row["time"] >= found[encoder][0]:
                found[encoder] = (row["time"], float(row["ms_per_step"]), row["device"])
    return {name: (ms, device) for name, (_, ms, device) in found.items()}


def get_args_parser(add_help: bool = True) -> ArgumentParser:
    p = ArgumentParser("ssl_colorize.throughput.scaling", add_help=add_help,
                       description="gradient bytes per step and the expected multi-GPU step time")
    p.add_argument("--table", default="results/throughput.csv",
                   help="throughput table with single-GPU compute rows (default results/throughput.csv)")
    p.add_argument("--step-ms", action="append", default=[],
                   help="ENCODER=MS: the single-GPU compute step, instead of the table's (repeatable)")
    p.add_argument("--nodes", default="1,4", help="comma list of node counts (default 1,4)")
    p.add_argument("--gpus-per-node", type=int, default=GPUS_PER_NODE)
    return p


def _parse(args) -> tuple[dict[str, float], list[int]]:
    given: dict[str, float] = {}
    for item in args.step_ms:
        name, sep, value = item.partition("=")
        try:
            given[name] = float(value)
        except ValueError:
            raise fail("--step-ms", item, "expected ENCODER=MILLISECONDS, e.g. alexnet_lab=14.2") from None
        if not sep or not math.isfinite(given[name]) or given[name] <= 0:
            raise fail("--step-ms", item, "expected ENCODER=MILLISECONDS with a positive number")
    try:
        nodes = [int(n) for n in args.nodes.split(",")]
    except ValueError:
        raise fail("--nodes", args.nodes, "expected a comma list of whole numbers, e.g. 1,4") from None
    if not nodes or min(nodes) < 1:
        raise fail("--nodes", args.nodes, "node counts must be >= 1")
    return given, nodes


def validate(args) -> None:
    from ssl_colorize.models.cards import get_card, pretrainable_models

    check_positive("--gpus-per-node", args.gpus_per_node)
    given, _ = _parse(args)
    for name in given:
        if name not in pretrainable_models():
            raise fail("--step-ms", name, f"not a pretrainable encoder ({', '.join(pretrainable_models())})")
        get_card(name)
    if not Path(args.table).is_file():
        if not given:
            raise UsageError(f"--table {args.table}: no such file, and no --step-ms given")
    else:
        check_input_file("--table", args.table)


def main(args) -> list[ScalingEstimate]:
    from ssl_colorize.models.cards import get_card, pretrainable_models
    from ssl_colorize.models.registry import create_model

    given, node_counts = _parse(args)
    measured = measured_compute_ms(args.table) if Path(args.table).is_file() else {}
    estimates = []
    print(f"{'encoder':<14}{'batch/GPU':>10}{'grad MiB':>10}{'GPUs':>6}{'compute ms':>12}{'all-reduce ms':>15}"
          f"{'step ms':>16}{'images/s':>20}")
    for name in pretrainable_models():
        if name in given:
            compute_ms, source = given[name], "--step-ms"
        elif name in measured:
            compute_ms, source = measured[name][0], measured[name][1]
        else:
            continue
        recipe = get_card(name).pretrain
        model = create_model(name)
        # one GPU (the measured step itself), then each node count at gpus_per_node GPUs per node
        layouts = dict.fromkeys([(1, 1)] + [(args.gpus_per_node, nodes) for nodes in node_counts])
        for gpus_per_node, nodes in layouts:
            e = estimate(name, model, recipe.batch_size, compute_ms, gpus_per_node, nodes)
            estimates.append(e)
            print(f"{name:<14}{e.batch_per_gpu:>10}{e.gradient_mb:>10.1f}{e.gpus:>6}{e.compute_ms:>12.1f}"
                  f"{e.allreduce_ms:>15.2f}{e.step_ms_best:>7.1f} - {e.step_ms_worst:<6.1f}"
                  f"{e.images_per_s(e.step_ms_worst):>9.0f} - {e.images_per_s(e.step_ms_best):<9.0f}")
        print(f"  ({name}: single-GPU compute step from {source})")
    if not estimates:
        print("no single-GPU compute step known: give --step-ms ENCODER=MS or a table with CUDA rows")
    return estimates


def cli(argv=None):
    return run_cli(get_args_parser(), main, argv, validate=validate)


if __name__ == "__main__":
    cli()
