"""Frozen-layer linear probes on conv1..conv5 (docs/protocols.md section 4), all taps in one pass.

    python -m ssl_colorize.benchmarks.linear_probe --checkpoint runs/pretrain/RUN --layer all
    python -m ssl_colorize.benchmarks.linear_probe --checkpoint random:alexnet_lab --layer all
    python -m ssl_colorize.benchmarks.linear_probe --checkpoint CKPT --layer conv4 --data /datasets/imagenet

The recipe: load the encoder (a pretraining checkpoint or run folder, or ``random:ENCODER``: a seeded
initialisation of the same architecture), freeze it, put one linear head per requested tap (pool to
about 9k dims by the --protocol -> per-channel BatchNorm without affine -> Linear; weights lr x1,
biases lr x2 without decay, as the released probe), train every head from one frozen forward pass
per batch with SGD on the sum of their losses, then score the single centre crop (top-1, top-5). The
encoder is checked bit for bit after training; a changed tensor fails the run (ssl_colorize.heads.probe).

Every number becomes one row of ``--out-csv`` (ssl_colorize.results); a plot of accuracy against layer
is written beside it. The run folder (``--out``, default ``runs/linear_probe/<run id>``) holds the
configuration, ``log.jsonl``, ``summary.json`` and a rolling ``checkpoint.pth``: ``--resume`` continues
a killed run exactly where it stopped (ssl_colorize.engine.run).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from ssl_colorize.data import collate_skipping, ensure_builtin_imagefolder
from ssl_colorize.engine.cli import (
    ArgumentParser, check_device, check_non_negative, check_output_file, check_positive, check_tensorboard,
    fail, run_cli,
)
from ssl_colorize.engine.probe_report import (
    append_once, make_rows, plot_dataset, plot_path, print_tables, write_summary,
)
from ssl_colorize.engine.probe_settings import (
    BENCHMARK, BUILTIN_DEFAULTS, DEFAULT_RANDOM_ENCODER, INPUT_CHOICES, PROTOCOL_EPOCHS, build_encoder, open_splits,
    resolve_settings,
)
from ssl_colorize.engine.probe_train import ProbeTraining, format_lr
from ssl_colorize.engine.run import RunFolder, add_run_args, check_run_folder
from ssl_colorize.heads.probe import MultiTapProbe
from ssl_colorize.heads.probe_pool import LEGACY_POOL, PROTOCOLS

#: The old --input-mode spelling (still accepted, hidden) -> --input.
DEPRECATED_INPUT_MODES = {"auto": "auto", "rgb": "rgb", "grey": "grey-rgb"}


def get_args_parser(add_help: bool = True) -> ArgumentParser:
    parser = ArgumentParser(prog="linear_probe", add_help=add_help,
                            description="Linear probes on frozen encoder taps (docs/protocols.md section 4)")
    what = parser.add_argument_group("what to probe")
    what.add_argument("--checkpoint", required=True,
                      help="a pretraining checkpoint file, a run folder (its checkpoint.pth), or random:ENCODER")
    what.add_argument("--encoder", default=None,
                      help=f"encoder name: for plain 'random' (default {DEFAULT_RANDOM_ENCODER}); checked against a "
                           "checkpoint")
    what.add_argument("--encoder-arg", action="append", default=[], metavar="KEY=VALUE",
                      help="extra model argument (JSON value or string), e.g. weights_path=/models/alexnet.pth "
                           "for alexnet_rgb_torchvision; repeatable")
    what.add_argument("--geometry", default=None,
                      help="encoder geometry for encoders that have one (alexnet_lab): default 'transfer', "
                           "the CaffeNet geometry the protocol probes (docs/protocols.md section 3)")
    what.add_argument("--layer", default="all", help="a tap, a comma list of taps, or 'all' (the encoder's probe taps)")
    what.add_argument("--protocol", default=None, choices=PROTOCOLS,
                      help="the published probe to follow (docs/linear-probes.md): zhang = the released probe "
                           "(Caffe Resize to fixed grids), goyal = fixed-kernel average pooling, max = max pooling; "
                           "each then per-channel BatchNorm and Linear (default: the encoder card's, zhang for "
                           "AlexNets, goyal for ResNet-50)")
    # The old name: bilinear -> zhang, avg -> goyal, max -> max.
    what.add_argument("--pool", default=None, choices=tuple(LEGACY_POOL), help=argparse.SUPPRESS)
    what.add_argument("--input", default=None, choices=INPUT_CHOICES,
                      help="encoder input: auto follows the encoder (L for L encoders, RGB for RGB encoders); "
                           "grey-rgb shows an RGB encoder the L channel as neutral grey RGB (default auto)")
    what.add_argument("--input-mode", default=None, choices=tuple(DEPRECATED_INPUT_MODES), help=argparse.SUPPRESS)

    data = parser.add_argument_group("data")
    data.add_argument("--data", default=None,
                      help="folder with ImageFolder train/ and val/ (ImageNet, Places205); default: built-in shapes")
    data.add_argument("--dataset-name", default=None,
                      help="name in the 'dataset' column (default: inferred from --data, e.g. imagenet)")
    data.add_argument("--crop", type=int, default=None,
                      help=f"crop side (default: the encoder card's, 227 AlexNets, 224 others; "
                           f"{BUILTIN_DEFAULTS['crop']} built-in)")
    data.add_argument("--resize", type=int, default=None,
                      help=f"shorter side before cropping (default 256; {BUILTIN_DEFAULTS['resize']} built-in; "
                           "0: no resize)")
    data.add_argument("--workers", type=int, default=None, help="data loading processes (default: min(8, CPUs))")
    data.add_argument("--limit", type=int, default=None, help="use only the first N images of each split (quick runs)")

    sched = parser.add_argument_group("schedule (defaults: the protocol's)")
    sched.add_argument("--epochs", type=int, default=None,
                       help=f"default {PROTOCOL_EPOCHS} (built-in data: {BUILTIN_DEFAULTS['epochs']}); 0 scores "
                            "the untrained heads")
    sched.add_argument("--batch-size", type=int, default=None,
                       help=f"default 256 (built-in data: {BUILTIN_DEFAULTS['batch_size']})")
    sched.add_argument("--lr", type=float, default=0.01, help="SGD learning rate")
    sched.add_argument("--wd", type=float, default=None, help="weight decay (default: the encoder card's)")
    sched.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    sched.add_argument("--nesterov", action="store_true", help="Nesterov momentum (Goyal et al.)")
    sched.add_argument("--lr-steps", default=None,
                       help="comma list of epochs (may be fractional) where lr is multiplied by 0.1; default at "
                            "40k/80k/120k of 140k iterations, i.e. 2/7, 4/7, 6/7 of the run")
    sched.add_argument("--max-train-batches", type=int, default=None, help="cap on training batches per epoch")
    sched.add_argument("--eval-every", type=int, default=1, help="evaluate every N epochs (and always at the end)")
    sched.add_argument("--seed", type=int, default=0, help="seed of a random encoder, the heads, crops and order")
    sched.add_argument("--device", default=None, help="default: cuda when available, else cpu")

    add_run_args(parser, BENCHMARK)
    parser.add_argument("--fresh", dest="overwrite", action="store_true", help=argparse.SUPPRESS)  # old name
    out = parser.add_argument_group("outputs")
    out.add_argument("--out-csv", default="results/linear_probe.csv", help="results table rows are appended to")
    out.add_argument("--save-every-minutes", type=float, default=10.0, help="rolling checkpoint period within an epoch")
    out.add_argument("--save-every-iters", type=int, default=0, help="also save every N iterations (0: off)")
    out.add_argument("--log-every", type=int, default=20, help="a log.jsonl record every N iterations (0: epochs only)")
    out.add_argument("--tensorboard", action="store_true", help="also log to <run folder>/tensorboard")
    out.add_argument("--no-plot", action="store_true", help="skip the accuracy-vs-layer PNG")
    return parser


def _merge_input_alias(args: argparse.Namespace) -> None:
    """--input-mode (deprecated) -> --input; the two may not disagree."""
    if args.input_mode is not None:
        alias = DEPRECATED_INPUT_MODES[args.input_mode]
        if args.input not in (None, alias):
            raise fail("--input-mode", args.input_mode, f"contradicts --input {args.input} (the option's old name)")
        args.input = alias
    args.input = args.input or "auto"
    args.input_mode = None


def validate(args: argparse.Namespace) -> None:
    """Every check that can be made before the model is built or the data read; creates nothing."""
    _merge_input_alias(args)
    check_positive("--crop", args.crop)
    check_non_negative("--resize", args.resize)
    check_positive("--lr", args.lr)
    check_non_negative("--epochs", args.epochs)
    check_positive("--batch-size", args.batch_size)
    if args.batch_size == 1:
        raise fail("--batch-size", 1, "must be at least 2 (the heads' BatchNorm needs two samples)")
    check_non_negative("--wd", args.wd)
    check_non_negative("--momentum", args.momentum)
    if args.nesterov and args.momentum == 0:
        raise fail("--momentum", args.momentum, "--nesterov needs a positive momentum")
    check_non_negative("--workers", args.workers)
    check_positive("--limit", args.limit)
    check_positive("--max-train-batches", args.max_train_batches)
    check_non_negative("--eval-every", args.eval_every)
    check_positive("--save-every-minutes", args.save_every_minutes)
    check_non_negative("--save-every-iters", args.save_every_iters)
    check_non_negative("--log-every", args.log_every)
    if args.tensorboard:
        check_tensorboard()
    check_device("--device", args.device)
    settings = resolve_settings(args)  # checkpoint, encoder, --layer, --input, --geometry, --data, --lr-steps
    check_output_file("--out-csv", args.out_csv)
    if not args.no_plot:
        check_output_file("--out-csv", plot_path(Path(args.out_csv), settings["dataset"]))
    check_run_folder(args.out, resume=args.resume, overwrite=args.overwrite)


def main(args: argparse.Namespace) -> dict:
    started = time.time()
    _merge_input_alias(args)
    settings = resolve_settings(args)
    device = torch.device(settings["device"])
    if settings["builtin"]:
        ensure_builtin_imagefolder()
    train_set, val_set, classes = open_splits(
        Path(settings["data"]), settings["crop"], settings["resize"], settings["seed"], settings["limit"]
    )
    if settings["batch_size"] > len(train_set):
        raise fail("--batch-size", settings["batch_size"], f"exceeds the {len(train_set)} training images")

    run = RunFolder.open(args.out, job=BENCHMARK, resume=args.resume, overwrite=args.overwrite, run_id=args.run_id)
    encoder = build_encoder(settings)
    torch.manual_seed(settings["seed"])  # the heads' initialisation
    probe = MultiTapProbe(
        encoder, settings["taps"], len(classes), settings["crop"], protocol=settings["protocol"],
        input_mode=settings["input_mode"],
    ).to(device)
    settings["input_mode"] = probe.input_mode
    training = ProbeTraining(
        probe, settings, run, train_set, val_set, save_every_minutes=args.save_every_minutes,
        save_every_iters=args.save_every_iters, log_every=args.log_every, tensorboard=args.tensorboard,
        run_id_given=args.run_id,
    )
    run_id = run.run_id
    run.write_config({**settings, "run_id": run_id, "out_csv": str(args.out_csv)})
    print(f"linear probe {run_id}: {settings['encoder']} ({settings['checkpoint']}), taps {settings['taps']}, "
          f"protocol {settings['protocol']}, {len(train_set)} train / {len(val_set)} val images, {len(classes)} classes, "
          f"{settings['epochs']} epochs x {training.batches_per_epoch} batches of {settings['batch_size']}, "
          f"lr {format_lr(settings['lr'])}, wd {format_lr(settings['wd'])} on {device}; run folder {run.path}")
    for tap, info in probe.describe().items():
        print(f"  {tap}: {info['channels']}x{info['map'][0]}x{info['map'][1]} -> {settings['protocol']} "
              f"{info['grid'][0]}x{info['grid'][1]}{pool_geometry(info)} = {info['feature_dim']} dims")

    loader_kw = dict(num_workers=settings["workers"], collate_fn=collate_skipping, pin_memory=device.type == "cuda")
    metrics = training.fit(loader_kw)

    rows = make_rows(settings, probe, metrics, run_id, training.total_iters, len(train_set), len(val_set), len(classes))
    out_csv = Path(args.out_csv)
    append_once(out_csv, rows, run_id)
    table_rows = print_tables(out_csv, settings["dataset"], settings["taps"])
    png = None if args.no_plot else plot_dataset(table_rows, out_csv, settings["dataset"], settings["protocol"])
    skipped = training.state["skipped"]
    summary = write_summary(run.path / "summary.json", run_id=run_id, settings=settings, metrics=metrics,
                            skipped=skipped, out_csv=out_csv, png=png, elapsed=training.state["elapsed"])
    if skipped:
        print(f"{len(skipped)} unreadable file(s) skipped, all named in {summary}", file=sys.stderr)
    print(f"\n{len(rows)} rows -> {out_csv}; run folder {run.path}" + (f"; plot -> {png}" if png else "")
          + f"; {time.time() - started:.1f} s")
    return {"run_id": run_id, "metrics": metrics, "rows": rows, "csv": out_csv, "log": run.log_path, "png": png,
            "out": run.path, "summary": summary, "settings": settings, "probe": probe}


def pool_geometry(info: dict) -> str:
    """" (k19 s4 p0)" for an average pooling, "" otherwise."""
    if "kernel" not in info:
        return ""
    return f" (k{info['kernel'][0]} s{info['stride'][0]} p{info['padding'][0]})"


def cli(argv=None):
    return run_cli(get_args_parser(), main, argv, validate=validate)


if __name__ == "__main__":
    cli()
