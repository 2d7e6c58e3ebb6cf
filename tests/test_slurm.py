"""The SLURM launcher against a real cluster (ssl_colorize.launch; slurm/submit.py and slurm/sweep.py
launch its commands). Its logic without a cluster is tested in tests/test_launch.py.

Tests marked ``slurm`` submit real jobs to a real cluster: the single-node one that
``slurm/local_cluster.sh start`` runs (CI starts it). They skip, saying why, where no cluster answers,
unless SSL_COLORIZE_REQUIRE_SLURM=1, where they fail instead.

The jobs are the real entry points (ssl_colorize.benchmarks.linear_probe, ssl_colorize.pretrain) with
tiny settings, and the module ``slurm_toy_entry`` (tests/slurm_toy_entry.py, imported by name with
tests/ on PYTHONPATH), a resumable regression small enough that interrupting it half-way and comparing
against an uninterrupted run takes seconds.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from launch_testing import (TOY, launch_cli, manifest, run_ok, toy_importable,  # noqa: F401
                            toy_reference, toy_sweep_text, write_sweep)

from ssl_colorize.launch import cluster, submit, sweep
from ssl_colorize.results import parts_dir, read_rows


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------
def _cluster_problem() -> str | None:
    """Why no SLURM cluster can take jobs here, or None when one can."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "SLURM client commands (sinfo, sbatch) are not installed; see slurm/local_cluster.sh"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 20 s"
    if out.returncode != 0:
        return f"no SLURM controller answers (sinfo: {out.stderr.strip() or out.returncode}); " \
               f"start one with: bash slurm/local_cluster.sh start"
    usable = {"idle", "mixed", "allocated", "completing"}
    states = set(out.stdout.split())
    if not states & usable:
        return f"no usable SLURM node (states: {sorted(states) or 'none'})"
    return None


@pytest.fixture(scope="session")
def slurm_cluster():
    problem = _cluster_problem()
    if problem is not None:
        if os.environ.get("SSL_COLORIZE_REQUIRE_SLURM") == "1":
            pytest.fail(f"SSL_COLORIZE_REQUIRE_SLURM=1 but {problem}")
        pytest.skip(problem)


def wait_until(predicate, timeout_s: float, what: str, poll_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def job_log(folder: Path, job_id: str) -> str:
    """Everything a job wrote to its submitit logs (stdout and stderr of every task and restart)."""
    return "\n".join(p.read_text(errors="replace") for p in sorted(folder.rglob(f"{job_id}_*log.*")))


def progress(out: Path) -> int:
    try:
        return json.loads((out / "progress.json").read_text())["step"]
    except (FileNotFoundError, json.JSONDecodeError):
        return 0



# ------------------------------------------------------------------------------------------------
# Against a real SLURM cluster
# ------------------------------------------------------------------------------------------------

@pytest.mark.slurm
@pytest.mark.slow
def test_probe_sweep_is_one_job_array_into_one_table(slurm_cluster, tmp_path):
    table, run_root = tmp_path / "table.csv", tmp_path / "runs"
    sweep_file = write_sweep(tmp_path / "probe.toml", f"""
name = "probe_test"
entry_point = "benchmarks/linear_probe.py"
out_csv = "{table}"
run_root = "{run_root}"
[args]
encoder = "alexnet_lab"
layer = "conv1"
epochs = 1
limit = 48
crop = 64
resize = 72
batch_size = 16
workers = 0
no_plot = true
[grid]
checkpoint = ["random"]
lr = [0.01, 0.003]
seed = [0, 1]
[slurm]
time = 15
cpus_per_task = 1
array_parallelism = 4
""")
    points = sweep.expand_sweep(sweep.load_sweep(sweep_file))
    by_id = {p.run_id: p.params for p in points}
    # The four jobs build the built-in data cache (SSL_COLORIZE_CACHE, inherited) at the same moment.
    def check_table():
        rows = read_rows(table)
        assert set(rows["run_id"]) == set(by_id)
        # One row per (run, tap, metric): nothing lost, nothing written twice by concurrent jobs.
        assert rows.groupby(["run_id", "tap", "metric"]).size().eq(1).all()
        assert set(rows["metric"]) >= {"top1"} and set(rows["tap"]) == {"conv1"}
        for _, row in rows.iterrows():
            assert row["seed"] == by_id[row["run_id"]]["seed"]
            assert json.loads(row["hparams"])["lr"] == by_id[row["run_id"]]["lr"]
            assert 0.0 <= row["value"] <= 100.0
        return rows

    out = run_ok("sweep", str(sweep_file), "--wait", cwd=tmp_path)
    assert "4 to submit" in out and "with 4 tasks" in out
    first = manifest(run_root)
    array_ids = {entry["job_id"].split("_")[0] for entry in first}
    assert len(first) == 4 and len(array_ids) == 1  # one job array ...
    assert sorted(entry["job_id"].split("_")[1] for entry in first) == ["0", "1", "2", "3"]  # ... of four tasks
    rows = check_table()
    assert len(rows) == 4 * rows["metric"].nunique()

    # Everything finished: running the sweep again submits nothing.
    out = run_ok("sweep", str(sweep_file), cwd=tmp_path)
    assert "4 finished" in out and "nothing to submit" in out
    assert manifest(run_root) == first

    # Two jobs lost their rows and run folders (they completed): running it again submits exactly those
    # two, as one array.
    lost = sorted(by_id)[:2]
    kept = rows[~rows["run_id"].isin(lost)]
    shutil.rmtree(parts_dir(table))  # the jobs' row files: the table is now only the kept rows
    kept.to_csv(table, index=False)
    for run_id in lost:
        shutil.rmtree(run_root / run_id)
    out = run_ok("sweep", str(sweep_file), cwd=tmp_path)
    assert "2 finished" in out and "2 to submit" in out and "with 2 tasks" in out
    second = manifest(run_root)[4:]
    assert sorted(e["run_id"] for e in second) == lost
    assert len({e["job_id"].split("_")[0] for e in second}) == 1
    # Asked again while those two are queued or running (or already done): nothing is submitted twice.
    plan = sweep.plan_sweep(sweep.load_sweep(sweep_file))
    assert not plan.todo and len(plan.done) + len(plan.active) == 4
    cluster.wait_for_jobs([e["job_id"] for e in second], timeout_s=600)
    check_table()
    out = run_ok("sweep", str(sweep_file), "--collect", cwd=tmp_path)
    assert "4 runs" in out


@pytest.mark.slurm
@pytest.mark.slow
def test_requeued_jobs_resume_to_the_uninterrupted_result(slurm_cluster, tmp_path, monkeypatch):
    steps = ["--steps", "60", "--step-seconds", "0.2"]
    reference = toy_reference(monkeypatch, tmp_path / "reference", "--steps", "60")  # no sleeping needed
    opts = cluster.ClusterOptions(time=10, cpus_per_task=1, log_folder=str(tmp_path / "logs" / "%j"))
    runs = {}
    for how in ("scontrol_requeue", "time_limit_signal"):
        out = tmp_path / how
        argv = [*steps, "--out", str(out), "--run-id", how, "--out-csv", str(tmp_path / "table.csv")]
        runs[how] = (str(submit.submit(TOY, argv, opts).job_id), out)
    for how, (job_id, out) in runs.items():
        wait_until(lambda: progress(out) >= 8, 120, f"{how} job {job_id} to get 8 steps in")
    # An administrator's requeue: SLURM kills the job and queues it again.
    subprocess.run(["scontrol", "requeue", runs["scontrol_requeue"][0]], check=True)
    # What SLURM sends before the time limit (submitit asks for --signal=USR2@delay): checkpoint + requeue.
    subprocess.run(["scancel", "--signal=USR2", runs["time_limit_signal"][0]], check=True)
    cluster.wait_for_jobs([job_id for job_id, _ in runs.values()], timeout_s=300)

    rows = read_rows(tmp_path / "table.csv")
    for how, (job_id, out) in runs.items():
        starts = [json.loads(line) for line in (out / "starts.log").read_text().splitlines()]
        assert len(starts) == 2, f"{how}: {starts}"
        assert starts[0] == {"start_step": 0, "restart": 0, "world_size": 1}
        assert starts[1]["restart"] == 1 and 8 <= starts[1]["start_step"] < 60  # resumed half-way
        final = json.loads((out / "final.json").read_text())
        # Bit for bit the uninterrupted run's result.
        assert (final["weight"], final["bias"], final["final_loss"]) == \
               (reference["weight"], reference["bias"], reference["final_loss"])
        assert sorted(rows[rows["run_id"] == how]["metric"]) == ["mse", "weight_norm"]
    assert "Calling checkpoint method" in job_log(tmp_path / "logs", runs["time_limit_signal"][0])


@pytest.mark.slurm
def test_two_task_ddp_job_matches_one_process(slurm_cluster, tmp_path, monkeypatch):
    reference = toy_reference(monkeypatch, tmp_path / "reference", "--steps", "12")
    opts = cluster.ClusterOptions(tasks_per_node=2, cpus_per_task=1, time=10, log_folder=str(tmp_path / "logs" / "%j"))
    job = submit.submit(TOY, ["--steps", "12", "--out", str(tmp_path / "run"), "--run-id", "ddp",
                              "--out-csv", str(tmp_path / "table.csv")], opts)
    cluster.wait_for_jobs([str(job.job_id)], timeout_s=300)
    results = job.results()
    assert sorted(r["rank"] for r in results) == [0, 1] and {r["world_size"] for r in results} == {2}
    # Each task trained on half of every batch; DDP's averaged gradients give the one-process result.
    for result in results:
        for got, want in zip(result["weight"] + result["bias"], reference["weight"] + reference["bias"]):
            assert math.isclose(got, want, rel_tol=1e-5, abs_tol=1e-6)
    rows = read_rows(tmp_path / "table.csv")
    assert len(rows) == 2 and json.loads(rows["hparams"][0])["world_size"] == 2  # rows from rank 0 only


@pytest.mark.slurm
@pytest.mark.slow
def test_two_task_ddp_pretraining_on_cpu(slurm_cluster, tmp_path):
    out = tmp_path / "pretrain"
    opts = cluster.ClusterOptions(tasks_per_node=2, cpus_per_task=1, time=20, log_folder=str(tmp_path / "logs" / "%j"))
    # ResNet-50 (BatchNorm over the global batch across the two processes) has the smaller checkpoints.
    argv = ["--encoder", "resnet50_lab", "--steps", "2", "--batch-size", "4", "--ckpt-every", "2",
            "--snapshot-every", "2", "--workers", "0", "--preview-count", "1", "--no-progress",
            "--out", str(out), "--run-id", "ddp-pretrain", "--out-csv", str(tmp_path / "table.csv")]
    job = submit.submit("ssl_colorize.pretrain", argv, opts)
    cluster.wait_for_jobs([str(job.job_id)], timeout_s=600)
    try:
        results = job.results()
        assert [r["step"] for r in results] == [2, 2]
        assert json.loads((out / "config.json").read_text())["world_size"] == 2
        log = job_log(tmp_path / "logs", str(job.job_id))
        assert "rank 0/2" in log and "rank 1/2" in log and "2 process(es)" in log
        rows = read_rows(tmp_path / "table.csv")
        assert list(rows["run_id"]) == ["ddp-pretrain"] and math.isfinite(rows["value"][0])
    finally:
        shutil.rmtree(out, ignore_errors=True)  # the checkpoints are large


@pytest.mark.slurm
@pytest.mark.slow
def test_watcher_probes_every_snapshot(slurm_cluster, tmp_path):
    probe_runs = tmp_path / "probe_runs"
    sweep_file = write_sweep(tmp_path / "probe.toml", (
        f'name = "toy_probe"\nentry_point = "{TOY}"\nout_csv = "{tmp_path / "probe.csv"}"\n'
        f'run_root = "{probe_runs}"\n[args]\nsteps = 3\n[grid]\nlr = [0.05]\n[slurm]\ntime = 10\n'))
    out = run_ok("submit", "--time", "10", "--log-folder", str(tmp_path / "logs" / "%j"),
                  "--watch-sweep", str(sweep_file), "--watch-poll-s", "1", "--",
                  TOY, "--steps", "12", "--step-seconds", "0.3", "--snapshot-every", "4",
                  "--out", str(tmp_path / "pretrain"), cwd=tmp_path)
    pretrain_id = out.split("submitted job ")[1].split(":")[0]
    watcher_id = out.split("submitted watcher job ")[1].split(":")[0]
    cluster.wait_for_jobs([pretrain_id, watcher_id], timeout_s=300)
    probes = manifest(probe_runs)
    assert len(probes) == 3  # one probe per snapshot, submitted while pretraining ran
    cluster.wait_for_jobs([e["job_id"] for e in probes], timeout_s=300)
    rows = read_rows(tmp_path / "probe.csv")
    snapshots = sorted(str(p) for p in (tmp_path / "pretrain" / "snapshots").glob("*.pth"))
    assert len(snapshots) == 3 and sorted(set(rows["checkpoint"])) == snapshots
    assert rows.groupby(["run_id", "metric"]).size().eq(1).all()


@pytest.mark.slurm
def test_a_failed_array_task_is_reported_not_resubmitted(slurm_cluster, tmp_path):
    (tmp_path / "broken.pth").write_text("not a checkpoint")  # passes validation, fails in the job
    grid = f'checkpoint = ["{tmp_path / "broken.pth"}", "random"]'
    sweep_file = write_sweep(tmp_path / "toy.toml", toy_sweep_text(tmp_path, grid=grid, args="steps = 2"))
    out = launch_cli("sweep", str(sweep_file), "--wait", cwd=tmp_path)
    assert out.returncode == 1 and "with 2 tasks" in out.stdout, out.stdout + out.stderr
    first = manifest(tmp_path / "runs")
    failed_job = first[0]["job_id"]
    assert f"job {failed_job}: " in out.stderr and "Error" in out.stderr
    # Running the sweep again: the finished point stays finished, the failed one is reported with the
    # reason its job gave, and nothing is submitted blindly.
    out = run_ok("sweep", str(sweep_file), cwd=tmp_path)
    assert "1 finished, 0 queued or running, 1 failed, 0 to submit" in out and "nothing to submit" in out
    assert f"job {failed_job}: " in out and "--retry-failed" in out
    assert manifest(tmp_path / "runs") == first
    out = run_ok("sweep", str(sweep_file), "--retry-failed", "--dry-run", cwd=tmp_path)
    assert "0 failed, 1 to submit" in out
