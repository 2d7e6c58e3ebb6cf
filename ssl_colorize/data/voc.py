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
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image
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
# Segmentation masks
# ----------------------------------------------------------------------------------------------

def check_mask(mask: np.ndarray, path: str | os.PathLike, num_classes: int = NUM_SEG_CLASSES) -> np.ndarray:
    """The mask as uint8 if every value is 0..num_classes-1 or 255; VOCDataError naming the file otherwise."""
    values = np.unique(mask)
    bad = values[(values >= num_classes) & (values != IGNORE_LABEL)]
    if bad.size or values.min(initial=0) < 0:
        raise VOCDataError(
            f"{path}: mask values {sorted(set(bad.tolist()) | set(values[values < 0].tolist()))} are outside the "
            f"palette (0..{num_classes - 1} and {IGNORE_LABEL})"
        )
    return mask.astype(np.uint8)


def read_png_mask(path: str | os.PathLike) -> np.ndarray:
    """A SegmentationClass PNG -> (H, W) uint8 indices.

    Palette ("P") and greyscale index PNGs are read as indices; an RGB rendering is mapped back through
    the VOC colour map (a colour not in it is an error naming the file).
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            if image.mode in ("P", "L"):
                mask = np.asarray(image)
            else:
                rgb = np.asarray(image.convert("RGB")).astype(np.int64)
                palette = np.asarray(voc_palette(), dtype=np.int64).reshape(256, 3)
                keys = (palette[:, 0] << 16) | (palette[:, 1] << 8) | palette[:, 2]
                lookup = {int(k): i for i, k in reversed(list(enumerate(keys)))}
                flat = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
                uniq, inverse = np.unique(flat, return_inverse=True)
                unknown = [hex(int(u)) for u in uniq if int(u) not in lookup]
                if unknown:
                    raise VOCDataError(f"{path}: colours {unknown[:5]} are not in the VOC palette")
                mask = np.array([lookup[int(u)] for u in uniq], dtype=np.int64)[inverse].reshape(flat.shape)
    except (OSError, SyntaxError) as exc:
        raise VOCDataError(f"{path}: unreadable mask ({exc})") from exc
    return check_mask(mask, path)


def read_sbd_mask(path: str | os.PathLike) -> np.ndarray:
    """An SBD ``cls/<id>.mat`` -> (H, W) uint8 indices from ``GTcls.Segmentation``."""
    from scipy.io import loadmat

    path = Path(path)
    try:
        mat = loadmat(path, squeeze_me=True, struct_as_record=False)
        mask = np.asarray(mat["GTcls"].Segmentation)
    except (OSError, KeyError, AttributeError, ValueError, TypeError) as exc:
        raise VOCDataError(f"{path}: not an SBD class mask (GTcls.Segmentation): {exc}") from exc
    if mask.ndim != 2:
        raise VOCDataError(f"{path}: GTcls.Segmentation has shape {mask.shape}, expected (H, W)")
    return check_mask(mask.astype(np.int64), path)


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """A VOC PNG or an SBD .mat mask -> (H, W) uint8 in 0..20 and 255."""
    return read_sbd_mask(path) if str(path).endswith(".mat") else read_png_mask(path)


@dataclass
class SegmentationRecord:
    image_id: str
    image_path: Path
    mask_path: Path  # a palette PNG (VOC) or a .mat (SBD)


def _validate_segmentation(
    candidates: Iterable[SegmentationRecord], report: DataReport, validate_masks: bool, desc: str
) -> list[SegmentationRecord]:
    records = []
    for rec in tqdm(list(candidates), desc=desc, unit="mask", leave=False, mininterval=2):
        if not rec.image_path.is_file():
            report.add("missing image", rec.image_path)
            continue
        if not rec.mask_path.is_file():
            report.add("missing mask", rec.mask_path)
            continue
        if validate_masks:
            try:
                read_mask(rec.mask_path)
            except VOCDataError as exc:
                report.add("mask outside the palette" if "outside the palette" in str(exc) else "bad mask", exc)
                continue
        records.append(rec)
    return records


def load_segmentation_split(
    data: str | os.PathLike,
    year: int = 2012,
    split: str = "train",
    ids_file: str | os.PathLike | None = None,
    report: DataReport | None = None,
    validate_masks: bool = True,
) -> tuple[list[SegmentationRecord], DataReport]:
    """Records of ``VOC<year>/ImageSets/Segmentation/<split>.txt`` (or of an id list such as seg11valid),
    each image with its SegmentationClass PNG; masks are checked against the palette up-front."""
    folder = year_dir(data, year)
    path = Path(ids_file) if ids_file else split_file(folder, "Segmentation", split)
    ids = read_ids(path)
    report = report or DataReport(f"VOC{year} segmentation {path.stem}")
    candidates = (
        SegmentationRecord(i, folder / "JPEGImages" / f"{i}.jpg", folder / "SegmentationClass" / f"{i}.png") for i in ids
    )
    records = _validate_segmentation(candidates, report, validate_masks, f"masks VOC{year} {path.stem}")
    if not records:
        raise ValueError(f"{path}: no usable image ({report.summary()})")
    return records, report


def find_sbd(path: str | os.PathLike) -> Path:
    """SBD's ``dataset`` folder from ``path`` (it, ``benchmark_RELEASE`` or the folder holding that)."""
    path = Path(path).expanduser()
    for candidate in (path, path / "dataset", path / "benchmark_RELEASE" / "dataset"):
        if (candidate / "cls").is_dir() and (candidate / "img").is_dir():
            return candidate
    raise ValueError(f"--sbd {path}: no SBD dataset folder (benchmark_RELEASE/dataset with img/ and cls/) found")


def load_sbd_split(
    path: str | os.PathLike,
    splits: Sequence[str] = ("train", "val"),
    report: DataReport | None = None,
    validate_masks: bool = True,
) -> tuple[list[SegmentationRecord], DataReport]:
    """SBD records of the given split files (``train.txt``, ``val.txt``) with their ``cls/*.mat`` masks."""
    folder = find_sbd(path)
    report = report or DataReport("SBD " + "+".join(splits))
    ids: list[str] = []
    for split in splits:
        ids += read_ids(folder / f"{split}.txt")
    ids = list(dict.fromkeys(ids))
    candidates = (SegmentationRecord(i, folder / "img" / f"{i}.jpg", folder / "cls" / f"{i}.mat") for i in ids)
    records = _validate_segmentation(candidates, report, validate_masks, "masks SBD")
    return records, report


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


class VOCSegmentation(Dataset):
    """``(image uint8 (3, H, W), mask uint8 (H, W), index)`` after ``transform(image, mask)``, or a
    :class:`SkippedItem`."""

    def __init__(self, records: Sequence[SegmentationRecord], transform: Callable | None = None):
        self.records = list(records)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        rec = self.records[index]
        try:
            image = read_image(rec.image_path)
        except (RuntimeError, ValueError, OSError) as exc:
            return SkippedItem(str(rec.image_path), f"undecodable image ({exc})")
        try:
            mask = torch.from_numpy(read_mask(rec.mask_path))
        except VOCDataError as exc:
            return SkippedItem(str(rec.mask_path), str(exc))
        if tuple(mask.shape) != tuple(image.shape[-2:]):
            return SkippedItem(
                str(rec.mask_path), f"mask {tuple(mask.shape)} and image {tuple(image.shape[-2:])} differ in size"
            )
        if self.transform is not None:
            image, mask = self.transform(image, mask)
        return image, mask, index


def split_skipped(items: list) -> tuple[list, list[SkippedItem]]:
    """Separate a batch's good items from its :class:`SkippedItem` entries (for collate functions)."""
    good = [item for item in items if not isinstance(item, SkippedItem)]
    return good, [item for item in items if isinstance(item, SkippedItem)]
