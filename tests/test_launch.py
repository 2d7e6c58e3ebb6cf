"""The launcher's logic without a cluster: ssl_colorize.launch (entry, cluster, submit, sweep), in this
process and through submitit's local executor. The jobs against a real SLURM cluster are in
tests/test_slurm.py; the toy entry point is tests/slurm_toy_entry.py (see tests/launch_testing.py).
"""

from __future__ import annotations

import argparse
import math

import pytest
from launch_testing import (TOY, clean_layout, manifest, refused, run_ok, toy_importable,  # noqa: F401
                            toy_reference, toy_sweep_text, write_sweep)

from ssl_colorize.engine.cli import UsageError
from ssl_colorize.launch import cluster, entry, submit, sweep
from ssl_colorize.results import append_rows, make_row, read_rows

# ------------------------------------------------------------------------------------------------
# No cluster needed
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, minutes", [
    (90, 90), ("90", 90), ("1:30", 2), ("2:00:00", 120), ("1-00:00:00", 1440), ("2-12", 3600),
    ("0:30:01", 31), (0.5, 1),
])
def test_time_limits_in_minutes(value, minutes):
    # SLURM's formats (sbatch --time): minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM:SS; partial minutes round up.
    assert cluster.parse_time_minutes(value) == minutes


@pytest.mark.parametrize("bad", ["", "1h", "-5", 0, "0:00:00", True])
def test_bad_time_limits_are_rejected(bad):
    with pytest.raises(ValueError, match="time limit"):
        cluster.parse_time_minutes(bad)


def test_cluster_options_precedence_and_checks():
    parser = argparse.ArgumentParser()
    cluster.add_cluster_args(parser)
    args = parser.parse_args(["--time", "2:00:00", "--gpus-per-node", "4"])
    opts = cluster.cluster_options(args, base={"time": 30, "partition": "debug", "cpus_per_task": 3})
    # command line > the sweep's [slurm] table > built-in defaults; one task per GPU by default
    assert (opts.time, opts.partition, opts.cpus_per_task, opts.gpus_per_node, opts.ntasks_per_node) == \
           (120, "debug", 3, 4, 4)
    assert opts.nodes == 1 and opts.max_requeues == 3
    with pytest.raises(UsageError, match="unknown cluster option 'gpus'"):
        cluster.cluster_options(base={"gpus": 1}, source="sweep.toml [slurm]")
    with pytest.raises(UsageError, match=r"--time 1h: time limit"):
        cluster.cluster_options(parser.parse_args(["--time", "1h"]))
    with pytest.raises(ValueError, match="signal-delay-s"):
        cluster.ClusterOptions(time=1, signal_delay_s=120)
    with pytest.raises(ValueError, match="--nodes 0"):
        cluster.ClusterOptions(nodes=0)


def test_entry_point_specs_name_modules():
    assert entry.module_name("benchmarks/linear_probe.py") == "ssl_colorize.benchmarks.linear_probe"
    assert entry.module_name("/somewhere/benchmarks/voc_svm.py") == "ssl_colorize.benchmarks.voc_svm"
    assert entry.module_name("ssl_colorize/pretrain.py") == "ssl_colorize.pretrain"
    assert entry.module_name("ssl_colorize.pretrain") == "ssl_colorize.pretrain"
    with pytest.raises(UsageError, match="not a module"):
        entry.module_name("scripts/my_script.py")
    with pytest.raises(UsageError, match="no module ssl_colorize.benchmarks.nope"):
        entry.load_entry_point("benchmarks/nope.py")
    with pytest.raises(UsageError, match="has no get_args_parser"):
        entry.load_entry_point("ssl_colorize.color")
    # The entry point's parser speaks under its own name, not the launcher's.
    assert entry.entry_parser(TOY).prog == TOY


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
    argv = entry.options_to_argv(parser, values, "sweep.toml")
    parsed = parser.parse_args(argv)
    assert (parsed.lr, parsed.batch_size, parsed.taps, parsed.no_plot, parsed.flip, parsed.amp) == \
           (0.003, 32, ["conv1", "conv5"], True, False, False)
    assert "--batch-size" in argv  # spelt as the parser spells it
    with pytest.raises(UsageError, match="'epochs' is not an option"):
        entry.options_to_argv(parser, {"epochs": 3}, "sweep.toml")
    with pytest.raises(UsageError, match="switch"):
        entry.options_to_argv(parser, {"no_plot": "yes"}, "sweep.toml")


def test_with_option_and_the_resume_flag():
    toy = entry.entry_parser(TOY)
    argv = ["--steps", "4", "--out", "a", "--lr=0.1", "--out=b"]
    assert entry.with_option(toy, argv, "out", "c") == ["--steps", "4", "--lr=0.1", "--out", "c"]
    assert entry.with_option(toy, argv, "no_such_option", "1") == argv  # entry point lacks it: unchanged
    # --resume is a flag in the run contract: added once, with no value.
    resumed = entry.with_resume(toy, ["--steps", "4", "--resume", "--lr", "0.1"])
    assert resumed == ["--steps", "4", "--lr", "0.1", "--resume"] and toy.parse_args(resumed).resume is True
    # An entry point whose --resume still takes a value gets 'auto'; one with an optional value, the flag.
    valued, optional = argparse.ArgumentParser(), argparse.ArgumentParser()
    valued.add_argument("--resume", default="")
    optional.add_argument("--resume", nargs="?", const="auto", default=None)
    assert entry.with_resume(valued, ["--resume", "x.pth"]) == ["--resume", "auto"]
    assert optional.parse_args(entry.with_resume(optional, ["--resume", "x.pth"])).resume == "auto"
    assert entry.with_resume(argparse.ArgumentParser(), ["--lr", "1"]) == ["--lr", "1"]  # no --resume: unchanged


def test_run_ids_are_stable_and_distinct():
    a = sweep.run_id_for(TOY, {"lr": 0.1, "seed": 0})
    assert a == sweep.run_id_for(TOY, {"seed": 0, "lr": 0.1})  # key order in the file does not matter
    assert a != sweep.run_id_for(TOY, {"lr": 0.1, "seed": 1})
    assert a.startswith("slurm_toy_entry-")
    # A benchmark's script and its module are the same entry point.
    assert sweep.run_id_for("benchmarks/linear_probe.py", {"lr": 1}) == \
           sweep.run_id_for("ssl_colorize.benchmarks.linear_probe", {"lr": 1})


@pytest.mark.parametrize("body, message", [
    ('entry_point = "x.py"', "'out_csv'"),
    ('entry_point = "t.py"\nout_csv = "a.csv"\nextra = 1', "unknown keys"),
    ('entry_point = "t.py"\nout_csv = "a.csv"\n[grid]\nlr = []', "non-empty list"),
    ('entry_point = "t.py"\nout_csv = "a.csv"\n[grid]\nout_csv = ["b.csv"]', "set by the sweep itself"),
    ('entry_point = "t.py"\nout_csv = "a.csv"\n[args]\nresume = true', "set by the sweep itself"),
    ('entry_point = "t.py"\nout_csv = "a.csv"\n[args]\nlr = 1\n[grid]\nlr = [2]', "both"),
    ('entry_point = "t.py"\nout_csv = "a.csv"\n[slurm]\ngpu = 1', "unknown cluster option"),
    ('entry_point = "t.py"\nout_csv = "a.csv"\n[slurm]\ntime = "1h"', "--time 1h"),
    ('entry_point = = "t.py"', "not valid TOML"),
])
def test_bad_sweep_files_name_the_problem(tmp_path, body, message):
    path = write_sweep(tmp_path / "bad.toml", body)
    with pytest.raises(UsageError, match=message) as info:
        sweep.load_sweep(path)
    assert str(path) in str(info.value)
    with pytest.raises(UsageError, match="no such sweep file"):
        sweep.load_sweep(tmp_path / "missing.toml")


def test_sweep_points_and_done_detection(tmp_path):
    one = sweep.load_sweep(write_sweep(tmp_path / "toy.toml", toy_sweep_text(tmp_path)))
    points = sweep.expand_sweep(one)
    assert [p.params for p in points] == [{"lr": 0.05, "seed": 0}, {"lr": 0.05, "seed": 1},
                                          {"lr": 0.02, "seed": 0}, {"lr": 0.02, "seed": 1}]
    assert len({p.run_id for p in points}) == 4
    args = entry.parse_entry_args(TOY, points[3].argv)
    run_dir = str(tmp_path / "runs" / points[3].run_id)
    assert (args.lr, args.seed, args.steps, args.run_id, args.out_csv, args.resume, args.out) == \
           (0.02, 1, 5, points[3].run_id, str(tmp_path / "table.csv"), True, run_dir)
    plan = sweep.plan_sweep(one, points, check_queue=False)
    assert (len(plan.done), len(plan.todo)) == (0, 4)
    # Rows of two points (and of an unrelated run) in the table: those two are finished.
    append_rows(one.out_csv, [
        make_row(run_id=r, benchmark="b", checkpoint="c", encoder="e", tap="t", dataset="d", split="s",
                 protocol="p", metric="m", value=1.0) for r in (points[0].run_id, points[2].run_id, "other")])
    plan = sweep.plan_sweep(one, points, check_queue=False)
    assert [p.run_id for p in plan.done] == [points[0].run_id, points[2].run_id]
    assert [p.run_id for p in plan.todo] == [points[1].run_id, points[3].run_id]
    collected = sweep.collect_sweep(one, points)
    assert sorted(collected["run_id"]) == sorted([points[0].run_id, points[2].run_id])
    assert list(collected["grid.lr"]) == [0.05, 0.02] and list(collected["grid.seed"]) == [0, 0]


def test_a_sweep_with_refused_points_lists_each_reason_and_submits_nothing(tmp_path, capsys):
    path = write_sweep(tmp_path / "toy.toml", toy_sweep_text(tmp_path, grid="lr = [0.05, -1, 0]\nseed = [0]"))
    with pytest.raises(UsageError) as info:
        sweep.expand_sweep(sweep.load_sweep(path))
    lines = str(info.value).splitlines()
    assert "refuses 2 of 3 grid points; nothing submitted" in lines[0]
    assert lines[1:] == ['  point {"lr": -1, "seed": 0}: --lr -1.0: must be > 0',
                         '  point {"lr": 0, "seed": 0}: --lr 0.0: must be > 0']
    # The command line: exit 2 with every refused point, before any folder or manifest is written.
    message = refused(capsys, "sweep", str(path), "--cluster", "local", cwd=tmp_path)
    assert message.count("point {") == 2 and "--lr -1.0: must be > 0" in message
    assert not (tmp_path / "runs").exists()


def test_a_probe_sweep_with_an_unknown_layer_is_refused(tmp_path, capsys):
    path = write_sweep(tmp_path / "probe.toml", (
        f'entry_point = "benchmarks/linear_probe.py"\nout_csv = "{tmp_path / "t.csv"}"\n'
        f'run_root = "{tmp_path / "runs"}"\n[args]\ncheckpoint = "random"\n[grid]\nlayer = ["conv9", "conv1"]\n'))
    message = refused(capsys, "sweep", str(path), "--dry-run", cwd=tmp_path)
    [line] = [line for line in message.splitlines() if line.startswith("  point")]
    assert "refuses 1 of 2 grid points" in message and line.startswith('  point {"layer": "conv9"}: --layer')


def test_entry_point_job_runs_skips_and_checkpoints(tmp_path, monkeypatch):
    clean_layout(monkeypatch)
    csv_path = tmp_path / "table.csv"
    argv = ["--steps", "4", "--out", str(tmp_path / "run"), "--run-id", "r1", "--out-csv", str(csv_path)]
    job = submit.EntryPointJob(TOY, argv)
    result = job()
    assert result["start_step"] == 0 and len(read_rows(csv_path)) == 2
    # The same run again (a duplicate submission, or a requeue after its rows were written): skipped.
    assert job() == {"run_id": "r1", "skipped": True}
    assert len(read_rows(csv_path)) == 2
    # What submitit requeues on a time-limit signal: the same job, resuming from the rolling checkpoint.
    delayed = submit.EntryPointJob(TOY, argv + ["--resume"]).checkpoint()
    assert isinstance(delayed.function, submit.EntryPointJob)
    assert delayed.function.argv == argv + ["--resume"]
    assert submit.EntryPointJob("benchmarks/linear_probe.py", []).entry_point == "ssl_colorize.benchmarks.linear_probe"


def test_a_restarted_job_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    reference = toy_reference(monkeypatch, tmp_path / "reference", "--steps", "10")
    out = tmp_path / "run"
    # The first start got through 6 steps before SLURM requeued it ...
    submit.EntryPointJob(TOY, ["--steps", "6", "--out", str(out)])()
    # ... and SLURM restarts the original submission (no --resume in it): SLURM_RESTART_COUNT says so.
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    result = submit.EntryPointJob(TOY, ["--steps", "10", "--out", str(out)])()
    assert result["start_step"] == 6
    assert (result["weight"], result["bias"], result["final_loss"]) == \
           (reference["weight"], reference["bias"], reference["final_loss"])


def test_local_executor_runs_a_two_process_job(tmp_path, monkeypatch):
    # The same machinery without SLURM (--cluster local): two tasks join a gloo group, their layout
    # exported by submitit's TorchDistributedEnvironment.
    clean_layout(monkeypatch)
    reference = toy_reference(monkeypatch, tmp_path / "reference", "--steps", "6")
    opts = cluster.ClusterOptions(cluster="local", tasks_per_node=2, time=5, log_folder=str(tmp_path / "logs" / "%j"))
    job = submit.submit(TOY, ["--steps", "6", "--out", str(tmp_path / "run")], opts)
    results = job.results()
    assert sorted(r["rank"] for r in results) == [0, 1] and {r["world_size"] for r in results} == {2}
    for got, want in zip(results[0]["weight"] + results[0]["bias"], reference["weight"] + reference["bias"]):
        assert math.isclose(got, want, rel_tol=1e-5, abs_tol=1e-6)


def test_a_failed_sweep_point_is_reported_with_its_reason_not_resubmitted(tmp_path, monkeypatch):
    # The checkpoint exists (validation passes) but is not one: the job fails in main.
    clean_layout(monkeypatch)
    (tmp_path / "broken.pth").write_text("not a checkpoint")
    grid = f'checkpoint = ["{tmp_path / "broken.pth"}", "random"]'
    one = sweep.load_sweep(write_sweep(tmp_path / "toy.toml", toy_sweep_text(tmp_path, grid=grid, args="steps = 2")))
    points = sweep.expand_sweep(one)
    opts = cluster.ClusterOptions(cluster="local", time=5)
    for job in sweep.submit_sweep(one, opts, points):
        job.wait()
    assert all(e["cluster"] == "local" and "%j" in e["log_folder"] for e in manifest(tmp_path / "runs"))
    plan = sweep.plan_sweep(one, points, check_queue=False)
    assert [p.run_id for p in plan.done] == [points[1].run_id] and not plan.todo
    [(point, job_id, reason)] = plan.failed
    assert point.run_id == points[0].run_id and job_id == manifest(tmp_path / "runs")[0]["job_id"]
    assert "Error" in reason and "Traceback" not in reason  # the exception's own line, read from the job
    assert f"job {job_id}: {reason}" in sweep.describe_plan(plan) and "--retry-failed" in sweep.describe_plan(plan)
    retry = sweep.plan_sweep(one, points, check_queue=False, retry_failed=True)
    assert [p.run_id for p in retry.todo] == [points[0].run_id] and not retry.failed


def test_job_outcomes_are_read_from_the_jobs_files(tmp_path):
    # What submitit leaves in a job's log folder: a result pickle ("success" or "error" with the
    # traceback), or, for a job SLURM ended, only its logs.
    from submitit.core.utils import cloudpickle_dump

    folder = tmp_path / "logs" / "%j"
    for job_id, outcome in (("5_0", ("success", {"top1": 1.0})),
                            ("5_1", ("error", "Traceback (most recent call last):\n  ...\nValueError: boom"))):
        (tmp_path / "logs" / job_id).mkdir(parents=True)
        cloudpickle_dump(outcome, tmp_path / "logs" / job_id / f"{job_id}_0_result.pkl")
    assert submit.job_outcome("5_0", folder).status == "completed"
    assert submit.job_outcome("5_1", folder) == submit.JobOutcome("5_1", "failed", "ValueError: boom")
    (tmp_path / "logs" / "6").mkdir()
    (tmp_path / "logs" / "6" / "6_0_log.err").write_text(
        "epoch 1\nslurmstepd: error: *** JOB 6 ON n1 CANCELLED AT 2026-01-01T00:00:00 DUE TO TIME LIMIT ***\n"
        "srun: error: n1: task 0: Killed\n")
    ended = submit.job_outcome("6", folder)
    assert ended.status == "failed" and ended.reason.startswith("ended without a result (state ")
    assert ended.reason.endswith("*** JOB 6 ON n1 CANCELLED AT 2026-01-01T00:00:00 DUE TO TIME LIMIT ***")
    assert submit.job_outcome("7", folder, "local").status == "unknown"  # a local job may still run


def test_submit_cli_runs_the_entry_points_validation_first(tmp_path, capsys):
    out = run_ok("submit", "--dry-run", "--cluster", "local", "--time", "10", "--", TOY, "--steps", "3", cwd=tmp_path)
    assert "would submit slurm_toy_entry" in out and "'steps': 3" in out
    assert sorted(tmp_path.iterdir()) == []  # a dry run writes nothing
    # Each refusal: one line naming the entry point (or the option) and the reason, exit 2, nothing written.
    message = refused(capsys, "submit", "--dry-run", "--cluster", "local", "--", TOY, "--lr", "-1", cwd=tmp_path)
    assert message.count("\n") == 1 and "slurm_toy_entry refuses --lr -1: --lr -1.0: must be > 0" in message
    assert "--stepz" in refused(capsys, "submit", "--dry-run", "--", TOY, "--stepz", "3", cwd=tmp_path)
    assert "no module ssl_colorize.benchmarks.nope" in refused(capsys, "submit", "--dry-run", "--", "benchmarks/nope.py",
                                                               cwd=tmp_path)
    assert "put '--' before the entry point" in refused(capsys, "submit", "--dry-run", TOY, cwd=tmp_path)
    assert "--time 1h" in refused(capsys, "submit", "--time", "1h", "--dry-run", "--", TOY, cwd=tmp_path)
    assert "--nodes 0" in refused(capsys, "submit", "--nodes", "0", "--", TOY, cwd=tmp_path)
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "checkpoint.pth").write_text("x")
    assert "add --resume" in refused(capsys, "submit", "--cluster", "local", "--", TOY, "--out", str(tmp_path / "used"),
                                     cwd=tmp_path)
    assert "no such sweep file" in refused(capsys, "sweep", "missing.toml", cwd=tmp_path)
    assert "must be one of submit, sweep" in refused(capsys, "launch", cwd=tmp_path)


def test_submitting_pretraining_with_a_bad_lr_is_refused(tmp_path, capsys):
    message = refused(capsys, "submit", "--cluster", "local", "--dry-run", "--", "ssl_colorize.pretrain", "--lr", "-1",
                      cwd=tmp_path)
    assert "ssl_colorize.pretrain" in message and "--lr" in message


