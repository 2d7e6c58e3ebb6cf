"""From a trained colorization model to colours: predicted ab and recolorized RGB (docs/protocols.md section 2).

The test-time recipe of the paper and the released code, in three steps that can be used separately
(the temperature sweep of ``benchmarks/colorization_quality.py`` runs the network once and decodes
many times):

1. :func:`predict_grid`: the network on L (N, 1, H, W) in [0, 100] gives its output on the loss grid
   (every ``output_stride``-th input pixel; the AlexNet variant's coarser logits are bilinearly
   resized onto it by ``Encoder.logits_at``). A classification model gives 313 logits, a model trained
   with the L2 loss gives 2 channels (ab itself).
2. :func:`decode_grid`: 313 logits -> the annealed mean at temperature T (``targets.annealed_mean``);
   2 channels are already ab and pass through (T does not apply).
3. :func:`upsample_ab`: the low-resolution ab is bilinearly upsampled to the full image and combined
   with the image's own full-resolution L (:func:`ab_to_rgb`), then converted to sRGB and clipped.

:func:`predict_ab` and :func:`colorize_tensor` chain them, in batches, on the model's device;
:func:`load_colorizer` loads a checkpoint (or a seeded random init, ``random:ENCODER``) for them.

Grid geometry: cell j of the loss grid is input pixel ``stride * j`` (``targets.decimate`` keeps every
stride-th pixel starting at 0, and that is what the network was trained to predict there). The
upsampling therefore interpolates between those pixel positions exactly (``align_corners=True`` onto
the pixels 0 .. stride * (g - 1)) and repeats the last cell for the few pixels past it, instead of
stretching the grid over the whole image, which would shift colours by up to stride / 2 pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ssl_colorize.checkpoint import load_checkpoint, load_encoder
from ssl_colorize.color import lab_to_rgb
from ssl_colorize.targets import DEFAULT_TEMPERATURE, NUM_BINS, annealed_mean

#: Output channels of a model trained with the L2 loss: ab directly (docs/protocols.md section 2, "L2 regression").
AB_CHANNELS = 2
DEFAULT_BATCH_SIZE = 16


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a parameterless module)."""
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def _check_colour_model(model: torch.nn.Module) -> None:
    if getattr(model, "input_space", "L") != "L":
        raise ValueError(
            f"{type(model).__name__} takes {model.input_space!r} input; colorization needs a model on L"
        )
    if not getattr(model, "has_colour_head", True):
        raise ValueError(f"{type(model).__name__} has no colour head: it cannot colorize")


def _check_L(L: torch.Tensor) -> None:
    if not isinstance(L, torch.Tensor) or not L.is_floating_point():
        raise ValueError(f"L must be a floating-point tensor, got {getattr(L, 'dtype', type(L))}")
    if L.dim() != 4 or L.shape[1] != 1:
        raise ValueError(f"L must have shape (N, 1, H, W) with values in [0, 100], got {tuple(L.shape)}")


def output_stride(model: torch.nn.Module, L: torch.Tensor, grid: torch.Tensor) -> int:
    """The model's loss-grid stride (``model.output_stride``), else inferred from the output size."""
    stride = getattr(model, "output_stride", None)
    if stride:
        return int(stride)
    return max(1, round(L.shape[-1] / grid.shape[-1]))


@torch.no_grad()
def predict_grid(model: torch.nn.Module, L: torch.Tensor) -> torch.Tensor:
    """The model's raw output on the loss grid: (N, 313, g_h, g_w) logits or (N, 2, g_h, g_w) ab.

    ``L`` is moved to the model's device; the output stays there. Call with a batch that fits.
    """
    _check_colour_model(model)
    _check_L(L)
    L = L.to(model_device(model), dtype=torch.float32)
    out = model.logits_at(L) if hasattr(model, "logits_at") else model(L)
    if out.dim() != 4 or out.shape[1] not in (NUM_BINS, AB_CHANNELS):
        raise ValueError(
            f"{type(model).__name__} output has shape {tuple(out.shape)}; expected (N, {NUM_BINS}, h, w) "
            f"colour logits or (N, {AB_CHANNELS}, h, w) ab from an L2-trained head"
        )
    return out.float()


def decode_grid(grid: torch.Tensor, temperature: float = DEFAULT_TEMPERATURE) -> torch.Tensor:
    """Model output on the grid -> ab on the grid: annealed mean of 313 logits, or the 2 ab channels as is."""
    if grid.shape[1] == AB_CHANNELS:
        return grid
    return annealed_mean(grid, T=temperature)


def upsample_ab(ab: torch.Tensor, stride: int, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling of grid ab (N, 2, g_h, g_w), cell j at pixel stride * j, to (N, 2, H, W)."""
    height, width = int(size[0]), int(size[1])
    if tuple(ab.shape[-2:]) == (height, width):
        return ab
    g_h, g_w = ab.shape[-2:]
    span_h, span_w = stride * (g_h - 1) + 1, stride * (g_w - 1) + 1
    if min(g_h, g_w) < 2 or span_h > height or span_w > width:
        # A one-cell grid, or one that does not follow the stride, has no pixel geometry to respect.
        return F.interpolate(ab, size=(height, width), mode="bilinear", align_corners=False)
    up = F.interpolate(ab, size=(span_h, span_w), mode="bilinear", align_corners=True)
    # Pixels past the last grid cell (fewer than stride per side) take the last cell's colour.
    return F.pad(up, (0, width - span_w, 0, height - span_h), mode="replicate")


def ab_to_rgb(L: torch.Tensor, ab: torch.Tensor) -> torch.Tensor:
    """Full-resolution L (N, 1, H, W) and ab (N, 2, H, W) -> sRGB in [0, 1] (clipped, as the paper)."""
    return lab_to_rgb(torch.cat((L.to(ab), ab), dim=1), validate=False)


def predict_ab(
    model: torch.nn.Module,
    L: torch.Tensor,
    temperature: float = DEFAULT_TEMPERATURE,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> torch.Tensor:
    """Predicted ab at full resolution for L (N, 1, H, W) in [0, 100] -> (N, 2, H, W) on L's device.

    Runs ``model`` on its own device in batches of ``batch_size``; 313-way models are decoded with the
    annealed mean at ``temperature``; 2-channel (L2) models give ab directly.
    """
    _check_L(L)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out = []
    for start in range(0, L.shape[0], batch_size):
        chunk = L[start : start + batch_size]
        grid = predict_grid(model, chunk)
        stride = output_stride(model, chunk, grid)
        ab = upsample_ab(decode_grid(grid, temperature), stride, chunk.shape[-2:])
        out.append(ab.to(L.device))
    if not out:
        return L.new_zeros((0, 2) + tuple(L.shape[-2:]))
    return torch.cat(out)


def colorize_tensor(
    model: torch.nn.Module,
    L: torch.Tensor,
    temperature: float = DEFAULT_TEMPERATURE,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> torch.Tensor:
    """Recolorized sRGB in [0, 1], (N, 3, H, W): predicted ab at full resolution with the input's own L."""
    ab = predict_ab(model, L, temperature=temperature, batch_size=batch_size)
    return ab_to_rgb(L, ab)


#: The name under which the published Table 1 (results/published.csv) lists each pretraining loss
#: (``python -m ssl_colorize.pretrain --loss``), so our rows can be shown beside the paper's.
PAPER_METHOD_BY_LOSS = {
    "l2": "L2 regression",
    "plain": "classification, no rebalancing",
    "rebalanced": "classification + rebalancing (full)",
}


@dataclass
class Colorizer:
    """A loaded colorization model and how to name it in tables, plots and studies."""

    spec: str  # what the user passed: a checkpoint file, a run folder, or "random:ENCODER"
    label: str  # a short human-readable name
    encoder: str  # the registered model name
    model: torch.nn.Module
    info: dict = field(default_factory=dict)  # step, loss, init: whatever the checkpoint tells

    @property
    def paper_method(self) -> str | None:
        """The published Table 1 method this model's loss corresponds to, if any."""
        return PAPER_METHOD_BY_LOSS.get(self.info.get("loss"))


def load_colorizer(spec: str, seed: int = 0, device: torch.device | str = "cpu") -> Colorizer:
    """A checkpoint file or run folder, or ``random:ENCODER`` (seeded random init) -> model in eval mode.

    The label reads "<encoder> <loss> (<run folder or file stem>)" when the checkpoint's config names
    its loss (``--loss`` of the pretrainer), else "<encoder> (<stem>)".
    """
    if spec.startswith("random:"):
        name = spec.split(":", 1)[1]
        model = load_encoder("random", encoder=name, seed=seed)
        return Colorizer(spec, f"{name} (random init)", name, model.to(device), {"init": "random", "seed": seed})
    ckpt = load_checkpoint(spec)
    config = ckpt.get("config") or {}
    if not isinstance(config, dict):  # e.g. an argparse.Namespace
        config = dict(vars(config)) if hasattr(config, "__dict__") else {}
    info = {"step": ckpt.get("step"), "loss": config.get("loss")}
    del ckpt
    model = load_encoder(spec)
    name = model.model_spec["name"] if hasattr(model, "model_spec") else type(model).__name__
    path = Path(spec)
    stem = path.name if path.is_dir() else (path.parent.name if path.name == "checkpoint.pth" else path.stem)
    label = f"{name} {info['loss']} ({stem})" if info["loss"] else f"{name} ({stem})"
    return Colorizer(spec, label, name, model.to(device), {k: v for k, v in info.items() if v is not None})
