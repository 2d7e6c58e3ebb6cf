"""The released FCN segmentation recipe (issue 13): SBD's on-disk layout, the shipped seg11valid list, the
recipe's values, gradient accumulation (Caffe's iter_size), the released upsampling, a short released
run end to end, and the bad inputs that must stop it before any training."""

import hashlib
import json
import re
import shutil
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat
from torch import nn

from ssl_colorize.benchmarks import voc_segmentation as seg_bench
from ssl_colorize.engine import segmentation_recipe
from ssl_colorize.data.voc_segmentation import (
    SBDLayoutError, VOCSegmentation, check_sbd, load_sbd_split, read_mask, seg11valid_file,
)
from ssl_colorize.engine.finetune import accumulate_gradients, caffe_param_groups, multistep_lr
from ssl_colorize.heads.segmentation import FCN32s
from ssl_colorize.models import create_model
from ssl_colorize.results import read_rows
from ssl_colorize.voc_metrics import ConfusionMatrix
from voc_testing import common, make_small_voc

REPO = Path(__file__).resolve().parent.parent


def write_sbd(root: Path, masks: dict[str, np.ndarray], train: list[str], val: list[str]) -> Path:
    """SBD as released (benchmark_RELEASE/dataset): img/<id>.jpg, cls/<id>.mat holding the struct GTcls
    (Segmentation, Boundaries, CategoriesPresent), train.txt, val.txt."""
    dataset = root / "benchmark_RELEASE" / "dataset"
    (dataset / "img").mkdir(parents=True)
    (dataset / "cls").mkdir()
    rng = np.random.default_rng(0)
    for image_id, mask in masks.items():
        Image.fromarray(rng.integers(0, 256, (*mask.shape, 3), dtype=np.uint8)).save(dataset / "img" / f"{image_id}.jpg")
        present = np.unique(mask[mask > 0]).astype(np.uint8)
        boundaries = np.empty((20, 1), dtype=object)  # a 20 x 1 cell of per-class boundary maps
        for c in range(20):
            boundaries[c, 0] = np.zeros(mask.shape, dtype=np.uint8)
        savemat(dataset / "cls" / f"{image_id}.mat",
                {"GTcls": {"Segmentation": mask, "Boundaries": boundaries, "CategoriesPresent": present}})
    (dataset / "train.txt").write_text("".join(f"{i}\n" for i in train))
    (dataset / "val.txt").write_text("".join(f"{i}\n" for i in val))
    return dataset


def test_sbd_fixture_in_sbds_layout_is_read_pixel_for_pixel(tmp_path):
    rng = np.random.default_rng(1)
    masks = {f"2008_{i:06d}": rng.integers(0, 21, (7 + i, 11 + 2 * i), dtype=np.uint8) for i in range(1, 5)}
    ids = list(masks)
    write_sbd(tmp_path, masks, train=ids[:3], val=ids[2:])  # 2008_000003 in both: read once
    assert check_sbd(tmp_path) == tmp_path / "benchmark_RELEASE" / "dataset"
    records, report = load_sbd_split(tmp_path)
    assert [r.image_id for r in records] == ids and report.total == 0
    for index, rec in enumerate(records):
        np.testing.assert_array_equal(read_mask(rec.mask_path), masks[rec.image_id])
        image, mask, _ = VOCSegmentation(records)[index]
        np.testing.assert_array_equal(mask.numpy(), masks[rec.image_id])
        assert tuple(image.shape) == (3, *masks[rec.image_id].shape)


def test_shipped_seg11valid_list_matches_its_provenance():
    path = seg11valid_file()
    data = path.read_bytes()
    ids = data.decode().split()
    assert len(ids) == 736 and len(set(ids)) == 736
    assert all(re.fullmatch(r"20(0[7-9]|1[01])_\d{6}", i) for i in ids)  # VOC2007..2011 segmentation ids
    assert ids == sorted(ids) and data.endswith(b"\n")
    provenance = (path.parent / "PROVENANCE.md").read_text()
    section = provenance[provenance.index("## seg11valid.txt"):]
    assert hashlib.sha256(data).hexdigest() in section
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert any(fnmatch("resources/seg11valid.txt", pattern) for pattern in package_data["ssl_colorize"])


def test_released_recipe_resolves_to_the_traced_values():
    args = seg_bench.get_args_parser().parse_args(["--data", "somewhere"])
    recipe = segmentation_recipe.apply_recipe(args, builtin=False)
    assert recipe is segmentation_recipe.RELEASED and args.recipe == "released"
    assert (args.lr, args.batch_size, args.accumulate, args.crop, args.clip_grad) == (1e-4, 1, 20, None, 0.0)
    assert (args.momentum, args.weight_decay, args.bias_rule, args.year, args.dropout) == (0.9, 5e-4, "caffe", 2011, 0.5)
    assert Path(args.eval_ids) == seg11valid_file()
    assert (recipe.iters, recipe.milestones, recipe.gamma) == (150_000, (50_000, 100_000), 0.1)
    # the built-in data: the quick recipe; an option given overrides either recipe
    quick = seg_bench.get_args_parser().parse_args(["--lr", "0.5"])
    assert segmentation_recipe.apply_recipe(quick, builtin=True) is segmentation_recipe.QUICK
    assert (quick.lr, quick.batch_size, quick.crop, quick.eval_ids, quick.year) == (0.5, 8, 320, None, 2012)

    # lr 1e-4 -> 1e-5 -> 1e-6 at 50k and 100k of 150k; biases at 2 x lr without weight decay
    layer = nn.Conv2d(2, 3, 1)
    groups = caffe_param_groups(layer.named_parameters(), 1e-4, 5e-4)
    assert [g["params"][0] is p for g, p in zip(groups, (layer.weight, layer.bias))] == [True, True]
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(1e-4, 5e-4), (2e-4, 0.0)]
    optimizer = torch.optim.SGD(groups, lr=1e-4, momentum=0.9)
    schedule = multistep_lr(optimizer, 150_000, 150_000, (50_000, 100_000), 0.1)
    factors = [schedule.lr_lambdas[0](it) for it in (0, 49_999, 50_000, 99_999, 100_000, 149_999)]
    np.testing.assert_allclose(factors, [1, 1, 0.1, 0.1, 0.01, 0.01])


def test_accumulated_micro_batches_give_the_gradient_of_one_batch():
    torch.manual_seed(0)
    x, target = torch.randn(4, 3), torch.randn(4, 2)
    model = nn.Linear(3, 2)

    def step(batch):
        inputs, wanted = batch
        return 0.5 * ((model(inputs) - wanted) ** 2).sum(1).mean()  # per-image loss averaged over the batch

    model.zero_grad()
    losses = accumulate_gradients(step, iter([(x[i:i + 1], target[i:i + 1]) for i in range(4)]), 4)
    accumulated = [p.grad.clone() for p in model.parameters()]
    # by hand: d/dW of mean_i 0.5 |W x_i + b - t_i|^2 = mean_i (W x_i + b - t_i) x_i^T
    with torch.no_grad():
        residual = model(x) - target
    torch.testing.assert_close(accumulated[0], residual.T @ x / 4)
    torch.testing.assert_close(accumulated[1], residual.mean(0))
    model.zero_grad()
    step((x, target)).backward()
    for mine, whole in zip(accumulated, (p.grad for p in model.parameters())):
        torch.testing.assert_close(mine, whole)
    assert len(losses) == 4 and np.mean(losses) == pytest.approx(step((x, target)).item(), rel=1e-6)


def test_upsampling_is_the_released_bilinear_deconvolution_and_crop():
    """FCN32s against Caffe's ``upsample`` (Deconvolution, kernel 63, stride 32, bilinear weights) followed
    by ``crop`` (offset 18 = 31, the kernel centre, minus 13, where fc7 cell 0 sits in the unpadded image)."""
    encoder = create_model("alexnet_lab", geometry="transfer").eval()
    model = FCN32s(encoder, "fc7", pad=100, pad_values=(50.0,), dropout=0.0).eval()
    scores = torch.randn(1, 21, 3, 4)
    model.score = nn.Identity()
    model.encoder = type("Fixed", (nn.Module,), {"forward_taps": lambda self, x, taps: {"fc7": scores}})()
    height, width = 70, 130
    with torch.no_grad():
        ours = model(torch.zeros(1, 1, height, width))
    ramp = 1 - (torch.arange(63, dtype=torch.float32) - 31).abs() / 32
    deconv = nn.ConvTranspose2d(21, 21, 63, stride=32, groups=21, bias=False)
    deconv.weight.data[:] = (ramp[:, None] * ramp[None, :])[None, None]
    with torch.no_grad():
        reference = deconv(scores)[:, :, 18:18 + height, 18:18 + width]
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def voc11(tmp_path_factory):
    """The small fixture (VOC2012 + SBD) with its VOC2012 copied as VOC2011, the released recipe's year."""
    voc = make_small_voc(tmp_path_factory.mktemp("voc11"))
    shutil.copytree(voc.devkit / "VOC2012", voc.devkit / "VOC2011")
    return voc


def test_released_recipe_runs_end_to_end_on_voc2011_and_sbd(voc11, tmp_path, monkeypatch):
    val = (voc11.devkit / "VOC2011" / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    shipped = tmp_path / "list" / "seg11valid.txt"  # stands in for the shipped list (the fixture's ids)
    shipped.parent.mkdir()
    shipped.write_text("\n".join(val[:3]) + "\n")
    monkeypatch.setattr(segmentation_recipe, "seg11valid_file", lambda: shipped)
    summary = seg_bench.cli(common(voc11, tmp_path, "--sbd", voc11.root, "--iters", 4, "--log-every", 1,
                                   "--encoder", "alexnet_rgb_torchvision"))  # conv5 FCN: the cheapest
    rows = read_rows(tmp_path / "voc.csv")
    assert set(rows["split"]) == {"seg11valid"} and set(rows["dataset"]) == {"voc2011"}
    hparams = json.loads(rows["hparams"].iloc[0])
    assert {k: hparams[k] for k in ("recipe", "batch_size", "accumulate", "crop", "lr", "bias_rule", "sbd")} == {
        "recipe": "released", "batch_size": 1, "accumulate": 20, "crop": "whole", "lr": 1e-4, "bias_rule": "caffe",
        "sbd": True}
    assert hparams["eval_images"] == 3 and np.isfinite(summary["metrics"]["mIoU"])
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    # the lr after each of the 4 updates: milestones 50k / 100k of 150k scaled to 4 updates are 1 and 3
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    np.testing.assert_allclose([r["lr"] for r in log], [1e-5, 1e-5, 1e-6, 1e-6])
    state = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=False)
    assert state["accumulate"] == 20 and state["data_state"]["batches_drawn"] == 80


def refused(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        seg_bench.cli(list(map(str, argv)))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    err = err.split("\r")[-1].strip()  # after the loaders' progress bars, which clear themselves (leave=False)
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_bad_sbd_and_eval_lists_stop_before_any_training(voc11, tmp_path, capsys):
    base = common(voc11, tmp_path)
    assert f"--sbd {tmp_path / 'nope'}: no such folder" in refused(base + ["--sbd", tmp_path / "nope"], capsys)
    assert "--sbd" in refused(base + ["--sbd", voc11.devkit], capsys)  # a folder, but not SBD's layout
    # the shipped seg11valid list on a devkit without those images: the list and its first id named
    err = refused(base + ["--sbd", voc11.root], capsys)
    assert "seg11valid" in err and "2007_000033" in err
    # whole images of different sizes cannot share a batch
    assert "--batch-size 2" in refused(base + ["--batch-size", 2], capsys)

    # a cls/*.mat without GTcls.Segmentation: the first listed one (checked up front) ...
    sbd = tmp_path / "sbd"
    shutil.copytree(voc11.sbd.parent, sbd / voc11.sbd.parent.name)
    dataset = sbd / voc11.sbd.parent.name / voc11.sbd.name
    first = (dataset / "train.txt").read_text().split()[0]
    original = (dataset / "cls" / f"{first}.mat").read_bytes()
    savemat(dataset / "cls" / f"{first}.mat", {"GTinst": {"Segmentation": np.zeros((4, 4), np.uint8)}})
    with pytest.raises(SBDLayoutError, match="GTcls.Segmentation"):
        read_mask(dataset / "cls" / f"{first}.mat")
    ids = tmp_path / "ids.txt"
    ids.write_text("\n".join((voc11.devkit / "VOC2011" / "ImageSets" / "Segmentation" / "val.txt").read_text().split()))
    quick = common(voc11, tmp_path, "--year", 2012, "--recipe", "quick", "--eval-ids", ids, "--sbd", sbd)
    assert f"{first}.mat" in refused(quick, capsys)
    # ... and a later one (read with every mask before training, before the run folder exists)
    (dataset / "cls" / f"{first}.mat").write_bytes(original)
    last = (dataset / "val.txt").read_text().split()[-1]
    savemat(dataset / "cls" / f"{last}.mat", {"other": np.zeros(3)})
    err = refused(quick, capsys)
    assert f"{last}.mat" in err and "GTcls.Segmentation" in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "voc.csv").exists()


def test_rescale_starts_from_the_rescaled_model_as_released(voc11, tmp_path):
    """solve.py starts from ``alexnet_release_450000_nobn_rs.caffemodel``: BatchNorm absorbed and rescaled
    (``--rescale``; on by default for pretrained checkpoints, asked for here on a random one)."""
    summary = seg_bench.cli(common(voc11, tmp_path, "--recipe", "quick", "--year", 2012, "--rescale",
                                   "--rescale-batches", 1, "--iters", 1, "--batch-size", 1, "--crop", 64))
    hparams = json.loads(read_rows(tmp_path / "voc.csv")["hparams"].iloc[0])
    assert hparams["rescale"] is True
    # one batch of random crops of the training images (the fixture has fewer than a batch of 16)
    assert summary["rescale"]["images"] == min(segmentation_recipe.RESCALE_BATCH_SIZE, hparams["train_images"])
    assert summary["rescale"]["absorbed_batchnorms"] and summary["rescale"]["layers"][-1] == "top"


def test_result_rows_from_a_hand_computed_confusion_matrix():
    """Ground truth [0 0 1 1 255], prediction [0 1 1 1 0]: class 0 TP 1 FN 1 -> IoU 1/2, class 1 TP 2 FP 1
    -> IoU 2/3, the ignored pixel left out (pixel accuracy 3/4), the other 19 classes absent."""
    confusion = ConfusionMatrix()
    confusion.update(torch.tensor([0, 1, 1, 1, 0]), torch.tensor([0, 0, 1, 1, 255]))
    rows = []
    run = type("Rows", (), {"row": lambda self, **row: rows.append(row)})()
    metrics = segmentation_recipe.add_result_rows(run, confusion, tap="all", dataset="voc2011", split="seg11valid",
                                                  protocol="fcn32s", hparams={"recipe": "released"})
    assert metrics["mIoU"] == pytest.approx(100 * (1 / 2 + 2 / 3) / 2)
    assert metrics["pixel_accuracy"] == pytest.approx(75.0)
    assert (metrics["IoU_background"], metrics["IoU_aeroplane"]) == pytest.approx((50.0, 200 / 3))
    assert [r["metric"] for r in rows[:3]] == ["mIoU", "pixel_accuracy", "IoU_background"] and len(rows) == 23
    assert all(r["hparams"] == {"recipe": "released", "classes_present": 2} and r["dataset"] == "voc2011"
               for r in rows)
