"""PASCAL VOC metrics: classification AP, detection AP (VOC2007 devkit rule), segmentation mIoU.

docs/protocols.md section 5 names the three numbers; this module computes them, with nothing model-specific:

* :func:`classification_ap`: per-class average precision of multi-label scores. Labels follow the
  devkit's ground-truth files: +1 present, -1 absent, 0 "difficult only" (ignored: neither a positive
  nor a negative). On the non-ignored samples the value equals scikit-learn's
  ``average_precision_score`` (the step-wise sum  sum_n (R_n - R_{n-1}) P_n  over distinct
  thresholds, tied scores forming one threshold).
* :func:`detection_ap`: the VOC2007 devkit's ``VOCevaldet`` rule. Per class, every detection of every
  image is ranked by descending score; each is matched to the ground-truth box of the same class and
  image with the highest IoU; IoU >= 0.5 to a box not yet taken is a true positive, to a box already
  taken (a duplicate) a false positive, below 0.5 a false positive; a detection whose best match is a
  "difficult" box is ignored (neither true nor false positive), and difficult boxes do not count in
  the number of positives. AP is the 11-point interpolated average (VOC2007) or, as an option, the
  area under the monotone precision envelope (VOC2010 onwards).
  Boxes are in the devkit's inclusive pixel coordinates (xmin, ymin, xmax, ymax), so widths and
  heights are ``xmax - xmin + 1``; ties in score keep the input order (a stable sort, as MATLAB's
  ``sort`` in the devkit).
* :class:`ConfusionMatrix` / :func:`iou_from_confusion`: semantic segmentation over 21 classes
  (background + 20) with label 255 ignored; IoU_c = TP / (TP + FP + FN), mIoU their mean over the
  classes that occur in the ground truth or the prediction (FCN's ``nanmean``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ssl_colorize.data.voc import IGNORE_LABEL, NUM_SEG_CLASSES, SEG_CLASSES, VOC_CLASSES

__all__ = [
    "AP_METRICS", "ConfusionMatrix", "Detections", "GroundTruth", "IGNORE_LABEL", "NUM_SEG_CLASSES", "SEG_CLASSES",
    "VOC_CLASSES", "ap_from_pr", "average_precision", "box_iou_inclusive", "classification_ap", "detection_ap",
    "detection_pr", "iou_from_confusion", "mean_ap",
]

AP_METRICS = ("11point", "area")


# ----------------------------------------------------------------------------------------------
# Classification
# ----------------------------------------------------------------------------------------------

def average_precision(scores: np.ndarray, positives: np.ndarray) -> float:
    """Step-wise average precision of one ranking (scikit-learn's definition); NaN without positives.

    ``scores`` (N,), ``positives`` (N,) bool. Tied scores form one threshold: the whole group enters
    the ranking at once, so the order inside a tie does not matter.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    positives = np.asarray(positives, dtype=bool).ravel()
    if scores.shape != positives.shape:
        raise ValueError(f"scores {scores.shape} and labels {positives.shape} differ in shape")
    n_pos = int(positives.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores, sorted_pos = scores[order], positives[order]
    tp = np.cumsum(sorted_pos)
    # The last index of every group of equal scores is where that threshold's counts are read.
    last_of_group = np.r_[np.flatnonzero(np.diff(sorted_scores)), len(sorted_scores) - 1]
    tp = tp[last_of_group].astype(np.float64)
    seen = (last_of_group + 1).astype(np.float64)
    precision = tp / seen
    recall = tp / n_pos
    recall_steps = np.diff(np.r_[0.0, recall])
    return float(np.sum(recall_steps * precision))


def classification_ap(scores: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor) -> np.ndarray:
    """Per-class AP of multi-label scores (N, C) against devkit labels (N, C) in {+1, -1, 0}.

    Samples labelled 0 for a class ("difficult" only) are left out of that class's ranking
    (docs/protocols.md section 5). Returns (C,) floats, NaN for a class without any positive.
    """
    scores = _as_numpy(scores).astype(np.float64)
    labels = _as_numpy(labels)
    if scores.ndim != 2 or scores.shape != labels.shape:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} must both be (N, C)")
    bad = ~np.isin(labels, (-1, 0, 1))
    if bad.any():
        raise ValueError(f"labels must be +1, -1 or 0 (ignored); found {np.unique(labels[bad]).tolist()}")
    aps = np.empty(scores.shape[1])
    for c in range(scores.shape[1]):
        keep = labels[:, c] != 0
        aps[c] = average_precision(scores[keep, c], labels[keep, c] > 0)
    return aps


def mean_ap(aps: Sequence[float] | np.ndarray) -> float:
    """The mean over classes that have an AP (classes without positives are NaN and left out)."""
    aps = np.asarray(aps, dtype=np.float64)
    if np.all(np.isnan(aps)):
        return float("nan")
    return float(np.nanmean(aps))


# ----------------------------------------------------------------------------------------------
# Detection
# ----------------------------------------------------------------------------------------------

@dataclass
class GroundTruth:
    """The objects of one image: boxes (K, 4) inclusive pixel coordinates, labels (K,) in 0..C-1,
    difficult (K,) bool."""

    boxes: np.ndarray
    labels: np.ndarray
    difficult: np.ndarray


@dataclass
class Detections:
    """The detections of one image: boxes (D, 4) inclusive pixel coordinates, scores (D,), labels (D,)."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray


def box_iou_inclusive(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one box with many, all (xmin, ymin, xmax, ymax) in inclusive pixel coordinates (devkit)."""
    ix0 = np.maximum(boxes[:, 0], box[0])
    iy0 = np.maximum(boxes[:, 1], box[1])
    ix1 = np.minimum(boxes[:, 2], box[2])
    iy1 = np.minimum(boxes[:, 3], box[3])
    iw = np.maximum(ix1 - ix0 + 1.0, 0.0)
    ih = np.maximum(iy1 - iy0 + 1.0, 0.0)
    inter = iw * ih
    area = (box[2] - box[0] + 1.0) * (box[3] - box[1] + 1.0)
    areas = (boxes[:, 2] - boxes[:, 0] + 1.0) * (boxes[:, 3] - boxes[:, 1] + 1.0)
    return inter / (area + areas - inter)


def ap_from_pr(recall: np.ndarray, precision: np.ndarray, metric: str = "11point") -> float:
    """AP from a precision/recall curve: the VOC2007 11-point average or the VOC2010+ area."""
    if metric == "11point":
        total = 0.0
        for t in np.linspace(0.0, 1.0, 11):
            above = precision[recall >= t]
            total += above.max() if above.size else 0.0
        return total / 11.0
    if metric == "area":
        mrec = np.r_[0.0, recall, 1.0]
        mpre = np.r_[0.0, precision, 0.0]
        mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # the monotone envelope, from the right
        steps = np.flatnonzero(mrec[1:] != mrec[:-1]) + 1
        return float(np.sum((mrec[steps] - mrec[steps - 1]) * mpre[steps]))
    raise ValueError(f"unknown AP metric {metric!r}; choose one of {AP_METRICS}")


def detection_pr(
    detections: Sequence[Detections],
    ground_truth: Sequence[GroundTruth],
    class_index: int,
    iou_threshold: float = 0.5,
) -> tuple[np.ndarray, np.ndarray, int]:
    """(recall, precision, number of non-difficult positives) for one class, by the devkit's matching."""
    if len(detections) != len(ground_truth):
        raise ValueError(f"{len(detections)} detection lists for {len(ground_truth)} images")
    gt_boxes, gt_difficult, taken = [], [], []
    n_pos = 0
    for gt in ground_truth:
        sel = np.asarray(gt.labels) == class_index
        gt_boxes.append(np.asarray(gt.boxes, dtype=np.float64).reshape(-1, 4)[sel])
        diff = np.asarray(gt.difficult, dtype=bool)[sel]
        gt_difficult.append(diff)
        taken.append(np.zeros(len(diff), dtype=bool))
        n_pos += int((~diff).sum())
    image_ids, boxes, scores = [], [], []
    for i, det in enumerate(detections):
        sel = np.asarray(det.labels) == class_index
        k = int(sel.sum())
        if k:
            image_ids.append(np.full(k, i))
            boxes.append(np.asarray(det.boxes, dtype=np.float64).reshape(-1, 4)[sel])
            scores.append(np.asarray(det.scores, dtype=np.float64)[sel])
    if not scores:
        return np.zeros(0), np.zeros(0), n_pos
    image_ids, boxes, scores = np.concatenate(image_ids), np.concatenate(boxes), np.concatenate(scores)
    order = np.argsort(-scores, kind="mergesort")  # stable: ties keep the input order
    tp = np.zeros(len(order))
    fp = np.zeros(len(order))
    for rank, d in enumerate(order):
        img = image_ids[d]
        candidates = gt_boxes[img]
        if len(candidates) == 0:
            fp[rank] = 1
            continue
        overlaps = box_iou_inclusive(boxes[d], candidates)
        best = int(np.argmax(overlaps))
        if overlaps[best] >= iou_threshold:
            if gt_difficult[img][best]:
                continue  # matched to a difficult object: neither counted nor penalised
            if not taken[img][best]:
                taken[img][best] = True
                tp[rank] = 1
            else:
                fp[rank] = 1  # a duplicate detection
        else:
            fp[rank] = 1
    # Ignored detections have tp = fp = 0: they add a point with the previous precision/recall,
    # which changes neither AP variant, exactly as in the devkit.
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    recall = tp / n_pos if n_pos else np.full_like(tp, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return recall, precision, n_pos


def detection_ap(
    detections: Sequence[Detections],
    ground_truth: Sequence[GroundTruth],
    num_classes: int = len(VOC_CLASSES),
    iou_threshold: float = 0.5,
    metric: str = "11point",
) -> np.ndarray:
    """Per-class AP (num_classes,) by the VOC devkit's rule; NaN for a class with no non-difficult
    object in the ground truth (the devkit divides by zero there)."""
    if metric not in AP_METRICS:
        raise ValueError(f"unknown AP metric {metric!r}; choose one of {AP_METRICS}")
    aps = np.full(num_classes, np.nan)
    for c in range(num_classes):
        recall, precision, n_pos = detection_pr(detections, ground_truth, c, iou_threshold)
        if n_pos == 0:
            continue
        aps[c] = ap_from_pr(recall, precision, metric) if len(recall) else 0.0
    return aps


# ----------------------------------------------------------------------------------------------
# Segmentation
# ----------------------------------------------------------------------------------------------

class ConfusionMatrix:
    """A (C, C) confusion matrix (rows: ground truth, columns: prediction), accumulated on any device.

    Pixels labelled ``ignore_index`` are skipped; any other label outside 0..C-1 is an error, as is a
    prediction outside 0..C-1.
    """

    def __init__(self, num_classes: int = NUM_SEG_CLASSES, ignore_index: int = IGNORE_LABEL):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        if prediction.shape != target.shape:
            raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape")
        prediction = prediction.reshape(-1).long()
        target = target.reshape(-1).long()
        keep = target != self.ignore_index
        prediction, target = prediction[keep], target[keep]
        c = self.num_classes
        if target.numel() and (int(target.min()) < 0 or int(target.max()) >= c):
            raise ValueError(f"target labels must be 0..{c - 1} or {self.ignore_index}")
        if prediction.numel() and (int(prediction.min()) < 0 or int(prediction.max()) >= c):
            raise ValueError(f"predicted labels must be 0..{c - 1}")
        counts = torch.bincount(target * c + prediction, minlength=c * c).reshape(c, c)
        self.matrix += counts.to(self.matrix.device, torch.int64).cpu()

    def iou(self) -> np.ndarray:
        return iou_from_confusion(self.matrix.numpy())

    def mean_iou(self) -> float:
        return mean_ap(self.iou())

    def pixel_accuracy(self) -> float:
        m = self.matrix.numpy()
        total = m.sum()
        return float(np.trace(m) / total) if total else float("nan")


def iou_from_confusion(matrix: np.ndarray) -> np.ndarray:
    """Per-class IoU = TP / (TP + FP + FN) from a (C, C) confusion matrix; NaN for a class absent from
    both the ground truth and the prediction."""
    matrix = np.asarray(matrix, dtype=np.float64)
    tp = np.diag(matrix)
    union = matrix.sum(0) + matrix.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / np.where(union > 0, union, 1.0), np.nan)


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)
