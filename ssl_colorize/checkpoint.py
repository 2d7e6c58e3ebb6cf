"""Self-describing checkpoints, written atomically (DESIGN.md, "Contracts").

A checkpoint is a dict: ``model`` ({"name", "kwargs"}: enough to rebuild it with create_model),
``state_dict``, ``optimizer``, ``scheduler``, ``step``, ``rng``, ``data_state``, ``config``, ``bins``,
``prior``, ``version``. ``load_encoder(path)`` rebuilds the trained model with no extra flags.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ssl_colorize.atomic import atomic_write

CHECKPOINT_VERSION = 1
ROLLING_NAME = "checkpoint.pth"


def save_checkpoint(path: str | os.PathLike, obj: dict[str, Any]) -> Path:
    """Write ``obj`` with torch.save to a temporary file in the same folder, fsync, then rename.

    A kill at any moment leaves either the previous file or the new one, never a torn one.
    """
    path = Path(path)
    with atomic_write(path, "wb") as handle:
        torch.save(obj, handle)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`; a clear error names a bad file."""
    path = Path(path)
    if path.is_dir():
        path = path / ROLLING_NAME
    if not path.is_file():
        raise ValueError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # torch raises several types for a truncated or foreign file
        raise ValueError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(ckpt, dict) or "model" not in ckpt or "state_dict" not in ckpt:
        raise ValueError(f"{path} is not an ssl_colorize checkpoint (no 'model' / 'state_dict' entries)")
    return ckpt


def load_encoder(
    checkpoint: str | os.PathLike,
    encoder: str | None = None,
    seed: int = 0,
    map_location: str | torch.device = "cpu",
    **model_overrides,
):
    """Rebuild an encoder from a checkpoint (or ``"random"``: a seeded random init of ``encoder``).

    ``model_overrides`` change construction-only arguments that leave the weights' shapes alone, such
    as ``geometry="transfer"`` for alexnet_lab. The model is returned in eval mode.
    """
    from ssl_colorize.models import create_model

    if str(checkpoint) == "random":
        if encoder is None:
            raise ValueError("--checkpoint random needs the encoder's name (e.g. --encoder alexnet_lab)")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = create_model(encoder, **model_overrides)
        return model.eval()
    ckpt = load_checkpoint(checkpoint, map_location=map_location)
    spec = ckpt["model"]
    if encoder is not None and encoder != spec["name"]:
        raise ValueError(f"checkpoint {checkpoint} holds a {spec['name']!r}, not the requested {encoder!r}")
    kwargs = {**spec.get("kwargs", {}), **model_overrides}
    model = create_model(spec["name"], **kwargs)
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()
