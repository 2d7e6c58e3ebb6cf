import os

import pytest
import torch

# Tests share a 2-core machine: one intra-op thread each keeps them predictable.
torch.set_num_threads(int(os.environ.get("SSL_COLORIZE_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Built-in data goes to one cache per test session, never the user's ~/.cache."""
    if "SSL_COLORIZE_CACHE" not in os.environ:
        monkeypatch.setenv("SSL_COLORIZE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
