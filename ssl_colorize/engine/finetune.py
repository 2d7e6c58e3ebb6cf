"""The fine-tuning engine of the VOC benchmarks: scopes, BatchNorm modes, the frozen-part guard, the SGD
update, schedules, a resumable data stream and the training loop with its rolling checkpoint.

The recipes (``ssl_colorize.benchmarks.voc_classification``, ``voc_detection``, ``voc_segmentation``)
build a model and a loss and hand them to :func:`finetune`, which owns the run contract
(ssl_colorize.engine.run): ``log.jsonl``, a rolling atomic ``checkpoint.pth`` every ``--ckpt-every``
iterations (model, optimizer, schedule, iteration, random state; the data position is the iteration)
and an exact ``--resume``: a run killed at any moment and resumed ends with the weights an
uninterrupted run ends with.

Fine-tuning scopes come from the encoder's card (``card_of(encoder).transfer.scopes``): ``fc8`` trains
only the new head, ``fc6-8`` also the stages the card names (AlexNet: pool5, fc6, fc7; ResNet-50: res5),
``all`` everything.

BatchNorm in fine-tuning: the released AlexNet is transferred with BatchNorm folded into the
convolutions (docs/protocols.md section 3), i.e. as a fixed per-channel affine map. ``--bn frozen`` (the
default) reproduces that: every BatchNorm stays in eval mode, with its statistics fixed, while the
weights around it train. ``--bn train`` lets the BatchNorms of the fine-tuned layers use batch
statistics (and update their running averages) instead.

Encoder loading, inputs and :class:`TransferRun` live in ssl_colorize.engine.transfer_run.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from ssl_colorize.engine.cli import UsageError
from ssl_colorize.engine.run import rng_state, set_rng_state
from ssl_colorize.engine.transfer_run import TransferRun
from ssl_colorize.heads.probe import FrozenEncoderGuard
from ssl_colorize.models.cards import card_of

LOG = logging.getLogger("ssl_colorize.voc")

FINETUNE_SETTINGS = ("fc8", "fc6-8", "all")
BN_MODES = ("frozen", "train")
#: Rolling checkpoint period: at most 1000 iterations (< 1% of the 150k-iteration detection run) are
#: redone after a kill.
DEFAULT_CKPT_EVERY = 1000
DEFAULT_LOG_EVERY = 20


def add_training_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--ckpt-every, --log-every, --tensorboard: the options of every fine-tuning recipe."""
    g = parser.add_argument_group("training log and checkpoint")
    g.add_argument("--ckpt-every", type=int, default=DEFAULT_CKPT_EVERY,
                   help="write the rolling checkpoint every N iterations (and at the end)")
    g.add_argument("--log-every", type=int, default=DEFAULT_LOG_EVERY, help="a log.jsonl record every N iterations")
    g.add_argument("--tensorboard", action="store_true",
                   help="also write the logged scalars for TensorBoard (run folder/tensorboard; needs tensorboard)")
    return parser


# ----------------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------------

def schedule_length(iters: int | None, protocol_iters: int, builtin: bool, builtin_iters: int) -> int:
    """The run's iterations: ``--iters`` if given, else the protocol's, or a short default on built-in data."""
    if iters is not None:
        if iters < 1:
            raise ValueError(f"--iters must be at least 1, got {iters}")
        return iters
    return builtin_iters if builtin else protocol_iters


def step_lr(optimizer: torch.optim.Optimizer, total: int, protocol_total: int, protocol_step: int,
            gamma: float) -> torch.optim.lr_scheduler.LambdaLR:
    """lr x gamma every ``protocol_step`` iterations of a ``protocol_total`` schedule, scaled to ``total``
    (``--iters`` shortens the run and its steps together)."""
    step = max(1, round(protocol_step * total / protocol_total))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: gamma ** (it // step))


def multistep_lr(optimizer: torch.optim.Optimizer, total: int, protocol_total: int, milestones: Sequence[int],
                 gamma: float) -> torch.optim.lr_scheduler.LambdaLR:
    """lr x gamma at each of ``milestones`` of a ``protocol_total`` schedule, scaled to ``total`` (as
    :func:`step_lr`, but a fixed number of drops: e.g. the released FCN's 1e-4 -> 1e-5 -> 1e-6)."""
    scaled = [max(1, round(m * total / protocol_total)) for m in milestones]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: gamma ** sum(it >= m for m in scaled))


def caffe_param_groups(named_params: Iterable[tuple[str, nn.Parameter]], lr: float, wd: float,
                       bias_lr_mult: float = 2.0, bias_decay_mult: float = 0.0) -> list[dict]:
    """SGD groups as a Caffe net with ``param {lr_mult: 1 decay_mult: 1} param {lr_mult: 2 decay_mult: 0}``
    on every layer (weights, then biases: the released fine-tuning prototxts): biases at
    ``bias_lr_mult`` x lr with ``bias_decay_mult`` x wd. Only parameters that require grad."""
    weights, biases = [], []
    for name, p in named_params:
        if p.requires_grad:
            (biases if name.endswith("bias") else weights).append(p)
    groups = [{"params": weights, "lr": lr, "weight_decay": wd}]
    if biases:
        groups.append({"params": biases, "lr": bias_lr_mult * lr, "weight_decay": bias_decay_mult * wd})
    return groups


def bias_lr_groups(params: list[nn.Parameter], named: dict[int, str], lr: float, wd: float) -> list[dict]:
    """Caffe's convention in the released fine-tuning code: biases at twice the learning rate."""
    weights = [p for p in params if not named[id(p)].endswith("bias")]
    biases = [p for p in params if named[id(p)].endswith("bias")]
    groups = [{"params": weights, "lr": lr, "weight_decay": wd}]
    if biases:
        groups.append({"params": biases, "lr": 2 * lr, "weight_decay": wd})
    return groups


# ----------------------------------------------------------------------------------------------
# Fine-tuning scopes
# ----------------------------------------------------------------------------------------------

def stage_modules(encoder: nn.Module) -> dict[str, nn.Module]:
    return dict(encoder.stages())


def feature_tap(encoder: nn.Module) -> str:
    """The tap a new classifier reads (the card's: fc7 for AlexNets, res5 for ResNet-50, conv5 for colornet)."""
    return card_of(encoder).transfer.feature_tap


def upper_stages(encoder: nn.Module) -> list[str]:
    """The stages "fc6-8" fine-tunes besides the new classifier (the card's ``scopes["fc6-8"]``)."""
    return list(card_of(encoder).transfer.scopes["fc6-8"] or encoder.stage_names)


def finetune_modules(encoder: nn.Module, setting: str) -> list[nn.Module]:
    """The encoder modules that ``--finetune setting`` trains (the new head is not part of it)."""
    if setting not in FINETUNE_SETTINGS:
        raise ValueError(f"--finetune must be one of {FINETUNE_SETTINGS}, got {setting!r}")
    stages = card_of(encoder).transfer.scopes.get(setting, None if setting == "all" else ())
    if stages is None:
        return [encoder]
    modules = stage_modules(encoder)
    return [modules[name] for name in stages]


def trained_tensor_names(encoder: nn.Module, modules: Sequence[nn.Module]) -> set[str]:
    """state_dict-style names of the parameters and buffers inside ``modules`` (matched by identity,
    so views over an encoder's modules work too)."""
    ids = {id(t) for m in modules for t in list(m.parameters()) + list(m.buffers())}
    named = list(encoder.named_parameters(remove_duplicate=False)) + list(encoder.named_buffers(remove_duplicate=False))
    return {name for name, t in named if id(t) in ids}


def set_requires_grad(encoder: nn.Module, modules: Sequence[nn.Module]) -> list[nn.Parameter]:
    """Freeze the encoder except ``modules``; return the parameters that train."""
    encoder.requires_grad_(False)
    for module in modules:
        module.requires_grad_(True)
    return [p for p in encoder.parameters() if p.requires_grad]


def set_train_mode(encoder: nn.Module, modules: Sequence[nn.Module], bn_mode: str, training: bool = True) -> None:
    """Frozen parts in eval mode (their BatchNorm statistics must not move); fine-tuned parts in train
    mode, with their BatchNorms in eval mode unless ``bn_mode == "train"``."""
    if bn_mode not in BN_MODES:
        raise ValueError(f"--bn must be one of {BN_MODES}, got {bn_mode!r}")
    encoder.eval()
    if not training:
        return
    for module in modules:
        module.train()
    if bn_mode == "frozen":
        for m in encoder.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


class UntouchedGuard:
    """Snapshot of the encoder; :meth:`check` raises when a tensor outside ``allowed`` changed.

    Built on ssl_colorize.heads.probe.FrozenEncoderGuard (exact comparison, BatchNorm statistics included).
    """

    def __init__(self, encoder: nn.Module, allowed: Iterable[str] = ()):
        self.guard = FrozenEncoderGuard(encoder)
        self.allowed = set(allowed)

    def changed(self) -> list[str]:
        return [name for name in self.guard.changed() if name not in self.allowed]

    def check(self, what: str) -> None:
        changed = self.changed()
        if changed:
            shown = ", ".join(changed[:12]) + (f", ... ({len(changed)} in all)" if len(changed) > 12 else "")
            raise RuntimeError(f"{what} changed encoder tensors it must leave alone: {shown}")


def accumulate_gradients(step: Callable[[Any], torch.Tensor | None], stream: Iterator, accumulate: int) -> list[float]:
    """Caffe's ``iter_size``: ``accumulate`` micro-batches, each loss back-propagated at once (one graph
    alive at a time) scaled by 1 / ``accumulate``, so the summed gradient is the mean of the micro-batch
    gradients (Caffe's ``SGDSolver::Normalize`` divides the accumulated diff by ``iter_size``; a
    micro-batch without a loss contributes zero, as Caffe would keep the divisor). The caller zeroes
    the gradients first. Returns the micro-batch losses that were not None."""
    losses = []
    for _ in range(accumulate):
        loss = step(next(stream))
        if loss is None:
            continue
        (loss / accumulate).backward()
        losses.append(loss.item())
    return losses


def sgd_update(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scheduler, clip_grad: float) -> None:
    """One fine-tuning update: backward, the gradient norm clipped to ``clip_grad`` over the optimizer's
    parameters when positive (``--clip-grad``), the step and the schedule's step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip_grad > 0:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], clip_grad)
    optimizer.step()
    scheduler.step()


# ----------------------------------------------------------------------------------------------
# A data stream that can restart at any batch
# ----------------------------------------------------------------------------------------------

def draw_seed(seed: int, epoch: int, position: int) -> int:
    """The seed of one sample's augmentation: a function of (run seed, epoch, place in the epoch)."""
    return ((seed * 1_000_003 + epoch) * 1_000_003 + position) % (2**63 - 1)


class EpochBatches(Sampler):
    """Batches of ``(index, augmentation seed)`` keys forever, epoch after epoch, from batch ``start`` on.

    Each epoch is a permutation seeded by (seed, epoch) and each sample's augmentation is seeded by
    (seed, epoch, position), so batch ``k`` is the same whether the stream starts at 0 or at ``k``
    and whatever the worker count: the data position of a checkpoint is its iteration.
    """

    def __init__(self, n: int, batch_size: int, drop_last: bool, seed: int, start: int = 0):
        if n < 1:
            raise ValueError("the training data is empty")
        self.n, self.batch_size, self.seed, self.start = n, batch_size, seed, start
        self.per_epoch = n // batch_size if drop_last and n >= batch_size else math.ceil(n / batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, offset = divmod(self.start, self.per_epoch)
        while True:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
            for batch in range(offset, self.per_epoch):
                first = batch * self.batch_size
                chosen = order[first: first + self.batch_size].tolist()
                yield [(index, draw_seed(self.seed, epoch, first + j)) for j, index in enumerate(chosen)]
            epoch, offset = epoch + 1, 0


class SeededItems(Dataset):
    """``dataset[index]`` with the global torch generator seeded by the key's seed while the item is
    made (the transforms draw from it), then restored: augmentation independent of worker and order."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


def batch_stream(dataset: Dataset, batch_size: int, *, seed: int, start: int, workers: int, collate: Callable,
                 drop_last: bool = True, pin_memory: bool = False) -> Iterator:
    """Training batches from batch ``start`` on (see :class:`EpochBatches`), forever."""
    sampler = EpochBatches(len(dataset), batch_size, drop_last, seed, start)
    # Its own generator: creating the iterator draws no number from the global one (exact resume).
    loader = DataLoader(SeededItems(dataset), batch_sampler=sampler, num_workers=workers, collate_fn=collate,
                        pin_memory=pin_memory, generator=torch.Generator().manual_seed(seed))
    return iter(loader)


# ----------------------------------------------------------------------------------------------
# The training loop
# ----------------------------------------------------------------------------------------------

def finetune(run: TransferRun, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, *, iters: int,
             batches: Callable[[int], Iterator], step: Callable[[Any], torch.Tensor | None], args: argparse.Namespace,
             desc: str, accumulate: int = 1) -> list[float]:
    """Train ``iters`` iterations (from the checkpoint's on ``--resume``); return the recent losses.

    ``batches(start)``: the data stream from batch ``start``; ``step(batch)``: the loss of one batch
    (None to skip it: no update, the iteration still counts). Writes ``log.jsonl`` every
    ``--log-every`` iterations and the rolling checkpoint every ``--ckpt-every`` and at the end.

    ``accumulate`` > 1 (Caffe's ``iter_size``): an iteration is one update from ``accumulate`` batches
    (:func:`accumulate_gradients`); the schedule, the log and the checkpoints count updates, so a
    checkpoint always falls on an update boundary and the data position is ``iteration * accumulate``.
    """
    if accumulate < 1:
        raise ValueError(f"accumulate must be at least 1, got {accumulate}")
    folder = run.folder
    state = folder.load_checkpoint()
    start, losses = 0, []
    if state is not None:
        problem = resume_problem(state, iters, args)
        if problem is None and state.get("accumulate", 1) != accumulate:
            problem = f"the run accumulated {state.get('accumulate', 1)} batches per update, not {accumulate}"
        if problem:
            run.close()
            raise UsageError(f"--resume: {folder.path}: {problem}")
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as exc:  # another model: e.g. the run was --rescale'd (BatchNorm absorbed), or not
            run.close()
            first = str(exc).strip().splitlines()[0]
            raise UsageError(f"--resume: {folder.path}: its checkpoint does not fit this model (the run used other "
                             f"model options, e.g. --rescale, --colour-input; see its config.json): {first}") from None
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        start, losses = state["step"], list(state["losses"])
        run.runtime_skipped.update(state["skipped"])
        LOG.info("resumed %s at iteration %d of %d", folder.path, start, iters)
    writer = tensorboard_writer(run) if args.tensorboard else None
    stream = batches(start * accumulate)
    progress = tqdm(range(start, iters), desc=desc, unit="it", mininterval=2, initial=start, total=iters)
    for iteration in progress:
        if accumulate == 1:
            loss = step(next(stream))
            if loss is not None:
                sgd_update(loss, optimizer, scheduler, args.clip_grad)
                losses = (losses + [loss.item()])[-100:]
        else:
            optimizer.zero_grad(set_to_none=True)
            micro = accumulate_gradients(step, stream, accumulate)
            if micro:  # as a skipped batch above: no micro-batch with a loss, no update
                if args.clip_grad > 0:
                    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]],
                                                   args.clip_grad)
                optimizer.step()
                scheduler.step()
                losses = (losses + [sum(micro) / len(micro)])[-100:]
        done = iteration + 1
        if done % args.log_every == 0 or done == iters:
            recent = losses[-args.log_every:]
            record = {"step": done, "loss": sum(recent) / len(recent) if recent else None,
                      "lr": scheduler.get_last_lr()[0]}
            folder.log(record)
            progress.set_postfix(loss=f"{record['loss'] or float('nan'):.4f}", lr=f"{record['lr']:.1e}")
            if writer is not None:
                for key, value in record.items():
                    if key != "step" and value is not None:
                        writer.add_scalar(f"train/{key}", value, done)
        if done % args.ckpt_every == 0 or done == iters:
            folder.save_checkpoint({
                "step": done, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "rng": rng_state(), "losses": losses,
                # the data position: the stream restarts at batch `batches_drawn` (EpochBatches)
                "data_state": {"batches_drawn": done * accumulate, "seed": args.seed, "batch_size": args.batch_size},
                "accumulate": accumulate,
                "skipped": dict(run.runtime_skipped), "benchmark": run.benchmark, "encoder": run.encoder_name,
            })
    if writer is not None:
        writer.close()
    return losses


def resume_problem(state: dict, iters: int, args: argparse.Namespace) -> str | None:
    """Why the checkpoint cannot be continued with these options (None: it can)."""
    if state["step"] > iters:
        return f"its checkpoint is at iteration {state['step']}, past --iters {iters}"
    for option, value in state["data_state"].items():  # the data stream must be the one that was cut
        if option != "batches_drawn" and getattr(args, option) != value:
            return f"the run used --{option.replace('_', '-')} {value}, not {getattr(args, option)}"
    return None


def tensorboard_writer(run: TransferRun):
    from torch.utils.tensorboard import SummaryWriter  # optional dependency, checked by validate_training

    return SummaryWriter(str(run.out / "tensorboard"))

