"""PASCAL VOC2007 object detection: torchvision's Faster R-CNN on the pretrained encoder (docs/protocols.md section 5).

    python -m ssl_colorize.benchmarks.voc_detection --checkpoint runs/pretrain/checkpoint.pth --data /datasets
    python -m ssl_colorize.benchmarks.voc_detection --checkpoint ck.pth --data /datasets --add-voc12 --ap-metric area
    python -m ssl_colorize.benchmarks.voc_detection     # built-in VOCdevkit, random alexnet_lab, short run

The model (ssl_colorize.heads.detection): torchvision's Faster R-CNN, built with no pretrained weights
(nothing is ever downloaded), whose backbone, RoI size and box head come from the encoder's card:
AlexNets: conv5 backbone, 6x6 RoIAlign, the encoder's own fc6 / fc7 as the box head; ResNet-50: the
"C4" layout (res4 backbone, 14x14 RoIs, res5 + average pooling). An encoder whose card has no
detection split stops with one line. A new RPN head and a new 21-class box predictor.

Inputs follow the encoder: the detector's GeneralizedRCNNTransform gets image_mean 0 and image_std 1
(identity), and the images are given in the encoder's own input units (L in [0, 100] for L encoders,
RGB in [0, 1] for RGB ones), which the encoder normalises itself. The transform still resizes
(multi-scale training: a random shorter side from ``--train-sizes`` per image, longer side at most
``--max-size``; single-scale test at ``--test-size``) and pads the batch.

Training (Fast R-CNN's schedule, docs/protocols.md section 5): VOC2007 trainval (``--add-voc12``: + VOC2012
trainval), horizontal flips, objects marked "difficult" left out of the training targets (as Fast
R-CNN), 2 images per batch, 64 sampled RoIs per image (25% foreground), SGD momentum 0.9, lr 1e-3
(x0.1 every 50k), weight decay 5e-4, 150k iterations (``--iters`` scales the steps with it; 1500 on the
built-in data). Every layer of the encoder is fine-tuned, its BatchNorms frozen (folded) unless
``--bn train``. Test: VOC2007 test at one scale, up to 100 detections per image after per-class NMS at IoU 0.5
(torchvision's default; Fast R-CNN used 0.3), evaluated by ssl_colorize.voc_metrics.detection_ap:
the VOC2007 devkit's rule (IoU >= 0.5, greedy by score, duplicates false, difficult objects neither
counted nor penalised), 11-point AP by default, ``--ap-metric area`` for the VOC2010+ variant.

Rows: benchmark ``voc_detection``, tap ``all`` (what was fine-tuned), protocol ``faster_rcnn_11point`` (or
``faster_rcnn_area``), metrics ``mAP`` and ``AP_<class>`` (percent). As published (Fast R-CNN, AlexNet,
mAP): colorization 46.1 (colour input 46.9), ImageNet labels 56.8, random 43.4, k-means 45.6.
The published numbers used Fast R-CNN with selective-search proposals; this benchmark uses torchvision's
Faster R-CNN (a learned RPN), so they are comparable in protocol, not identical in method.

Run folder (``--out``, default ``runs/voc_detection/<run id>``): config.json, log.jsonl, a rolling
checkpoint every ``--ckpt-every`` iterations, ``--resume`` continues exactly where a killed run stopped.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ssl_colorize.data.voc import (
    VOC_CLASSES, DetectionImages, DetectionRecord, ListBatch, boxes_to_inclusive, load_main_split,
)
from ssl_colorize.engine.cli import ArgumentParser, UsageError, check_non_negative, check_positive, fail, run_cli
from ssl_colorize.engine.finetune import (
    BN_MODES, add_training_args, batch_stream, finetune, schedule_length, set_train_mode, step_lr,
)
from ssl_colorize.engine.transfer_run import (
    TransferRun, add_common_args, checkpoint_ref, dataset_name, load_transfer_encoder, resolve_data, resolve_device,
    resolve_input, seed_everything, to_model_input, validate_common, validate_training,
)
from ssl_colorize.heads.detection import build_detector, has_detection_split
from ssl_colorize.models.cards import get_card
from ssl_colorize.voc_metrics import AP_METRICS, Detections, GroundTruth, detection_ap, mean_ap

LOG = logging.getLogger("ssl_colorize.voc.detection")
BENCHMARK = "voc_detection"
PROTOCOL_ITERS, PROTOCOL_STEP, PROTOCOL_GAMMA = 150_000, 50_000, 0.1
BUILTIN_ITERS = 1500
DEFAULT_SIZES = {"train": "480,576,688,800", "test": 600, "max": 1000, "anchors": "32,64,128,256,512"}
BUILTIN_SIZES = {"train": "192,224,256,288", "test": 240, "max": 480, "anchors": "32,64,128,256"}


def get_args_parser(add_help: bool = True) -> ArgumentParser:
    p = ArgumentParser(BENCHMARK, add_help=add_help,
                       description="VOC2007 detection with Faster R-CNN on the encoder (docs/protocols.md section 5)")
    p.add_argument("--add-voc12", action="store_true", help="train on VOC2007 trainval + VOC2012 trainval")
    p.add_argument("--ap-metric", choices=AP_METRICS, default="11point",
                   help="11point: the VOC2007 devkit; area: VOC2010+ area under the curve")
    p.add_argument("--train-sizes", default=None,
                   help=f"shorter sides for multi-scale training (default {DEFAULT_SIZES['train']}; "
                        f"{BUILTIN_SIZES['train']} on the built-in data)")
    p.add_argument("--test-size", type=int, default=None,
                   help=f"shorter side at test (default {DEFAULT_SIZES['test']}; {BUILTIN_SIZES['test']} built-in)")
    p.add_argument("--max-size", type=int, default=None,
                   help=f"longest side (default {DEFAULT_SIZES['max']}; {BUILTIN_SIZES['max']} built-in)")
    p.add_argument("--anchor-sizes", default=None,
                   help=f"RPN anchor sizes (default {DEFAULT_SIZES['anchors']}; {BUILTIN_SIZES['anchors']} built-in)")
    p.add_argument("--batch-size", type=int, default=2, help="images per iteration (Fast R-CNN: 2)")
    p.add_argument("--rois-per-image", type=int, default=64, help="sampled RoIs per image for the box head")
    p.add_argument("--rpn-train-proposals", type=int, default=2000, help="proposals kept after NMS in training")
    p.add_argument("--rpn-test-proposals", type=int, default=300, help="proposals kept after NMS at test")
    p.add_argument("--score-thresh", type=float, default=0.0, help="drop detections scoring below this")
    p.add_argument("--detections-per-image", type=int, default=100)
    p.add_argument("--bn", choices=BN_MODES, default="frozen",
                   help="BatchNorm: frozen statistics (folded) or batch statistics")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--clip-grad", type=float, default=10.0, help="clip the gradients' global L2 norm (0: off)")
    add_common_args(p, iters_help=f"training iterations (default {PROTOCOL_ITERS}, {BUILTIN_ITERS} on the built-in "
                                  "data); the lr steps scale with it", job=BENCHMARK)
    add_training_args(p)
    return p


def size_list(option: str, text: str) -> list[int]:
    """``"480,576"`` -> [480, 576]; UsageError naming the option otherwise."""
    try:
        sizes = [int(s) for s in str(text).split(",")]
    except ValueError:
        raise fail(option, text, "must be comma-separated integers") from None
    if not sizes or min(sizes) < 1:
        raise fail(option, text, "sizes must be > 0")
    return sizes


def resolve_sizes(args, builtin: bool) -> dict:
    defaults = BUILTIN_SIZES if builtin else DEFAULT_SIZES
    return {
        "train": size_list("--train-sizes", args.train_sizes or defaults["train"]),
        "test": args.test_size or defaults["test"], "max": args.max_size or defaults["max"],
        "anchors": size_list("--anchor-sizes", args.anchor_sizes or defaults["anchors"]),
    }


def validate(args) -> None:
    validate_training(args)
    resolve_sizes(args, builtin=args.data is None)
    for option in ("--test-size", "--max-size", "--rois-per-image", "--rpn-train-proposals", "--rpn-test-proposals",
                   "--detections-per-image"):
        check_positive(option, getattr(args, option[2:].replace("-", "_")))
    check_non_negative("--score-thresh", args.score_thresh)
    splits = [(2007, "Main", "trainval"), (2007, "Main", "test")] + [(2012, "Main", "trainval")] * args.add_voc12
    ref = validate_common(args, splits)
    name = ref.model_name()
    if get_card(name).transfer.detection_tap is None:
        raise UsageError(f"encoder {name} has no detection split")


def model_inputs(images: list[torch.Tensor], mode: str, device: torch.device) -> list[torch.Tensor]:
    """uint8 RGB images of any sizes -> the encoder's input units, one tensor per image, on device."""
    return [to_model_input(im.to(device, non_blocking=True)[None], mode)[0] for im in images]


@torch.no_grad()
def evaluate(model, records: list[DetectionRecord], loader: DataLoader, mode: str, device: torch.device,
             run: TransferRun, metric: str) -> tuple[np.ndarray, int]:
    """Per-class AP (20,) on the loader's images and the number of images evaluated."""
    model.eval()
    detections: dict[int, Detections] = {}
    for images, _, indices, skipped in tqdm(loader, desc="test", unit="batch", mininterval=2):
        run.skipped_at_runtime(skipped)
        if not images:
            continue
        for index, out in zip(indices, model(model_inputs(images, mode, device))):
            detections[index] = Detections(boxes_to_inclusive(out["boxes"].double().cpu().numpy()),
                                           out["scores"].double().cpu().numpy(), out["labels"].cpu().numpy() - 1)
    evaluated = sorted(detections)
    ground_truth = [GroundTruth(records[i].boxes, records[i].labels, records[i].difficult) for i in evaluated]
    aps = detection_ap([detections[i] for i in evaluated], ground_truth, len(VOC_CLASSES), metric=metric)
    return aps, len(evaluated)


def main(args) -> dict:
    seed_everything(args.seed)
    device = resolve_device(args.device)
    data_root, builtin = resolve_data(args.data)
    train_records, train_report = load_main_split(data_root, 2007, "trainval")
    reports = [train_report]
    if args.add_voc12:
        records12, report12 = load_main_split(data_root, 2012, "trainval")
        train_records += records12
        reports.append(report12)
    test_records, test_report = load_main_split(data_root, 2007, "test")
    reports.append(test_report)
    sizes = resolve_sizes(args, builtin)
    encoder, encoder_name = load_transfer_encoder(args.checkpoint, args.encoder, args.seed)
    if not has_detection_split(encoder):
        raise UsageError(f"encoder {encoder_name} has no detection split")
    try:
        mode = resolve_input(encoder, args.input)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    iters = schedule_length(args.iters, PROTOCOL_ITERS, builtin, BUILTIN_ITERS)

    run = TransferRun(BENCHMARK, args, encoder_name, checkpoint_ref(args).label)
    run.folder.write_config({**vars(args), "iters": iters, "sizes": sizes, "input_mode": mode, "encoder": encoder_name})
    for report in reports:
        run.add_report(report)
    model, description = build_detector(
        encoder, train_sizes=sizes["train"], max_size=sizes["max"], anchors=sizes["anchors"],
        rpn_train_proposals=args.rpn_train_proposals, rpn_test_proposals=args.rpn_test_proposals,
        score_thresh=args.score_thresh, detections_per_image=args.detections_per_image,
        rois_per_image=args.rois_per_image)
    model.to(device)
    encoder.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    scheduler = step_lr(optimizer, iters, PROTOCOL_ITERS, PROTOCOL_STEP, PROTOCOL_GAMMA)
    LOG.info("%s: %s; input %s; train sizes %s, test %d, max %d; %d iterations on %d images; %s",
             encoder_name, description, mode, sizes["train"], sizes["test"], sizes["max"], iters,
             len(train_records), device)

    train_set = DetectionImages(train_records, train=True)

    def batches(start: int):
        return batch_stream(train_set, args.batch_size, seed=args.seed, start=start, workers=args.workers,
                            collate=ListBatch(3), drop_last=False)

    def step(batch):
        images, targets, _, skipped = batch
        model.train()
        set_train_mode(encoder, [encoder], args.bn)  # the whole encoder fine-tunes; BN per --bn
        run.skipped_at_runtime(skipped)
        if not images:
            return None
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        return sum(model(model_inputs(images, mode, device), targets).values())

    losses = finetune(run, model, optimizer, scheduler, iters=iters, batches=batches, step=step, args=args,
                      desc=BENCHMARK)

    model.transform.min_size = (int(sizes["test"]),)  # single-scale test
    test_loader = DataLoader(DetectionImages(test_records, train=False), batch_size=args.batch_size,
                             shuffle=False, num_workers=args.workers, collate_fn=ListBatch(3))
    aps, n_eval = evaluate(model, test_records, test_loader, mode, device, run, args.ap_metric)
    aps = aps * 100
    hparams = {
        "iters": iters, "lr": args.lr, "momentum": args.momentum, "weight_decay": args.weight_decay,
        "batch_size": args.batch_size, "train_sizes": sizes["train"], "test_size": sizes["test"],
        "max_size": sizes["max"], "anchors": ",".join(map(str, sizes["anchors"])),
        "rois_per_image": args.rois_per_image, "rpn_test_proposals": args.rpn_test_proposals, "bn": args.bn,
        "input": mode, "detector": description, "add_voc12": args.add_voc12, "ap_metric": args.ap_metric,
        "data": str(data_root), "train_images": len(train_records), "test_images": n_eval,
        "classes_with_objects": int(np.isfinite(aps).sum()),
    }
    row = dict(tap="all", dataset=dataset_name(builtin, "voc2007"), split="test",
               protocol=f"faster_rcnn_{args.ap_metric}", hparams=hparams)
    run.row(metric="mAP", value=mean_ap(aps), **row)
    for name, ap in zip(VOC_CLASSES, aps):
        run.row(metric=f"AP_{name}", value=float(ap), **row)
    LOG.info("detection mAP (%s) %.2f over %d images", args.ap_metric, mean_ap(aps), n_eval)
    run.extra["final_loss"] = float(np.mean(losses[-10:])) if losses else float("nan")
    return run.finish({"mAP": mean_ap(aps), **{f"AP_{c}": float(a) for c, a in zip(VOC_CLASSES, aps)}})


def cli(argv=None):
    return run_cli(get_args_parser(), main, argv, validate=validate)


if __name__ == "__main__":
    cli()
