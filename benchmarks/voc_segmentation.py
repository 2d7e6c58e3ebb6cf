"""PASCAL VOC semantic segmentation: an FCN-32s-style head on the pretrained encoder (docs/protocols.md section 5).

    python benchmarks/voc_segmentation.py --checkpoint ck.pth --data /datasets --sbd /datasets/SBD \
        --eval-ids seg11valid.txt                     # the paper's setting: + SBD, seg11valid
    python benchmarks/voc_segmentation.py --checkpoint ck.pth --data /datasets --colour-input
    python benchmarks/voc_segmentation.py             # built-in VOCdevkit, random alexnet_lab, short run

Model (FCN-32s, Long et al.): the encoder run fully convolutionally up to its feature tap -- fc7 for
alexnet_lab, whose fc6 (a 6x6 convolution) and fc7 (1x1) are convolutions already; the deepest probe
tap otherwise (res5, or conv5 for torchvision's AlexNet, whose fc layers are Linear) -- then dropout,
a 1x1 "score" convolution to 21 classes (zero-initialised, as FCN), and bilinear upsampling to the
image. As FCN's conv1 pad of 100, the input is padded by ``--pad`` pixels (100 by default for AlexNet,
0 for the others) with the value the encoder normalises to zero, so that small images still reach a
fc7 output; the upsampling then samples the score map exactly at each original pixel's position
(:func:`feature_geometry`: output cell i is centred on input pixel offset + stride * i, 113 + 32 i for
AlexNet's fc7) -- FCN's bilinear deconvolution followed by its crop, in one step.

"Colour input" (``--colour-input``, L encoders only): a second conv1, on ab (ab / 100), with the same
geometry as the encoder's first convolution and zero-initialised, whose output is added to the L
branch's conv1 output (before its BatchNorm and ReLU); it learns while the rest fine-tunes.

Data: VOC2012 ``ImageSets/Segmentation/train`` (``--year 2011`` for the VOC2011 devkit) and, with
``--sbd PATH``, SBD's train + val images, minus every id of the evaluation set (so seg11valid stays
unseen; where an id has both, the VOC mask with its 255 borders wins). Evaluation on VOC2012
``val`` or the ids of ``--eval-ids FILE`` (e.g. seg11valid.txt, 736 images), whole images at one
scale. Metric: mean IoU over the 21 classes (background included), label 255 ignored, from one
confusion matrix over all pixels of the evaluation set (ssl_colorize.voc_metrics.ConfusionMatrix).

Training (our defaults; the papers give no schedule beyond "FCN-32s"): random 320 crops (padded with
the mean colour and label 255) with mirroring, batch 8, SGD momentum 0.9, lr 1e-3 (x0.1 after 20k),
weight decay 5e-4, 30k iterations (``--iters`` scales; 1000 on the built-in data), per-pixel
cross-entropy averaged over the non-ignored pixels, every layer fine-tuned, BatchNorm frozen (folded)
unless ``--bn train``.

Rows: benchmark ``voc_segmentation``, tap ``all``, dataset ``voc2012``, split ``val`` (or the id file's
name, e.g. ``seg11valid``), protocol ``fcn32s`` / ``fcn32s_colour_input``, metrics ``mIoU``,
``IoU_<class>``, ``pixel_accuracy`` (percent).
As published (AlexNet, mIoU): colorization 35.0 (colour input 35.6), ImageNet labels 48.0, random
19.8, k-means 32.6.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ssl_colorize.color import rgb_to_lab
from ssl_colorize.data.voc import (
    IGNORE_LABEL,
    SEG_CLASSES,
    DataReport,
    VOCSegmentation,
    load_sbd_split,
    load_segmentation_split,
    split_skipped,
)
from ssl_colorize.voc_metrics import ConfusionMatrix, mean_ap
from ssl_colorize.engine.finetune import (
    BN_MODES,
    PAD_RGB,
    TransferRun,
    add_common_args,
    checkpoint_label,
    cycle,
    dataset_name,
    is_alexnet_style,
    load_transfer_encoder,
    pad_value,
    resolve_data,
    resolve_device,
    resolve_input,
    schedule_length,
    seed_everything,
    set_train_mode,
    sgd_update,
    step_lr,
    to_model_input,
)

LOG = logging.getLogger("ssl_colorize.voc.segmentation")
BENCHMARK = "voc_segmentation"
PROTOCOL_ITERS, PROTOCOL_STEP, PROTOCOL_GAMMA = 30_000, 20_000, 0.1
BUILTIN_ITERS = 1000
AB_SCALE = 100.0  # ab enters the colour branch as ab / 100, about the range of the normalised L


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="VOC semantic segmentation with an FCN-32s head (docs/protocols.md section 5)",
                                add_help=add_help)
    p.add_argument("--year", type=int, default=2012, choices=(2011, 2012), help="VOC devkit year of the segmentation data")
    p.add_argument("--sbd", default=None, help="SBD folder (benchmark_RELEASE, or the folder holding it): add its images")
    p.add_argument("--eval-ids", default=None, help="evaluate on the ids of this file (e.g. seg11valid.txt) instead of val")
    p.add_argument("--colour-input", action="store_true", help="add a conv1 branch on ab (L encoders only)")
    p.add_argument("--pad", type=int, default=None, help="input padding in pixels (default 100 for AlexNet, else 0)")
    p.add_argument("--dropout", type=float, default=0.5, help="dropout before the score layer")
    p.add_argument("--crop", type=int, default=320, help="training crop size")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--clip-grad", type=float, default=10.0, help="clip the gradients' global L2 norm (0: off)")
    p.add_argument("--bn", choices=BN_MODES, default="frozen",
                   help="BatchNorm: frozen statistics (folded) or batch statistics")
    add_common_args(p, iters_help=f"training iterations (default {PROTOCOL_ITERS}, {BUILTIN_ITERS} on the built-in "
                                  "data); the lr step scales with it")
    return p


# ----------------------------------------------------------------------------------------------
# Geometry and model
# ----------------------------------------------------------------------------------------------

def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def feature_geometry(encoder: nn.Module, tap: str) -> tuple[tuple[float, float], int]:
    """((offset_y, offset_x), stride): output cell i of ``tap`` is centred on input pixel offset + stride * i.

    Walks the convolutions and poolings of the stages up to ``tap`` in order: each adds
    (dilation * (kernel - 1) / 2 - padding) * (the stride so far) to the offset. For branching
    stages (ResNet blocks) every term is zero (centred kernels, "same" padding), so the offset is 0
    whatever the walk counts; the stride is the tap's declared one.
    """
    offset = [0.0, 0.0]
    jump = [1, 1]
    for name, stage in encoder.stages():
        for m in stage.modules():
            if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
                k, s, p = _pair(m.kernel_size), _pair(m.stride), _pair(m.padding)
                d = _pair(m.dilation) if isinstance(m, (nn.Conv2d, nn.MaxPool2d)) else (1, 1)
                for axis in range(2):
                    offset[axis] += (d[axis] * (k[axis] - 1) / 2 - p[axis]) * jump[axis]
                    jump[axis] *= s[axis]
        if name == tap:
            break
    return (offset[0], offset[1]), encoder.taps[tap].stride


def seg_tap(encoder: nn.Module) -> str:
    """fc7 when fc6 / fc7 are convolutions (alexnet_lab), else the deepest probe tap."""
    if is_alexnet_style(encoder):
        fc6 = dict(encoder.stages())["fc6"]
        if any(isinstance(m, nn.Conv2d) for m in fc6.modules()):
            return "fc7"
    return encoder.probe_taps[-1]


def first_conv(encoder: nn.Module) -> nn.Conv2d:
    for m in encoder.modules():
        if isinstance(m, nn.Conv2d):
            return m
    raise ValueError(f"{type(encoder).__name__} has no convolution for the colour branch to join")


class FCN32s(nn.Module):
    """Encoder -> feature tap -> dropout -> 1x1 score (21) -> bilinear sampling at every input pixel."""

    def __init__(self, encoder: nn.Module, tap: str, pad: int, pad_values: tuple[float, ...],
                 num_classes: int = len(SEG_CLASSES), dropout: float = 0.5, colour_input: bool = False):
        super().__init__()
        self.encoder, self.tap, self.pad = encoder, tap, int(pad)
        self.register_buffer("pad_values", torch.tensor(pad_values).view(1, -1, 1, 1), persistent=False)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.score = nn.Conv2d(encoder.taps[tap].channels, num_classes, 1)
        nn.init.zeros_(self.score.weight)
        nn.init.zeros_(self.score.bias)
        (self.offset_y, self.offset_x), self.stride = feature_geometry(encoder, tap)
        self.ab_conv: nn.Conv2d | None = None
        self._ab: torch.Tensor | None = None
        if colour_input:
            conv = first_conv(encoder)
            self.ab_conv = nn.Conv2d(2, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                                     dilation=conv.dilation, bias=False)
            nn.init.zeros_(self.ab_conv.weight)  # starts as the grey model exactly
            conv.register_forward_hook(self._add_ab)

    def _add_ab(self, module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        if self._ab is None:
            raise RuntimeError("the colour-input FCN needs ab: call model(x, ab)")
        return output + self.ab_conv(self._ab)

    def _sample_grid(self, out_h: int, out_w: int, height: int, width: int, device) -> torch.Tensor:
        def axis(n_in: int, n_out: int, offset: float) -> torch.Tensor:
            u = (torch.arange(n_in, device=device, dtype=torch.float32) + self.pad - offset) / self.stride
            return u / (n_out - 1) * 2 - 1 if n_out > 1 else torch.zeros_like(u)

        gy, gx = axis(height, out_h, self.offset_y), axis(width, out_w, self.offset_x)
        return torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1)  # (H, W, 2) as (x, y)

    def forward(self, x: torch.Tensor, ab: torch.Tensor | None = None) -> torch.Tensor:
        """x: encoder input (N, C, H, W) in its units; ab: (N, 2, H, W) for the colour variant.
        Returns (N, 21, H, W) logits aligned with the input pixels."""
        height, width = x.shape[-2:]
        if self.pad:
            x = F.pad(x - self.pad_values, [self.pad] * 4) + self.pad_values
        if self.ab_conv is not None:
            if ab is None:
                raise ValueError("--colour-input: the model needs the ab channels")
            self._ab = F.pad(ab / AB_SCALE, [self.pad] * 4)
        try:
            features = self.encoder.forward_taps(x, [self.tap])[self.tap]
        finally:
            self._ab = None
        scores = self.score(self.dropout(features))
        grid = self._sample_grid(scores.shape[-2], scores.shape[-1], height, width, x.device)
        grid = grid[None].expand(scores.shape[0], -1, -1, -1)
        return F.grid_sample(scores, grid, mode="bilinear", padding_mode="border", align_corners=True)


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------

class TrainCropFlip:
    """Random crop (image padded with the mean colour, mask with 255) and mirror, jointly."""

    def __init__(self, crop: int):
        self.crop = crop

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = image.shape[-2:]
        ph, pw = max(0, self.crop - h), max(0, self.crop - w)
        if ph or pw:
            padded = torch.empty(3, h + ph, w + pw, dtype=image.dtype)
            padded[:] = torch.tensor(PAD_RGB, dtype=image.dtype)[:, None, None]
            padded[:, :h, :w] = image
            padded_mask = torch.full((h + ph, w + pw), IGNORE_LABEL, dtype=mask.dtype)
            padded_mask[:h, :w] = mask
            image, mask, h, w = padded, padded_mask, h + ph, w + pw
        top = int(torch.randint(0, h - self.crop + 1, (1,)))
        left = int(torch.randint(0, w - self.crop + 1, (1,)))
        image = image[:, top: top + self.crop, left: left + self.crop]
        mask = mask[top: top + self.crop, left: left + self.crop]
        if bool(torch.rand(1) < 0.5):
            image, mask = image.flip(-1), mask.flip(-1)
        return image, mask


def collate(items: list):
    good, skipped = split_skipped(items)
    if not good:
        return None, None, skipped
    return torch.stack([g[0] for g in good]), torch.stack([g[1] for g in good]), skipped


def collate_list(items: list):
    good, skipped = split_skipped(items)
    return [g[0] for g in good], [g[1] for g in good], skipped


def model_inputs(images: torch.Tensor, mode: str, colour: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """uint8 RGB (N, 3, H, W) on the device -> (encoder input, ab or None)."""
    if colour:
        lab = rgb_to_lab(images.float() / 255.0, validate=False)
        return lab[:, :1], lab[:, 1:]
    return to_model_input(images, mode), None


def training_records(args, data_root: Path, eval_ids: set[str]) -> tuple[list, list[DataReport]]:
    records, report = load_segmentation_split(data_root, args.year, "train")
    reports = [report]
    records = [r for r in records if r.image_id not in eval_ids]
    if args.sbd:
        sbd_records, sbd_report = load_sbd_split(args.sbd)
        reports.append(sbd_report)
        have = {r.image_id for r in records}
        extra = [r for r in sbd_records if r.image_id not in have and r.image_id not in eval_ids]
        LOG.info("SBD adds %d images (%d of its %d are in the evaluation set or already in VOC train)",
                 len(extra), len(sbd_records) - len(extra), len(sbd_records))
        records += extra
    if not records:
        raise ValueError("no training image left for segmentation (all skipped or in the evaluation set)")
    return records, reports


@torch.no_grad()
def evaluate(model: FCN32s, loader: DataLoader, mode: str, colour: bool, device: torch.device,
             run: TransferRun) -> tuple[ConfusionMatrix, int]:
    model.eval()
    confusion = ConfusionMatrix()
    seen = 0
    for images, masks, skipped in tqdm(loader, desc="test", unit="img", mininterval=2):
        run.skipped_at_runtime(skipped)
        for image, mask in zip(images, masks):
            x, ab = model_inputs(image[None].to(device), mode, colour)
            prediction = model(x, ab).argmax(1)[0]
            confusion.update(prediction.cpu(), mask)
            seen += 1
    return confusion, seen


def main(args: argparse.Namespace) -> dict:
    seed_everything(args.seed)
    device = resolve_device(args.device)
    data_root, builtin = resolve_data(args.data)
    if args.eval_ids and not Path(args.eval_ids).is_file():
        raise ValueError(f"--eval-ids {args.eval_ids}: no such file")
    eval_records, eval_report = load_segmentation_split(data_root, args.year, "val", ids_file=args.eval_ids)
    eval_ids = {r.image_id for r in eval_records}
    train_records, train_reports = training_records(args, data_root, eval_ids)
    encoder, encoder_name = load_transfer_encoder(args.checkpoint, args.encoder, args.seed)
    mode = resolve_input(encoder, args.input)
    if args.colour_input and mode != "L":
        raise ValueError(f"--colour-input needs an L encoder; {encoder_name} takes {encoder.input_space}")
    iters = schedule_length(args.iters, PROTOCOL_ITERS, builtin, BUILTIN_ITERS)
    tap = seg_tap(encoder)
    pad = args.pad if args.pad is not None else (100 if tap == "fc7" else 0)

    run = TransferRun(BENCHMARK, args, encoder_name, checkpoint_label(args.checkpoint))
    for report in train_reports + [eval_report]:
        run.add_report(report)
    model = FCN32s(encoder, tap, pad, pad_value(mode), dropout=args.dropout, colour_input=args.colour_input).to(device)
    encoder.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    scheduler = step_lr(optimizer, iters, PROTOCOL_ITERS, PROTOCOL_STEP, PROTOCOL_GAMMA)
    LOG.info("%s: FCN-32s on %s (stride %d, offset %.1f, pad %d), input %s%s; %d iterations on %d images; %s",
             encoder_name, tap, model.stride, model.offset_x, pad, mode, " + ab branch" if args.colour_input else "",
             iters, len(train_records), device)

    generator = torch.Generator().manual_seed(args.seed)
    loader = DataLoader(
        VOCSegmentation(train_records, TrainCropFlip(args.crop)), batch_size=args.batch_size, shuffle=True,
        drop_last=len(train_records) >= args.batch_size, num_workers=args.workers, collate_fn=collate,
        generator=generator, persistent_workers=args.workers > 0, pin_memory=device.type == "cuda",
    )
    batches = cycle(loader)
    losses: list[float] = []
    progress = tqdm(range(iters), desc=BENCHMARK, unit="it", mininterval=2)
    for _ in progress:
        model.train()
        set_train_mode(encoder, [encoder], args.bn)
        images, masks, skipped = next(batches)
        run.skipped_at_runtime(skipped)
        if images is None:
            continue
        x, ab = model_inputs(images.to(device, non_blocking=True), mode, args.colour_input)
        logits = model(x, ab)
        loss = F.cross_entropy(logits, masks.to(device).long(), ignore_index=IGNORE_LABEL)
        if not torch.isfinite(loss):  # a batch of crops holding only ignored pixels
            continue
        sgd_update(loss, optimizer, scheduler, args.clip_grad)
        losses.append(loss.item())
        if len(losses) % 10 == 0:
            progress.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}", lr=f"{scheduler.get_last_lr()[0]:.1e}")

    eval_loader = DataLoader(VOCSegmentation(eval_records), batch_size=1, shuffle=False,
                             num_workers=args.workers, collate_fn=collate_list)
    confusion, n_eval = evaluate(model, eval_loader, mode, args.colour_input, device, run)
    ious = confusion.iou() * 100
    miou = mean_ap(ious)
    eval_name = Path(args.eval_ids).stem if args.eval_ids else "val"
    hparams = {
        "iters": iters, "lr": args.lr, "momentum": args.momentum, "weight_decay": args.weight_decay,
        "batch_size": args.batch_size, "crop": args.crop, "pad": pad, "tap": tap, "dropout": args.dropout,
        "bn": args.bn, "input": mode, "colour_input": args.colour_input, "year": args.year, "sbd": bool(args.sbd),
        "data": str(data_root), "train_images": len(train_records), "eval_images": n_eval,
        "classes_present": int(np.isfinite(ious).sum()),
    }
    row = dict(tap="all", dataset=dataset_name(builtin, f"voc{args.year}"), split=eval_name,
               protocol="fcn32s_colour_input" if args.colour_input else "fcn32s", hparams=hparams)
    run.row(metric="mIoU", value=miou, **row)
    run.row(metric="pixel_accuracy", value=confusion.pixel_accuracy() * 100, **row)
    for name, iou in zip(SEG_CLASSES, ious):
        run.row(metric=f"IoU_{name}", value=float(iou), **row)
    LOG.info("segmentation mIoU %.2f over %d images (%s)", miou, n_eval, eval_name)
    run.extra["final_loss"] = float(np.mean(losses[-10:])) if losses else float("nan")
    return run.finish({"mIoU": miou, "pixel_accuracy": confusion.pixel_accuracy() * 100,
                       **{f"IoU_{c}": float(v) for c, v in zip(SEG_CLASSES, ious)}})


def cli(argv=None) -> dict:
    return main(get_args_parser().parse_args(argv))


if __name__ == "__main__":
    cli()
