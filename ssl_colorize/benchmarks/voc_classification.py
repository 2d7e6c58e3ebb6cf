"""PASCAL VOC2007 multi-label classification by fine-tuning (Krähenbühl et al.; docs/protocols.md section 5).

    python -m ssl_colorize.benchmarks.voc_classification --checkpoint runs/pretrain/checkpoint.pth \
        --data /datasets --finetune fc8            # fc8 / fc6-8 / all, the paper's three rows
    python -m ssl_colorize.benchmarks.voc_classification  # built-in VOCdevkit, random alexnet_lab, short run

Recipe (defaults = the released one: philkr/voc-classification ``src/train_cls.py`` run by
richzhang/colorization ``feature_learning_tests/run_classification_test_*.sh`` on the rescaled model):

* data: VOC2007 ``trainval`` -> ``test``; labels from the XML annotations, an image's class is +1 if a
  non-difficult object of it is present, ignored (masked out of the loss and the AP) if only
  difficult ones are, -1 otherwise;
* model: the encoder in its transfer geometry (alexnet_lab: CaffeNet, 227 input) and a new ``fc8``, a
  Linear(20) on the pooled feature tap (fc7 for AlexNet-style encoders; res5 for ResNet-50), weights
  N(0, 0.01) and bias 0.1 (train_cls.py ``--random-from drop7``); ``--dropout`` 0.5 after the stages
  the card names (alexnet_lab: fc6, fc7 = drop6 / drop7, kept by train_cls.py ``--clip drop7``), in
  training only, whatever the scope;
* ``--rescale`` (default on for a pretrained checkpoint with ``--bn frozen``, off for ``random``): the
  released post-processing (``train_alexnet/postprocess_model.sh``): BatchNorm absorbed into the
  convolutions, then Krähenbühl et al.'s gradient-ratio calibration (magic_init ``-cs``), measured on
  ``--rescale-batches`` trainval batches (5 x 16 = the released single batch of 80 images) with the
  training augmentation; ssl_colorize.engine.rescale. Encoders that are not feed-forward chains are
  not rescaled;
* ``--finetune fc8``: only fc8 trains; ``fc6-8``: also the stages the encoder's card names (AlexNet:
  pool5, fc6, fc7 = ``--train-from pool5``; ResNet-50: res5); ``all``: everything. Frozen parts run in
  eval mode and after training every frozen tensor is compared with its value before: any change is
  an error. BatchNorm left in trained parts stays in eval mode (``--bn frozen``) unless ``--bn train``;
* loss: sigmoid cross-entropy summed over the non-ignored labels, divided by the batch size
  (train_cls.py's ``SigmoidCrossEntropyLoss``, src/python_layers.py); SGD momentum 0.9 (src/solver.py),
  lr 1e-3 with biases x2 and weight decay 1e-6 on weights and biases alike (train_cls.py ``setLR(t, 1,
  2)``, ``setDecay(t, 1, 1)``), gradients clipped to L2 norm 10, batch 16, 80k iterations, lr x0.5 every
  10k (``--iters`` scales the steps with the length; the built-in data defaults to 1500 iterations);
* augmentation: the image rescaled by a random factor in [0.5, 2], a random 227 crop (padded with the
  mean colour when the image is smaller), a random mirror;
* test: mAP over the 20 classes on VOC2007 test with 10 random crops per image, drawn as in training
  (their logits averaged, as train_cls.py sums fc8 over the crops), and with the single centre crop
  of the unscaled image (ours).

Rows (results CSV): benchmark ``voc_classification``, tap = the fine-tune setting, protocol ``10crop`` /
``center``, metrics ``mAP`` and ``AP_<class>`` (percent). As published (AlexNet, 10 crops, mAP):
colorization 52.4 / 61.5 / 65.9 for fc8 / fc6-8 / all; ImageNet labels 76.8 / 78.9 / 79.9.

Run folder (``--out``, default ``runs/voc_classification/<run id>``): config.json, log.jsonl, a rolling
checkpoint every ``--ckpt-every`` iterations, ``--resume`` continues exactly where a killed run stopped.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ssl_colorize.data.transforms import ScaleCropFlip, SeededTestCrops
from ssl_colorize.data.voc import (
    VOC_CLASSES, VOCImages, VOCIndexedImages, classification_targets, StackBatch, load_main_split,
)
from ssl_colorize.engine.cli import ArgumentParser, UsageError, check_number, check_positive, fail, run_cli
from ssl_colorize.engine.finetune import (
    BN_MODES, FINETUNE_SETTINGS, UntouchedGuard, add_training_args, batch_stream, bias_lr_groups, feature_tap,
    finetune, finetune_modules, schedule_length, set_requires_grad, set_train_mode, step_lr, trained_tensor_names,
)
from ssl_colorize.engine.transfer_run import (
    PAD_RGB, TransferRun, add_common_args, add_rescale_args, apply_rescale, checkpoint_ref, dataset_name,
    default_crop, load_transfer_encoder, resolve_data, resolve_device, resolve_input, resolve_rescale,
    seed_everything, to_model_input, validate_common, validate_rescale, validate_training,
)
from ssl_colorize.models.cards import card_of
from ssl_colorize.heads.classification import VOCClassifier, masked_bce
from ssl_colorize.voc_metrics import classification_ap, mean_ap

LOG = logging.getLogger("ssl_colorize.voc.classification")
BENCHMARK = "voc_classification"
PROTOCOL_ITERS, PROTOCOL_STEP, PROTOCOL_GAMMA = 80_000, 10_000, 0.5
BUILTIN_ITERS = 1500
#: drop6 / drop7 of the released net (classification_trainval.prototxt, kept by train_cls.py's ``--clip drop7``).
DROPOUT = 0.5
#: The released rescaling saw one batch of 80 images (magic_init's calibrateGradientRatio, NIT=1, on
#: train_val_nobn_rs.prototxt's batch_size 80): 5 batches of the default 16.
RESCALE_BATCHES = 5
SPLITS = ((2007, "Main", "trainval"), (2007, "Main", "test"))


def get_args_parser(add_help: bool = True) -> ArgumentParser:
    p = ArgumentParser(BENCHMARK, add_help=add_help,
                       description="VOC2007 classification by fine-tuning (docs/protocols.md section 5)")
    p.add_argument("--finetune", choices=FINETUNE_SETTINGS, default="all",
                   help="what trains: fc8 (new classifier only), fc6-8, all")
    p.add_argument("--bn", choices=BN_MODES, default="frozen",
                   help="BatchNorm in fine-tuned layers: frozen statistics (folded) or batch statistics")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=1e-6)
    p.add_argument("--clip-grad", type=float, default=10.0, help="clip the gradients' global L2 norm (0: off)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--crop", type=int, default=None, help="crop size (default: the encoder card's, 227 for AlexNets)")
    p.add_argument("--min-scale", type=float, default=0.5)
    p.add_argument("--max-scale", type=float, default=2.0)
    p.add_argument("--test-crops", type=int, default=10, help="random crops per test image")
    p.add_argument("--eval-batch-size", type=int, default=8, help="test images per forward (each with all its crops)")
    p.add_argument("--fc8-std", type=float, default=0.01)
    p.add_argument("--dropout", type=float, default=DROPOUT,
                   help="dropout after the stages the encoder card names (alexnet_lab: fc6, fc7), training only; 0: off")
    add_rescale_args(p, RESCALE_BATCHES)
    add_common_args(p, iters_help=f"training iterations (default {PROTOCOL_ITERS}, {BUILTIN_ITERS} on the built-in "
                                  "data); the lr steps scale with it", job=BENCHMARK)
    add_training_args(p)
    return p


def validate(args) -> None:
    validate_training(args)
    check_positive("--crop", args.crop)
    check_positive("--min-scale", args.min_scale)
    if args.max_scale < args.min_scale:
        raise fail("--max-scale", args.max_scale, f"must be >= --min-scale {args.min_scale}")
    check_positive("--test-crops", args.test_crops)
    check_positive("--eval-batch-size", args.eval_batch_size)
    check_positive("--fc8-std", args.fc8_std)
    check_number("--dropout", args.dropout, minimum=0)
    if args.dropout >= 1:
        raise fail("--dropout", args.dropout, "must be < 1")
    validate_rescale(args)
    validate_common(args, SPLITS)


@torch.no_grad()
def evaluate(model: VOCClassifier, loader: DataLoader, n_crops: int, n_images: int, mode: str,
             device: torch.device, run: TransferRun) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n-crop scores, centre-crop scores, seen mask), scores (N, 20) logits.

    The n crops' logits are averaged: the released evaluation sums fc8's outputs over its crops
    (philkr/voc-classification ``src/train_cls.py``, ``scr[i % N] += r['fc8']``); AP only ranks.
    """
    model.eval()
    multi = np.zeros((n_images, len(VOC_CLASSES)))
    centre = np.zeros((n_images, len(VOC_CLASSES)))
    seen = np.zeros(n_images, dtype=bool)
    for crops, indices, skipped in tqdm(loader, desc="test", unit="batch", mininterval=2):
        run.skipped_at_runtime(skipped)
        if crops is None:
            continue
        b, k = crops.shape[:2]
        x = to_model_input(crops.flatten(0, 1).to(device, non_blocking=True), mode)
        logits = model(x).reshape(b, k, -1).double().cpu().numpy()
        idx = indices.numpy()
        multi[idx] = logits[:, :n_crops].mean(1)
        centre[idx] = logits[:, n_crops]
        seen[idx] = True
    return multi, centre, seen


def main(args) -> dict:
    seed_everything(args.seed)
    device = resolve_device(args.device)
    data_root, builtin = resolve_data(args.data)
    train_records, train_report = load_main_split(data_root, 2007, "trainval")
    test_records, test_report = load_main_split(data_root, 2007, "test")
    encoder, encoder_name = load_transfer_encoder(args.checkpoint, args.encoder, args.seed)
    try:
        mode = resolve_input(encoder, args.input)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    crop = args.crop or default_crop(encoder)
    iters = schedule_length(args.iters, PROTOCOL_ITERS, builtin, BUILTIN_ITERS)
    scales = (args.min_scale, args.max_scale)
    tap = feature_tap(encoder)
    rescale = resolve_rescale(args, encoder, tap)  # before the run folder: a refusal creates nothing

    run = TransferRun(BENCHMARK, args, encoder_name, checkpoint_ref(args).label)
    run.folder.write_config({**vars(args), "iters": iters, "crop": crop, "input_mode": mode, "encoder": encoder_name,
                             "rescale": rescale})
    run.add_report(train_report)
    run.add_report(test_report)
    train_targets = torch.from_numpy(classification_targets(train_records))
    test_targets = classification_targets(test_records)

    train_set = VOCImages(train_records, ScaleCropFlip(crop, scales, PAD_RGB))
    if rescale:  # on the first training batches of the run's stream (trainval, training augmentation)
        stream = batch_stream(train_set, args.batch_size, seed=args.seed, start=0, workers=0, collate=StackBatch(2))
        images = [next(stream)[0] for _ in range(args.rescale_batches)]
        del stream
        apply_rescale(run, encoder.to(device), tap, [to_model_input(x.to(device), mode) for x in images
                                                      if x is not None], seed=args.seed)
    else:
        run.extra["rescale"] = None
        LOG.info("rescale: off")
    dropout_after = card_of(encoder).transfer.dropout_after
    model = VOCClassifier(encoder, tap, std=args.fc8_std, dropout=args.dropout, dropout_after=dropout_after).to(device)
    modules = finetune_modules(encoder, args.finetune)
    encoder_params = set_requires_grad(encoder, modules)
    guard = UntouchedGuard(encoder, allowed=trained_tensor_names(encoder, modules))
    named = {id(p): n for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(
        bias_lr_groups(list(model.fc8.parameters()) + encoder_params, named, args.lr, args.weight_decay),
        lr=args.lr, momentum=args.momentum,
    )
    scheduler = step_lr(optimizer, iters, PROTOCOL_ITERS, PROTOCOL_STEP, PROTOCOL_GAMMA)
    LOG.info("%s: tap %s, finetune %s (%d encoder tensors train), input %s, crop %d, %d iterations, dropout %g "
             "after %s, %s", encoder_name, tap, args.finetune, len(encoder_params), mode, crop, iters, args.dropout,
             list(dropout_after) or "nothing", device)

    def batches(start: int):
        return batch_stream(train_set, args.batch_size, seed=args.seed, start=start, workers=args.workers,
                            collate=StackBatch(2), pin_memory=device.type == "cuda")

    def step(batch):
        images, indices, skipped = batch
        model.train()  # the classifier's own flag turns dropout on; then the encoder's parts as they must be
        set_train_mode(encoder, modules, args.bn)
        run.skipped_at_runtime(skipped)
        if images is None:
            return None
        x = to_model_input(images.to(device, non_blocking=True), mode)
        return masked_bce(model(x), train_targets[indices].to(device))

    losses = finetune(run, model, optimizer, scheduler, iters=iters, batches=batches, step=step, args=args,
                      desc=f"{BENCHMARK} {args.finetune}")
    guard.check(f"--finetune {args.finetune}")  # frozen parts (BN statistics included) did not move
    set_train_mode(encoder, modules, args.bn, training=False)

    test_loader = DataLoader(
        VOCIndexedImages(test_records, SeededTestCrops(crop, scales, args.test_crops, args.seed, PAD_RGB)),
        batch_size=args.eval_batch_size, shuffle=False, num_workers=args.workers, collate_fn=StackBatch(2),
    )
    multi, centre, seen = evaluate(model, test_loader, args.test_crops, len(test_records), mode, device, run)
    results = {}
    hparams = {
        "iters": iters, "lr": args.lr, "momentum": args.momentum, "weight_decay": args.weight_decay,
        "batch_size": args.batch_size, "crop": crop, "scales": list(scales), "bn": args.bn, "input": mode,
        "feature_tap": tap, "test_crops": args.test_crops, "clip_grad": args.clip_grad, "data": str(data_root),
        "train_images": len(train_records), "test_images": int(seen.sum()), "dropout": args.dropout,
        "dropout_after": list(dropout_after), "rescale": rescale,
    }
    for protocol, scores in ((f"{args.test_crops}crop", multi), ("center", centre)):
        aps = classification_ap(scores[seen], test_targets[seen]) * 100
        results[protocol] = {"mAP": mean_ap(aps), **{f"AP_{c}": float(a) for c, a in zip(VOC_CLASSES, aps)}}
        row = dict(tap=args.finetune, dataset=dataset_name(builtin, "voc2007"), split="test", protocol=protocol,
                   hparams={**hparams, "classes_with_positives": int(np.isfinite(aps).sum())})
        run.row(metric="mAP", value=mean_ap(aps), **row)
        for name, ap in zip(VOC_CLASSES, aps):
            run.row(metric=f"AP_{name}", value=float(ap), **row)
        LOG.info("%s %s mAP %.2f", args.finetune, protocol, mean_ap(aps))
    run.extra["final_loss"] = float(np.mean(losses[-20:])) if losses else float("nan")
    return run.finish(results)


def cli(argv=None):
    return run_cli(get_args_parser(), main, argv, validate=validate)


if __name__ == "__main__":
    cli()
