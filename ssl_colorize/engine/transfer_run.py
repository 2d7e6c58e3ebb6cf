"""What the VOC benchmarks share besides the fine-tuning engine: options, checks, encoder, inputs, the run.

* :func:`add_common_args` / :func:`validate_common`: ``--data --checkpoint --encoder --iters --out-csv
  --seed --device --input --workers`` and the run folder's options (ssl_colorize.engine.run), checked
  before any work (one line naming the option, exit 2);
* :func:`load_transfer_encoder`: the checkpoint (or ``random``) as an encoder in the transfer geometry
  its card asks for (``card_of(encoder).transfer.model_kwargs``; alexnet_lab: CaffeNet geometry,
  docs/protocols.md section 3);
* :func:`resolve_input` / :func:`to_model_input`: "inputs follow the encoder" -- L for L encoders, RGB
  for RGB encoders, or grey-replicated RGB (the L channel shown as neutral grey) for RGB encoders;
* :func:`add_rescale_args` / :func:`resolve_rescale` / :func:`apply_rescale`: ``--rescale`` (Krähenbühl
  et al.'s between-layer rescaling of the loaded weights, ssl_colorize.engine.rescale);
* :class:`TransferRun`: the run folder (:class:`~ssl_colorize.engine.run.RunFolder`), its text log,
  the data reports and the result rows.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from ssl_colorize.checkpoint_ref import CheckpointRef, parse_checkpoint_ref
from ssl_colorize.data.voc import DataReport, split_file, year_dir
from ssl_colorize.engine import rescale as rescaling
from ssl_colorize.engine.cli import (
    UsageError, check_device, check_input_dir, check_tensorboard, check_non_negative, check_output_file, check_positive,
)
from ssl_colorize.engine.run import RunFolder, add_run_args, check_run_folder
from ssl_colorize.heads.probe import encoder_input
from ssl_colorize.models.base import IMAGENET_MEAN, L_CENTER
from ssl_colorize.models.cards import card_of
from ssl_colorize.results import append_rows, make_row

LOG = logging.getLogger("ssl_colorize.voc")

INPUT_CHOICES = ("auto", "L", "rgb", "grey-rgb")
DEFAULT_OUT_CSV = Path("results") / "voc.csv"  # under the current working directory
DEFAULT_ENCODER = "alexnet_lab"  # what --checkpoint random builds without --encoder
#: RGB uint8 padding for crops taken before the conversion: ImageNet's mean colour (L close to 50).
PAD_RGB = tuple(int(round(255 * m)) for m in IMAGENET_MEAN)


# ----------------------------------------------------------------------------------------------
# Options and their checks
# ----------------------------------------------------------------------------------------------

def add_common_args(parser: argparse.ArgumentParser, iters_help: str, job: str = "voc") -> argparse.ArgumentParser:
    """The options every VOC benchmark takes (issue 5), the run folder's included."""
    g = parser.add_argument_group("common VOC options")
    g.add_argument("--data", default=None,
                   help="folder holding VOCdevkit, or VOCdevkit itself (default: the built-in procedural VOCdevkit)")
    g.add_argument("--checkpoint", default="random",
                   help="pretraining checkpoint (file or run folder), random:ENCODER, or 'random' (with --encoder; "
                        f"default {DEFAULT_ENCODER})")
    g.add_argument("--encoder", default=None, help="encoder name (for --checkpoint random; checked against a file)")
    g.add_argument("--iters", type=int, default=None, help=iters_help)
    g.add_argument("--out-csv", default=str(DEFAULT_OUT_CSV), help="results table to append rows to")
    g.add_argument("--seed", type=int, default=0, help="seed of the random init, data order and augmentation")
    g.add_argument("--device", default=None, help="cuda, cuda:1, cpu ... (default: cuda when present, else cpu)")
    g.add_argument("--input", choices=INPUT_CHOICES, default="auto",
                   help="encoder input: auto follows the encoder (L for L encoders, RGB for RGB encoders); "
                        "grey-rgb feeds an RGB encoder the L channel as neutral grey RGB")
    g.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="data loader worker processes")
    add_run_args(parser, job)
    return parser


def checkpoint_ref(args: argparse.Namespace) -> CheckpointRef:
    """``--checkpoint`` parsed (UsageError naming it when the file is missing or the encoder unknown)."""
    encoder = args.encoder
    if encoder is None and str(args.checkpoint) == "random":
        encoder = DEFAULT_ENCODER
    return parse_checkpoint_ref(args.checkpoint, encoder=encoder)


def validate_common(args: argparse.Namespace, splits: Iterable[tuple[int, str, str]] = ()) -> CheckpointRef:
    """The checks every VOC benchmark makes before any work; creates nothing.

    ``splits``: (year, kind, split) of every split file the run reads (``ImageSets/<kind>/<split>.txt``):
    a missing one is named now rather than after the model is built. Returns the parsed ``--checkpoint``.
    """
    if args.iters is not None:
        check_positive("--iters", args.iters)
    check_non_negative("--workers", args.workers)
    if args.data is not None:
        check_input_dir("--data", args.data)
        for year, kind, split in splits:
            try:
                split_file(year_dir(args.data, year), kind, split)
            except ValueError as exc:
                raise UsageError(str(exc)) from None
    check_output_file("--out-csv", args.out_csv)
    check_run_folder(args.out, resume=args.resume, overwrite=args.overwrite)
    check_device("--device", args.device)
    ref = checkpoint_ref(args)
    ref.model_name()  # reads only the file's "model" entry: a foreign file is named now
    return ref


def validate_training(args: argparse.Namespace) -> None:
    """The options of the fine-tuning benchmarks (classification, detection, segmentation)."""
    check_positive("--lr", args.lr)
    check_non_negative("--momentum", args.momentum)
    check_non_negative("--weight-decay", args.weight_decay)
    check_non_negative("--clip-grad", args.clip_grad)
    check_positive("--batch-size", args.batch_size)
    check_positive("--ckpt-every", args.ckpt_every)
    check_positive("--log-every", args.log_every)
    if args.tensorboard:
        check_tensorboard()


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def resolve_data(data: str | None) -> tuple[Path, bool]:
    """(the folder holding VOCdevkit, whether it is the built-in data)."""
    if data is None:
        from ssl_colorize.data.builtin_voc import ensure_builtin_voc

        return ensure_builtin_voc(), True
    return Path(data).expanduser(), False


def dataset_name(builtin: bool, name: str) -> str:
    """Result rows name the built-in data apart from the real one (e.g. builtin_voc2007 / voc2007)."""
    return f"builtin_{name}" if builtin else name


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# Encoder and inputs
# ----------------------------------------------------------------------------------------------

def load_transfer_encoder(checkpoint: str, encoder: str | None, seed: int) -> tuple[nn.Module, str]:
    """The encoder of ``checkpoint`` (or a seeded random ``encoder``) in its card's transfer geometry.

    Returns (model in eval mode on the CPU, encoder name). alexnet_lab is built in CaffeNet's geometry
    (227 input, 6x6 pool5, undilated fc6; docs/protocols.md section 3), the same weights.
    """
    from ssl_colorize.models.cards import get_card

    ref = checkpoint_ref(argparse.Namespace(checkpoint=checkpoint, encoder=encoder))
    name = ref.model_name()
    model = ref.load(seed=seed, **get_card(name).transfer.model_kwargs)
    return model, name


def default_crop(encoder: nn.Module) -> int:
    """The input side fine-tuning uses for ``encoder`` (its card: 227 for AlexNets, 224 otherwise)."""
    return card_of(encoder).transfer.crop


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


# ----------------------------------------------------------------------------------------------
# The released post-processing of the loaded weights: --rescale
# ----------------------------------------------------------------------------------------------

def add_rescale_args(parser: argparse.ArgumentParser, batches: int) -> argparse.ArgumentParser:
    """``--rescale`` / ``--no-rescale`` and ``--rescale-batches`` (default ``batches``)."""
    g = parser.add_argument_group("rescaling (Krähenbühl et al., magic_init -cs)")
    g.add_argument("--rescale", action=argparse.BooleanOptionalAction, default=None,
                   help="absorb BatchNorm and rescale the loaded layers to equal gradient-to-weight ratios, as "
                        "the released models were (default: on for a pretrained checkpoint with --bn frozen, "
                        "off for random)")
    g.add_argument("--rescale-batches", type=int, default=batches,
                   help="training batches (training augmentation) the rescaling measures on")
    return parser


def validate_rescale(args: argparse.Namespace) -> None:
    check_positive("--rescale-batches", args.rescale_batches)
    if args.rescale and getattr(args, "bn", "frozen") == "train":
        raise UsageError("--rescale absorbs BatchNorm into the convolutions: use it with --bn frozen (or --no-rescale)")


def resolve_rescale(args: argparse.Namespace, encoder: nn.Module, tap: str) -> bool:
    """Whether the rescaling runs: ``--rescale`` / ``--no-rescale``, else on for a pretrained checkpoint of
    an encoder it is defined for (a feed-forward chain), with ``--bn frozen``. UsageError when asked for
    and impossible."""
    why = rescaling.unsupported_reason(encoder, tap)
    if args.rescale is None:
        return not checkpoint_ref(args).is_random and getattr(args, "bn", "frozen") == "frozen" and why is None
    if args.rescale and why:
        raise UsageError(f"--rescale is not defined for {type(encoder).__name__}: {why} (use --no-rescale)")
    return bool(args.rescale)


def apply_rescale(run: "TransferRun", encoder: nn.Module, tap: str, batches: list[torch.Tensor], seed: int):
    """Rescale ``encoder`` in place on ``batches`` (model inputs); its per-layer factors go to the log and
    to the summary (``rescale``). Returns the report."""
    report = rescaling.rescale_encoder_(encoder, tap, batches, seed=seed)
    for line in report.lines():
        LOG.info("%s", line)
    run.extra["rescale"] = report.as_dict()
    return report


# ----------------------------------------------------------------------------------------------
# Runs: folder, log, reports, rows
# ----------------------------------------------------------------------------------------------

@dataclass
class TransferRun:
    """One benchmark run: its folder (opened with --resume / --overwrite), text log, data reports, rows."""

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
        self.folder = RunFolder.open(self.args.out, job=self.benchmark, resume=getattr(self.args, "resume", False),
                                     overwrite=getattr(self.args, "overwrite", False), run_id=self.args.run_id)
        self.run_id, self.out = self.folder.run_id, self.folder.path
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
            "args": dict(vars(self.args)), **self.extra,
        }
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        if self.runtime_skipped:
            LOG.warning("%d file(s) skipped while reading: %s", len(self.runtime_skipped),
                        ", ".join(list(self.runtime_skipped)[:5]))
        LOG.info("%d rows -> %s; summary: %s", len(self.rows), self.args.out_csv, self.out / "summary.json")
        self.close()
        return summary

    def close(self) -> None:
        logging.getLogger("ssl_colorize").removeHandler(self._handler)
        self._handler.close()
