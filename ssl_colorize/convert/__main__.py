"""``python -m ssl_colorize.convert --format FORMAT SRC --out DEST.pth``: a released model -> our checkpoint.

Reads SRC, maps every weight onto our encoder (checking each shape), and only then writes DEST: a file
that does not fit (a wrong shape, a missing layer, a truncated or foreign file) stops with one line
naming the layer and the shapes, exit 2, and nothing is written.
"""

from __future__ import annotations

import sys

from ssl_colorize.convert import FORMATS, converter
from ssl_colorize.convert.common import write_converted
from ssl_colorize.engine.cli import (
    ArgumentParser, check_choice, check_input_file, check_output_file, fail, run_cli)


def get_args_parser(add_help: bool = True) -> ArgumentParser:
    p = ArgumentParser(prog="python -m ssl_colorize.convert", add_help=add_help,
                       description=__doc__.split("\n\n")[0] + "\n\nFormats and where to get each file: "
                       "docs/released-models.md.")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="eccv16 (colorizers' PyTorch port), caffe (.caffemodel), vissl (VISSL trunk)")
    p.add_argument("src", help="the released file")
    p.add_argument("--out", required=True, help="the checkpoint to write (e.g. converted/colornet_eccv16.pth)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return p


def validate(args) -> None:
    check_choice("--format", args.format, FORMATS)
    check_input_file("SRC", args.src)
    out = check_output_file("--out", args.out)
    if out.exists() and not args.overwrite:
        raise fail("--out", args.out, "exists; pass --overwrite to replace it")


def main(args) -> None:
    model, filler, notes = converter(args.format)(args.src)
    path = write_converted(args.out, model, filler, args.src, args.format, notes)
    name = model.model_spec["name"]
    print(f"wrote {path}: {name} {model.model_spec['kwargs']} from {args.format} file {args.src}", file=sys.stderr)
    for note in notes:
        print(f"  {note}", file=sys.stderr)


def cli(argv=None):
    return run_cli(get_args_parser(), main, argv, validate=validate)


if __name__ == "__main__":
    cli()
