"""One error convention for every entry point (issue 15): a missing checkpoint, a missing data folder
and an invalid value each give exit status 2, one line on stderr naming the option, no traceback, and
no file created, before any model is built or any data read.

The commands run in-process (``cli(argv)``) from an empty working folder, so "nothing written" is
"the folder is still empty"; one case per entry point also runs as ``python -m`` in a subprocess, the
way users start it.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Replaced in each test by a path below a regular file: it cannot exist and cannot be created, even by
# root (the CI runs as root, for whom an "unwritable" folder does not exist).
MISSING = "@MISSING@"
RANDOM = ["--checkpoint", "random:alexnet_lab"]

# (module, argv, the option the message must name). Paths that must not exist are under MISSING;
# outputs point into the working folder, which must stay empty.
CASES = {
    "pretrain": [
        ("ssl_colorize.pretrain", ["--data", MISSING], "--data"),
        ("ssl_colorize.pretrain", ["--prior", f"{MISSING}.csv"], "--prior"),
        ("ssl_colorize.pretrain", ["--lr", "-1"], "--lr"),
        ("ssl_colorize.pretrain", ["--bn-momentum", "0"], "--bn-momentum"),
    ],
    "colorize": [
        ("ssl_colorize.colorize", ["photo.jpg", "--checkpoint", f"{MISSING}.pth"], "--checkpoint"),
        ("ssl_colorize.colorize", ["photo.jpg", "--checkpoint", "random:alexnet_lab", "--temperature", "0"],
         "--temperature"),
    ],
    "results": [
        ("ssl_colorize.results", [f"{MISSING}.csv"], MISSING),
        ("ssl_colorize.results", ["--png", f"{MISSING}/table.png"], "--png"),
    ],
    "study": [
        ("ssl_colorize.study", ["build", "--checkpoint", f"{MISSING}.pth", "--out", "study"], "--checkpoint"),
        ("ssl_colorize.study", ["build", "--checkpoint", "random:alexnet_lab", "--photos", MISSING,
                                "--out", "study"], "--photos"),
        ("ssl_colorize.study", ["build", "--checkpoint", "random:alexnet_lab", "--size", "0", "--out", "study"],
         "--size"),
    ],
    "linear_probe": [
        ("ssl_colorize.benchmarks.linear_probe", ["--checkpoint", f"{MISSING}.pth"], "--checkpoint"),
        ("ssl_colorize.benchmarks.linear_probe", [*RANDOM, "--data", MISSING], "--data"),
        ("ssl_colorize.benchmarks.linear_probe", [*RANDOM, "--crop", "0"], "--crop"),
    ],
    "voc_svm": [
        ("ssl_colorize.benchmarks.voc_svm", ["--checkpoint", f"{MISSING}.pth"], "--checkpoint"),
        ("ssl_colorize.benchmarks.voc_svm", [*RANDOM, "--data", MISSING], "--data"),
        ("ssl_colorize.benchmarks.voc_svm", [*RANDOM, "--crop", "0"], "--crop"),
    ],
    "colorization_quality": [
        ("ssl_colorize.benchmarks.colorization_quality", ["--checkpoint", f"{MISSING}.pth"], "--checkpoint"),
        ("ssl_colorize.benchmarks.colorization_quality", [*RANDOM, "--data", MISSING], "--data"),
        ("ssl_colorize.benchmarks.colorization_quality", [*RANDOM, "--crop", "0"], "--crop"),
    ],
    "throughput": [
        ("ssl_colorize.benchmarks.throughput", ["--steps", "0"], "--steps"),
        ("ssl_colorize.benchmarks.throughput", ["--encoders", "alexnet_rgb_torchvision"], "--encoders"),
    ],
    "launch submit": [
        ("ssl_colorize.launch", ["submit", "--cluster", "local", "--dry-run", "--", "ssl_colorize.pretrain",
                                 "--lr", "-1"], "--lr"),
        ("ssl_colorize.launch", ["submit", "--cluster", "local", "--dry-run", "--", "ssl_colorize.pretrain",
                                 "--data", MISSING], "--data"),
    ],
    "convert": [
        ("ssl_colorize.convert", ["--format", "caffe", f"{MISSING}.caffemodel", "--out", "x.pth"], MISSING),
        ("ssl_colorize.convert", ["--format", "onnx", "model.onnx", "--out", "x.pth"], "--format"),
    ],
    "launch sweep": [
        ("ssl_colorize.launch", ["sweep", f"{MISSING}.toml"], MISSING),
    ],
}
for _name in ("voc_classification", "voc_detection", "voc_segmentation"):
    CASES[_name] = [
        (f"ssl_colorize.benchmarks.{_name}", ["--checkpoint", f"{MISSING}.pth"], "--checkpoint"),
        (f"ssl_colorize.benchmarks.{_name}", ["--data", MISSING], "--data"),
        (f"ssl_colorize.benchmarks.{_name}", ["--lr", "-1"], "--lr"),
    ]

# Fast R-CNN (the default detector of alexnet_lab) reads precomputed proposals: a missing folder is named.
CASES["voc_detection"].append(("ssl_colorize.benchmarks.voc_detection", ["--proposals", MISSING], "--proposals"))

# An output that cannot be written stops every command that writes result rows, before any model is
# built or data read (issue 16: it used to fail after the whole run).
UNWRITABLE_CSV = ["--out-csv", f"{MISSING}/rows.csv"]
for _group, _module, _argv in [
    ("pretrain", "ssl_colorize.pretrain", []),
    ("linear_probe", "ssl_colorize.benchmarks.linear_probe", RANDOM),
    ("voc_classification", "ssl_colorize.benchmarks.voc_classification", []),
    ("voc_detection", "ssl_colorize.benchmarks.voc_detection", []),
    ("voc_segmentation", "ssl_colorize.benchmarks.voc_segmentation", []),
    ("voc_svm", "ssl_colorize.benchmarks.voc_svm", RANDOM),
    ("colorization_quality", "ssl_colorize.benchmarks.colorization_quality", RANDOM),
    ("throughput", "ssl_colorize.benchmarks.throughput", []),
]:
    CASES[_group].append((_module, [*_argv, *UNWRITABLE_CSV], "--out-csv"))

PARAMS = [pytest.param(module, argv, option, id=f"{group}:{' '.join(argv)[:50]}")
          for group, cases in CASES.items() for module, argv, option in cases]


def _cli(module_name: str):
    module = importlib.import_module(module_name)
    if hasattr(module, "cli"):
        return module.cli
    return importlib.import_module(f"{module_name}.__main__").cli


@pytest.fixture
def empty_cwd(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


@pytest.fixture
def missing(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    return str(blocker / "missing")


@pytest.fixture
def photo(tmp_path):
    """A real image outside the working folder, for the commands that need one."""
    from PIL import Image

    path = tmp_path / "photo.png"
    Image.new("RGB", (32, 32), (200, 80, 40)).save(path)
    return str(path)


def _argv(argv, missing, photo):
    return [a.replace(MISSING, missing).replace("photo.jpg", photo) for a in argv]


@pytest.mark.parametrize("module,argv,option", PARAMS)
def test_user_mistake_is_one_line_exit_2_and_writes_nothing(module, argv, option, empty_cwd, missing, photo, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _cli(module)(_argv(argv, missing, photo))
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert exit_info.value.code == 2, captured.err
    assert len(lines) == 1, captured.err
    assert option.replace(MISSING, missing) in lines[0], lines[0]
    assert "Traceback" not in captured.err
    assert sorted(p.name for p in empty_cwd.iterdir()) == [], "a failed command left files behind"


def test_every_entry_point_is_covered():
    """Each benchmark module and each command of the README has cases above."""
    import ssl_colorize.benchmarks as benchmarks

    names = {p.stem for p in Path(benchmarks.__file__).parent.glob("*.py") if p.stem != "__init__"}
    assert names <= set(CASES), f"benchmarks without error cases: {sorted(names - set(CASES))}"


@pytest.mark.parametrize("group", ["pretrain", "linear_probe", "voc_detection", "launch submit"])
def test_the_same_from_the_command_line(group, empty_cwd, missing, photo):
    module, argv, option = CASES[group][0]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, "-m", module, *_argv(argv, missing, photo)], cwd=empty_cwd, env=env,
                            capture_output=True, text=True, timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and option.replace(MISSING, missing) in lines[0], result.stderr
    assert list(empty_cwd.iterdir()) == []
