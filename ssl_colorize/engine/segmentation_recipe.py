"""The FCN-32s segmentation recipes (ssl_colorize.benchmarks.voc_segmentation): their values, their
resolution against the user's options, the up-front data checks, and the parts of a run that are not
the recipe's story (reading the records, the rescaling's images, the optimizer, the evaluation, the rows).

``released``: the released FCN recipe of the colorization code, richzhang/colorization
``feature_learning_tests/segmentation/`` (``solver0.prototxt``, ``solve.py``, ``train_val.prototxt``),
which follows FCN-AlexNet (shelhamer/fcn.berkeleyvision.org ``voc-fcn-alexnet/solver.prototxt``:
``base_lr: 1e-4 # lr for normalized softmax``, ``iter_size: 20``). Only solver0.prototxt is in the
repository: solver1 / solver2 are its two later lr stages, run by ``solve.py --phase 1 / 2`` (``{0: 0-50k
iters, 1: 50-100k, 2: 100-150k}``), each restoring the previous stage's ``fcn_iter_50000`` /
``fcn_iter_100000.solverstate`` and stepping 50k iterations; the rates are solver0's commented ``base_lr``
lines. One continuous schedule here:

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

``quick`` (ours, for CPUs): random 320 crops (padded with the mean colour and label 255) with
mirroring, batch 8, lr 1e-3 (x0.1 after 20k), 30k iterations (1000 on the built-in data), biases as
weights, the gradient norm clipped at 10, VOC2012 ``val`` for evaluation.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ssl_colorize.data.voc import SEG_CLASSES, DataReport, ListBatch, StackBatch
from ssl_colorize.data.voc_segmentation import (
    PairedCropFlip, SegmentationRecord, VOCSegmentation, check_eval_ids, check_sbd, load_segmentation_split,
    seg11valid_file, segmentation_training_records,
)
from ssl_colorize.engine.cli import UsageError
from ssl_colorize.engine.finetune import batch_stream, caffe_param_groups
from ssl_colorize.engine.transfer_run import PAD_RGB, TransferRun, validate_common
from ssl_colorize.heads.segmentation import FCN32s, model_inputs
from ssl_colorize.voc_metrics import ConfusionMatrix, mean_ap

LOG = logging.getLogger("ssl_colorize.voc.segmentation")
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
#: The options a recipe fills when the user leaves them unset.
RECIPE_OPTIONS = ("year", "lr", "batch_size", "accumulate", "crop", "clip_grad", "bias_rule")


def apply_recipe(args: argparse.Namespace, builtin: bool) -> SegmentationRecipe:
    """Fill every option left unset from the recipe (``--recipe``, else released on --data, quick on the
    built-in data); options given keep their values. In place and idempotent; returns the recipe."""
    args.recipe = args.recipe or ("quick" if builtin else "released")
    recipe = RECIPES[args.recipe]
    for name in RECIPE_OPTIONS:
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


def validate_segmentation_data(args: argparse.Namespace) -> None:
    """The common options and the data's folders, SBD's layout and the evaluation list's ids, before any
    work: a problem is one UsageError line naming the option or file."""
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


@dataclass
class SegmentationData:
    train: list[SegmentationRecord]
    eval: list[SegmentationRecord]
    reports: list[DataReport]  # training reports, then the evaluation set's


def read_segmentation_data(data_root: Path, args: argparse.Namespace) -> SegmentationData:
    """The evaluation records (``--eval-ids``, else VOC<year> val) and the training records (VOC<year>
    train, + SBD with ``--sbd``, minus every evaluation id). Every mask is read here, before anything is
    created: a problem with the user's files is one UsageError line naming the file."""
    try:
        if args.eval_ids:
            check_eval_ids(data_root, args.year, args.eval_ids, eval_list_label(args.eval_ids))
        eval_records, eval_report = load_segmentation_split(data_root, args.year, "val", ids_file=args.eval_ids)
        eval_ids = {r.image_id for r in eval_records}
        train_records, train_reports = segmentation_training_records(data_root, args.year, args.sbd, eval_ids)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return SegmentationData(train_records, eval_records, train_reports + [eval_report])


def rescale_images(records: list[SegmentationRecord], side: int, batches: int, seed: int) -> list[torch.Tensor]:
    """The rescaling's images: ``batches`` batches of RESCALE_BATCH_SIZE random ``side`` crops (mirrored
    at random) of the training images, uint8 RGB, from the run's seeded stream."""
    crops = VOCSegmentation(records, PairedCropFlip(side, PAD_RGB))
    stream = batch_stream(crops, RESCALE_BATCH_SIZE, seed=seed, start=0, workers=0, collate=StackBatch(3))
    images = [next(stream)[0] for _ in range(batches)]
    del stream
    return [x for x in images if x is not None]


def segmentation_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.SGD:
    """SGD over every trainable parameter: biases at lr x2 without weight decay (``--bias-rule caffe``,
    every layer's ``param {lr_mult: 2 decay_mult: 0}``) or as the weights (``same``)."""
    if args.bias_rule == "caffe":
        groups = caffe_param_groups(model.named_parameters(), args.lr, args.weight_decay)
    else:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)


@torch.no_grad()
def evaluate(model: FCN32s, records: list[SegmentationRecord], mode: str, colour: bool, device: torch.device,
             workers: int, run: TransferRun) -> tuple[ConfusionMatrix, int]:
    """One confusion matrix over every pixel of the evaluation images (whole images, one scale, 255
    ignored) and the number of images seen."""
    loader = DataLoader(VOCSegmentation(records), batch_size=1, shuffle=False, num_workers=workers,
                        collate_fn=ListBatch(3))
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


def add_result_rows(run: TransferRun, confusion: ConfusionMatrix, **row) -> dict[str, float]:
    """Rows ``mIoU``, ``pixel_accuracy`` and ``IoU_<class>`` (percent, 21 classes, background included);
    ``row``: tap, dataset, split, protocol, hparams (``classes_present`` added). Returns the metrics."""
    ious = confusion.iou() * 100
    metrics = {"mIoU": mean_ap(ious), "pixel_accuracy": confusion.pixel_accuracy() * 100,
               **{f"IoU_{c}": float(v) for c, v in zip(SEG_CLASSES, ious)}}
    row["hparams"] = {**row["hparams"], "classes_present": int(np.isfinite(ious).sum())}
    for metric, value in metrics.items():
        run.row(metric=metric, value=value, **row)
    return metrics
