"""Build a real-vs-fake study folder from one checkpoint per arm and a folder of photographs.

For every readable colour photograph (shorter side resized to the study size, centre square crop,
256 x 256 by default as in the paper):

- ``images/real/<id>.png``: the photograph;
- ``images/<arm folder>/<id>.png``: its recolorization by the arm's model (its own L, predicted ab,
  ``ssl_colorize.inference``);
- ``images/random/<id>.png``: the attention-check image: its own L with the ab of another photograph
  of the pool (the photograph before it in a seeded random order, the first taking the last one: a
  random derangement, the "random colours" baseline of paper Table 1).

``study.json`` records the arms (name, checkpoint, encoder), the protocol (ssl_colorize.study.plan),
the seed, the photographs (id -> source file) and what was skipped. Unreadable files and grey
photographs (no |a| or |b| above 5: nothing to recolor) are skipped and counted; photographs smaller
than the study size are upscaled with a message.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ssl_colorize.color import rgb_to_lab
from ssl_colorize.data import ImageFiles, center_crop, ensure_builtin_photos, read_image, resize_shorter
from ssl_colorize.inference import ab_to_rgb, load_colorizer, predict_ab
from ssl_colorize.study.plan import (
    DATABASE_FILE, IMAGES_DIR, RANDOM_DIR, REAL_DIR, STUDY_FILE, STUDY_FORMAT, Protocol, image_path,
    protocol_dict,
)
from ssl_colorize.targets import DEFAULT_TEMPERATURE, grey_mask


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.") or "arm"


def _save_png(rgb: torch.Tensor, path: Path) -> None:
    """(3, H, W) float RGB in [0, 1] -> an 8-bit PNG, written atomically."""
    array = (rgb.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)


def load_photos(photos: Path, size: int, limit: int | None = None) -> tuple[list[str], torch.Tensor, dict]:
    """Readable colour photographs of ``photos`` as (sources, uint8 (N, 3, size, size), skipped counts)."""
    paths = ImageFiles(photos).paths
    sources, crops = [], []
    skipped = {"unreadable": [], "grey": [], "upscaled": []}
    for path in paths:
        try:
            image = read_image(path)
        except (RuntimeError, ValueError, OSError):
            skipped["unreadable"].append(str(path))
            continue
        if min(image.shape[-2:]) < size:
            skipped["upscaled"].append(str(path))
        crop = center_crop(resize_shorter(image, size), size)
        ab = rgb_to_lab(crop[None].float() / 255.0, validate=False)[:, 1:]
        if bool(grey_mask(ab)[0]):
            skipped["grey"].append(str(path))
            continue
        sources.append(str(path))
        crops.append(crop)
        if limit is not None and len(crops) >= limit:
            break
    for what, names in skipped.items():
        if names:
            verb = {"unreadable": "skipped unreadable", "grey": "skipped grey (nothing to recolor)",
                    "upscaled": f"upscaled (smaller than {size} px)"}[what]
            print(f"{verb}: {len(names)} file(s) in {photos}: {names[:5]}", file=sys.stderr)
    if len(crops) < 2:
        raise ValueError(
            f"{photos} holds {len(crops)} readable colour photograph(s); a study needs at least 2 "
            f"(the attention checks borrow another photograph's colours). Skipped: "
            f"{ {k: len(v) for k, v in skipped.items()} }"
        )
    return sources, torch.stack(crops), {k: len(v) for k, v in skipped.items()}


def build_study(
    checkpoints: list[str],
    out: str | Path,
    photos: str | Path | None = None,
    arm_names: list[str] | None = None,
    protocol: Protocol = Protocol(),
    temperature: float = DEFAULT_TEMPERATURE,
    seed: int = 0,
    device: str | torch.device | None = None,
    limit: int | None = None,
    batch_size: int = 8,
) -> Path:
    """Render the study's images and write ``study.json``; return the study folder."""
    protocol.validate()
    out = Path(out)
    if (out / STUDY_FILE).exists() or (out / DATABASE_FILE).exists():
        raise ValueError(f"{out} already holds a study; choose a new folder (answers are never overwritten)")
    if not checkpoints:
        raise ValueError("a study needs at least one --checkpoint (one per arm)")
    if arm_names is not None and len(arm_names) != len(checkpoints):
        raise ValueError(f"{len(arm_names)} arm names for {len(checkpoints)} checkpoints")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    photos = Path(photos) if photos is not None else ensure_builtin_photos()
    sources, images, skipped = load_photos(photos, protocol.size, limit)
    ids = [f"{i:04d}" for i in range(len(sources))]
    if len(ids) < protocol.trials:
        print(f"note: {len(ids)} photographs for {protocol.trials} trials per session: photographs repeat "
              "within a session", file=sys.stderr)

    rgb = images.float() / 255.0
    lab = rgb_to_lab(rgb, validate=False)
    L, ab = lab[:, :1], lab[:, 1:]

    for folder in (REAL_DIR, RANDOM_DIR):
        (out / IMAGES_DIR / folder).mkdir(parents=True, exist_ok=True)
    for i, image_id in enumerate(ids):
        _save_png(rgb[i], image_path(out, REAL_DIR, image_id))
    # Random colours: a seeded random order; each photograph takes the ab of the one before it.
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed)).tolist()
    donor = {order[k]: order[k - 1] for k in range(len(order))}
    random_rgb = ab_to_rgb(L, ab[[donor[i] for i in range(len(ids))]])
    for i, image_id in enumerate(ids):
        _save_png(random_rgb[i], image_path(out, RANDOM_DIR, image_id))

    arms, used = [], set()
    for k, spec in enumerate(checkpoints):
        colorizer = load_colorizer(spec, seed=seed, device=device)
        name = arm_names[k] if arm_names else colorizer.label
        folder = f"arm{k}-{_slug(name)}"
        if name in used:
            raise ValueError(f"two arms are named {name!r}; give --arm-name for each checkpoint")
        used.add(name)
        (out / IMAGES_DIR / folder).mkdir(parents=True, exist_ok=True)
        for start in tqdm(range(0, len(ids), batch_size), desc=f"arm {name}", unit="batch"):
            chunk = L[start : start + batch_size]
            fake = ab_to_rgb(chunk, predict_ab(colorizer.model, chunk, temperature=temperature, batch_size=batch_size))
            for j in range(fake.shape[0]):
                _save_png(fake[j], image_path(out, folder, ids[start + j]))
        arms.append({"name": name, "checkpoint": spec, "encoder": colorizer.encoder, "folder": folder,
                     "label": colorizer.label, **colorizer.info})
        del colorizer

    study = {
        "format": STUDY_FORMAT,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "photos": str(photos),
        "seed": seed,
        "temperature": temperature,
        "protocol": protocol_dict(protocol),
        "arms": arms,
        "images": [{"id": i, "source": s} for i, s in zip(ids, sources)],
        "random_donors": {ids[i]: ids[donor[i]] for i in range(len(ids))},
        "skipped": skipped,
    }
    tmp = out / f".{STUDY_FILE}.tmp"
    tmp.write_text(json.dumps(study, indent=2) + "\n")
    os.replace(tmp, out / STUDY_FILE)
    print(f"study with {len(arms)} arm(s) and {len(ids)} photographs -> {out}", file=sys.stderr)
    return out
