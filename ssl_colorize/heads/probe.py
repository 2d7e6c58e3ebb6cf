"""Frozen-layer linear probes (docs/protocols.md section 4): the heads of ``ssl_colorize.benchmarks.linear_probe``.

One frozen forward pass of the encoder per batch feeds one classifier per tap; each classifier is
*pool to about 9k dims -> per-channel BatchNorm without affine -> Linear(num_classes)* and the taps'
losses are summed, so all taps train at once (the released probe's "one pass" design, as in VISSL).

Pooling follows one of three published protocols, ``zhang`` (Caffe's Resize layer, the released
probe), ``goyal`` (fixed-kernel average pooling) and ``max`` (adaptive max pooling): see
:mod:`ssl_colorize.heads.probe_pool`, whose public :func:`pool_features` this module exports too.

Frozen means frozen (DESIGN.md, "Contracts"): the encoder stays in eval mode (BatchNorm statistics
do not move), its parameters do not require gradients, its forward runs under ``torch.no_grad``, and
:class:`FrozenEncoderGuard` compares every encoder tensor (parameters and buffers) with a snapshot
taken before training, raising RuntimeError naming the tensors that changed.

The released AlexNet is probed with BatchNorm folded into the convolutions and Krähenbühl rescaling
(docs/protocols.md section 3). Neither changes a probe's result here: a no-affine BatchNorm in eval mode is
the per-channel affine map the fold would put into the convolution, and a positive per-layer scale is
removed by the probe's own per-channel BatchNorm. The probe therefore uses the encoder as it is.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Sampler

from ssl_colorize.color import lab_to_rgb, rgb_to_lab
from ssl_colorize.data.images import Sample, SkippedFile
from ssl_colorize.data.transforms import random_crop_flip, resize_shorter
from ssl_colorize.heads.probe_pool import TARGET_DIMS, TapPool, pool_features, protocol_name, tap_pool

__all__ = [
    "INPUT_MODES",
    "pool_features",  # the public pooling of every protocol (docs/linear-probes.md); defined in probe_pool
    "ProbeHead",
    "FrozenEncoderGuard",
    "resolve_input_mode",
    "encoder_input",
    "tap_shapes",
    "MultiTapProbe",
    "evaluate",
    "SeededTrainCrops",
    "EpochSampler",
]

#: How the encoder's input is formed from an RGB crop. "auto": L for L encoders, RGB for RGB
#: encoders; "rgb": RGB in [0, 1] (RGB encoders only); "grey": the crop's L channel shown as neutral
#: grey RGB (a = b = 0), for an RGB encoder seeing exactly the information an L encoder sees.
INPUT_MODES = ("auto", "rgb", "grey")


class ProbeHead(nn.Module):
    """One tap's linear classifier: pool -> BatchNorm2d(channels, affine=False) -> flatten -> Linear.

    The normalisation is per channel (96 statistics at AlexNet conv1), as the released probe's Caffe
    ``BatchNorm`` on the pooled 4-D blob, FSSB and VISSL normalise. ``pool``: a :class:`TapPool`
    (see :func:`tap_pool`). The Linear starts from N(0, 0.01) weights and zero bias.
    """

    def __init__(self, pool: TapPool, channels: int, num_classes: int) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"a linear probe needs at least 2 classes, got {num_classes}")
        self.channels = int(channels)
        self.pool = pool
        self.feature_dim = self.channels * pool.grid[0] * pool.grid[1]
        self.bn = nn.BatchNorm2d(self.channels, affine=False)
        self.fc = nn.Linear(self.feature_dim, num_classes)
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled, flattened features (before the BatchNorm): (N, feature_dim)."""
        return torch.flatten(self.pool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.bn(self.pool(x)), 1))

    def describe(self) -> dict:
        return {**self.pool.describe(), "channels": self.channels, "feature_dim": self.feature_dim}


# ----------------------------------------------------------------------------------------------
# The frozen-encoder guard
# ----------------------------------------------------------------------------------------------

def _encoder_tensors(encoder: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter and buffer (BatchNorm statistics included) under its qualified name."""
    yield from encoder.named_parameters(remove_duplicate=False)
    yield from encoder.named_buffers(remove_duplicate=False)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Exact equality of shape, dtype and values, where NaN equals NaN."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if torch.equal(a, b):
        return True
    if a.is_floating_point():
        nan_a, nan_b = a.isnan(), b.isnan()
        return torch.equal(nan_a, nan_b) and torch.equal(a[~nan_a], b[~nan_b])
    return False


class FrozenEncoderGuard:
    """Snapshot every tensor of an encoder now; :meth:`check` raises if any has changed since.

    The snapshot is a copy on the tensors' own device, so the comparison is exact (NaN equals NaN).
    """

    def __init__(self, encoder: nn.Module) -> None:
        self.encoder = encoder
        self.snapshot = {name: t.detach().clone() for name, t in _encoder_tensors(encoder)}

    def changed(self) -> list[str]:
        """Names of the tensors that differ from the snapshot (value, shape or dtype), or appeared / vanished."""
        current = dict(_encoder_tensors(self.encoder))
        names = set(current) ^ set(self.snapshot)
        names.update(
            name for name, before in self.snapshot.items() if name in current and not _same(current[name].detach(), before)
        )
        return sorted(names)

    def check(self) -> None:
        """Raise RuntimeError naming the encoder tensors that changed since the snapshot."""
        changed = self.changed()
        if changed:
            shown = ", ".join(changed[:12]) + (f", ... ({len(changed)} in all)" if len(changed) > 12 else "")
            raise RuntimeError(
                f"the frozen encoder changed during probe training: {shown}. A probe must leave the encoder "
                "untouched (eval mode, no gradients, no optimizer); its results are void"
            )

    def fingerprint(self) -> str:
        """A SHA-256 over the snapshot (names and bytes): identifies the exact encoder across a resume."""
        digest = hashlib.sha256()
        for name in sorted(self.snapshot):
            tensor = self.snapshot[name].detach().cpu().contiguous()
            digest.update(name.encode())
            digest.update(str(tensor.dtype).encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# Inputs and tap shapes
# ----------------------------------------------------------------------------------------------

def resolve_input_mode(encoder: nn.Module, input_mode: str = "auto") -> str:
    """The effective input mode for ``encoder``: "L", "rgb" or "grey" (see INPUT_MODES)."""
    if input_mode not in INPUT_MODES:
        raise ValueError(f"input mode must be one of {INPUT_MODES}, got {input_mode!r}")
    space = getattr(encoder, "input_space", None)
    if space not in ("L", "rgb"):
        raise ValueError(f"{type(encoder).__name__} declares no input_space ('L' or 'rgb')")
    if space == "L":
        if input_mode not in ("auto",):
            raise ValueError(f"input mode {input_mode!r} is for RGB encoders; {type(encoder).__name__} takes L")
        return "L"
    return "rgb" if input_mode == "auto" else input_mode


def encoder_input(images: torch.Tensor, mode: str) -> torch.Tensor:
    """uint8 (N, 3, H, W) RGB crops -> the encoder's input.

    "L": the L channel of Lab, (N, 1, H, W) in [0, 100] (ssl_colorize.color.rgb_to_lab);
    "rgb": RGB in [0, 1]; "grey": the L channel turned back into neutral grey RGB.
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 (N, 3, H, W) images, got {images.dtype} {tuple(images.shape)}")
    rgb = images.float() / 255.0
    if mode == "rgb":
        return rgb
    lightness = rgb_to_lab(rgb, validate=False)[:, :1]
    if mode == "L":
        return lightness
    if mode == "grey":
        lab = torch.cat((lightness, torch.zeros_like(lightness).expand(-1, 2, -1, -1)), 1)
        # Neutral Lab is R = G = B up to float rounding of the colour matrices; make it exact.
        return lab_to_rgb(lab, validate=False).mean(1, keepdim=True).repeat(1, 3, 1, 1)
    raise ValueError(f"unknown input mode {mode!r}; expected 'L', 'rgb' or 'grey'")


def _card_or_none(encoder: nn.Module):
    """The encoder's card when it was built by ``create_model``, else None (the pooling rules apply)."""
    from ssl_colorize.models.cards import card_of

    try:
        return card_of(encoder)
    except ValueError:
        return None


@torch.no_grad()
def tap_shapes(encoder: nn.Module, taps: Iterable[str], crop: int, input_mode: str = "L") -> dict[str, tuple[int, int, int]]:
    """(C, H, W) of each tap for a ``crop`` x ``crop`` input, from one dry forward in eval mode.

    Raises ValueError when the crop is too small for the encoder to reach a requested tap.
    """
    taps = list(taps)
    first = next(iter(encoder.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    probe_images = torch.zeros(1, 3, crop, crop, dtype=torch.uint8, device=device)
    was_training = encoder.training
    encoder.eval()
    try:
        maps = encoder.forward_taps(encoder_input(probe_images, input_mode), taps)
    except RuntimeError as exc:  # a map that shrank to nothing under a kernel
        raise ValueError(f"crop {crop} is too small for {type(encoder).__name__} to reach taps {taps}: {exc}") from exc
    finally:
        encoder.train(was_training)
    return {name: tuple(int(s) for s in m.shape[1:]) for name, m in maps.items()}


# ----------------------------------------------------------------------------------------------
# All taps in one pass
# ----------------------------------------------------------------------------------------------

class MultiTapProbe(nn.Module):
    """A frozen encoder and one :class:`ProbeHead` per tap, trained together from one forward pass.

    ``self.heads`` holds everything that trains (its state_dict is the probe's checkpoint); the
    encoder is a submodule so ``.to(device)`` moves it, but ``train()`` keeps it in eval mode and its
    parameters never require gradients.
    """

    def __init__(
        self,
        encoder: nn.Module,
        taps: Iterable[str],
        num_classes: int,
        crop: int,
        protocol: str | None = None,
        input_mode: str = "auto",
        target_dims: int = TARGET_DIMS,
        *,
        pool: str | None = None,
    ) -> None:
        """``protocol``: "zhang", "goyal" or "max" (an old pool name is accepted, also as ``pool=``);
        default: the encoder card's (``card.probe.protocol``), "zhang" for an encoder without a card."""
        super().__init__()
        card = _card_or_none(encoder)
        chosen = protocol or pool or (card.probe.protocol if card is not None else "zhang")
        self.protocol = protocol_name(chosen)
        self.encoder = encoder.eval()
        self.encoder.requires_grad_(False)
        self.taps = encoder.resolve_taps(list(taps))
        self.input_mode = resolve_input_mode(encoder, input_mode)
        self.crop = int(crop)
        self.num_classes = int(num_classes)
        self.shapes = tap_shapes(encoder, self.taps, self.crop, self.input_mode)
        self.heads = nn.ModuleDict(
            {
                tap: ProbeHead(tap_pool(self.protocol, tap, c, (h, w), card, target_dims), c, num_classes)
                for tap, (c, h, w) in self.shapes.items()
            }
        )

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        """SGD groups as the released probe's prototxt sets its InnerProduct layers: weights lr x1,
        decay x1; biases lr x2, decay 0 (``param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2
        decay_mult: 0 }``). ``lr_mult`` is read by the trainer when it sets the learning rate."""
        weights = [head.fc.weight for head in self.heads.values()]
        biases = [head.fc.bias for head in self.heads.values()]
        return [{"params": weights, "lr_mult": 1.0, "weight_decay": weight_decay},
                {"params": biases, "lr_mult": 2.0, "weight_decay": 0.0}]

    def train(self, mode: bool = True) -> "MultiTapProbe":
        """Heads follow ``mode``; the encoder stays in eval mode (its BatchNorm statistics must not move)."""
        super().train(mode)
        self.encoder.eval()
        return self

    def describe(self) -> dict[str, dict]:
        """Per tap: map shape, pooling (grid, kernel, stride) and feature dimension."""
        return {tap: head.describe() for tap, head in self.heads.items()}

    def encoder_features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 (N, 3, H, W) crops -> the requested tap maps, from one frozen forward pass."""
        with torch.no_grad():
            return self.encoder.forward_taps(encoder_input(images, self.input_mode), self.taps)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 crops -> tap name -> (N, num_classes) logits."""
        maps = self.encoder_features(images)
        return {tap: self.heads[tap](maps[tap]) for tap in self.taps}

    def training_step(
        self, images: torch.Tensor, labels: torch.Tensor, optimizer: torch.optim.Optimizer
    ) -> dict[str, dict[str, float]]:
        """One SGD step on the sum of the taps' cross-entropies; per tap: loss and correct count."""
        logits = self(images)
        losses = {tap: F.cross_entropy(out, labels) for tap, out in logits.items()}
        optimizer.zero_grad(set_to_none=True)
        torch.stack(list(losses.values())).sum().backward()
        optimizer.step()
        return {
            tap: {"loss": float(losses[tap].detach()), "correct": int((out.argmax(1) == labels).sum())}
            for tap, out in logits.items()
        }


@torch.no_grad()
def evaluate(
    probe: MultiTapProbe,
    batches: Iterable,
    device: torch.device | str,
    max_batches: int | None = None,
    progress: bool = False,
    skipped: list[str] | None = None,
) -> dict[str, dict[str, float]]:
    """Top-1 and top-5 accuracy (percent) of every head on ``batches`` of centre crops.

    ``skipped``: a list the paths of undecodable files are appended to (they are not scored).

    ``batches`` yields :class:`ssl_colorize.data.Batch` objects (``images`` uint8, ``labels``). With
    fewer than 5 classes "top5" is top-k for k = the number of classes (then 100%). Returns
    ``{tap: {"top1", "top5", "n", "loss"}}``.
    """
    from tqdm import tqdm

    probe.eval()
    k = min(5, probe.num_classes)
    correct1 = {tap: 0 for tap in probe.taps}
    correct5 = {tap: 0 for tap in probe.taps}
    loss_sum = {tap: 0.0 for tap in probe.taps}
    seen = 0
    total = None if max_batches is None else max_batches
    bar = tqdm(batches, desc="eval", total=total, disable=not progress, leave=False, unit="batch",
               mininterval=0.1 if sys.stderr.isatty() else 30.0)
    for index, batch in enumerate(bar):
        if max_batches is not None and index >= max_batches:
            break
        if skipped is not None:
            skipped.extend(batch.skipped)
        if batch.labels.numel() == 0:
            continue
        images = batch.images.to(device, non_blocking=True)
        labels = batch.labels.to(device, non_blocking=True)
        for tap, out in probe(images).items():
            top = out.topk(k, dim=1).indices
            hits = top == labels[:, None]
            correct1[tap] += int(hits[:, 0].sum())
            correct5[tap] += int(hits.any(1).sum())
            loss_sum[tap] += float(F.cross_entropy(out, labels, reduction="sum"))
        seen += labels.numel()
    if seen == 0:
        raise ValueError("evaluation saw no decodable image")
    return {
        tap: {
            "top1": 100.0 * correct1[tap] / seen,
            "top5": 100.0 * correct5[tap] / seen,
            "loss": loss_sum[tap] / seen,
            "n": seen,
        }
        for tap in probe.taps
    }


# ----------------------------------------------------------------------------------------------
# Exactly resumable training data
# ----------------------------------------------------------------------------------------------

def _derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes and Python versions (unlike hash())."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class SeededTrainCrops(Dataset):
    """Random crop + mirror of every image, drawn from a generator seeded by (seed, epoch, index).

    The same crops as :class:`ssl_colorize.data.TrainTransform` (resize the shorter side, then
    :func:`random_crop_flip`), but each sample's randomness depends only on its index and the epoch,
    not on worker processes or the global RNG: a run resumed mid-epoch sees exactly the crops the
    uninterrupted run saw, whatever ``--workers`` is. Call :meth:`set_epoch` before each epoch.
    ``base`` is an :class:`ssl_colorize.data.ImageFiles` without a transform.
    """

    def __init__(self, base: Dataset, crop: int, resize: int | None, seed: int) -> None:
        self.base, self.crop, self.resize, self.seed = base, int(crop), resize, int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        item = self.base[index]
        if isinstance(item, SkippedFile):
            return item
        generator = torch.Generator().manual_seed(_derived_seed(self.seed, self.epoch, index))
        image = resize_shorter(item.image, self.resize) if self.resize else item.image
        return Sample(random_crop_flip(image, self.crop, generator=generator), item.label, item.index)


class EpochSampler(Sampler[int]):
    """A permutation of range(n) fixed by (seed, epoch), started at position ``start``.

    Resuming mid-epoch with ``start = batches_done * batch_size`` continues the same order.
    """

    def __init__(self, n: int, seed: int, epoch: int, start: int = 0) -> None:
        self.n, self.seed, self.epoch, self.start = int(n), int(seed), int(epoch), int(start)

    def order(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(_derived_seed(self.seed, self.epoch, -1))
        return torch.randperm(self.n, generator=generator)

    def __iter__(self) -> Iterator[int]:
        return iter(self.order()[self.start :].tolist())

    def __len__(self) -> int:
        return max(0, self.n - self.start)
