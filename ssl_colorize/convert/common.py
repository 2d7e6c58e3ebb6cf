"""What every converter shares: filling our state_dict with checked shapes, BatchNorm folding, writing.

A converter builds the target encoder (seeded, so the parts a released file does not carry are a
reproducible random init), fills its state_dict through a :class:`StateFiller` (which checks every
shape and names the layer when one does not fit) and writes a self-describing checkpoint that
``ssl_colorize.checkpoint.load_encoder`` rebuilds. Errors are :class:`ConversionError` (a UsageError:
one line, exit 2) raised before anything is written.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ssl_colorize.checkpoint import CHECKPOINT_VERSION, save_checkpoint
from ssl_colorize.engine.cli import UsageError

#: Our input is (L - 50) / 100 (ssl_colorize.models.base); the released Caffe models and VISSL feed
#: L - 50, so conv1's weights are multiplied by 100 (docs/protocols.md section 1).
L_INPUT_SCALE = 100.0
BN_EPS = 1e-5  # torch's and Caffe's BatchNorm default


class ConversionError(UsageError):
    """A released file that does not fit the target model: one line naming the layer and the shapes."""


def as_tensor(value) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", torch.float64)
    return torch.from_numpy(np.asarray(value, dtype=np.float64))


def build_target(name: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    """Our encoder ``name`` with a seeded random init (what the released file does not carry stays so)."""
    from ssl_colorize.models import create_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return create_model(name, **kwargs).eval()


class StateFiller:
    """Fills a model's state_dict entry by entry, checking shapes against the model's own tensors."""

    def __init__(self, model: torch.nn.Module, source: str) -> None:
        self.model = model
        self.source = source
        self.state = {key: value.clone() for key, value in model.state_dict().items()}
        self.filled: set[str] = set()

    def put(self, key: str, value, layer: str, reshape: bool = False) -> None:
        """Set ``key`` from the file's ``layer``; ``reshape`` allows same-size reshapes (legacy 4-D blobs)."""
        if key not in self.state:
            raise ConversionError(f"{self.source}: layer {layer!r} maps to {key!r}, which the model lacks")
        target = self.state[key]
        tensor = as_tensor(value)
        if tuple(tensor.shape) != tuple(target.shape):
            if not (reshape and tensor.numel() == target.numel()):
                raise ConversionError(
                    f"{self.source}: layer {layer!r} has shape {tuple(tensor.shape)}, "
                    f"expected {tuple(target.shape)} for {key!r}")
            tensor = tensor.reshape(target.shape)
        self.state[key] = tensor.to(target.dtype)
        self.filled.add(key)

    def get(self, key: str) -> torch.Tensor:
        return self.state[key].to(torch.float64)

    def check_complete(self, may_stay_initialised: tuple[str, ...] = ()) -> list[str]:
        """Raise unless every parameter was filled; keys under ``may_stay_initialised`` prefixes may not be.

        Returns those prefixes that were left at the seeded init (for the checkpoint's notes).
        ``num_batches_tracked`` counters are bookkeeping, never weights, and are not required.
        """
        missing = [key for key in self.state
                   if key not in self.filled and not key.endswith("num_batches_tracked")
                   and not key.startswith(may_stay_initialised)]
        if missing:
            raise ConversionError(f"{self.source}: the file has no weights for {missing[0]!r} "
                                  f"({len(missing)} model entries unfilled)")
        return [prefix for prefix in may_stay_initialised
                if any(key.startswith(prefix) and key not in self.filled for key in self.state)]


def affine_bn_as_plain(gamma, beta, mean, var, eps: float = BN_EPS, layer: str = "") -> tuple:
    """Rewrite ``gamma * (x - mean) / sqrt(var + eps) + beta`` as ``sign * (x - m) / sqrt(v + eps)``.

    Our encoders' BatchNorms have no affine (docs/protocols.md section 3), so a released BN with
    gamma / beta becomes running statistics (m, v) plus a per-channel ``sign`` (+1 / -1) that the caller
    moves into a neighbouring convolution (a sign flip commutes with zero padding, unlike a bias).
    Exact in exact arithmetic; computed in float64. A zero gamma cannot be expressed and is refused.
    """
    gamma, beta, mean, var = (as_tensor(t) for t in (gamma, beta, mean, var))
    if bool((gamma == 0).any()):
        channel = int((gamma == 0).nonzero()[0])
        raise ConversionError(f"layer {layer!r}: BatchNorm weight is 0 for channel {channel}; "
                              "a BatchNorm without affine cannot represent it")
    std = torch.sqrt(var + eps)
    new_mean = mean - beta * std / gamma
    new_var = (std / gamma.abs()) ** 2 - eps
    return torch.sign(gamma), new_mean, new_var


def write_converted(dest: str | os.PathLike, model: torch.nn.Module, filler: StateFiller,
                    source: str | os.PathLike, fmt: str, notes: list[str]) -> Path:
    """Load the filled state into ``model`` (a last check) and write a self-describing checkpoint."""
    model.load_state_dict(filler.state)
    spec = getattr(model, "model_spec", None)
    if spec is None:
        raise RuntimeError("the target model carries no model_spec (was it built with create_model?)")
    checkpoint = {
        "model": {"name": spec["name"], "kwargs": dict(spec.get("kwargs", {}))},
        "state_dict": model.state_dict(),
        "step": 0,
        "version": CHECKPOINT_VERSION,
        "config": {"converted_from": str(source), "format": fmt, "notes": list(notes)},
    }
    Path(dest).parent.mkdir(parents=True, exist_ok=True)
    return save_checkpoint(dest, checkpoint)


def decoding_note(matrix, layer: str, scale: float = 1.0) -> str:
    """Compare a released 313 -> ab decoding matrix (2, 313, 1, 1) with our bin centres.

    The released decoders hold the bin centres (pts_in_hull), divided by ``scale`` (the PyTorch port
    multiplies ab by 110 afterwards): equality confirms the file's 313 logits use our bin order.
    """
    from ssl_colorize.targets import bin_centers

    released = as_tensor(matrix).reshape(2, -1).T * scale
    centers = bin_centers(dtype=torch.float64)
    if released.shape == centers.shape and torch.allclose(released, centers, atol=1e-3):
        return f"{layer} holds our bin centres: the file's 313 logits use the same bin order"
    return f"WARNING: {layer} differs from our bin centres (pts_in_hull): check the file's 313-bin order"

