"""Cross-channel colorization pretraining: ``python -m ssl_colorize.pretrain``.

L in, a distribution over the 313 ab bins out, soft targets, class rebalancing (docs/protocols.md sections 2
and 3). Reads top to bottom as a recipe: arguments -> data -> model -> optimizer -> loop. Every
``--ckpt-every`` steps the run folder gets a rolling ``checkpoint.pth`` (everything needed to resume
bit-for-bit: weights, optimizer, scheduler, step, RNG and data position), a line in ``log.jsonl`` and a
preview PNG of held-out images; every ``--snapshot-every`` steps a snapshot ``snapshots/step_XXXXXXX.pth``.

With no ``--data`` it trains on the built-in default (ssl_colorize.data.builtin) with a schedule
scaled down to finish in minutes on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import Sampler
from tqdm import tqdm

from ssl_colorize import distributed as dist_env
from ssl_colorize.checkpoint import (
    CHECKPOINT_VERSION,
    ROLLING_NAME,
    load_checkpoint,
    save_checkpoint,
)
from ssl_colorize.color import rgb_to_lab
from ssl_colorize.data import (
    ImageFiles,
    builtin_pretrain_list,
    ensure_builtin_imagefolder,
)
from ssl_colorize.data.fast_path import (
    DATA_PATHS,
    PretrainLoader,
    TargetSpec,
    grid_targets,
    lightness_input,
    resolve_data_path,
)
from ssl_colorize.data.transforms import center_crop, resize_shorter
from ssl_colorize.inference import ab_to_rgb, colorize_tensor
from ssl_colorize.losses import l2_loss, soft_target_cross_entropy
from ssl_colorize.models import create_model, list_models
from ssl_colorize.targets import (
    DEFAULT_K,
    DEFAULT_LAMBDA,
    DEFAULT_SIGMA,
    DEFAULT_TEMPERATURE,
    bin_centers,
    estimate_prior,
    grey_mask,
    load_prior,
    rebalance_weights,
    save_prior,
)

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile(mode=)

# ------------------------------------------------------------------------------------------------
# Recipes (docs/protocols.md section 3): the released code's solver settings per encoder. Values given on
# the command line override them. "builtin" is the scaled-down schedule for the built-in default.
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    crop: int
    batch_size: int
    steps: int
    lr: float
    lr_steps: tuple[int, ...]  # step at which each lr_factors entry takes over
    lr_factors: tuple[float, ...]
    betas: tuple[float, float]
    weight_decay: float
    resize: int | None = 256


RECIPES = {
    # 180 crops, batch 80, Adam (0.9, 0.999), wd 1e-3, lr 3e-5 / 1e-5 / 3e-6 / 1e-6 at 240k/300k/400k, 450k.
    "alexnet_lab": Recipe(180, 80, 450_000, 3e-5, (240_000, 300_000, 400_000), (1 / 3, 1 / 10, 1 / 30), (0.9, 0.999), 1e-3),
    # 176 crops, batch 40, Adam (0.9, 0.99), wd 1e-3, lr 3e-5 with x0.1 steps, ~450k iterations.
    "colornet": Recipe(176, 40, 450_000, 3e-5, (200_000, 375_000), (0.1, 0.01), (0.9, 0.99), 1e-3),
    # No released colorization recipe for ResNet-50 (Goyal et al. do not list one in docs/protocols.md):
    # the AlexNet solver at 224 px, batch 64, wd 1e-4 as is usual for ResNets.
    "resnet50_lab": Recipe(224, 64, 450_000, 3e-5, (240_000, 300_000, 400_000), (1 / 3, 1 / 10, 1 / 30), (0.9, 0.999), 1e-4),
}
# The built-in default: 128 px images seen at 80 px (64 px crops), a few hundred steps of Adam at a higher rate (the paper's 3e-5
# is tuned for 450k iterations). The architecture is unchanged; only the schedule is scaled.
BUILTIN_RECIPES = {
    "alexnet_lab": Recipe(64, 32, 200, 1e-3, (140, 180), (0.3, 0.1), (0.9, 0.999), 1e-3, resize=80),
    "colornet": Recipe(64, 8, 150, 3e-4, (100, 130), (0.3, 0.1), (0.9, 0.99), 1e-3, resize=80),
    "resnet50_lab": Recipe(64, 16, 150, 3e-4, (100, 130), (0.3, 0.1), (0.9, 0.999), 1e-4, resize=80),
}


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("ssl_colorize.pretrain", description=__doc__.split("\n\n")[0], add_help=add_help,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--encoder", default="alexnet_lab", help=f"one of {list_models()}")
    p.add_argument("--data", default=None,
                   help="an ImageFolder root (e.g. ImageNet's train/) or a text file listing image paths; "
                        "omitted: the built-in default")
    p.add_argument("--loss", default="rebalanced", choices=["rebalanced", "plain", "l2"],
                   help="classification with class rebalancing (the paper's full method), without it, or L2 regression")
    p.add_argument("--steps", type=int, default=None, help="iterations (default: the encoder's recipe)")
    p.add_argument("--batch-size", type=int, default=None, help="global batch size, split over the processes")
    p.add_argument("--crop", type=int, default=None, help="random square crop size")
    p.add_argument("--resize", type=int, default=None, help="resize the shorter side first (0: no resize)")
    p.add_argument("--lr", type=float, default=None, help="base learning rate")
    p.add_argument("--lr-steps", default=None, help="comma list of steps where the lr drops (default: recipe)")
    p.add_argument("--lr-factors", default=None, help="comma list of lr multipliers, one per --lr-steps entry")
    p.add_argument("--betas", default=None, help="Adam betas, e.g. 0.9,0.999")
    p.add_argument("--weight-decay", type=float, default=None, help="Adam's L2 weight decay (not AdamW)")
    p.add_argument("--prior", default="imagenet",
                   help="'imagenet' (the shipped prior), 'estimate' (from --data), or a prior file")
    p.add_argument("--prior-images", type=int, default=2000, help="images read by --prior estimate")
    p.add_argument("--k", type=int, default=DEFAULT_K, help="neighbours in the soft encoding")
    p.add_argument("--sigma", type=float, default=DEFAULT_SIGMA, help="soft-encoding Gaussian sigma (ab units)")
    p.add_argument("--lam", type=float, default=DEFAULT_LAMBDA, help="rebalancing mix with the uniform distribution")
    p.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE, help="annealed-mean T of the previews")
    p.add_argument("--init", default="default", choices=["default", "kmeans"],
                   help="kmeans: Kraehenbuehl et al.'s data-dependent initialisation")
    p.add_argument("--out", default=None, help="run folder (default: runs/pretrain-<encoder>[-builtin])")
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="resume from a checkpoint file, or (no value / 'auto') from the run folder's rolling one")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "none"], help="auto: bf16 autocast on CUDA")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels-last memory format (default: on CUDA)")
    p.add_argument("--compile", nargs="?", const="default", default=None, choices=COMPILE_MODES,
                   help="torch.compile the model; a bare --compile is 'default'. On CUDA 'reduce-overhead' "
                        "(CUDA graphs) measured 5852 against 5333 img/s eager for alexnet_lab on an H100")
    p.add_argument("--workers", type=int, default=None, help="data-loading processes (default: min(8, cpus - 1))")
    p.add_argument("--data-path", default="auto", choices=DATA_PATHS,
                   help="workers: CPU worker processes decode, crop and soft-encode; device: batched nvJPEG "
                        "decoding, crops, L and targets on the GPU; auto: workers when this process may use "
                        ">= 8 cores (or on a CPU), else device on a GPU with nvJPEG")
    p.add_argument("--ckpt-every", type=int, default=None, help="rolling checkpoint + preview every N steps")
    p.add_argument("--snapshot-every", type=int, default=None, help="keep a snapshot every N steps")
    p.add_argument("--log-every", type=int, default=10, help="log the mean loss and the rate every N steps")
    p.add_argument("--preview-count", type=int, default=8, help="held-out images in each preview PNG")
    p.add_argument("--stop-after", type=int, default=None,
                   help="leave after this step, as if killed (checkpoint written); for tests and time-sliced jobs")
    p.add_argument("--run-id", default=None, help="identifier for result rows (set by the SLURM launcher)")
    p.add_argument("--out-csv", default=None, help="append a final-loss result row to this CSV")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


# ------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------


def _parse_floats(text: str, option: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{option}: expected a comma list of numbers, got {text!r}") from None


def resolve_config(args: argparse.Namespace) -> dict:
    """Fill the recipe's defaults and validate everything before any work starts."""
    if args.encoder not in list_models():
        raise ValueError(f"--encoder {args.encoder!r} is not registered; choose one of {list_models()}")
    builtin = args.data is None
    recipes = BUILTIN_RECIPES if builtin else RECIPES
    if args.encoder not in recipes:
        raise ValueError(f"--encoder {args.encoder!r} has no pretraining recipe (it has no colour head); "
                         f"choose one of {sorted(recipes)}")
    recipe = recipes[args.encoder]
    cfg = {
        "encoder": args.encoder, "loss": args.loss, "seed": args.seed, "k": args.k, "sigma": args.sigma,
        "lam": args.lam, "temperature": args.temperature, "init": args.init, "prior": args.prior,
        "data": args.data, "builtin": builtin,
        "steps": args.steps if args.steps is not None else recipe.steps,
        "batch_size": args.batch_size if args.batch_size is not None else recipe.batch_size,
        "crop": args.crop if args.crop is not None else recipe.crop,
        "resize": (args.resize or None) if args.resize is not None else recipe.resize,
        "lr": args.lr if args.lr is not None else recipe.lr,
        "betas": _parse_floats(args.betas, "--betas") if args.betas else recipe.betas,
        "weight_decay": args.weight_decay if args.weight_decay is not None else recipe.weight_decay,
    }
    if args.lr_steps is not None:
        cfg["lr_steps"] = tuple(int(v) for v in _parse_floats(args.lr_steps, "--lr-steps"))
        cfg["lr_factors"] = _parse_floats(args.lr_factors, "--lr-factors") if args.lr_factors else tuple(
            0.1 ** (i + 1) for i in range(len(cfg["lr_steps"])))
    elif args.steps is not None and args.steps != recipe.steps:
        # A shorter or longer run keeps the recipe's drops at the same fractions of the schedule.
        cfg["lr_steps"] = tuple(round(s * args.steps / recipe.steps) for s in recipe.lr_steps)
        cfg["lr_factors"] = recipe.lr_factors
    else:
        cfg["lr_steps"], cfg["lr_factors"] = recipe.lr_steps, recipe.lr_factors
    if len(cfg["lr_steps"]) != len(cfg["lr_factors"]):
        raise ValueError(f"--lr-steps has {len(cfg['lr_steps'])} entries but --lr-factors {len(cfg['lr_factors'])}")
    for name in ("steps", "batch_size", "crop", "k"):
        if cfg[name] <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {cfg[name]}")
    if cfg["crop"] < 32:
        raise ValueError(f"--crop {cfg['crop']} is too small for the encoders (at least 32)")
    if not cfg["lr"] > 0:
        raise ValueError(f"--lr must be positive, got {cfg['lr']}")
    if len(cfg["betas"]) != 2:
        raise ValueError(f"--betas needs two values, got {cfg['betas']}")
    if args.prior not in ("imagenet", "estimate") and not Path(args.prior).is_file():
        raise ValueError(f"--prior {args.prior!r}: not 'imagenet', 'estimate' or an existing file")
    if args.loss == "l2" and args.prior == "estimate":
        raise ValueError("--prior estimate is meaningless with --loss l2 (no rebalancing)")
    suffix = "-builtin" if builtin else ""
    cfg["out"] = args.out or str(Path("runs") / f"pretrain-{args.encoder}{'-' + args.loss if args.loss != 'rebalanced' else ''}{suffix}")
    cfg["ckpt_every"] = args.ckpt_every or max(1, min(5000, cfg["steps"] // 6 or 1))
    cfg["snapshot_every"] = args.snapshot_every or max(cfg["ckpt_every"], cfg["steps"] // 3 or 1)
    return cfg


def lr_at(step: int, cfg: dict) -> float:
    """Step schedule: the base lr times the factor of the last drop at or before ``step``."""
    factor = 1.0
    for boundary, f in zip(cfg["lr_steps"], cfg["lr_factors"]):
        if step >= boundary:
            factor = f
    return cfg["lr"] * factor


# ------------------------------------------------------------------------------------------------
# Data: a seeded, resumable order; per-sample augmentation seeds so a resumed run sees the same crops
# ------------------------------------------------------------------------------------------------


class ResumableSampler(Sampler):
    """Epoch-seeded permutation, sliced for this process, starting at a given position.

    Yields ``(index, sample_seed)``: the augmentation of every sample is a function of the run seed,
    the epoch and the sample's position, so a resumed run sees exactly the crops an uninterrupted one
    would, whatever the number of loader workers.
    """

    def __init__(self, num_items: int, per_rank_batch: int, seed: int, rank: int = 0, world_size: int = 1):
        self.num_items, self.per_rank_batch = num_items, per_rank_batch
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.global_batch = per_rank_batch * world_size
        self.batches_per_epoch = num_items // self.global_batch
        if self.batches_per_epoch == 0:
            raise ValueError(f"the data has {num_items} images, fewer than one global batch of {self.global_batch}")
        self.epoch, self.start_batch = 0, 0

    def set_position(self, epoch: int, batch_in_epoch: int) -> None:
        self.epoch, self.start_batch = epoch, batch_in_epoch

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.per_rank_batch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_items, generator=g)[: self.batches_per_epoch * self.global_batch]
        for b in range(self.start_batch, self.batches_per_epoch):
            batch = order[b * self.global_batch : (b + 1) * self.global_batch]
            for j in range(self.rank * self.per_rank_batch, (self.rank + 1) * self.per_rank_batch):
                position = b * self.global_batch + j
                yield int(batch[j]), (self.seed * 1_000_003 + self.epoch) * 10_000_019 + position


def build_data(cfg: dict):
    """-> (training ImageFiles, held-out preview images (uint8, N x 3 x crop x crop))."""
    if cfg["builtin"]:
        source = builtin_pretrain_list()
        preview_files = ImageFiles(ensure_builtin_imagefolder() / "val")
        held_out = [preview_files.paths[i] for i in np.linspace(0, len(preview_files) - 1, 8).astype(int)]
        files = ImageFiles(source)
    else:
        files = ImageFiles(cfg["data"])  # raises, naming the folder, when it is missing or empty
        stride = max(1, len(files) // 8)
        held_idx = set(range(0, len(files), stride)[:8]) if len(files) > 64 else set()
        held_out = [files.paths[i] for i in sorted(held_idx)]
        keep = [i for i in range(len(files)) if i not in held_idx]
        files.paths = [files.paths[i] for i in keep]
        files.labels = [files.labels[i] for i in keep]
    return files, held_out


def load_previews(paths, crop: int, resize: int | None, count: int) -> torch.Tensor | None:
    from ssl_colorize.data import read_image

    images = []
    for path in paths[:count]:
        try:
            image = read_image(path)
        except (RuntimeError, ValueError, OSError):
            continue
        images.append(center_crop(resize_shorter(image, resize) if resize else image, crop))
    return torch.stack(images) if images else None


# ------------------------------------------------------------------------------------------------
# The step
# ------------------------------------------------------------------------------------------------


def lab_inputs(images_uint8: torch.Tensor, grid_stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 RGB (N, 3, H, W) on the device -> (L (N, 1, H, W) in [0, 100], ab on the loss grid): the
    data path's own functions, so previews and k-means see exactly what training sees."""
    return lightness_input(images_uint8), grid_targets(images_uint8, TargetSpec(grid_stride, encode=False))[0]


def make_adam(model: nn.Module, lr: float, betas: tuple[float, float], weight_decay: float,
              device: torch.device) -> torch.optim.Adam:
    """Adam (L2 weight decay, as the released solver). On CUDA the fused kernel: the same update, one
    launch for all parameters (measured on an H100: alexnet_lab 180 px x 80, 16.4 -> 15.0 ms per step)."""
    return torch.optim.Adam(model.parameters(), lr=lr, betas=betas, weight_decay=weight_decay,
                            fused=True if device.type == "cuda" else None)


class LossGridLogits(nn.Module):
    """The encoder's colour output on the loss grid, as a forward() that DistributedDataParallel can wrap."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, L: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return self.encoder.logits_at(L, size)


def compute_loss(model: nn.Module, L: torch.Tensor, ab: torch.Tensor, cfg: dict, class_weights, amp_dtype,
                 encoded: tuple[torch.Tensor, torch.Tensor] | None = None):
    """The pretext loss of one batch; ``model`` is a LossGridLogits (possibly DDP-wrapped)."""
    image_weights = (~grey_mask(ab)).float()  # grey images carry no colour signal [code]
    with torch.autocast(L.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        out = model(L, tuple(ab.shape[-2:]))
    if cfg["loss"] == "l2":
        return l2_loss(out.float(), ab, image_weights)
    return soft_target_cross_entropy(out, ab, class_weights, k=cfg["k"], sigma=cfg["sigma"],
                                     image_weights=image_weights, encoded=encoded)


def write_preview(model: nn.Module, images: torch.Tensor, path: Path, temperature: float) -> None:
    """A PNG grid, one column per held-out image: grey input, our colours, the truth."""
    from PIL import Image

    was_training = model.training
    model.eval()
    with torch.no_grad():
        truth = images.float() / 255.0
        L = rgb_to_lab(truth)[:, :1]
        rows = [ab_to_rgb(L, torch.zeros_like(truth[:, :2])), colorize_tensor(model, L, temperature), truth]
    model.train(was_training)
    grid = torch.cat([torch.cat(list(r.cpu()), dim=2) for r in rows], dim=1)  # 3 rows x N columns
    array = (grid.clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        return torch.device("cuda", local_rank % torch.cuda.device_count()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def _log(path: Path, record: dict) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> dict:
    cfg = resolve_config(args)
    env = dist_env.init_distributed()
    rank, world = env.rank, env.world_size
    main_process = rank == 0
    device = _resolve_device(args.device, env.local_rank)
    if cfg["batch_size"] % world:
        raise ValueError(f"--batch-size {cfg['batch_size']} is not divisible by the {world} processes")
    per_rank_batch = cfg["batch_size"] // world
    out = Path(cfg["out"])
    resume_path = None
    if args.resume is not None:
        resume_path = out / ROLLING_NAME if args.resume == "auto" else Path(args.resume)
        if args.resume != "auto" and not resume_path.is_file():
            raise ValueError(f"--resume {args.resume}: no such checkpoint")
        if not resume_path.is_file():
            resume_path = None  # 'auto' with nothing to resume: a fresh start

    files, held_out = build_data(cfg)
    amp_dtype = torch.bfloat16 if (args.amp == "bf16" or (args.amp == "auto" and device.type == "cuda")) else None
    channels_last = args.channels_last if args.channels_last is not None else device.type == "cuda"

    torch.manual_seed(cfg["seed"])
    np.random.seed(cfg["seed"])
    random.seed(cfg["seed"])
    model_kwargs = {"out_channels": 2} if cfg["loss"] == "l2" else {}
    model = create_model(cfg["encoder"], **model_kwargs).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    spec = model.model_spec
    grid_stride = model.output_stride  # ab is decimated to the loss grid (docs/protocols.md section 2)

    # The prior and the rebalancing weights.
    if cfg["prior"] == "imagenet":
        prior = load_prior()
    elif cfg["prior"] == "estimate":
        prior_path = out / "prior.csv"
        if prior_path.is_file():
            prior = load_prior(prior_path)
        else:
            sample = (files[i] for i in range(0, len(files), max(1, len(files) // args.prior_images)))
            prior = estimate_prior((s.image for s in sample if hasattr(s, "image")), device=device,
                                   max_pixels_per_image=4096, progress=main_process and not args.no_progress)
            if main_process:
                save_prior(prior_path, prior)
    else:
        prior = load_prior(cfg["prior"])
    class_weights = rebalance_weights(prior, cfg["lam"]).to(device) if cfg["loss"] == "rebalanced" else None

    optimizer = make_adam(model, cfg["lr"], tuple(cfg["betas"]), cfg["weight_decay"], device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, cfg) / cfg["lr"])
    sampler = ResumableSampler(len(files), per_rank_batch, cfg["seed"], rank, world)
    step, epoch, batch_in_epoch, skipped_total = 0, 0, 0, 0
    skipped_names: list[str] = []

    if resume_path is not None:
        ckpt = load_checkpoint(resume_path, map_location="cpu")
        if ckpt["model"]["name"] != cfg["encoder"]:
            raise ValueError(f"{resume_path} holds a {ckpt['model']['name']!r}, not --encoder {cfg['encoder']!r}")
        model.load_state_dict(ckpt["state_dict"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        step = ckpt["step"]
        epoch, batch_in_epoch = ckpt["data_state"]["epoch"], ckpt["data_state"]["batch_in_epoch"]
        skipped_total = ckpt["data_state"].get("skipped", 0)
        _set_rng_state(ckpt["rng"])
    elif cfg["init"] == "kmeans":
        from ssl_colorize.kmeans_init import kmeans_init_

        warm_indices = range(0, len(files), max(1, len(files) // 64))[:64]
        warm = [s.image for s in (files[i] for i in warm_indices) if hasattr(s, "image")]
        warm = torch.stack([center_crop(resize_shorter(im, cfg["resize"]) if cfg["resize"] else im, cfg["crop"]) for im in warm])
        L, _ = lab_inputs(warm.to(device), grid_stride)
        kmeans_init_(model, L, seed=cfg["seed"], progress=main_process and not args.no_progress)

    core = model
    train_model: nn.Module = LossGridLogits(model)
    if world > 1:
        from ssl_colorize.sync_bn import convert_batchnorm

        # BatchNorm over the global batch: N processes then compute what one process would.
        train_model = convert_batchnorm(train_model, device)
        core = train_model.encoder
        train_model = nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        train_model = torch.compile(train_model, mode=None if args.compile == "default" else args.compile)

    workers = args.workers if args.workers is not None else max(0, min(8, (os.cpu_count() or 1) - 1))
    data_path = resolve_data_path(args.data_path, device)
    targets = TargetSpec(grid_stride, cfg["k"], cfg["sigma"], encode=cfg["loss"] != "l2")
    previews = load_previews(held_out, cfg["crop"], cfg["resize"], args.preview_count) if main_process else None

    if main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps({**cfg, "world_size": world, "device": str(device),
                                                      "data_path": data_path}, indent=2, default=str))
        print(f"pretrain: {cfg['encoder']} on {'the built-in default' if cfg['builtin'] else cfg['data']} "
              f"({len(files)} images), {cfg['steps']} steps of {cfg['batch_size']} x {cfg['crop']}px, "
              f"loss {cfg['loss']}, device {device}, {world} process(es), run folder {out}"
              + (f", resuming at step {step}" if step else ""), flush=True)

    def checkpoint_dict() -> dict:
        return {
            "model": spec, "state_dict": core.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "step": step, "rng": _rng_state(),
            "data_state": {"epoch": epoch, "batch_in_epoch": batch_in_epoch, "skipped": skipped_total},
            "config": cfg, "bins": bin_centers(), "prior": prior.cpu(), "version": CHECKPOINT_VERSION,
        }

    def save_all(final: bool = False) -> None:
        if not main_process:
            return
        save_checkpoint(out / ROLLING_NAME, checkpoint_dict())
        if previews is not None:
            write_preview(core, previews.to(device), out / f"preview_step{step:07d}.png", cfg["temperature"])
        if final or step % cfg["snapshot_every"] == 0:
            save_checkpoint(out / "snapshots" / f"step_{step:07d}.pth", checkpoint_dict())

    log_path = out / "log.jsonl"
    bar = tqdm(total=cfg["steps"], initial=step, desc="pretrain", unit="step", dynamic_ncols=True,
               disable=not main_process or args.no_progress)
    train_model.train()
    last_time, images_since = time.perf_counter(), 0
    last_loss = float("nan")
    # The logged loss is the mean over the steps since the last log line (summed on the device, read
    # once per line: no per-step host sync).
    loss_sum, loss_steps = torch.zeros((), device=device), 0
    stop_at = min(cfg["steps"], args.stop_after) if args.stop_after is not None else cfg["steps"]
    while step < stop_at:
        sampler.set_position(epoch, batch_in_epoch)
        loader = PretrainLoader(files, sampler, per_rank_batch, cfg["crop"], cfg["resize"], device, data_path,
                                workers=workers, channels_last=channels_last, targets=targets)
        for batch in loader:
            if batch.skipped:
                skipped_total += len(batch.skipped)
                skipped_names.extend(batch.skipped)
                for name in batch.skipped:
                    tqdm.write(f"pretrain: skipped unreadable image {name}", file=sys.stderr)
            batch_in_epoch += 1
            if batch.images.shape[0] == 0:
                continue
            loss = compute_loss(train_model, batch.L, batch.ab, cfg, class_weights, amp_dtype, encoded=batch.encoded)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            images_since += batch.images.shape[0] * world
            loss_sum += loss.detach().float()
            loss_steps += 1
            bar.update(1)
            if step % args.log_every == 0 or step == stop_at:
                if world > 1:
                    torch.distributed.all_reduce(loss_sum)
                    loss_sum /= world
                last_loss = float(loss_sum) / loss_steps
                loss_sum.zero_()
                loss_steps = 0
                now = time.perf_counter()
                rate = images_since / (now - last_time)
                last_time, images_since = now, 0
                bar.set_postfix(loss=f"{last_loss:.4f}", img_s=f"{rate:.1f}")
                if main_process:
                    _log(log_path, {"step": step, "loss": last_loss, "lr": optimizer.param_groups[0]["lr"],
                                    "images_per_sec": rate, "skipped": skipped_total, "epoch": epoch, "time": time.time()})
            if step % cfg["ckpt_every"] == 0 or step == stop_at:
                save_all(final=step == cfg["steps"])
            if step >= stop_at:
                break
        else:
            epoch, batch_in_epoch = epoch + 1, 0
    bar.close()
    if skipped_total and main_process:
        print(f"pretrain: {skipped_total} unreadable image(s) were skipped"
              + (f", e.g. {', '.join(skipped_names[:5])}" if skipped_names else ""), file=sys.stderr)
    if main_process and step >= cfg["steps"] and args.out_csv:
        from ssl_colorize.results import append_rows, make_row

        append_rows(args.out_csv, [make_row(
            run_id=args.run_id or out.name, benchmark="pretrain", checkpoint=str(out / ROLLING_NAME),
            encoder=cfg["encoder"], tap="-", dataset="builtin" if cfg["builtin"] else str(cfg["data"]),
            split="train", protocol=f"colorization-{cfg['loss']}", metric="final_loss", value=last_loss,
            seed=cfg["seed"], hparams={k: cfg[k] for k in ("steps", "batch_size", "crop", "lr", "loss")})])
    dist_env.barrier()
    return {"step": step, "loss": last_loss, "out": str(out), "skipped": skipped_total}


def cli(argv: list[str] | None = None) -> None:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    try:
        resolve_config(args)  # fail on a bad option before any work starts
    except ValueError as exc:
        parser.error(str(exc))
    main(args)


if __name__ == "__main__":
    cli()
