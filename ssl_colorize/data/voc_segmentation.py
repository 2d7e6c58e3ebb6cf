"""PASCAL VOC and SBD segmentation on disk: palette masks, SBD ``.mat`` masks, validated records, the dataset.

Split out of :mod:`ssl_colorize.data.voc` (which still exports every name here). The layouts and the
bad-input rules are described there: a mask with values outside the palette (not 0..20 or 255), a
missing mask or image is skipped, counted and named in a :class:`~ssl_colorize.data.voc.DataReport`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from ssl_colorize.data.images import read_image
from ssl_colorize.data.matfile import load_mat
from ssl_colorize.data.voc import (
    IGNORE_LABEL,
    NUM_SEG_CLASSES,
    DataReport,
    SkippedItem,
    VOCDataError,
    read_ids,
    split_file,
    voc_palette,
    year_dir,
)

LOG = logging.getLogger(__name__)

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


class SBDLayoutError(VOCDataError):
    """A ``cls/*.mat`` that is not SBD's layout (no ``GTcls`` struct with a 2-D ``Segmentation``): the
    folder given as SBD is not SBD, so the run stops (a mask with values outside the palette is skipped)."""


def read_sbd_mask(path: str | os.PathLike) -> np.ndarray:
    """An SBD ``cls/<id>.mat`` -> (H, W) uint8 indices from ``GTcls.Segmentation``.

    SBD's layout (benchmark_RELEASE/dataset/cls/<id>.mat, as FCN's ``SBDDSegDataLayer`` reads it): a
    MATLAB struct ``GTcls`` with fields ``Segmentation`` (H x W class indices, 0 = background),
    ``Boundaries`` and ``CategoriesPresent``. Anything else is an :class:`SBDLayoutError` naming the file.
    """
    path = Path(path)
    try:
        mat = load_mat(path, squeeze_me=True, struct_as_record=False)
    except ValueError as exc:
        raise SBDLayoutError(f"{exc} (SBD's cls/*.mat hold GTcls.Segmentation)") from exc
    try:
        mask = np.asarray(mat["GTcls"].Segmentation)
    except (KeyError, AttributeError) as exc:
        held = sorted(k for k in mat if not k.startswith("__"))
        raise SBDLayoutError(f"{path}: not an SBD class mask (no GTcls.Segmentation; the file holds {held})") from exc
    if mask.ndim != 2 or not np.issubdtype(mask.dtype, np.number):
        raise SBDLayoutError(f"{path}: GTcls.Segmentation is {mask.dtype} of shape {mask.shape}, expected (H, W) indices")
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
            except SBDLayoutError:
                raise  # not SBD at all: stop before training rather than skip every file
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


def check_sbd(path: str | os.PathLike, splits: Sequence[str] = ("train", "val")) -> Path:
    """The cheap up-front check of an SBD folder (before any training): SBD's ``dataset`` folder with
    ``img/``, ``cls/`` and the split files, and the first listed ``cls/*.mat`` in SBD's layout.

    Only that one mask is read here: reading all 11,355 takes a while, and the loader reads every one
    before training anyway (:func:`load_sbd_split`), where a file of the wrong layout also stops the
    run with its name (:class:`SBDLayoutError`). Returns the ``dataset`` folder; ValueError naming
    the file otherwise.
    """
    folder = find_sbd(path)
    listed = [read_ids(folder / f"{split}.txt") for split in splits]  # ValueError naming a missing / empty one
    first = listed[0][0]
    mask = folder / "cls" / f"{first}.mat"
    if not mask.is_file():
        raise ValueError(f"--sbd {path}: {mask} (the first id of the split files) is missing")
    read_sbd_mask(mask)
    return folder


def seg11valid_file() -> Path:
    """The shipped ``seg11valid.txt`` (736 VOC2011 val ids not in SBD train; FCN's
    ``data/pascal/seg11valid.txt``, provenance in ssl_colorize/resources/PROVENANCE.md)."""
    from importlib import resources

    return Path(str(resources.files("ssl_colorize").joinpath("resources", "seg11valid.txt")))


def check_eval_ids(data: str | os.PathLike, year: int, ids_file: str | os.PathLike, label: str | None = None) -> int:
    """Every id of the evaluation list has its image and mask in ``VOC<year>``; else a ValueError
    naming the list (``label``, e.g. "the shipped seg11valid list") and the first missing id.

    An evaluation set with holes would give a number that is not the list's: stop instead of skipping.
    Returns the number of ids. Stats only (no file is read), so it runs before any work.
    """
    folder = year_dir(data, year)
    path = Path(ids_file)
    ids = read_ids(path)
    label = label or str(path)
    missing = []
    for image_id in ids:
        for need in (folder / "JPEGImages" / f"{image_id}.jpg", folder / "SegmentationClass" / f"{image_id}.png"):
            if not need.is_file():
                missing.append((image_id, need))
                break
    if missing:
        image_id, need = missing[0]
        raise ValueError(f"{label}: id {image_id} has no {need} ({len(missing)} of its {len(ids)} ids lack an image "
                         f"or mask in {folder}; give --eval-ids FILE with the ids you have)")
    return len(ids)



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


class PairedCropFlip:
    """Random ``crop`` window of an image and its mask, jointly, then a mirror at 1/2 (segmentation training).

    A side shorter than the crop is padded at the bottom / right: the image with ``fill`` (the mean
    colour, i.e. zero after the encoder's normalisation), the mask with the ignore label.
    """

    def __init__(self, crop: int, fill: tuple[int, ...]):
        self.crop, self.fill = crop, tuple(fill)

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = image.shape[-2:]
        ph, pw = max(0, self.crop - h), max(0, self.crop - w)
        if ph or pw:
            padded = torch.empty(3, h + ph, w + pw, dtype=image.dtype)
            padded[:] = torch.tensor(self.fill, dtype=image.dtype)[:, None, None]
            padded[:, :h, :w] = image
            padded_mask = torch.full((h + ph, w + pw), IGNORE_LABEL, dtype=mask.dtype)
            padded_mask[:h, :w] = mask
            image, mask, h, w = padded, padded_mask, h + ph, w + pw
        top = int(torch.randint(0, h - self.crop + 1, (1,)))
        left = int(torch.randint(0, w - self.crop + 1, (1,)))
        image = image[:, top: top + self.crop, left: left + self.crop]
        mask = mask[top: top + self.crop, left: left + self.crop]
        if bool(torch.rand(1) < 0.5):
            image, mask = image.flip(-1), mask.flip(-1)
        return image, mask


def segmentation_training_records(data: str | os.PathLike, year: int, sbd: str | os.PathLike | None,
                                  eval_ids: set[str]) -> tuple[list[SegmentationRecord], list[DataReport]]:
    """VOC ``Segmentation/train`` (+ SBD train and val with ``sbd``) minus every id of the evaluation set.

    Where an id is in both VOC and SBD, the VOC record (its mask with the 255 borders) wins.
    """
    records, report = load_segmentation_split(data, year, "train")
    reports = [report]
    records = [r for r in records if r.image_id not in eval_ids]
    if sbd:
        sbd_records, sbd_report = load_sbd_split(sbd)
        reports.append(sbd_report)
        have = {r.image_id for r in records}
        extra = [r for r in sbd_records if r.image_id not in have and r.image_id not in eval_ids]
        LOG.info("SBD adds %d images (%d of its %d are in the evaluation set or already in VOC train)",
                 len(extra), len(sbd_records) - len(extra), len(sbd_records))
        records += extra
    if not records:
        raise ValueError("no training image left for segmentation (all skipped or in the evaluation set)")
    return records, reports
