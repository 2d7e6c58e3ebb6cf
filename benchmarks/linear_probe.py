"""Frozen-layer linear probes on conv1..conv5 (docs/protocols.md section 4), all taps in one pass.

    python benchmarks/linear_probe.py --checkpoint runs/pretrain/checkpoint.pth --layer all
    python benchmarks/linear_probe.py --checkpoint random --encoder alexnet_lab --layer all
    python benchmarks/linear_probe.py --checkpoint CKPT --layer conv4 --data /datasets/imagenet

The recipe: load the encoder (a pretraining checkpoint, or ``random``: a seeded initialisation of the
same architecture), freeze it, put one linear head per requested tap (pool to about 9k dims ->
BatchNorm1d without affine -> Linear), train every head from one frozen forward pass per batch with
SGD on the sum of their losses, then score the single centre crop (top-1, top-5). The encoder is
checked bit for bit after training; a changed tensor fails the run (ssl_colorize.heads.probe).

Every number becomes one row of ``--out-csv`` (ssl_colorize.results); an epoch log and a plot of
accuracy against layer are written beside it. A rolling ``probe_checkpoint.pth`` in ``--out`` lets a
killed run continue exactly where it stopped: rerunning the same command resumes it.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

if __package__ in (None, ""):  # run as a script: make the repository's package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ssl_colorize.checkpoint import load_checkpoint, load_encoder, save_checkpoint  # noqa: E402
from ssl_colorize.data import EvalTransform, ImageFiles, collate_skipping, ensure_builtin_imagefolder  # noqa: E402
from ssl_colorize.data.builtin import SHAPES_VERSION, cache_dir  # noqa: E402
from ssl_colorize.models import list_models  # noqa: E402
from ssl_colorize.heads.probe import (  # noqa: E402
    INPUT_MODES,
    POOL_MODES,
    EpochSampler,
    FrozenEncoderGuard,
    MultiTapProbe,
    SeededTrainCrops,
    evaluate,
)
from ssl_colorize import results  # noqa: E402

BENCHMARK = "linear_probe"
PROBE_CHECKPOINT = "probe_checkpoint.pth"
PROBE_STATE_VERSION = 1

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

# Settings that must match for a run to be resumed from a probe checkpoint.
RESUME_KEYS = (
    "checkpoint", "encoder", "encoder_args", "geometry", "taps", "pool", "data", "crop", "resize", "epochs",
    "batch_size", "lr", "wd", "momentum", "nesterov", "lr_steps", "seed", "input_mode", "max_train_batches", "limit",
)


# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------

def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Linear probes on frozen encoder taps (docs/protocols.md section 4)", add_help=add_help
    )
    what = parser.add_argument_group("what to probe")
    what.add_argument("--checkpoint", required=True, help="a pretraining checkpoint (file or run folder), or 'random'")
    what.add_argument("--encoder", default=None,
                      help="encoder name; needed with 'random' (default alexnet_lab), checked against a checkpoint")
    what.add_argument("--encoder-arg", action="append", default=[], metavar="KEY=VALUE",
                      help="extra model argument (JSON value or string), e.g. weights_path=/models/alexnet.pth "
                           "for alexnet_rgb_torchvision; repeatable")
    what.add_argument("--geometry", default=None,
                      help="encoder geometry for encoders that have one (alexnet_lab): default 'transfer', "
                           "the CaffeNet geometry the protocol probes (docs/protocols.md section 3)")
    what.add_argument("--layer", default="all", help="a tap, a comma list of taps, or 'all' (the encoder's probe taps)")
    what.add_argument("--pool", default="avg", choices=POOL_MODES,
                      help="how each tap is reduced to ~9k dims (recorded in the 'protocol' column)")
    what.add_argument("--input-mode", default="auto", choices=INPUT_MODES,
                      help="auto: L for L encoders, RGB for RGB encoders; rgb / grey: for RGB encoders")

    data = parser.add_argument_group("data")
    data.add_argument("--data", default=None,
                      help="folder with ImageFolder train/ and val/ (ImageNet, Places205); default: built-in shapes")
    data.add_argument("--dataset-name", default=None,
                      help="name in the 'dataset' column (default: inferred from --data, e.g. imagenet)")
    data.add_argument("--crop", type=int, default=None,
                      help=f"crop side (default 227 AlexNets, 224 others; {BUILTIN_DEFAULTS['crop']} built-in)")
    data.add_argument("--resize", type=int, default=None,
                      help=f"shorter side before cropping (default 256; {BUILTIN_DEFAULTS['resize']} built-in)")
    data.add_argument("--workers", type=int, default=None, help="data loading processes (default: min(8, CPUs))")
    data.add_argument("--limit", type=int, default=None, help="use only the first N images of each split (quick runs)")

    sched = parser.add_argument_group("schedule (defaults: the protocol's)")
    sched.add_argument("--epochs", type=int, default=None, help=f"default {PROTOCOL_EPOCHS} (built-in data: "
                       f"{BUILTIN_DEFAULTS['epochs']})")
    sched.add_argument("--batch-size", type=int, default=None,
                       help=f"default 256 (built-in data: {BUILTIN_DEFAULTS['batch_size']})")
    sched.add_argument("--lr", type=float, default=0.01)
    sched.add_argument("--wd", type=float, default=None, help="weight decay: 5e-4 (AlexNet), 1e-4 (ResNet)")
    sched.add_argument("--momentum", type=float, default=0.9)
    sched.add_argument("--nesterov", action="store_true", help="Nesterov momentum (Goyal et al.)")
    sched.add_argument("--lr-steps", default=None,
                       help="comma list of epochs (may be fractional) where lr is multiplied by 0.1; default at "
                            "40k/80k/120k of 140k iterations, i.e. 2/7, 4/7, 6/7 of the run")
    sched.add_argument("--max-train-batches", type=int, default=None, help="cap on training batches per epoch")
    sched.add_argument("--eval-every", type=int, default=1, help="evaluate every N epochs (and always at the end)")
    sched.add_argument("--seed", type=int, default=0)
    sched.add_argument("--device", default=None, help="default: cuda when available, else cpu")

    out = parser.add_argument_group("output and resumption")
    out.add_argument("--out-csv", default="results/linear_probe.csv", help="results table rows are appended to")
    out.add_argument("--run-id", default=None, help="the 'run_id' column (default: from --out and the start time)")
    out.add_argument("--out", default=None, help="run folder for the rolling probe_checkpoint.pth "
                     "(default runs/linear_probe/<encoder>-<checkpoint>-<pool>-<dataset>-seed<seed>)")
    out.add_argument("--resume", nargs="?", const="auto", default="auto",
                     help="resume from --out/probe_checkpoint.pth when it exists (the default), or from a given file")
    out.add_argument("--fresh", action="store_true", help="ignore an existing probe checkpoint and start over")
    out.add_argument("--save-every-minutes", type=float, default=10.0, help="rolling checkpoint period within an epoch")
    out.add_argument("--save-every-iters", type=int, default=0, help="also save every N iterations (0: off)")
    out.add_argument("--no-plot", action="store_true", help="skip the accuracy-vs-layer PNG")
    return parser


def _parse_encoder_args(items: list[str]) -> dict:
    parsed = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--encoder-arg {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        try:
            parsed[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            parsed[key.strip()] = value
    return parsed


def _parse_steps(text: str | None, epochs: int) -> list[float]:
    if text is None:
        return [round(f * epochs, 6) for f in PROTOCOL_STEP_FRACTIONS]
    try:
        steps = sorted(float(s) for s in text.split(",") if s.strip())
    except ValueError as exc:
        raise ValueError(f"--lr-steps {text!r}: expected a comma list of epochs") from exc
    if any(not 0 < s < epochs for s in steps):
        raise ValueError(f"--lr-steps {text!r}: every step must lie strictly between 0 and --epochs {epochs}")
    return steps


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", text).strip("_") or "x"


def checkpoint_column(settings: dict) -> str:
    """What the 'checkpoint' column says: the checkpoint as given, 'random', or, for a random-initialised
    encoder loaded from a weights file (``--encoder-arg weights_path=...``), 'weights:<file>'."""
    weights = settings["encoder_args"].get("weights_path")
    if settings["checkpoint"] == "random" and weights:
        return f"weights:{weights}"
    return settings["checkpoint"]


def checkpoint_label(checkpoint: str) -> str:
    """A short, unique name for a checkpoint in folder names: 'random' or <name>-<hash of the path>."""
    if checkpoint == "random":
        return "random"
    checkpoint = checkpoint.removeprefix("weights:")
    path = Path(checkpoint).resolve()
    if path.is_dir():
        name = path.name
    elif path.stem == "checkpoint":  # a run folder's rolling checkpoint: the folder names the run
        name = path.parent.name
    else:
        name = path.stem
    return f"{_slug(name)}-{hashlib.sha1(str(path).encode()).hexdigest()[:6]}"


def builtin_shapes_root() -> Path:
    """Where ensure_builtin_imagefolder() keeps the built-in shapes (without generating them)."""
    return cache_dir() / f"shapes-{SHAPES_VERSION}"


def infer_dataset_name(root: Path) -> str:
    """imagenet / places205 when the folder's name says so, else the folder's name."""
    name = root.resolve().name.lower()
    if "imagenet" in name or "ilsvrc" in name:
        return "imagenet"
    if "places205" in name or name == "places":
        return "places205"
    return _slug(name)


# ----------------------------------------------------------------------------------------------
# Validation (before any work)
# ----------------------------------------------------------------------------------------------

def open_splits(root: Path, crop: int, resize: int | None, seed: int, limit: int | None):
    """The train crops and val centre crops of an ImageFolder root; ValueError on a malformed layout."""
    if not root.is_dir():
        raise ValueError(f"--data {root}: not a folder")
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise ValueError(
                f"--data {root}: no {split}/ folder; expected the ImageFolder layout "
                f"{root}/train/<class>/*.jpg and {root}/val/<class>/*.jpg"
            )
    train = ImageFiles(root / "train")
    val = ImageFiles(root / "val", EvalTransform(crop, resize))
    for split, dataset in (("train", train), ("val", val)):
        loose = sum(1 for label in dataset.labels if label < 0)
        if loose:
            raise ValueError(
                f"--data {root}: {split}/ holds {loose} image(s) outside class folders; every image must sit in "
                f"{split}/<class>/ (ImageNet's val images must first be sorted into class folders)"
            )
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise ValueError(
            f"--data {root}: train/ and val/ have different classes "
            f"(only in train/: {only_train[:10]}{' ...' if len(only_train) > 10 else ''}; "
            f"only in val/: {only_val[:10]}{' ...' if len(only_val) > 10 else ''}; "
            f"{len(train.classes)} vs {len(val.classes)} classes)"
        )
    if len(train.classes) < 2:
        raise ValueError(f"--data {root}: a linear probe needs at least 2 classes, found {train.classes}")
    counts = torch.bincount(torch.tensor(train.labels), minlength=len(train.classes))
    empty = [train.classes[i] for i in torch.nonzero(counts == 0).flatten().tolist()]
    if empty:
        raise ValueError(f"--data {root}: train/ has class folders without images: {empty[:10]}")
    if limit:
        for dataset in (train, val):
            keep = _spread(len(dataset), limit)
            dataset.paths = [dataset.paths[i] for i in keep]
            dataset.labels = [dataset.labels[i] for i in keep]
    return SeededTrainCrops(train, crop, resize, seed), val, train.classes


def _spread(n: int, limit: int) -> list[int]:
    """``limit`` indices spread evenly over range(n), so every class keeps some images."""
    if limit >= n:
        return list(range(n))
    return sorted({math.floor(i * n / limit) for i in range(limit)})


def resolve_settings(args: argparse.Namespace) -> dict:
    """Every setting of the run with its default filled in; ValueError on a bad option."""
    known = list_models()
    builtin = args.data is None or Path(args.data).resolve() == builtin_shapes_root().resolve()
    data_root = ensure_builtin_imagefolder() if builtin else Path(args.data)
    if args.checkpoint != "random" and not Path(args.checkpoint).exists():
        raise ValueError(f"--checkpoint {args.checkpoint}: no such file or folder (or use 'random')")
    encoder = args.encoder
    if args.checkpoint == "random":
        encoder = encoder or "alexnet_lab"
    else:
        encoder = encoder or load_checkpoint(args.checkpoint)["model"]["name"]
    if encoder not in known:
        raise ValueError(f"--encoder {encoder!r}: unknown; known encoders: {known}")
    defaults = BUILTIN_DEFAULTS if builtin else {**REAL_DEFAULTS, "crop": 227 if encoder.startswith("alexnet") else 224}
    epochs = args.epochs if args.epochs is not None else defaults["epochs"]
    settings = {
        "checkpoint": str(args.checkpoint),
        "encoder": encoder,
        "encoder_args": _parse_encoder_args(args.encoder_arg),
        "geometry": args.geometry,
        "layer": args.layer,
        "pool": args.pool,
        "input_mode": args.input_mode,
        "data": str(data_root.resolve()),
        "builtin": builtin,
        "dataset": args.dataset_name or (BUILTIN_DATASET if builtin else infer_dataset_name(data_root)),
        "crop": args.crop or defaults["crop"],
        "resize": args.resize if args.resize is not None else defaults["resize"],
        "epochs": epochs,
        "batch_size": args.batch_size or defaults["batch_size"],
        "lr": args.lr,
        "wd": args.wd if args.wd is not None else (1e-4 if "resnet" in encoder else 5e-4),
        "momentum": args.momentum,
        "nesterov": bool(args.nesterov),
        "lr_steps": _parse_steps(args.lr_steps, epochs) if epochs > 0 else [],
        "max_train_batches": args.max_train_batches,
        "limit": args.limit,
        "eval_every": args.eval_every,
        "seed": args.seed,
        "workers": args.workers if args.workers is not None else min(8, os.cpu_count() or 1),
        "device": args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
    }
    for key in ("epochs", "batch_size", "crop"):
        if settings[key] < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be at least 1, got {settings[key]}")
    if settings["batch_size"] < 2:
        raise ValueError("--batch-size must be at least 2 (the heads' BatchNorm needs two samples)")
    if settings["resize"] and settings["resize"] < settings["crop"]:
        raise ValueError(f"--resize {settings['resize']} is smaller than --crop {settings['crop']}")
    if args.momentum < 0 or args.lr <= 0 or settings["wd"] < 0:
        raise ValueError("--lr must be positive, --momentum and --wd non-negative")
    if settings["nesterov"] and args.momentum == 0:
        raise ValueError("--nesterov needs a positive --momentum")
    return settings


def build_encoder(settings: dict):
    """The frozen encoder in eval mode, in the transfer geometry when it has one."""
    encoder = load_encoder(
        settings["checkpoint"],
        encoder=settings["encoder"],
        seed=settings["seed"],
        **settings["encoder_args"],
    )
    geometry = settings["geometry"]
    if hasattr(encoder, "set_geometry"):
        encoder.set_geometry(geometry or "transfer")
        settings["geometry"] = encoder.geometry
    elif geometry is not None:
        raise ValueError(f"--geometry {geometry!r}: encoder {settings['encoder']!r} has no geometry option")
    return encoder.eval()


def resolve_taps(encoder, layer: str) -> list[str]:
    """--layer -> tap names (depth order); ValueError listing the encoder's taps for an unknown one."""
    names = list(encoder.probe_taps) if layer == "all" else [t.strip() for t in layer.split(",") if t.strip()]
    try:
        return encoder.resolve_taps(names)
    except ValueError as exc:
        raise ValueError(
            f"--layer {layer!r}: {exc} (probe taps: {list(encoder.probe_taps)}; 'all' probes those)"
        ) from exc


# ----------------------------------------------------------------------------------------------
# Probe state: the rolling checkpoint
# ----------------------------------------------------------------------------------------------

def _comparable(settings: dict) -> dict:
    return {key: settings[key] for key in RESUME_KEYS}


def load_probe_state(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises several types for a truncated or foreign file
        raise ValueError(f"cannot read probe checkpoint {path}: {exc}") from exc
    if not isinstance(state, dict) or state.get("kind") != BENCHMARK:
        raise ValueError(f"{path} is not a linear-probe checkpoint")
    return state


def check_resumable(state: dict, settings: dict, fingerprint: str, run_id: str | None, path: Path) -> None:
    """A resumed run must be the same run: same settings, same encoder tensors, same run id."""
    saved = state["config"]
    differ = {k: (saved.get(k), v) for k, v in _comparable(settings).items() if saved.get(k) != v}
    if differ:
        detail = "; ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in differ.items())
        raise ValueError(f"cannot resume {path}: settings differ ({detail}); use --fresh or another --out")
    if state["encoder_fingerprint"] != fingerprint:
        raise ValueError(f"cannot resume {path}: the encoder's weights differ from those it was trained on")
    if run_id is not None and run_id != state["run_id"]:
        raise ValueError(f"cannot resume {path}: it belongs to run {state['run_id']!r}, not --run-id {run_id!r}")


# ----------------------------------------------------------------------------------------------
# Side outputs: epoch log, plot
# ----------------------------------------------------------------------------------------------

def write_epoch_log(path: Path, log: list[dict]) -> None:
    if not log:
        return
    columns = list(dict.fromkeys(key for row in log for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(log)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(buffer.getvalue())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# The recipe
# ----------------------------------------------------------------------------------------------

def main(args: argparse.Namespace) -> dict:
    started = time.time()
    settings = resolve_settings(args)
    device = torch.device(settings["device"])

    # Everything that can be wrong with the inputs is checked before the first step.
    train_set, val_set, classes = open_splits(
        Path(settings["data"]), settings["crop"], settings["resize"], settings["seed"], settings["limit"]
    )
    encoder = build_encoder(settings)
    taps = resolve_taps(encoder, settings["layer"])
    settings["taps"] = taps
    if settings["batch_size"] > len(train_set):
        raise ValueError(f"--batch-size {settings['batch_size']} exceeds the {len(train_set)} training images")
    torch.manual_seed(settings["seed"])  # the heads' initialisation
    probe = MultiTapProbe(
        encoder, taps, len(classes), settings["crop"], pool=settings["pool"], input_mode=settings["input_mode"]
    ).to(device)
    settings["input_mode"] = probe.input_mode
    guard = FrozenEncoderGuard(probe.encoder)
    fingerprint = guard.fingerprint()

    out = Path(args.out or Path("runs") / BENCHMARK / _slug(
        f"{settings['encoder']}-{checkpoint_label(checkpoint_column(settings))}-{settings['pool']}-"
        f"{settings['dataset']}-seed{settings['seed']}"
    ))
    state_path = out / PROBE_CHECKPOINT
    resume_from = None
    if not args.fresh:
        if args.resume not in (None, False, True, "auto"):
            resume_from = Path(args.resume)
            if not resume_from.is_file():
                raise ValueError(f"--resume {resume_from}: no such probe checkpoint")
        elif state_path.is_file():
            resume_from = state_path

    optimizer = torch.optim.SGD(
        probe.heads.parameters(), lr=settings["lr"], momentum=settings["momentum"],
        weight_decay=settings["wd"], nesterov=settings["nesterov"],
    )
    batches_per_epoch = len(train_set) // settings["batch_size"]
    if settings["max_train_batches"]:
        batches_per_epoch = min(batches_per_epoch, settings["max_train_batches"])
    total_iters = batches_per_epoch * settings["epochs"]
    milestones = [round(step * batches_per_epoch) for step in settings["lr_steps"]]

    state = {
        "kind": BENCHMARK, "version": PROBE_STATE_VERSION, "config": _comparable(settings),
        "run_id": args.run_id or f"{out.name}-{time.strftime('%Y%m%d-%H%M%S')}",
        "encoder_fingerprint": fingerprint, "epoch": 0, "batch_in_epoch": 0, "global_iter": 0,
        "accum": None, "log": [], "final": None, "elapsed": 0.0,
    }
    if resume_from is not None:
        saved = load_probe_state(resume_from)
        check_resumable(saved, settings, fingerprint, args.run_id, resume_from)
        probe.heads.load_state_dict(saved["heads"])
        optimizer.load_state_dict(saved["optimizer"])
        state.update({k: saved[k] for k in state if k in saved and k != "config"})
        print(f"resuming {state['run_id']} from {resume_from}: epoch {state['epoch']}, "
              f"batch {state['batch_in_epoch']}, iteration {state['global_iter']}/{total_iters}")
    run_id = state["run_id"]

    def save_state() -> None:
        save_checkpoint(state_path, {**state, "heads": probe.heads.state_dict(), "optimizer": optimizer.state_dict(),
                                     "settings": settings})

    print(f"linear probe {run_id}: {settings['encoder']} ({settings['checkpoint']}), taps {taps}, pool "
          f"{settings['pool']}, {len(train_set)} train / {len(val_set)} val images, {len(classes)} classes, "
          f"{settings['epochs']} epochs x {batches_per_epoch} batches of {settings['batch_size']} on {device}")
    for tap, info in probe.describe().items():
        print(f"  {tap}: {info['channels']}x{info['map'][0]}x{info['map'][1]} -> {settings['pool']} "
              f"{info['grid'][0]}x{info['grid'][1]} = {info['feature_dim']} dims")

    loader_kw = dict(num_workers=settings["workers"], collate_fn=collate_skipping, pin_memory=device.type == "cuda")
    val_loader = DataLoader(val_set, batch_size=settings["batch_size"], shuffle=False, **loader_kw)
    log_path = Path(args.out_csv).with_name(f"{Path(args.out_csv).stem}_{_slug(run_id)}_epochs.csv")
    metrics = state["final"]
    last_save = time.monotonic()
    segment_start = time.monotonic()

    while state["final"] is None and state["epoch"] < settings["epochs"]:
        epoch = state["epoch"]
        if state["accum"] is None:
            state["accum"] = {"seen": 0, "skipped": 0, "loss": {t: 0.0 for t in taps}, "correct": {t: 0 for t in taps}}
        accum = state["accum"]
        train_set.set_epoch(epoch)
        sampler = EpochSampler(len(train_set), settings["seed"], epoch, start=state["batch_in_epoch"] * settings["batch_size"])
        loader = DataLoader(train_set, batch_size=settings["batch_size"], sampler=sampler, drop_last=True, **loader_kw)
        remaining = batches_per_epoch - state["batch_in_epoch"]
        probe.train()
        progress = tqdm(total=remaining, desc=f"epoch {epoch + 1}/{settings['epochs']}", unit="batch", leave=False,
                        mininterval=0.1 if sys.stderr.isatty() else 30.0)  # keep batch logs (SLURM) short
        for batch in loader:
            if state["batch_in_epoch"] >= batches_per_epoch:
                break
            # lr x0.1 at each milestone passed (per iteration, so resumption needs no scheduler state).
            lr = settings["lr"] * 0.1 ** sum(state["global_iter"] >= m for m in milestones)
            for group in optimizer.param_groups:
                group["lr"] = lr
            accum["skipped"] += len(batch.skipped)
            if batch.labels.numel() >= 2:  # a batch emptied by undecodable files is skipped, not fatal
                labels = batch.labels.to(device, non_blocking=True)
                stats = probe.training_step(batch.images.to(device, non_blocking=True), labels, optimizer)
                n = labels.numel()
                accum["seen"] += n
                for tap in taps:
                    accum["loss"][tap] += stats[tap]["loss"] * n
                    accum["correct"][tap] += stats[tap]["correct"]
            state["batch_in_epoch"] += 1
            state["global_iter"] += 1
            progress.update(1)
            progress.set_postfix(lr=f"{lr:.2g}", loss=f"{sum(accum['loss'].values()) / max(1, accum['seen']):.3f}")
            due_time = time.monotonic() - last_save > 60 * args.save_every_minutes
            due_iter = args.save_every_iters and state["global_iter"] % args.save_every_iters == 0
            if due_time or due_iter:
                state["elapsed"] += time.monotonic() - segment_start
                segment_start = time.monotonic()
                save_state()
                last_save = time.monotonic()
        progress.close()

        guard.check()  # fail early: a changed encoder voids everything after it
        last = epoch + 1 == settings["epochs"]
        row = {"epoch": epoch + 1, "iterations": state["global_iter"], "lr": lr_at(settings, milestones, state)}
        seen = max(1, accum["seen"])
        for tap in taps:
            row[f"train_loss_{tap}"] = round(accum["loss"][tap] / seen, 5)
            row[f"train_top1_{tap}"] = round(100.0 * accum["correct"][tap] / seen, 3)
        row["skipped_files"] = accum["skipped"]
        if last or (settings["eval_every"] and (epoch + 1) % settings["eval_every"] == 0):
            metrics = evaluate(probe, val_loader, device, progress=True)
            for tap in taps:
                row[f"val_top1_{tap}"] = round(metrics[tap]["top1"], 3)
                row[f"val_top5_{tap}"] = round(metrics[tap]["top5"], 3)
        state["elapsed"] += time.monotonic() - segment_start
        segment_start = time.monotonic()
        row["elapsed_s"] = round(state["elapsed"], 1)
        state["log"].append(row)
        print(" ".join(f"{k}={v}" for k, v in row.items() if not k.startswith("train_loss")))
        state.update(epoch=epoch + 1, batch_in_epoch=0, accum=None)
        if last:
            state["final"] = metrics
        save_state()
        write_epoch_log(log_path, state["log"])
        last_save = time.monotonic()

    metrics = state["final"]
    guard.check()
    rows = make_rows(settings, probe, metrics, run_id, total_iters, len(train_set), len(val_set), len(classes))
    out_csv = Path(args.out_csv)
    existing = results.read_rows(out_csv)
    if len(existing) and (existing["run_id"] == run_id).any():
        print(f"run {run_id} already has its rows in {out_csv}; not appending them again")
    else:
        results.append_rows(out_csv, rows)
    write_epoch_log(log_path, state["log"])

    table_rows = results.read_rows(out_csv)
    tables = results.paper_tables(table_rows, results.load_published(), benchmark=BENCHMARK,
                                  dataset=settings["dataset"], reference=False)
    for title, table in tables:
        print("\n" + results.format_table(table, title))
    png = None
    if not args.no_plot:
        # Every run of ours on this dataset (and the published rows, when the dataset has some).
        png = out_csv.with_name(f"{out_csv.stem}_{_slug(settings['dataset'])}_top1.png")
        table = results.paper_table(table_rows, results.load_published(), benchmark=BENCHMARK,
                                    dataset=settings["dataset"], metric="top1")
        results.plot_accuracy_vs_layer(table, png, title=f"linear probes on {settings['dataset']}: top-1 against layer")
    print(f"\n{len(rows)} rows -> {out_csv}; epoch log -> {log_path}" + (f"; plot -> {png}" if png else "")
          + f"; {time.time() - started:.1f} s")
    return {"run_id": run_id, "metrics": metrics, "rows": rows, "csv": out_csv, "log": log_path, "png": png,
            "out": out, "settings": settings, "probe": probe}


def lr_at(settings: dict, milestones: list[int], state: dict) -> float:
    """The lr of the last iteration run (for the epoch log)."""
    done = max(0, state["global_iter"] - 1)
    return settings["lr"] * 0.1 ** sum(done >= m for m in milestones)


def make_rows(settings, probe, metrics, run_id, total_iters, n_train, n_val, n_classes) -> list:
    """One row per (tap, metric); the hyper-parameters (and the tap's pooling) go into ``hparams``."""
    checkpoint = checkpoint_column(settings)
    common = {
        key: settings[key]
        for key in ("epochs", "batch_size", "lr", "wd", "momentum", "nesterov", "lr_steps", "crop", "resize",
                    "geometry", "input_mode", "encoder_args", "data", "max_train_batches", "limit")
    }
    common.update(iterations=total_iters, n_train=n_train, n_val=n_val, num_classes=n_classes)
    rows = []
    for tap, info in probe.describe().items():
        for metric in ("top1", "top5"):
            rows.append(results.make_row(
                run_id=run_id, benchmark=BENCHMARK, checkpoint=checkpoint, encoder=settings["encoder"], tap=tap,
                dataset=settings["dataset"], split="val", protocol=f"linear-{settings['pool']}", metric=metric,
                value=round(float(metrics[tap][metric]), 4), seed=settings["seed"],
                hparams={**common, **info, "n_eval": metrics[tap]["n"]},
            ))
    return rows


if __name__ == "__main__":
    main(get_args_parser().parse_args())
