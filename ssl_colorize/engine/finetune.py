"""What the four PASCAL VOC benchmarks share: options, encoder loading, inputs, fine-tuning scopes, runs.

The benchmark scripts (``benchmarks/voc_classification.py``, ``voc_detection.py``,
``voc_segmentation.py``, ``voc_svm.py``) stay short recipes over this module and
ssl_colorize.data.voc / ssl_colorize.voc_metrics:

* :func:`add_common_args`: ``--data --checkpoint --encoder --iters --out-csv --out --run-id --seed
  --device --input --workers``, the same in all four;
* :func:`load_transfer_encoder`: the checkpoint (or ``random``) as an encoder in the transfer
  geometry (alexnet_lab: CaffeNet geometry, docs/protocols.md section 3);
* :func:`resolve_input` / :func:`to_model_input`: "inputs follow the encoder" -- L for L encoders, RGB
  for RGB encoders, or grey-replicated RGB (the L channel shown as neutral grey) for RGB encoders;
* fine-tuning scopes (:func:`finetune_modules`), BatchNorm handling and the check that the parts
  that were not fine-tuned did not change (:class:`UntouchedGuard`);
* :class:`TransferRun`: the run folder, its log, the data reports and the result rows.

BatchNorm in fine-tuning: the released AlexNet is transferred with BatchNorm folded into the
convolutions (docs/protocols.md section 3), i.e. as a fixed per-channel affine map. ``--bn frozen`` (the
default) reproduces that: every BatchNorm stays in eval mode, with its statistics fixed, while the
weights around it train. ``--bn train`` lets the BatchNorms of the fine-tuned layers use batch
statistics (and update their running averages) instead.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import math
import os
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from ssl_colorize.checkpoint import load_encoder
from ssl_colorize.data.voc import DataReport
from ssl_colorize.models.base import IMAGENET_MEAN, L_CENTER
from ssl_colorize.heads.probe import FrozenEncoderGuard, encoder_input
from ssl_colorize.results import REPO_ROOT, append_rows, make_row

LOG = logging.getLogger("ssl_colorize.voc")

INPUT_CHOICES = ("auto", "L", "rgb", "grey-rgb")
FINETUNE_SETTINGS = ("fc8", "fc6-8", "all")
BN_MODES = ("frozen", "train")
DEFAULT_OUT_CSV = REPO_ROOT / "results" / "voc.csv"
#: Encoder input crop: CaffeNet's 227 for AlexNet-style encoders, 224 otherwise.
ALEXNET_CROP, DEFAULT_CROP = 227, 224


# ----------------------------------------------------------------------------------------------
# Options
# ----------------------------------------------------------------------------------------------

def add_common_args(parser: argparse.ArgumentParser, iters_help: str) -> argparse.ArgumentParser:
    """The options every VOC benchmark takes (issue 5)."""
    g = parser.add_argument_group("common VOC options")
    g.add_argument("--data", default=None,
                   help="folder holding VOCdevkit, or VOCdevkit itself (default: the built-in procedural VOCdevkit)")
    g.add_argument("--checkpoint", default="random",
                   help="pretraining checkpoint (file or run folder), or 'random' for a seeded random init "
                        "(default: random, with --encoder)")
    g.add_argument("--encoder", default=None,
                   help="encoder name; required with --checkpoint random (default then: alexnet_lab), "
                        "checked against the checkpoint otherwise")
    g.add_argument("--iters", type=int, default=None, help=iters_help)
    g.add_argument("--out-csv", default=str(DEFAULT_OUT_CSV),
                   help="results table to append rows to (default results/voc.csv)")
    g.add_argument("--out", default=None, help="run folder for log, summary, caches (default runs/<benchmark>/<run id>)")
    g.add_argument("--run-id", default=None, help="run id of the result rows (default: benchmark + timestamp)")
    g.add_argument("--seed", type=int, default=0, help="seed of the random init, data order and augmentation")
    g.add_argument("--device", default=None, help="cuda, cuda:1, cpu ... (default: cuda when present, else cpu)")
    g.add_argument("--input", choices=INPUT_CHOICES, default="auto",
                   help="encoder input: auto follows the encoder (L for L encoders, RGB for RGB encoders); "
                        "grey-rgb feeds an RGB encoder the L channel as neutral grey RGB")
    g.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="data loader worker processes")
    return parser


def schedule_length(iters: int | None, protocol_iters: int, builtin: bool, builtin_iters: int) -> int:
    """The run's iterations: ``--iters`` if given, else the protocol's, or a short default on built-in data."""
    if iters is not None:
        if iters < 1:
            raise ValueError(f"--iters must be at least 1, got {iters}")
        return iters
    return builtin_iters if builtin else protocol_iters


def step_lr(optimizer: torch.optim.Optimizer, total: int, protocol_total: int, protocol_step: int,
            gamma: float) -> torch.optim.lr_scheduler.LambdaLR:
    """lr x gamma every ``protocol_step`` iterations of a ``protocol_total`` schedule, scaled to ``total``
    (``--iters`` shortens the run and its steps together)."""
    step = max(1, round(protocol_step * total / protocol_total))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: gamma ** (it // step))


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_data(data: str | None) -> tuple[Path, bool]:
    """(the folder holding VOCdevkit, whether it is the built-in data)."""
    if data is None:
        from ssl_colorize.data.builtin_voc import ensure_builtin_voc

        return ensure_builtin_voc(), True
    return Path(data).expanduser(), False


def dataset_name(builtin: bool, name: str) -> str:
    """Result rows name the built-in data apart from the real one (e.g. builtin_voc2007 / voc2007)."""
    return f"builtin_{name}" if builtin else name


# ----------------------------------------------------------------------------------------------
# Encoder and inputs
# ----------------------------------------------------------------------------------------------

def load_transfer_encoder(checkpoint: str, encoder: str | None, seed: int) -> tuple[nn.Module, str]:
    """The encoder of ``checkpoint`` (or a seeded random ``encoder``) in its transfer geometry.

    Returns (model in eval mode on the CPU, encoder name). alexnet_lab is switched to CaffeNet's
    geometry (227 input, 6x6 pool5, undilated fc6; docs/protocols.md section 3), the same weights.
    """
    if str(checkpoint) == "random" and encoder is None:
        encoder = "alexnet_lab"
    model = load_encoder(checkpoint, encoder=encoder, seed=seed)
    if hasattr(model, "set_geometry"):
        model.set_geometry("transfer")
    return model, model.model_spec["name"]


def is_alexnet_style(encoder: nn.Module) -> bool:
    """AlexNet-like: taps conv5, fc6, fc7 (fc6 reads a 6x6 pool5)."""
    return all(t in encoder.taps for t in ("conv5", "fc6", "fc7"))


def default_crop(encoder: nn.Module) -> int:
    return ALEXNET_CROP if is_alexnet_style(encoder) else DEFAULT_CROP


def resolve_input(encoder: nn.Module, choice: str) -> str:
    """The input mode for ``encoder``: "L", "rgb" or "grey" (probe.encoder_input's names).

    ValueError for an impossible pairing: an L encoder takes only L, an RGB encoder RGB or grey RGB.
    """
    if choice not in INPUT_CHOICES:
        raise ValueError(f"--input must be one of {INPUT_CHOICES}, got {choice!r}")
    space = encoder.input_space
    if space == "L":
        if choice not in ("auto", "L"):
            raise ValueError(f"--input {choice}: {type(encoder).__name__} takes the L channel (--input auto or L)")
        return "L"
    if choice == "L":
        raise ValueError(f"--input L: {type(encoder).__name__} takes RGB (--input auto, rgb or grey-rgb)")
    return "grey" if choice == "grey-rgb" else "rgb"


def to_model_input(images: torch.Tensor, mode: str) -> torch.Tensor:
    """uint8 (N, 3, H, W) RGB on any device -> the encoder's input (batched, on that device)."""
    return encoder_input(images, mode)


def pad_value(mode: str) -> tuple[float, ...]:
    """The per-channel value, in model-input units, that the encoder normalises to zero: the padding
    that corresponds to Caffe's zero padding after mean subtraction."""
    if mode == "L":
        return (L_CENTER,)
    return tuple(IMAGENET_MEAN)


#: RGB uint8 padding for crops taken before the conversion: ImageNet's mean colour (L close to 50).
PAD_RGB = tuple(int(round(255 * m)) for m in IMAGENET_MEAN)


# ----------------------------------------------------------------------------------------------
# Fine-tuning scopes
# ----------------------------------------------------------------------------------------------

def stage_modules(encoder: nn.Module) -> dict[str, nn.Module]:
    return dict(encoder.stages())


def feature_tap(encoder: nn.Module) -> str:
    """The tap a new classifier reads: fc7 for AlexNet-style encoders, else the deepest probe tap
    (res5 for ResNet-50, conv5 for the colorization net)."""
    return "fc7" if is_alexnet_style(encoder) else encoder.probe_taps[-1]


def upper_stages(encoder: nn.Module) -> list[str]:
    """The stages "fc6-8" fine-tunes besides the new classifier.

    AlexNet-style: the stages after conv5 up to fc7 (pool5, fc6, fc7). Otherwise the analogue, the
    last block before the classifier: the stages after the second-deepest probe tap up to the deepest
    (res5 for ResNet-50, conv5 for the colorization net).
    """
    names = list(encoder.stage_names)
    if is_alexnet_style(encoder):
        start, stop = names.index("conv5") + 1, names.index("fc7") + 1
    else:
        start, stop = names.index(encoder.probe_taps[-2]) + 1, names.index(encoder.probe_taps[-1]) + 1
    return names[start:stop]


def finetune_modules(encoder: nn.Module, setting: str) -> list[nn.Module]:
    """The encoder modules that ``--finetune setting`` trains (the new head is not part of it)."""
    if setting not in FINETUNE_SETTINGS:
        raise ValueError(f"--finetune must be one of {FINETUNE_SETTINGS}, got {setting!r}")
    if setting == "fc8":
        return []
    if setting == "fc6-8":
        stages = stage_modules(encoder)
        return [stages[name] for name in upper_stages(encoder)]
    return [encoder]


def trained_tensor_names(encoder: nn.Module, modules: Sequence[nn.Module]) -> set[str]:
    """state_dict-style names of the parameters and buffers inside ``modules`` (matched by identity,
    so views over an encoder's modules work too)."""
    ids = {id(t) for m in modules for t in list(m.parameters()) + list(m.buffers())}
    named = list(encoder.named_parameters(remove_duplicate=False)) + list(encoder.named_buffers(remove_duplicate=False))
    return {name for name, t in named if id(t) in ids}


def set_requires_grad(encoder: nn.Module, modules: Sequence[nn.Module]) -> list[nn.Parameter]:
    """Freeze the encoder except ``modules``; return the parameters that train."""
    encoder.requires_grad_(False)
    for module in modules:
        module.requires_grad_(True)
    return [p for p in encoder.parameters() if p.requires_grad]


def set_train_mode(encoder: nn.Module, modules: Sequence[nn.Module], bn_mode: str, training: bool = True) -> None:
    """Frozen parts in eval mode (their BatchNorm statistics must not move); fine-tuned parts in train
    mode, with their BatchNorms in eval mode unless ``bn_mode == "train"``."""
    if bn_mode not in BN_MODES:
        raise ValueError(f"--bn must be one of {BN_MODES}, got {bn_mode!r}")
    encoder.eval()
    if not training:
        return
    for module in modules:
        module.train()
    if bn_mode == "frozen":
        for m in encoder.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


class UntouchedGuard:
    """Snapshot of the encoder; :meth:`check` raises when a tensor outside ``allowed`` changed.

    Built on ssl_colorize.heads.probe.FrozenEncoderGuard (exact comparison, BatchNorm statistics included).
    """

    def __init__(self, encoder: nn.Module, allowed: Iterable[str] = ()):
        self.guard = FrozenEncoderGuard(encoder)
        self.allowed = set(allowed)

    def changed(self) -> list[str]:
        return [name for name in self.guard.changed() if name not in self.allowed]

    def check(self, what: str) -> None:
        changed = self.changed()
        if changed:
            shown = ", ".join(changed[:12]) + (f", ... ({len(changed)} in all)" if len(changed) > 12 else "")
            raise RuntimeError(f"{what} changed encoder tensors it must leave alone: {shown}")


def sgd_update(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scheduler, clip_grad: float) -> None:
    """One fine-tuning update: backward, the gradient norm clipped to ``clip_grad`` over the optimizer's
    parameters when positive (``--clip-grad``), the step and the schedule's step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip_grad > 0:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], clip_grad)
    optimizer.step()
    scheduler.step()


# ----------------------------------------------------------------------------------------------
# Data loading helpers
# ----------------------------------------------------------------------------------------------

def cycle(loader: Iterable) -> Iterator:
    """Iterate a DataLoader forever, epoch after epoch (the schedule counts iterations)."""
    while True:
        produced = False
        for batch in loader:
            produced = True
            yield batch
        if not produced:
            raise ValueError("the training data loader produced no batch (every image skipped?)")


# ----------------------------------------------------------------------------------------------
# Runs: folder, log, reports, rows
# ----------------------------------------------------------------------------------------------

@dataclass
class TransferRun:
    """One benchmark run: its id, folder, log file, data reports and result rows."""

    benchmark: str
    args: argparse.Namespace
    encoder_name: str
    checkpoint: str
    run_id: str = ""
    out: Path = field(default_factory=Path)
    reports: list[DataReport] = field(default_factory=list)
    runtime_skipped: dict[str, str] = field(default_factory=dict)
    rows: list = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.run_id = self.args.run_id or f"{self.benchmark}-{stamp}-{os.getpid()}"
        self.out = Path(self.args.out) if self.args.out else REPO_ROOT / "runs" / self.benchmark / self.run_id
        self.out.mkdir(parents=True, exist_ok=True)
        self._handler = logging.FileHandler(self.out / "log.txt")
        self._handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger("ssl_colorize")
        root.addHandler(self._handler)
        if root.level == logging.NOTSET or root.level > logging.INFO:
            root.setLevel(logging.INFO)
        if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
                   for h in root.handlers):
            stream = logging.StreamHandler(sys.stderr)
            stream.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
            root.addHandler(stream)
        LOG.info("%s run %s -> %s", self.benchmark, self.run_id, self.out)

    def add_report(self, report: DataReport) -> None:
        """Record a loader's report; warn (and log) if it skipped anything."""
        self.reports.append(report)
        report.warn()

    def skipped_at_runtime(self, items: Iterable) -> None:
        """Count the SkippedItem entries a collate function separated out (decode errors)."""
        for item in items:
            if item.path not in self.runtime_skipped:
                self.runtime_skipped[item.path] = item.reason
                LOG.warning("skipped %s: %s", item.path, item.reason)

    def row(self, *, tap: str, dataset: str, split: str, protocol: str, metric: str, value: float,
            hparams: dict) -> None:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return  # a class without positives has no AP: no row rather than a NaN row
        self.rows.append(make_row(
            run_id=self.run_id, benchmark=self.benchmark, checkpoint=self.checkpoint, encoder=self.encoder_name,
            tap=tap, dataset=dataset, split=split, protocol=protocol, metric=metric, value=float(value),
            seed=self.args.seed, hparams=hparams,
        ))

    def finish(self, metrics: dict) -> dict:
        """Write the rows (``--out-csv`` and the run folder) and ``summary.json``; return the summary."""
        if self.rows:
            append_rows(self.args.out_csv, self.rows)
            append_rows(self.out / "results.csv", self.rows)
        skipped_total = sum(r.total for r in self.reports) + len(self.runtime_skipped)
        summary = {
            "benchmark": self.benchmark, "run_id": self.run_id, "checkpoint": self.checkpoint,
            "encoder": self.encoder_name, "metrics": metrics, "rows": len(self.rows),
            "data_reports": [r.as_dict() for r in self.reports],
            "skipped_at_runtime": self.runtime_skipped, "skipped_total": skipped_total,
            "args": {k: v for k, v in vars(self.args).items()}, **self.extra,
        }
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        if self.runtime_skipped:
            LOG.warning("%d file(s) skipped while reading: %s", len(self.runtime_skipped),
                        ", ".join(list(self.runtime_skipped)[:5]))
        LOG.info("%d rows -> %s; summary: %s", len(self.rows), self.args.out_csv, self.out / "summary.json")
        logging.getLogger("ssl_colorize").removeHandler(self._handler)
        self._handler.close()
        return summary


def checkpoint_label(checkpoint: str) -> str:
    return "random" if str(checkpoint) == "random" else str(Path(checkpoint))
