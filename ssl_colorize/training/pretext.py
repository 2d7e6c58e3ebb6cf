"""The colorization pretext task's parts: configuration, order of the data, the step, previews.

``ssl_colorize.pretrain`` is the recipe that puts them together (docs/protocols.md sections 2 and 3).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import Sampler

from ssl_colorize.color import rgb_to_lab
from ssl_colorize.data import ImageFiles, builtin_pretrain_list, ensure_builtin_imagefolder
from ssl_colorize.data.fast_path import TargetSpec, grid_targets, lightness_input
from ssl_colorize.data.images import SkippedFile
from ssl_colorize.data.transforms import center_crop, resize_for_crop
from ssl_colorize.engine.cli import UsageError, check_number, check_positive, fail
from ssl_colorize.engine.run import describe
from ssl_colorize.inference import ab_to_rgb, colorize_tensor
from ssl_colorize.losses import l2_loss, soft_target_cross_entropy
from ssl_colorize.models.cards import get_card
from ssl_colorize.targets import NUM_BINS, estimate_prior, grey_mask, load_prior, save_prior

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile(mode=)
#: Unreadable files in a row after which the data is taken for something that holds no images (issue 16).
MAX_CONSECUTIVE_UNREADABLE = 1000


# ------------------------------------------------------------------------------------------------
# Configuration: the encoder card's recipe (docs/protocols.md section 3), overridden by the options
# ------------------------------------------------------------------------------------------------

def parse_numbers(text: str, option: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise fail(option, text, "expected a comma list of numbers") from None


def default_run_folder(encoder: str, loss: str, builtin: bool) -> str:
    """``runs/pretrain-<encoder>[-<loss>][-builtin]``, under the current working directory."""
    loss_part = f"-{loss}" if loss != "rebalanced" else ""
    return str(Path("runs") / f"pretrain-{encoder}{loss_part}{'-builtin' if builtin else ''}")


def resolve_config(args: argparse.Namespace) -> dict:
    """The card's recipe (the built-in one without ``--data``) with the options applied; every value
    checked (UsageError naming the option). Creates nothing, reads no data: validate() calls it."""
    builtin = args.data is None
    card = get_card(args.encoder)
    recipe = card.pretrain_builtin if builtin else card.pretrain
    if recipe is None:
        raise fail("--encoder", args.encoder, "has no pretraining recipe (no colour head)")
    cfg = {
        "encoder": args.encoder, "loss": args.loss, "seed": args.seed, "k": args.k, "sigma": args.sigma,
        "lam": args.lam, "temperature": args.temperature, "prior": args.prior,
        "data": args.data, "builtin": builtin, "recipe": recipe.source,
        "steps": args.steps if args.steps is not None else recipe.steps,
        "batch_size": args.batch_size if args.batch_size is not None else recipe.batch_size,
        "crop": args.crop if args.crop is not None else recipe.crop,
        "resize": (args.resize or None) if args.resize is not None else recipe.resize,
        "lr": args.lr if args.lr is not None else recipe.lr,
        "betas": parse_numbers(args.betas, "--betas") if args.betas else recipe.betas,
        "weight_decay": args.weight_decay if args.weight_decay is not None else recipe.weight_decay,
    }
    # The released training's details (the recipe's fields, traced in the model files), each an option.
    for key in ("resize_mode", "loss_reduction", "init", "bias_lr_mult", "bias_decay_mult", "bn_momentum"):
        value = getattr(args, key, None)
        cfg[key] = value if value is not None else getattr(recipe, key)
    for option, value in (("--steps", cfg["steps"]), ("--batch-size", cfg["batch_size"]), ("--lr", cfg["lr"]),
                          ("--sigma", args.sigma), ("--temperature", args.temperature),
                          ("--prior-images", args.prior_images), ("--ckpt-every", args.ckpt_every),
                          ("--snapshot-every", args.snapshot_every), ("--log-every", args.log_every),
                          ("--stop-after", args.stop_after)):
        check_positive(option, value)
    check_number("--crop", cfg["crop"], minimum=32)  # the encoders' smallest input
    check_number("--resize", args.resize, minimum=0)
    check_number("--k", args.k, minimum=1, maximum=NUM_BINS)
    check_number("--lam", args.lam, minimum=0, maximum=1)
    check_number("--weight-decay", cfg["weight_decay"], minimum=0)
    check_number("--bias-lr-mult", cfg["bias_lr_mult"], minimum=0)
    check_number("--bias-decay-mult", cfg["bias_decay_mult"], minimum=0)
    check_number("--bn-momentum", cfg["bn_momentum"], minimum=0, maximum=1)
    if cfg["bn_momentum"] == 0:
        raise fail("--bn-momentum", args.bn_momentum, "must be > 0 (0 would never update the running statistics)")
    check_number("--preview-count", args.preview_count, minimum=0)
    check_number("--workers", args.workers, minimum=0)
    if len(cfg["betas"]) != 2 or not all(0 <= b < 1 for b in cfg["betas"]):
        raise fail("--betas", args.betas, "needs two values in [0, 1), e.g. 0.9,0.999")
    if args.lr_steps is not None:
        cfg["lr_steps"] = tuple(int(v) for v in parse_numbers(args.lr_steps, "--lr-steps"))
        cfg["lr_factors"] = parse_numbers(args.lr_factors, "--lr-factors") if args.lr_factors else tuple(
            0.1 ** (i + 1) for i in range(len(cfg["lr_steps"])))
    elif args.steps is not None and args.steps != recipe.steps:
        # A shorter or longer run keeps the recipe's drops at the same fractions of the schedule.
        cfg["lr_steps"] = tuple(round(s * args.steps / recipe.steps) for s in recipe.lr_steps)
        cfg["lr_factors"] = recipe.lr_factors
    else:
        cfg["lr_steps"], cfg["lr_factors"] = recipe.lr_steps, recipe.lr_factors
    if len(cfg["lr_steps"]) != len(cfg["lr_factors"]):
        raise fail("--lr-factors", args.lr_factors, f"has {len(cfg['lr_factors'])} entries, "
                   f"--lr-steps {len(cfg['lr_steps'])}")
    if any(f <= 0 for f in cfg["lr_factors"]):
        raise fail("--lr-factors", args.lr_factors, "must all be > 0")
    if args.loss == "l2" and args.prior == "estimate":
        raise fail("--prior", args.prior, "is meaningless with --loss l2 (no rebalancing)")
    cfg["out"] = args.out or default_run_folder(args.encoder, args.loss, builtin)
    cfg["ckpt_every"] = args.ckpt_every or max(1, min(5000, cfg["steps"] // 6 or 1))
    # The built-in run keeps its rolling checkpoint only (an AlexNet checkpoint with Adam's moments is
    # ~0.7 GB); a real run keeps a snapshot every third of the schedule and the last step.
    if args.snapshot_every is not None or not builtin:
        cfg["snapshot_every"] = args.snapshot_every or max(cfg["ckpt_every"], cfg["steps"] // 3 or 1)
    else:
        cfg["snapshot_every"] = None
    return cfg


def lr_at(step: int, cfg: dict) -> float:
    """Step schedule: the base lr times the factor of the last drop at or before ``step``."""
    factor = 1.0
    for boundary, f in zip(cfg["lr_steps"], cfg["lr_factors"]):
        if step >= boundary:
            factor = f
    return cfg["lr"] * factor


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device("cuda", local_rank % torch.cuda.device_count()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise fail("--device", name, "expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise fail("--device", name, "CUDA is not available on this machine")
    return device


# ------------------------------------------------------------------------------------------------
# Data: a seeded, resumable order; per-sample augmentation seeds so a resumed run sees the same crops
# ------------------------------------------------------------------------------------------------

class ResumableSampler(Sampler):
    """Epoch-seeded permutations, sliced for this process, starting at a given position.

    Yields ``(index, sample_seed)``: the augmentation of every sample is a function of the run seed,
    the epoch and the sample's position, so a resumed run sees exactly the crops an uninterrupted one
    would, whatever the number of loader workers. ``endless``: epoch after epoch with no end (the
    trainer's one loader for the whole run); otherwise the rest of the starting epoch.
    """

    def __init__(self, num_items: int, per_rank_batch: int, seed: int, rank: int = 0, world_size: int = 1,
                 endless: bool = False):
        self.num_items, self.per_rank_batch = num_items, per_rank_batch
        self.seed, self.rank, self.world_size, self.endless = seed, rank, world_size, endless
        self.global_batch = per_rank_batch * world_size
        self.batches_per_epoch = num_items // self.global_batch
        if self.batches_per_epoch == 0:
            raise ValueError(f"the data has {num_items} images, fewer than one global batch of {self.global_batch}")
        self.epoch, self.start_batch = 0, 0

    def set_position(self, epoch: int, batch_in_epoch: int) -> None:
        self.epoch, self.start_batch = epoch, batch_in_epoch

    def __len__(self) -> int:
        if self.endless:
            raise TypeError("an endless ResumableSampler has no length")
        return (self.batches_per_epoch - self.start_batch) * self.per_rank_batch

    def __iter__(self):
        epoch, start = self.epoch, self.start_batch
        while True:
            yield from self._epoch(epoch, start)
            if not self.endless:
                return
            epoch, start = epoch + 1, 0

    def _epoch(self, epoch: int, start_batch: int):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.num_items, generator=g)[: self.batches_per_epoch * self.global_batch]
        for b in range(start_batch, self.batches_per_epoch):
            batch = order[b * self.global_batch : (b + 1) * self.global_batch]
            for j in range(self.rank * self.per_rank_batch, (self.rank + 1) * self.per_rank_batch):
                position = b * self.global_batch + j
                yield int(batch[j]), (self.seed * 1_000_003 + epoch) * 10_000_019 + position


def build_data(cfg: dict) -> tuple[ImageFiles, list]:
    """-> (training ImageFiles, held-out preview image paths). UsageError for data that holds no image."""
    if cfg["builtin"]:
        source = builtin_pretrain_list()
        preview_files = ImageFiles(ensure_builtin_imagefolder() / "val")
        held_out = [preview_files.paths[i] for i in np.linspace(0, len(preview_files) - 1, 8).astype(int)]
        return ImageFiles(source), held_out
    try:
        files = ImageFiles(cfg["data"])  # raises, naming the folder, when it is missing or empty
    except ValueError as exc:
        raise fail("--data", cfg["data"], str(exc)) from None
    stride = max(1, len(files) // 8)
    held_idx = set(range(0, len(files), stride)[:8]) if len(files) > 64 else set()
    held_out = [files.paths[i] for i in sorted(held_idx)]
    keep = [i for i in range(len(files)) if i not in held_idx]
    files.paths = [files.paths[i] for i in keep]
    files.labels = [files.labels[i] for i in keep]
    return files, held_out


def check_some_file_reads(files: ImageFiles, source: str, limit: int = MAX_CONSECUTIVE_UNREADABLE) -> None:
    """UsageError unless one of the first ``limit`` files decodes (issue 16): data holding no images
    stops the run before anything is written. A readable first file makes this one decode."""
    tried = []
    for index in range(min(limit, len(files))):
        if not isinstance(files[index], SkippedFile):
            return
        tried.append(Path(files.paths[index]).name)
    raise UsageError(f"--data {source}: none of its first {len(tried)} files could be read as an image "
                     f"(e.g. {describe(tried)}); nothing to train on")


class UnreadableGuard:
    """Stops a run whose data yields nothing readable, instead of skipping files forever (issue 16).

    Counts unreadable files in a row (at batch granularity: a batch with one decodable image ends a
    run of them) and raises UsageError, naming the data and a few files, once the count reaches
    :data:`MAX_CONSECUTIVE_UNREADABLE`, or the number of files when there are fewer.
    """

    def __init__(self, source: str, num_files: int, limit: int = MAX_CONSECUTIVE_UNREADABLE):
        self.source, self.limit = source, max(1, min(limit, num_files))
        self.count, self.examples = 0, []

    def update(self, skipped: list[str], decoded: int) -> None:
        if decoded:
            self.count, self.examples = 0, []
            return
        self.count += len(skipped)
        self.examples += [Path(p).name for p in skipped[: 5 - len(self.examples)]]
        if self.count >= self.limit:
            raise UsageError(f"--data {self.source}: {self.count} files in a row could not be read as images "
                             f"(e.g. {describe(self.examples)}); nothing to train on")


def class_prior(cfg: dict, files: ImageFiles, out: Path, device: torch.device, *, main_process: bool,
                prior_images: int, progress: bool) -> torch.Tensor:
    """The (313,) ab prior of --prior: the shipped ImageNet one, one estimated from the data (kept as
    ``prior.csv`` in the run folder, which a resumed run reads back), or a file."""
    if cfg["prior"] == "imagenet":
        return load_prior()
    if cfg["prior"] != "estimate":
        try:
            return load_prior(cfg["prior"])
        except ValueError as exc:
            raise fail("--prior", cfg["prior"], str(exc)) from None
    prior_path = out / "prior.csv"
    if prior_path.is_file():
        return load_prior(prior_path)
    sample = (files[i] for i in range(0, len(files), max(1, len(files) // prior_images)))
    prior = estimate_prior((s.image for s in sample if hasattr(s, "image")), device=device,
                           max_pixels_per_image=4096, progress=progress)
    if main_process:
        save_prior(prior_path, prior)
    return prior


def kmeans_warm_start(model: nn.Module, files: ImageFiles, cfg: dict, device: torch.device, progress: bool) -> None:
    """--init kmeans: Kraehenbuehl et al.'s data-dependent initialisation on 64 centre crops (resized as
    the training views are). The output mean each layer is given is magic_init's default bias ``-b 0.1``
    (philkr/magic_init magic_init.py; ssl_colorize.kmeans_init says where the rest differs)."""
    from ssl_colorize.kmeans_init import MAGIC_INIT_BIAS, kmeans_init_

    warm_indices = range(0, len(files), max(1, len(files) // 64))[:64]
    warm = [s.image for s in (files[i] for i in warm_indices) if hasattr(s, "image")]
    warm = torch.stack([center_crop(resize_for_crop(im, cfg["resize"], cfg["resize_mode"]), cfg["crop"])
                        for im in warm])
    L, _ = lab_inputs(warm.to(device), model.output_stride)
    kmeans_init_(model, L, seed=cfg["seed"], progress=progress, output_mean=MAGIC_INIT_BIAS)


def load_previews(paths, crop: int, resize: int | None, count: int, resize_mode: str = "shorter") -> torch.Tensor | None:
    from ssl_colorize.data import read_image

    images = []
    for path in paths[:count]:
        try:
            image = read_image(path)
        except (RuntimeError, ValueError, OSError):
            continue
        images.append(center_crop(resize_for_crop(image, resize, resize_mode), crop))
    return torch.stack(images) if images else None


# ------------------------------------------------------------------------------------------------
# The step
# ------------------------------------------------------------------------------------------------

def lab_inputs(images_uint8: torch.Tensor, grid_stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 RGB (N, 3, H, W) on the device -> (L (N, 1, H, W) in [0, 100], ab on the loss grid): the
    data path's own functions, so previews and k-means see exactly what training sees."""
    return lightness_input(images_uint8), grid_targets(images_uint8, TargetSpec(grid_stride, encode=False))[0]


def is_bias(name: str, parameter: torch.Tensor) -> bool:
    """A bias blob in Caffe's sense: a 1-d parameter named ``*.bias`` (convolutions, linear layers and
    affine BatchNorms; the AlexNet-Lab and colornet BatchNorms have no affine parameters)."""
    return parameter.dim() == 1 and name.rsplit(".", 1)[-1] == "bias"


def parameter_groups(model: nn.Module, lr: float, weight_decay: float, bias_lr_mult: float = 1.0,
                     bias_decay_mult: float = 1.0) -> list[dict]:
    """The optimizer's groups as Caffe's per-blob ``lr_mult`` / ``decay_mult`` make them: the weights at
    (lr, weight_decay), the biases at (lr x bias_lr_mult, weight_decay x bias_decay_mult). One group when
    both multipliers are 1 (the plain PyTorch optimizer)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if bias_lr_mult == 1 and bias_decay_mult == 1:
        return [{"params": [p for _, p in params], "lr": lr, "weight_decay": weight_decay}]
    weights = [p for n, p in params if not is_bias(n, p)]
    biases = [p for n, p in params if is_bias(n, p)]
    return [{"params": weights, "lr": lr, "weight_decay": weight_decay},
            {"params": biases, "lr": lr * bias_lr_mult, "weight_decay": weight_decay * bias_decay_mult}]


def make_adam(model: nn.Module, lr: float, betas: tuple[float, float], weight_decay: float,
              device: torch.device, bias_lr_mult: float = 1.0, bias_decay_mult: float = 1.0) -> torch.optim.Adam:
    """Adam (L2 weight decay, as the released solver: Caffe adds ``weight_decay x decay_mult x w`` to the
    gradient before the update, which is torch's coupled ``weight_decay``), biases in their own group
    (:func:`parameter_groups`). The lr schedule multiplies every group's own lr. On CUDA the fused
    kernel: the same update, one launch for all parameters (measured on an H100: alexnet_lab 180 px x
    80, 16.4 -> 15.0 ms per step)."""
    groups = parameter_groups(model, lr, weight_decay, bias_lr_mult, bias_decay_mult)
    return torch.optim.Adam(groups, lr=lr, betas=betas, weight_decay=weight_decay,
                            fused=True if device.type == "cuda" else None)


def set_batchnorm_momentum_(model: nn.Module, momentum: float) -> int:
    """Every BatchNorm's running-average momentum (torch's: running = (1 - m) running + m batch); returns
    how many were set. Caffe's BatchNorm (``moving_average_fraction`` f, default 0.999) keeps
    s = f s + 1, sum = f sum + batch and uses sum / s: the same exponential average with weight 1 - f,
    divided by the weights accumulated so far, (1 - f^T). torch's momentum 1 - f differs from it only by
    the initial value's remaining weight f^T (0.999^T < 1e-4 after 9.2k steps); both correct the
    batch variance by m / (m - 1)."""
    count = 0
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = momentum
            count += 1
    return count


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
    reduction = cfg.get("loss_reduction", "mean")
    if cfg["loss"] == "l2":
        return l2_loss(out.float(), ab, image_weights, reduction=reduction)
    return soft_target_cross_entropy(out, ab, class_weights, k=cfg["k"], sigma=cfg["sigma"],
                                     image_weights=image_weights, encoded=encoded, reduction=reduction)


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
