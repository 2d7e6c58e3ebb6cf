"""Throughput: our fast paths against the way the released code did it, measured side by side in one run.

    python -m ssl_colorize.benchmarks.throughput --quick             # a 2-core CPU, a few minutes
    python -m ssl_colorize.benchmarks.throughput --device cuda       # the paper's sizes on a GPU

Sections (``--sections``, default all three), one module each in :mod:`ssl_colorize.throughput`:

* ``loss`` (issue 2): soft encoding + class-rebalanced cross-entropy, forward and backward, on a
  paper-sized batch (40 x 313 x 56 x 56 logits), against the released code's Python layers
  (:mod:`ssl_colorize.reference`, docs/protocols.md section 2); time per step and the peak memory
  beyond the logits and their gradient.
* ``pretrain`` (issues 7 and 14): per encoder with a colour head, at the card's pretraining sizes (or
  reduced ones with ``--quick``), the trainer's own loop (``ssl_colorize.pretrain.main`` on a JPEG list,
  once per ``--trainer-variants`` configuration, and on an ImageFolder across epoch boundaries, its rate
  read from ``log.jsonl`` after the warm-up) beside the compute-only bound (a synthetic batch on the
  device), the model's FLOPs per image and their share of the machine's measured matrix rate, the data
  path alone and one worker's costs, against the same step fed by the released code's data path (PIL,
  scikit-image, scikit-learn, dense target).
* ``probe`` (issue 4): the linear probe's step, five taps read in one frozen pass against five
  single-tap runs, with the data read from JPEG files and on a synthetic batch.

Every measurement runs in a fresh process (its peak host memory is its own). Each is printed and
appended to ``--out-csv`` (default ``results/throughput.csv`` under the current folder); the run ends
with one line per comparison::

    NAME: ratio R.Rx (ours ..., reference ...) [target ...: met / not met]
"""

from __future__ import annotations

import time
from pathlib import Path

from ssl_colorize.data.fast_path import default_workers
from ssl_colorize.engine.cli import (
    ArgumentParser, UsageError, check_non_negative, check_number, check_output_dir, check_output_file,
    check_positive, fail, run_cli,
)
from ssl_colorize.throughput import loss, measure, pretrain, probe, trainer
from ssl_colorize.training.pretext import COMPILE_MODES
from ssl_colorize.throughput.report import Report, append_csv, is_throughput_table

SECTIONS = {"loss": loss.run_section, "pretrain": pretrain.run_section, "probe": probe.run_section}
#: torch.compile modes (the trainer's --compile takes the same).
MIN_CROP = 32  # the encoders' smallest input (ssl_colorize.pretrain refuses smaller crops)


def _pretrainable() -> list[str]:
    from ssl_colorize.models.cards import pretrainable_models

    return pretrainable_models()


def _card(name: str, option: str, value: str):
    """The encoder card of ``name``; an unknown name is the user's mistake in ``option``."""
    from ssl_colorize.models import get_card

    try:
        return get_card(name)
    except ValueError as exc:
        raise fail(option, value, str(exc)) from None


def get_args_parser(add_help: bool = True) -> ArgumentParser:
    p = ArgumentParser("throughput", description=__doc__.split("\n\n")[0], add_help=add_help)
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma list of sections: " + ", ".join(SECTIONS))
    p.add_argument("--quick", action="store_true",
                   help="reduced sizes, batches and steps (a 2-core CPU run in a few minutes)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads in each measurement (0: torch's default)")
    p.add_argument("--encoders", default=None,
                   help="comma list of encoders of the pretrain section (default: every encoder with a colour head)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per measurement (default: 20, loss 10; --quick 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 5, loss 3; --quick 1)")
    p.add_argument("--loss-batch", type=int, default=40, help="loss section: images (the paper's 40)")
    p.add_argument("--loss-size", type=int, default=56, help="loss section: loss-grid side (the paper's 56)")
    p.add_argument("--crop", type=int, default=None, help="pretrain section: override every encoder's crop")
    p.add_argument("--batch-size", type=int, default=None, help="pretrain section: override every encoder's batch")
    p.add_argument("--workers", type=int, default=None,
                   help="data-loading processes (default: the cores this process may use, less one, at most 8)")
    p.add_argument("--jpeg-dir", default=None,
                   help="folder of JPEGs for the real data path, written when empty "
                        "(default: a temporary folder written from the built-in photographs)")
    p.add_argument("--jpeg-size", type=int, default=256, help="shorter side of the written JPEGs (the paper's 256)")
    p.add_argument("--jpeg-count", type=int, default=None,
                   help=f"JPEGs to write (default: {pretrain.FOLDER_JPEGS}, the ImageFolder of the epoch-boundary "
                        "measurement; --quick: enough for one pass, at most 1024)")
    p.add_argument("--compile", default=None, choices=COMPILE_MODES,
                   help="pretrain section: torch.compile the model in every variant with this mode (the trainer's --compile)")
    p.add_argument("--trainer-variants", default=trainer.DEFAULT_VARIANT,
                   help="pretrain section: ';'-separated trainer configurations, each measured as its own row: "
                        "'default' (the trainer's defaults) or extra ssl_colorize.pretrain options, e.g. "
                        "\"default;--compile reduce-overhead;--workers 15\"")
    p.add_argument("--skip", default="",
                   help="pretrain section: comma list of optional rows to leave out: "
                        + ", ".join(pretrain.OPTIONAL_ROWS) + " (e.g. to fit a GPU check into its minutes)")
    p.add_argument("--target-images-per-s", type=float, default=None,
                   help="pretrain section: a rate the trainer should reach, printed as met / not met (issue 7: "
                        "5000 for alexnet_lab at 180 px on an H100-class GPU)")
    p.add_argument("--probe-encoder", default="alexnet_lab", help="probe section: encoder (in its transfer geometry)")
    p.add_argument("--probe-batch", type=int, default=None, help="probe section: batch (default 256, --quick 96)")
    p.add_argument("--probe-crop", type=int, default=227, help="probe section: crop (the protocol's 227)")
    p.add_argument("--probe-classes", type=int, default=1000, help="probe section: classes (ImageNet's 1000)")
    p.add_argument("--out-csv", default=str(Path("results") / "throughput.csv"),
                   help="append rows to this table ('': don't)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def validate(args) -> None:
    """Every check that can be made before a measurement starts; creates nothing."""
    sections = measure.comma_list(args.sections)
    if not sections:
        raise fail("--sections", repr(args.sections), f"name at least one of {', '.join(SECTIONS)}")
    for section in sections:
        if section not in SECTIONS:
            raise fail("--sections", args.sections, f"unknown section {section!r}; choose from {', '.join(SECTIONS)}")
    for option in ("steps", "loss_batch", "loss_size", "batch_size", "jpeg_size", "jpeg_count", "probe_classes",
                   "target_images_per_s"):
        check_positive("--" + option.replace("_", "-"), getattr(args, option))
    for option in ("warmup", "threads", "workers"):
        check_non_negative("--" + option.replace("_", "-"), getattr(args, option))
    check_number("--crop", args.crop, minimum=MIN_CROP)
    check_number("--probe-crop", args.probe_crop, minimum=MIN_CROP)
    check_number("--probe-batch", args.probe_batch, minimum=2)  # the heads' BatchNorm needs two samples
    try:
        measure.resolve_device(args.device)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if "pretrain" in sections:
        encoders = measure.comma_list(args.encoders) if args.encoders is not None else _pretrainable()
        if not encoders:
            raise fail("--encoders", repr(args.encoders), "name at least one encoder")
        for encoder in encoders:
            recipe = _card(encoder, "--encoders", args.encoders).pretrain
            if recipe is None:
                raise fail("--encoders", args.encoders, f"{encoder} has no colour head (no pretraining recipe); "
                                                        f"choose from {', '.join(_pretrainable())}")
        unknown = [row for row in measure.comma_list(args.skip) if row not in pretrain.OPTIONAL_ROWS]
        if unknown:
            raise fail("--skip", args.skip, f"unknown row {unknown[0]!r}; choose from {', '.join(pretrain.OPTIONAL_ROWS)}")
        try:
            trainer.parse_variants(args.trainer_variants)
        except ValueError as exc:
            raise fail("--trainer-variants", repr(args.trainer_variants), str(exc)) from None
    if "probe" in sections:
        _card(args.probe_encoder, "--probe-encoder", args.probe_encoder)
    if args.jpeg_dir is not None and ("pretrain" in sections or "probe" in sections):
        check_output_dir("--jpeg-dir", args.jpeg_dir)  # written when it holds no JPEG
    if args.out_csv:
        check_output_file("--out-csv", args.out_csv)
        if not is_throughput_table(args.out_csv):
            raise fail("--out-csv", args.out_csv, "is not a throughput table (unexpected header); choose another file")


def main(args) -> dict:
    if args.out_csv:
        Path(args.out_csv).parent.mkdir(parents=True, exist_ok=True)
    device = measure.resolve_device(args.device)
    workers = args.workers if args.workers is not None else default_workers()
    common = {"device": str(device), "threads": args.threads, "workers": workers}
    report = Report(device, args.threads)
    print(f"throughput: {report.base['device']}, torch {report.base['torch']}, torchvision {report.base['torchvision']}, "
          f"code {report.base['code_version']}, {report.threads} threads, {workers} workers"
          + (", --quick" if args.quick else ""), flush=True)
    started = time.perf_counter()
    for section in measure.comma_list(args.sections):
        SECTIONS[section](args, device, common, report)
    if args.out_csv:
        append_csv(args.out_csv, report.rows)
        print(f"throughput: {len(report.rows)} rows appended to {args.out_csv}")
    print(f"throughput: done in {time.perf_counter() - started:.0f} s")
    report.print_end()
    return {"rows": report.rows, "verdicts": report.verdicts, "notes": report.notes}


def cli(argv=None):
    return run_cli(get_args_parser(), main, argv, validate=validate)


if __name__ == "__main__":
    cli()
