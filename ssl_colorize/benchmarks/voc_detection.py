"""PASCAL VOC2007 object detection on the pretrained encoder: Fast R-CNN as the paper (default for
AlexNets), or torchvision's Faster R-CNN (docs/protocols.md section 5).

    python -m ssl_colorize.benchmarks.voc_detection --checkpoint ck.pth --data /datasets --proposals /datasets/ss
    python -m ssl_colorize.benchmarks.voc_detection --checkpoint ck.pth --data /datasets --detector faster-rcnn
    python -m ssl_colorize.benchmarks.voc_detection     # built-in VOCdevkit (and its proposals), random alexnet_lab

``--detector`` (default: the encoder card's ``transfer.detector``: fast-rcnn for the AlexNets,
faster-rcnn for resnet50_lab):

* ``fast-rcnn`` -- the paper's protocol, as released (rbgirshick/fast-rcnn; ssl_colorize.heads.fast_rcnn):
  precomputed proposals (``--proposals``: a folder holding ``voc_2007_trainval.mat`` and
  ``voc_2007_test.mat``, the released selective-search files; the built-in devkit ships its own),
  RoI max pooling on the card's detection tap (conv5), the card's head stages (fc6, fc7, dropout 0.5),
  a 21-way classifier and an 84-way box regressor. Training: minibatches of 128 RoIs over 2 images (25%
  foreground), ground-truth boxes added to the proposals, difficult objects kept (as released;
  ``--skip-difficult`` drops them), per-class normalised box targets, horizontal flips, multi-scale
  (shorter side drawn from 480, 576, 688, 864, 1200, longer side at most 2000:
  ``experiments/cfgs/multiscale.yml`` TRAIN.SCALES / MAX_SIZE); SGD lr 1e-3, momentum 0.9, weight decay
  5e-4, biases at lr x2 without decay (``models/CaffeNet/solver.prototxt`` base_lr / momentum /
  weight_decay; ``train.prototxt`` lr_mult / decay_mult), no gradient clipping; the paper's schedule,
  150k iterations with lr /10 every 50k (the released CaffeNet solver: 40k, stepsize 30000; the
  self-supervised evaluation fork SimuJenni/fast-rcnn: stepsize 50000, every layer trained, conv1
  included). Test: shorter side 600 (config.py TEST.SCALES; the fork's multiscale.yml TEST.SCALES [600]),
  score > 0.05, per-class NMS 0.3, at most 100 per image (test.py ``test_net``; config.py TEST.NMS).
* ``faster-rcnn`` -- the modern protocol: torchvision's Faster R-CNN (no pretrained weights, nothing is
  downloaded; ssl_colorize.heads.detection) with a learnt RPN, RoIAlign, the encoder's head stages, 2
  images of 64 RoIs, sizes 480-800 / 1000, lr 1e-3 and the same 150k / 50k schedule, NMS 0.5
  (torchvision's), difficult objects left out, gradients clipped at 10.

Both: every layer of the encoder is fine-tuned, its BatchNorms frozen (folded) unless ``--bn train``;
images in the encoder's own input units; ``--iters`` scales the lr steps with it (1500 iterations on the
built-in data). Evaluation by ssl_colorize.voc_metrics.detection_ap: the VOC2007 devkit's rule (IoU >=
0.5, greedy by score, duplicates false, difficult objects neither counted nor penalised), 11-point AP by
default, ``--ap-metric area`` for the VOC2010+ variant.

Rows: benchmark ``voc_detection``, tap ``all``, protocol ``fast_rcnn_11point`` / ``faster_rcnn_11point``
(or ``_area``), hparams ``detector``; metrics ``mAP`` and ``AP_<class>`` (percent). As published (Fast
R-CNN, AlexNet, mAP): colorization 46.1 (colour input 46.9), ImageNet labels 56.8, random 43.4, k-means 45.6.

Run folder (``--out``, default ``runs/voc_detection/<run id>``): config.json, log.jsonl, a rolling
checkpoint every ``--ckpt-every`` iterations, ``--resume`` continues exactly where a killed run stopped.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from ssl_colorize.data.proposals import FastRCNNImages, proposal_file, read_proposals
from ssl_colorize.data.voc import (
    VOC_CLASSES, DetectionImages, DetectionRecord, ListBatch, find_devkit, load_main_split, read_ids, split_file,
    year_dir,
)
from ssl_colorize.engine.cli import (
    ArgumentParser, UsageError, check_input_dir, check_non_negative, check_number, check_positive, fail, run_cli,
)
from ssl_colorize.engine.finetune import (
    BN_MODES, add_training_args, batch_stream, caffe_param_groups, finetune, schedule_length, set_train_mode, step_lr,
)
from ssl_colorize.engine.transfer_run import (
    TransferRun, add_common_args, checkpoint_ref, dataset_name, load_transfer_encoder, pad_value, resolve_data,
    resolve_device, resolve_input, seed_everything, to_model_input, validate_common, validate_training,
)
from ssl_colorize.heads import fast_rcnn
from ssl_colorize.heads.detection import build_detector, detect_all, has_detection_split
from ssl_colorize.models.cards import get_card
from ssl_colorize.voc_metrics import AP_METRICS, Detections, GroundTruth, detection_ap, mean_ap

LOG = logging.getLogger("ssl_colorize.voc.detection")
BENCHMARK = "voc_detection"
DETECTORS = ("fast-rcnn", "faster-rcnn")
# The paper's schedule (docs/protocols.md section 5): 150k iterations, lr /10 every 50k.
PROTOCOL_ITERS, PROTOCOL_STEP, PROTOCOL_GAMMA = 150_000, 50_000, 0.1
BUILTIN_ITERS = 1500
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


def get_args_parser(add_help: bool = True) -> ArgumentParser:
    p = ArgumentParser(BENCHMARK, add_help=add_help,
                       description="VOC2007 detection with Fast R-CNN or Faster R-CNN on the encoder "
                                   "(docs/protocols.md section 5)")
    p.add_argument("--detector", choices=DETECTORS, default=None,
                   help="fast-rcnn: the paper's protocol over precomputed proposals; faster-rcnn: a learnt RPN "
                        "(default: the encoder card's, fast-rcnn for AlexNets)")
    p.add_argument("--proposals", default=None,
                   help="fast-rcnn: folder holding voc_2007_trainval.mat and voc_2007_test.mat (+ "
                        "voc_2012_trainval.mat with --add-voc12), the released selective-search layout (default: selective_search_data "
                        "beside the VOCdevkit when it holds them, as the built-in data's; else required)")
    p.add_argument("--skip-difficult", action="store_true",
                   help="fast-rcnn: leave difficult objects out of training (the release keeps them)")
    p.add_argument("--add-voc12", action="store_true", help="train on VOC2007 trainval + VOC2012 trainval")
    p.add_argument("--ap-metric", choices=AP_METRICS, default="11point",
                   help="11point: the VOC2007 devkit; area: VOC2010+ area under the curve")
    p.add_argument("--train-sizes", default=None,
                   help="shorter sides for multi-scale training (default fast-rcnn "
                        f"{DEFAULT_SIZES['fast-rcnn']['train']}, faster-rcnn {DEFAULT_SIZES['faster-rcnn']['train']}; "
                        f"{BUILTIN_SIZES['train']} on the built-in data)")
    p.add_argument("--test-size", type=int, default=None,
                   help=f"shorter side at test (default 600; {BUILTIN_SIZES['test']} built-in)")
    p.add_argument("--max-size", type=int, default=None,
                   help=f"longest side (default fast-rcnn 2000, faster-rcnn 1000; {BUILTIN_SIZES['max']} built-in)")
    p.add_argument("--anchor-sizes", default=None,
                   help=f"faster-rcnn: RPN anchor sizes (default {DEFAULT_SIZES['faster-rcnn']['anchors']}; "
                        f"{BUILTIN_SIZES['anchors']} built-in)")
    p.add_argument("--batch-size", type=int, default=2, help="images per iteration (Fast R-CNN: 2)")
    p.add_argument("--rois-per-image", type=int, default=None, help="sampled RoIs per image for the box head (64)")
    p.add_argument("--rpn-train-proposals", type=int, default=2000,
                   help="faster-rcnn: proposals kept after NMS in training")
    p.add_argument("--rpn-test-proposals", type=int, default=300, help="faster-rcnn: proposals kept after NMS at test")
    p.add_argument("--score-thresh", type=float, default=None,
                   help="drop detections scoring below this (default fast-rcnn 0.05, faster-rcnn 0)")
    p.add_argument("--nms", type=float, default=None, help="fast-rcnn: per-class NMS IoU at test (default 0.3)")
    p.add_argument("--detections-per-image", type=int, default=100)
    p.add_argument("--bn", choices=BN_MODES, default="frozen",
                   help="BatchNorm: frozen statistics (folded) or batch statistics")
    p.add_argument("--lr", type=float, default=1e-3, help="base lr (solver.prototxt base_lr)")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--clip-grad", type=float, default=None,
                   help="clip the gradients' global L2 norm, 0: off (default fast-rcnn 0, faster-rcnn 10)")
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


def resolve_sizes(args, builtin: bool, detector: str) -> dict:
    defaults = BUILTIN_SIZES if builtin else DEFAULT_SIZES[detector]
    sizes = {"train": size_list("--train-sizes", args.train_sizes or defaults["train"]),
             "test": args.test_size or defaults["test"], "max": args.max_size or defaults["max"]}
    if detector == "faster-rcnn":
        sizes["anchors"] = size_list("--anchor-sizes", args.anchor_sizes or defaults["anchors"])
    return sizes


def resolve_detector(args, encoder_name: str) -> str:
    """``--detector``, else the encoder card's default."""
    return args.detector or get_card(encoder_name).transfer.detector


def detector_settings(args, detector: str) -> dict:
    """The per-detector options with their defaults filled in."""
    chosen = {k: getattr(args, k) for k in DETECTOR_DEFAULTS[detector]}
    return {k: DETECTOR_DEFAULTS[detector][k] if v is None else v for k, v in chosen.items()}


def proposal_splits(args) -> list[tuple[int, str]]:
    return [(2007, "trainval"), (2007, "test")] + [(2012, "trainval")] * args.add_voc12


def proposals_folder(args, data) -> Path | None:
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


def validate(args) -> None:
    validate_training(args)
    for option in ("--test-size", "--max-size", "--rois-per-image", "--rpn-train-proposals", "--rpn-test-proposals",
                   "--detections-per-image"):
        check_positive(option, getattr(args, option[2:].replace("-", "_")))
    check_non_negative("--score-thresh", args.score_thresh)
    if args.nms is not None:
        check_number("--nms", args.nms, minimum=0, exclusive_minimum=True, maximum=1)
    splits = [(2007, "Main", "trainval"), (2007, "Main", "test")] + [(2012, "Main", "trainval")] * args.add_voc12
    ref = validate_common(args, splits)
    name = ref.model_name()
    detector = resolve_detector(args, name)
    resolve_sizes(args, builtin=args.data is None, detector=detector)
    if get_card(name).transfer.detection_tap is None:
        raise UsageError(f"encoder {name} has no detection split")
    if detector != "fast-rcnn":
        return
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


def model_inputs(images: list[torch.Tensor], mode: str, device: torch.device) -> list[torch.Tensor]:
    """uint8 RGB images of any sizes -> the encoder's input units, one tensor per image, on device."""
    return [to_model_input(im.to(device, non_blocking=True)[None], mode)[0] for im in images]


def score(records: list[DetectionRecord], found: dict[int, tuple], metric: str) -> tuple[np.ndarray, int]:
    """Per-class AP (20,) of the detections (index -> (devkit boxes, scores, labels 0..19)) and the
    number of images evaluated."""
    evaluated = sorted(found)
    ground_truth = [GroundTruth(records[i].boxes, records[i].labels, records[i].difficult) for i in evaluated]
    aps = detection_ap([Detections(*found[i]) for i in evaluated], ground_truth, len(VOC_CLASSES), metric=metric)
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
    encoder, encoder_name = load_transfer_encoder(args.checkpoint, args.encoder, args.seed)
    if not has_detection_split(encoder):
        raise UsageError(f"encoder {encoder_name} has no detection split")
    encoder.requires_grad_(True)  # every layer fine-tunes
    detector = resolve_detector(args, encoder_name)
    settings = detector_settings(args, detector)
    args.clip_grad = settings["clip_grad"]  # what finetune's update reads
    sizes = resolve_sizes(args, builtin, detector)
    try:
        mode = resolve_input(encoder, args.input)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    iters = schedule_length(args.iters, PROTOCOL_ITERS, builtin, BUILTIN_ITERS)
    if detector == "fast-rcnn":  # the proposals are read (and checked) before anything is created
        proposals_dir = proposals_folder(args, data_root)
        if proposals_dir is None:  # the built-in cache was just written, or --data changed since validate
            raise UsageError("--proposals: required with --detector fast-rcnn and --data")
        test_proposals = load_proposals(proposals_dir, data_root, 2007, "test")
        train_proposals = {}
        for year, split in [(y, s) for y, s in proposal_splits(args) if s == "trainval"]:
            train_proposals.update(load_proposals(proposals_dir, data_root, year, split))
        try:
            train_set = fast_rcnn.training_set(
                train_records, train_proposals, rois_per_image=settings["rois_per_image"],
                use_difficult=not args.skip_difficult, scales=sizes["train"], max_size=sizes["max"])
        except ValueError as exc:
            raise UsageError(f"--proposals {proposals_dir}: {exc}") from None
        model = fast_rcnn.FastRCNN(encoder)
        model.set_target_statistics(train_set.sampler.means, train_set.sampler.stds)
        description = model.describe()
        # train.prototxt: weights lr_mult 1 decay_mult 1, biases lr_mult 2 decay_mult 0
        groups = caffe_param_groups(model.named_parameters(), args.lr, args.weight_decay)
    else:
        model, description = build_detector(
            encoder, train_sizes=sizes["train"], max_size=sizes["max"], anchors=sizes["anchors"],
            rpn_train_proposals=args.rpn_train_proposals, rpn_test_proposals=args.rpn_test_proposals,
            score_thresh=settings["score_thresh"], detections_per_image=args.detections_per_image,
            rois_per_image=settings["rois_per_image"])
        train_set = DetectionImages(train_records, train=True)
        groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]

    run = TransferRun(BENCHMARK, args, encoder_name, checkpoint_ref(args).label)
    run.folder.write_config({**vars(args), "iters": iters, "sizes": sizes, "input_mode": mode, "encoder": encoder_name,
                             "detector": detector, **settings})
    for report in reports:
        run.add_report(report)
    model.to(device)
    optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    scheduler = step_lr(optimizer, iters, PROTOCOL_ITERS, PROTOCOL_STEP, PROTOCOL_GAMMA)
    LOG.info("%s: %s; input %s; train sizes %s, test %d, max %d; %d iterations on %d images; %s",
             encoder_name, description, mode, sizes["train"], sizes["test"], sizes["max"], iters,
             len(train_set), device)

    def batches(start: int):
        return batch_stream(train_set, args.batch_size, seed=args.seed, start=start, workers=args.workers,
                            collate=ListBatch(3), drop_last=False)

    pad = pad_value(mode)

    def step(batch):
        images, targets, _, skipped = batch
        model.train()
        set_train_mode(encoder, [encoder], args.bn)  # the whole encoder fine-tunes; BN per --bn
        run.skipped_at_runtime(skipped)
        if not images:
            return None
        if detector == "faster-rcnn":
            targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
            return sum(model(model_inputs(images, mode, device), targets).values())
        scales = [t["scale"] for t in targets]
        logits, deltas = model(fast_rcnn.image_batch(images, scales, lambda x: to_model_input(x, mode), pad, device),
                               fast_rcnn.roi_batch([t["rois"] for t in targets], scales, device))
        losses = fast_rcnn.fast_rcnn_loss(logits, deltas, torch.cat([t["labels"] for t in targets]).to(device),
                                          torch.cat([t["bbox_targets"] for t in targets]).to(device))
        return losses["loss_cls"] + losses["loss_bbox"]

    losses = finetune(run, model, optimizer, scheduler, iters=iters, batches=batches, step=step, args=args,
                      desc=BENCHMARK)

    if detector == "fast-rcnn":
        test_set = FastRCNNImages(test_records, train=False, scales=[sizes["test"]], max_size=sizes["max"],
                                  rois=[test_proposals[r.image_id] for r in test_records])
        loader = DataLoader(test_set, batch_size=1, shuffle=False, num_workers=args.workers, collate_fn=ListBatch(3))
        found = fast_rcnn.detect_all(model, loader, lambda x: to_model_input(x, mode), pad, device,
                                     score_thresh=settings["score_thresh"], nms=settings["nms"],
                                     max_per_image=args.detections_per_image, skipped=run.skipped_at_runtime)
    else:
        model.transform.min_size = (int(sizes["test"]),)  # single-scale test
        loader = DataLoader(DetectionImages(test_records, train=False), batch_size=args.batch_size,
                            shuffle=False, num_workers=args.workers, collate_fn=ListBatch(3))
        found = detect_all(model, loader, lambda images: model_inputs(images, mode, device),
                           skipped=run.skipped_at_runtime)
    aps, n_eval = score(test_records, found, args.ap_metric)
    aps = aps * 100
    hparams = {
        "detector": detector, "iters": iters, "lr": args.lr, "momentum": args.momentum,
        "weight_decay": args.weight_decay, "batch_size": args.batch_size, "train_sizes": sizes["train"],
        "test_size": sizes["test"], "max_size": sizes["max"], **settings, "bn": args.bn, "input": mode,
        "model": description, "add_voc12": args.add_voc12, "ap_metric": args.ap_metric,
        "data": str(data_root), "train_images": len(train_set), "test_images": n_eval,
        "classes_with_objects": int(np.isfinite(aps).sum()),
    }
    if detector == "fast-rcnn":
        hparams.update(proposals=str(proposals_dir), skip_difficult=args.skip_difficult)
    else:
        hparams.update(anchors=",".join(map(str, sizes["anchors"])), rpn_test_proposals=args.rpn_test_proposals)
    row = dict(tap="all", dataset=dataset_name(builtin, "voc2007"), split="test",
               protocol=f"{detector.replace('-', '_')}_{args.ap_metric}", hparams=hparams)
    run.row(metric="mAP", value=mean_ap(aps), **row)
    for name, ap in zip(VOC_CLASSES, aps):
        run.row(metric=f"AP_{name}", value=float(ap), **row)
    LOG.info("detection (%s) mAP (%s) %.2f over %d images", detector, args.ap_metric, mean_ap(aps), n_eval)
    run.extra["final_loss"] = float(np.mean(losses[-10:])) if losses else float("nan")
    return run.finish({"mAP": mean_ap(aps), **{f"AP_{c}": float(a) for c, a in zip(VOC_CLASSES, aps)}})


def cli(argv=None):
    return run_cli(get_args_parser(), main, argv, validate=validate)


if __name__ == "__main__":
    cli()
