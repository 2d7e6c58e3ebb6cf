"""Colorization quality, the paper's Table 1 (docs/protocols.md section 6): the evaluation behind
``python -m ssl_colorize.benchmarks.colorization_quality``.

Every method is scored on the same pixels of the same crops:

- ``ground_truth``: the image's own ab (100 / 100 by definition; its colourfulness and classifier
  top-1 are the references);
- ``grey``: ab = 0 everywhere (the L channel alone);
- ``random_colours``: the paper's "random colors" baseline, the full ab map of *another* image of the
  evaluation set put on this image's L. The donor is the image processed just before it in the seeded
  random order (the first image takes the last one), i.e. a random cyclic derangement: every image
  gets exactly one donor, never itself, and every image is a donor once;
- each checkpoint (``ssl_colorize.inference``: logits on the loss grid -> annealed mean at the
  temperature -> bilinear upsampling -> the image's own L), and its temperature sweep.

Metrics (``ssl_colorize.metrics``): raw AuC, class-rebalanced AuC, Hasler-Suesstrunk colourfulness,
and with a classifier the top-1 on the recolorized images. The pixels of all images are pooled into
one accuracy curve (a streaming histogram, so memory does not grow with the number of images).
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ssl_colorize.color import rgb_to_lab
from ssl_colorize.data import ImageFiles, center_crop, ensure_builtin_imagefolder, ensure_builtin_photos
from ssl_colorize.data.images import SkippedFile
from ssl_colorize.data.transforms import resize_shorter
from ssl_colorize.inference import Colorizer, ab_to_rgb, decode_grid, output_stride, predict_grid, upsample_ab
from ssl_colorize.metrics import AUC_MAX_THRESHOLD, accuracy_curve, colourfulness, rebalanced_pixel_weights

BENCHMARK = "colorization_quality"
BASELINES = ("ground_truth", "grey", "random_colours")
#: The published Table 1 (ssl_colorize/results/published.csv) names the baselines like this; our rows
#: carry the matching ``paper_method`` in their hparams so the two line up.
PAPER_BASELINES = {"ground_truth": "ground truth", "grey": "grey", "random_colours": "random colours"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SYNSET_RE = re.compile(r"^n\d{8}$")
PROTOCOL_LABELS = "classifier_top1_imagenet_labels"
PROTOCOL_AGREEMENT = "classifier_top1_agreement_with_original"
BUILTIN_PHOTOS = "builtin-photos"  # the real photographs shipped with scikit-image / scikit-learn
BUILTIN_SHAPES = "builtin-shapes"  # the coloured-shapes val split (128 px)


# --------------------------------------------------------------------------------------------- data
def resolve_data(data: str | None) -> tuple[Path, str]:
    """--data -> (folder or list file, dataset name for the rows); the built-in sets are made on first use."""
    if data in (None, BUILTIN_PHOTOS):
        return ensure_builtin_photos(), BUILTIN_PHOTOS
    if data == BUILTIN_SHAPES:
        return ensure_builtin_imagefolder() / "val", BUILTIN_SHAPES
    return Path(data), str(data)


@dataclass
class LoadReport:
    """What the loader dropped or changed, for the messages and the rows' hparams."""

    unreadable: list[str] = field(default_factory=list)
    small: list[str] = field(default_factory=list)
    grey: list[str] = field(default_factory=list)

    def print(self, source: Path, size: int, small_images: str) -> None:
        if self.unreadable:
            print(f"skipped {len(self.unreadable)} unreadable file(s) in {source}: {self.unreadable[:5]}",
                  file=sys.stderr)
        if self.small:
            verb = "skipped" if small_images == "skip" else "upscaled"
            print(f"{verb} {len(self.small)} image(s) whose shorter side is below --size {size}: {self.small[:5]}",
                  file=sys.stderr)
        if self.grey:
            print(f"skipped {len(self.grey)} grey image(s) (no colour to score; --keep-grey keeps them): "
                  f"{self.grey[:5]}", file=sys.stderr)


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


# --------------------------------------------------------------------------------------- classifier
def load_classifier(name: str, weights: str, device: torch.device) -> torch.nn.Module:
    """A torchvision classifier built without weights, then loaded from a local state_dict file.

    ValueError (naming the option and file) for an unknown name or weights that do not fit.
    """
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        raise ValueError(f"--classifier {name}: not a torchvision classifier; known: {', '.join(known)}")
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

    Returns (tensor folder label -> classifier index, protocol). ``None`` means the agreement protocol:
    the share of images whose top-1 on the recolorized image equals the top-1 on the original.
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
    if len(classes) == num_classes:  # the standard 1000-class ImageNet order is the sorted synsets
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

    def __init__(self, colorizers: list[Colorizer], prior: torch.Tensor, device: torch.device, temperature: float,
                 temperatures: list[float], num_examples: int = 0, classifier: torch.nn.Module | None = None,
                 labels_map: torch.Tensor | None = None, classifier_size: int = 224):
        self.colorizers = colorizers
        self.prior = prior
        self.device = device
        self.temperature = temperature
        self.temperatures = list(temperatures)
        self.num_examples = num_examples
        self.classifier = classifier
        self.labels_map = labels_map
        self.classifier_size = classifier_size
        names = list(BASELINES) + [c.spec for c in colorizers]
        self.main = {name: QualityAccumulator() for name in names}
        self.sweep = {(c.spec, t): QualityAccumulator() for c in colorizers for t in self.temperatures}
        self.correct = {name: 0 for name in names}
        self.examples: list[Example] = []
        self.donor: torch.Tensor | None = None  # ab of the last image processed (the next one's donor)
        self.deferred: tuple | None = None  # the very first image waits for the last one as its donor
        self.sweep_skipped: set[str] = set()

    @property
    def images(self) -> int:
        return self.main["ground_truth"].images

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
            top1 = classify(self.classifier, rgb, self.classifier_size)
            target = reference_top1 if labels is None else labels
            self.correct[name] += int((top1 == target).sum())
        return rgb

    def _reference(self, L, gt_ab, labels):
        """(top-1 on the original colour image or None, labels on the device or None)."""
        if self.classifier is None:
            return None, None
        if self.labels_map is not None:
            return None, self.labels_map.to(labels.device)[labels]
        return classify(self.classifier, ab_to_rgb(L, gt_ab), self.classifier_size), None

    def add_batch(self, rgb_uint8: torch.Tensor, labels: torch.Tensor) -> None:
        rgb = rgb_uint8.to(self.device).float() / 255.0
        lab = rgb_to_lab(rgb, validate=False)
        L, gt_ab = lab[:, :1], lab[:, 1:]
        labels = labels.to(self.device)
        rebalance = rebalanced_pixel_weights(gt_ab, self.prior)
        reference, target = self._reference(L, gt_ab, labels)

        self._score("ground_truth", gt_ab, gt_ab, L, rebalance, reference, target)
        self._score("grey", torch.zeros_like(gt_ab), gt_ab, L, rebalance, reference, target)

        # Random colours: each image takes the ab of the image processed just before it.
        donors = torch.cat([self.donor, gt_ab[:-1]]) if self.donor is not None else gt_ab[:-1]
        start = 0 if self.donor is not None else 1
        if self.donor is None:
            self.deferred = (L[:1], gt_ab[:1], rebalance[:1], None if reference is None else reference[:1],
                             None if target is None else target[:1])
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
            pred = upsample_ab(decode_grid(grid, self.temperature), stride, size)
            ours[colorizer.label] = self._score(colorizer.spec, pred, gt_ab, L, rebalance, reference, target)
            if grid.shape[1] == 2:  # an L2 (regression) head: no distribution, no temperature
                self.sweep_skipped.add(colorizer.spec)
                continue
            for t in self.temperatures:
                pred_t = upsample_ab(decode_grid(grid, t), stride, size)
                self._score(colorizer.spec, pred_t, gt_ab, L, rebalance, None, None, sweep_t=t)

        keep = max(0, min(L.shape[0], self.num_examples - len(self.examples)))
        if keep:
            grey = ab_to_rgb(L[:keep], torch.zeros_like(gt_ab[:keep])).cpu()  # what the network sees
            for i in range(keep):
                self.examples.append(Example(grey[i], rgb[i].cpu(), {k: v[i].cpu() for k, v in ours.items()}))

    def finish(self) -> bool:
        """Score the deferred first image against the last donor; False when there was only one image."""
        if self.deferred is None or self.images < 2:
            return False
        L, gt_ab, rebalance, reference, target = self.deferred
        self._score("random_colours", self.donor, gt_ab, L, rebalance, reference, target)
        return True

    def sweep_results(self) -> dict[str, dict[float, dict[str, float]]]:
        """label -> {temperature: metrics} for the checkpoints with a distribution head."""
        return {c.label: {t: self.sweep[(c.spec, t)].result() for t in self.temperatures}
                for c in self.colorizers if c.spec not in self.sweep_skipped}


# -------------------------------------------------------------------------------------------- rows
def build_rows(evaluation: Evaluation, report: LoadReport, *, run_id: str, seed: int, dataset: str,
               common: dict, classifier: str | None = None, classifier_protocol: str | None = None,
               classifier_extra: dict | None = None, has_random: bool = True) -> list[dict]:
    """One dict per measured number, in ssl_colorize.results' columns.

    ``common``: hparams every row carries (crop, size, prior ...); the images scored and skipped are added.
    """
    common = {**common, "images": evaluation.images, "unreadable": len(report.unreadable),
              "grey_skipped": len(report.grey), "small": len(report.small)}
    rows = []

    def add(checkpoint, encoder, protocol, metric, value, extra):
        rows.append(dict(
            run_id=run_id, benchmark=BENCHMARK, checkpoint=checkpoint, encoder=encoder, tap="head",
            dataset=dataset, split="all", protocol=protocol, metric=metric, value=float(value),
            seed=seed, hparams=json.dumps({**common, **extra}, sort_keys=True, default=str),
        ))

    methods = [(name, "baseline", name, {"label": name, "paper_method": PAPER_BASELINES[name]})
               for name in BASELINES if name != "random_colours" or has_random]
    for c in evaluation.colorizers:
        extra = {"label": c.label, "temperature": evaluation.temperature, **c.info}
        if c.paper_method:
            extra["paper_method"] = c.paper_method
        methods.append((c.spec, c.spec, c.encoder, extra))
    for key, checkpoint, encoder, extra in methods:
        protocol = "annealed_mean" if key not in BASELINES else "baseline"
        for metric, value in evaluation.main[key].result().items():
            add(checkpoint, encoder, protocol, metric, value, extra)
        if evaluation.classifier is not None:
            top1 = 100.0 * evaluation.correct[key] / max(1, evaluation.main[key].images)
            add(checkpoint, encoder, classifier_protocol, f"{classifier}_top1", top1,
                {**extra, **(classifier_extra or {})})
    for c in evaluation.colorizers:
        if c.spec in evaluation.sweep_skipped:
            continue
        for t in evaluation.temperatures:
            for metric, value in evaluation.sweep[(c.spec, t)].result().items():
                add(c.spec, c.encoder, f"temperature_sweep:T={t:g}", metric, value,
                    {"label": c.label, "temperature": t})
    return rows
