"""A small procedurally generated VOCdevkit: the VOC benchmarks' built-in default and the tests' fixture.

It is written in the real on-disk layout (ssl_colorize.data.voc reads it with the same code as the
real archives): ``VOCdevkit/VOC2007`` (``JPEGImages``, ``Annotations/*.xml`` with ``difficult`` and
``truncated`` flags, ``ImageSets/Main/{train,val,trainval,test}.txt``) and ``VOCdevkit/VOC2012`` (the
same plus ``ImageSets/Segmentation/{train,val,trainval}.txt`` and palette ``SegmentationClass/*.png``
with 255 borders), and optionally an SBD folder (``benchmark_RELEASE/dataset/{img,cls,train.txt,
val.txt}``, ``cls/*.mat`` holding ``GTcls.Segmentation``).

The images reuse the idea of the "coloured shapes" (ssl_colorize.data.builtin): eight of the 20 VOC
classes are each drawn as one shape with one hue (:data:`CLASS_SHAPES`), one to three objects per
image on a textured low-saturation background, without overlap. The shape is visible in L and its
hue follows its class, so classification, detection, segmentation and the linear SVMs all have
something learnable, and colour is predictable from shape.

:func:`make_voc_fixture` builds such a folder anywhere, with sizes and counts to choose and the bad
cases of issue 5 to inject (:data:`BAD_CASES`); :func:`ensure_builtin_voc` writes the default one
once into the cache (``ssl_colorize.data.builtin.cache_dir()``), atomically.

Fast R-CNN needs precomputed proposals: :func:`write_builtin_proposals` writes stand-ins for selective
search (each object's box jittered at several strengths, plus random boxes) for VOC2007 trainval and
test, in the released layout (``selective_search_data/voc_2007_{trainval,test}.mat``,
ssl_colorize.data.proposals); the default devkit ships them, older caches get them on first use.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image
from scipy import ndimage

from ssl_colorize.data.builtin import CLASS_HUES, SHAPE_CLASSES, _hsv_to_rgb, _shape_mask, _smooth_noise, cache_dir
from ssl_colorize.data.voc import CLASS_INDEX, IGNORE_LABEL, VOCDataError, parse_annotation, read_ids, voc_palette

BUILTIN_VOC_VERSION = "v1"

#: The VOC classes the built-in data draws, each as one coloured shape (hue from builtin.CLASS_HUES).
CLASS_SHAPES = {
    "tvmonitor": "circle",
    "car": "square",
    "cat": "triangle",
    "dog": "star",
    "pottedplant": "ring",
    "aeroplane": "cross",
    "bottle": "bar",
    "person": "diamond",
}
#: Bad inputs :func:`make_voc_fixture` can inject (issue 5, "Bad input").
BAD_CASES = ("missing_annotation", "unknown_class", "bad_mask", "missing_split", "corrupt_image")

#: Counts of the built-in default (VOC2007 trainval / test; VOC2012 train / val).
BUILTIN_COUNTS = {"trainval07": 200, "test07": 200, "train12": 160, "val12": 100}
BUILTIN_SIZE = (200, 280)
#: Where the built-in proposals live, beside VOCdevkit (the released ``data/selective_search_data``).
PROPOSALS_DIR = "selective_search_data"


@dataclass
class Fixture:
    """What :func:`make_voc_fixture` wrote: the root (holding VOCdevkit), the devkit, SBD's folder
    (or None) and, per injected bad case, the file it concerns."""

    root: Path
    devkit: Path
    sbd: Path | None
    bad_files: dict[str, Path] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# Rendering one image
# ----------------------------------------------------------------------------------------------

@dataclass
class _Object:
    name: str
    mask: np.ndarray  # bool (H, W), the visible pixels
    difficult: bool
    truncated: bool

    def bbox(self) -> tuple[int, int, int, int]:
        """Tight box, 1-based inclusive (the devkit's convention)."""
        rows, cols = np.nonzero(self.mask)
        return int(cols.min()) + 1, int(rows.min()) + 1, int(cols.max()) + 1, int(rows.max()) + 1


def _render(rng: np.random.Generator, height: int, width: int, max_objects: int, difficult_rate: float,
            force: str | None = None) -> tuple[np.ndarray, list[_Object]]:
    """An RGB uint8 image and its objects. ``force``: "difficult" makes one difficult object only,
    "truncated" places the first object across the image border."""
    side = max(height, width)
    texture = _smooth_noise(rng, side, int(rng.integers(2, 6)))[:height, :width]
    grain = _smooth_noise(rng, side, 24)[:height, :width]
    rgb = _hsv_to_rgb(
        np.full((height, width), rng.uniform(0, 360)),
        np.full((height, width), rng.uniform(0.0, 0.25)),
        0.35 + 0.45 * texture + 0.1 * grain,
    )
    names = list(CLASS_SHAPES)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    occupied = np.zeros((height, width), dtype=bool)
    objects: list[_Object] = []
    wanted = 1 if force == "difficult" else int(rng.integers(1, max_objects + 1))
    for _ in range(30):
        if len(objects) == wanted:
            break
        name = names[int(rng.integers(len(names)))]
        shape = CLASS_SHAPES[name]
        radius = rng.uniform(0.18, 0.32) * min(height, width)
        if force == "truncated" and not objects:
            cx, cy = rng.uniform(-0.3, 0.3) * radius, rng.uniform(0.3, 0.7) * height
        else:
            cx, cy = rng.uniform(0.1, 0.9) * width, rng.uniform(0.1, 0.9) * height
        theta = rng.uniform(0, 2 * np.pi)
        u = ((xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)) / radius
        v = (-(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)) / radius
        mask = _shape_mask(shape, u, v)
        if mask.sum() < 40 or (ndimage.binary_dilation(mask, iterations=4) & occupied).any():
            continue
        occupied |= mask
        label = SHAPE_CLASSES.index(shape)
        shading = np.clip(0.75 + 0.25 * (-u - v) / 2, 0.4, 1.0)
        colour = _hsv_to_rgb(
            np.full((height, width), CLASS_HUES[label] + rng.uniform(-8, 8)),
            np.full((height, width), rng.uniform(0.65, 0.95)),
            np.clip(rng.uniform(0.6, 0.95) * shading + 0.05 * grain, 0, 1),
        )
        rgb[mask] = colour[mask]
        rows, cols = np.nonzero(mask)
        truncated = bool(rows.min() == 0 or cols.min() == 0 or rows.max() == height - 1 or cols.max() == width - 1)
        difficult = force == "difficult" or bool(rng.random() < difficult_rate)
        objects.append(_Object(name, mask, difficult, truncated))
    return (np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8), objects


def _segmentation(objects: Iterable[_Object], height: int, width: int, border: int = 2) -> np.ndarray:
    """Index mask: 0 background, 1..20 the class, 255 on a band of ~2 * border pixels along each outline
    (the void borders of the VOC masks; ``border=0``: none, as SBD's masks)."""
    mask = np.zeros((height, width), dtype=np.uint8)
    band = np.zeros((height, width), dtype=bool)
    for obj in objects:
        mask[obj.mask] = CLASS_INDEX[obj.name] + 1
        if border > 0:  # (scipy treats iterations=0 as "until nothing changes")
            band |= ndimage.binary_dilation(obj.mask, iterations=border) & ~ndimage.binary_erosion(
                obj.mask, iterations=border)
    mask[band] = IGNORE_LABEL
    return mask


# ----------------------------------------------------------------------------------------------
# Writing files
# ----------------------------------------------------------------------------------------------

def _write_xml(path: Path, year: int, image_id: str, height: int, width: int, objects: list[_Object],
               rename: dict[int, str] | None = None) -> None:
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = f"VOC{year}"
    ET.SubElement(root, "filename").text = f"{image_id}.jpg"
    source = ET.SubElement(root, "source")
    ET.SubElement(source, "database").text = "ssl_colorize built-in VOC (procedural)"
    size = ET.SubElement(root, "size")
    for tag, value in (("width", width), ("height", height), ("depth", 3)):
        ET.SubElement(size, tag).text = str(value)
    ET.SubElement(root, "segmented").text = "1" if year >= 2012 else "0"
    for i, obj in enumerate(objects):
        node = ET.SubElement(root, "object")
        ET.SubElement(node, "name").text = (rename or {}).get(i, obj.name)
        ET.SubElement(node, "pose").text = "Unspecified"
        ET.SubElement(node, "truncated").text = str(int(obj.truncated))
        ET.SubElement(node, "difficult").text = str(int(obj.difficult))
        box = ET.SubElement(node, "bndbox")
        for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), obj.bbox()):
            ET.SubElement(box, tag).text = str(value)
    ET.indent(root)
    ET.ElementTree(root).write(path, encoding="utf-8")


def _write_png_mask(path: Path, mask: np.ndarray) -> None:
    image = Image.fromarray(mask.astype(np.uint8))
    image.putpalette(voc_palette())  # an "L" image becomes a palette ("P") image, indices unchanged
    image.save(path)


def _write_sbd_mask(path: Path, mask: np.ndarray) -> None:
    from scipy.io import savemat

    present = np.unique(mask[(mask > 0) & (mask != IGNORE_LABEL)]).astype(np.uint8)
    savemat(path, {"GTcls": {"Segmentation": mask.astype(np.uint8), "CategoriesPresent": present}})


def _write_list(path: Path, ids: Iterable[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{i}\n" for i in ids))


def _year_folders(devkit: Path, year: int) -> Path:
    folder = devkit / f"VOC{year}"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main", "ImageSets/Segmentation", "SegmentationClass"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    return folder


def _write_split_images(folder: Path, year: int, ids: list[str], rng_key: tuple, size: tuple[int, int],
                        max_objects: int, difficult_rate: float, with_masks: bool) -> dict[str, tuple]:
    """Render and write ``ids``; the first image has one difficult object only, the second a truncated
    one (so every split exercises both flags). Returns id -> (rgb, objects, seg mask or None)."""
    written = {}
    for n, image_id in enumerate(ids):
        rng = np.random.default_rng([*rng_key, n])
        height, width = (int(v) for v in rng.integers(size[0], size[1] + 1, size=2))
        force = {0: "difficult", 1: "truncated"}.get(n)
        rgb, objects = _render(rng, height, width, max_objects, difficult_rate, force)
        Image.fromarray(rgb).save(folder / "JPEGImages" / f"{image_id}.jpg", quality=92)
        _write_xml(folder / "Annotations" / f"{image_id}.xml", year, image_id, height, width, objects)
        seg = _segmentation(objects, height, width) if with_masks else None
        if seg is not None:
            _write_png_mask(folder / "SegmentationClass" / f"{image_id}.png", seg)
        written[image_id] = (rgb, objects, seg)
    return written


def make_voc_fixture(
    root: str | os.PathLike,
    *,
    n_trainval07: int = 24,
    n_test07: int = 16,
    n_train12: int = 16,
    n_val12: int = 12,
    image_size: tuple[int, int] = (96, 128),
    max_objects: int = 3,
    difficult_rate: float = 0.15,
    sbd: bool = False,
    n_sbd: int = 8,
    bad: Iterable[str] = (),
    seed: int = 0,
    proposals: bool = True,
) -> Fixture:
    """Write a VOCdevkit (VOC2007 + VOC2012, and SBD if asked) under ``root``; return what was written.

    ``image_size`` is the (min, max) of each side; ``bad`` injects any of :data:`BAD_CASES`:
    ``missing_annotation`` deletes one VOC2007 trainval XML (its id stays listed), ``unknown_class``
    renames an object of a VOC2007 test XML to "unicorn", ``bad_mask`` writes index 42 into a VOC2012
    train mask, ``missing_split`` deletes VOC2007's ``ImageSets/Main/test.txt``, ``corrupt_image``
    overwrites a VOC2007 trainval JPEG with garbage. SBD, if asked, holds ``n_sbd`` images of its own
    plus the first two VOC2012 val images (as the real SBD overlaps VOC2012 val). ``proposals``: also
    write VOC2007's Fast R-CNN proposals (:func:`write_builtin_proposals`, after the bad cases, so every
    listed id has boxes).
    """
    bad = tuple(bad)
    unknown = sorted(set(bad) - set(BAD_CASES))
    if unknown:
        raise ValueError(f"unknown bad case(s) {unknown}; choose from {BAD_CASES}")
    if min(n_trainval07, n_test07, n_train12, n_val12) < 2:
        raise ValueError("make_voc_fixture needs at least 2 images per split")
    root = Path(root)
    devkit = root / "VOCdevkit"
    fixture = Fixture(root, devkit, None)
    common = dict(size=image_size, max_objects=max_objects, difficult_rate=difficult_rate)

    # VOC2007: Main splits only (detection, classification, SVM).
    voc07 = _year_folders(devkit, 2007)
    trainval = [f"{i:06d}" for i in range(1, n_trainval07 + 1)]
    test = [f"{i:06d}" for i in range(n_trainval07 + 1, n_trainval07 + n_test07 + 1)]
    written07 = _write_split_images(voc07, 2007, trainval, (seed, 2007, 0), with_masks=False, **common)
    written07.update(_write_split_images(voc07, 2007, test, (seed, 2007, 1), with_masks=False, **common))
    half = len(trainval) // 2
    for name, ids in (("trainval", trainval), ("train", trainval[:half]), ("val", trainval[half:]), ("test", test)):
        _write_list(voc07 / "ImageSets" / "Main" / f"{name}.txt", ids)

    # VOC2012: Main and Segmentation splits, palette masks with 255 borders.
    voc12 = _year_folders(devkit, 2012)
    train12 = [f"2012_{i:06d}" for i in range(1, n_train12 + 1)]
    val12 = [f"2012_{i:06d}" for i in range(n_train12 + 1, n_train12 + n_val12 + 1)]
    written12 = _write_split_images(voc12, 2012, train12, (seed, 2012, 0), with_masks=True, **common)
    written12.update(_write_split_images(voc12, 2012, val12, (seed, 2012, 1), with_masks=True, **common))
    for kind in ("Main", "Segmentation"):
        for name, ids in (("train", train12), ("val", val12), ("trainval", train12 + val12)):
            _write_list(voc12 / "ImageSets" / kind / f"{name}.txt", ids)

    if sbd:
        dataset = root / "benchmark_RELEASE" / "dataset"
        (dataset / "img").mkdir(parents=True, exist_ok=True)
        (dataset / "cls").mkdir(parents=True, exist_ok=True)
        own = [f"2008_{i:06d}" for i in range(1, n_sbd + 1)]
        for n, image_id in enumerate(own):
            rng = np.random.default_rng([seed, 2011, n])
            height, width = (int(v) for v in rng.integers(image_size[0], image_size[1] + 1, size=2))
            rgb, objects = _render(rng, height, width, max_objects, difficult_rate)
            Image.fromarray(rgb).save(dataset / "img" / f"{image_id}.jpg", quality=92)
            _write_sbd_mask(dataset / "cls" / f"{image_id}.mat", _segmentation(objects, height, width, border=0))
        shared = val12[:2]  # SBD overlaps VOC2012 val, which a training set must then leave out
        for image_id in shared:
            rgb, objects, _ = written12[image_id]
            Image.fromarray(rgb).save(dataset / "img" / f"{image_id}.jpg", quality=92)
            _write_sbd_mask(dataset / "cls" / f"{image_id}.mat", _segmentation(objects, *rgb.shape[:2], border=0))
        half = len(own) // 2
        _write_list(dataset / "train.txt", own[:half] + shared)
        _write_list(dataset / "val.txt", own[half:])
        fixture.sbd = dataset

    if "missing_annotation" in bad:
        path = voc07 / "Annotations" / f"{trainval[2]}.xml"
        path.unlink()
        fixture.bad_files["missing_annotation"] = path
    if "unknown_class" in bad:
        image_id = test[2]
        rgb, objects, _ = written07[image_id]
        path = voc07 / "Annotations" / f"{image_id}.xml"
        _write_xml(path, 2007, image_id, *rgb.shape[:2], objects, rename={0: "unicorn"})
        fixture.bad_files["unknown_class"] = path
    if "bad_mask" in bad:
        image_id = train12[2]
        _, _, seg = written12[image_id]
        seg = seg.copy()
        seg[: seg.shape[0] // 4, : seg.shape[1] // 4] = 42
        path = voc12 / "SegmentationClass" / f"{image_id}.png"
        _write_png_mask(path, seg)
        fixture.bad_files["bad_mask"] = path
    if "missing_split" in bad:
        path = voc07 / "ImageSets" / "Main" / "test.txt"
        path.unlink()
        fixture.bad_files["missing_split"] = path
    if "corrupt_image" in bad:
        path = voc07 / "JPEGImages" / f"{trainval[3]}.jpg"
        path.write_bytes(b"this is not a JPEG file")
        fixture.bad_files["corrupt_image"] = path
    if proposals:
        write_builtin_proposals(root, seed=seed)
    return fixture


def ensure_builtin_voc(root: str | os.PathLike | None = None) -> Path:
    """The built-in VOC data (the folder holding ``VOCdevkit``), generated once into the cache.

    Generation writes into a temporary folder beside the target and renames it into place, so
    concurrent first calls (several SLURM jobs) never see a half-written devkit.
    """
    root = Path(root) if root else cache_dir() / f"voc-{BUILTIN_VOC_VERSION}"
    if (root / ".complete").exists():
        if not all((root / PROPOSALS_DIR / f"voc_2007_{split}.mat").is_file() for split in ("trainval", "test")):
            write_builtin_proposals(root, seed=2016)  # a cache older than the proposals (atomic per file)
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        make_voc_fixture(
            tmp,
            n_trainval07=BUILTIN_COUNTS["trainval07"],
            n_test07=BUILTIN_COUNTS["test07"],
            n_train12=BUILTIN_COUNTS["train12"],
            n_val12=BUILTIN_COUNTS["val12"],
            image_size=BUILTIN_SIZE,
            seed=2016,
        )
        (tmp / ".complete").write_text("ok\n")
        try:
            os.replace(tmp, root)
        except OSError:
            if not (root / ".complete").exists():  # not a concurrent winner: a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


# ----------------------------------------------------------------------------------------------
# Proposals (stand-ins for selective search) in the released .mat layout
# ----------------------------------------------------------------------------------------------

def synthetic_proposals(rng: np.random.Generator, objects: np.ndarray, height: int, width: int,
                        jitters: int = 12, random_boxes: int = 40) -> np.ndarray:
    """(K, 4) integer boxes, 0-based inclusive pixels ``[x1 y1 x2 y2]``, inside the image: per object
    ``jitters`` copies with the centre moved and the sides rescaled at a few strengths (the small ones
    overlap it at IoU >= 0.5, the large ones mostly between 0.1 and 0.5), plus ``random_boxes`` boxes
    anywhere (mostly background), as selective search gives both."""
    boxes = []
    for x1, y1, x2, y2 in np.asarray(objects, dtype=np.float64).reshape(-1, 4):
        w, h = x2 - x1 + 1, y2 - y1 + 1
        strength = np.repeat([0.05, 0.15, 0.35, 0.6], int(np.ceil(jitters / 4)))[:jitters, None]
        centre = np.array([x1 + w / 2, y1 + h / 2]) + rng.normal(size=(jitters, 2)) * strength * [w, h]
        size = np.array([w, h]) * np.exp(rng.normal(size=(jitters, 2)) * strength)
        boxes.append(np.hstack([centre - size / 2, centre + size / 2 - 1]))
    side = rng.uniform(0.1, 0.8, size=(random_boxes, 2)) * [width, height]
    corner = rng.uniform(0, 1, size=(random_boxes, 2)) * ([width, height] - side)
    boxes.append(np.hstack([corner, corner + side - 1]))
    out = np.round(np.vstack(boxes))
    out[:, 0::2] = out[:, 0::2].clip(0, width - 1)
    out[:, 1::2] = out[:, 1::2].clip(0, height - 1)
    out[:, 2] = np.maximum(out[:, 2], out[:, 0])
    out[:, 3] = np.maximum(out[:, 3], out[:, 1])
    return out


def _image_objects(folder: Path, image_id: str) -> tuple[np.ndarray, int, int]:
    """Object boxes (0-based pixels) and image size of one id, from its annotation, else from the image
    (an id without a usable annotation still gets random proposals), else a nominal 100 x 100."""
    try:
        ann = parse_annotation(folder / "Annotations" / f"{image_id}.xml")
    except VOCDataError:
        ann = None  # an unreadable annotation: the image's own size below, random proposals only
    if ann is not None and ann.width > 0 and ann.height > 0:
        from ssl_colorize.data.proposals import devkit_to_pixels

        return devkit_to_pixels([o.bbox for o in ann.objects]), ann.height, ann.width
    try:
        with Image.open(folder / "JPEGImages" / f"{image_id}.jpg") as image:
            return np.zeros((0, 4)), image.height, image.width
    except (OSError, ValueError):
        return np.zeros((0, 4)), 100, 100


def write_builtin_proposals(root: str | os.PathLike, year: int = 2007, splits: Iterable[str] = ("trainval", "test"),
                            seed: int = 0) -> Path:
    """Write ``<root>/selective_search_data/voc_<year>_<split>.mat`` for each split that has a
    ``ImageSets/Main`` list under ``<root>/VOCdevkit/VOC<year>``; returns the folder."""
    from ssl_colorize.data.proposals import proposal_file, write_proposals

    folder = Path(root) / "VOCdevkit" / f"VOC{year}"
    out = Path(root) / PROPOSALS_DIR
    for k, split in enumerate(splits):
        split_path = folder / "ImageSets" / "Main" / f"{split}.txt"
        if not split_path.is_file():
            continue
        proposals = {}
        for n, image_id in enumerate(read_ids(split_path)):
            objects, height, width = _image_objects(folder, image_id)
            proposals[image_id] = synthetic_proposals(np.random.default_rng([seed, year, k, n]), objects, height, width)
        write_proposals(proposal_file(out, year, split), proposals)
    return out
