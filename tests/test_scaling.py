"""The multi-GPU scaling estimate (ssl_colorize.throughput.scaling): bytes, all-reduce bound, table reading."""

import csv

import pytest
import torch
from torch import nn

from ssl_colorize.throughput import scaling
from ssl_colorize.throughput.report import CSV_COLUMNS


def test_gradient_bytes_counts_trainable_float32_parameters_only():
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 5, bias=False))
    model[1].weight.requires_grad_(False)
    assert scaling.gradient_bytes(model) == 4 * (3 * 2 + 2)


def test_allreduce_bound_by_hand():
    assert scaling.allreduce_seconds(1e9, 1, 1) == 0.0
    one_node = scaling.allreduce_seconds(8e9, 8, 1, nvlink=400e9, infiniband=50e9)
    assert one_node == pytest.approx(2 * 7 / 8 * 8e9 / 400e9)
    four_nodes = scaling.allreduce_seconds(8e9, 8, 4, nvlink=400e9, infiniband=50e9)
    assert four_nodes == pytest.approx(one_node + 2 * 3 / 4 * 1e9 / 50e9)
    with pytest.raises(ValueError):
        scaling.allreduce_seconds(1.0, 0, 1)


def test_estimate_bounds_and_rate():
    e = scaling.estimate("tiny", nn.Linear(1000, 1000), batch_per_gpu=10, compute_ms=2.0, gpus_per_node=8, nodes=2)
    assert e.gpus == 16
    assert e.step_ms_best == max(2.0, e.allreduce_ms) and e.step_ms_worst == pytest.approx(2.0 + e.allreduce_ms)
    assert e.images_per_s(e.step_ms_best) == pytest.approx(16 * 10 / (e.step_ms_best / 1e3))


def _row(**values):
    row = dict.fromkeys(CSV_COLUMNS, "")
    row.update(values)
    return row


def test_measured_compute_reads_the_newest_cuda_compute_row(tmp_path):
    table = tmp_path / "throughput.csv"
    with open(table, "w", newline="") as handle:
        writer = csv.DictWriter(handle, CSV_COLUMNS)
        writer.writeheader()
        writer.writerow(_row(time="2026-01-01T00:00:00+00:00", device="NVIDIA H100", section="pretrain",
                             variant="alexnet_lab/compute", ms_per_step="20.0"))
        writer.writerow(_row(time="2026-02-01T00:00:00+00:00", device="NVIDIA H200", section="pretrain",
                             variant="alexnet_lab/compute", ms_per_step="12.5"))
        writer.writerow(_row(time="2026-03-01T00:00:00+00:00", device="AMD EPYC (2 cpus)", section="pretrain",
                             variant="alexnet_lab/compute", ms_per_step="900"))
        writer.writerow(_row(time="2026-03-01T00:00:00+00:00", device="NVIDIA H200", section="pretrain",
                             variant="alexnet_lab/ours_workers", ms_per_step="15"))
    assert scaling.measured_compute_ms(table) == {"alexnet_lab": (12.5, "NVIDIA H200")}


def test_cli_prints_each_layout_and_rejects_bad_options(tmp_path, capsys):
    torch.manual_seed(0)
    estimates = scaling.cli(["--table", str(tmp_path / "none.csv"), "--step-ms", "colornet=16", "--nodes", "1,4"])
    assert [e.gpus for e in estimates] == [1, 8, 32]
    assert estimates[0].allreduce_ms == 0 and estimates[2].allreduce_ms > estimates[1].allreduce_ms > 0
    assert estimates[0].gradient_mb == pytest.approx(4 * 32_230_393 / 2**20)  # colornet: 32.2 M parameters
    for argv in (["--step-ms", "colornet=fast"], ["--step-ms", "colornet=16", "--nodes", "0"],
                 ["--table", str(tmp_path / "none.csv")]):
        with pytest.raises(SystemExit) as exit_info:
            scaling.cli(argv)
        assert exit_info.value.code == 2
    assert capsys.readouterr().err.count("error:") == 3
