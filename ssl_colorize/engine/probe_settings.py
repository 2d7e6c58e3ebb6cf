"""The linear probe's settings (docs/protocols.md section 4): defaults, checks, the data splits.

:func:`resolve_settings` turns the parsed options into one dict with every default filled in (the
protocol's schedule, the encoder card's crop and weight decay, the built-in data's short schedule);
it reads nothing but the checkpoint's model name and creates nothing, so ``validate()`` can call it.
:func:`open_splits` reads the ImageFolder layout in ``main()``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from pathlib import Path

import torch

from ssl_colorize.checkpoint_ref import parse_checkpoint_ref
from ssl_colorize.data import EvalTransform, ImageFiles
from ssl_colorize.data.builtin import SHAPES_VERSION, cache_dir
from ssl_colorize.engine.cli import UsageError, check_input_dir, check_input_file, fail
from ssl_colorize.heads.probe import SeededTrainCrops, resolve_input_mode, tap_shapes
from ssl_colorize.heads.probe_pool import LEGACY_POOL
from ssl_colorize.models import create_model
from ssl_colorize.models.cards import get_card

BENCHMARK = "linear_probe"
#: The encoder of a plain ``--checkpoint random`` without ``--encoder`` (a default value, never a test).
DEFAULT_RANDOM_ENCODER = "alexnet_lab"

# The protocol's schedule (docs/protocols.md section 4): 140k iterations at batch 256 on ImageNet's
# 1,281,167 training images, i.e. round(140000 * 256 / 1281167) = 28 epochs, lr x0.1 at 40k, 80k and
# 120k iterations. For any dataset the default keeps the epochs (so the iterations scale with its
# size) and puts the steps at the same fractions of the run.
IMAGENET_TRAIN_IMAGES = 1_281_167
PROTOCOL_ITERATIONS, PROTOCOL_BATCH = 140_000, 256
PROTOCOL_EPOCHS = round(PROTOCOL_ITERATIONS * PROTOCOL_BATCH / IMAGENET_TRAIN_IMAGES)
PROTOCOL_STEP_FRACTIONS = tuple(i / PROTOCOL_ITERATIONS for i in (40_000, 80_000, 120_000))

# The built-in "coloured shapes" (128 px images, 8 classes, 960 training images). The images are
# resized to 80 px, the resize of the built-in pretraining recipe (ssl_colorize.pretrain), so that
# probe and pretraining see objects at one scale, as the protocol's 256 px resize does for both; the
# crop keeps the protocol's 227 / 256 ratio. A short schedule: a minute or two on a laptop CPU.
BUILTIN_DATASET = "builtin-shapes"
BUILTIN_RESIZE = 80
BUILTIN_DEFAULTS = {"resize": BUILTIN_RESIZE, "crop": round(BUILTIN_RESIZE * 227 / 256), "epochs": 10, "batch_size": 64}
REAL_DEFAULTS = {"resize": 256, "epochs": PROTOCOL_EPOCHS, "batch_size": PROTOCOL_BATCH}

#: --input as the VOC benchmarks spell it -> the probe's input modes (ssl_colorize.heads.probe.INPUT_MODES).
INPUT_CHOICES = ("auto", "L", "rgb", "grey-rgb")
_INPUT_MODE = {"auto": "auto", "L": "auto", "rgb": "rgb", "grey-rgb": "grey", "grey": "grey"}

#: Settings that must match for a run to be resumed from its rolling checkpoint.
RESUME_KEYS = (
    "checkpoint", "encoder", "encoder_args", "geometry", "taps", "protocol", "data", "crop", "resize", "epochs",
    "batch_size", "lr", "wd", "momentum", "nesterov", "lr_steps", "seed", "input_mode", "max_train_batches", "limit",
)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", text).strip("_") or "x"


def parse_encoder_args(items: list[str]) -> dict:
    """``KEY=VALUE`` items (the value read as JSON when it parses, else as a string)."""
    parsed = {}
    for item in items:
        if "=" not in item:
            raise fail("--encoder-arg", item, "expected KEY=VALUE")
        key, value = item.split("=", 1)
        try:
            parsed[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            parsed[key.strip()] = value
    return parsed


def parse_lr_steps(text: str | None, epochs: int) -> list[float]:
    """--lr-steps (epochs, may be fractional); default: the protocol's steps at 2/7, 4/7, 6/7 of the run."""
    if epochs <= 0:
        return []
    if text is None:
        return [round(f * epochs, 6) for f in PROTOCOL_STEP_FRACTIONS]
    try:
        steps = sorted(float(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise fail("--lr-steps", text, "expected a comma list of epochs") from None
    if any(not 0 < s < epochs for s in steps):
        raise fail("--lr-steps", text, f"every step must lie strictly between 0 and --epochs {epochs}")
    return steps


def builtin_shapes_root() -> Path:
    """Where ensure_builtin_imagefolder() keeps the built-in shapes (without generating them)."""
    return cache_dir() / f"shapes-{SHAPES_VERSION}"


def infer_dataset_name(root: Path) -> str:
    """imagenet / places205 when the folder is named exactly so, else the folder's name.

    Only an exact name: a subset such as ``imagenet_det200`` must not be tabled beside the published
    ImageNet numbers (``--dataset-name imagenet`` says so explicitly when it is the real thing).
    """
    name = root.resolve().name.lower()
    if name in ("imagenet", "ilsvrc2012", "ilsvrc", "imagenet1k", "imagenet-1k"):
        return "imagenet"
    if name in ("places205", "places"):
        return "places205"
    return slug(name)


def encoder_outline(name: str, encoder_args: dict):
    """The encoder's architecture without weights (built on the meta device: no memory, no file read),
    to check --layer, --input and --geometry before anything is loaded."""
    kwargs = {k: v for k, v in encoder_args.items() if k != "weights_path"}  # a file read at build time
    try:
        with torch.device("meta"):
            return create_model(name, **kwargs)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"--encoder-arg {' '.join(f'{k}={v}' for k, v in kwargs.items())}: {exc}") from None


def resolve_taps(outline, layer: str) -> list[str]:
    """--layer -> tap names in depth order; UsageError listing the encoder's taps for an unknown one."""
    names = list(outline.probe_taps) if layer == "all" else [t.strip() for t in layer.split(",") if t.strip()]
    try:
        return outline.resolve_taps(names)
    except ValueError as exc:
        why = f"{exc} (probe taps: {list(outline.probe_taps)}; 'all' probes those)"
        raise fail("--layer", repr(layer), why) from None


def input_mode_for(outline, choice: str) -> str:
    """--input -> the probe's input mode ("auto", "rgb", "grey"), refusing an impossible pairing."""
    if outline.input_space == "L" and choice not in ("auto", "L"):
        raise fail("--input", choice, f"input mode {choice!r} is for RGB encoders; {type(outline).__name__} takes L "
                                      "(--input auto or L)")
    if outline.input_space == "rgb" and choice == "L":
        raise fail("--input", choice, f"{type(outline).__name__} takes RGB (--input auto, rgb or grey-rgb)")
    return _INPUT_MODE[choice]


def resolve_protocol(args: argparse.Namespace, card) -> str:
    """--protocol, or the deprecated --pool mapped (bilinear -> zhang, avg -> goyal, max -> max), or the
    encoder card's default; the two options may not disagree."""
    protocol = getattr(args, "protocol", None)
    pool = getattr(args, "pool", None)
    if pool is not None:
        if protocol not in (None, LEGACY_POOL[pool]):
            raise fail("--pool", pool, f"contradicts --protocol {protocol} (--pool {pool} is --protocol "
                                       f"{LEGACY_POOL[pool]})")
        protocol = LEGACY_POOL[pool]
    return protocol or card.probe.protocol


def resolve_settings(args: argparse.Namespace) -> dict:
    """Every setting of the run with its default filled in; UsageError on a bad option. Creates nothing."""
    ref = parse_checkpoint_ref(args.checkpoint, encoder=args.encoder)
    if ref.is_random and ref.encoder is None:  # plain "random" without --encoder: the paper's encoder
        ref = parse_checkpoint_ref(args.checkpoint, encoder=DEFAULT_RANDOM_ENCODER)
    encoder = ref.model_name()
    card = get_card(encoder)
    encoder_args = parse_encoder_args(args.encoder_arg)
    if "weights_path" in encoder_args:
        check_input_file("--encoder-arg weights_path", encoder_args["weights_path"])
    outline = encoder_outline(encoder, encoder_args)
    if args.geometry is not None and not hasattr(outline, "set_geometry"):
        raise fail("--geometry", args.geometry, f"encoder {encoder!r} has no geometry option")
    builtin = args.data is None or Path(args.data).resolve() == builtin_shapes_root().resolve()
    data_root = builtin_shapes_root() if builtin else Path(args.data).expanduser()
    if not builtin:
        check_input_dir("--data", args.data)
        for split in ("train", "val"):
            if not (data_root / split).is_dir():
                raise fail("--data", args.data, f"no {split}/ folder; expected the ImageFolder layout "
                                                f"{data_root}/train/<class>/*.jpg and {data_root}/val/<class>/*.jpg")
    # Real data: the card's crop (227 AlexNets, 224 others) and the protocol's schedule.
    defaults = BUILTIN_DEFAULTS if builtin else {**REAL_DEFAULTS, "crop": card.probe.crop}
    epochs = args.epochs if args.epochs is not None else defaults["epochs"]
    settings = {
        "checkpoint": ref.label,
        "encoder": encoder,
        "encoder_args": encoder_args,
        "geometry": args.geometry,
        "layer": args.layer,
        "taps": resolve_taps(outline, args.layer),
        "protocol": resolve_protocol(args, card),
        "input_mode": input_mode_for(outline, args.input),
        "data": str(data_root.resolve()),
        "builtin": builtin,
        "dataset": args.dataset_name or (BUILTIN_DATASET if builtin else infer_dataset_name(data_root)),
        "crop": args.crop if args.crop is not None else defaults["crop"],
        "resize": args.resize if args.resize is not None else defaults["resize"],
        "epochs": epochs,
        "batch_size": args.batch_size if args.batch_size is not None else defaults["batch_size"],
        "lr": args.lr,
        "wd": args.wd if args.wd is not None else card.probe.weight_decay,
        "momentum": args.momentum,
        "nesterov": bool(args.nesterov),
        "lr_steps": parse_lr_steps(args.lr_steps, epochs),
        "max_train_batches": args.max_train_batches,
        "limit": args.limit,
        "eval_every": args.eval_every,
        "seed": args.seed,
        "workers": args.workers if args.workers is not None else min(8, os.cpu_count() or 1),
        "device": args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
    }
    if settings["resize"] and settings["resize"] < settings["crop"]:
        raise fail("--resize", settings["resize"], f"is smaller than --crop {settings['crop']}")
    check_crop_reaches_taps(outline, settings)
    return settings


def check_crop_reaches_taps(outline, settings: dict) -> None:
    """--geometry is one the encoder knows and a --crop input reaches every tap (a dry forward on the
    meta device: shapes only, no arithmetic)."""
    if hasattr(outline, "set_geometry"):
        try:
            outline.set_geometry(settings["geometry"] or "transfer")
        except ValueError as exc:
            raise fail("--geometry", settings["geometry"], str(exc)) from None
    try:
        tap_shapes(outline, settings["taps"], settings["crop"], resolve_input_mode(outline, settings["input_mode"]))
    except ValueError as exc:
        raise fail("--crop", settings["crop"], str(exc).split(": ")[0]) from None


def checkpoint_ref_of(settings: dict):
    """The settings' checkpoint as a CheckpointRef (its encoder known)."""
    text = settings["checkpoint"]
    return parse_checkpoint_ref(text, encoder=settings["encoder"])


def build_encoder(settings: dict):
    """The frozen encoder in eval mode, in the transfer geometry when it has one."""
    encoder = checkpoint_ref_of(settings).load(seed=settings["seed"], **settings["encoder_args"])
    if hasattr(encoder, "set_geometry"):
        encoder.set_geometry(settings["geometry"] or "transfer")
        settings["geometry"] = encoder.geometry
    return encoder.eval()


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------

def open_splits(root: Path, crop: int, resize: int | None, seed: int, limit: int | None):
    """The train crops and val centre crops of an ImageFolder root; UsageError on a malformed layout."""
    try:
        train = ImageFiles(root / "train")
        val = ImageFiles(root / "val", EvalTransform(crop, resize))
    except ValueError as exc:  # e.g. a split without images: the reader names the folder
        raise UsageError(f"--data {root}: {exc}") from None
    for split, dataset in (("train", train), ("val", val)):
        loose = sum(1 for label in dataset.labels if label < 0)
        if loose:
            raise UsageError(
                f"--data {root}: {split}/ holds {loose} image(s) outside class folders; every image must sit in "
                f"{split}/<class>/ (ImageNet's val images must first be sorted into class folders)"
            )
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise UsageError(
            f"--data {root}: train/ and val/ have different classes "
            f"(only in train/: {only_train[:10]}{' ...' if len(only_train) > 10 else ''}; "
            f"only in val/: {only_val[:10]}{' ...' if len(only_val) > 10 else ''}; "
            f"{len(train.classes)} vs {len(val.classes)} classes)"
        )
    if len(train.classes) < 2:
        raise UsageError(f"--data {root}: a linear probe needs at least 2 classes, found {train.classes}")
    counts = torch.bincount(torch.tensor(train.labels), minlength=len(train.classes))
    empty = [train.classes[i] for i in torch.nonzero(counts == 0).flatten().tolist()]
    if empty:
        raise UsageError(f"--data {root}: train/ has class folders without images: {empty[:10]}")
    if limit:
        for dataset in (train, val):
            keep = spread(len(dataset), limit)
            dataset.paths = [dataset.paths[i] for i in keep]
            dataset.labels = [dataset.labels[i] for i in keep]
    return SeededTrainCrops(train, crop, resize, seed), val, train.classes


def spread(n: int, limit: int) -> list[int]:
    """``limit`` indices spread evenly over range(n), so every class keeps some images."""
    if limit >= n:
        return list(range(n))
    return sorted({math.floor(i * n / limit) for i in range(limit)})
