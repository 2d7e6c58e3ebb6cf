"""PASCAL VOC2007 multi-label classification by fine-tuning (Krähenbühl et al.; docs/protocols.md section 5).

    python benchmarks/voc_classification.py --checkpoint runs/pretrain/checkpoint.pth \
        --data /datasets --finetune fc8            # fc8 / fc6-8 / all, the paper's three rows
    python benchmarks/voc_classification.py        # built-in VOCdevkit, random alexnet_lab, short run

Recipe (defaults = the protocol, as in Krähenbühl et al.'s released voc-classification code):

* data: VOC2007 ``trainval`` -> ``test``; labels from the XML annotations, an image's class is +1 if a
  non-difficult object of it is present, ignored (masked out of the loss and the AP) if only
  difficult ones are, -1 otherwise;
* model: the encoder in its transfer geometry (alexnet_lab: CaffeNet, 227 input) and a new ``fc8``, a
  Linear(20) on the pooled feature tap (fc7 for AlexNet-style encoders; the deepest probe tap,
  global-average-pooled, otherwise: res5 for ResNet-50), weights N(0, 0.01) and bias 0.1 (the released
  code's init of its new layers);
* ``--finetune fc8``: only fc8 trains; ``fc6-8``: also fc6 and fc7 (for other encoders the last block:
  ResNet-50's res5); ``all``: everything. Frozen parts run in eval mode (BatchNorm statistics fixed)
  and after training every frozen tensor is compared with its value before: any change is an error.
  BatchNorm inside trained parts stays in eval mode too (``--bn frozen``: BN folded as for transfer,
  docs/protocols.md section 3) unless ``--bn train``;
* loss: sigmoid cross-entropy summed over the non-ignored labels, divided by the batch size (the
  released code's loss layer); SGD momentum 0.9, lr 1e-3 (biases x2, Caffe's convention in that code),
  weight decay 1e-6, gradients clipped to L2 norm 10, batch 16, 80k iterations, lr x0.5 every 10k
  (``--iters`` scales the steps with the length; the built-in data defaults to 1500 iterations);
* augmentation: the image rescaled by a random factor in [0.5, 2], a random 227 crop (padded with the
  mean colour when the image is smaller), a random mirror;
* test: mAP over the 20 classes on VOC2007 test with 10 random crops per image, drawn as in training
  (the sigmoid scores averaged), and with the single centre crop of the unscaled image.

Rows (results CSV): benchmark ``voc_classification``, tap = the fine-tune setting, protocol ``10crop`` /
``center``, metrics ``mAP`` and ``AP_<class>`` (percent). As published (AlexNet, 10 crops, mAP):
colorization 52.4 / 61.5 / 65.9 for fc8 / fc6-8 / all; ImageNet labels 76.8 / 78.9 / 79.9.
"""

from __future__ import annotations

import argparse
import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ssl_colorize.data.transforms import random_crop_flip
from ssl_colorize.data.voc import (
    VOC_CLASSES,
    VOCImages,
    classification_targets,
    load_main_split,
    split_skipped,
)
from ssl_colorize.voc_metrics import classification_ap, mean_ap
from ssl_colorize.engine.finetune import (
    BN_MODES,
    FINETUNE_SETTINGS,
    PAD_RGB,
    TransferRun,
    UntouchedGuard,
    add_common_args,
    checkpoint_label,
    cycle,
    dataset_name,
    default_crop,
    feature_tap,
    finetune_modules,
    load_transfer_encoder,
    resolve_data,
    resolve_device,
    resolve_input,
    schedule_length,
    seed_everything,
    set_requires_grad,
    set_train_mode,
    sgd_update,
    step_lr,
    to_model_input,
    trained_tensor_names,
)

LOG = logging.getLogger("ssl_colorize.voc.classification")
BENCHMARK = "voc_classification"
PROTOCOL_ITERS, PROTOCOL_STEP, PROTOCOL_GAMMA = 80_000, 10_000, 0.5
BUILTIN_ITERS = 1500


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="VOC2007 classification by fine-tuning (docs/protocols.md section 5)",
                                add_help=add_help)
    p.add_argument("--finetune", choices=FINETUNE_SETTINGS, default="all",
                   help="what trains: fc8 (new classifier only), fc6-8, all (default all)")
    p.add_argument("--bn", choices=BN_MODES, default="frozen",
                   help="BatchNorm in fine-tuned layers: frozen statistics (folded, default) or batch statistics")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=1e-6)
    p.add_argument("--clip-grad", type=float, default=10.0, help="clip the gradients' global L2 norm (0: off)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--crop", type=int, default=None, help="crop size (default 227 for AlexNet-style encoders, else 224)")
    p.add_argument("--min-scale", type=float, default=0.5)
    p.add_argument("--max-scale", type=float, default=2.0)
    p.add_argument("--test-crops", type=int, default=10, help="random crops per test image (default 10)")
    p.add_argument("--eval-batch-size", type=int, default=8, help="test images per forward (each with all its crops)")
    p.add_argument("--fc8-std", type=float, default=0.01)
    add_common_args(p, iters_help=f"training iterations (default {PROTOCOL_ITERS}, {BUILTIN_ITERS} on the built-in "
                                  "data); the lr steps scale with it")
    return p


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------

class VOCClassifier(nn.Module):
    """Encoder -> the feature tap (global-average-pooled when spatial) -> new fc8 (20 logits)."""

    def __init__(self, encoder: nn.Module, tap: str, num_classes: int = len(VOC_CLASSES), std: float = 0.01):
        super().__init__()
        self.encoder = encoder
        self.tap = tap
        self.fc8 = nn.Linear(encoder.taps[tap].channels, num_classes)
        nn.init.normal_(self.fc8.weight, std=std)
        nn.init.constant_(self.fc8.bias, 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.encoder.forward_taps(x, [self.tap])[self.tap]
        return self.fc8(features.mean(dim=(2, 3)))


# ----------------------------------------------------------------------------------------------
# Augmentation (uint8 (3, H, W) tensors)
# ----------------------------------------------------------------------------------------------

def rescale(image: torch.Tensor, factor: float) -> torch.Tensor:
    h, w = image.shape[-2:]
    size = (max(1, round(h * factor)), max(1, round(w * factor)))
    if size == (h, w):
        return image
    out = F.interpolate(image[None].float(), size=size, mode="bilinear", antialias=factor < 1, align_corners=False)
    return out[0].round_().clamp_(0, 255).to(torch.uint8)


def pad_to(image: torch.Tensor, crop: int) -> torch.Tensor:
    """Pad (centred) with the mean colour so both sides are at least ``crop``."""
    h, w = image.shape[-2:]
    ph, pw = max(0, crop - h), max(0, crop - w)
    if not ph and not pw:
        return image
    out = torch.empty(3, h + ph, w + pw, dtype=image.dtype)
    out[:] = torch.tensor(PAD_RGB, dtype=image.dtype)[:, None, None]
    out[:, ph // 2: ph // 2 + h, pw // 2: pw // 2 + w] = image
    return out


def random_scale_crop(image: torch.Tensor, crop: int, scales: tuple[float, float],
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Rescale by a factor uniform in ``scales``, random ``crop`` window (padded if needed), mirror at 1/2."""
    factor = scales[0] + (scales[1] - scales[0]) * float(torch.rand(1, generator=generator))
    return random_crop_flip(pad_to(rescale(image, factor), crop), crop, generator)


def centre_crop(image: torch.Tensor, crop: int) -> torch.Tensor:
    image = pad_to(image, crop)
    h, w = image.shape[-2:]
    top, left = (h - crop) // 2, (w - crop) // 2
    return image[:, top: top + crop, left: left + crop]


class TrainCrops:
    def __init__(self, crop: int, scales: tuple[float, float]):
        self.crop, self.scales = crop, scales

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return random_scale_crop(image, self.crop, self.scales)


class TestCrops:
    """``n`` random crops drawn as in training, then the centre crop: (n + 1, 3, crop, crop).

    Each image's crops come from a generator seeded by (seed, image index): the evaluation is
    reproducible whatever the worker count.
    """

    def __init__(self, crop: int, scales: tuple[float, float], n: int, seed: int):
        self.crop, self.scales, self.n, self.seed = crop, scales, n, seed

    def crops(self, image: torch.Tensor, index: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        views = [random_scale_crop(image, self.crop, self.scales, generator) for _ in range(self.n)]
        return torch.stack(views + [centre_crop(image, self.crop)])


class _TestImages(VOCImages):
    """VOCImages whose transform needs the image index (seeded test crops)."""

    def __init__(self, records, crops: TestCrops):
        super().__init__(records)
        self.test_crops = crops

    def __getitem__(self, index: int):
        item = super().__getitem__(index)
        if isinstance(item, tuple):
            image, idx = item
            return self.test_crops.crops(image, idx), idx
        return item


class Collate:
    """Stack the decodable items; keep the skipped ones for the run's count."""

    def __call__(self, items: list):
        good, skipped = split_skipped(items)
        if not good:
            return None, torch.empty(0, dtype=torch.long), skipped
        return torch.stack([g[0] for g in good]), torch.tensor([g[1] for g in good]), skipped


# ----------------------------------------------------------------------------------------------
# Train / evaluate
# ----------------------------------------------------------------------------------------------

def masked_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sigmoid cross-entropy over the labels that are not ignored (target 0), summed and divided by
    the batch size (the released code's loss normalisation)."""
    mask = (targets != 0).to(logits.dtype)
    positive = (targets > 0).to(logits.dtype)
    loss = F.binary_cross_entropy_with_logits(logits, positive, reduction="none")
    return (loss * mask).sum() / logits.shape[0]


def parameter_groups(params: list[nn.Parameter], named: dict[int, str], lr: float, wd: float) -> list[dict]:
    """Caffe's convention in the released code: biases at twice the learning rate."""
    weights = [p for p in params if not named[id(p)].endswith("bias")]
    biases = [p for p in params if named[id(p)].endswith("bias")]
    groups = [{"params": weights, "lr": lr, "weight_decay": wd}]
    if biases:
        groups.append({"params": biases, "lr": 2 * lr, "weight_decay": wd})
    return groups


@torch.no_grad()
def evaluate(model: VOCClassifier, loader: DataLoader, n_crops: int, n_images: int, mode: str,
             device: torch.device, run: TransferRun) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(10-crop scores, centre-crop scores, seen mask), scores (N, 20) sigmoid probabilities."""
    model.eval()
    multi = np.zeros((n_images, len(VOC_CLASSES)))
    centre = np.zeros((n_images, len(VOC_CLASSES)))
    seen = np.zeros(n_images, dtype=bool)
    for crops, indices, skipped in tqdm(loader, desc="test", unit="batch", mininterval=2):
        run.skipped_at_runtime(skipped)
        if crops is None:
            continue
        b, k = crops.shape[:2]
        x = to_model_input(crops.flatten(0, 1).to(device, non_blocking=True), mode)
        probs = torch.sigmoid(model(x)).reshape(b, k, -1).double().cpu().numpy()
        idx = indices.numpy()
        multi[idx] = probs[:, :n_crops].mean(1)
        centre[idx] = probs[:, n_crops]
        seen[idx] = True
    return multi, centre, seen


def main(args: argparse.Namespace) -> dict:
    seed_everything(args.seed)
    device = resolve_device(args.device)
    data_root, builtin = resolve_data(args.data)
    # Validate data before building anything: a missing split file is a ValueError now.
    train_records, train_report = load_main_split(data_root, 2007, "trainval")
    test_records, test_report = load_main_split(data_root, 2007, "test")
    encoder, encoder_name = load_transfer_encoder(args.checkpoint, args.encoder, args.seed)
    mode = resolve_input(encoder, args.input)
    crop = args.crop or default_crop(encoder)
    iters = schedule_length(args.iters, PROTOCOL_ITERS, builtin, BUILTIN_ITERS)
    if not 0 < args.min_scale <= args.max_scale:
        raise ValueError(f"--min-scale {args.min_scale} / --max-scale {args.max_scale}: need 0 < min <= max")
    if args.test_crops < 1:
        raise ValueError(f"--test-crops must be at least 1, got {args.test_crops}")

    run = TransferRun(BENCHMARK, args, encoder_name, checkpoint_label(args.checkpoint))
    run.add_report(train_report)
    run.add_report(test_report)
    train_targets = torch.from_numpy(classification_targets(train_records))
    test_targets = classification_targets(test_records)
    scales = (args.min_scale, args.max_scale)

    tap = feature_tap(encoder)
    model = VOCClassifier(encoder, tap, std=args.fc8_std).to(device)
    modules = finetune_modules(encoder, args.finetune)
    encoder_params = set_requires_grad(encoder, modules)
    guard = UntouchedGuard(encoder, allowed=trained_tensor_names(encoder, modules))
    named = {id(p): n for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(
        parameter_groups(list(model.fc8.parameters()) + encoder_params, named, args.lr, args.weight_decay),
        lr=args.lr, momentum=args.momentum,
    )
    scheduler = step_lr(optimizer, iters, PROTOCOL_ITERS, PROTOCOL_STEP, PROTOCOL_GAMMA)
    LOG.info("%s: tap %s, finetune %s (%d encoder tensors train), input %s, crop %d, %d iterations, %s",
             encoder_name, tap, args.finetune, len(encoder_params), mode, crop, iters, device)

    generator = torch.Generator().manual_seed(args.seed)
    train_loader = DataLoader(
        VOCImages(train_records, TrainCrops(crop, scales)), batch_size=args.batch_size, shuffle=True,
        drop_last=len(train_records) >= args.batch_size, num_workers=args.workers, collate_fn=Collate(),
        generator=generator, persistent_workers=args.workers > 0, pin_memory=device.type == "cuda",
    )
    batches = cycle(train_loader)
    losses = []
    progress = tqdm(range(iters), desc=f"{BENCHMARK} {args.finetune}", unit="it", mininterval=2)
    for _ in progress:
        set_train_mode(encoder, modules, args.bn)
        model.fc8.train()
        images, indices, skipped = next(batches)
        run.skipped_at_runtime(skipped)
        if images is None:
            continue
        x = to_model_input(images.to(device, non_blocking=True), mode)
        loss = masked_bce(model(x), train_targets[indices].to(device))
        sgd_update(loss, optimizer, scheduler, args.clip_grad)
        losses.append(loss.item())
        if len(losses) % 20 == 0:
            progress.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
    guard.check(f"--finetune {args.finetune}")  # frozen parts (BN statistics included) did not move
    set_train_mode(encoder, modules, args.bn, training=False)

    test_loader = DataLoader(
        _TestImages(test_records, TestCrops(crop, scales, args.test_crops, args.seed)),
        batch_size=args.eval_batch_size, shuffle=False, num_workers=args.workers, collate_fn=Collate(),
    )
    multi, centre, seen = evaluate(model, test_loader, args.test_crops, len(test_records), mode, device, run)
    results = {}
    hparams = {
        "iters": iters, "lr": args.lr, "momentum": args.momentum, "weight_decay": args.weight_decay,
        "batch_size": args.batch_size, "crop": crop, "scales": list(scales), "bn": args.bn, "input": mode,
        "feature_tap": tap, "test_crops": args.test_crops, "clip_grad": args.clip_grad, "data": str(data_root),
        "train_images": len(train_records), "test_images": int(seen.sum()),
    }
    for protocol, scores in ((f"{args.test_crops}crop", multi), ("center", centre)):
        aps = classification_ap(scores[seen], test_targets[seen]) * 100
        results[protocol] = {"mAP": mean_ap(aps), **{f"AP_{c}": float(a) for c, a in zip(VOC_CLASSES, aps)}}
        row = dict(tap=args.finetune, dataset=dataset_name(builtin, "voc2007"), split="test", protocol=protocol,
                   hparams={**hparams, "classes_with_positives": int(np.isfinite(aps).sum())})
        run.row(metric="mAP", value=mean_ap(aps), **row)
        for name, ap in zip(VOC_CLASSES, aps):
            run.row(metric=f"AP_{name}", value=float(ap), **row)
        LOG.info("%s %s mAP %.2f", args.finetune, protocol, mean_ap(aps))
    run.extra["final_loss"] = float(np.mean(losses[-20:])) if losses else float("nan")
    return run.finish(results)


def cli(argv=None) -> dict:
    return main(get_args_parser().parse_args(argv))


if __name__ == "__main__":
    cli()
