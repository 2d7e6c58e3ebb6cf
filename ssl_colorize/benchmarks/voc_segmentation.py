"""PASCAL VOC semantic segmentation: an FCN-32s head on the pretrained encoder (docs/protocols.md section 5).

    python -m ssl_colorize.benchmarks.voc_segmentation --checkpoint ck.pth --data /datasets --sbd /datasets/SBD
                                                      # the released recipe: VOC2011 train + SBD, seg11valid
    python -m ssl_colorize.benchmarks.voc_segmentation --checkpoint ck.pth --data /datasets --year 2012 \
        --sbd /datasets/SBD --colour-input            # VOC2012's train images, the colour-input variant
    python -m ssl_colorize.benchmarks.voc_segmentation --recipe quick --data /datasets --eval-ids ids.txt
    python -m ssl_colorize.benchmarks.voc_segmentation             # built-in VOCdevkit, random alexnet_lab, quick

Model (FCN-32s, Long et al.; ssl_colorize.heads.segmentation): the encoder run fully convolutionally
up to its card's segmentation tap (fc7 for alexnet_lab, whose fc6 / fc7 are convolutions; res5, or
conv5 for torchvision's AlexNet, otherwise), dropout, a zero-initialised 1x1 score convolution to 21
classes and the released fixed bilinear upsampling. The input is padded by ``--pad`` pixels (FCN's
100 when the tap is fc7, else 0) with the value the encoder normalises to zero. ``--colour-input``
(L encoders only) adds a zero-initialised conv1 branch on ab (the released train_val.prototxt's
``conv1_ab``).

``--recipe released`` (the default on ``--data``): the released FCN recipe of the colorization code,
richzhang/colorization ``feature_learning_tests/segmentation/`` (``solver0.prototxt``, ``solve.py``,
``train_val.prototxt``), which follows FCN-AlexNet (shelhamer/fcn.berkeleyvision.org
``voc-fcn-alexnet/solver.prototxt``: ``base_lr: 1e-4 # lr for normalized softmax``, ``iter_size: 20``).
Only solver0.prototxt is in the repository: solver1 / solver2 are its two later lr stages, run by
``solve.py --phase 1 / 2`` (``{0: 0-50k iters, 1: 50-100k, 2: 100-150k}``), each restoring the
previous stage's ``fcn_iter_50000`` / ``fcn_iter_100000.solverstate`` and stepping 50k iterations; the
rates are solver0's commented ``base_lr`` lines. One continuous schedule here:

===================  ======================================  ==================================================
value                ours (released)                         source (file: field)
===================  ======================================  ==================================================
updates              150,000 (lr x0.1 at 50k and 100k)       solver0: ``max_iter: 150000``; solve.py ``--phase``
lr                   1e-4 -> 1e-5 -> 1e-6                    solver0: ``base_lr: 1e-4 # first used this for 50k
                                                             iterations``, ``# base_lr: 1e-5``, ``# base_lr:
                                                             1e-6``; ``lr_policy: "fixed"`` within a stage
batch                1 image, 20 accumulated per update      train_val: data ``batch_size: 1``; solver0:
                                                             ``iter_size: 20`` (gradient = mean of the 20)
momentum             0.9                                     solver0: ``momentum``
weight decay         5e-4 on weights, 0 on biases            solver0: ``weight_decay: 0.0005``; every layer's
                                                             ``param {lr_mult: 1 decay_mult: 1}``
bias lr              x2                                      every layer's ``param {lr_mult: 2 decay_mult: 0}``
loss                 softmax cross-entropy, mean over the    train_val: ``SoftmaxWithLoss``, ``loss_param
                     non-ignored pixels, 255 ignored         {ignore_label: 255 normalize: true}`` (FCN's own
                                                             nets: ``normalize: false``, a sum)
input                whole images, no crop, no mirroring,    train_val: ``Data`` layers (LMDB) without
                     L - 50 (Lab conversion in the net)      ``transform_param``; ``ColorConv``, ``data_l``
padding              100                                     train_val: conv1 ``pad: 100``
dropout              0.5 after fc6 and fc7                   train_val: ``drop6``, ``drop7``
score init           zero                                    train_val: ``score-fr`` without filler (Caffe's
                                                             default constant 0)
upsampling           fixed bilinear x32 + crop               train_val: ``upsample`` (Deconvolution 63 / 32,
                                                             ``lr_mult: 0``); solve.py: ``surgery.interp``
gradient clipping    none                                    solver0: no ``clip_gradients``
training data        VOC2011 seg train + SBD train and val,  train_val: ``datum_voc2011bh_segtrain`` (VOC2011 +
                     minus every evaluation id               Hariharan et al.'s SBD); FCN ``voc_layers.py``
                                                             ``SBDDSegDataLayer`` (dataset/cls/*.mat, train.txt)
evaluation           seg11valid, 736 images (shipped)        solver0: ``test_iter: 736``; solve.py: the ids of
                                                             ``segvalid11.txt``; FCN ``data/pascal/seg11valid.txt``
start weights        BatchNorm absorbed, Krahenbuhl et al.'s solve.py: ``--caffemodel`` default
                     rescaling (``--rescale``)               ``alexnet_release_450000_nobn_rs.caffemodel``
===================  ======================================  ==================================================

Not reproduced: the released LMDB's fixed image order (ours: a seeded shuffle per epoch, as FCN's
``SBDDSegDataLayer`` with ``randomize``); the rescaling's data (released: one batch of 80 ImageNet
crops; ours: 80 random crops of the segmentation training images, ``--rescale-batches``); without
``--rescale`` (default for ``random``) BatchNorm stays as frozen statistics rather than absorbed (the
same map); the colour-input variant's one-channel ``data_ab`` (see heads.segmentation).

``--recipe quick`` (the default on the built-in data; ours, for CPUs): random 320 crops (padded with
the mean colour and label 255) with mirroring, batch 8, lr 1e-3 (x0.1 after 20k), 30k iterations (1000
on the built-in data), biases as weights, the gradient norm clipped at 10, VOC2012 ``val`` for
evaluation. Any option given (``--lr``, ``--iters``, ``--batch-size``, ``--accumulate``, ``--crop``,
``--clip-grad``, ``--bias-rule``, ``--year``, ``--eval-ids``) overrides the recipe's value; ``--iters``
scales the lr steps with it. Every layer is fine-tuned; BatchNorm frozen unless ``--bn train``.

Data: VOC<year> ``ImageSets/Segmentation/train`` and, with ``--sbd PATH``, SBD's train + val images,
minus every id of the evaluation set (where an id has both, the VOC mask with its 255 borders wins).
Evaluation on the ids of ``--eval-ids FILE`` (default: the shipped seg11valid list for the released
recipe, VOC<year> ``val`` for quick), whole images at one scale; every id of the list must have its
image and mask (one error line naming the list and the first missing id otherwise). Metric: mean IoU
over the 21 classes (background included), label 255 ignored, from one confusion matrix over all
pixels of the evaluation set (ssl_colorize.voc_metrics.ConfusionMatrix).

Rows: benchmark ``voc_segmentation``, tap ``all``, dataset ``voc<year>``, split ``seg11valid`` (or the id
file's name, or ``val``), protocol ``fcn32s`` / ``fcn32s_colour_input``, hparams with ``recipe``;
metrics ``mIoU``, ``IoU_<class>``, ``pixel_accuracy`` (percent). As published (AlexNet, mIoU):
colorization 35.0 (colour input 35.6), ImageNet labels 48.0, random 19.8, k-means 32.6.

Run folder (``--out``, default ``runs/voc_segmentation/<run id>``): config.json, log.jsonl, a rolling
checkpoint every ``--ckpt-every`` updates, ``--resume`` continues exactly where a killed run stopped.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from ssl_colorize.data.voc import IGNORE_LABEL, SEG_CLASSES, ListBatch, StackBatch
from ssl_colorize.data.voc_segmentation import (
    PairedCropFlip, VOCSegmentation, check_eval_ids, check_sbd, load_segmentation_split, seg11valid_file,
    segmentation_training_records,
)
from ssl_colorize.engine.cli import (
    ArgumentParser, UsageError, check_input_dir, check_input_file, check_non_negative, check_number, check_positive,
    fail, run_cli,
)
from ssl_colorize.engine.finetune import (
    BN_MODES, add_training_args, batch_stream, caffe_param_groups, finetune, multistep_lr, schedule_length,
    set_train_mode,
)
from ssl_colorize.engine.transfer_run import (
    PAD_RGB, TransferRun, add_common_args, add_rescale_args, apply_rescale, checkpoint_ref, dataset_name,
    default_crop, load_transfer_encoder, pad_value, resolve_data, resolve_device, resolve_input, resolve_rescale,
    seed_everything, to_model_input, validate_common, validate_rescale, validate_training,
)
from ssl_colorize.heads.segmentation import FCN32s, default_pad, model_inputs, seg_tap
from ssl_colorize.voc_metrics import ConfusionMatrix, mean_ap

LOG = logging.getLogger("ssl_colorize.voc.segmentation")
BENCHMARK = "voc_segmentation"
BIAS_RULES = ("caffe", "same")
# The rescaling's data: 5 x 16 random crops at the card's side (227 for AlexNets) of the training images,
# the 80 images of the released single batch (train_val_nobn_rs.prototxt; ssl_colorize.engine.rescale).
RESCALE_BATCHES, RESCALE_BATCH_SIZE = 5, 16


@dataclass(frozen=True)
class SegmentationRecipe:
    """One training and evaluation recipe; every field is the default of the option of the same name."""

    name: str
    iters: int  # updates
    builtin_iters: int  # updates on the built-in data
    milestones: tuple[int, ...]  # lr x gamma at each (of ``iters``; scaled with --iters)
    gamma: float
    lr: float
    batch_size: int
    accumulate: int  # batches per update (Caffe's iter_size)
    crop: int | None  # None: whole images, no mirroring
    clip_grad: float
    bias_rule: str  # "caffe": biases lr x2, no weight decay; "same": as the weights
    year: int
    eval_list: str  # "seg11valid" (the shipped list) or "val" (VOC<year> val)


# The table of the module docstring, value by value.
RELEASED = SegmentationRecipe("released", iters=150_000, builtin_iters=50, milestones=(50_000, 100_000), gamma=0.1,
                              lr=1e-4, batch_size=1, accumulate=20, crop=None, clip_grad=0.0, bias_rule="caffe",
                              year=2011, eval_list="seg11valid")
QUICK = SegmentationRecipe("quick", iters=30_000, builtin_iters=1000, milestones=(20_000,), gamma=0.1, lr=1e-3,
                           batch_size=8, accumulate=1, crop=320, clip_grad=10.0, bias_rule="same", year=2012,
                           eval_list="val")
RECIPES = {r.name: r for r in (RELEASED, QUICK)}


def get_args_parser(add_help: bool = True) -> ArgumentParser:
    p = ArgumentParser(BENCHMARK, add_help=add_help,
                       description="VOC semantic segmentation with an FCN-32s head (docs/protocols.md section 5)")
    p.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                   help="released: the released FCN recipe (default with --data); quick: short crops recipe "
                        "(default on the built-in data); the options below override its values")
    p.add_argument("--year", type=int, default=None, choices=(2011, 2012),
                   help="VOC devkit year of the segmentation data (released: 2011, quick: 2012)")
    p.add_argument("--sbd", default=None, help="SBD folder (benchmark_RELEASE, or the folder holding it): add its images")
    p.add_argument("--eval-ids", default=None,
                   help="evaluate on the ids of this file (released: the shipped seg11valid list; quick: VOC val)")
    p.add_argument("--colour-input", action="store_true", help="add a conv1 branch on ab (L encoders only)")
    p.add_argument("--pad", type=int, default=None, help="input padding in pixels (default 100 when the tap is fc7, else 0)")
    p.add_argument("--dropout", type=float, default=0.5, help="dropout after fc6 / fc7 (the card's) and before the score")
    p.add_argument("--crop", type=int, default=None, help="random training crops with mirroring (released: whole images; "
                                                          "quick: 320)")
    p.add_argument("--batch-size", type=int, default=None, help="images per batch (released: 1; quick: 8)")
    p.add_argument("--accumulate", type=int, default=None,
                   help="batches per update, gradients averaged (Caffe's iter_size; released: 20; quick: 1)")
    p.add_argument("--lr", type=float, default=None, help="base learning rate (released: 1e-4; quick: 1e-3)")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--bias-rule", choices=BIAS_RULES, default=None,
                   help="caffe: biases at lr x2 without weight decay (released); same: as the weights (quick)")
    p.add_argument("--clip-grad", type=float, default=None,
                   help="clip the gradients' global L2 norm, 0: off (released: 0; quick: 10)")
    p.add_argument("--bn", choices=BN_MODES, default="frozen",
                   help="BatchNorm: frozen statistics (folded) or batch statistics")
    add_common_args(p, iters_help="updates (released: 150000, lr x0.1 at 50k and 100k; quick: 30000, x0.1 after 20k, "
                                  "1000 on the built-in data); the lr steps scale with it", job=BENCHMARK)
    add_training_args(p)
    add_rescale_args(p, RESCALE_BATCHES)
    return p


def apply_recipe(args: argparse.Namespace, builtin: bool) -> SegmentationRecipe:
    """Fill every option left unset from the recipe (``--recipe``, else released on --data, quick on the
    built-in data); options given keep their values. In place and idempotent; returns the recipe."""
    args.recipe = args.recipe or ("quick" if builtin else "released")
    recipe = RECIPES[args.recipe]
    for name in ("year", "lr", "batch_size", "accumulate", "crop", "clip_grad", "bias_rule"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(recipe, name))
    if args.eval_ids is None and recipe.eval_list == "seg11valid":
        args.eval_ids = str(seg11valid_file())
    return recipe


def eval_list_label(eval_ids: str) -> str:
    """How errors name the evaluation list: the shipped one by name, a user's file by path."""
    if Path(eval_ids).resolve() == seg11valid_file().resolve():
        return f"the shipped seg11valid list ({seg11valid_file()})"
    return f"--eval-ids {eval_ids}"


def validate(args) -> None:
    apply_recipe(args, builtin=args.data is None)
    validate_training(args)
    validate_rescale(args)
    check_positive("--accumulate", args.accumulate)
    check_positive("--crop", args.crop)
    if args.crop is None and args.batch_size > 1:
        raise fail("--batch-size", args.batch_size, f"the {args.recipe} recipe trains on whole images (of different "
                   "sizes), one per batch: use --accumulate N for more images per update, or --crop N")
    check_non_negative("--pad", args.pad)
    check_number("--dropout", args.dropout, minimum=0, maximum=1)
    check_input_file("--eval-ids", args.eval_ids)
    check_input_dir("--sbd", args.sbd)
    splits = [(args.year, "Segmentation", "train")] + [(args.year, "Segmentation", "val")] * (args.eval_ids is None)
    try:
        validate_common(args, splits)
    except UsageError as exc:
        if args.year == 2011 and "VOC2011: missing" in str(exc):  # the released recipe's year on a VOC2012-only disk
            raise UsageError(f"{exc}; the released recipe trains on VOC2011: --year 2012 uses VOC2012") from None
        raise
    try:
        if args.sbd:
            check_sbd(args.sbd)
        if args.data is not None and args.eval_ids:
            check_eval_ids(args.data, args.year, args.eval_ids, eval_list_label(args.eval_ids))
    except ValueError as exc:
        raise UsageError(str(exc)) from None


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
    recipe = apply_recipe(args, builtin)
    try:  # the user's files, read before anything is created: a problem is one line naming the file
        if args.eval_ids:
            check_eval_ids(data_root, args.year, args.eval_ids, eval_list_label(args.eval_ids))
        eval_records, eval_report = load_segmentation_split(data_root, args.year, "val", ids_file=args.eval_ids)
        eval_ids = {r.image_id for r in eval_records}
        train_records, train_reports = segmentation_training_records(data_root, args.year, args.sbd, eval_ids)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    encoder, encoder_name = load_transfer_encoder(args.checkpoint, args.encoder, args.seed)
    try:
        mode = resolve_input(encoder, args.input)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.colour_input and mode != "L":
        raise UsageError(f"--colour-input needs an L encoder; {encoder_name} takes {encoder.input_space}")
    iters = schedule_length(args.iters, recipe.iters, builtin, recipe.builtin_iters)
    tap = seg_tap(encoder)
    pad = args.pad if args.pad is not None else default_pad(tap)
    rescale = resolve_rescale(args, encoder, tap)  # before the run folder: a refusal creates nothing

    run = TransferRun(BENCHMARK, args, encoder_name, checkpoint_ref(args).label)
    run.folder.write_config({**vars(args), "iters": iters, "tap": tap, "pad": pad, "input_mode": mode,
                             "encoder": encoder_name, "rescale": rescale})
    for report in train_reports + [eval_report]:
        run.add_report(report)
    if recipe is RELEASED and not args.sbd:
        LOG.warning("--recipe released trains on VOC train + SBD: without --sbd, on VOC%d train alone", args.year)
    if rescale:  # the released segmentation starts from the rescaled model (solve.py: ..._nobn_rs.caffemodel)
        side = default_crop(encoder)
        crops = VOCSegmentation(train_records, PairedCropFlip(side, PAD_RGB))
        stream = batch_stream(crops, RESCALE_BATCH_SIZE, seed=args.seed, start=0, workers=0, collate=StackBatch(3))
        images = [next(stream)[0] for _ in range(args.rescale_batches)]
        del stream
        apply_rescale(run, encoder.to(device), tap, [to_model_input(x.to(device), mode) for x in images
                                                      if x is not None], seed=args.seed)
    else:
        run.extra["rescale"] = None
        LOG.info("rescale: off")
    model = FCN32s(encoder, tap, pad, pad_value(mode), dropout=args.dropout, colour_input=args.colour_input).to(device)
    encoder.requires_grad_(True)
    if args.bias_rule == "caffe":
        groups = caffe_param_groups(model.named_parameters(), args.lr, args.weight_decay)
    else:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    scheduler = multistep_lr(optimizer, iters, recipe.iters, recipe.milestones, recipe.gamma)
    LOG.info("%s: FCN-32s on %s (stride %d, offset %.1f, pad %d), input %s%s; recipe %s: %d updates of %d x %d %s "
             "on %d images; %s", encoder_name, tap, model.stride, model.offset_x, pad, mode,
             " + ab branch" if args.colour_input else "", args.recipe, iters, args.accumulate, args.batch_size,
             f"{args.crop} crops" if args.crop else "whole images", len(train_records), device)

    train_set = VOCSegmentation(train_records, PairedCropFlip(args.crop, PAD_RGB) if args.crop else None)

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
        # the mean over the non-ignored pixels: SoftmaxWithLoss with normalize: true (train_val.prototxt)
        loss = F.cross_entropy(model(x, ab), masks.to(device).long(), ignore_index=IGNORE_LABEL)
        return loss if torch.isfinite(loss) else None  # an image / crops holding only ignored pixels

    losses = finetune(run, model, optimizer, scheduler, iters=iters, batches=batches, step=step, args=args,
                      desc=BENCHMARK, accumulate=args.accumulate)

    eval_loader = DataLoader(VOCSegmentation(eval_records), batch_size=1, shuffle=False,
                             num_workers=args.workers, collate_fn=ListBatch(3))
    confusion, n_eval = evaluate(model, eval_loader, mode, args.colour_input, device, run)
    ious = confusion.iou() * 100
    miou = mean_ap(ious)
    eval_name = Path(args.eval_ids).stem if args.eval_ids else "val"
    hparams = {
        "recipe": args.recipe, "iters": iters, "lr": args.lr, "lr_milestones": list(recipe.milestones),
        "momentum": args.momentum, "weight_decay": args.weight_decay, "bias_rule": args.bias_rule,
        "batch_size": args.batch_size, "accumulate": args.accumulate, "crop": args.crop or "whole",
        "clip_grad": args.clip_grad, "rescale": rescale, "pad": pad, "tap": tap, "dropout": args.dropout, "bn": args.bn, "input": mode,
        "colour_input": args.colour_input, "year": args.year, "sbd": bool(args.sbd), "data": str(data_root),
        "train_images": len(train_records), "eval_images": n_eval, "classes_present": int(np.isfinite(ious).sum()),
    }
    row = dict(tap="all", dataset=dataset_name(builtin, f"voc{args.year}"), split=eval_name,
               protocol="fcn32s_colour_input" if args.colour_input else "fcn32s", hparams=hparams)
    run.row(metric="mIoU", value=miou, **row)
    run.row(metric="pixel_accuracy", value=confusion.pixel_accuracy() * 100, **row)
    for name, iou in zip(SEG_CLASSES, ious):
        run.row(metric=f"IoU_{name}", value=float(iou), **row)
    LOG.info("segmentation mIoU %.2f over %d images (%s; recipe %s)", miou, n_eval, eval_name, args.recipe)
    run.extra["final_loss"] = float(np.mean(losses[-10:])) if losses else float("nan")
    return run.finish({"mIoU": miou, "pixel_accuracy": confusion.pixel_accuracy() * 100,
                       **{f"IoU_{c}": float(v) for c, v in zip(SEG_CLASSES, ious)}})


def cli(argv=None):
    return run_cli(get_args_parser(), main, argv, validate=validate)


if __name__ == "__main__":
    cli()
