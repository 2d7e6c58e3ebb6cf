"""Reading released PyTorch files (state dicts, VISSL checkpoints) with one clear error per bad file."""

from __future__ import annotations

import torch

from ssl_colorize.convert.common import ConversionError


def load_torch(src: str):
    """``torch.load`` restricted to tensors and plain containers; a foreign or truncated file -> one line."""
    try:
        return torch.load(src, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types (pickle, zip, EOF) for a bad file
        text = str(exc).strip()
        if "Weights only load failed" in text:
            # Either not a torch file at all, or one holding Python objects: unpickling those would run
            # code from the file, so they are refused rather than loaded.
            reason = "not a PyTorch file, or one holding Python objects other than tensors"
        else:
            reason = text.splitlines()[0].split(". ")[0][:160] if text else type(exc).__name__
        raise ConversionError(f"{src} is not a readable PyTorch file (truncated or another format): {reason}") from None


def load_tensor_dict(src: str) -> dict[str, torch.Tensor]:
    """A flat ``name -> tensor`` state dict (a bare one, or under ``state_dict`` / ``model``)."""
    data = load_torch(src)
    for key in ("state_dict", "model"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
    if not isinstance(data, dict) or not data or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ConversionError(f"{src} is not a PyTorch state dict (a dict of tensors)")
    return data
