"""Per-layer linear SVMs on frozen features, PASCAL VOC2007 (Goyal et al. 2019; docs/protocols.md section 5).

    python -m ssl_colorize.benchmarks.voc_svm --checkpoint runs/pretrain/checkpoint.pth --data /datasets --workers 16
    python -m ssl_colorize.benchmarks.voc_svm          # built-in VOCdevkit, random alexnet_lab

Recipe (Goyal et al.'s benchmark, facebookresearch/fair_self_supervision_benchmark):

* features of every image of VOC2007 trainval and test, for each tap of ``--taps`` (default: the
  encoder's five probe taps), pooled to about 9k dims as the linear probes pool them, L2-normalised
  (:mod:`ssl_colorize.heads.svm_features`); cached in the run folder, one atomic ``.npz`` per split,
  so a rerun with ``--resume`` (or the same ``--feature-cache``) skips the encoder;
* one-vs-rest LinearSVC per class, the cost chosen from ``--costs`` by 3-fold cross-validated AP on
  trainval (``GridSearchCV``), refitted on trainval, scored on test (:mod:`ssl_colorize.heads.svm`);
* metric: AP per class on VOC2007 test (difficult-only labels ignored) and their mean.

Run folder (ssl_colorize.engine.run): ``config.json``, ``log.jsonl`` (one record per finished tap),
``checkpoint.pth`` (the finished taps' per-class results: ``--resume`` continues after the last
one), ``features/``, ``results.csv`` and ``summary.json``.

Rows: benchmark ``voc_svm``, tap = the layer, protocol ``linear_svm_<probe protocol>`` (``goyal`` for ``--pool avg``), metrics ``mAP`` and
``AP_<class>`` (percent). As published: VISSL's re-evaluation of Goyal et al.'s colorization models
reports per-layer VOC07 SVM mAP; there are no numbers for the ECCV 2016 AlexNet itself.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ssl_colorize.data.voc import VOC_CLASSES, classification_targets, load_main_split
from ssl_colorize.engine.cli import ArgumentParser, UsageError, check_number, check_output_dir, check_positive, fail, run_cli
from ssl_colorize.engine.transfer_run import (
    PAD_RGB, add_common_args, checkpoint_ref, dataset_name, resolve_data, resolve_input, validate_common,
)
from ssl_colorize.engine.run import RunFolder, seed_everything
from ssl_colorize.heads.probe_pool import POOL_MODES, protocol_name
from ssl_colorize.heads.svm import DEFAULT_COSTS, DEFAULT_MAX_ITER, POSITIVE_WEIGHT, parse_costs, train_all_classes
from ssl_colorize.heads.svm_features import cache_path, cached_features, checkpoint_identity, extract_features
from ssl_colorize.models import create_model
from ssl_colorize.models.cards import get_card
from ssl_colorize.results import append_rows, make_row
from ssl_colorize.voc_metrics import mean_ap

BENCHMARK = "voc_svm"
SPLITS = ("trainval", "test")


def get_args_parser(add_help: bool = True) -> ArgumentParser:
    p = ArgumentParser("voc_svm", add_help=add_help,
                       description="VOC2007 per-layer linear SVMs on frozen features (Goyal et al.)")
    p.add_argument("--taps", default=None, help="comma-separated taps (default: the encoder's five probe taps)")
    p.add_argument("--pool", choices=POOL_MODES, default="avg", help="pooling to ~9k dims, as the linear probes")
    p.add_argument("--resize", type=int, default=256, help="shorter side before the centre crop")
    p.add_argument("--crop", type=int, default=None, help="centre crop (default: the encoder card's transfer crop)")
    p.add_argument("--costs", default=",".join(f"{c:g}" for c in DEFAULT_COSTS), help="SVM cost grid")
    p.add_argument("--folds", type=int, default=3, help="cross-validation folds for the cost")
    p.add_argument("--fallback-cost", type=float, default=1.0, help="cost for a class with a single positive")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    p.add_argument("--feature-cache", default=None, help="folder for the cached features (default <run folder>/features)")
    add_common_args(p, iters_help=f"LinearSVC's iteration limit (default {DEFAULT_MAX_ITER})", job=BENCHMARK)
    return p


def _settings(args) -> tuple[str, list[str], str, int]:
    """(encoder name, taps, input mode, crop): the checks that need the architecture but no weights."""
    name = checkpoint_ref(args).model_name()
    card = get_card(name)
    with torch.device("meta"):  # the architecture alone: taps and input space, no memory, no weights
        skeleton = create_model(name, **card.transfer.model_kwargs)
    try:
        taps = skeleton.resolve_taps(args.taps.split(",")) if args.taps else list(skeleton.probe_taps)
    except ValueError as exc:
        raise fail("--taps", args.taps, str(exc)) from exc
    try:
        mode = resolve_input(skeleton, args.input)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    return name, taps, mode, args.crop or card.transfer.crop


def validate(args) -> None:
    for option, value in (("--resize", args.resize), ("--crop", args.crop), ("--batch-size", args.batch_size),
                          ("--fallback-cost", args.fallback_cost)):
        check_positive(option, value)
    check_number("--folds", args.folds, minimum=2)
    try:
        parse_costs(args.costs)
    except ValueError as exc:
        raise fail("--costs", args.costs, str(exc)) from exc
    check_output_dir("--feature-cache", args.feature_cache)
    validate_common(args, splits=[(2007, "Main", split) for split in SPLITS])
    _settings(args)


def main(args) -> dict:
    name, taps, mode, crop = _settings(args)
    costs, max_iter = parse_costs(args.costs), args.iters or DEFAULT_MAX_ITER
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    seed_everything(args.seed)
    data_root, builtin = resolve_data(args.data)
    try:  # the splits' files are read before anything is written
        splits = {split: load_main_split(data_root, 2007, split) for split in SPLITS}
    except ValueError as exc:
        raise UsageError(str(exc)) from exc

    ref = checkpoint_ref(args)
    if args.overwrite and args.out is not None and (Path(args.out) / "features").is_dir():
        shutil.rmtree(Path(args.out) / "features")  # --overwrite starts clean, cached features included
    run = RunFolder.open(args.out, job=BENCHMARK, resume=args.resume, overwrite=args.overwrite, run_id=args.run_id)
    config = {"checkpoint": ref.label, "encoder": name, "taps": taps, "pool": args.pool, "resize": args.resize,
              "crop": crop, "input": mode, "costs": costs, "folds": args.folds, "fallback_cost": args.fallback_cost,
              "max_iter": max_iter, "positive_weight": POSITIVE_WEIGHT, "seed": args.seed, "data": str(data_root)}
    _check_same_config(run, config)
    run.write_config(config)
    for _, report in splits.values():
        report.warn()

    encoder = None
    cache_dir = Path(args.feature_cache) if args.feature_cache else run.path / "features"
    identity = checkpoint_identity(None if ref.is_random else str(ref.path), f"{name}:{args.seed}")
    settings = {key: config[key] for key in ("encoder", "crop", "resize", "pool", "input")}
    features, skipped = {}, {}
    for split, (records, _) in splits.items():
        ids = [r.image_id for r in records]

        def extract(records=records, split=split):
            nonlocal encoder
            if encoder is None:  # built only when some split is not cached
                encoder = ref.load(seed=args.seed, **get_card(name).transfer.model_kwargs)
                encoder.requires_grad_(False)
                encoder.to(device).eval()
            return extract_features(encoder, records, taps, mode, crop, args.resize, args.pool, PAD_RGB, device,
                                    args.batch_size, args.workers, desc=f"features {split}")

        path = cache_path(cache_dir, split, identity, taps, settings, ids)
        features[split], reused = cached_features(path, extract, ids)
        skipped.update(features[split]["skipped"])
        print(f"voc_svm: features {split}: {'reused' if reused else 'saved'} {path}", flush=True)

    state = run.load_checkpoint()
    done: dict[str, list[dict]] = dict(state["per_class"]) if state else {}
    targets = {split: classification_targets(records) for split, (records, _) in splits.items()}
    dims = {}
    for step, tap in enumerate(taps, start=1):
        kept = {split: features[split]["kept"] for split in SPLITS}
        x = {split: features[split]["features"][tap][kept[split]] for split in SPLITS}
        dims[tap] = int(x["trainval"].shape[1])
        if tap in done:
            print(f"voc_svm: {tap}: resumed (finished before)", flush=True)
            continue
        t = {split: targets[split][kept[split]] for split in SPLITS}
        done[tap] = train_all_classes(
            x["trainval"], t["trainval"], x["test"], t["test"], costs, args.folds, args.fallback_cost, max_iter,
            args.seed, jobs=args.workers,
            progress=lambda it, total, tap=tap: tqdm(it, total=total, desc=f"svm {tap}", unit="class"))
        aps = [100.0 * r["ap"] for r in done[tap]]
        run.log({"step": step, "tap": tap, "mAP": mean_ap(np.array(aps)), "dims": dims[tap]})
        run.save_checkpoint({"step": step, "per_class": done})

    rows, metrics = [], {}
    data_name = dataset_name(builtin, "voc2007")
    for tap in taps:
        aps = np.array([r["ap"] for r in done[tap]]) * 100
        metrics[tap] = {"mAP": mean_ap(aps), **{f"AP_{n}": float(a) for n, a in zip(VOC_CLASSES, aps)}}
        hparams = {key: config[key] for key in ("costs", "folds", "positive_weight", "max_iter", "pool", "crop",
                                                "resize", "input")}
        hparams.update(dims=dims[tap], data=str(data_root), classes_with_positives=int(np.isfinite(aps).sum()),
                       train_images=int(features["trainval"]["kept"].sum()),
                       test_images=int(features["test"]["kept"].sum()))
        for metric, value in metrics[tap].items():
            if not math.isnan(value):  # a class without positives has no AP: no row rather than a NaN row
                rows.append(make_row(run_id=run.run_id, benchmark=BENCHMARK, checkpoint=ref.label, encoder=name,
                                     tap=tap, dataset=data_name, split="test", protocol=f"linear_svm_{protocol_name(args.pool)}",
                                     metric=metric, value=float(value), seed=args.seed, hparams=hparams))
        print(f"voc_svm: {tap}: mAP {metrics[tap]['mAP']:.2f} ({dims[tap]} dims)", flush=True)
    append_rows(args.out_csv, rows)
    append_rows(run.path / "results.csv", rows)
    summary = {
        "benchmark": BENCHMARK, "run_id": run.run_id, "checkpoint": ref.label, "encoder": name,
        "metrics": metrics, "rows": len(rows), "config": config,
        "data_reports": [report.as_dict() for _, report in splits.values()],
        "skipped_at_runtime": skipped, "feature_cache": str(cache_dir),
        "svm": {tap: dict(zip(VOC_CLASSES, per_class)) for tap, per_class in done.items() if tap in taps},
    }
    (run.path / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(f"voc_svm: {len(rows)} rows -> {args.out_csv}; run folder {run.path}", flush=True)
    return summary


def _check_same_config(run: RunFolder, config: dict) -> None:
    """A resumed run continues the same experiment: refuse one whose settings changed."""
    previous = run.read_config() if run.resume else None
    if previous is None:
        return
    changed = [k for k in config if json.dumps(previous.get(k), default=str) != json.dumps(config[k], default=str)]
    if changed:
        key = changed[0]
        raise UsageError(f"--resume: {run.path} ran with {key} = {previous.get(key)!r}, not {config[key]!r} "
                         f"(use --overwrite to start again with the new settings)")


def cli(argv=None) -> dict:
    return run_cli(get_args_parser(), main, argv, validate=validate)


if __name__ == "__main__":
    cli()
