"""Frozen-encoder features for the VOC07 linear SVMs, and their cache (docs/protocols.md section 5).

Every image: shorter side resized to ``resize`` (256), centre-cropped to the encoder's transfer crop
(227 / 224; padded with the ImageNet mean colour when smaller), through the frozen encoder (eval
mode, no gradients); each tap is pooled to about 9k dims exactly as the linear probes pool it
(:class:`ssl_colorize.heads.probe_pool.TapPool`), flattened and L2-normalised.

Cache: one ``.npz`` per split (``<split>_<key>.npz``, written atomically), holding every tap's
features, which images were decoded (``kept``) and the files skipped while reading. ``key`` hashes
what the features depend on (checkpoint identity, taps, preprocessing, image ids), so a rerun or a
``--resume`` with the same settings loads them instead of running the encoder, and a changed
setting never reads stale features.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ssl_colorize.data.transforms import resize_shorter
from ssl_colorize.data.voc import VOCImages, split_skipped
from ssl_colorize.heads.probe import encoder_input, tap_shapes
from ssl_colorize.heads.probe_pool import TapPool, probe_grid

#: Bump when the features computed for the same settings change (invalidates old caches).
FEATURE_VERSION = 2


class ResizeCentreCrop:
    """uint8 (3, H, W) -> shorter side ``resize``, centre ``crop`` (padded with ``pad_rgb`` if smaller)."""

    def __init__(self, resize: int, crop: int, pad_rgb: Sequence[int]):
        self.resize, self.crop, self.pad_rgb = resize, crop, tuple(pad_rgb)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        image = resize_shorter(image, self.resize)
        h, w = image.shape[-2:]
        if min(h, w) < self.crop:
            ph, pw = max(0, self.crop - h), max(0, self.crop - w)
            padded = torch.empty(3, h + ph, w + pw, dtype=image.dtype)
            padded[:] = torch.tensor(self.pad_rgb, dtype=image.dtype)[:, None, None]
            padded[:, ph // 2: ph // 2 + h, pw // 2: pw // 2 + w] = image
            image, h, w = padded, h + ph, w + pw
        top, left = (h - self.crop) // 2, (w - self.crop) // 2
        return image[:, top: top + self.crop, left: left + self.crop]


def _collate(items: list):
    good, skipped = split_skipped(items)
    if not good:
        return None, [], skipped
    return torch.stack([g[0] for g in good]), [g[1] for g in good], skipped


@torch.no_grad()
def extract_features(encoder: torch.nn.Module, records: Sequence, taps: Sequence[str], mode: str, crop: int,
                     resize: int, pool: str, pad_rgb: Sequence[int], device: torch.device, batch_size: int,
                     workers: int, desc: str = "features") -> dict:
    """{"features": {tap: (N, D) float32 L2-normalised}, "kept": (N,) bool, "skipped": {path: reason}}."""
    shapes = tap_shapes(encoder, list(taps), crop, mode)
    pools = {tap: TapPool(pool, (h, w), probe_grid(c, (h, w))) for tap, (c, h, w) in shapes.items()}
    dims = {tap: shapes[tap][0] * pools[tap].grid[0] * pools[tap].grid[1] for tap in taps}
    features = {tap: np.zeros((len(records), dims[tap]), dtype=np.float32) for tap in taps}
    kept = np.zeros(len(records), dtype=bool)
    skipped: dict[str, str] = {}
    loader = DataLoader(VOCImages(records, ResizeCentreCrop(resize, crop, pad_rgb)), batch_size=batch_size,
                        shuffle=False, num_workers=workers, collate_fn=_collate)
    encoder.eval()
    with tqdm(total=len(records), desc=desc, unit="img", mininterval=2, dynamic_ncols=True) as bar:
        for images, indices, bad in loader:
            for item in bad:
                skipped.setdefault(str(item.path), item.reason)
            bar.update(len(indices) + len(bad))
            if images is None:
                continue
            maps = encoder.forward_taps(encoder_input(images.to(device, non_blocking=True), mode), list(taps))
            for tap in taps:
                flat = torch.flatten(pools[tap](maps[tap]), 1)
                flat = flat / flat.norm(dim=1, keepdim=True).clamp(min=1e-12)
                features[tap][indices] = flat.float().cpu().numpy()
            kept[indices] = True
    return {"features": features, "kept": kept, "skipped": skipped}


def checkpoint_identity(checkpoint_file: str | None, label: str) -> str:
    """What the features depend on in the checkpoint: its path, size and mtime (or the random init's label)."""
    if checkpoint_file is None:
        return f"random:{label}"
    path = Path(checkpoint_file)
    stat = path.stat()
    return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def cache_path(cache_dir: Path, split: str, identity: str, taps: Sequence[str], settings: dict,
               ids: Sequence[str]) -> Path:
    blob = json.dumps({"checkpoint": identity, "taps": list(taps), "split": split, "settings": settings,
                       "ids": hashlib.sha1("\n".join(ids).encode()).hexdigest(), "version": FEATURE_VERSION},
                      sort_keys=True, default=str)
    return cache_dir / f"{split}_{hashlib.sha1(blob.encode()).hexdigest()[:16]}.npz"


def save_features(path: Path, extracted: dict, ids: Sequence[str]) -> Path:
    """Atomic: a temporary file in the same folder, then a rename (a kill leaves no torn cache)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"features_{tap}": feats for tap, feats in extracted["features"].items()}
    skipped = extracted["skipped"]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        np.savez(handle, kept=extracted["kept"], ids=np.array(list(ids)), taps=np.array(list(extracted["features"])),
                 skipped_paths=np.array(list(skipped), dtype=str), skipped_reasons=np.array(list(skipped.values()), dtype=str),
                 **arrays)
    os.replace(tmp, path)
    return path


def load_features(path: Path) -> dict:
    with np.load(path) as data:
        taps = [str(t) for t in data["taps"]]
        return {
            "features": {tap: data[f"features_{tap}"] for tap in taps},
            "kept": data["kept"],
            "skipped": dict(zip(map(str, data["skipped_paths"]), map(str, data["skipped_reasons"]))),
        }


def cached_features(path: Path, extract: Callable[[], dict], ids: Sequence[str]) -> tuple[dict, bool]:
    """The split's features from ``path`` when cached, else ``extract()`` saved there; (features, reused)."""
    if path.is_file():
        return load_features(path), True
    extracted = extract()
    save_features(path, extracted, ids)
    return extracted, False
