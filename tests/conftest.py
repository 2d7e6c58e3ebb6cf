import os

import pytest
import torch

# Tests share a 2-core machine: one intra-op thread each keeps them predictable.
torch.set_num_threads(int(os.environ.get("SSL_COLORIZE_TEST_THREADS", "1")))


def _restore(saved: dict) -> None:
    if dict(os.environ) != saved:
        os.environ.clear()
        os.environ.update(saved)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Every test leaves os.environ as it found it, fixtures' teardown (monkeypatch's too) included.
    submitit's TorchDistributedEnvironment and the launcher's job code run in-process write RANK /
    WORLD_SIZE / MASTER_* into os.environ directly; left behind, they make every later in-process
    trainer wait for a process group that never forms."""
    saved = dict(os.environ)
    yield
    _restore(saved)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Built-in data goes to one cache per test session, never the user's ~/.cache."""
    if "SSL_COLORIZE_CACHE" not in os.environ:
        monkeypatch.setenv("SSL_COLORIZE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
