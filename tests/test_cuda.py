"""The CUDA paths compute what the CPU paths compute (skipped without a GPU).

CI has no GPU, so these run on a GPU machine (``pytest -m cuda``): colour conversion, soft encoding and
the loss on the device against float64 CPU references, the device data path (batched nvJPEG decoding,
crops, Lab and targets on the GPU) against the CPU path on the same files, and the trainer end to end
with bf16 autocast, channels-last and both data paths.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_colorize.color import lab_to_rgb, rgb_to_lab
from ssl_colorize.data import ImageFiles, builtin_photos, decode
from ssl_colorize.data.fast_path import (
    TargetSpec,
    decode_batch,
    device_decode_available,
    resolve_data_path,
)
from ssl_colorize.data.loader import PretrainLoader
from ssl_colorize.losses import soft_target_cross_entropy
from ssl_colorize.pretrain import get_args_parser, main
from ssl_colorize.targets import load_prior, rebalance_weights, soft_encode
from ssl_colorize.training.pretext import ResumableSampler

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]
CUDA = torch.device("cuda")


def _random_rgb(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_lab_on_cuda_matches_float64_cpu():
    rgb = _random_rgb(8, 0)
    reference = rgb_to_lab(rgb)
    lab = rgb_to_lab(rgb.float().to(CUDA))
    assert (lab.cpu().double() - reference).abs().max() < 1e-3
    back = lab_to_rgb(lab)
    assert (back.cpu().double() - rgb).abs().max() < 1e-4


def test_soft_encode_on_cuda_equals_cpu():
    g = torch.Generator().manual_seed(1)
    ab = torch.rand(4, 2, 40, 40, generator=g) * 255 - 128  # the whole ab square, table and fall-back
    ab[0, :, :2] = 140.0  # outside the candidate table: the brute-force branch
    idx_cpu, w_cpu = soft_encode(ab)
    idx_gpu, w_gpu = soft_encode(ab.to(CUDA))
    # Ties between equidistant bins may be ranked differently; the neighbour sets and weights may not.
    assert torch.equal(idx_gpu.cpu().sort(1).values, idx_cpu.sort(1).values)
    assert (w_gpu.cpu() - w_cpu).abs().max() < 1e-5


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_loss_and_gradient_on_cuda_match_float64_cpu(dtype, tol):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 313, 12, 12, generator=g, dtype=torch.float64) * 3
    ab = torch.rand(3, 2, 12, 12, generator=g, dtype=torch.float64) * 200 - 100
    weights = rebalance_weights(load_prior()).double()
    image_weights = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)

    ref_logits = logits.clone().requires_grad_()
    ref = soft_target_cross_entropy(ref_logits, ab, weights, image_weights=image_weights)
    ref.backward()

    gpu_logits = logits.to(CUDA, dtype).requires_grad_()
    loss = soft_target_cross_entropy(gpu_logits, ab.float().to(CUDA), weights.float().to(CUDA),
                                     image_weights=image_weights.to(CUDA))
    loss.backward()
    assert abs(loss.item() - ref.item()) / abs(ref.item()) < tol
    grad, ref_grad = gpu_logits.grad.double().cpu(), ref_logits.grad
    assert (grad - ref_grad).norm() / ref_grad.norm() < tol


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cuda_jpegs")
    for i, array in enumerate(builtin_photos().values()):
        image = Image.fromarray(array)
        scale = 96 / min(image.size)
        image = image.resize((max(96, round(image.size[0] * scale)), max(96, round(image.size[1] * scale))), Image.BILINEAR)
        image.save(root / f"photo_{i}.jpg", format="JPEG", quality=90)
        if i == 9:
            break
    (root / "garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"not really a jpeg" * 10)
    return root


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.double() - b.double()).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def test_nvjpeg_is_available_and_auto_follows_the_cores():
    assert device_decode_available("cuda"), "this torchvision cannot decode JPEGs on the GPU"
    assert resolve_data_path("auto", CUDA, cores=4) == "device"
    assert resolve_data_path("auto", CUDA, cores=16) == "workers"


def test_batched_device_decode_is_close_to_the_cpu_decoder(jpeg_folder):
    paths = sorted(jpeg_folder.glob("photo_*.jpg"))
    data = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in paths]
    on_gpu = decode_batch(data, CUDA)
    on_cpu = decode_batch(data, "cpu")
    for path, g, c in zip(paths, on_gpu, on_cpu):
        assert g.device.type == "cuda" and g.shape == c.shape, path.name
        # nvJPEG's IDCT and chroma upsampling are not libjpeg-turbo's: measured on an H100, 1.9 levels
        # apart on average, 36 at most on a sharp colour edge. The same picture: PSNR well above 30 dB.
        assert _psnr(g.cpu(), c) > 35.0, (path.name, _psnr(g.cpu(), c))


@pytest.mark.parametrize("backend", [
    "torchvision",
    pytest.param("torchcodec", marks=pytest.mark.skipif(not decode.torchcodec_available(),
                                                         reason="torchcodec is not installed")),
])
def test_each_decoder_backend_decodes_batches_on_the_gpu(jpeg_folder, backend):
    """TorchCodec's batched nvJPEG where installed, torchvision's otherwise: both give the CPU picture."""
    paths = sorted(jpeg_folder.glob("photo_*.jpg"))
    data = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in paths]
    decode.set_backend(backend)
    try:
        on_gpu = decode.decode_jpegs(data, CUDA)
        on_cpu = [decode.decode_rgb(d) for d in data]
    finally:
        decode.set_backend(None)
    for path, g, c in zip(paths, on_gpu, on_cpu):
        assert g.device.type == "cuda" and g.dtype == torch.uint8 and g.shape == c.shape, path.name
        assert _psnr(g.cpu(), c) > 35.0, (path.name, backend, _psnr(g.cpu(), c))


@pytest.mark.parametrize("data_path,hand_off,targets_on", [
    ("device", "thread", "workers"), ("workers", "thread", "workers"), ("device", "inline", "workers"),
    ("workers", "inline", "workers"), ("workers", "thread", "device"), ("workers", "inline", "device")])
def test_cuda_loader_matches_the_cpu_loader(jpeg_folder, data_path, hand_off, targets_on):
    files = ImageFiles(jpeg_folder)
    spec = TargetSpec(grid_stride=4)
    sampler = ResumableSampler(len(files), 4, seed=3)
    cpu = list(PretrainLoader(files, sampler, 4, 64, 80, "cpu", data_path="workers", workers=0, targets=spec))
    gpu = list(PretrainLoader(files, sampler, 4, 64, 80, CUDA, data_path=data_path, workers=1,
                              channels_last=True, targets=spec, hand_off=hand_off, targets_on=targets_on))
    assert len(cpu) == len(gpu)
    for c, g in zip(cpu, gpu):
        assert g.L.device.type == "cuda" and g.L.is_contiguous(memory_format=torch.channels_last)
        assert sorted(Path(p).name for p in g.skipped) == sorted(Path(p).name for p in c.skipped)
        if data_path == "workers":  # the same decoder: the same pixels, targets to float32 rounding
            assert torch.equal(g.images.cpu(), c.images)
            assert (g.L.cpu() - c.L).abs().max() < 1e-3
            assert (g.encoded[1].cpu() - c.encoded[1]).abs().max() < 1e-3
        else:  # nvJPEG: pixels a few levels apart, so L within about a level of lightness on average
            assert _psnr(g.images.cpu(), c.images) > 35.0
            assert (g.L.cpu() - c.L).abs().mean() < 1.0
        # Targets are a function of ab, whichever decoder: re-encoding the batch's own ab gives them.
        idx, w = soft_encode(g.ab)
        assert torch.equal(idx.sort(1).values, g.encoded[0].sort(1).values)
        assert (w - g.encoded[1]).abs().max() < 1e-5


@pytest.mark.parametrize("data_path,hand_off,targets_on", [
    ("device", "thread", "workers"), ("workers", "thread", "workers"), ("workers", "inline", "device")])
def test_trainer_runs_and_resumes_on_cuda(tmp_path, data_path, hand_off, targets_on):
    """Stop at step 3 and resume: the log runs 1..6 and its losses are the uninterrupted run's, to the
    GPU's nondeterminism (cuDNN's weight gradients, bf16): the same batches, the same crops."""
    common = ["--device", "cuda", "--crop", "64", "--resize", "72", "--batch-size", "8", "--workers", "2",
              "--no-progress", "--log-every", "1", "--data-path", data_path, "--hand-off", hand_off,
              "--targets-on", targets_on, "--steps", "6", "--ckpt-every", "3"]
    full = main(get_args_parser().parse_args([*common, "--out", str(tmp_path / "full")]))
    main(get_args_parser().parse_args([*common, "--out", str(tmp_path / "run"), "--stop-after", "3"]))
    result = main(get_args_parser().parse_args([*common, "--out", str(tmp_path / "run"), "--resume"]))
    log = [json.loads(line) for line in (Path(result["out"]) / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    losses = np.array([r["loss"] for r in log])
    assert np.isfinite(losses).all() and losses.min() > 0
    full_log = [json.loads(line) for line in (Path(full["out"]) / "log.jsonl").read_text().splitlines()]
    np.testing.assert_allclose(losses, [r["loss"] for r in full_log], rtol=2e-2)
    config = json.loads((Path(result["out"]) / "config.json").read_text())
    assert config["device"].startswith("cuda") and config["data_path"] == data_path
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_trainer_compiled_with_cuda_graphs(tmp_path):
    """--compile reduce-overhead (CUDA graphs): the same run trains, and its checkpoint loads."""
    from ssl_colorize.checkpoint import load_encoder

    args = ["--device", "cuda", "--crop", "64", "--resize", "72", "--batch-size", "8", "--workers", "2",
            "--no-progress", "--log-every", "1", "--steps", "8", "--compile", "reduce-overhead",
            "--out", str(tmp_path / "run")]
    result = main(get_args_parser().parse_args(args))
    log = [json.loads(line) for line in (Path(result["out"]) / "log.jsonl").read_text().splitlines()]
    losses = np.array([r["loss"] for r in log])
    assert len(losses) == 8 and np.isfinite(losses).all()
    model = load_encoder(Path(result["out"]) / "checkpoint.pth")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    shutil.rmtree(tmp_path, ignore_errors=True)
