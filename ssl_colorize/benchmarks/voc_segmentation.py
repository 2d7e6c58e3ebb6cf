"""PASCAL VOC semantic segmentation: an FCN-32s-style head on the pretrained encoder (docs/protocols.md section 5).

    python -m ssl_colorize.benchmarks.voc_segmentation --checkpoint ck.pth --data /datasets --sbd /datasets/SBD \
        --eval-ids seg11valid.txt                     # the paper's setting: + SBD, seg11valid
    python -m ssl_colorize.benchmarks.voc_segmentation --checkpoint ck.pth --data /datasets --colour-input
    python -m ssl_colorize.benchmarks.voc_segmentation             # built-in VOCdevkit, random alexnet_lab, short run

Model (FCN-32s, Long et al.; ssl_colorize.heads.segmentation): the encoder run fully convolutionally
up to its card's segmentation tap (fc7 for alexnet_lab, whose fc6 / fc7 are convolutions; res5, or
conv5 for torchvision's AlexNet, otherwise), dropout, a zero-initialised 1x1 score convolution to 21
classes, and bilinear sampling of the scores at every input pixel. The input is padded by ``--pad``
pixels (FCN's 100 when the tap is fc7, else 0) with the value the encoder normalises to zero.
``--colour-input`` (L encoders only) adds a zero-initialised conv1 branch on ab.

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

Run folder (``--out``, default ``runs/voc_segmentation/<run id>``): config.json, log.jsonl, a rolling
checkpoint every ``--ckpt-every`` iterations, ``--resume`` continues exactly where a killed run stopped.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from ssl_colorize.data.voc import IGNORE_LABEL, SEG_CLASSES, ListBatch, StackBatch
from ssl_colorize.data.voc_segmentation import (
    PairedCropFlip, VOCSegmentation, load_segmentation_split, segmentation_training_records,
)
from ssl_colorize.engine.cli import (
    ArgumentParser, UsageError, check_input_dir, check_input_file, check_non_negative, check_number, check_positive,
    run_cli,
)
from ssl_colorize.engine.finetune import (
    BN_MODES, add_training_args, batch_stream, finetune, schedule_length, set_train_mode, step_lr,
)
from ssl_colorize.engine.transfer_run import (
    PAD_RGB, TransferRun, add_common_args, checkpoint_ref, dataset_name, load_transfer_encoder, pad_value,
    resolve_data, resolve_device, resolve_input, seed_everything, validate_common, validate_training,
)
from ssl_colorize.heads.segmentation import FCN32s, default_pad, model_inputs, seg_tap
from ssl_colorize.voc_metrics import ConfusionMatrix, mean_ap

LOG = logging.getLogger("ssl_colorize.voc.segmentation")
BENCHMARK = "voc_segmentation"
PROTOCOL_ITERS, PROTOCOL_STEP, PROTOCOL_GAMMA = 30_000, 20_000, 0.1
BUILTIN_ITERS = 1000


def get_args_parser(add_help: bool = True) -> ArgumentParser:
    p = ArgumentParser(BENCHMARK, add_help=add_help,
                       description="VOC semantic segmentation with an FCN-32s head (docs/protocols.md section 5)")
    p.add_argument("--year", type=int, default=2012, choices=(2011, 2012), help="VOC devkit year of the segmentation data")
    p.add_argument("--sbd", default=None, help="SBD folder (benchmark_RELEASE, or the folder holding it): add its images")
    p.add_argument("--eval-ids", default=None, help="evaluate on the ids of this file (e.g. seg11valid.txt) instead of val")
    p.add_argument("--colour-input", action="store_true", help="add a conv1 branch on ab (L encoders only)")
    p.add_argument("--pad", type=int, default=None, help="input padding in pixels (default 100 when the tap is fc7, else 0)")
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
                                  "data); the lr step scales with it", job=BENCHMARK)
    add_training_args(p)
    return p


def validate(args) -> None:
    validate_training(args)
    check_positive("--crop", args.crop)
    check_non_negative("--pad", args.pad)
    check_number("--dropout", args.dropout, minimum=0, maximum=1)
    check_input_file("--eval-ids", args.eval_ids)
    check_input_dir("--sbd", args.sbd)
    splits = [(args.year, "Segmentation", "train")] + [(args.year, "Segmentation", "val")] * (args.eval_ids is None)
    validate_common(args, splits)


@torch.no_grad()
def evaluate(model: FCN32s, loader: DataLoader, mode: str, colour: bool, device: torch.device,
             run: TransferRun) -> tuple[ConfusionMatrix, int]:
    model.eval()
    confusion = ConfusionMatrix()
    seen = 0
    for images, masks, _, skipped in tqdm(loader, desc="test", unit="img", mininterval=2):
        run.skipped_at_runtime(skipped)
        for image, mask in zip(images, masks):
            x, ab = model_inputs(image[None].to(device), mode, colour)
            confusion.update(model(x, ab).argmax(1)[0].cpu(), mask)
            seen += 1
    return confusion, seen


def main(args) -> dict:
    seed_everything(args.seed)
    device = resolve_device(args.device)
    data_root, builtin = resolve_data(args.data)
    if args.eval_ids and not Path(args.eval_ids).is_file():
        raise ValueError(f"--eval-ids {args.eval_ids}: no such file")
    eval_records, eval_report = load_segmentation_split(data_root, args.year, "val", ids_file=args.eval_ids)
    eval_ids = {r.image_id for r in eval_records}
    train_records, train_reports = segmentation_training_records(data_root, args.year, args.sbd, eval_ids)
    encoder, encoder_name = load_transfer_encoder(args.checkpoint, args.encoder, args.seed)
    try:
        mode = resolve_input(encoder, args.input)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.colour_input and mode != "L":
        raise UsageError(f"--colour-input needs an L encoder; {encoder_name} takes {encoder.input_space}")
    iters = schedule_length(args.iters, PROTOCOL_ITERS, builtin, BUILTIN_ITERS)
    tap = seg_tap(encoder)
    pad = args.pad if args.pad is not None else default_pad(tap)

    run = TransferRun(BENCHMARK, args, encoder_name, checkpoint_ref(args).label)
    run.folder.write_config({**vars(args), "iters": iters, "tap": tap, "pad": pad, "input_mode": mode,
                             "encoder": encoder_name})
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

    train_set = VOCSegmentation(train_records, PairedCropFlip(args.crop, PAD_RGB))

    def batches(start: int):
        return batch_stream(train_set, args.batch_size, seed=args.seed, start=start, workers=args.workers,
                            collate=StackBatch(3), pin_memory=device.type == "cuda")

    def step(batch):
        images, masks, _, skipped = batch
        model.train()
        set_train_mode(encoder, [encoder], args.bn)
        run.skipped_at_runtime(skipped)
        if images is None:
            return None
        x, ab = model_inputs(images.to(device, non_blocking=True), mode, args.colour_input)
        loss = F.cross_entropy(model(x, ab), masks.to(device).long(), ignore_index=IGNORE_LABEL)
        return loss if torch.isfinite(loss) else None  # a batch of crops holding only ignored pixels

    losses = finetune(run, model, optimizer, scheduler, iters=iters, batches=batches, step=step, args=args,
                      desc=BENCHMARK)

    eval_loader = DataLoader(VOCSegmentation(eval_records), batch_size=1, shuffle=False,
                             num_workers=args.workers, collate_fn=ListBatch(3))
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


def cli(argv=None):
    return run_cli(get_args_parser(), main, argv, validate=validate)


if __name__ == "__main__":
    cli()
