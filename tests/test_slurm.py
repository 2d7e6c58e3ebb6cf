"""The SLURM launcher (ssl_colorize.launch, slurm/submit.py, slurm/sweep.py).

Tests marked ``slurm`` submit real jobs to a real cluster: the single-node one that
``slurm/local_cluster.sh start`` runs (CI starts it). They skip, saying why, where no cluster answers,
unless SSL_COLORIZE_REQUIRE_SLURM=1, where they fail instead. The others check the launcher's logic
in this process (and through submitit's local executor), with no cluster.

The jobs are the real entry points (benchmarks/linear_probe.py, ssl_colorize.pretrain) with tiny
settings, and tests/slurm_toy_entry.py, a resumable regression small enough that interrupting it
half-way and comparing against an uninterrupted run takes seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ssl_colorize import launch
from ssl_colorize.results import append_rows, make_row, read_rows

REPO = Path(__file__).resolve().parent.parent
TOY = "tests/slurm_toy_entry.py"
LAYOUT_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_STEP_ID", "SLURM_PROCID",
               "SLURM_RESTART_COUNT", "SUBMITIT_EXECUTOR")


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


def run_cli(script: str, *args: str, cwd: Path, timeout: float = 300) -> str:
    out = subprocess.run([sys.executable, str(REPO / "slurm" / script), *args], cwd=cwd, capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, f"{script} {args} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout


def clean_layout(monkeypatch) -> None:
    for name in LAYOUT_VARS:
        monkeypatch.delenv(name, raising=False)


def toy_reference(monkeypatch, out: Path, *argv: str) -> dict:
    """The toy trained uninterrupted, in this process (one process, no cluster)."""
    toy = launch.load_entry_point(TOY)
    clean_layout(monkeypatch)
    return toy.main(toy.get_args_parser().parse_args(["--out", str(out), *argv]))


def progress(out: Path) -> int:
    try:
        return json.loads((out / "progress.json").read_text())["step"]
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def write_sweep(path: Path, body: str) -> Path:
    path.write_text(body)
    return path


def toy_sweep_text(tmp_path: Path, grid: str = "lr = [0.05, 0.02]\nseed = [0, 1]") -> str:
    return (f'name = "toy"\nentry_point = "{TOY}"\nout_csv = "{tmp_path / "table.csv"}"\n'
            f'run_root = "{tmp_path / "runs"}"\n[args]\nsteps = 5\n[grid]\n{grid}\n[slurm]\ntime = 10\n')


# ------------------------------------------------------------------------------------------------
# No cluster needed
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, minutes", [
    (90, 90), ("90", 90), ("1:30", 2), ("2:00:00", 120), ("1-00:00:00", 1440), ("2-12", 3600),
    ("0:30:01", 31), (0.5, 1),
])
def test_time_limits_in_minutes(value, minutes):
    # SLURM's formats (sbatch --time): minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM:SS; partial minutes round up.
    assert launch.parse_time_minutes(value) == minutes


@pytest.mark.parametrize("bad", ["", "1h", "-5", 0, "0:00:00", True])
def test_bad_time_limits_are_rejected(bad):
    with pytest.raises(ValueError, match="time limit"):
        launch.parse_time_minutes(bad)


def test_cluster_options_precedence_and_checks():
    parser = argparse.ArgumentParser()
    launch.add_cluster_args(parser)
    args = parser.parse_args(["--time", "2:00:00", "--gpus-per-node", "4"])
    opts = launch.cluster_options(args, base={"time": 30, "partition": "debug", "cpus_per_task": 3})
    # command line > the sweep's [slurm] table > built-in defaults; one task per GPU by default
    assert (opts.time, opts.partition, opts.cpus_per_task, opts.gpus_per_node, opts.ntasks_per_node) == \
           (120, "debug", 3, 4, 4)
    assert opts.nodes == 1 and opts.max_requeues == 3
    with pytest.raises(ValueError, match="unknown cluster option 'gpus'"):
        launch.cluster_options(base={"gpus": 1}, source="sweep.toml [slurm]")
    with pytest.raises(ValueError, match="signal-delay-s"):
        launch.ClusterOptions(time=1, signal_delay_s=120)
    with pytest.raises(ValueError, match="nodes"):
        launch.ClusterOptions(nodes=0)


def test_options_to_argv_round_trips_through_the_parser():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--taps", nargs="+")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--flip", action="store_false")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True)
    values = {"lr": 0.003, "batch_size": 32, "taps": ["conv1", "conv5"], "no_plot": True, "flip": False,
              "amp": False}
    argv = launch.options_to_argv(parser, values, "sweep.toml")
    parsed = parser.parse_args(argv)
    assert (parsed.lr, parsed.batch_size, parsed.taps, parsed.no_plot, parsed.flip, parsed.amp) == \
           (0.003, 32, ["conv1", "conv5"], True, False, False)
    assert "--batch-size" in argv  # spelt as the parser spells it
    with pytest.raises(ValueError, match="'epochs' is not an option"):
        launch.options_to_argv(parser, {"epochs": 3}, "sweep.toml")
    with pytest.raises(ValueError, match="switch"):
        launch.options_to_argv(parser, {"no_plot": "yes"}, "sweep.toml")


def test_with_option_replaces_every_spelling():
    argv = ["--steps", "4", "--resume", "old.pth", "--lr=0.1", "--resume=x"]
    assert launch.with_option(TOY, argv, "resume", "auto") == ["--steps", "4", "--lr=0.1", "--resume", "auto"]
    assert launch.with_option(TOY, argv, "no_such_option", "1") == argv  # entry point lacks it: unchanged


def test_run_ids_are_stable_and_distinct():
    a = launch.run_id_for(TOY, {"lr": 0.1, "seed": 0})
    assert a == launch.run_id_for(TOY, {"seed": 0, "lr": 0.1})  # key order in the file does not matter
    assert a == launch.run_id_for(str(REPO / TOY), {"lr": 0.1, "seed": 0})  # nor how the script is named
    assert a != launch.run_id_for(TOY, {"lr": 0.1, "seed": 1})
    assert a.startswith("slurm_toy_entry-")


@pytest.mark.parametrize("body, message", [
    ('entry_point = "x.py"', "'out_csv'"),
    ('entry_point = "t.py"\nout_csv = "a.csv"\nextra = 1', "unknown keys"),
    ('entry_point = "t.py"\nout_csv = "a.csv"\n[grid]\nlr = []', "non-empty list"),
    ('entry_point = "t.py"\nout_csv = "a.csv"\n[grid]\nout_csv = ["b.csv"]', "set by the sweep itself"),
    ('entry_point = "t.py"\nout_csv = "a.csv"\n[args]\nlr = 1\n[grid]\nlr = [2]', "both"),
    ('entry_point = "t.py"\nout_csv = "a.csv"\n[slurm]\ngpu = 1', "unknown cluster option"),
    ('entry_point = = "t.py"', "not valid TOML"),
])
def test_bad_sweep_files_name_the_problem(tmp_path, body, message):
    path = write_sweep(tmp_path / "bad.toml", body)
    with pytest.raises(ValueError, match=message) as info:
        launch.load_sweep(path)
    assert str(path) in str(info.value)


def test_sweep_points_and_done_detection(tmp_path):
    sweep = launch.load_sweep(write_sweep(tmp_path / "toy.toml", toy_sweep_text(tmp_path)))
    points = launch.expand_sweep(sweep)
    assert [p.params for p in points] == [{"lr": 0.05, "seed": 0}, {"lr": 0.05, "seed": 1},
                                          {"lr": 0.02, "seed": 0}, {"lr": 0.02, "seed": 1}]
    assert len({p.run_id for p in points}) == 4
    args = launch.parse_entry_args(TOY, points[3].argv)
    run_dir = str(tmp_path / "runs" / points[3].run_id)
    assert (args.lr, args.seed, args.steps, args.run_id, args.out_csv, args.resume, args.out) == \
           (0.02, 1, 5, points[3].run_id, str(tmp_path / "table.csv"), "auto", run_dir)
    plan = launch.plan_sweep(sweep, points, check_queue=False)
    assert (len(plan.done), len(plan.todo)) == (0, 4)
    # Rows of two points (and of an unrelated run) in the table: those two are finished.
    append_rows(sweep.out_csv, [
        make_row(run_id=r, benchmark="b", checkpoint="c", encoder="e", tap="t", dataset="d", split="s",
                 protocol="p", metric="m", value=1.0) for r in (points[0].run_id, points[2].run_id, "other")])
    plan = launch.plan_sweep(sweep, points, check_queue=False)
    assert [p.run_id for p in plan.done] == [points[0].run_id, points[2].run_id]
    assert [p.run_id for p in plan.todo] == [points[1].run_id, points[3].run_id]
    collected = launch.collect_sweep(sweep, points)
    assert sorted(collected["run_id"]) == sorted([points[0].run_id, points[2].run_id])
    assert list(collected["grid.lr"]) == [0.05, 0.02] and list(collected["grid.seed"]) == [0, 0]


def test_entry_point_job_runs_skips_and_checkpoints(tmp_path, monkeypatch):
    clean_layout(monkeypatch)
    csv_path = tmp_path / "table.csv"
    argv = ["--steps", "4", "--out", str(tmp_path / "run"), "--run-id", "r1", "--out-csv", str(csv_path)]
    job = launch.EntryPointJob(TOY, argv)
    result = job()
    assert result["start_step"] == 0 and len(read_rows(csv_path)) == 2
    # The same run again (a duplicate submission, or a requeue after its rows were written): skipped.
    assert job() == {"run_id": "r1", "skipped": True}
    assert len(read_rows(csv_path)) == 2
    # What submitit requeues on a time-limit signal: the same job, resuming from the rolling checkpoint.
    delayed = launch.EntryPointJob(TOY, argv + ["--resume", "some.pth"]).checkpoint()
    assert isinstance(delayed.function, launch.EntryPointJob)
    assert delayed.function.argv == argv + ["--resume", "auto"]


def test_a_restarted_job_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    reference = toy_reference(monkeypatch, tmp_path / "reference", "--steps", "10")
    out = tmp_path / "run"
    # The first start got through 6 steps before SLURM requeued it ...
    launch.EntryPointJob(TOY, ["--steps", "6", "--out", str(out)])()
    # ... and SLURM restarts the original submission (no --resume in it): SLURM_RESTART_COUNT says so.
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    result = launch.EntryPointJob(TOY, ["--steps", "10", "--out", str(out)])()
    assert result["start_step"] == 6
    assert (result["weight"], result["bias"], result["final_loss"]) == \
           (reference["weight"], reference["bias"], reference["final_loss"])


def test_local_executor_runs_a_two_process_job(tmp_path, monkeypatch):
    # The same machinery without SLURM (--cluster local): two tasks join a gloo group.
    clean_layout(monkeypatch)
    reference = toy_reference(monkeypatch, tmp_path / "reference", "--steps", "6")
    opts = launch.ClusterOptions(cluster="local", tasks_per_node=2, time=5, log_folder=str(tmp_path / "logs" / "%j"))
    job = launch.submit(TOY, ["--steps", "6", "--out", str(tmp_path / "run")], opts)
    results = job.results()
    assert sorted(r["rank"] for r in results) == [0, 1] and {r["world_size"] for r in results} == {2}
    for got, want in zip(results[0]["weight"] + results[0]["bias"], reference["weight"] + reference["bias"]):
        assert math.isclose(got, want, rel_tol=1e-5, abs_tol=1e-6)


def test_submit_cli_checks_arguments_before_submitting(tmp_path):
    out = run_cli("submit.py", "--dry-run", "--time", "10", "--", TOY, "--steps", "3", cwd=tmp_path)
    assert "would submit" in out and "'steps': 3" in out
    bad = subprocess.run([sys.executable, str(REPO / "slurm" / "submit.py"), "--dry-run", "--", TOY, "--stepz", "3"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--stepz" in bad.stderr
    missing = subprocess.run([sys.executable, str(REPO / "slurm" / "submit.py"), "--dry-run", "--",
                              "benchmarks/nope.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0 and "no such file" in missing.stderr


# ------------------------------------------------------------------------------------------------
# Against a real SLURM cluster
# ------------------------------------------------------------------------------------------------
def _manifest(run_root: Path) -> list[dict]:
    path = run_root / "submitted.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


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
    points = launch.expand_sweep(launch.load_sweep(sweep_file))
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

    out = run_cli("sweep.py", str(sweep_file), "--wait", cwd=tmp_path)
    assert "4 to submit" in out and "with 4 tasks" in out
    first = _manifest(run_root)
    array_ids = {entry["job_id"].split("_")[0] for entry in first}
    assert len(first) == 4 and len(array_ids) == 1  # one job array ...
    assert sorted(entry["job_id"].split("_")[1] for entry in first) == ["0", "1", "2", "3"]  # ... of four tasks
    rows = check_table()
    assert len(rows) == 4 * rows["metric"].nunique()

    # Everything finished: running the sweep again submits nothing.
    out = run_cli("sweep.py", str(sweep_file), cwd=tmp_path)
    assert "4 finished" in out and "nothing to submit" in out
    assert _manifest(run_root) == first

    # Two jobs failed (no rows, no run folder): running it again submits exactly those two, as one array.
    lost = sorted(by_id)[:2]
    kept = rows[~rows["run_id"].isin(lost)]
    kept.to_csv(table, index=False)
    for run_id in lost:
        shutil.rmtree(run_root / run_id)
    out = run_cli("sweep.py", str(sweep_file), cwd=tmp_path)
    assert "2 finished" in out and "2 to submit" in out and "with 2 tasks" in out
    second = _manifest(run_root)[4:]
    assert sorted(e["run_id"] for e in second) == lost
    assert len({e["job_id"].split("_")[0] for e in second}) == 1
    # Asked again while those two are queued or running (or already done): nothing is submitted twice.
    plan = launch.plan_sweep(launch.load_sweep(sweep_file))
    assert not plan.todo and len(plan.done) + len(plan.active) == 4
    launch.wait_for_jobs([e["job_id"] for e in second], timeout_s=600)
    check_table()
    out = run_cli("sweep.py", str(sweep_file), "--collect", cwd=tmp_path)
    assert "4 runs" in out


@pytest.mark.slurm
@pytest.mark.slow
def test_requeued_jobs_resume_to_the_uninterrupted_result(slurm_cluster, tmp_path, monkeypatch):
    steps = ["--steps", "60", "--step-seconds", "0.2"]
    reference = toy_reference(monkeypatch, tmp_path / "reference", "--steps", "60")  # no sleeping needed
    opts = launch.ClusterOptions(time=10, cpus_per_task=1, log_folder=str(tmp_path / "logs" / "%j"))
    runs = {}
    for how in ("scontrol_requeue", "time_limit_signal"):
        out = tmp_path / how
        argv = [*steps, "--out", str(out), "--run-id", how, "--out-csv", str(tmp_path / "table.csv")]
        runs[how] = (str(launch.submit(TOY, argv, opts).job_id), out)
    for how, (job_id, out) in runs.items():
        wait_until(lambda: progress(out) >= 8, 120, f"{how} job {job_id} to get 8 steps in")
    # An administrator's requeue: SLURM kills the job and queues it again.
    subprocess.run(["scontrol", "requeue", runs["scontrol_requeue"][0]], check=True)
    # What SLURM sends before the time limit (submitit asks for --signal=USR2@delay): checkpoint + requeue.
    subprocess.run(["scancel", "--signal=USR2", runs["time_limit_signal"][0]], check=True)
    launch.wait_for_jobs([job_id for job_id, _ in runs.values()], timeout_s=300)

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
    opts = launch.ClusterOptions(tasks_per_node=2, cpus_per_task=1, time=10, log_folder=str(tmp_path / "logs" / "%j"))
    job = launch.submit(TOY, ["--steps", "12", "--out", str(tmp_path / "run"), "--run-id", "ddp",
                              "--out-csv", str(tmp_path / "table.csv")], opts)
    launch.wait_for_jobs([str(job.job_id)], timeout_s=300)
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
    opts = launch.ClusterOptions(tasks_per_node=2, cpus_per_task=1, time=20, log_folder=str(tmp_path / "logs" / "%j"))
    # ResNet-50 (BatchNorm over the global batch across the two processes) has the smaller checkpoints.
    argv = ["--encoder", "resnet50_lab", "--steps", "2", "--batch-size", "4", "--ckpt-every", "2",
            "--snapshot-every", "2", "--workers", "0", "--preview-count", "1", "--no-progress",
            "--out", str(out), "--run-id", "ddp-pretrain", "--out-csv", str(tmp_path / "table.csv")]
    job = launch.submit("ssl_colorize.pretrain", argv, opts)
    launch.wait_for_jobs([str(job.job_id)], timeout_s=600)
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
    out = run_cli("submit.py", "--time", "10", "--log-folder", str(tmp_path / "logs" / "%j"),
                  "--watch-sweep", str(sweep_file), "--watch-poll-s", "1", "--",
                  TOY, "--steps", "12", "--step-seconds", "0.3", "--snapshot-every", "4",
                  "--out", str(tmp_path / "pretrain"), cwd=tmp_path)
    pretrain_id = out.split("submitted job ")[1].split(":")[0]
    watcher_id = out.split("submitted watcher job ")[1].split(":")[0]
    launch.wait_for_jobs([pretrain_id, watcher_id], timeout_s=300)
    probes = _manifest(probe_runs)
    assert len(probes) == 3  # one probe per snapshot, submitted while pretraining ran
    launch.wait_for_jobs([e["job_id"] for e in probes], timeout_s=300)
    rows = read_rows(tmp_path / "probe.csv")
    snapshots = sorted(str(p) for p in (tmp_path / "pretrain" / "snapshots").glob("*.pth"))
    assert len(snapshots) == 3 and sorted(set(rows["checkpoint"])) == snapshots
    assert rows.groupby(["run_id", "metric"]).size().eq(1).all()
