"""Checkpoints written beside the training instead of in its way (issue 14).

Writing alexnet_lab's checkpoint (58 M weights with Adam's two moments: 0.7 GB) took 2.05 s on this
project's 2-core CPU machine; the trainer used to stop for it at every checkpoint, about one step in ten
of the built-in default's. Here the training loop pays only for a private copy of the state in host memory
(on a GPU the one device-to-host copy); one background thread serialises it, fsyncs it and renames it into
place (``ssl_colorize.atomic.atomic_write``: a kill leaves the previous checkpoint, never a torn one),
then gives the snapshots their copies. One write is in flight at a time: a save waits for the previous
one first, so checkpoints land in step order and at most one extra copy of the state is held.
"""

from __future__ import annotations

import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import torch

from ssl_colorize.atomic import atomic_write
from ssl_colorize.checkpoint import save_checkpoint

#: ``--checkpoint-io``: where checkpoints are written.
CHECKPOINT_IO = ("background", "blocking")


def host_copy(obj: Any) -> Any:
    """``obj`` with every tensor replaced by a detached copy in host memory and every dict, list and tuple
    rebuilt, so that nothing the training goes on changing is shared with what is being written."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {key: host_copy(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [host_copy(value) for value in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)  # named tuples too
    return obj


def copy_file(source: Path, target: Path) -> None:
    """``target`` becomes a copy of ``source``, atomically: a hard link where the file system has them
    (no bytes written: the rolling checkpoint is later replaced by a rename, which leaves this name's
    data alone), else a byte copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.link.tmp")
    try:
        temporary.unlink(missing_ok=True)
        os.link(source, temporary)
        os.replace(temporary, target)
        return
    except OSError:
        temporary.unlink(missing_ok=True)
    with open(source, "rb") as src, atomic_write(target, "wb") as dst:
        shutil.copyfileobj(src, dst, length=16 << 20)


class CheckpointWriter:
    """Saves checkpoints with :func:`ssl_colorize.checkpoint.save_checkpoint`, in a background thread
    (``background=True``) or right away.

    ``save(state, path, copies)`` returns once the state is copied to host memory; ``path`` is written
    next, then each of ``copies`` (e.g. a snapshot) gets the same bytes. A write that failed raises
    (``RuntimeError`` naming the file) from the next ``save``, ``wait`` or ``close``.
    """

    def __init__(self, background: bool = True):
        self.background = background
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint") if background else None
        self._in_flight: Future | None = None

    def save(self, state: dict, path: str | os.PathLike, copies: Sequence[str | os.PathLike] = ()) -> None:
        path, copies = Path(path), [Path(c) for c in copies]
        if self._pool is None:
            self._write(state, path, copies)
            return
        self.wait()
        self._in_flight = self._pool.submit(self._write, host_copy(state), path, copies)

    @staticmethod
    def _write(state: dict, path: Path, copies: list[Path]) -> None:
        try:
            save_checkpoint(path, state)
            for target in copies:
                copy_file(path, target)
        except OSError as exc:
            raise RuntimeError(f"writing checkpoint {path} failed: {exc}") from exc

    def wait(self) -> None:
        """Block until the write in flight has landed; raise its error, if any."""
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None:
            in_flight.result()

    def close(self, raise_error: bool = True) -> None:
        """Wait for the last write and end the thread. ``raise_error=False``: a failed write is dropped
        (the caller is already handling an exception of its own)."""
        try:
            self.wait()
        except Exception:
            if raise_error:
                raise
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
