"""Per-layer linear SVMs on frozen features, PASCAL VOC2007 (Goyal et al. 2019; docs/protocols.md section 5).

    python benchmarks/voc_svm.py --checkpoint runs/pretrain/checkpoint.pth --data /datasets --workers 16
    python benchmarks/voc_svm.py                   # built-in VOCdevkit, random alexnet_lab

Recipe (Goyal et al.'s benchmark, facebookresearch/fair_self_supervision_benchmark):

* features: every image of VOC2007 trainval and test, shorter side resized to ``--resize`` (256) and
  centre-cropped to 227 (AlexNet-style encoders) or 224, through the frozen encoder (eval mode, no
  gradients); each tap of ``--taps`` (default: the encoder's five probe taps, conv1..conv5 / res2..res5)
  is pooled to about 9k dims exactly as the linear probes pool it (ssl_colorize.heads.probe: average pooling
  with Goyal et al.'s fixed kernels by default, ``--pool`` to change), flattened and L2-normalised;
* cache: the features of each (checkpoint, tap, split, preprocessing) are written once as
  ``<run folder>/features/<split>_<tap>_<key>.npz`` (``--feature-cache`` to share a folder between
  runs); a re-run with the same folder loads them instead of running the encoder;
* one-vs-rest ``sklearn.svm.LinearSVC`` per class (squared hinge, L2 penalty, dual, tol 1e-4, class
  weight {+1: 2, -1: 1}), trained on trainval without the class's "difficult"-only images; the cost C
  is chosen from ``--costs`` (default 1e-7 ... 100, one per decade) by the mean AP of 3-fold
  cross-validation on trainval (stratified, unshuffled folds, as cross_val_score; the first best in
  the grid wins ties); the SVM is refitted on all of trainval with it and scores the test set;
* metric: AP per class on VOC2007 test (difficult-only labels ignored) and their mean.

A class with fewer positives than folds is cross-validated with as many folds as it has positives;
with a single positive no C can be cross-validated and ``--fallback-cost`` (1.0) is used (recorded in
the summary). ``--iters`` is LinearSVC's iteration limit (default 2000).

Rows: benchmark ``voc_svm``, tap = the layer, protocol ``linear_svm_<pool>``, metrics ``mAP`` and
``AP_<class>`` (percent). As published: VISSL's re-evaluation of Goyal et al.'s colorization models
reports per-layer VOC07 SVM mAP; there are no numbers for the ECCV 2016 AlexNet itself.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ssl_colorize.data.transforms import resize_shorter
from ssl_colorize.data.voc import VOC_CLASSES, VOCImages, classification_targets, load_main_split, split_skipped
from ssl_colorize.heads.probe import POOL_MODES, TapPool, probe_grid, tap_shapes
from ssl_colorize.voc_metrics import average_precision, mean_ap
from ssl_colorize.engine.finetune import (
    PAD_RGB,
    TransferRun,
    add_common_args,
    checkpoint_label,
    dataset_name,
    default_crop,
    load_transfer_encoder,
    resolve_data,
    resolve_device,
    resolve_input,
    seed_everything,
    to_model_input,
)

LOG = logging.getLogger("ssl_colorize.voc.svm")
BENCHMARK = "voc_svm"
DEFAULT_COSTS = "1e-7,1e-6,1e-5,1e-4,1e-3,1e-2,1e-1,1,10,100"
POSITIVE_WEIGHT = 2.0
FEATURE_VERSION = 1


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="VOC2007 per-layer linear SVMs on frozen features (Goyal et al.)",
                                add_help=add_help)
    p.add_argument("--taps", default=None, help="comma-separated taps (default: the encoder's five probe taps)")
    p.add_argument("--pool", choices=POOL_MODES, default="avg",
                   help="pooling to ~9k dims, as the linear probes (default avg)")
    p.add_argument("--resize", type=int, default=256, help="shorter side before the centre crop")
    p.add_argument("--crop", type=int, default=None, help="centre crop (default 227 for AlexNet-style encoders, else 224)")
    p.add_argument("--costs", default=DEFAULT_COSTS, help=f"SVM cost grid (default {DEFAULT_COSTS})")
    p.add_argument("--folds", type=int, default=3, help="cross-validation folds for the cost (default 3)")
    p.add_argument("--fallback-cost", type=float, default=1.0, help="cost for a class with a single positive")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    p.add_argument("--feature-cache", default=None, help="folder for the cached features (default <run folder>/features)")
    add_common_args(p, iters_help="LinearSVC's iteration limit (default 2000)")
    return p


# ----------------------------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------------------------

class ResizeCentreCrop:
    def __init__(self, resize: int, crop: int):
        self.resize, self.crop = resize, crop

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        image = resize_shorter(image, self.resize)
        h, w = image.shape[-2:]
        if min(h, w) < self.crop:
            ph, pw = max(0, self.crop - h), max(0, self.crop - w)
            padded = torch.empty(3, h + ph, w + pw, dtype=image.dtype)
            padded[:] = torch.tensor(PAD_RGB, dtype=image.dtype)[:, None, None]
            padded[:, ph // 2: ph // 2 + h, pw // 2: pw // 2 + w] = image
            image, h, w = padded, h + ph, w + pw
        top, left = (h - self.crop) // 2, (w - self.crop) // 2
        return image[:, top: top + self.crop, left: left + self.crop]


def _collate(items: list):
    good, skipped = split_skipped(items)
    if not good:
        return None, [], skipped
    return torch.stack([g[0] for g in good]), [g[1] for g in good], skipped


def checkpoint_identity(checkpoint: str, encoder: str, seed: int) -> str:
    """What the cached features depend on in the checkpoint: its path, size and mtime (or the seed)."""
    if str(checkpoint) == "random":
        return f"random:{encoder}:{seed}"
    path = Path(checkpoint)
    if path.is_dir():
        path = path / "checkpoint.pth"
    stat = path.stat()
    return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def cache_key(identity: str, tap: str, split: str, settings: dict, ids: list[str]) -> str:
    blob = json.dumps({"checkpoint": identity, "tap": tap, "split": split, "settings": settings,
                       "ids": hashlib.sha1("\n".join(ids).encode()).hexdigest(), "version": FEATURE_VERSION},
                      sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def _save_npz(path: Path, **arrays) -> None:
    """Atomic write: a temporary file in the same folder, then a rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        np.savez(handle, **arrays)
    os.replace(tmp, path)


@torch.no_grad()
def extract_features(encoder, records, taps: list[str], mode: str, crop: int, resize: int, pool: str,
                     device: torch.device, batch_size: int, workers: int, run: TransferRun) -> dict:
    """tap -> (features (N, D) float32 L2-normalised, kept (N,) bool: decoded images)."""
    shapes = tap_shapes(encoder, taps, crop, mode)
    pools = {tap: TapPool(pool, (h, w), probe_grid(c, (h, w))) for tap, (c, h, w) in shapes.items()}
    dims = {tap: shapes[tap][0] * pools[tap].grid[0] * pools[tap].grid[1] for tap in taps}
    features = {tap: np.zeros((len(records), dims[tap]), dtype=np.float32) for tap in taps}
    kept = np.zeros(len(records), dtype=bool)
    loader = DataLoader(VOCImages(records, ResizeCentreCrop(resize, crop)), batch_size=batch_size, shuffle=False,
                        num_workers=workers, collate_fn=_collate)
    encoder.eval()
    for images, indices, skipped in tqdm(loader, desc=f"features {','.join(taps)}", unit="batch", mininterval=2):
        run.skipped_at_runtime(skipped)
        if images is None:
            continue
        maps = encoder.forward_taps(to_model_input(images.to(device, non_blocking=True), mode), taps)
        for tap in taps:
            flat = torch.flatten(pools[tap](maps[tap]), 1)
            flat = flat / flat.norm(dim=1, keepdim=True).clamp(min=1e-12)
            features[tap][indices] = flat.float().cpu().numpy()
        kept[indices] = True
    return {tap: (features[tap], kept) for tap in taps}


def cached_features(args, encoder, encoder_name, records, split, taps, mode, crop, device, run,
                    cache_dir: Path) -> dict:
    """Load each tap's features from the cache, extracting (once, in one pass) those missing."""
    settings = {"crop": crop, "resize": args.resize, "pool": args.pool, "input": mode, "encoder": encoder_name}
    identity = checkpoint_identity(args.checkpoint, encoder_name, args.seed)
    ids = [r.image_id for r in records]
    paths = {tap: cache_dir / f"{split}_{tap}_{cache_key(identity, tap, split, settings, ids)}.npz" for tap in taps}
    out, missing = {}, []
    for tap, path in paths.items():
        if path.is_file():
            with np.load(path) as data:
                out[tap] = (data["features"], data["kept"])
            LOG.info("features %s %s: reused %s", split, tap, path)
        else:
            missing.append(tap)
    if missing:
        cache_dir.mkdir(parents=True, exist_ok=True)
        fresh = extract_features(encoder, records, missing, mode, crop, args.resize, args.pool, device,
                                 args.batch_size, args.workers, run)
        for tap, (feats, kept) in fresh.items():
            _save_npz(paths[tap], features=feats, kept=kept, ids=np.array(ids))
            out[tap] = (feats, kept)
            LOG.info("features %s %s: %s -> %s", split, tap, feats.shape, paths[tap])
    return out


# ----------------------------------------------------------------------------------------------
# SVMs
# ----------------------------------------------------------------------------------------------

def _svm(cost: float, max_iter: int, seed: int):
    from sklearn.svm import LinearSVC

    return LinearSVC(C=cost, class_weight={1: POSITIVE_WEIGHT, -1: 1.0}, loss="squared_hinge", penalty="l2",
                     dual=True, tol=1e-4, max_iter=max_iter, random_state=seed)


def _fit(cost, x, y, max_iter, seed):
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # a cost's fit stopping early is part of the search
        return _svm(cost, max_iter, seed).fit(x, y)


def choose_cost(x: np.ndarray, y: np.ndarray, costs: list[float], folds: int, fallback: float, max_iter: int,
                seed: int) -> tuple[float, dict]:
    """The cost with the best mean cross-validated AP (first best in grid order) and the per-cost APs."""
    from sklearn.model_selection import StratifiedKFold

    n_splits = min(folds, int((y > 0).sum()), int((y < 0).sum()))
    if n_splits < 2:
        return fallback, {"fallback": True}
    splitter = StratifiedKFold(n_splits=n_splits)  # unshuffled, as cross_val_score's default
    scores = {}
    for cost in costs:
        fold_aps = []
        for train, held in splitter.split(x, y):
            model = _fit(cost, x[train], y[train], max_iter, seed)
            fold_aps.append(average_precision(model.decision_function(x[held]), y[held] > 0))
        scores[cost] = float(np.nanmean(fold_aps))
    best = max(costs, key=lambda c: (scores[c], -costs.index(c)))
    return best, {"cv_ap": scores, "folds": n_splits}


def train_class(c: int, x_train, t_train, x_test, t_test, costs, folds, fallback, max_iter, seed) -> dict:
    """One class: cost by cross-validation on trainval (difficult-only excluded), refit, test AP."""
    keep = t_train[:, c] != 0
    y = t_train[keep, c].astype(np.int64)
    if (y > 0).sum() == 0 or (y < 0).sum() == 0:
        return {"ap": float("nan"), "cost": None, "reason": "no positive (or no negative) in trainval"}
    cost, info = choose_cost(x_train[keep], y, costs, folds, fallback, max_iter, seed)
    model = _fit(cost, x_train[keep], y, max_iter, seed)
    test_keep = t_test[:, c] != 0
    ap = average_precision(model.decision_function(x_test[test_keep]), t_test[test_keep, c] > 0)
    return {"ap": ap, "cost": cost, **info}


def main(args: argparse.Namespace) -> dict:
    from joblib import Parallel, delayed

    seed_everything(args.seed)
    device = resolve_device(args.device)
    data_root, builtin = resolve_data(args.data)
    try:
        costs = [float(c) for c in args.costs.split(",") if c.strip()]
    except ValueError as exc:
        raise ValueError(f"--costs must be comma-separated numbers: {exc}") from exc
    if not costs or min(costs) <= 0:
        raise ValueError(f"--costs needs positive values, got {args.costs!r}")
    if args.folds < 2:
        raise ValueError(f"--folds must be at least 2, got {args.folds}")
    train_records, train_report = load_main_split(data_root, 2007, "trainval")
    test_records, test_report = load_main_split(data_root, 2007, "test")
    encoder, encoder_name = load_transfer_encoder(args.checkpoint, args.encoder, args.seed)
    encoder.requires_grad_(False)
    encoder.to(device).eval()
    mode = resolve_input(encoder, args.input)
    taps = encoder.resolve_taps(args.taps.split(",")) if args.taps else list(encoder.probe_taps)
    crop = args.crop or default_crop(encoder)
    max_iter = args.iters or 2000

    run = TransferRun(BENCHMARK, args, encoder_name, checkpoint_label(args.checkpoint))
    run.add_report(train_report)
    run.add_report(test_report)
    cache_dir = Path(args.feature_cache) if args.feature_cache else run.out / "features"
    train_feats = cached_features(args, encoder, encoder_name, train_records, "trainval", taps, mode, crop, device,
                                  run, cache_dir)
    test_feats = cached_features(args, encoder, encoder_name, test_records, "test", taps, mode, crop, device,
                                 run, cache_dir)
    t_train_all = classification_targets(train_records)
    t_test_all = classification_targets(test_records)

    results, chosen = {}, {}
    for tap in taps:
        x_train, kept_train = train_feats[tap]
        x_test, kept_test = test_feats[tap]
        x_train, t_train = x_train[kept_train], t_train_all[kept_train]
        x_test, t_test = x_test[kept_test], t_test_all[kept_test]
        per_class = Parallel(n_jobs=max(1, args.workers))(
            delayed(train_class)(c, x_train, t_train, x_test, t_test, costs, args.folds, args.fallback_cost,
                                 max_iter, args.seed)
            for c in tqdm(range(len(VOC_CLASSES)), desc=f"svm {tap}", unit="class", mininterval=2)
        )
        aps = np.array([r["ap"] for r in per_class]) * 100
        chosen[tap] = {name: r for name, r in zip(VOC_CLASSES, per_class)}
        results[tap] = {"mAP": mean_ap(aps), **{f"AP_{n}": float(a) for n, a in zip(VOC_CLASSES, aps)}}
        hparams = {
            "costs": costs, "folds": args.folds, "positive_weight": POSITIVE_WEIGHT, "max_iter": max_iter,
            "pool": args.pool, "crop": crop, "resize": args.resize, "input": mode, "dims": int(x_train.shape[1]),
            "train_images": int(len(x_train)), "test_images": int(len(x_test)), "data": str(data_root),
            "classes_with_positives": int(np.isfinite(aps).sum()),
        }
        row = dict(tap=tap, dataset=dataset_name(builtin, "voc2007"), split="test",
                   protocol=f"linear_svm_{args.pool}", hparams=hparams)
        run.row(metric="mAP", value=mean_ap(aps), **row)
        for name, ap in zip(VOC_CLASSES, aps):
            run.row(metric=f"AP_{name}", value=float(ap), **row)
        LOG.info("svm %s: mAP %.2f (%d dims)", tap, mean_ap(aps), x_train.shape[1])
    run.extra["svm"] = chosen
    run.extra["feature_cache"] = str(cache_dir)
    return run.finish(results)


def cli(argv=None) -> dict:
    return main(get_args_parser().parse_args(argv))


if __name__ == "__main__":
    cli()
