"""PASCAL VOC2007 object detection: torchvision's Faster R-CNN on the pretrained encoder (docs/protocols.md section 5).

    python benchmarks/voc_detection.py --checkpoint runs/pretrain/checkpoint.pth --data /datasets
    python benchmarks/voc_detection.py --checkpoint ck.pth --data /datasets --add-voc12 --ap-metric area
    python benchmarks/voc_detection.py                 # built-in VOCdevkit, random alexnet_lab, short run

The model (``torchvision.models.detection.FasterRCNN``, built with no pretrained weights: nothing is
ever downloaded) takes its parts from the encoder:

* AlexNet-style encoders (alexnet_lab in its transfer geometry, alexnet_rgb_torchvision): the backbone
  is conv1..conv5 (stride 16, 256 channels); each proposal is RoI-pooled to 6x6 on conv5 (RoIAlign,
  where Fast R-CNN replaced pool5 by RoI max pooling) and the box head is the encoder's own fc6 and
  fc7 (:class:`EncoderBoxHead`): fc6, a 6x6 convolution applied to a 6x6 map, is exactly a Linear
  256*6*6 -> 4096 with the convolution's weights, fc7 likewise 4096 -> 4096; the modules are reused
  as they are, so the fine-tuned fc6 / fc7 are the encoder's (and its BatchNorms, folded, come along);
* ResNet-50 (resnet50_lab): the "C4" layout of Faster R-CNN with ResNets, without FPN: the backbone is
  conv1..res4 (stride 16, 1024 channels), proposals are RoI-pooled to 14x14 on res4, and res5 followed
  by global average pooling is the box head (2048-d);
* a new RPN head (3x3 conv, objectness and box deltas per anchor; torchvision's N(0, 0.01) init) and
  a new box predictor (21 classes with background, N(0, 0.01) / N(0, 0.001) as in Fast R-CNN).

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
"""

from __future__ import annotations

import argparse
import logging
from collections import OrderedDict

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign
from tqdm import tqdm

from ssl_colorize.data.voc import (
    VOC_CLASSES,
    DetectionRecord,
    VOCImages,
    boxes_to_continuous,
    boxes_to_inclusive,
    load_main_split,
    split_skipped,
)
from ssl_colorize.voc_metrics import AP_METRICS, Detections, GroundTruth, detection_ap, mean_ap
from ssl_colorize.engine.finetune import (
    BN_MODES,
    TransferRun,
    add_common_args,
    checkpoint_label,
    cycle,
    dataset_name,
    is_alexnet_style,
    load_transfer_encoder,
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

LOG = logging.getLogger("ssl_colorize.voc.detection")
BENCHMARK = "voc_detection"
PROTOCOL_ITERS, PROTOCOL_STEP, PROTOCOL_GAMMA = 150_000, 50_000, 0.1
BUILTIN_ITERS = 1500
DEFAULT_SIZES = {"train": "480,576,688,800", "test": 600, "max": 1000, "anchors": "32,64,128,256,512"}
BUILTIN_SIZES = {"train": "192,224,256,288", "test": 240, "max": 480, "anchors": "32,64,128,256"}


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="VOC2007 detection with Faster R-CNN on the encoder (docs/protocols.md section 5)",
                                add_help=add_help)
    p.add_argument("--add-voc12", action="store_true", help="train on VOC2007 trainval + VOC2012 trainval")
    p.add_argument("--ap-metric", choices=AP_METRICS, default="11point",
                   help="11point: the VOC2007 devkit (default); area: VOC2010+ area under the curve")
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
    p.add_argument("--rois-per-image", type=int, default=64,
                   help="sampled RoIs per image for the box head (Fast R-CNN: 64)")
    p.add_argument("--rpn-train-proposals", type=int, default=2000, help="proposals kept after NMS in training")
    p.add_argument("--rpn-test-proposals", type=int, default=300,
                   help="proposals kept after NMS at test (Faster R-CNN: 300)")
    p.add_argument("--score-thresh", type=float, default=0.0, help="drop detections scoring below this (default: keep all)")
    p.add_argument("--detections-per-image", type=int, default=100)
    p.add_argument("--bn", choices=BN_MODES, default="frozen",
                   help="BatchNorm: frozen statistics (folded) or batch statistics")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--clip-grad", type=float, default=10.0, help="clip the gradients' global L2 norm (0: off)")
    add_common_args(p, iters_help=f"training iterations (default {PROTOCOL_ITERS}, {BUILTIN_ITERS} on the built-in "
                                  "data); the lr steps scale with it")
    return p


# ----------------------------------------------------------------------------------------------
# The detector's parts from the encoder
# ----------------------------------------------------------------------------------------------

class EncoderBackbone(nn.Module):
    """The encoder up to ``tap``, as a Faster R-CNN backbone (``out_channels`` as torchvision wants)."""

    def __init__(self, encoder: nn.Module, tap: str):
        super().__init__()
        self.encoder = encoder
        self.tap = tap
        self.out_channels = encoder.taps[tap].channels

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        return OrderedDict([("0", self.encoder.forward_taps(x, [self.tap])[self.tap])])


class EncoderBoxHead(nn.Module):
    """A TwoMLPHead-like box head made of encoder stages applied to RoI-pooled maps, then pooled flat.

    AlexNet: stages (fc6, fc7) on (R, 256, 6, 6): fc6's 6x6 convolution gives (R, 4096, 1, 1), i.e.
    a Linear 9216 -> 4096 with the convolution's weights; fc7 a Linear 4096 -> 4096. ResNet-50: res5
    on (R, 1024, 14, 14), then the spatial mean. The stages are the encoder's own modules (shared).
    """

    def __init__(self, stages: list[nn.Module], out_channels: int):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return x.mean(dim=(2, 3)) if x.dim() == 4 else x.flatten(1)


def detector_parts(encoder: nn.Module) -> tuple[EncoderBackbone, MultiScaleRoIAlign, EncoderBoxHead, str]:
    """(backbone, RoI pooling, box head, description) for an AlexNet-style or ResNet-style encoder."""
    stages = dict(encoder.stages())
    if is_alexnet_style(encoder):
        backbone = EncoderBackbone(encoder, "conv5")
        pool = MultiScaleRoIAlign(featmap_names=["0"], output_size=6, sampling_ratio=2)
        head = EncoderBoxHead([stages["fc6"], stages["fc7"]], encoder.taps["fc7"].channels)
        return backbone, pool, head, "conv5 backbone, RoIAlign 6x6, fc6/fc7 box head"
    if "res4" in encoder.taps and "res5" in encoder.taps:
        backbone = EncoderBackbone(encoder, "res4")
        pool = MultiScaleRoIAlign(featmap_names=["0"], output_size=14, sampling_ratio=2)
        head = EncoderBoxHead([stages["res5"]], encoder.taps["res5"].channels)
        return backbone, pool, head, "C4: res4 backbone, RoIAlign 14x14, res5 + average pool box head"
    raise ValueError(
        f"voc_detection supports AlexNet-style encoders (taps conv5, fc6, fc7) and ResNets (taps res4, res5); "
        f"{type(encoder).__name__} has taps {list(encoder.taps)}"
    )


def build_detector(encoder: nn.Module, args: argparse.Namespace, sizes: dict) -> tuple[FasterRCNN, str]:
    backbone, pool, head, description = detector_parts(encoder)
    anchors = tuple(int(s) for s in str(sizes["anchors"]).split(","))
    anchor_generator = AnchorGenerator(sizes=(anchors,), aspect_ratios=((0.5, 1.0, 2.0),))
    predictor = FastRCNNPredictor(head.out_channels, len(VOC_CLASSES) + 1)
    nn.init.normal_(predictor.cls_score.weight, std=0.01)
    nn.init.normal_(predictor.bbox_pred.weight, std=0.001)
    nn.init.zeros_(predictor.cls_score.bias)
    nn.init.zeros_(predictor.bbox_pred.bias)
    channels = encoder.in_chans
    model = FasterRCNN(
        backbone,
        num_classes=None,
        min_size=tuple(int(s) for s in str(sizes["train"]).split(",")),
        max_size=int(sizes["max"]),
        image_mean=[0.0] * channels,  # identity: the encoder normalises its own input
        image_std=[1.0] * channels,
        rpn_anchor_generator=anchor_generator,
        rpn_post_nms_top_n_train=args.rpn_train_proposals,
        rpn_post_nms_top_n_test=args.rpn_test_proposals,
        rpn_pre_nms_top_n_test=max(1000, args.rpn_test_proposals),
        box_roi_pool=pool,
        box_head=head,
        box_predictor=predictor,
        box_score_thresh=args.score_thresh,
        box_detections_per_img=args.detections_per_image,
        box_batch_size_per_image=args.rois_per_image,
    )
    return model, description


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------

class RandomFlip:
    """Mirror an image with probability 1/2; the dataset mirrors its boxes accordingly."""

    def __call__(self, image: torch.Tensor) -> tuple[torch.Tensor, bool]:
        flip = bool(torch.rand(1) < 0.5)
        return (image.flip(-1) if flip else image), flip


class DetectionImages(VOCImages):
    """(image uint8 (3, H, W), target dict with continuous boxes and labels 1..20, index)."""

    def __init__(self, records: list[DetectionRecord], train: bool):
        super().__init__(records)
        self.train = train
        self.flip = RandomFlip()

    def __getitem__(self, index: int):
        item = super().__getitem__(index)
        if not isinstance(item, tuple):
            return item
        image, _ = item
        rec = self.records[index]
        keep = ~rec.difficult if self.train else np.ones(len(rec.labels), dtype=bool)
        boxes = torch.from_numpy(boxes_to_continuous(rec.boxes[keep])).float().reshape(-1, 4)
        labels = torch.from_numpy(rec.labels[keep] + 1).long()
        if self.train:
            image, flipped = self.flip(image)
            if flipped:
                width = image.shape[-1]
                boxes = torch.stack((width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]), 1)
        return image, {"boxes": boxes, "labels": labels}, index


def collate(items: list):
    good, skipped = split_skipped(items)
    return [g[0] for g in good], [g[1] for g in good], [g[2] for g in good], skipped


# ----------------------------------------------------------------------------------------------
# Train / evaluate
# ----------------------------------------------------------------------------------------------

def model_inputs(images: list[torch.Tensor], mode: str, device: torch.device) -> list[torch.Tensor]:
    """uint8 RGB images of any sizes -> the encoder's input units, one tensor per image, on device."""
    return [to_model_input(im.to(device, non_blocking=True)[None], mode)[0] for im in images]


@torch.no_grad()
def evaluate(model: FasterRCNN, records: list[DetectionRecord], loader: DataLoader, mode: str,
             device: torch.device, run: TransferRun, metric: str) -> tuple[np.ndarray, int]:
    """Per-class AP (20,) on the loader's images and the number of images evaluated."""
    model.eval()
    detections: dict[int, Detections] = {}
    for images, _, indices, skipped in tqdm(loader, desc="test", unit="batch", mininterval=2):
        run.skipped_at_runtime(skipped)
        if not images:
            continue
        outputs = model(model_inputs(images, mode, device))
        for index, out in zip(indices, outputs):
            detections[index] = Detections(
                boxes_to_inclusive(out["boxes"].double().cpu().numpy()),
                out["scores"].double().cpu().numpy(),
                out["labels"].cpu().numpy() - 1,
            )
    evaluated = sorted(detections)
    ground_truth = [GroundTruth(records[i].boxes, records[i].labels, records[i].difficult) for i in evaluated]
    aps = detection_ap([detections[i] for i in evaluated], ground_truth, len(VOC_CLASSES), metric=metric)
    return aps, len(evaluated)


def main(args: argparse.Namespace) -> dict:
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
    defaults = BUILTIN_SIZES if builtin else DEFAULT_SIZES
    sizes = {
        "train": args.train_sizes or defaults["train"], "test": args.test_size or defaults["test"],
        "max": args.max_size or defaults["max"], "anchors": args.anchor_sizes or defaults["anchors"],
    }
    try:
        train_sizes = [int(s) for s in str(sizes["train"]).split(",")]
        [int(s) for s in str(sizes["anchors"]).split(",")]
    except ValueError as exc:
        raise ValueError(f"--train-sizes / --anchor-sizes must be comma-separated integers: {exc}") from exc
    encoder, encoder_name = load_transfer_encoder(args.checkpoint, args.encoder, args.seed)
    mode = resolve_input(encoder, args.input)
    iters = schedule_length(args.iters, PROTOCOL_ITERS, builtin, BUILTIN_ITERS)

    run = TransferRun(BENCHMARK, args, encoder_name, checkpoint_label(args.checkpoint))
    for report in reports:
        run.add_report(report)
    model, description = build_detector(encoder, args, sizes)
    model.to(device)
    encoder.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    scheduler = step_lr(optimizer, iters, PROTOCOL_ITERS, PROTOCOL_STEP, PROTOCOL_GAMMA)
    LOG.info("%s: %s; input %s; train sizes %s, test %d, max %d; %d iterations on %d images; %s",
             encoder_name, description, mode, train_sizes, sizes["test"], sizes["max"], iters,
             len(train_records), device)

    generator = torch.Generator().manual_seed(args.seed)
    loader = DataLoader(
        DetectionImages(train_records, train=True), batch_size=args.batch_size, shuffle=True,
        num_workers=args.workers, collate_fn=collate, generator=generator, persistent_workers=args.workers > 0,
    )
    batches = cycle(loader)
    losses: list[float] = []
    progress = tqdm(range(iters), desc=BENCHMARK, unit="it", mininterval=2)
    for _ in progress:
        model.train()
        set_train_mode(encoder, [encoder], args.bn)  # the whole encoder fine-tunes; BN per --bn
        images, targets, _, skipped = next(batches)
        run.skipped_at_runtime(skipped)
        if not images:
            continue
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        loss_dict = model(model_inputs(images, mode, device), targets)
        loss = sum(loss_dict.values())
        sgd_update(loss, optimizer, scheduler, args.clip_grad)
        losses.append(loss.item())
        if len(losses) % 10 == 0:
            progress.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}", lr=f"{scheduler.get_last_lr()[0]:.1e}")

    model.transform.min_size = (int(sizes["test"]),)  # single-scale test
    test_loader = DataLoader(DetectionImages(test_records, train=False), batch_size=args.batch_size,
                             shuffle=False, num_workers=args.workers, collate_fn=collate)
    aps, n_eval = evaluate(model, test_records, test_loader, mode, device, run, args.ap_metric)
    aps = aps * 100
    hparams = {
        "iters": iters, "lr": args.lr, "momentum": args.momentum, "weight_decay": args.weight_decay,
        "batch_size": args.batch_size, "train_sizes": train_sizes, "test_size": sizes["test"],
        "max_size": sizes["max"], "anchors": sizes["anchors"], "rois_per_image": args.rois_per_image,
        "rpn_test_proposals": args.rpn_test_proposals, "bn": args.bn, "input": mode, "detector": description,
        "add_voc12": args.add_voc12, "ap_metric": args.ap_metric, "data": str(data_root),
        "train_images": len(train_records), "test_images": n_eval,
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


def cli(argv=None) -> dict:
    return main(get_args_parser().parse_args(argv))


if __name__ == "__main__":
    cli()
