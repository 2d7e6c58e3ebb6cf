"""ssl_colorize.benchmarks.colorization_quality end to end on the built-in photographs, and ssl_colorize.inference.

Small everywhere (64 px crops, the 10 built-in photographs, a random colornet) so the file runs in
well under two minutes on a 2-core CPU.
"""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from ssl_colorize.benchmarks import colorization_quality as cq
from ssl_colorize.checkpoint import save_checkpoint
from ssl_colorize.engine.cli import UsageError
from ssl_colorize.quality import classify
from ssl_colorize.results import read_rows
from ssl_colorize.color import rgb_to_lab
from ssl_colorize.data import ImageFiles, center_crop, ensure_builtin_photos, read_image, resize_shorter
from ssl_colorize.inference import colorize_tensor, load_colorizer, predict_ab, predict_grid, upsample_ab
from ssl_colorize.metrics import auc, colourfulness, rebalanced_auc
from ssl_colorize.models import create_model
from ssl_colorize.targets import annealed_mean, grey_mask, load_prior

SIZE = 64


def _run(tmp_path, *extra, name="run"):
    out_csv = tmp_path / f"{name}.csv"
    args = cq.get_args_parser().parse_args(
        ["--size", str(SIZE), "--out", str(tmp_path / name), "--out-csv", str(out_csv), "--device", "cpu",
         "--run-id", name, "--published", "none", *extra]
    )
    rows = cq.main(args)
    return rows, read_rows(out_csv)


def _value(table, encoder, metric, protocol=None):
    sel = table[(table.encoder == encoder) & (table.metric == metric)]
    if protocol is not None:
        sel = sel[sel.protocol == protocol]
    assert len(sel) == 1, (encoder, metric, protocol, sel)
    return float(sel.value.iloc[0])


def _save_colornet(folder: Path, loss: str, **kwargs) -> Path:
    """A checkpoint in the pretrainer's format (model spec, weights, config with the loss)."""
    torch.manual_seed(0)
    model = create_model("colornet", **kwargs)
    path = folder / loss / "checkpoint.pth"
    save_checkpoint(path, {"model": model.model_spec, "state_dict": model.state_dict(), "step": 7,
                           "config": {"loss": loss}, "version": 1})
    return path


@pytest.fixture(scope="module")
def colornet_checkpoint(tmp_path_factory):
    return _save_colornet(tmp_path_factory.mktemp("ckpt"), "rebalanced")


@pytest.fixture(scope="module")
def l2_checkpoint(tmp_path_factory):
    return _save_colornet(tmp_path_factory.mktemp("ckpt"), "l2", out_channels=2)


def _builtin_crops():
    dataset = ImageFiles(ensure_builtin_photos())
    crops = torch.stack([center_crop(resize_shorter(read_image(p), SIZE), SIZE) for p in dataset.paths])
    return dataset, crops


# ------------------------------------------------------------------------------------------ inference
def test_upsample_keeps_grid_values_at_their_pixels():
    grid = torch.randn(2, 2, 5, 6)
    up = upsample_ab(grid, 4, (20, 24))
    assert up.shape == (2, 2, 20, 24)
    # Cell j of the loss grid is input pixel 4 j (targets.decimate): those pixels keep the grid's value.
    assert torch.allclose(up[..., ::4, ::4], grid, atol=1e-6)
    # Pixels past the last cell repeat it; midway pixels are the average of their two neighbours.
    assert torch.allclose(up[..., 17:, :][..., ::4], grid[..., 4:5, :].expand(-1, -1, 3, -1), atol=1e-6)
    assert torch.allclose(up[..., 2, 0], (grid[..., 0, 0] + grid[..., 1, 0]) / 2, atol=1e-6)


def test_predict_ab_313_way_and_l2_heads():
    torch.manual_seed(0)
    model = create_model("colornet").eval()
    L = torch.rand(3, 1, 32, 40) * 100
    ab = predict_ab(model, L, temperature=0.38, batch_size=2)
    assert ab.shape == (3, 2, 32, 40)
    with torch.no_grad():
        logits = model(L)  # colornet's logits are natively on the 1/4 grid
    expected = upsample_ab(annealed_mean(logits, 0.38), 4, (32, 40))
    assert torch.allclose(ab, expected, atol=1e-4)
    # Batching does not change the result.
    assert torch.allclose(predict_ab(model, L, batch_size=3), ab, atol=1e-4)
    # The recolorized image keeps the input's L (up to the sRGB clip).
    rgb = colorize_tensor(model, L)
    assert rgb.shape == (3, 3, 32, 40) and float(rgb.min()) >= 0 and float(rgb.max()) <= 1

    # An L2-trained head outputs ab itself (2 channels): passed through, no temperature.
    model.head = torch.nn.Conv2d(256, 2, 1)
    with torch.no_grad():
        direct = model(L)
    for t in (0.1, 1.0):
        assert torch.allclose(predict_ab(model, L, temperature=t), upsample_ab(direct, 4, (32, 40)), atol=1e-5)

    model.head = torch.nn.Conv2d(256, 5, 1)
    with pytest.raises(ValueError, match="expected"):
        predict_grid(model, L)
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        predict_ab(model, torch.rand(1, 3, 8, 8))


# -------------------------------------------------------------------------------------- end to end
def test_end_to_end_on_builtin_photographs(tmp_path, colornet_checkpoint, l2_checkpoint, capsys):
    temps = "0.05,0.38,1.0"
    published = tmp_path / "published.csv"
    published.write_text(
        "method,benchmark,dataset,encoder,tap,metric,value,protocol,tag,source,note\n"
        "grey,colorization_quality,imagenet,colornet,output,auc_raw,89.1,,as published,paper,\n"
        "L2 regression,colorization_quality,imagenet,colornet,output,auc_rebalanced,64.4,,as published,paper,\n"
    )
    rows, table = _run(tmp_path, "--checkpoint", str(colornet_checkpoint), str(l2_checkpoint),
                       "--temperatures", temps, "--seed", "3", "--num-examples", "3", "--published", str(published))
    assert len(rows) == len(table)
    assert set(table.benchmark) == {"colorization_quality"}
    encoders = set(table.encoder)
    assert {"ground_truth", "grey", "random_colours", "colornet"} <= encoders
    # The Table-1 view puts the paper's numbers beside ours, matched by method.
    printed = capsys.readouterr().out
    grey_line = next(line for line in printed.splitlines() if line.startswith("grey "))
    assert "89.1" in grey_line.split()
    l2_line = next(line for line in printed.splitlines() if line.startswith("colornet l2 (l2)"))
    assert "64.4" in l2_line.split()
    # The L2 head (2 channels) has its main rows but no temperature sweep.
    l2_rows = table[table.checkpoint == str(l2_checkpoint)]
    assert set(l2_rows.protocol) == {"annealed_mean"} and len(l2_rows) == 3
    assert json.loads(l2_rows.hparams.iloc[0])["paper_method"] == "L2 regression"
    table = table[table.checkpoint != str(l2_checkpoint)]

    # Independent recomputation on the same crops with the library's metrics.
    dataset, crops = _builtin_crops()
    rgb = crops.float() / 255.0
    lab = rgb_to_lab(rgb)
    keep = ~grey_mask(lab[:, 1:])
    L, gt = lab[keep, :1], lab[keep, 1:]
    prior = load_prior()
    hparams = json.loads(table.hparams.iloc[0])
    assert hparams["images"] == int(keep.sum()) and hparams["grey_skipped"] == int((~keep).sum())

    assert _value(table, "ground_truth", "auc_raw") == pytest.approx(100.0)
    assert _value(table, "ground_truth", "auc_rebalanced") == pytest.approx(100.0)
    grey = torch.zeros_like(gt)
    assert _value(table, "grey", "auc_raw") == pytest.approx(auc(grey, gt), abs=1e-6)
    assert _value(table, "grey", "auc_rebalanced") == pytest.approx(rebalanced_auc(grey, gt, prior), abs=1e-6)
    assert _value(table, "grey", "colourfulness") == pytest.approx(0.0, abs=0.05)  # float32 Lab -> RGB round-off
    assert _value(table, "ground_truth", "colourfulness") == pytest.approx(
        float(colourfulness(rgb[keep]).mean()), rel=1e-3)

    # Random colours, as documented: a seeded random order, each image takes the previous image's ab.
    order = [i for i in torch.randperm(len(dataset), generator=torch.Generator().manual_seed(3)).tolist()
             if bool(keep[i])]
    donors = torch.stack([lab[order[k - 1], 1:] for k in range(len(order))])
    targets = torch.stack([lab[i, 1:] for i in order])
    assert _value(table, "random_colours", "auc_raw") == pytest.approx(auc(donors, targets), abs=1e-6)
    assert _value(table, "random_colours", "auc_rebalanced") == pytest.approx(
        rebalanced_auc(donors, targets, prior), abs=1e-6)

    # The checkpoint's rows: the same numbers as predicting all images at once and scoring them.
    colorizer = load_colorizer(str(colornet_checkpoint))
    assert colorizer.label == "colornet rebalanced (rebalanced)"
    pred = predict_ab(colorizer.model, L, temperature=0.38)
    assert _value(table, "colornet", "auc_raw", "annealed_mean") == pytest.approx(auc(pred, gt), abs=1e-3)
    assert _value(table, "colornet", "auc_rebalanced", "annealed_mean") == pytest.approx(
        rebalanced_auc(pred, gt, prior), abs=1e-3)
    pred_1 = predict_ab(colorizer.model, L, temperature=1.0)
    assert _value(table, "colornet", "auc_raw", "temperature_sweep:T=1") == pytest.approx(auc(pred_1, gt), abs=1e-3)
    sweep = table[table.protocol.str.startswith("temperature_sweep")]
    assert len(sweep) == 3 * 3  # three temperatures x (raw, rebalanced, colourfulness)
    assert {json.loads(h)["temperature"] for h in sweep.hparams} == {0.05, 0.38, 1.0}

    # No classifier weights: no classifier rows, and the PNGs are real images.
    assert not any(metric.endswith("_top1") for metric in table.metric)
    for name, min_width in (("examples.png", 300), ("temperature_sweep.png", 600)):
        with Image.open(tmp_path / "run" / name) as image:
            assert image.width >= min_width and image.height > 100


def test_classifier_rows_with_a_local_random_state_dict(tmp_path):
    import torchvision

    torch.manual_seed(0)
    weights = tmp_path / "mobilenet.pth"
    torch.save(torchvision.models.get_model("mobilenet_v3_small", weights=None).state_dict(), weights)
    common = ("--classifier", "mobilenet_v3_small", "--classifier-weights", str(weights),
              "--classifier-size", "64", "--temperatures", "none")

    # Built-in photographs have no ImageNet labels: agreement with the top-1 on the original image.
    _, table = _run(tmp_path, *common, name="agree")
    top1 = table[table.metric == "mobilenet_v3_small_top1"]
    assert set(top1.protocol) == {"classifier_top1_agreement_with_original"}
    assert _value(table, "ground_truth", "mobilenet_v3_small_top1") == pytest.approx(100.0)
    n = json.loads(top1.hparams.iloc[0])["images"]
    for value in top1.value:
        assert 0.0 <= value <= 100.0 and round(value * n / 100.0, 6).is_integer()

    # An ImageFolder of ImageNet synsets with a class-index file: accuracy against the labels.
    photos = sorted(ensure_builtin_photos().glob("*.jpg"))[:4]
    for k, path in enumerate(photos):
        folder = tmp_path / "imagenet" / ("n01440764" if k % 2 == 0 else "n01443537")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / path.name).write_bytes(path.read_bytes())
    index = tmp_path / "synsets.txt"
    index.write_text("\n".join(["n01443537", "n01440764"] + [f"n9{i:07d}" for i in range(998)]) + "\n")
    _, table = _run(tmp_path, *common, "--data", str(tmp_path / "imagenet"), "--class-index", str(index),
                    name="labels")
    top1 = table[table.metric == "mobilenet_v3_small_top1"]
    assert set(top1.protocol) == {"classifier_top1_imagenet_labels"}
    # Independent check of the ground-truth row: the classifier on the original crops vs the labels.
    model = torchvision.models.get_model("mobilenet_v3_small", weights=None)
    model.load_state_dict(torch.load(weights))
    model.eval()
    dataset = ImageFiles(tmp_path / "imagenet")
    crops = torch.stack([center_crop(resize_shorter(read_image(p), SIZE), SIZE) for p in dataset.paths]).float() / 255
    with torch.no_grad():
        predicted = classify(model, crops, 64)
    labels = torch.tensor([{"n01443537": 0, "n01440764": 1}[dataset.classes[l]] for l in dataset.labels])
    expected = 100.0 * float((predicted == labels).float().mean())
    assert _value(table, "ground_truth", "mobilenet_v3_small_top1") == pytest.approx(expected, abs=1e-6)


# ------------------------------------------------------------------------------------------ bad input
def _write_images(folder: Path, arrays, names=None):
    folder.mkdir(parents=True, exist_ok=True)
    for k, array in enumerate(arrays):
        Image.fromarray(array).save(folder / (names[k] if names else f"img{k}.png"))


def test_greyscale_only_folder_fails_naming_it(tmp_path):
    rng = np.random.default_rng(0)
    grey = [np.repeat(rng.integers(0, 255, (80, 80, 1), dtype=np.uint8), 3, axis=2) for _ in range(3)]
    _write_images(tmp_path / "grey_photos", grey)
    with pytest.raises(UsageError, match=r"no colour to score in .*grey_photos.*3 readable images are greyscale"):
        _run(tmp_path, "--data", str(tmp_path / "grey_photos"), "--temperatures", "none")


def test_small_unreadable_and_single_images(tmp_path, capsys):
    rng = np.random.default_rng(1)
    colour = lambda size: rng.integers(0, 255, (size, size, 3), dtype=np.uint8)  # noqa: E731
    folder = tmp_path / "mixed"
    _write_images(folder, [colour(80), colour(80), colour(40)], ["a.png", "b.png", "small.png"])
    (folder / "broken.jpg").write_bytes(b"not a jpeg at all")

    # Default: the small image is upscaled (and said so), the broken file skipped and counted.
    _, table = _run(tmp_path, "--data", str(folder), "--temperatures", "none", name="upscale")
    hparams = json.loads(table.hparams.iloc[0])
    assert (hparams["images"], hparams["small"], hparams["unreadable"]) == (3, 1, 1)
    err = capsys.readouterr().err
    assert "upscaled 1 image(s)" in err and "small.png" in err and "broken.jpg" in err

    # --small-images skip: two images left.
    _, table = _run(tmp_path, "--data", str(folder), "--temperatures", "none", "--small-images", "skip", name="skip")
    assert json.loads(table.hparams.iloc[0])["images"] == 2

    # A single colour image: no donor for the random-colours baseline, which is skipped with a message.
    single = tmp_path / "single"
    _write_images(single, [colour(80)])
    _, table = _run(tmp_path, "--data", str(single), "--temperatures", "none", name="single")
    assert "random_colours" not in set(table.encoder)
    assert "random-colours baseline needs two" in capsys.readouterr().err

    # Only small images, all skipped: an error naming the folder and the reason.
    tiny = tmp_path / "tiny"
    _write_images(tiny, [colour(20), colour(20)])
    with pytest.raises(UsageError, match=r"no readable image to score in .*tiny.*2 smaller than --size 64 skipped"):
        _run(tmp_path, "--data", str(tiny), "--small-images", "skip", name="tiny")


@pytest.mark.parametrize("argv, message", [
    (["--crop", "128"], "--crop 128: larger than --size 64"),
    (["--crop", "0"], "--crop 0: must be >= 8"),
    (["--temperature", "0"], "--temperature 0.0: must be > 0"),
    (["--temperatures", "0.1,-1"], "--temperatures 0.1,-1: every temperature must be > 0"),
    (["--checkpoint", "/nonexistent/ckpt.pth"], "--checkpoint /nonexistent/ckpt.pth: no such file"),
    (["--checkpoint", "random"], "--checkpoint random: name the encoder"),
    (["--classifier-weights", "/nonexistent/w.pth"], "--classifier-weights /nonexistent/w.pth: no such file"),
    (["--data", "/nonexistent/folder"], "--data /nonexistent/folder: no such file or folder"),
    (["--published", "/nonexistent/published.csv"], "--published /nonexistent/published.csv: no such file"),
    (["--limit", "0"], "--limit 0: must be >= 1"),
])
def test_bad_options_exit_2_with_one_line_and_nothing_written(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cq.cli(["--size", str(SIZE), "--device", "cpu", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert list(tmp_path.iterdir()) == []  # no run folder, no CSV


def test_unwritable_outputs_fail_before_any_model_is_built(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("")

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the outputs were checked")

    monkeypatch.setattr(cq, "load_colorizer", refuse)
    monkeypatch.setattr(cq, "ImageFiles", refuse)
    for option, path in (("--out-csv", blocker / "rows.csv"), ("--out", blocker / "figures"),
                         ("--out-csv", tmp_path)):
        with pytest.raises(SystemExit) as exit_info:
            cq.cli(["--checkpoint", "random:colornet", option, str(path)])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"colorization_quality: error: {option} {path}"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_quality_table_keeps_long_method_names_and_the_papers_numbers():
    from ssl_colorize.quality_table import format_quality_table, quality_table

    published = pd.DataFrame({"method": ["grey", "grey", "L2 regression"], "benchmark": ["colorization_quality"] * 3,
                              "metric": ["auc_raw", "amt_fooled", "auc_raw"], "value": [89.1, 0.0, 91.2]})
    long_label = "colornet rebalanced (" + "a-very-long-run-folder-name-" * 3 + ")"
    rows = [dict(encoder="grey", protocol="baseline", metric="auc_raw", value=88.0,
                 hparams=json.dumps({"label": "grey", "paper_method": "grey"})),
            dict(encoder="colornet", protocol="annealed_mean", metric="auc_raw", value=90.5,
                 hparams=json.dumps({"label": long_label})),
            dict(encoder="colornet", protocol="temperature_sweep:T=1", metric="auc_raw", value=1.0,
                 hparams=json.dumps({"label": long_label}))]
    table = quality_table(rows, published)
    assert list(table["method"]) == ["grey", long_label, "L2 regression"]
    assert list(table["kind"]) == ["ours", "ours", "published"]
    grey = table.iloc[0]
    assert (grey["AuC raw"], grey["AuC raw (paper)"], grey["fooled (paper)"]) == (88.0, 89.1, 0.0)
    assert table.iloc[1]["AuC raw"] == 90.5  # the main row, not the sweep's
    text = format_quality_table(rows, published)
    lines = text.splitlines()
    assert any(line.startswith(long_label + " ") for line in lines)  # the full name, not cut at 50 characters
    assert "91.2" in next(line for line in lines if line.startswith("L2 regression")).split()
    assert "Table 1" in lines[-1]


def test_unwritable_out_csv_fails_first_from_the_command_line(tmp_path):
    """As a user runs it (a fresh process): exit 2, one line naming --out-csv, before any image is read."""
    import subprocess
    import sys
    import time

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "ssl_colorize.benchmarks.colorization_quality", "--checkpoint",
                           "random:colornet", "--out-csv", str(blocker / "rows.csv")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        f"colorization_quality: error: --out-csv {blocker / 'rows.csv'}: {blocker} is a file, so the folder cannot be made"]
    assert time.monotonic() - start < 60  # imports only: it used to fail after the whole evaluation
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
