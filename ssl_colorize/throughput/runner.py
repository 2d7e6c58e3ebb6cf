"""Each measurement runs in a fresh Python process, so that its peak host memory is its own.

torch's CPU allocations are invisible to ``tracemalloc``, so the peak is the process's ``ru_maxrss``;
a process that had already run another variant would report that variant's peak. A job is a JSON dict
(``section``, ``variant``, sizes); ``python -m ssl_colorize.throughput JOB`` runs one and prints its
result on a line starting with :data:`JOB_MARKER`.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

JOB_MARKER = "THROUGHPUT_JOB_RESULT "
#: section -> the module whose ``run_job(job)`` measures it.
SECTION_MODULES = {"loss": "ssl_colorize.throughput.loss", "pretrain": "ssl_colorize.throughput.pretrain",
                   "probe": "ssl_colorize.throughput.probe"}


def run_job_here(job: dict) -> dict:
    """Run one measurement in this process (what the measurement subprocess does)."""
    return importlib.import_module(SECTION_MODULES[job["section"]]).run_job(job)


def run_job_subprocess(job: dict) -> dict:
    """Run one measurement in a fresh Python process; returns its result dict."""
    command = [sys.executable, "-m", "ssl_colorize.throughput", json.dumps(job)]
    proc = subprocess.run(command, capture_output=True, text=True)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(JOB_MARKER):
            return json.loads(line[len(JOB_MARKER):])
    raise RuntimeError(f"throughput measurement {job['section']}/{job.get('encoder', '')}/{job['variant']} failed "
                       f"(exit {proc.returncode}):\n{proc.stderr[-4000:]}")


def run_all(jobs: list[dict], progress: bool) -> list[dict]:
    """Each job in its own process, one after another, with a progress bar on stderr."""
    from tqdm import tqdm

    results = []
    bar = tqdm(jobs, desc="throughput", unit="measurement", disable=not progress, file=sys.stderr)
    for job in bar:
        bar.set_postfix_str(f"{job['section']}/{job.get('encoder', '')}/{job['variant']}")
        results.append(run_job_subprocess(job))
    return results


def job_main(argv: list[str] | None = None) -> dict:
    """``python -m ssl_colorize.throughput JOB_JSON``: one measurement, its result printed as JSON."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m ssl_colorize.throughput JOB_JSON (one measurement of the throughput "
                         "benchmark; run the benchmark with python -m ssl_colorize.benchmarks.throughput)")
    result = run_job_here(json.loads(argv[0]))
    print(JOB_MARKER + json.dumps(result), flush=True)
    return result
