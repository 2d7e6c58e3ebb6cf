"""ssl_colorize.data.fast_path: the fast pretraining data path gives the plain path's pixels and targets.

Checked on the CPU against independent references: the trainer's own dataset and Lab step
(ssl_colorize.pretrain), torchvision's per-file decoder, scikit-image's rgb2lab and a scikit-learn
nearest-neighbour soft encoding (ssl_colorize.reference, the released code's way, which the throughput
benchmark times as its baseline; the benchmark's own tests are in tests/test_throughput.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.color import rgb2lab

from ssl_colorize.color import rgb_to_lab
from ssl_colorize.data import ImageFiles, builtin_photos, read_image
from ssl_colorize.data.fast_path import (
    TargetSpec,
    decode_batch,
    default_workers,
    prepare_targets,
    resolve_data_path,
)
from ssl_colorize.data.transforms import random_crop_flip, resize_shorter
from ssl_colorize.data.loader import PretrainLoader
from ssl_colorize.training.pretext import ResumableSampler, lab_inputs
from ssl_colorize.reference import ReferenceData, ReferenceEncoder
from ssl_colorize.targets import soft_encode

CROP, RESIZE, STRIDE, BATCH = 48, 64, 4, 3


def _small_photos(size: int) -> list[np.ndarray]:
    """The built-in photographs, shorter side ``size`` (small, so the tests stay fast)."""
    out = []
    for array in builtin_photos().values():
        image = Image.fromarray(array)
        scale = size / min(image.size)
        out.append(np.asarray(image.resize((max(size, round(image.size[0] * scale)), max(size, round(image.size[1] * scale))),
                                           Image.BILINEAR)))
    return out


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """JPEG photos (one grey), one PNG, and two undecodable files."""
    root = tmp_path_factory.mktemp("fast_path_images")
    photos = _small_photos(72)
    for i, array in enumerate(photos[:6]):
        Image.fromarray(array).save(root / f"photo_{i}.jpg", format="JPEG", quality=90)
    Image.fromarray(photos[6]).convert("L").save(root / "grey.jpg", format="JPEG", quality=90)
    Image.fromarray(photos[7]).save(root / "lossless.png", format="PNG")
    (root / "garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"not really a jpeg" * 10)
    (root / "empty.jpg").write_bytes(b"")
    return root


def _plain_batches(files: ImageFiles, sampler, batch: int):
    """The plain path, spelled out: decode each file, resize, seeded crop + mirror, stack, then the
    trainer's lab_inputs and soft_encode."""
    items = list(sampler)
    out = []
    for start in range(0, len(items), batch):
        images, skipped = [], []
        for index, seed in items[start : start + batch]:
            try:
                image = read_image(files.paths[index])
            except (RuntimeError, ValueError, OSError):
                skipped.append(str(files.paths[index]))
                continue
            generator = torch.Generator().manual_seed(seed % (2**63))
            images.append(random_crop_flip(resize_shorter(image, RESIZE), CROP, generator))
        images = torch.stack(images)
        L, ab = lab_inputs(images, STRIDE)
        out.append((images, L, ab, soft_encode(ab), skipped))
    return out


def _dense(indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    n, _, h, w = indices.shape
    return torch.zeros(n, 313, h, w, dtype=weights.dtype).scatter_add_(1, indices, weights)


@pytest.mark.parametrize("data_path,workers,targets_on,hand_off", [
    ("workers", 0, "workers", "thread"), ("workers", 1, "workers", "thread"), ("workers", 1, "device", "thread"),
    ("device", 0, "workers", "thread"), ("device", 1, "workers", "thread"), ("device", 1, "workers", "inline")])
def test_fast_path_equals_the_trainers_path(image_folder, data_path, workers, targets_on, hand_off):
    files = ImageFiles(image_folder)
    sampler = ResumableSampler(len(files), BATCH, seed=5)
    loader = PretrainLoader(files, sampler, BATCH, CROP, RESIZE, "cpu", data_path=data_path, workers=workers,
                            targets=TargetSpec(STRIDE), targets_on=targets_on, hand_off=hand_off)
    fast = list(loader)
    plain = _plain_batches(files, sampler, BATCH)
    assert len(fast) == len(plain) == len(loader)
    skipped = []
    for batch, (images, L, ab, (idx, w), plain_skipped) in zip(fast, plain):
        assert torch.equal(batch.images, images)  # the same crops and mirrors, pixel for pixel
        assert batch.L.shape == L.shape and (batch.L - L).abs().max() <= 1e-3
        assert batch.ab.shape == ab.shape and (batch.ab - ab).abs().max() <= 1e-3
        assert torch.equal(batch.encoded[0], idx)
        assert (batch.encoded[1] - w).abs().max() <= 1e-3
        assert sorted(batch.skipped) == sorted(plain_skipped)
        skipped += batch.skipped
    assert sorted(Path(p).name for p in skipped) == ["empty.jpg", "garbage.jpg"]
    assert loader.batches == len(fast) and loader.wait_seconds >= 0


def test_decode_batch_matches_per_file_decoding(image_folder):
    paths = sorted(image_folder.iterdir())
    data = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) if p.stat().st_size else torch.empty(0, dtype=torch.uint8)
            for p in paths]
    decoded = decode_batch(data, "cpu")
    for path, image in zip(paths, decoded):
        if path.name in ("garbage.jpg", "empty.jpg"):
            assert image is None
        else:
            assert torch.equal(image, read_image(path)), path.name
    assert decoded[[p.name for p in paths].index("grey.jpg")].shape[0] == 3  # grey expanded to RGB


def test_lab_and_soft_targets_match_scikit_references(image_folder):
    files = ImageFiles(image_folder)
    sampler = ResumableSampler(len(files), BATCH, seed=11)
    batch = next(iter(PretrainLoader(files, sampler, BATCH, CROP, RESIZE, "cpu", "device", targets=TargetSpec(STRIDE))))
    # Lab: scikit-image on each crop (float64), L at full resolution, ab decimated to the loss grid.
    reference = np.stack([rgb2lab(image.permute(1, 2, 0).numpy()) for image in batch.images]).transpose(0, 3, 1, 2)
    assert np.abs(batch.L.numpy() - reference[:, :1]).max() < 1e-3
    assert np.abs(batch.ab.numpy() - reference[:, 1:, ::STRIDE, ::STRIDE]).max() < 1e-3
    # Soft targets: the released code's scikit-learn path (ball tree over the 313 centres, dense target).
    dense_reference = ReferenceEncoder().encode_dense(reference[:, 1:, ::STRIDE, ::STRIDE])
    dense_ours = _dense(*batch.encoded).numpy()
    assert np.abs(dense_ours - dense_reference).max() < 1e-3
    # The rebalancing weight comes from the nearest bin: ours is indices[:, 0], the reference's the argmax.
    assert (batch.encoded[0][:, 0].numpy() == dense_reference.argmax(1)).mean() > 0.999


def test_reference_crops_are_our_crops(tmp_path):
    """The reference data path (PIL) cuts the same windows: exact on lossless PNGs at the resize size."""
    for i, array in enumerate(_small_photos(RESIZE)[:4]):
        Image.fromarray(array).save(tmp_path / f"p{i}.png", format="PNG")
    files = ImageFiles(tmp_path)
    sampler = ResumableSampler(len(files), 4, seed=3)
    ours = next(iter(PretrainLoader(files, sampler, 4, CROP, RESIZE, "cpu", "workers")))
    reference = ReferenceData(files.paths, CROP, RESIZE, STRIDE, ReferenceEncoder())
    for image, (index, seed) in zip(ours.images, list(sampler)):
        assert np.array_equal(image.permute(1, 2, 0).numpy(), reference.image(files.paths[index], seed))


def test_prepare_targets_is_the_trainers_lab_step():
    images = torch.randint(0, 256, (2, 3, 20, 20), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    L, ab, encoded = prepare_targets(images, TargetSpec(4, k=5, sigma=3.0))
    lab = rgb_to_lab(images.double() / 255)  # the whole image converted, then decimated
    L_ref, ab_ref = lab[:, :1], lab[:, 1:, ::4, ::4]
    assert L.shape == L_ref.shape and (L.double() - L_ref).abs().max() < 1e-4
    assert ab.shape == ab_ref.shape and (ab.double() - ab_ref).abs().max() < 1e-4
    assert all(torch.equal(a, b) for a, b in zip(lab_inputs(images, 4), (L, ab)))  # the trainer's step is this one
    idx, w = soft_encode(ab, k=5, sigma=3.0)
    assert torch.equal(encoded[0], idx) and torch.equal(encoded[1], w)
    assert prepare_targets(images, TargetSpec(4, encode=False))[2] is None
    with pytest.raises(ValueError, match="uint8"):
        prepare_targets(images.float(), TargetSpec(4))
    with pytest.raises(ValueError, match="grid_stride"):
        TargetSpec(0)


def test_resolve_data_path_and_options():
    assert resolve_data_path("auto", "cpu") == "workers"
    assert resolve_data_path("auto", "cpu", cores=1) == "workers"  # no GPU decoder on the CPU
    assert resolve_data_path("device", "cpu") == "device"
    with pytest.raises(ValueError, match="--data-path"):
        resolve_data_path("gpu", "cpu")
    with pytest.raises(ValueError, match="batch_size"):
        PretrainLoader(None, [], 0, CROP, RESIZE, "cpu")


def test_default_workers_follow_the_cores_this_process_may_use(monkeypatch):
    # SLURM's --cpus-per-task confines a job to a CPU set; os.cpu_count() still says the node's cores.
    monkeypatch.setattr(os, "cpu_count", lambda: 128)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)
    assert default_workers() == 3  # one core left to the training process
    assert [default_workers(cores) for cores in (1, 2, 9, 16, 128)] == [0, 1, 8, 8, 8]


def test_early_stop_and_errors_end_the_producer_thread(image_folder):
    import threading

    files = ImageFiles(image_folder)
    before = threading.active_count()
    loader = PretrainLoader(files, ResumableSampler(len(files), 2, seed=0), 2, CROP, RESIZE, "cpu", "device", prefetch=1)
    for _ in loader:
        break  # leaving early must stop the producer, not leave it blocked on a full queue
    assert threading.active_count() == before

    class Exploding(list):
        def __iter__(self):
            yield (0, 1)
            raise OSError("disk gone")

    broken = PretrainLoader(files, Exploding([0, 1]), 1, CROP, RESIZE, "cpu", "device")
    with pytest.raises(RuntimeError, match="disk gone"):
        list(broken)
    assert threading.active_count() == before
