"""A tiny resumable training entry point: the test fixture of the SLURM launcher (tests/test_slurm.py).

It keeps the entry-point convention exactly as pretraining and the benchmarks do:
``get_args_parser()`` / ``validate(args)`` / ``main(args)`` / ``cli()`` (``ssl_colorize.engine.cli``) and
the run contract's options (``ssl_colorize.engine.run.add_run_args``): ``--out`` (run folder with a
rolling, atomically written ``checkpoint.pth``), ``--resume`` (a flag: continue from it when it exists),
``--overwrite``, ``--run-id``; plus ``--out-csv``; DDP through :func:`ssl_colorize.distributed.init_distributed`;
result rows from rank 0 at the end. The launcher imports it by module name (``slurm_toy_entry``, with
tests/ on PYTHONPATH). The problem is small enough to finish in seconds: least-squares regression of a
fixed random linear map with SGD and momentum, on mini-batches drawn from a seeded generator whose
state is checkpointed, so a resumed run repeats the uninterrupted one exactly.

Files in ``--out``: ``checkpoint.pth`` (rolling), ``progress.json`` (last finished step, how often
the job was started: lets a test interrupt it half-way), ``snapshots/step_XXXXXX.pth`` (with
``--snapshot-every``), ``final.json`` (the trained weights and loss, exact floats) and
``starts.log`` (one line per start, with the step it started from).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from torch import nn

from ssl_colorize import distributed
from ssl_colorize.checkpoint import load_checkpoint, save_checkpoint
from ssl_colorize.engine.cli import (ArgumentParser, check_input_file, check_non_negative,
                                     check_output_file, check_positive, run_cli)
from ssl_colorize.engine.run import add_run_args, check_run_folder, default_run_folder, remove_run_files


def get_args_parser(add_help: bool = True) -> ArgumentParser:
    parser = ArgumentParser(description="toy resumable regression (launcher test fixture)", add_help=add_help)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch", type=int, default=16, help="global batch, split across ranks")
    parser.add_argument("--dim", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--step-seconds", type=float, default=0.0, help="sleep per step, to be interruptible")
    parser.add_argument("--save-every", type=int, default=1)
    parser.add_argument("--snapshot-every", type=int, default=0, help="keep snapshots/step_*.pth (0: none)")
    parser.add_argument("--checkpoint", default="random", help="'random' or a snapshot to start from")
    parser.add_argument("--out-csv", default="")
    add_run_args(parser, "toy")
    return parser


def validate(args: argparse.Namespace) -> None:
    for option, value in (("--steps", args.steps), ("--lr", args.lr), ("--batch", args.batch),
                          ("--dim", args.dim), ("--save-every", args.save_every)):
        check_positive(option, value)
    check_non_negative("--step-seconds", args.step_seconds)
    check_non_negative("--snapshot-every", args.snapshot_every)
    if args.checkpoint != "random":
        check_input_file("--checkpoint", args.checkpoint)
    check_output_file("--out-csv", args.out_csv or None)
    check_run_folder(args.out, resume=args.resume, overwrite=args.overwrite)


def make_data(seed: int, dim: int, n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(10_000 + seed)
    x = torch.randn(n, dim, generator=gen)
    w = torch.randn(dim, 1, generator=gen)
    return x, x @ w + 0.1 * torch.randn(n, 1, generator=gen)


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def main(args: argparse.Namespace) -> dict:
    layout = distributed.init_distributed()
    rank, world = distributed.get_rank(), distributed.get_world_size()
    if args.batch % world:
        raise ValueError(f"--batch {args.batch} is not divisible by the {world} processes")
    run_id = args.run_id or "toy"
    out = Path(args.out) if args.out else default_run_folder("toy", run_id)
    if args.overwrite and distributed.is_main() and out.is_dir():
        remove_run_files(out)
    out.mkdir(parents=True, exist_ok=True)

    x, y = make_data(args.seed, args.dim)
    torch.manual_seed(args.seed)
    model = nn.Linear(args.dim, 1)
    if args.checkpoint != "random":
        model.load_state_dict(load_checkpoint(args.checkpoint)["state_dict"])
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    batches = torch.Generator().manual_seed(args.seed)
    start = 0
    resume = out / "checkpoint.pth" if args.resume else None
    if resume is not None and resume.is_file():
        ckpt = load_checkpoint(resume)
        model.load_state_dict(ckpt["state_dict"])
        optimizer.load_state_dict(ckpt["optimizer"])
        batches.set_state(ckpt["rng"]["batches"])
        start = ckpt["step"]
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    if distributed.is_main():
        with open(out / "starts.log", "a") as log:
            log.write(json.dumps({"start_step": start, "restart": restarts, "world_size": world}) + "\n")
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model

    def state(step: int) -> dict:
        return {"model": {"name": "toy_linear", "kwargs": {"dim": args.dim}}, "state_dict": model.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": None, "step": step,
                "rng": {"batches": batches.get_state()}, "data_state": None, "config": vars(args),
                "bins": None, "prior": None, "version": 1}

    for step in range(start, args.steps):
        index = torch.randint(0, len(x), (args.batch,), generator=batches)
        mine = index[rank::world]  # equal shards: DDP's mean of shard gradients = the full-batch gradient
        loss = nn.functional.mse_loss(net(x[mine]), y[mine])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        time.sleep(args.step_seconds)
        done = step + 1
        if distributed.is_main():
            if done % args.save_every == 0 or done == args.steps:
                save_checkpoint(out / "checkpoint.pth", state(done))
            if args.snapshot_every and done % args.snapshot_every == 0:
                save_checkpoint(out / "snapshots" / f"step_{done:06d}.pth", state(done))
            _write_json(out / "progress.json", {"step": done, "restart": restarts})

    with torch.no_grad():
        final_loss = nn.functional.mse_loss(model(x), y).item()
    result = {"run_id": run_id, "final_loss": final_loss, "world_size": world, "start_step": start,
              "weight": model.weight.flatten().tolist(), "bias": model.bias.tolist(), "rank": layout.rank}
    if distributed.is_main():
        _write_json(out / "final.json", result)
        if args.out_csv:
            from ssl_colorize.results import append_rows, make_row

            hparams = {"lr": args.lr, "steps": args.steps, "batch": args.batch, "world_size": world,
                       "start_step": start, "restarts": restarts}
            append_rows(args.out_csv, [
                make_row(run_id=run_id, benchmark="slurm_toy", checkpoint=args.checkpoint, encoder="linear",
                         tap="output", dataset="synthetic", split="train", protocol="sgd", metric=metric,
                         value=value, seed=args.seed, hparams=hparams)
                for metric, value in (("mse", final_loss), ("weight_norm", model.weight.norm().item()))
            ])
    distributed.barrier()
    return result


def cli(argv: list[str] | None = None) -> dict:
    return run_cli(get_args_parser(), main, argv, validate=validate)


if __name__ == "__main__":
    cli()
