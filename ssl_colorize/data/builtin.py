"""The built-in default data, for running every command without ImageNet.

Two parts, both written once to a cache folder in the same on-disk layout the real data uses, so the
built-in default goes through exactly the code path ImageNet does:

- ``photos/``: the real colour photographs that ship inside installed packages (scikit-image's
  astronaut, coffee, chelsea, rocket, motorcycle, hubble, ihc; scikit-learn's china and flower),
  saved as JPEG. Used for colour (pretraining, colorization quality).
- ``shapes/train/<class>/*.jpg`` and ``shapes/val/<class>/*.jpg``: "coloured shapes", a procedurally
  generated labelled ImageFolder. Each of 8 classes is a shape (circle, square, triangle, star, ring,
  cross, bar, diamond) whose hue is fixed by the class (tomato red, orange, yellow, green, cyan, blue,
  purple, pink), drawn with random size, position, rotation, lightness and shading on a textured
  background of random low-saturation colour. The shape is visible in L; its colour can only be
  predicted by recognising it, so colour prediction has something semantic to learn, and the linear
  probes have labels to classify.

The cache lives in ``$SSL_COLORIZE_CACHE`` (default ``~/.cache/ssl_colorize``); generation is
deterministic (fixed seeds) and takes a few seconds.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

SHAPES_VERSION = "v2"
SHAPE_CLASSES = ("circle", "square", "triangle", "star", "ring", "cross", "bar", "diamond")
# The hue (degrees) of each class: the semantic link between what is in L and what colour it has.
CLASS_HUES = (0.0, 30.0, 55.0, 120.0, 180.0, 225.0, 275.0, 320.0)
SHAPES_SIZE = 128
SHAPES_PER_CLASS = {"train": 120, "val": 30}


def cache_dir() -> Path:
    root = os.environ.get("SSL_COLORIZE_CACHE") or Path.home() / ".cache" / "ssl_colorize"
    return Path(root)


# ----------------------------------------------------------------------------------------------
# Real photographs shipped by scikit-image and scikit-learn
# ----------------------------------------------------------------------------------------------

def builtin_photos() -> dict[str, np.ndarray]:
    """name -> uint8 HxWx3 photograph, from files installed with scikit-image and scikit-learn."""
    import skimage
    from sklearn.datasets import load_sample_images

    photos = {}
    skimage_data = Path(skimage.__file__).parent / "data"
    for name in ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png",
                 "motorcycle_right.png", "hubble_deep_field.jpg", "ihc.png"):
        path = skimage_data / name
        if path.is_file():
            photos[Path(name).stem] = np.asarray(Image.open(path).convert("RGB"))
    sample = load_sample_images()
    for filename, image in zip(sample.filenames, sample.images):
        photos[Path(filename).stem] = np.asarray(image)
    if not photos:
        raise RuntimeError("no built-in photographs found: are scikit-image and scikit-learn installed?")
    return photos


def ensure_builtin_photos(root: Path | None = None) -> Path:
    """Write the built-in photographs as JPEGs (shorter side 256) into ``root`` (default: the cache)."""
    root = Path(root) if root else cache_dir() / "photos"
    marker = root / ".complete"
    if marker.exists():
        return root
    root.mkdir(parents=True, exist_ok=True)
    for name, array in builtin_photos().items():
        image = Image.fromarray(array)
        scale = 256 / min(image.size)
        image = image.resize((round(image.size[0] * scale), round(image.size[1] * scale)), Image.BICUBIC)
        tmp = root / f".{name}.{os.getpid()}.tmp"  # per process: concurrent jobs may build the cache together
        image.save(tmp, format="JPEG", quality=95)
        os.replace(tmp, root / f"{name}.jpg")
    marker.write_text("ok\n")
    return root


# ----------------------------------------------------------------------------------------------
# "Coloured shapes": a procedurally generated labelled ImageFolder
# ----------------------------------------------------------------------------------------------

def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV (h in degrees) -> RGB in [0, 1], shape (..., 3)."""
    h = (h % 360.0) / 60.0
    c = v * s
    x = c * (1 - np.abs(h % 2 - 1))
    m = v - c
    zeros = np.zeros_like(h)
    sector = np.floor(h).astype(int) % 6
    table = [(c, x, zeros), (x, c, zeros), (zeros, c, x), (zeros, x, c), (x, zeros, c), (c, zeros, x)]
    rgb = np.zeros(h.shape + (3,))
    for i, (r, g, b) in enumerate(table):
        sel = sector == i
        rgb[sel] = np.stack((r[sel], g[sel], b[sel]), -1)
    return rgb + m[..., None]


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Value noise in [0, 1]: a random coarse grid, bilinearly upsampled."""
    coarse = rng.random((cells + 1, cells + 1))
    t = np.linspace(0, cells, size)
    i = np.minimum(t.astype(int), cells - 1)
    f = t - i
    rows = coarse[i] * (1 - f)[:, None] + coarse[i + 1] * f[:, None]
    return rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of a unit-size shape in rotated, centred coordinates (u, v)."""
    r = np.hypot(u, v)
    if shape == "circle":
        return r < 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) < 0.8
    if shape == "triangle":
        return (v > -0.6) & (v < 1.0 - 0.0) & (np.abs(u) < (1.0 - v) * 0.75)
    if shape == "star":
        angle = np.arctan2(v, u)
        return r < 0.55 + 0.45 * np.cos(5 * angle) ** 2
    if shape == "ring":
        return (r < 1.0) & (r > 0.6)
    if shape == "cross":
        return ((np.abs(u) < 0.3) & (np.abs(v) < 1.0)) | ((np.abs(v) < 0.3) & (np.abs(u) < 1.0))
    if shape == "bar":
        return (np.abs(u) < 1.0) & (np.abs(v) < 0.3)
    if shape == "diamond":  # an elongated rhombus: no rotation turns it into the square
        return np.abs(u) + 2.2 * np.abs(v) < 1.1
    raise ValueError(f"unknown shape {shape!r}")


def render_shape_image(label: int, rng: np.random.Generator, size: int = SHAPES_SIZE) -> np.ndarray:
    """One 'coloured shapes' image of class ``label``: uint8 HxWx3."""
    # Background: textured, random hue, low saturation -- colour that cannot be predicted from L.
    texture = _smooth_noise(rng, size, int(rng.integers(2, 6)))
    grain = _smooth_noise(rng, size, 24)
    bg_h = np.full((size, size), rng.uniform(0, 360))
    bg_s = np.full((size, size), rng.uniform(0.0, 0.25))
    bg_v = 0.35 + 0.45 * texture + 0.1 * grain
    rgb = _hsv_to_rgb(bg_h, bg_s, bg_v)

    # The object: its class fixes its hue; lightness and shading vary so L carries shape, not colour.
    yy, xx = np.mgrid[0:size, 0:size] / size * 2 - 1
    scale = rng.uniform(0.35, 0.6)
    cx, cy = rng.uniform(-0.9 + scale, 0.9 - scale, size=2)
    theta = rng.uniform(0, 2 * np.pi)
    u = ((xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)) / scale
    v = (-(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)) / scale
    mask = _shape_mask(SHAPE_CLASSES[label], u, v)
    shading = np.clip(0.75 + 0.25 * (-u - v) / 2, 0.4, 1.0)
    obj_h = np.full((size, size), CLASS_HUES[label] + rng.uniform(-8, 8))
    obj_s = np.full((size, size), rng.uniform(0.65, 0.95))
    obj_v = np.clip(rng.uniform(0.6, 0.95) * shading + 0.05 * grain, 0, 1)
    rgb[mask] = _hsv_to_rgb(obj_h, obj_s, obj_v)[mask]
    return (np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8)


def ensure_builtin_imagefolder(root: Path | None = None) -> Path:
    """Generate 'coloured shapes' as ``root/{train,val}/<class>/*.jpg`` once; return ``root``."""
    root = Path(root) if root else cache_dir() / f"shapes-{SHAPES_VERSION}"
    marker = root / ".complete"
    if marker.exists():
        return root
    for split_index, (split, per_class) in enumerate(SHAPES_PER_CLASS.items()):
        for label, name in enumerate(SHAPE_CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            rng = np.random.default_rng([split_index, label, 2016])
            for i in range(per_class):
                image = Image.fromarray(render_shape_image(label, rng))
                tmp = folder / f".{i:04d}.{os.getpid()}.tmp"
                image.save(tmp, format="JPEG", quality=92)
                os.replace(tmp, folder / f"{name}_{i:04d}.jpg")
    marker.write_text("ok\n")
    return root


def builtin_pretrain_list(root: Path | None = None) -> Path:
    """A list file naming the built-in pretraining images: the shapes' train split and the photos."""
    shapes = ensure_builtin_imagefolder()
    photos = ensure_builtin_photos()
    path = Path(root) if root else cache_dir() / f"pretrain-{SHAPES_VERSION}.txt"
    if not path.exists():
        names = sorted(str(p) for p in (shapes / "train").rglob("*.jpg")) + sorted(str(p) for p in photos.glob("*.jpg"))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text("\n".join(names) + "\n")
        os.replace(tmp, path)
    return path
