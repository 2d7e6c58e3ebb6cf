"""PASCAL VOC2007 object detection on the pretrained encoder: Fast R-CNN as the paper (default for
AlexNets), or torchvision's Faster R-CNN (docs/protocols.md section 5; docs/voc.md).

    python -m ssl_colorize.benchmarks.voc_detection --checkpoint ck.pth --data /datasets --proposals /datasets/ss
    python -m ssl_colorize.benchmarks.voc_detection --checkpoint ck.pth --data /datasets --detector faster-rcnn
    python -m ssl_colorize.benchmarks.voc_detection     # built-in VOCdevkit (and its proposals), random alexnet_lab

``--detector`` (default: the encoder card's ``transfer.detector``: fast-rcnn for the AlexNets,
faster-rcnn for resnet50_lab):

* ``fast-rcnn`` -- the paper's protocol as released (rbgirshick/fast-rcnn): ``--proposals``, a folder
  holding the released selective-search files ``voc_2007_trainval.mat`` and ``voc_2007_test.mat`` (the
  built-in devkit ships its own); RoI max pooling on conv5, fc6 / fc7 with dropout, 128 RoIs over 2
  images, multi-scale training 480..1200, SGD lr 1e-3 (biases x2, no decay), 150k iterations with lr /10
  every 50k; test at 600, score > 0.05, per-class NMS 0.3. Each value's released file and field:
  docs/voc.md (detection) and ssl_colorize.heads.fast_rcnn; defaults in ssl_colorize.engine.detection_recipe.
* ``faster-rcnn`` -- the modern protocol: torchvision's Faster R-CNN (nothing is downloaded) with a learnt
  RPN, RoIAlign, the encoder's head stages, 2 images of 64 RoIs, sizes 480-800 / 1000, the same schedule,
  NMS 0.5, difficult objects left out, gradients clipped at 10.

Both fine-tune every encoder layer (BatchNorm frozen unless ``--bn train``); ``--iters`` scales the lr
steps with it (built-in data: 360 iterations for fast-rcnn, 1500 for faster-rcnn, smaller scales).
Evaluation: the VOC2007 devkit's AP (ssl_colorize.voc_metrics.detection_ap), 11-point by default,
``--ap-metric area`` for the VOC2010+ variant.

Rows: benchmark ``voc_detection``, tap ``all``, protocol ``fast_rcnn_11point`` / ``faster_rcnn_11point``
(or ``_area``), hparams ``detector``; metrics ``mAP`` and ``AP_<class>`` (percent). As published (Fast
R-CNN, AlexNet, mAP): colorization 46.1 (colour input 46.9), ImageNet labels 56.8, random 43.4, k-means 45.6.

Run folder (``--out``, default ``runs/voc_detection/<run id>``): config.json, log.jsonl, a rolling
checkpoint every ``--ckpt-every`` iterations, ``--resume`` continues exactly where a killed run stopped.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from ssl_colorize.data.voc import VOC_CLASSES, ListBatch, load_main_split
from ssl_colorize.engine.cli import (
    ArgumentParser, UsageError, check_non_negative, check_number, check_positive, run_cli,
)
from ssl_colorize.engine.detection_recipe import (
    BUILTIN_ITERS, BUILTIN_SIZES, DEFAULT_SIZES, DETECTORS, PROTOCOL_GAMMA, PROTOCOL_ITERS, PROTOCOL_STEP,
    check_proposals, detector_settings, resolve_detector, resolve_sizes, score, setup_detector,
)
from ssl_colorize.engine.finetune import (
    BN_MODES, add_training_args, batch_stream, finetune, schedule_length, set_train_mode, step_lr,
)
from ssl_colorize.engine.transfer_run import (
    TransferRun, add_common_args, checkpoint_ref, dataset_name, load_transfer_encoder, resolve_data, resolve_device,
    resolve_input, seed_everything, validate_common, validate_training,
)
from ssl_colorize.heads.detection import has_detection_split
from ssl_colorize.models.cards import get_card
from ssl_colorize.voc_metrics import AP_METRICS, mean_ap

LOG = logging.getLogger("ssl_colorize.voc.detection")
BENCHMARK = "voc_detection"


def get_args_parser(add_help: bool = True) -> ArgumentParser:
    p = ArgumentParser(BENCHMARK, add_help=add_help,
                       description="VOC2007 detection with Fast R-CNN or Faster R-CNN on the encoder "
                                   "(docs/protocols.md section 5)")
    p.add_argument("--detector", choices=DETECTORS, default=None,
                   help="fast-rcnn: the paper's protocol over precomputed proposals; faster-rcnn: a learnt RPN "
                        "(default: the encoder card's, fast-rcnn for AlexNets)")
    p.add_argument("--proposals", default=None,
                   help="fast-rcnn: folder holding voc_2007_trainval.mat and voc_2007_test.mat (+ "
                        "voc_2012_trainval.mat with --add-voc12), the released selective-search layout (default: "
                        "selective_search_data beside the VOCdevkit when it holds them, as the built-in data's; "
                        "else required)")
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
    add_common_args(p, iters_help=f"training iterations (default {PROTOCOL_ITERS}; on the built-in data "
                                  f"{BUILTIN_ITERS['fast-rcnn']} for fast-rcnn, {BUILTIN_ITERS['faster-rcnn']} for "
                                  "faster-rcnn); the lr steps scale with it", job=BENCHMARK)
    add_training_args(p)
    return p


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
    if detector == "fast-rcnn":
        check_proposals(args)


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
    iters = schedule_length(args.iters, PROTOCOL_ITERS, builtin, BUILTIN_ITERS[detector])
    # fast-rcnn's proposals are read (and checked) here, before anything is created
    setup = setup_detector(detector, encoder, args, data_root=data_root, train_records=train_records, sizes=sizes,
                           settings=settings, mode=mode, device=device)
    model, train_set = setup.model, setup.train_set

    run = TransferRun(BENCHMARK, args, encoder_name, checkpoint_ref(args).label)
    run.folder.write_config({**vars(args), "iters": iters, "sizes": sizes, "input_mode": mode, "encoder": encoder_name,
                             "detector": detector, **settings})
    for report in reports:
        run.add_report(report)
    model.to(device)
    optimizer = torch.optim.SGD(setup.param_groups, lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    scheduler = step_lr(optimizer, iters, PROTOCOL_ITERS, PROTOCOL_STEP, PROTOCOL_GAMMA)
    LOG.info("%s: %s; input %s; train sizes %s, test %d, max %d; %d iterations on %d images; %s",
             encoder_name, setup.description, mode, sizes["train"], sizes["test"], sizes["max"], iters,
             len(train_set), device)

    def batches(start: int):
        return batch_stream(train_set, args.batch_size, seed=args.seed, start=start, workers=args.workers,
                            collate=ListBatch(3), drop_last=False)

    def step(batch):
        images, targets, _, skipped = batch
        model.train()
        set_train_mode(encoder, [encoder], args.bn)  # the whole encoder fine-tunes; BN per --bn
        run.skipped_at_runtime(skipped)
        return setup.loss(images, targets) if images else None

    losses = finetune(run, model, optimizer, scheduler, iters=iters, batches=batches, step=step, args=args,
                      desc=BENCHMARK)

    found = setup.detect(test_records, args.workers, run.skipped_at_runtime)
    aps, n_eval = score(test_records, found, args.ap_metric)
    aps = aps * 100
    hparams = {
        "detector": detector, "iters": iters, "lr": args.lr, "momentum": args.momentum,
        "weight_decay": args.weight_decay, "batch_size": args.batch_size, "train_sizes": sizes["train"],
        "test_size": sizes["test"], "max_size": sizes["max"], **settings, "bn": args.bn, "input": mode,
        "model": setup.description, "add_voc12": args.add_voc12, "ap_metric": args.ap_metric,
        "data": str(data_root), "train_images": len(train_set), "test_images": n_eval,
        "classes_with_objects": int(np.isfinite(aps).sum()), **setup.hparams,
    }
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
