"""The VOC2007 detection recipe's library (``ssl_colorize.benchmarks.voc_detection``): each detector's
defaults, the proposals' folder and files, and the two detectors set up for training and testing.

* ``fast-rcnn``: the paper's protocol as released (rbgirshick/fast-rcnn; ssl_colorize.heads.fast_rcnn,
  each value's file and field there and in docs/voc.md), over precomputed proposals;
* ``faster-rcnn``: torchvision's Faster R-CNN with a learnt RPN (ssl_colorize.heads.detection).

:func:`setup_detector` gives a :class:`DetectionSetup`: the model, its training items and parameter
groups, the training loss of a batch and the test pass, so the recipe's training loop and rows do not
depend on the detector.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ssl_colorize.data.proposals import FastRCNNImages, proposal_file, read_proposals
from ssl_colorize.data.voc import (
    VOC_CLASSES, DetectionImages, DetectionRecord, ListBatch, find_devkit, read_ids, split_file, year_dir,
)
from ssl_colorize.engine.cli import UsageError, check_input_dir, fail
from ssl_colorize.engine.finetune import caffe_param_groups
from ssl_colorize.engine.transfer_run import pad_value, to_model_input
from ssl_colorize.heads import detection, fast_rcnn
from ssl_colorize.models.cards import get_card
from ssl_colorize.voc_metrics import Detections, GroundTruth, detection_ap

DETECTORS = ("fast-rcnn", "faster-rcnn")
# The paper's schedule (docs/protocols.md section 5): 150k iterations, lr /10 every 50k (SimuJenni/fast-rcnn
# models/CaffeNet/solver.prototxt stepsize 50000; the original CaffeNet solver: 40k, stepsize 30000).
PROTOCOL_ITERS, PROTOCOL_STEP, PROTOCOL_GAMMA = 150_000, 50_000, 0.1
#: Iterations on the built-in data (ours, for CPUs): Fast R-CNN's 128 RoIs over 2 images at 192..288 take
#: ~1.1 s an iteration on 2 CPU threads, so 360 iterations (lr steps at 120 and 240) + the 200 test images
#: keep the built-in default run near 7 minutes; Faster R-CNN keeps 1500.
BUILTIN_ITERS = {"fast-rcnn": 360, "faster-rcnn": 1500}
DEFAULT_SIZES = {
    # experiments/cfgs/multiscale.yml TRAIN.SCALES, TRAIN.MAX_SIZE / TEST.MAX_SIZE 2000; config.py TEST.SCALES (600,)
    "fast-rcnn": {"train": "480,576,688,864,1200", "test": 600, "max": 2000},
    "faster-rcnn": {"train": "480,576,688,800", "test": 600, "max": 1000, "anchors": "32,64,128,256,512"},
}
BUILTIN_SIZES = {"train": "192,224,256,288", "test": 240, "max": 480, "anchors": "32,64,128,256"}
#: Per detector: RoIs per image (fast-rcnn: config.py TRAIN.BATCH_SIZE 128 / IMS_PER_BATCH 2), gradient
#: clipping (the released solver has none), score threshold (test.py thresh 0.05), NMS (TEST.NMS 0.3).
DETECTOR_DEFAULTS = {
    "fast-rcnn": {"rois_per_image": fast_rcnn.ROIS_PER_BATCH // fast_rcnn.IMAGES_PER_BATCH, "clip_grad": 0.0,
                  "score_thresh": fast_rcnn.TEST_SCORE_THRESH, "nms": fast_rcnn.TEST_NMS},
    "faster-rcnn": {"rois_per_image": 64, "clip_grad": 10.0, "score_thresh": 0.0, "nms": 0.5},
}


# ----------------------------------------------------------------------------------------------
# Options with per-detector defaults
# ----------------------------------------------------------------------------------------------

def size_list(option: str, text: str) -> list[int]:
    """``"480,576"`` -> [480, 576]; UsageError naming the option otherwise."""
    try:
        sizes = [int(s) for s in str(text).split(",")]
    except ValueError:
        raise fail(option, text, "must be comma-separated integers") from None
    if not sizes or min(sizes) < 1:
        raise fail(option, text, "sizes must be > 0")
    return sizes


def resolve_sizes(args: argparse.Namespace, builtin: bool, detector: str) -> dict:
    """Train sizes, test size, max size (and faster-rcnn's anchors): the options, else the defaults."""
    defaults = BUILTIN_SIZES if builtin else DEFAULT_SIZES[detector]
    sizes = {"train": size_list("--train-sizes", args.train_sizes or defaults["train"]),
             "test": args.test_size or defaults["test"], "max": args.max_size or defaults["max"]}
    if detector == "faster-rcnn":
        sizes["anchors"] = size_list("--anchor-sizes", args.anchor_sizes or defaults["anchors"])
    return sizes


def resolve_detector(args: argparse.Namespace, encoder_name: str) -> str:
    """``--detector``, else the encoder card's default."""
    return args.detector or get_card(encoder_name).transfer.detector


def detector_settings(args: argparse.Namespace, detector: str) -> dict:
    """The per-detector options (RoIs per image, clipping, score threshold, NMS) with defaults filled in."""
    chosen = {k: getattr(args, k) for k in DETECTOR_DEFAULTS[detector]}
    return {k: DETECTOR_DEFAULTS[detector][k] if v is None else v for k, v in chosen.items()}


# ----------------------------------------------------------------------------------------------
# Proposals (fast-rcnn)
# ----------------------------------------------------------------------------------------------

def proposal_splits(args: argparse.Namespace) -> list[tuple[int, str]]:
    return [(2007, "trainval"), (2007, "test")] + [(2012, "trainval")] * args.add_voc12


def proposals_folder(args: argparse.Namespace, data) -> Path | None:
    """``--proposals``, else ``selective_search_data`` beside the VOCdevkit of ``data`` when it holds the
    VOC2007 files (the released tree: ``data/selective_search_data``; the built-in data's), else None."""
    if args.proposals is not None:
        return Path(args.proposals)
    from ssl_colorize.data.builtin_voc import PROPOSALS_DIR

    try:
        beside = find_devkit(data).parent / PROPOSALS_DIR
    except ValueError:
        return None
    return beside if proposal_file(beside, 2007, "trainval").is_file() else None


def load_proposals(folder, data, year: int, split: str) -> dict[str, np.ndarray]:
    """The proposals of ``VOC<year>/ImageSets/Main/<split>.txt``'s ids (UsageError naming the file)."""
    try:
        ids = read_ids(split_file(year_dir(data, year), "Main", split))
        return read_proposals(proposal_file(folder, year, split), ids)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def check_proposals(args: argparse.Namespace) -> None:
    """validate()'s part for fast-rcnn: the folder, its files, and (with --data) their layout and coverage."""
    if args.data is None and args.proposals is None:
        return  # the built-in data's own proposals, written with it
    folder = proposals_folder(args, args.data)
    if folder is None:
        raise UsageError("--proposals: required with --detector fast-rcnn and --data: a folder holding "
                         "voc_2007_trainval.mat and voc_2007_test.mat (the released selective-search files)")
    check_input_dir("--proposals", folder)
    for year, split in proposal_splits(args):
        if not proposal_file(folder, year, split).is_file():
            raise fail("--proposals", folder, f"{proposal_file(folder, year, split)}: no such file")
    if args.data is not None:  # layout and coverage now; the built-in data's ids are known once it exists
        for year, split in proposal_splits(args):
            load_proposals(folder, args.data, year, split)


# ----------------------------------------------------------------------------------------------
# The detectors, ready to train and test
# ----------------------------------------------------------------------------------------------

@dataclass
class DetectionSetup:
    """A detector on the encoder: ``loss(images, targets)`` of a training batch (uint8 images, the
    training items' targets); ``detect(test_records, workers, skipped)`` -> index -> (devkit boxes,
    scores, labels 0..19); ``hparams``: the detector's own entries of each row."""

    model: nn.Module
    train_set: Dataset
    param_groups: list[dict]
    description: str
    loss: Callable[[list[torch.Tensor], list[dict]], torch.Tensor]
    detect: Callable[..., dict[int, tuple]]
    hparams: dict = field(default_factory=dict)


def model_inputs(images: list[torch.Tensor], mode: str, device: torch.device) -> list[torch.Tensor]:
    """uint8 RGB images of any sizes -> the encoder's input units, one tensor per image, on device."""
    return [to_model_input(im.to(device, non_blocking=True)[None], mode)[0] for im in images]


def setup_fast_rcnn(encoder: nn.Module, args: argparse.Namespace, *, data_root: Path,
                    train_records: list[DetectionRecord], sizes: dict, settings: dict, mode: str,
                    device: torch.device) -> DetectionSetup:
    """Fast R-CNN over the proposals (read and checked first: UsageError naming the file)."""
    folder = proposals_folder(args, data_root)
    if folder is None:  # the built-in cache was just written, or --data changed since validate
        raise UsageError("--proposals: required with --detector fast-rcnn and --data")
    test_proposals = load_proposals(folder, data_root, 2007, "test")
    train_proposals = {}
    for year, split in [(y, s) for y, s in proposal_splits(args) if s == "trainval"]:
        train_proposals.update(load_proposals(folder, data_root, year, split))
    try:
        train_set = fast_rcnn.training_set(
            train_records, train_proposals, rois_per_image=settings["rois_per_image"],
            use_difficult=not args.skip_difficult, scales=sizes["train"], max_size=sizes["max"])
    except ValueError as exc:
        raise UsageError(f"--proposals {folder}: {exc}") from None
    model = fast_rcnn.FastRCNN(encoder)
    model.set_target_statistics(train_set.sampler.means, train_set.sampler.stds)
    pad = pad_value(mode)

    def to_input(x):
        return to_model_input(x, mode)

    def loss(images, targets):
        scales = [t["scale"] for t in targets]
        logits, deltas = model(fast_rcnn.image_batch(images, scales, to_input, pad, device),
                               fast_rcnn.roi_batch([t["rois"] for t in targets], scales, device))
        losses = fast_rcnn.fast_rcnn_loss(logits, deltas, torch.cat([t["labels"] for t in targets]).to(device),
                                          torch.cat([t["bbox_targets"] for t in targets]).to(device))
        return losses["loss_cls"] + losses["loss_bbox"]

    def detect(test_records, workers, skipped):
        test_set = FastRCNNImages(test_records, train=False, scales=[sizes["test"]], max_size=sizes["max"],
                                  rois=[test_proposals[r.image_id] for r in test_records])
        loader = DataLoader(test_set, batch_size=1, shuffle=False, num_workers=workers, collate_fn=ListBatch(3))
        return fast_rcnn.detect_all(model, loader, to_input, pad, device, score_thresh=settings["score_thresh"],
                                    nms=settings["nms"], max_per_image=args.detections_per_image, skipped=skipped)

    # train.prototxt: weights lr_mult 1 decay_mult 1, biases lr_mult 2 decay_mult 0
    groups = caffe_param_groups(model.named_parameters(), args.lr, args.weight_decay)
    return DetectionSetup(model, train_set, groups, model.describe(), loss, detect,
                          hparams={"proposals": str(folder), "skip_difficult": args.skip_difficult})


def setup_faster_rcnn(encoder: nn.Module, args: argparse.Namespace, *, train_records: list[DetectionRecord],
                      sizes: dict, settings: dict, mode: str, device: torch.device) -> DetectionSetup:
    """torchvision's Faster R-CNN on the encoder (a learnt RPN), tested at one scale."""
    model, description = detection.build_detector(
        encoder, train_sizes=sizes["train"], max_size=sizes["max"], anchors=sizes["anchors"],
        rpn_train_proposals=args.rpn_train_proposals, rpn_test_proposals=args.rpn_test_proposals,
        score_thresh=settings["score_thresh"], detections_per_image=args.detections_per_image,
        rois_per_image=settings["rois_per_image"])
    train_set = DetectionImages(train_records, train=True)

    def loss(images, targets):
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        return sum(model(model_inputs(images, mode, device), targets).values())

    def detect(test_records, workers, skipped):
        model.transform.min_size = (int(sizes["test"]),)  # single-scale test
        loader = DataLoader(DetectionImages(test_records, train=False), batch_size=args.batch_size,
                            shuffle=False, num_workers=workers, collate_fn=ListBatch(3))
        return detection.detect_all(model, loader, lambda images: model_inputs(images, mode, device),
                                    skipped=skipped)

    groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    return DetectionSetup(model, train_set, groups, description, loss, detect,
                          hparams={"anchors": ",".join(map(str, sizes["anchors"])),
                                   "rpn_test_proposals": args.rpn_test_proposals})


def setup_detector(detector: str, encoder: nn.Module, args: argparse.Namespace, *, data_root: Path,
                   train_records: list[DetectionRecord], sizes: dict, settings: dict, mode: str,
                   device: torch.device) -> DetectionSetup:
    if detector == "fast-rcnn":
        return setup_fast_rcnn(encoder, args, data_root=data_root, train_records=train_records, sizes=sizes,
                               settings=settings, mode=mode, device=device)
    return setup_faster_rcnn(encoder, args, train_records=train_records, sizes=sizes, settings=settings, mode=mode,
                             device=device)


def score(records: Sequence[DetectionRecord], found: dict[int, tuple], metric: str) -> tuple[np.ndarray, int]:
    """Per-class AP (20,) of the detections (index -> (devkit boxes, scores, labels 0..19)) and the
    number of images evaluated."""
    evaluated = sorted(found)
    ground_truth = [GroundTruth(records[i].boxes, records[i].labels, records[i].difficult) for i in evaluated]
    aps = detection_ap([Detections(*found[i]) for i in evaluated], ground_truth, len(VOC_CLASSES), metric=metric)
    return aps, len(evaluated)
