"""The package as a user gets it: ``pip install .`` (not editable) into a fresh virtual environment,
then the commands run from an empty folder, far from this checkout.

Torch and the other dependencies are not installed again (gigabytes): the fresh environment sees this
environment's site-packages through a ``.pth`` file, and the package itself is built without build
isolation (setuptools and setuptools-scm come from this environment: the ``test`` extra). Only the
ssl_colorize of the fresh environment may be imported there; the test checks that this checkout's
editable install does not shadow it.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

from ssl_colorize.results import read_rows

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
#: The version the build is told to take (setuptools-scm), so the test can see where row versions come from.
BUILD_VERSION = "7.7.7+installedtest"


def _copy_source(destination: Path) -> Path:
    """What a fresh clone holds for the build, minus anything this checkout built or cached."""
    destination.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, destination / name)
    shutil.copytree(REPO / "ssl_colorize", destination / "ssl_colorize",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "_version.py", "*.egg-info"))
    return destination


def _package_data(package_root: Path) -> set[str]:
    """Every file the package reads at run time: all its files but Python sources."""
    return {p.relative_to(package_root).as_posix() for p in package_root.rglob("*")
            if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(python of the fresh environment, its site-packages, an empty working folder, the environment)."""
    pytest.importorskip("setuptools_scm", reason="the build needs setuptools-scm: pip install -e '.[test]'")
    root = tmp_path_factory.mktemp("installed")
    source = _copy_source(root / "source")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    fresh_site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                     capture_output=True, text=True, check=True).stdout.strip())
    # Plain path lines: the folders join sys.path after the fresh site-packages, and their own .pth files
    # (this checkout's editable-install hook among them) are not run.
    dependencies = site.getsitepackages() + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])
    (fresh_site / "_ssl_colorize_test_dependencies.pth").write_text("\n".join(dependencies) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_", "SETUPTOOLS_SCM"))}
    env.update(OMP_NUM_THREADS="1", SETUPTOOLS_SCM_PRETEND_VERSION=BUILD_VERSION)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--no-index", "--disable-pip-version-check", str(source)],
                   check=True, env=env, cwd=root, timeout=300)
    work = root / "work"
    work.mkdir()
    return python, fresh_site, work, env


def _run(installed, *argv: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    python, _, work, env = installed
    if "SSL_COLORIZE_CACHE" in os.environ:  # the session's built-in data cache (conftest.py), not ~/.cache
        env = {**env, "SSL_COLORIZE_CACHE": os.environ["SSL_COLORIZE_CACHE"]}
    done = subprocess.run([str(python), *argv], capture_output=True, text=True, cwd=work, env=env, timeout=timeout)
    if check and done.returncode != 0:
        pytest.fail(f"{argv} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


def test_the_fresh_install_is_the_one_imported_with_its_version_and_package_data(installed):
    _, fresh_site, _, _ = installed
    probe = """
import json, importlib.metadata, importlib.resources
import ssl_colorize
from ssl_colorize.results import code_version
from ssl_colorize.targets import bin_centers, load_prior
print(json.dumps({
    "file": ssl_colorize.__file__, "version": ssl_colorize.__version__, "code_version": code_version(),
    "metadata": importlib.metadata.version("ssl_colorize"),
    "published": importlib.resources.files("ssl_colorize.results").joinpath("published.csv").is_file(),
    "bins": len(bin_centers()), "prior": len(load_prior()),
}))
"""
    info = json.loads(_run(installed, "-c", probe).stdout)
    assert Path(info["file"]).is_relative_to(fresh_site), f"imported {info['file']}, not the fresh install"
    # The rows' code version is the build's own, not the surrounding checkout's git commit.
    assert info["version"] == info["metadata"] == info["code_version"] == BUILD_VERSION
    assert info["published"] and info["bins"] == info["prior"] == 313  # the resources, read as package data
    # Every data file of the source package was installed beside the code.
    missing = _package_data(REPO / "ssl_colorize") - _package_data(fresh_site / "ssl_colorize")
    assert not missing, f"package data not installed (pyproject.toml [tool.setuptools.package-data]): {missing}"


def test_results_prints_the_published_tables_from_an_empty_folder(installed):
    _, _, work, _ = installed
    done = _run(installed, "-m", "ssl_colorize.results")
    assert "linear_probe | imagenet | top1 (published)" in done.stdout
    assert "voc_detection | voc2007 (published)" in done.stdout and "ours:" not in done.stdout
    assert list(work.iterdir()) == []
    mistake = _run(installed, "-m", "ssl_colorize.results", "no_such.csv", check=False)
    assert mistake.returncode == 2 and len(mistake.stderr.strip().splitlines()) == 1
    script = installed[0].parent / "ssl-colorize-results"
    assert subprocess.run([str(script), "--help"], capture_output=True, cwd=work, env=installed[3]).returncode == 0


def _linear_probe_or_skip() -> None:
    if not (REPO / "ssl_colorize" / "benchmarks" / "linear_probe.py").is_file():
        pytest.skip("ssl_colorize.benchmarks.linear_probe does not exist yet (being created for issue 15)")


def test_linear_probe_help(installed):
    _linear_probe_or_skip()
    done = _run(installed, "-m", "ssl_colorize.benchmarks.linear_probe", "--help")
    assert "--checkpoint" in done.stdout


def test_a_builtin_probe_writes_its_rows_under_the_working_folder(installed):
    _linear_probe_or_skip()
    _, _, work, _ = installed
    _run(installed, "-m", "ssl_colorize.benchmarks.linear_probe", "--checkpoint", "random", "--encoder",
         "alexnet_lab", "--layer", "conv1", "--crop", "64", "--resize", "72", "--epochs", "1", "--batch-size", "8",
         "--limit", "16", "--workers", "0", "--device", "cpu", "--no-plot", timeout=300)
    rows = read_rows(work / "results" / "linear_probe.csv")
    assert len(rows) and set(rows["benchmark"]) == {"linear_probe"}
    assert set(rows["code_version"]) == {BUILD_VERSION}
    assert (work / "runs").is_dir()  # the run folder too defaults to the current folder
