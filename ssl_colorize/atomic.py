"""Files that are never left half-written: write a temporary file beside the target, fsync, rename."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=None)
def _umask() -> int:
    """The process's umask, read once (reading it means setting it: it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", **open_kwargs):
    """Yield a handle to a temporary file that replaces ``path`` only once the block has finished.

    A failure or a kill at any moment leaves the previous ``path`` (or none) and no temporary file
    behind (a kill leaves at most a hidden ``.<name>.*.tmp``, never a torn ``path``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    # mkstemp makes the file private (0600); the result gets the mode a plain open() would give it.
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        with os.fdopen(fd, mode, **open_kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
