"""Colorize images with a pretrained model: ``python -m ssl_colorize.colorize IMAGE... --checkpoint CKPT``.

Each output PNG has the input's size and its own L channel: the network predicts ab at low resolution
from the input's L, the ab is upsampled to the full image and combined with the original L
(docs/protocols.md section 2, "Test time").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from ssl_colorize.checkpoint import ROLLING_NAME, load_encoder
from ssl_colorize.color import fit_ab_to_gamut, rgb_to_lab
from ssl_colorize.data import read_image
from ssl_colorize.inference import ab_to_rgb, predict_ab
from ssl_colorize.engine.cli import (
    ArgumentParser, UsageError, check_choice, check_input_file, check_input_path, check_number, check_output_dir,
    check_positive, fail, run_cli,
)
from ssl_colorize.training.pretext import resolve_device
from ssl_colorize.targets import DEFAULT_TEMPERATURE

#: Exit status when no image could be colorized (every input unreadable): not a usage error.
EXIT_NOTHING_WRITTEN = 1


def get_args_parser(add_help: bool = True) -> ArgumentParser:
    p = ArgumentParser("ssl_colorize.colorize", description=__doc__.split("\n\n")[0], add_help=add_help)
    p.add_argument("images", nargs="+", help="image files (colour or greyscale)")
    p.add_argument("--checkpoint", required=True,
                   help="a pretraining checkpoint (checkpoint.pth, a snapshot, or a run folder)")
    p.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE,
                   help="annealed-mean temperature: 1 = mean, towards 0 = mode (paper: 0.38)")
    p.add_argument("--out", default="colorized", help="output folder (in the current folder)")
    p.add_argument("--net-size", type=int, default=None,
                   help="resize L to this square size for the network (the paper used 224 or 256; default: the full image)")
    p.add_argument("--gamut", choices=["chroma", "clip"], default="chroma",
                   help="out-of-gamut colours: reduce their chroma (keeps the input's L exactly) or clip RGB "
                        "to [0, 1] as the paper did (can change L)")
    p.add_argument("--device", default="auto")
    return p


def colorize_file(model, path: Path, temperature: float, net_size: int | None, device: torch.device,
                  gamut: str = "chroma") -> np.ndarray:
    """One image file -> uint8 HxWx3 colorization at the file's full resolution, with its own L."""
    rgb = read_image(path).float()[None] / 255.0
    L = rgb_to_lab(rgb)[:, :1].to(device)
    full_size = tuple(L.shape[-2:])
    net_L = L if net_size is None else F.interpolate(L, size=(net_size, net_size), mode="bilinear", align_corners=False)
    ab = predict_ab(model, net_L, temperature=temperature)
    if tuple(ab.shape[-2:]) != full_size:
        ab = F.interpolate(ab, size=full_size, mode="bilinear", align_corners=False)
    if gamut == "chroma":
        ab = fit_ab_to_gamut(L, ab)
    out = ab_to_rgb(L, ab)[0]
    return (out.permute(1, 2, 0).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)


def checkpoint_file(path: str) -> Path:
    """--checkpoint: a file, or a run folder holding the rolling checkpoint (UsageError otherwise)."""
    checked = check_input_path("--checkpoint", path)
    if not checked.is_dir():
        return checked
    if not (checked / ROLLING_NAME).exists():
        raise fail("--checkpoint", path, f"the folder holds no {ROLLING_NAME}")
    return check_input_file("--checkpoint", checked / ROLLING_NAME)


def validate(args: argparse.Namespace) -> None:
    """Options, the inputs and the output folder, before the model is loaded; creates nothing."""
    check_positive("--temperature", args.temperature)
    check_number("--net-size", args.net_size, minimum=16)
    check_choice("--gamut", args.gamut, ("chroma", "clip"))
    missing = [p for p in args.images if not Path(p).is_file()]
    if missing:
        raise UsageError(f"image file(s) not found: {', '.join(missing)}")
    checkpoint_file(args.checkpoint)
    check_output_dir("--out", args.out)
    resolve_device(args.device)


def main(args: argparse.Namespace) -> list[Path]:
    device = resolve_device(args.device)
    try:
        model = load_encoder(checkpoint_file(args.checkpoint)).to(device)
    except ValueError as exc:  # a file that is not one of our checkpoints (the message names it)
        raise fail("--checkpoint", args.checkpoint, str(exc)) from None
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    written, failed = [], []
    for name in tqdm(args.images, desc="colorize", unit="img", disable=len(args.images) < 2):
        path = Path(name)
        try:
            array = colorize_file(model, path, args.temperature, args.net_size, device, args.gamut)
        except (RuntimeError, ValueError) as exc:
            failed.append(f"{path}: {exc}")
            continue
        target = out_dir / f"{path.stem}_colorized.png"
        tmp = target.with_name(f".{target.name}.tmp")
        Image.fromarray(array).save(tmp, format="PNG")
        tmp.replace(target)
        written.append(target)
    for line in failed:
        print(f"colorize: skipped {line}", file=sys.stderr)
    if not written:
        print(f"colorize: error: none of the {len(args.images)} image(s) could be colorized", file=sys.stderr)
        raise SystemExit(EXIT_NOTHING_WRITTEN)
    print(f"colorize: wrote {len(written)} image(s) to {out_dir}" + (f", skipped {len(failed)}" if failed else ""))
    return written


def cli(argv: list[str] | None = None) -> list[Path]:
    return run_cli(get_args_parser(), main, argv, validate=validate)


if __name__ == "__main__":
    cli()
