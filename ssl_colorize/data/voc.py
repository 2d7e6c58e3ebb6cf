"""PASCAL VOC and SBD on disk: split lists, XML annotations, palette masks, as validated records.

Layouts read (the official archives, unpacked as they come):

* ``VOCdevkit/VOC2007`` and ``VOCdevkit/VOC2012`` (VOC2011 too): ``JPEGImages/<id>.jpg``,
  ``Annotations/<id>.xml`` (objects with ``name``, ``difficult``, ``truncated``, ``bndbox``),
  ``ImageSets/Main/{train,val,trainval,test}.txt``, ``ImageSets/Segmentation/{train,val,trainval}.txt``
  and ``SegmentationClass/<id>.png``: palette PNGs whose indices are 0 (background), 1..20 (the
  classes) and 255 (object borders and "void", ignored by the metric).
* SBD (Hariharan et al.): ``benchmark_RELEASE/dataset/{img/<id>.jpg, cls/<id>.mat, train.txt,
  val.txt}``; each ``.mat`` holds ``GTcls.Segmentation``, an index mask 0..20 (no borders).

``data`` may name the folder that holds ``VOCdevkit``, ``VOCdevkit`` itself, or a year folder's
parent; :func:`find_devkit` resolves it.

Bad input (issue 5, "Bad input"): a missing split file is a ValueError naming it, raised before any
work. Everything per image -- a listed image without its annotation or without its image file, an
annotation naming a class outside the 20, a malformed annotation, a missing mask, a mask with values
outside the palette (not 0..20 or 255) -- is skipped, counted and named in a :class:`DataReport`,
found up-front by the loaders (reading an XML or a mask is cheap next to training). A JPEG that fails
to decode at run time is also skipped by the datasets (:class:`SkippedItem`) and counted by the
caller. Nothing in a run stops half-way because of one bad file.

Box coordinates stay in the devkit's convention: 1-based inclusive pixels (xmin, ymin, xmax, ymax),
the convention ssl_colorize.voc_metrics evaluates in. :func:`boxes_to_continuous` converts them for a
detector (x0 = xmin - 1, x1 = xmax, so a one-pixel box has width 1).
"""

from __future__ import annotations

import logging
import os
import warnings
import xml.etree.ElementTree as ET
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from ssl_colorize.data.images import read_image

LOG = logging.getLogger(__name__)

#: The 20 PASCAL VOC object classes in the devkit's order (index 0..19 here, 1..20 in masks).
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)
CLASS_INDEX = {name: i for i, name in enumerate(VOC_CLASSES)}
#: Segmentation classes: background (0) then the 20 objects (1..20); 255 is "void".
SEG_CLASSES = ("background",) + VOC_CLASSES
NUM_SEG_CLASSES = len(SEG_CLASSES)
IGNORE_LABEL = 255
YEARS = (2007, 2008, 2009, 2010, 2011, 2012)


class VOCDataError(ValueError):
    """One file of a VOC / SBD folder is unusable; the message names the file."""


def voc_palette() -> list[int]:
    """The 256-entry VOC colour map (768 ints) used by SegmentationClass PNGs (the devkit's bit trick)."""
    palette = []
    for index in range(256):
        r = g = b = 0
        c = index
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette += [r, g, b]
    return palette


# ----------------------------------------------------------------------------------------------
# Report of what was skipped
# ----------------------------------------------------------------------------------------------

@dataclass
class DataReport:
    """Files skipped while reading a dataset, grouped by reason; printed, warned and logged."""

    name: str
    skipped: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def add(self, reason: str, path: str | os.PathLike) -> None:
        self.skipped[reason].append(str(path))

    def extend(self, other: "DataReport") -> None:
        for reason, paths in other.skipped.items():
            self.skipped[reason].extend(paths)

    @property
    def total(self) -> int:
        return sum(len(v) for v in self.skipped.values())

    def summary(self, max_names: int = 5) -> str:
        if not self.total:
            return f"{self.name}: no file skipped"
        parts = []
        for reason, paths in sorted(self.skipped.items()):
            more = f", ... ({len(paths) - max_names} more)" if len(paths) > max_names else ""
            names = ", ".join(paths[:max_names]) + more
            parts.append(f"{len(paths)} {reason} ({names})")
        return f"{self.name}: skipped {self.total} file(s): " + "; ".join(parts)

    def warn(self) -> None:
        """Emit a warning and a log line when anything was skipped."""
        if self.total:
            message = self.summary()
            LOG.warning(message)
            warnings.warn(message, stacklevel=2)

    def as_dict(self) -> dict:
        return {"name": self.name, "skipped_total": self.total, "skipped": {k: list(v) for k, v in self.skipped.items()}}


# ----------------------------------------------------------------------------------------------
# Finding the folders
# ----------------------------------------------------------------------------------------------

def find_devkit(data: str | os.PathLike) -> Path:
    """The VOCdevkit folder of ``data`` (the folder holding VOCdevkit, or VOCdevkit itself)."""
    data = Path(data).expanduser()
    if not data.is_dir():
        raise ValueError(f"--data {data}: no such folder")
    for candidate in (data / "VOCdevkit", data):
        if any((candidate / f"VOC{year}").is_dir() for year in YEARS):
            return candidate
    if (data / "JPEGImages").is_dir() and data.name.startswith("VOC") and data.name[3:].isdigit():
        return data.parent  # a year folder was given
    raise ValueError(f"--data {data}: neither it nor {data / 'VOCdevkit'} holds a VOC<year> folder")


def year_dir(data: str | os.PathLike, year: int) -> Path:
    """``VOCdevkit/VOC<year>`` under ``data``; ValueError naming it when absent."""
    folder = find_devkit(data) / f"VOC{year}"
    if not folder.is_dir():
        raise ValueError(f"{folder}: missing (the VOC{year} folder of --data {data})")
    return folder


def read_ids(path: str | os.PathLike) -> list[str]:
    """Image ids of a split file (one per line; a trailing column, as in class files, is dropped)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"split file not found: {path}")
    ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise ValueError(f"split file {path} lists no image")
    return ids


def split_file(folder: Path, kind: str, split: str) -> Path:
    """``ImageSets/<kind>/<split>.txt``, checked to exist (a ValueError before any work otherwise)."""
    path = folder / "ImageSets" / kind / f"{split}.txt"
    if not path.is_file():
        available = sorted(p.stem for p in path.parent.glob("*.txt") if "_" not in p.stem) if path.parent.is_dir() else []
        raise ValueError(f"split file not found: {path} (available {kind} splits: {available or 'none'})")
    return path


# ----------------------------------------------------------------------------------------------
# Annotations
# ----------------------------------------------------------------------------------------------

@dataclass
class VOCObject:
    name: str
    label: int
    bbox: tuple[float, float, float, float]  # xmin, ymin, xmax, ymax; 1-based inclusive
    difficult: bool
    truncated: bool


@dataclass
class Annotation:
    path: Path
    filename: str
    width: int
    height: int
    objects: list[VOCObject]


def _text(node: ET.Element, tag: str, path: Path) -> str:
    child = node.find(tag)
    if child is None or child.text is None:
        raise VOCDataError(f"{path}: <{node.tag}> has no <{tag}>")
    return child.text.strip()


def _flag(node: ET.Element, tag: str) -> bool:
    child = node.find(tag)
    return child is not None and child.text is not None and child.text.strip() not in ("", "0")


def parse_annotation(path: str | os.PathLike) -> Annotation:
    """Read one VOC XML annotation; VOCDataError naming the file when malformed or naming an unknown class."""
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise VOCDataError(f"{path}: unreadable annotation ({exc})") from exc
    size = root.find("size")
    width = int(float(_text(size, "width", path))) if size is not None else 0
    height = int(float(_text(size, "height", path))) if size is not None else 0
    filename = root.findtext("filename", default="").strip()
    objects = []
    for obj in root.iter("object"):
        name = _text(obj, "name", path).lower()
        if name not in CLASS_INDEX:
            raise VOCDataError(f"{path}: unknown class {name!r} (the 20 VOC classes are {', '.join(VOC_CLASSES)})")
        box = obj.find("bndbox")
        if box is None:
            raise VOCDataError(f"{path}: object {name!r} has no <bndbox>")
        try:
            coords = tuple(float(_text(box, t, path)) for t in ("xmin", "ymin", "xmax", "ymax"))
        except ValueError as exc:
            raise VOCDataError(f"{path}: object {name!r} has a non-numeric box ({exc})") from exc
        if coords[2] < coords[0] or coords[3] < coords[1]:
            raise VOCDataError(f"{path}: object {name!r} has an empty box {coords}")
        objects.append(VOCObject(name, CLASS_INDEX[name], coords, _flag(obj, "difficult"), _flag(obj, "truncated")))
    return Annotation(path, filename, width, height, objects)


@dataclass
class DetectionRecord:
    """One image with its objects (arrays, devkit coordinates)."""

    image_id: str
    image_path: Path
    width: int
    height: int
    boxes: np.ndarray  # (K, 4) float64, 1-based inclusive
    labels: np.ndarray  # (K,) int64, 0..19
    difficult: np.ndarray  # (K,) bool
    truncated: np.ndarray  # (K,) bool

    @classmethod
    def from_annotation(cls, image_id: str, image_path: Path, ann: Annotation) -> "DetectionRecord":
        k = len(ann.objects)
        return cls(
            image_id,
            image_path,
            ann.width,
            ann.height,
            np.array([o.bbox for o in ann.objects], dtype=np.float64).reshape(k, 4),
            np.array([o.label for o in ann.objects], dtype=np.int64),
            np.array([o.difficult for o in ann.objects], dtype=bool),
            np.array([o.truncated for o in ann.objects], dtype=bool),
        )


def load_main_split(
    data: str | os.PathLike, year: int, split: str, report: DataReport | None = None
) -> tuple[list[DetectionRecord], DataReport]:
    """Records of ``VOC<year>/ImageSets/Main/<split>.txt`` with their annotations, validated up-front.

    Ids without an annotation or an image file, and annotations that are malformed or name an unknown
    class, are skipped and recorded in the report (which is returned, and warned about).
    """
    folder = year_dir(data, year)
    ids = read_ids(split_file(folder, "Main", split))
    report = report or DataReport(f"VOC{year} {split}")
    records = []
    for image_id in tqdm(ids, desc=f"annotations VOC{year} {split}", unit="img", leave=False, mininterval=2):
        xml = folder / "Annotations" / f"{image_id}.xml"
        image = folder / "JPEGImages" / f"{image_id}.jpg"
        if not xml.is_file():
            report.add("image without annotation", xml)
            continue
        if not image.is_file():
            report.add("missing image", image)
            continue
        try:
            ann = parse_annotation(xml)
        except VOCDataError as exc:
            report.add("bad annotation" if "unknown class" not in str(exc) else "unknown class", exc)
            continue
        records.append(DetectionRecord.from_annotation(image_id, image, ann))
    if not records:
        raise ValueError(f"{folder}: no usable image in split {split!r} ({report.summary()})")
    return records, report


def classification_targets(records: Sequence[DetectionRecord], num_classes: int = len(VOC_CLASSES)) -> np.ndarray:
    """(N, 20) int8 labels in the devkit's convention: +1 a non-difficult object of the class is present,
    0 only difficult objects of the class (ignored), -1 absent (docs/protocols.md section 5)."""
    targets = -np.ones((len(records), num_classes), dtype=np.int8)
    for i, rec in enumerate(records):
        for label, difficult in zip(rec.labels, rec.difficult):
            if not difficult:
                targets[i, label] = 1
            elif targets[i, label] != 1:
                targets[i, label] = 0
    return targets


def boxes_to_continuous(boxes: np.ndarray) -> np.ndarray:
    """Devkit boxes (1-based inclusive) -> continuous (x0, y0, x1, y1) with x0 = xmin - 1, x1 = xmax."""
    out = np.asarray(boxes, dtype=np.float64).copy()
    out[:, :2] -= 1.0
    return out


def boxes_to_inclusive(boxes: np.ndarray) -> np.ndarray:
    """The inverse of :func:`boxes_to_continuous`."""
    out = np.asarray(boxes, dtype=np.float64).copy()
    out[:, :2] += 1.0
    return out


# ----------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------

@dataclass
class SkippedItem:
    """What a dataset returns for a file that failed at read time (decode error, bad mask)."""

    path: str
    reason: str


class VOCImages(Dataset):
    """Images of detection / classification records: ``(image uint8 (3, H, W), index)`` after
    ``transform(image)``, or a :class:`SkippedItem` when the JPEG cannot be decoded."""

    def __init__(self, records: Sequence[DetectionRecord], transform: Callable | None = None):
        self.records = list(records)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        path = self.records[index].image_path
        try:
            image = read_image(path)
        except (RuntimeError, ValueError, OSError) as exc:
            return SkippedItem(str(path), f"undecodable image ({exc})")
        if self.transform is not None:
            image = self.transform(image)
        return image, index


def split_skipped(items: list) -> tuple[list, list[SkippedItem]]:
    """Separate a batch's good items from its :class:`SkippedItem` entries (for collate functions)."""
    good = [item for item in items if not isinstance(item, SkippedItem)]
    return good, [item for item in items if isinstance(item, SkippedItem)]


class StackBatch:
    """Collate: each of the ``fields`` of the decodable items stacked (None when none decoded), then the
    skipped items (for the run's count): ``(*fields, skipped)``."""

    def __init__(self, fields: int):
        self.fields = fields

    def __call__(self, items: list) -> tuple:
        good, skipped = split_skipped(items)
        if not good:
            return (*([None] * self.fields), skipped)
        columns = [torch.stack(column) if isinstance(column[0], torch.Tensor) else torch.tensor(column)
                   for column in zip(*good)]
        return (*columns, skipped)


class ListBatch:
    """Collate: each of the ``fields`` of the decodable items as a list (images of different sizes), then
    the skipped items: ``(*fields, skipped)``."""

    def __init__(self, fields: int):
        self.fields = fields

    def __call__(self, items: list) -> tuple:
        good, skipped = split_skipped(items)
        columns = [list(column) for column in zip(*good)] if good else [[] for _ in range(self.fields)]
        return (*columns, skipped)


class VOCIndexedImages(VOCImages):
    """VOCImages whose transform also gets the image's index: ``transform(image, index)`` (test crops
    seeded per image, reproducible whatever the worker count)."""

    def __getitem__(self, index: int):
        transform, self.transform = self.transform, None
        try:
            item = super().__getitem__(index)
        finally:
            self.transform = transform
        if isinstance(item, tuple) and transform is not None:
            return transform(item[0], index), index
        return item


class DetectionImages(VOCImages):
    """``(image uint8 (3, H, W), {"boxes", "labels"}, index)`` for a detector: continuous boxes,
    labels 1..20 (0 is the background). In training (``train=True``) objects marked difficult are left
    out (as Fast R-CNN) and the image is mirrored with probability 1/2, its boxes with it."""

    def __init__(self, records: Sequence[DetectionRecord], train: bool):
        super().__init__(records)
        self.train = train

    def __getitem__(self, index: int):
        item = super().__getitem__(index)
        if not isinstance(item, tuple):
            return item
        image, _ = item
        rec = self.records[index]
        keep = ~rec.difficult if self.train else np.ones(len(rec.labels), dtype=bool)
        boxes = torch.from_numpy(boxes_to_continuous(rec.boxes[keep])).float().reshape(-1, 4)
        labels = torch.from_numpy(rec.labels[keep] + 1).long()
        if self.train and bool(torch.rand(1) < 0.5):
            image = image.flip(-1)
            width = image.shape[-1]
            boxes = torch.stack((width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]), 1)
        return image, {"boxes": boxes, "labels": labels}, index

