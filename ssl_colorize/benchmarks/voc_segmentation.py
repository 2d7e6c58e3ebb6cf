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

``--recipe released`` (the default on ``--data``): the released FCN recipe (richzhang/colorization
``feature_learning_tests/segmentation/``): 150k updates of 20 accumulated whole images, lr 1e-4 ->
1e-5 -> 1e-6 at 50k and 100k, biases at lr x2 without weight decay, no gradient clipping, VOC2011 train
+ SBD, evaluated on seg11valid, from the rescaled model (``--rescale``). Each value and the released
file + field it comes from: ssl_colorize.engine.segmentation_recipe. ``--recipe quick`` (the default on
the built-in data; ours, for CPUs): random 320 crops with mirroring, batch 8, lr 1e-3 (x0.1 after 20k),
30k iterations (1000 on the built-in data), the gradient norm clipped at 10, VOC2012 ``val``. Any
option given (``--lr``, ``--iters``, ``--batch-size``, ``--accumulate``, ``--crop``, ``--clip-grad``,
``--bias-rule``, ``--year``, ``--eval-ids``) overrides the recipe's value; ``--iters`` scales the lr
steps with it. Every layer is fine-tuned; BatchNorm frozen unless ``--bn train``.

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

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ssl_colorize.data.voc import IGNORE_LABEL, StackBatch
from ssl_colorize.data.voc_segmentation import PairedCropFlip, VOCSegmentation
from ssl_colorize.engine.cli import (
    ArgumentParser, UsageError, check_input_dir, check_input_file, check_non_negative, check_number, check_positive,
    fail, run_cli,
)
from ssl_colorize.engine.finetune import (
    BN_MODES, add_training_args, batch_stream, finetune, multistep_lr, schedule_length, set_train_mode,
)
from ssl_colorize.engine.segmentation_recipe import (
    BIAS_RULES, RECIPES, RELEASED, RESCALE_BATCHES, add_result_rows, apply_recipe, evaluate, read_segmentation_data,
    rescale_images, segmentation_optimizer, validate_segmentation_data,
)
from ssl_colorize.engine.transfer_run import (
    PAD_RGB, TransferRun, add_common_args, add_rescale_args, apply_rescale, checkpoint_ref, dataset_name,
    default_crop, load_transfer_encoder, pad_value, resolve_data, resolve_device, resolve_input, resolve_rescale,
    seed_everything, to_model_input, validate_rescale, validate_training,
)
from ssl_colorize.heads.segmentation import FCN32s, default_pad, model_inputs, seg_tap

LOG = logging.getLogger("ssl_colorize.voc.segmentation")
BENCHMARK = "voc_segmentation"


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
    validate_segmentation_data(args)  # the common options, the VOC folders, SBD's layout, the evaluation ids


def main(args) -> dict:
    seed_everything(args.seed)
    device = resolve_device(args.device)
    data_root, builtin = resolve_data(args.data)
    recipe = apply_recipe(args, builtin)
    data = read_segmentation_data(data_root, args)  # the user's files, read before anything is created
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
    for report in data.reports:
        run.add_report(report)
    if recipe is RELEASED and not args.sbd:
        LOG.warning("--recipe released trains on VOC train + SBD: without --sbd, on VOC%d train alone", args.year)
    if rescale:  # the released segmentation starts from the rescaled model (solve.py: ..._nobn_rs.caffemodel)
        images = rescale_images(data.train, default_crop(encoder), args.rescale_batches, args.seed)
        apply_rescale(run, encoder.to(device), tap, [to_model_input(x.to(device), mode) for x in images],
                      seed=args.seed)
    else:
        run.extra["rescale"] = None
        LOG.info("rescale: off")
    model = FCN32s(encoder, tap, pad, pad_value(mode), dropout=args.dropout, colour_input=args.colour_input).to(device)
    encoder.requires_grad_(True)
    optimizer = segmentation_optimizer(model, args)
    scheduler = multistep_lr(optimizer, iters, recipe.iters, recipe.milestones, recipe.gamma)
    LOG.info("%s: FCN-32s on %s (stride %d, offset %.1f, pad %d), input %s%s; recipe %s: %d updates of %d x %d %s "
             "on %d images; %s", encoder_name, tap, model.stride, model.offset_x, pad, mode,
             " + ab branch" if args.colour_input else "", args.recipe, iters, args.accumulate, args.batch_size,
             f"{args.crop} crops" if args.crop else "whole images", len(data.train), device)

    train_set = VOCSegmentation(data.train, PairedCropFlip(args.crop, PAD_RGB) if args.crop else None)

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

    confusion, n_eval = evaluate(model, data.eval, mode, args.colour_input, device, args.workers, run)
    eval_name = Path(args.eval_ids).stem if args.eval_ids else "val"
    hparams = {
        "recipe": args.recipe, "iters": iters, "lr": args.lr, "lr_milestones": list(recipe.milestones),
        "momentum": args.momentum, "weight_decay": args.weight_decay, "bias_rule": args.bias_rule,
        "batch_size": args.batch_size, "accumulate": args.accumulate, "crop": args.crop or "whole",
        "clip_grad": args.clip_grad, "rescale": rescale, "pad": pad, "tap": tap, "dropout": args.dropout,
        "bn": args.bn, "input": mode, "colour_input": args.colour_input, "year": args.year, "sbd": bool(args.sbd),
        "data": str(data_root), "train_images": len(data.train), "eval_images": n_eval,
    }
    metrics = add_result_rows(run, confusion, tap="all", dataset=dataset_name(builtin, f"voc{args.year}"),
                              split=eval_name, protocol="fcn32s_colour_input" if args.colour_input else "fcn32s",
                              hparams=hparams)
    LOG.info("segmentation mIoU %.2f over %d images (%s; recipe %s)", metrics["mIoU"], n_eval, eval_name, args.recipe)
    run.extra["final_loss"] = float(np.mean(losses[-10:])) if losses else float("nan")
    return run.finish(metrics)


def cli(argv=None):
    return run_cli(get_args_parser(), main, argv, validate=validate)


if __name__ == "__main__":
    cli()
