"""The four VOC benchmarks end to end on a tiny VOCdevkit-format fixture (CPU), and their building blocks.

The fixture holds every bad input of issue 5 (an image without annotation, an annotation naming an
unknown class, an undecodable JPEG, a mask outside the palette): each run must finish, skip them and
name them. Sizes and iteration counts are tiny; the numbers are only checked for shape and range.
"""

import json

import numpy as np
import pytest
import torch
from torch import nn

from ssl_colorize.benchmarks import voc_classification as cls_bench
from ssl_colorize.benchmarks import voc_detection as det_bench
from ssl_colorize.benchmarks import voc_segmentation as seg_bench
from ssl_colorize.checkpoint import load_encoder
from ssl_colorize.data.builtin_voc import make_voc_fixture
from ssl_colorize.data.voc import VOC_CLASSES, load_main_split
from ssl_colorize.engine.finetune import UntouchedGuard, finetune_modules
from ssl_colorize.engine.transfer_run import resolve_input, to_model_input
from ssl_colorize.engine import transfer_run
from ssl_colorize.heads import detection, segmentation
from ssl_colorize.models import create_model
from ssl_colorize.results import load_published, paper_table, read_rows
from voc_testing import check_bad_inputs_reported, check_rows, common, make_small_voc

BENCHMARKS = {"voc_classification": cls_bench, "voc_detection": det_bench, "voc_segmentation": seg_bench}


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    return make_small_voc(tmp_path_factory.mktemp("vocdata"))


def capture_encoder(monkeypatch, module):
    """Wrap the benchmark's encoder loader: keep the encoder and a copy of every tensor at creation."""
    captured = {}
    original = module.load_transfer_encoder

    def wrapper(*args, **kwargs):
        encoder, name = original(*args, **kwargs)
        captured["encoder"] = encoder
        captured["before"] = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
        return encoder, name

    monkeypatch.setattr(module, "load_transfer_encoder", wrapper)
    return captured


def changed_tensors(captured) -> set[str]:
    after = captured["encoder"].state_dict()
    return {k for k, v in captured["before"].items() if not torch.equal(v, after[k])}


# ----------------------------------------------------------------------------------------------
# Classification
# ----------------------------------------------------------------------------------------------

def test_classification_fc8_end_to_end_changes_no_encoder_tensor(voc, tmp_path, monkeypatch):
    captured = capture_encoder(monkeypatch, cls_bench)
    args = cls_bench.get_args_parser().parse_args(common(
        voc, tmp_path, "--finetune", "fc8", "--iters", 2, "--batch-size", 4, "--test-crops", 2,
        "--eval-batch-size", 6))
    summary = cls_bench.main(args)
    # --finetune fc8: not one encoder tensor moved, BatchNorm running statistics included
    assert changed_tensors(captured) == set()
    assert any("running_mean" in k for k in captured["before"])
    rows = check_rows(tmp_path / "voc.csv", "voc_classification", "mAP", 4)
    assert set(rows["protocol"]) == {"2crop", "center"} and set(rows["tap"]) == {"fc8"}
    present = {m[3:] for m in rows["metric"] if m.startswith("AP_")}
    assert present <= set(VOC_CLASSES) and present
    assert summary["metrics"]["2crop"]["mAP"] == pytest.approx(
        np.nanmean([summary["metrics"]["2crop"][f"AP_{c}"] for c in VOC_CLASSES]))
    # (the undecodable JPEG is met only if a batch draws it: the SVM test, which reads every image, checks it)
    check_bad_inputs_reported(summary, voc, ("missing_annotation", "unknown_class"))
    assert (tmp_path / "run" / "summary.json").is_file() and (tmp_path / "run" / "log.txt").is_file()
    assert str(voc.bad_files["unknown_class"]) in (tmp_path / "run" / "log.txt").read_text()
    # the rows join the paper-style table beside the published ones
    table = paper_table(rows, load_published(), benchmark="voc_classification", dataset="voc2007", metric="mAP")
    assert {"published", "ours"} <= set(table["kind"]) and "fc8" in table.columns


def test_classification_fc6_8_trains_only_fc6_and_fc7(voc, tmp_path, monkeypatch):
    captured = capture_encoder(monkeypatch, cls_bench)
    args = cls_bench.get_args_parser().parse_args(common(
        voc, tmp_path, "--finetune", "fc6-8", "--iters", 1, "--batch-size", 4, "--test-crops", 1,
        "--eval-batch-size", 6))
    cls_bench.main(args)
    changed = changed_tensors(captured)
    assert {"fc6.conv.weight", "fc7.conv.weight"} <= changed
    assert all(name.startswith(("fc6.conv.", "fc7.conv.")) for name in changed), changed  # BN frozen, convs untouched


def test_guard_names_batchnorm_statistics_that_moved():
    encoder = create_model("alexnet_lab", geometry="transfer")
    guard = UntouchedGuard(encoder, allowed=["conv1.conv.weight"])
    encoder.conv1.train()
    encoder.forward_taps(torch.rand(2, 1, 227, 227) * 100, ["conv1"])
    with pytest.raises(RuntimeError, match="conv1.bn.running_mean"):
        guard.check("--finetune fc8")


def test_inputs_follow_the_encoder():
    lab = create_model("alexnet_lab")
    rgb = create_model("alexnet_rgb_torchvision")
    assert resolve_input(lab, "auto") == "L" and resolve_input(rgb, "auto") == "rgb"
    assert resolve_input(rgb, "grey-rgb") == "grey"
    with pytest.raises(ValueError, match="takes the L channel"):
        resolve_input(lab, "rgb")
    with pytest.raises(ValueError, match="takes RGB"):
        resolve_input(rgb, "L")
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    grey = to_model_input(images, "grey")
    assert torch.allclose(grey[:, 0], grey[:, 1], atol=1e-5) and torch.allclose(grey[:, 1], grey[:, 2], atol=1e-5)
    assert to_model_input(images, "L").shape == (2, 1, 8, 8)


@pytest.mark.parametrize("benchmark", sorted(BENCHMARKS))
def test_missing_split_is_one_line_before_any_work(benchmark, tmp_path, capsys):
    voc = make_voc_fixture(tmp_path / "data", n_trainval07=2, n_test07=2, n_train12=2, n_val12=2,
                           image_size=(32, 40), bad=("missing_split",))
    module = BENCHMARKS[benchmark]
    extra = ["--eval-ids", str(tmp_path / "seg11valid.txt")] if benchmark == "voc_segmentation" else []
    missing = "seg11valid.txt" if extra else str(voc.bad_files["missing_split"])
    with pytest.raises(SystemExit) as exit_info:
        module.cli(common(voc, tmp_path, "--iters", 1, *extra))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and missing in err and "Traceback" not in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "voc.csv").exists()


def test_fc6_8_scope_comes_from_the_card():
    resnet = create_model("resnet50_lab")
    assert finetune_modules(resnet, "fc6-8") == [resnet.res5]
    alexnet = create_model("alexnet_lab", geometry="transfer")
    assert finetune_modules(alexnet, "fc6-8") == [alexnet.pool5, alexnet.fc6, alexnet.fc7]
    assert finetune_modules(alexnet, "fc8") == [] and finetune_modules(alexnet, "all") == [alexnet]


# ----------------------------------------------------------------------------------------------
# Detection
# ----------------------------------------------------------------------------------------------

def test_detection_end_to_end(voc, tmp_path):
    args = det_bench.get_args_parser().parse_args(common(
        voc, tmp_path, "--detector", "faster-rcnn", "--iters", 2, "--train-sizes", "64,80", "--test-size", 72,
        "--max-size", 128, "--anchor-sizes", "16,32,64", "--rpn-train-proposals", 64, "--rpn-test-proposals", 32,
        "--rois-per-image", 16, "--ap-metric", "area"))
    summary = det_bench.main(args)
    rows = check_rows(tmp_path / "voc.csv", "voc_detection", "mAP", 2)
    assert set(rows["protocol"]) == {"faster_rcnn_area"} and set(rows["tap"]) == {"all"}
    # one AP row per class that has a non-difficult object in the evaluated test images
    test_records, _ = load_main_split(voc.root, 2007, "test")
    with_objects = {VOC_CLASSES[label] for r in test_records for label, d in zip(r.labels, r.difficult) if not d}
    assert {m[3:] for m in rows["metric"] if m.startswith("AP_")} == with_objects
    check_bad_inputs_reported(summary, voc, ("missing_annotation", "unknown_class"))


def test_detector_reuses_fc6_fc7_as_linear_box_head_and_identity_normalisation():
    encoder = load_encoder("random", encoder="alexnet_lab", geometry="transfer")
    backbone, pool, head, _ = detection.detector_parts(encoder)
    assert backbone.out_channels == 256 and pool.output_size == (6, 6)
    assert head.stages[0] is encoder.fc6 and head.stages[1] is encoder.fc7
    with torch.no_grad():
        encoder.fc6.bn.running_mean.normal_()
        encoder.fc6.bn.running_var.uniform_(0.5, 2)
        pooled = torch.randn(3, 256, 6, 6)
        out = head(pooled)
        # the same as Linear 9216 -> 4096 with fc6's convolution weights, then its (eval) BN and ReLU
        conv, bn = encoder.fc6.conv, encoder.fc6.bn
        linear = pooled.flatten(1) @ conv.weight.reshape(4096, -1).T + conv.bias
        fc6 = torch.relu((linear - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps))
        conv7, bn7 = encoder.fc7.conv, encoder.fc7.bn
        fc7 = torch.relu((fc6 @ conv7.weight.reshape(4096, -1).T + conv7.bias - bn7.running_mean)
                         / torch.sqrt(bn7.running_var + bn7.eps))
    torch.testing.assert_close(out, fc7, rtol=1e-4, atol=1e-4)
    model, _ = detection.build_detector(
        encoder, train_sizes=(192, 224), max_size=480, anchors=(32, 64), rpn_train_proposals=64,
        rpn_test_proposals=32, score_thresh=0.0, detections_per_image=10, rois_per_image=16)
    assert model.transform.image_mean == [0.0] and model.transform.image_std == [1.0]
    with pytest.raises(ValueError, match="encoder colornet has no detection split"):
        detection.detector_parts(create_model("colornet"))
    resnet_backbone, resnet_pool, resnet_head, _ = detection.detector_parts(create_model("resnet50_lab"))
    assert resnet_backbone.tap == "res4" and resnet_pool.output_size == (14, 14) and resnet_head.out_channels == 2048


# ----------------------------------------------------------------------------------------------
# Segmentation
# ----------------------------------------------------------------------------------------------

def test_segmentation_end_to_end_with_sbd_eval_ids_and_colour_input(voc, tmp_path):
    val_ids = (voc.devkit / "VOC2012" / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    eval_ids = val_ids[:3]  # includes the two ids SBD shares with VOC2012 val
    ids_file = tmp_path / "seg11valid.txt"
    ids_file.write_text("\n".join(eval_ids) + "\n")
    args = seg_bench.get_args_parser().parse_args(common(
        voc, tmp_path, "--recipe", "quick", "--sbd", voc.root, "--eval-ids", ids_file, "--colour-input", "--iters", 2,
        "--batch-size", 2, "--crop", 64))
    summary = seg_bench.main(args)
    rows = check_rows(tmp_path / "voc.csv", "voc_segmentation", "mIoU", 2)
    assert set(rows["split"]) == {"seg11valid"} and set(rows["protocol"]) == {"fcn32s_colour_input"}
    hparams = json.loads(rows["hparams"].iloc[0])
    assert hparams["eval_images"] == 3
    # training: VOC2012 train (one mask outside the palette skipped) + SBD minus the evaluation ids
    voc_train = (voc.devkit / "VOC2012" / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    sbd_ids = set((voc.sbd / "train.txt").read_text().split()) | set((voc.sbd / "val.txt").read_text().split())
    expected = (len(voc_train) - 1) + len(sbd_ids - set(eval_ids) - set(voc_train))
    assert hparams["train_images"] == expected
    check_bad_inputs_reported(summary, voc, ("bad_mask",))


def test_feature_geometry_by_hand():
    alexnet = create_model("alexnet_lab", geometry="transfer")
    # fc7 cell i is centred on input pixel 113 + 32 i (conv1 5, pool1 +4, pool2 +8, pool5 +16, fc6 +80)
    assert segmentation.feature_geometry(alexnet, "fc7") == ((113.0, 113.0), 32)
    assert segmentation.feature_geometry(alexnet, "conv5") == ((17.0, 17.0), 16)
    tv = create_model("alexnet_rgb_torchvision")  # conv1 pad 2: 3, pool1 +4, pool2 +8
    assert segmentation.feature_geometry(tv, "conv5") == ((15.0, 15.0), 16)
    assert segmentation.seg_tap(alexnet) == "fc7" and segmentation.seg_tap(tv) == "conv5"


class _CellIndex(nn.Module):
    """A stand-in score layer whose output at cell (i, j) is j (checks the upsampling's alignment)."""

    def forward(self, features):
        n, _, h, w = features.shape
        self.cells = w
        return torch.arange(w, dtype=torch.float32).expand(n, 1, h, w).contiguous()


def test_fcn_upsampling_samples_each_pixel_at_its_receptive_field_centre():
    encoder = create_model("alexnet_lab", geometry="transfer").eval()
    model = segmentation.FCN32s(encoder, "fc7", pad=100, pad_values=(50.0,), dropout=0.0).eval()
    model.score = _CellIndex()
    width = 300
    with torch.no_grad():
        out = model(torch.full((1, 1, 40, width), 50.0))[0, 0, 0]
    assert model.score.cells == 10  # 500 padded pixels -> conv1 123 -> pool1 61 -> pool2 30 -> pool5 15 -> fc6 10
    expected = np.clip((np.arange(width) + 100 - 113) / 32, 0, model.score.cells - 1)
    # row 0 lies 13 px above the first cell centre: the released bilinear deconvolution fades it to 19/32
    expected *= 1 - 13 / 32
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# The error convention: one stderr line naming the option and the value, exit 2, nothing created
# ----------------------------------------------------------------------------------------------

def refused(module, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        module.cli(list(map(str, argv)))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("benchmark", sorted(BENCHMARKS))
@pytest.mark.parametrize("option,value", [("--lr", -1), ("--iters", 0), ("--batch-size", 0), ("--ckpt-every", 0)])
def test_bad_numbers_are_named(benchmark, option, value, voc, tmp_path, capsys):
    err = refused(BENCHMARKS[benchmark], common(voc, tmp_path, option, value), capsys)
    assert f"{option} {value}" in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "voc.csv").exists()


def test_paths_and_options_checked_before_any_work(voc, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert "--crop 0" in refused(cls_bench, common(voc, tmp_path, "--crop", 0), capsys)
    assert "--crop 0" in refused(seg_bench, common(voc, tmp_path, "--crop", 0), capsys)
    assert f"--data {tmp_path / 'nope'}" in refused(cls_bench, ["--data", tmp_path / "nope"], capsys)
    err = refused(det_bench, common(voc, tmp_path, "--checkpoint", tmp_path / "missing.pth"), capsys)
    assert "--checkpoint" in err and "missing.pth" in err
    (tmp_path / "a_file").write_text("")
    err = refused(seg_bench, common(voc, tmp_path, "--year", 2012) + ["--out-csv", tmp_path / "a_file" / "voc.csv"],
                  capsys)
    assert "--out-csv" in err
    assert "--eval-ids" in refused(seg_bench, common(voc, tmp_path, "--eval-ids", tmp_path / "no.txt"), capsys)
    err = refused(det_bench, common(voc, tmp_path, "--encoder", "colornet"), capsys)
    assert "encoder colornet has no detection split" in err
    assert "--train-sizes" in refused(det_bench, common(voc, tmp_path, "--train-sizes", "64,x"), capsys)
    assert "--tensorboard" in refused(cls_bench, common(voc, tmp_path, "--tensorboard"), capsys)
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists() and not (tmp_path / "results").exists()
    # a used run folder is refused without --resume / --overwrite
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "log.jsonl").write_text("")
    assert "--resume" in refused(cls_bench, common(voc, tmp_path), capsys)


def test_outputs_default_to_the_working_directory(voc, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cls_bench.cli(["--data", str(voc.root), "--workers", "0", "--finetune", "fc8", "--iters", "1", "--batch-size", "2",
                   "--test-crops", "1", "--eval-batch-size", "6"])
    runs = list((tmp_path / "runs" / "voc_classification").iterdir())
    assert len(runs) == 1 and (runs[0] / "checkpoint.pth").is_file() and (runs[0] / "config.json").is_file()
    assert [r["step"] for r in map(json.loads, (runs[0] / "log.jsonl").read_text().splitlines())] == [1]
    assert len(read_rows(tmp_path / "results" / "voc.csv"))


def test_tensorboard_gets_the_logged_scalars(voc, tmp_path, monkeypatch):
    import sys
    import types

    written = []

    class FakeWriter:  # stands in for the optional tensorboard package
        def __init__(self, log_dir):
            written.append(("dir", log_dir))

        def add_scalar(self, tag, value, step):
            written.append((tag, step))

        def close(self):
            written.append(("closed", None))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    monkeypatch.setattr(transfer_run, "check_tensorboard", lambda: None)  # the package itself is optional
    cls_bench.cli(common(voc, tmp_path, "--finetune", "fc8", "--iters", 2, "--batch-size", 2, "--test-crops", 1,
                         "--eval-batch-size", 6, "--log-every", 1, "--tensorboard"))
    assert written[0] == ("dir", str(tmp_path / "run" / "tensorboard"))
    assert [w for w in written if w[0] == "train/loss"] == [("train/loss", 1), ("train/loss", 2)]
    assert ("train/lr", 2) in written and written[-1] == ("closed", None)
