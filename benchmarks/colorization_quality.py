"""Colorization quality, the paper's Table 1 (docs/protocols.md section 6): AuC, rebalanced AuC, colourfulness,
semantic interpretability, and the annealing-temperature sweep.

    python benchmarks/colorization_quality.py --checkpoint runs/pretrain-alexnet_lab-builtin
    python benchmarks/colorization_quality.py --checkpoint A.pth B.pth --data /imagenet/val --limit 10000 \
        --classifier vgg16 --classifier-weights vgg16-397923af.pth

Recipe, for every image of ``--data`` (default: the built-in photographs) in a seeded random order:
resize the shorter side to ``--size``, centre-crop ``--crop``, convert to Lab; the checkpoints predict
ab from L (``ssl_colorize.inference``: logits on the loss grid -> annealed mean at ``--temperature`` ->
bilinear upsampling -> the image's own L). Every method is scored on the same pixels:

- ``ground_truth``: the image's own ab (100 / 100 by definition; its colourfulness and classifier
  top-1 are the references);
- ``grey``: ab = 0 everywhere (the L channel alone);
- ``random_colours``: the paper's "random colors" baseline, the full ab map of *another* image of the
  evaluation set put on this image's L. The donor is the image processed just before it in the seeded
  random order (the first image takes the last one), i.e. a random cyclic derangement: every image
  gets exactly one donor, never itself, and every image is a donor once;
- each checkpoint (or ``random:ENCODER``, a seeded random init, as a floor).

Metrics (``ssl_colorize.metrics``): raw AuC (share of pixels within an ab distance t of the truth,
t = 0..150, integrated, in percent), class-rebalanced AuC (each pixel weighted by 1 / ImageNet prior of
its ground-truth bin), Hasler-Suesstrunk colourfulness of the recolorized RGB (mean over images), and
with ``--classifier-weights`` the top-1 of an ImageNet classifier on the recolorized images. Pixels of
all images are pooled into one accuracy curve (a streaming histogram, so memory does not grow with the
number of images).

Classifier protocol (the ``protocol`` column of its rows says which ran):

- ``classifier_top1_imagenet_labels``: the data is an ImageFolder whose class folders are ImageNet
  synset ids (n01440764, ...); labels are their indices in ``--class-index`` (a file of synset ids in
  the classifier's output order), or, without it, the folders' sorted order when there are exactly as
  many folders as classifier outputs (the standard 1000-class ImageNet order is the sorted synsets);
- ``classifier_top1_agreement_with_original``: otherwise, the share of images whose top-1 class on the
  recolorized image equals the top-1 on the original colour image (ground truth scores 100).

Without ``--classifier-weights`` the classifier rows are skipped with a message: no weights are ever
downloaded.

Bad input: unreadable files are skipped and counted; images whose shorter side is below ``--size`` are
upscaled (``--small-images upscale``, the default, with a message) or skipped (``skip``); grey images
(no pixel with |a| or |b| > 5, the pretraining loss's rule) are skipped and counted since they have no
colour to score (``--keep-grey`` keeps them); a folder with no colour image at all is an error naming it.

Outputs: rows in ``--out-csv`` (benchmark ``colorization_quality``; metrics ``auc_raw``,
``auc_rebalanced``, ``colourfulness``, ``<classifier>_top1`` such as ``vgg16_top1``; the sweep's rows
have protocol ``temperature_sweep:T=<T>``), ``examples.png`` (grey input /
each checkpoint / truth) and ``temperature_sweep.png`` (AuC and colourfulness against T) in ``--out``,
and a Table-1-style table printed beside the published rows of ``results/published.csv``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from ssl_colorize.color import rgb_to_lab
from ssl_colorize.data import ImageFiles, center_crop, ensure_builtin_imagefolder, ensure_builtin_photos
from ssl_colorize.data.images import SkippedFile
from ssl_colorize.data.transforms import resize_shorter
from ssl_colorize.inference import (
    Colorizer, ab_to_rgb, decode_grid, load_colorizer, output_stride, predict_grid, upsample_ab,
)
from ssl_colorize.metrics import AUC_MAX_THRESHOLD, accuracy_curve, colourfulness, rebalanced_pixel_weights
from ssl_colorize.results import append_rows, make_row
from ssl_colorize.targets import DEFAULT_TEMPERATURE, grey_mask, load_prior

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCHMARK = "colorization_quality"
DEFAULT_TEMPERATURES = "0.01,0.05,0.1,0.2,0.3,0.38,0.5,0.7,1.0"
BUILTIN_PHOTOS = "builtin-photos"
BUILTIN_SHAPES = "builtin-shapes"
BASELINES = ("ground_truth", "grey", "random_colours")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SYNSET_RE = re.compile(r"^n\d{8}$")
PROTOCOL_LABELS = "classifier_top1_imagenet_labels"
PROTOCOL_AGREEMENT = "classifier_top1_agreement_with_original"


# ---------------------------------------------------------------------------------------------- CLI
def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        "colorization_quality", add_help=add_help,
        description="Colorization quality (paper Table 1): raw / rebalanced AuC, colourfulness, classifier "
        "top-1 on recolorized images, the annealing-temperature sweep, and the baselines on the same images.",
    )
    p.add_argument("--checkpoint", nargs="+", action="extend", default=[],
                   help="checkpoint file(s) or run folder(s); 'random:ENCODER' for a seeded random init. "
                   "Without any, only the baselines are scored.")
    p.add_argument("--data", default=None,
                   help=f"an image folder (ImageFolder root or flat) or list file; default '{BUILTIN_PHOTOS}' "
                   f"(the real photographs shipped with scikit-image / scikit-learn); '{BUILTIN_SHAPES}' is the "
                   "coloured-shapes val split (128 px: use --size 128 --crop 128)")
    p.add_argument("--size", type=int, default=256, help="resize the shorter side to this (default 256)")
    p.add_argument("--crop", type=int, default=None, help="centre crop (default: --size, a square of it)")
    p.add_argument("--small-images", choices=("upscale", "skip"), default="upscale",
                   help="images whose shorter side is below --size: upscale them (default) or skip them")
    p.add_argument("--keep-grey", action="store_true",
                   help="score grey images too (default: skip and count them: they have no colour to score)")
    p.add_argument("--limit", type=int, default=None, help="score at most this many images (the paper: 10000)")
    p.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE,
                   help="annealed-mean temperature of the main rows (default 0.38, the paper's)")
    p.add_argument("--temperatures", default=DEFAULT_TEMPERATURES,
                   help="comma-separated temperatures of the sweep; 'none' skips it")
    p.add_argument("--prior", default=None, help="prior for the rebalanced AuC (default: the shipped ImageNet prior)")
    p.add_argument("--classifier", default="vgg16", help="a torchvision classifier name (default vgg16, the paper's)")
    p.add_argument("--classifier-weights", default=None,
                   help="a local state_dict file for --classifier; without it the classifier rows are skipped")
    p.add_argument("--classifier-size", type=int, default=224, help="classifier input size (default 224)")
    p.add_argument("--class-index", default=None,
                   help="text file of ImageNet synset ids, one per line, in the classifier's output order")
    p.add_argument("--num-examples", type=int, default=6, help="rows of the example grid PNG")
    p.add_argument("--out", default=None, help="folder for the PNGs (default runs/colorization_quality/RUN_ID)")
    p.add_argument("--out-csv", default=str(REPO_ROOT / "results" / "colorization_quality.csv"),
                   help="results table to append rows to")
    p.add_argument("--published", default=str(REPO_ROOT / "results" / "published.csv"),
                   help="published numbers shown beside ours (skipped when absent)")
    p.add_argument("--run-id", default=None, help="run id of the rows (default: a timestamp)")
    p.add_argument("--seed", type=int, default=0, help="seed of the image order (random-colour donors) and random inits")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu ... (default: cuda when available)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=0, help="data loader worker processes")
    return p


def parse_temperatures(text: str) -> list[float]:
    if text is None or text.strip().lower() in ("", "none"):
        return []
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError as exc:
        raise ValueError(f"--temperatures must be comma-separated numbers, got {text!r}") from exc
    bad = [t for t in values if not t > 0]
    if bad:
        raise ValueError(f"--temperatures must be positive, got {bad}")
    return sorted(set(values))


def validate_args(args: argparse.Namespace) -> None:
    """Check the options before anything is loaded; fill the derived defaults."""
    args.crop = args.crop or args.size
    if args.size < 8 or args.crop < 8:
        raise ValueError(f"--size and --crop must be at least 8 pixels, got {args.size} and {args.crop}")
    if args.crop > args.size:
        raise ValueError(f"--crop {args.crop} is larger than --size {args.size} (the shorter side after resizing)")
    if not args.temperature > 0:
        raise ValueError(f"--temperature must be positive, got {args.temperature}")
    args.temperature_list = parse_temperatures(args.temperatures)
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    if args.num_examples < 0:
        raise ValueError(f"--num-examples must be >= 0, got {args.num_examples}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.classifier_weights and not Path(args.classifier_weights).is_file():
        raise ValueError(f"--classifier-weights: file not found: {args.classifier_weights}")
    if args.class_index and not Path(args.class_index).is_file():
        raise ValueError(f"--class-index: file not found: {args.class_index}")
    for spec in args.checkpoint:
        if not spec.startswith("random:") and not Path(spec).exists():
            raise ValueError(f"--checkpoint: not found: {spec}")
    args.run_id = args.run_id or "cq-" + _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


# --------------------------------------------------------------------------------------------- data
def resolve_data(data: str | None) -> tuple[Path, str]:
    """--data -> (folder or list file, dataset name for the rows)."""
    if data in (None, BUILTIN_PHOTOS):
        return ensure_builtin_photos(), BUILTIN_PHOTOS
    if data == BUILTIN_SHAPES:
        return ensure_builtin_imagefolder() / "val", BUILTIN_SHAPES
    path = Path(data)
    if not path.exists():
        raise ValueError(f"--data: not found: {path}")
    return path, str(path)


@dataclass
class LoadReport:
    """What the loader dropped or changed, for the messages and the rows' hparams."""

    unreadable: list[str] = field(default_factory=list)
    small: list[str] = field(default_factory=list)
    grey: list[str] = field(default_factory=list)


class CropCollate:
    """Resize the shorter side to ``size``, centre-crop ``crop``; drop unreadable (and small, if asked)."""

    def __init__(self, dataset: ImageFiles, size: int, crop: int, skip_small: bool):
        self.paths = dataset.paths
        self.size, self.crop, self.skip_small = size, crop, skip_small

    def __call__(self, items: list):
        images, labels, paths, unreadable, small = [], [], [], [], []
        for item in items:
            if isinstance(item, SkippedFile):
                unreadable.append(item.path)
                continue
            path = str(self.paths[item.index])
            if min(item.image.shape[-2:]) < self.size:
                small.append(path)
                if self.skip_small:
                    continue
            images.append(center_crop(resize_shorter(item.image, self.size), self.crop))
            labels.append(item.label)
            paths.append(path)
        stacked = torch.stack(images) if images else torch.empty(0, 3, self.crop, self.crop, dtype=torch.uint8)
        return stacked, torch.tensor(labels, dtype=torch.long), paths, unreadable, small


# -------------------------------------------------------------------------------------- accumulator
class QualityAccumulator:
    """Streaming raw / rebalanced accuracy curves and colourfulness for one method.

    ``metrics.accuracy_curve`` gives a weight-normalised cumulative curve per batch; multiplied back by
    the batch's total weight it is a histogram that adds up across batches, so the pooled AuC over all
    pixels is exact whatever the batching.
    """

    def __init__(self):
        self.raw = torch.zeros(AUC_MAX_THRESHOLD + 1, dtype=torch.float64)
        self.raw_weight = 0.0
        self.rebalanced = torch.zeros(AUC_MAX_THRESHOLD + 1, dtype=torch.float64)
        self.rebalanced_weight = 0.0
        self.colourfulness_sum = 0.0
        self.images = 0

    def add(self, pred_ab: torch.Tensor, gt_ab: torch.Tensor, rebalance: torch.Tensor, rgb: torch.Tensor) -> None:
        pixels = float(gt_ab.shape[0] * gt_ab.shape[2] * gt_ab.shape[3])
        self.raw += accuracy_curve(pred_ab, gt_ab).cpu() * pixels
        self.raw_weight += pixels
        weight = float(rebalance.sum())
        self.rebalanced += accuracy_curve(pred_ab, gt_ab, rebalance).cpu() * weight
        self.rebalanced_weight += weight
        self.colourfulness_sum += float(colourfulness(rgb).sum())
        self.images += gt_ab.shape[0]

    @staticmethod
    def _auc(curve: torch.Tensor, weight: float) -> float:
        # Same normalisation as metrics.auc: trapezoid over t = 0..150, divided by 150, in percent.
        return float(100.0 * torch.trapezoid(curve / weight, dx=1.0) / AUC_MAX_THRESHOLD)

    def result(self) -> dict[str, float]:
        if self.images == 0:
            raise ValueError("no image was scored")
        return {
            "auc_raw": self._auc(self.raw, self.raw_weight),
            "auc_rebalanced": self._auc(self.rebalanced, self.rebalanced_weight),
            "colourfulness": self.colourfulness_sum / self.images,
        }


# ------------------------------------------------------------------------------------------- models
def load_classifier(name: str, weights: str, device: torch.device) -> torch.nn.Module:
    """A torchvision classifier built without weights, then loaded from a local state_dict file."""
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        raise ValueError(f"--classifier {name!r} is not a torchvision classifier; known: {', '.join(known)}")
    model = torchvision.models.get_model(name, weights=None)
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"--classifier-weights {weights}: cannot read a state_dict: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"--classifier-weights {weights} does not fit torchvision's {name}: {exc}") from exc
    return model.eval().to(device)


def classifier_outputs(model: torch.nn.Module) -> int:
    """Number of classes of a torchvision classifier (its last Linear / 1x1 conv's outputs)."""
    last = None
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            last = module.out_features
        elif isinstance(module, torch.nn.Conv2d) and module.kernel_size == (1, 1):
            last = module.out_channels
    if last is None:
        raise ValueError(f"cannot tell how many classes {type(model).__name__} has")
    return last


def label_mapping(dataset: ImageFiles, num_classes: int, class_index: str | None) -> tuple[torch.Tensor | None, str]:
    """Map the dataset's class folders to classifier indices when they are ImageNet synsets.

    Returns (tensor folder label -> classifier index, protocol). ``None`` means the agreement protocol.
    """
    classes = dataset.classes
    if not classes or not all(SYNSET_RE.match(c) for c in classes) or any(label < 0 for label in dataset.labels):
        return None, PROTOCOL_AGREEMENT
    if class_index:
        order = [line.split()[0] for line in Path(class_index).read_text().splitlines() if line.strip()]
        position = {wnid: i for i, wnid in enumerate(order)}
        missing = [c for c in classes if c not in position]
        if missing:
            raise ValueError(f"--class-index {class_index} lacks the synsets {missing[:5]}")
        if len(order) != num_classes:
            raise ValueError(f"--class-index {class_index} lists {len(order)} synsets, the classifier has {num_classes} outputs")
        return torch.tensor([position[c] for c in classes]), PROTOCOL_LABELS
    if len(classes) == num_classes:
        return torch.arange(num_classes), PROTOCOL_LABELS
    print(
        f"note: {len(classes)} synset folders but a {num_classes}-way classifier and no --class-index: "
        "measuring top-1 agreement with the original colour image instead of accuracy", file=sys.stderr,
    )
    return None, PROTOCOL_AGREEMENT


def classify(model: torch.nn.Module, rgb: torch.Tensor, size: int) -> torch.Tensor:
    """Top-1 class of RGB (N, 3, H, W) in [0, 1]: the central 87.5% (224 of 256), resized, ImageNet-normalised."""
    h, w = rgb.shape[-2:]
    ch, cw = round(h * 0.875), round(w * 0.875)
    top, left = (h - ch) // 2, (w - cw) // 2
    x = rgb[..., top : top + ch, left : left + cw]
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    with torch.no_grad():
        return model((x - mean) / std).argmax(1)


# ---------------------------------------------------------------------------------------- evaluation
@dataclass
class Example:
    """One row of the example grid: RGB (3, H, W) tensors in [0, 1]."""

    grey: torch.Tensor  # the input: L alone (ab = 0)
    truth: torch.Tensor
    ours: dict  # model label -> its recolorization


class Evaluation:
    """All methods' accumulators, fed batch by batch (see the module docstring for the methods)."""

    def __init__(self, args, colorizers: list[Colorizer], prior: torch.Tensor, classifier, labels_map):
        self.args = args
        self.colorizers = colorizers
        self.prior = prior
        self.classifier = classifier
        self.labels_map = labels_map
        names = list(BASELINES) + [c.spec for c in colorizers]
        self.main = {name: QualityAccumulator() for name in names}
        self.sweep = {
            (c.spec, t): QualityAccumulator() for c in colorizers for t in args.temperature_list
        }
        self.correct = {name: 0 for name in names}
        self.examples: list[Example] = []
        self.donor: torch.Tensor | None = None  # ab of the last image processed (the next one's donor)
        self.deferred: tuple | None = None  # the very first image waits for the last one as its donor
        self.sweep_skipped: set[str] = set()

    def _score(self, name, pred_ab, gt_ab, L, rebalance, reference_top1, labels, sweep_t=None):
        rgb = ab_to_rgb(L, pred_ab)
        if sweep_t is not None:
            self.sweep[(name, sweep_t)].add(pred_ab, gt_ab, rebalance, rgb)
            return rgb
        self.main[name].add(pred_ab, gt_ab, rebalance, rgb)
        if self.classifier is not None:
            if name == "ground_truth" and labels is None:
                # Agreement protocol: the original image agrees with itself by definition.
                self.correct[name] += int(rgb.shape[0])
                return rgb
            top1 = classify(self.classifier, rgb, self.args.classifier_size)
            target = reference_top1 if labels is None else labels
            self.correct[name] += int((top1 == target).sum())
        return rgb

    def _reference(self, L, gt_ab, labels):
        """(top-1 on the original colour image or None, labels on the device or None)."""
        if self.classifier is None:
            return None, None
        if self.labels_map is not None:
            return None, self.labels_map.to(labels.device)[labels]
        return classify(self.classifier, ab_to_rgb(L, gt_ab), self.args.classifier_size), None

    def add_batch(self, rgb_uint8: torch.Tensor, labels: torch.Tensor) -> None:
        device = self.args.device
        rgb = rgb_uint8.to(device).float() / 255.0
        lab = rgb_to_lab(rgb, validate=False)
        L, gt_ab = lab[:, :1], lab[:, 1:]
        labels = labels.to(device)
        rebalance = rebalanced_pixel_weights(gt_ab, self.prior)
        reference, target = self._reference(L, gt_ab, labels)

        self._score("ground_truth", gt_ab, gt_ab, L, rebalance, reference, target)
        self._score("grey", torch.zeros_like(gt_ab), gt_ab, L, rebalance, reference, target)

        # Random colours: each image takes the ab of the image processed just before it.
        donors = torch.cat([self.donor, gt_ab[:-1]]) if self.donor is not None else gt_ab[:-1]
        start = 0 if self.donor is not None else 1
        if self.donor is None:
            first = (L[:1], gt_ab[:1], rebalance[:1], None if reference is None else reference[:1],
                     None if target is None else target[:1])
            self.deferred = first
        if donors.shape[0] > 0:
            sl = slice(start, None)
            self._score("random_colours", donors, gt_ab[sl], L[sl], rebalance[sl],
                        None if reference is None else reference[sl], None if target is None else target[sl])
        self.donor = gt_ab[-1:]

        ours = {}
        for colorizer in self.colorizers:
            grid = predict_grid(colorizer.model, L)
            stride = output_stride(colorizer.model, L, grid)
            size = L.shape[-2:]
            pred = upsample_ab(decode_grid(grid, self.args.temperature), stride, size)
            ours[colorizer.label] = self._score(colorizer.spec, pred, gt_ab, L, rebalance, reference, target)
            if grid.shape[1] == 2:  # an L2 (regression) head: no distribution, no temperature
                self.sweep_skipped.add(colorizer.spec)
                continue
            for t in self.args.temperature_list:
                pred_t = upsample_ab(decode_grid(grid, t), stride, size)
                self._score(colorizer.spec, pred_t, gt_ab, L, rebalance, None, None, sweep_t=t)

        keep = max(0, min(L.shape[0], self.args.num_examples - len(self.examples)))
        if keep:
            grey = ab_to_rgb(L[:keep], torch.zeros_like(gt_ab[:keep])).cpu()  # what the network sees
            for i in range(keep):
                self.examples.append(Example(grey[i], rgb[i].cpu(), {k: v[i].cpu() for k, v in ours.items()}))

    def finish(self) -> bool:
        """Score the deferred first image against the last donor; False when there was only one image."""
        if self.deferred is None or self.main["ground_truth"].images < 2:
            return False
        L, gt_ab, rebalance, reference, target = self.deferred
        self._score("random_colours", self.donor, gt_ab, L, rebalance, reference, target)
        return True


# ------------------------------------------------------------------------------------------- outputs
def save_examples(examples: list[Example], labels: list[str], path: Path) -> Path:
    """A grid: one row per image; columns grey input, each model, ground truth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = ["grey input"] + labels + ["ground truth"]
    fig, axes = plt.subplots(len(examples), len(columns), figsize=(2.2 * len(columns), 2.2 * len(examples)),
                             squeeze=False)
    for row, example in enumerate(examples):
        images = [example.grey] + [example.ours[label] for label in labels] + [example.truth]
        for col, image in enumerate(images):
            ax = axes[row][col]
            ax.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(columns[col], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_sweep_plot(sweep: dict, baselines: dict, temperature: float, path: Path) -> Path:
    """AuC (raw, rebalanced) and colourfulness against T, one line per checkpoint, baselines as references."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_auc, ax_col) = plt.subplots(1, 2, figsize=(11, 4))
    for label, points in sweep.items():
        ts = sorted(points)
        line = ax_auc.plot(ts, [points[t]["auc_raw"] for t in ts], "o-", label=f"{label}: raw")[0]
        ax_auc.plot(ts, [points[t]["auc_rebalanced"] for t in ts], "s--", color=line.get_color(),
                    label=f"{label}: rebalanced")
        ax_col.plot(ts, [points[t]["colourfulness"] for t in ts], "o-", color=line.get_color(), label=label)
    for name, style in (("grey", ":"), ("ground_truth", "-.")):
        if name in baselines:
            if name == "grey":
                ax_auc.axhline(baselines[name]["auc_raw"], color="grey", ls=style, lw=1, label="grey: raw")
                ax_auc.axhline(baselines[name]["auc_rebalanced"], color="black", ls=style, lw=1, label="grey: rebalanced")
            ax_col.axhline(baselines[name]["colourfulness"], color="grey" if name == "grey" else "black", ls=style,
                           lw=1, label=name.replace("_", " "))
    for ax, ylabel in ((ax_auc, "AuC (%)"), (ax_col, "colourfulness (Hasler-Suesstrunk)")):
        ax.set_xscale("log")
        ax.axvline(temperature, color="red", lw=0.8, alpha=0.6)
        ax.set_xlabel("annealed-mean temperature T (log scale; red: the main rows' T)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Temperature sweep: T -> 0 is the mode (vivid), T = 1 the mean (desaturated)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# The published Table 1 rows (results/published.csv) name methods and metrics like this; our rows carry
# the matching ``paper_method`` in their hparams so the two line up.
PAPER_BASELINES = {"ground_truth": "ground truth", "grey": "grey", "random_colours": "random colours"}
PAPER_TOP1 = "vgg16_top1"
PAPER_FOOLED = "amt_fooled"


def _published_table1(published_csv: str | None) -> dict[str, dict[str, float]]:
    """paper method -> {metric: value} from results/published.csv (empty when the file is absent)."""
    if not published_csv or not Path(published_csv).is_file():
        return {}
    import pandas as pd

    table = pd.read_csv(published_csv)
    if not {"benchmark", "metric", "value"} <= set(table.columns):
        return {}
    table = table[table["benchmark"] == BENCHMARK]
    name_column = "method" if "method" in table.columns else "encoder"
    out: dict[str, dict[str, float]] = {}
    for _, row in table.iterrows():
        out.setdefault(str(row[name_column]), {})[str(row["metric"])] = float(row["value"])
    return out


def format_table(rows: list[dict], published_csv: str | None = None) -> str:
    """A Table-1 view: our main rows (ours) beside the published numbers (paper) of the same method."""
    published = _published_table1(published_csv)
    ours: dict[str, dict] = {}
    for row in rows:
        if row["protocol"].startswith("temperature_sweep"):
            continue
        hparams = json.loads(row["hparams"])
        entry = ours.setdefault(hparams.get("label", row["encoder"]), {"paper": hparams.get("paper_method")})
        metric = "top1" if row["metric"].endswith("_top1") else row["metric"]
        entry[metric] = row["value"]

    def cell(value) -> str:
        return f"{value:6.1f}" if value is not None else f"{'-':>6}"

    header = (f"{'method':<50} {'AuC raw':>13} {'AuC rebal':>13} {'top-1':>13} {'colourful':>9} {'fooled':>6}\n"
              f"{'':<50} {'ours':>6} {'paper':>6} {'ours':>6} {'paper':>6} {'ours':>6} {'paper':>6} {'ours':>9} {'paper':>6}")
    lines = [header]
    shown = set()
    for label, values in ours.items():
        paper = published.get(values["paper"] or "", {})
        shown.add(values["paper"])
        lines.append(
            f"{label[:50]:<50} {cell(values.get('auc_raw'))} {cell(paper.get('auc_raw'))} "
            f"{cell(values.get('auc_rebalanced'))} {cell(paper.get('auc_rebalanced'))} "
            f"{cell(values.get('top1'))} {cell(paper.get(PAPER_TOP1))} {values.get('colourfulness', 0.0):9.1f} "
            f"{cell(paper.get(PAPER_FOOLED))}"
        )
    for method, paper in published.items():
        if method not in shown:
            lines.append(
                f"{(method + ' (paper only)')[:50]:<50} {cell(None)} {cell(paper.get('auc_raw'))} {cell(None)} "
                f"{cell(paper.get('auc_rebalanced'))} {cell(None)} {cell(paper.get(PAPER_TOP1))} {'-':>9} "
                f"{cell(paper.get(PAPER_FOOLED))}"
            )
    if published:
        lines.append("paper: Zhang et al. 2016, Table 1 (10k ImageNet val images, VGG-16 top-1, AMT study); "
                     "ours: the images scored here, so only the pattern is comparable")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- main
def main(args: argparse.Namespace) -> list[dict]:
    validate_args(args)
    torch.manual_seed(args.seed)
    source, dataset_name = resolve_data(args.data)
    dataset = ImageFiles(source)
    out_dir = Path(args.out) if args.out else REPO_ROOT / "runs" / "colorization_quality" / args.run_id
    out_dir.mkdir(parents=True, exist_ok=True)

    colorizers = [load_colorizer(spec, args.seed, args.device) for spec in args.checkpoint]
    seen: dict[str, int] = {}
    for c in colorizers:  # plots and tables key on the label: make every label unique
        seen[c.label] = seen.get(c.label, 0) + 1
        if seen[c.label] > 1:
            c.label = f"{c.label} #{seen[c.label]}"
    if not colorizers:
        print("no --checkpoint given: scoring the baselines only", file=sys.stderr)
    prior = load_prior(args.prior, device=args.device)

    classifier, labels_map, classifier_protocol = None, None, None
    if args.classifier_weights:
        classifier = load_classifier(args.classifier, args.classifier_weights, args.device)
        labels_map, classifier_protocol = label_mapping(dataset, classifier_outputs(classifier), args.class_index)
    else:
        print(
            f"no --classifier-weights: skipping the semantic-interpretability rows ({args.classifier} top-1); "
            "pass a local state_dict file to score them (nothing is downloaded)", file=sys.stderr,
        )

    generator = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(dataset), generator=generator).tolist()
    if args.limit is not None:
        order = order[: args.limit]
    loader = DataLoader(
        dataset, batch_size=args.batch_size, sampler=order, num_workers=args.workers,
        collate_fn=CropCollate(dataset, args.size, args.crop, skip_small=args.small_images == "skip"),
    )
    report = LoadReport()
    evaluation = Evaluation(args, colorizers, prior, classifier, labels_map)
    for images, labels, paths, unreadable, small in tqdm(loader, desc="colorization quality", unit="batch"):
        report.unreadable += unreadable
        report.small += small
        if images.shape[0] == 0:
            continue
        if not args.keep_grey:
            ab = rgb_to_lab(images.float() / 255.0, validate=False)[:, 1:]
            grey = grey_mask(ab)
            report.grey += [p for p, g in zip(paths, grey.tolist()) if g]
            images, labels = images[~grey], labels[~grey]
            if images.shape[0] == 0:
                continue
        evaluation.add_batch(images, labels)
    has_random = evaluation.finish()
    _print_load_report(report, source, args)
    scored = evaluation.main["ground_truth"].images
    if scored == 0:
        if report.grey:
            raise ValueError(
                f"no colour to score in {source}: all {len(report.grey)} readable images are greyscale "
                "(no pixel with |a| or |b| above 5); give a folder of colour photographs"
            )
        raise ValueError(f"no readable image to score in {source} ({len(report.unreadable)} unreadable, "
                         f"{len(report.small)} smaller than --size {args.size} skipped)")
    if not has_random:
        print("only one colour image: the random-colours baseline needs two and is skipped", file=sys.stderr)

    rows = build_rows(args, evaluation, report, dataset_name, classifier_protocol, has_random)
    append_rows(args.out_csv, [make_row(**r) for r in rows])
    written = []
    if evaluation.examples:
        written.append(save_examples(evaluation.examples, [c.label for c in colorizers], out_dir / "examples.png"))
    sweep = {
        c.label: {t: evaluation.sweep[(c.spec, t)].result() for t in args.temperature_list}
        for c in colorizers if c.spec not in evaluation.sweep_skipped
    }
    if sweep and args.temperature_list:
        baselines = {name: evaluation.main[name].result() for name in ("grey", "ground_truth")}
        written.append(save_sweep_plot(sweep, baselines, args.temperature, out_dir / "temperature_sweep.png"))
    for spec in sorted(evaluation.sweep_skipped):
        print(f"{spec}: a 2-channel (L2) head predicts ab directly: no temperature sweep", file=sys.stderr)
    print(format_table(rows, args.published))
    print(f"{len(rows)} rows -> {args.out_csv}; figures: {', '.join(str(p) for p in written)}")
    return rows


def _print_load_report(report: LoadReport, source: Path, args) -> None:
    if report.unreadable:
        print(f"skipped {len(report.unreadable)} unreadable file(s) in {source}: {report.unreadable[:5]}", file=sys.stderr)
    if report.small:
        verb = "skipped" if args.small_images == "skip" else "upscaled"
        print(f"{verb} {len(report.small)} image(s) whose shorter side is below --size {args.size}: "
              f"{report.small[:5]}", file=sys.stderr)
    if report.grey:
        print(f"skipped {len(report.grey)} grey image(s) (no colour to score; --keep-grey keeps them): "
              f"{report.grey[:5]}", file=sys.stderr)


def build_rows(args, evaluation: Evaluation, report: LoadReport, dataset_name: str,
               classifier_protocol: str | None, has_random: bool) -> list[dict]:
    """One dict per measured number, in ssl_colorize.results' columns."""
    common = {
        "crop": args.crop, "size": args.size, "images": evaluation.main["ground_truth"].images,
        "unreadable": len(report.unreadable), "grey_skipped": len(report.grey), "small": len(report.small),
        "small_images": args.small_images, "prior": args.prior or "imagenet (shipped)",
    }
    rows = []

    def add(checkpoint, encoder, protocol, metric, value, extra):
        rows.append(dict(
            run_id=args.run_id, benchmark=BENCHMARK, checkpoint=checkpoint, encoder=encoder, tap="head",
            dataset=dataset_name, split="all", protocol=protocol, metric=metric, value=float(value),
            seed=args.seed, hparams=json.dumps({**common, **extra}, sort_keys=True, default=str),
        ))

    methods = [(name, "baseline", name, {"label": name, "paper_method": PAPER_BASELINES[name]})
               for name in BASELINES if name != "random_colours" or has_random]
    for c in evaluation.colorizers:
        extra = {"label": c.label, "temperature": args.temperature, **c.info}
        if c.paper_method:
            extra["paper_method"] = c.paper_method
        methods.append((c.spec, c.spec, c.encoder, extra))
    for key, checkpoint, encoder, extra in methods:
        protocol = "annealed_mean" if key not in BASELINES else "baseline"
        for metric, value in evaluation.main[key].result().items():
            add(checkpoint, encoder, protocol, metric, value, extra)
        if evaluation.classifier is not None:
            top1 = 100.0 * evaluation.correct[key] / max(1, evaluation.main[key].images)
            add(checkpoint, encoder, classifier_protocol, f"{args.classifier}_top1", top1,
                {**extra, "classifier": args.classifier, "classifier_weights": args.classifier_weights,
                 "classifier_size": args.classifier_size})
    for c in evaluation.colorizers:
        if c.spec in evaluation.sweep_skipped:
            continue
        for t in args.temperature_list:
            for metric, value in evaluation.sweep[(c.spec, t)].result().items():
                add(c.spec, c.encoder, f"temperature_sweep:T={t:g}", metric, value,
                    {"label": c.label, "temperature": t})
    return rows


def cli(argv=None) -> list[dict]:
    args = get_args_parser().parse_args(argv)
    try:
        return main(args)
    except ValueError as exc:
        raise SystemExit(f"colorization_quality: error: {exc}") from exc


if __name__ == "__main__":
    cli()
