"""Precomputed object proposals (selective search) in the released Fast R-CNN ``.mat`` layout, and the
training / test items of a Fast R-CNN detector built from them (docs/protocols.md section 5).

The layout (rbgirshick/fast-rcnn, ``lib/datasets/pascal_voc.py``, ``_load_selective_search_roidb``; the
files of ``data/scripts/fetch_selective_search_data.sh``): one file per split, ``voc_<year>_<split>.mat``
(``voc_2007_trainval.mat``, ``voc_2007_test.mat``), holding

* ``boxes``: a cell array with one entry per image, each a K x 4 array of boxes as
  ``[y1 x1 y2 x2]`` in 1-based pixel indices (the loader takes columns ``(1, 0, 3, 2)`` and subtracts 1);
* ``images`` (optional here): the image ids, in the same order. The released loader ignores it and pairs
  the boxes with the split file's ids by position; we use it when it is there (so a file can hold more
  images than the split, in any order) and fall back to the position otherwise.

:func:`read_proposals` returns Fast R-CNN's own convention: 0-based inclusive pixel indices
``[x1 y1 x2 y2]`` (a one-pixel box has x1 == x2); ground-truth boxes of the devkit (1-based inclusive)
become the same convention with :func:`devkit_to_pixels`. A file of the wrong layout or one that misses
an image of the split is a ValueError naming the file (and the first missing id), found before training.

:class:`FastRCNNImages` turns detection records + proposals into items: the uint8 image, the scale it
is to be resized by (training: a shorter side drawn from the scales, the longer side capped; test: one
scale), its RoIs in Fast R-CNN pixels of the *original* image (mirrored with it in training) and, in
training, the sampled RoIs' labels and normalised box-regression targets (ssl_colorize.heads.fast_rcnn).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ssl_colorize.atomic import atomic_write
from ssl_colorize.data.matfile import load_mat
from ssl_colorize.data.voc import DetectionRecord, SkippedItem, VOCImages

#: The file names of the released selective-search data (pascal_voc.py: ``'voc_' + year + '_' + image_set``).
PROPOSAL_FILE = "voc_{year}_{split}.mat"


def proposal_file(folder: str | os.PathLike, year: int, split: str) -> Path:
    return Path(folder) / PROPOSAL_FILE.format(year=year, split=split)


def devkit_to_pixels(boxes: np.ndarray) -> np.ndarray:
    """Devkit boxes (1-based inclusive xmin ymin xmax ymax) -> Fast R-CNN's 0-based inclusive pixels
    (pascal_voc.py, ``_load_pascal_annotation``: "Make pixel indexes 0-based")."""
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4) - 1.0


def pixels_to_devkit(boxes: np.ndarray) -> np.ndarray:
    """The inverse of :func:`devkit_to_pixels` (what the VOC evaluation reads)."""
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4) + 1.0


def _image_id(entry) -> str:
    """One entry of a MATLAB cell array of strings, as loadmat returns it (array(['000005']) or a str)."""
    value = entry
    while isinstance(value, np.ndarray):
        if value.size != 1:
            if value.dtype.kind in "US" and value.ndim == 1:
                return "".join(str(v) for v in value)
            raise ValueError("not a string")
        value = value.reshape(-1)[0]
    return str(value).strip()


@lru_cache(maxsize=4)
def _read_cached(path: str, mtime: float, size: int) -> tuple[tuple[str, ...] | None, tuple[np.ndarray, ...]]:
    data = load_mat(path, variable_names=["boxes", "images"])  # ValueError naming the file
    layout = ("expected the released selective-search layout: 'boxes', a cell array of K x 4 "
              "[y1 x1 y2 x2] arrays (1-based), one per image")
    if "boxes" not in data:
        raise ValueError(f"{path}: no 'boxes' variable ({layout})")
    raw = data["boxes"]
    if not isinstance(raw, np.ndarray) or raw.dtype != object or min(raw.shape, default=0) > 1:
        raise ValueError(f"{path}: 'boxes' has shape {getattr(raw, 'shape', None)} and type "
                         f"{getattr(raw, 'dtype', type(raw))}, not a 1 x N cell array ({layout})")
    boxes = []
    for n, entry in enumerate(raw.reshape(-1)):
        array = np.asarray(entry)
        if array.size == 0:
            boxes.append(np.zeros((0, 4), dtype=np.float32))
            continue
        if array.ndim != 2 or array.shape[1] != 4 or array.dtype.kind not in "iuf":
            raise ValueError(f"{path}: boxes{{{n + 1}}} has shape {array.shape} ({array.dtype}), not K x 4 ({layout})")
        pixels = array[:, (1, 0, 3, 2)].astype(np.float64) - 1.0  # [y1 x1 y2 x2] 1-based -> [x1 y1 x2 y2] 0-based
        if not np.isfinite(pixels).all() or (pixels[:, 2] < pixels[:, 0]).any() or (pixels[:, 3] < pixels[:, 1]).any():
            raise ValueError(f"{path}: boxes{{{n + 1}}} holds a box with x2 < x1 or y2 < y1 (or a non-finite value); "
                             "expected [y1 x1 y2 x2] columns")
        boxes.append(pixels.astype(np.float32))  # integer pixels: exact; half the memory of ~10M boxes
    ids = None
    if "images" in data:
        try:
            ids = tuple(_image_id(e) for e in np.asarray(data["images"]).reshape(-1))
        except ValueError:
            raise ValueError(f"{path}: 'images' is not a cell array of image ids") from None
        if len(ids) != len(boxes):
            raise ValueError(f"{path}: 'images' names {len(ids)} images but 'boxes' holds {len(boxes)}")
    return ids, tuple(boxes)


def read_proposals(path: str | os.PathLike, split_ids: Sequence[str]) -> dict[str, np.ndarray]:
    """image id -> (K, 4) float32 proposals, 0-based inclusive pixels ``[x1 y1 x2 y2]``, for every id of the split.

    ValueError naming the file: missing, not a .mat, no ``boxes``, a box array that is not K x 4, or an
    image of ``split_ids`` without boxes (the first such id is named). Reads are cached (validation and
    the run read the file once).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: proposals file not found (expected the released "
                         f"{PROPOSAL_FILE.format(year='<year>', split='<split>')} files)")
    stat = path.stat()
    ids, boxes = _read_cached(str(path.resolve()), stat.st_mtime, stat.st_size)
    if ids is None:  # the released loader's pairing: the split file's order
        if len(boxes) < len(split_ids):
            raise ValueError(f"{path}: no proposals for image {split_ids[len(boxes)]} (the file has no 'images' "
                             f"ids and holds {len(boxes)} box arrays for the split's {len(split_ids)} images)")
        if len(boxes) > len(split_ids):
            raise ValueError(f"{path}: holds {len(boxes)} box arrays for the split's {len(split_ids)} images "
                             "and no 'images' ids to pair them")
        ids = tuple(split_ids)
    table = dict(zip(ids, boxes))
    for image_id in split_ids:
        if image_id not in table:
            raise ValueError(f"{path}: no proposals for image {image_id}")
    return {image_id: table[image_id] for image_id in split_ids}


def write_proposals(path: str | os.PathLike, proposals: dict[str, np.ndarray]) -> None:
    """Write ``id -> (K, 4) 0-based [x1 y1 x2 y2]`` in the released layout (``boxes`` 1 x N cell of
    1-based ``[y1 x1 y2 x2]`` doubles, ``images`` N x 1 cell of ids); never left half-written."""
    from scipy.io import savemat

    path = Path(path)
    ids = list(proposals)
    cell = np.empty((1, len(ids)), dtype=object)
    names = np.empty((len(ids), 1), dtype=object)
    for n, image_id in enumerate(ids):
        pixels = np.asarray(proposals[image_id], dtype=np.float64).reshape(-1, 4)
        cell[0, n] = pixels[:, (1, 0, 3, 2)] + 1.0
        names[n, 0] = image_id
    with atomic_write(path) as handle:
        savemat(handle, {"boxes": cell, "images": names})


# ----------------------------------------------------------------------------------------------
# Image scales (lib/fast_rcnn/test.py ``_get_image_blob``, lib/utils/blob.py ``prep_im_for_blob``)
# ----------------------------------------------------------------------------------------------

def image_scale(height: int, width: int, target: int, max_size: int) -> float:
    """The resize factor that brings the shorter side to ``target`` unless the longer side would then
    exceed ``max_size`` (rounded, as released), in which case the longer side is brought to ``max_size``."""
    scale = float(target) / min(height, width)
    if round(scale * max(height, width)) > max_size:
        scale = float(max_size) / max(height, width)
    return scale


def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """The resized image's size (cv2.resize with fx = fy = scale rounds each side)."""
    return max(1, int(round(height * scale))), max(1, int(round(width * scale)))


def flip_pixels(boxes: np.ndarray, width: int) -> np.ndarray:
    """Mirror 0-based inclusive boxes in an image of ``width`` (imdb.py ``append_flipped_images``)."""
    out = np.asarray(boxes, dtype=np.float64).copy()
    out[:, 0] = width - boxes[:, 2] - 1
    out[:, 2] = width - boxes[:, 0] - 1
    return out


class FastRCNNImages(Dataset):
    """Items for Fast R-CNN: ``(image uint8 (3, H, W), target dict, index)`` or a SkippedItem.

    ``target`` holds ``scale`` (the resize factor), ``rois`` (R, 4) float32 0-based inclusive pixels of
    the original (possibly mirrored) image, and in training ``labels`` (R,) 0..20 and ``bbox_targets`` (R, 4)
    normalised regression targets of the sampled RoIs (:class:`ssl_colorize.heads.fast_rcnn.RoISampler`).

    Test: ``rois``, the proposals of each record, at the one scale ``scales[0]``. Training: ``sampler(index)``
    draws the image's RoIs (ssl_colorize.heads.fast_rcnn.RoISampler: ground truth + proposals, as the
    released roidb merges them); a random scale of ``scales`` per image and a mirror with probability 1/2
    (drawn from torch's generator, which the training stream seeds per item: reproducible, resumable).
    """

    def __init__(self, records: Sequence[DetectionRecord], *, train: bool, scales: Sequence[int], max_size: int,
                 rois: Sequence[np.ndarray] | None = None, sampler=None):
        if train and sampler is None:
            raise ValueError("training items need a RoI sampler")
        if not train and (rois is None or len(rois) != len(records)):
            raise ValueError("test items need one RoI array per record")
        self.images = VOCImages(records)
        self.records = list(records)
        self.rois = None if rois is None else list(rois)
        self.train, self.scales, self.max_size, self.sampler = train, tuple(scales), int(max_size), sampler

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        item = self.images[index]
        if isinstance(item, SkippedItem):
            return item
        image, _ = item
        height, width = image.shape[-2:]
        if not self.train:
            scale = image_scale(height, width, self.scales[0], self.max_size)
            return image, {"scale": scale, "rois": torch.from_numpy(self.rois[index]).float()}, index
        target = self.scales[int(torch.randint(len(self.scales), (1,)))]
        scale = image_scale(height, width, target, self.max_size)
        sample = self.sampler(index)
        rois, labels, bbox_targets = sample.rois, sample.labels, sample.bbox_targets
        if bool(torch.rand(1) < 0.5):
            image = image.flip(-1)
            rois = flip_pixels(rois, width)
            bbox_targets = bbox_targets.copy()
            bbox_targets[:, 0] = -bbox_targets[:, 0]  # dx changes sign in a mirror; dy, dw, dh do not
        return image, {"scale": scale, "rois": torch.from_numpy(rois).float(),
                       "labels": torch.from_numpy(labels).long(),
                       "bbox_targets": torch.from_numpy(bbox_targets).float()}, index
