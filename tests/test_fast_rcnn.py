"""Fast R-CNN as released (ssl_colorize.heads.fast_rcnn and the ``--detector fast-rcnn`` benchmark):
RoI sampling, box targets, RoI pooling, the loss, end to end on a tiny VOCdevkit with proposals written
here in the released .mat layout, and the bad inputs (one line naming the file, exit 2, nothing created)."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.io import savemat
from torchvision.models.detection._utils import BoxCoder

from ssl_colorize.benchmarks import voc_detection as det_bench
from ssl_colorize.data.builtin_voc import make_voc_fixture, synthetic_proposals
from ssl_colorize.data.voc import DetectionRecord, load_main_split, read_ids
from ssl_colorize.engine.detection_recipe import resolve_detector
from ssl_colorize.heads import fast_rcnn
from ssl_colorize.models import create_model
from voc_testing import check_bad_inputs_reported, check_rows, common, make_small_voc


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    return make_small_voc(tmp_path_factory.mktemp("vocdata"))


def released_mat(path, ids, boxes_per_id):
    """Write ``boxes_per_id`` (0-based [x1 y1 x2 y2]) as fast-rcnn's files hold them: 1-based [y1 x1 y2 x2]."""
    cells = np.empty((1, len(ids)), dtype=object)
    names = np.empty((len(ids), 1), dtype=object)
    for n, image_id in enumerate(ids):
        b = np.asarray(boxes_per_id[image_id], dtype=np.float64)
        cells[0, n] = np.stack([b[:, 1], b[:, 0], b[:, 3], b[:, 2]], 1) + 1
        names[n, 0] = image_id
    savemat(path, {"boxes": cells, "images": names})


@pytest.fixture(scope="module")
def proposals(voc, tmp_path_factory):
    """voc_2007_{trainval,test}.mat for the fixture: jittered object boxes + random boxes."""
    folder = tmp_path_factory.mktemp("selective_search_data")
    devkit = voc.devkit / "VOC2007"
    rng = np.random.default_rng(0)
    for split in ("trainval", "test"):
        ids = read_ids(devkit / "ImageSets" / "Main" / f"{split}.txt")
        records = {r.image_id: r for r in load_main_split(voc.root, 2007, split)[0]}
        boxes = {}
        for image_id in ids:  # ids without a usable annotation still get (random) boxes
            rec = records.get(image_id)
            objects = rec.boxes - 1 if rec is not None else np.zeros((0, 4))
            height, width = (rec.height, rec.width) if rec is not None else (64, 64)
            boxes[image_id] = synthetic_proposals(rng, objects, height, width, jitters=8, random_boxes=16)
        released_mat(folder / f"voc_2007_{split}.mat", ids, boxes)
    return folder


def record_with_box(box_devkit, label=6):
    return DetectionRecord("x", None, 300, 300, np.array([box_devkit], dtype=np.float64), np.array([label]),
                           np.array([False]), np.array([False]))


def shifted(shift):
    """A 100 x 100 box moved right by ``shift``: IoU with [0, 0, 99, 99] is (100 - s) / (100 + s)."""
    return [shift, 0.0, 99.0 + shift, 99.0]


def test_roi_sampling_fractions_and_thresholds():
    record = record_with_box([1, 1, 100, 100])  # pixels [0, 0, 99, 99]
    shifts = list(range(1, 34)) + list(range(34, 82)) * 2 + list(range(82, 100))  # fg: s <= 33; bg: 34..81
    proposals = np.array([shifted(s) for s in shifts])
    iou = fast_rcnn.pixel_iou(torch.tensor(proposals), torch.tensor([[0.0, 0.0, 99.0, 99.0]]))[:, 0].numpy()
    np.testing.assert_allclose(iou, [(100 - s) / (100 + s) for s in shifts], rtol=1e-12)
    sampler = fast_rcnn.RoISampler([record], [proposals], rois_per_image=64)
    torch.manual_seed(0)
    sample = sampler(0)
    overlaps = fast_rcnn.pixel_iou(torch.tensor(sample.rois), torch.tensor([[0.0, 0.0, 99.0, 99.0]]))[:, 0].numpy()
    fg = sample.labels > 0
    assert len(sample.labels) == 64 and fg.sum() == 16  # round(0.25 * 64) of the 34 candidates (the box itself too)
    assert (sample.labels[fg] == 7).all() and (overlaps[fg] >= 0.5).all()
    assert ((overlaps[~fg] >= 0.1) & (overlaps[~fg] < 0.5)).all()
    assert (sample.bbox_targets[~fg] == 0).all() and np.abs(sample.bbox_targets[fg]).sum() > 0
    # few foreground RoIs: all of them, the rest background
    few = fast_rcnn.RoISampler([record], [np.array([shifted(s) for s in [5, 40, 41, 42, 90]])], rois_per_image=64)
    sample = few(0)
    assert (sample.labels > 0).sum() == 2 and len(sample.labels) == 5  # the box itself + shift 5; bg 40..42
    # an image with neither foreground nor background RoIs is left out (train.py filter_roidb)
    empty = DetectionRecord("y", None, 300, 300, np.zeros((0, 4)), np.zeros(0, np.int64), np.zeros(0, bool),
                            np.zeros(0, bool))
    assert fast_rcnn.RoISampler([record, empty], [proposals, proposals], rois_per_image=8).usable() == [0]


def test_box_targets_round_trip_and_match_torchvision():
    gen = torch.Generator().manual_seed(0)
    rois = torch.rand(20, 2, generator=gen, dtype=torch.float64) * 100
    rois = torch.cat((rois, rois + 5 + torch.rand(20, 2, generator=gen, dtype=torch.float64) * 80), 1)
    gt = rois + torch.randn(20, 4, generator=gen, dtype=torch.float64) * 3
    deltas = fast_rcnn.encode_boxes(rois, gt)
    # torchvision's coder on continuous corners (x2 + 1) is the released "+ 1" convention
    coder = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
    plus = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(deltas, coder.encode_single(gt + plus, rois + plus))
    torch.testing.assert_close(fast_rcnn.decode_boxes(rois, deltas.repeat(1, 3))[:, 4:8], gt)
    # by hand: a 10-wide RoI [0, 0, 9, 9] to [5, 0, 24, 9]: centre 5 -> 15 (dx 1), width 10 -> 20 (dw log 2)
    one = fast_rcnn.encode_boxes(torch.tensor([[0.0, 0.0, 9.0, 9.0]]), torch.tensor([[5.0, 0.0, 24.0, 9.0]]))
    torch.testing.assert_close(one, torch.tensor([[1.0, 0.0, float(np.log(2)), 0.0]]))


def test_target_statistics_by_hand():
    targets = [np.array([[0.2, 1.0, 0.0, 0.0], [0.4, 3.0, 0.0, 0.0], [9.0, 9.0, 9.0, 9.0]])]
    classes, overlaps = [np.array([3, 3, 3])], [np.array([0.9, 0.6, 0.3])]  # the last is below BBOX_THRESH
    means, stds = fast_rcnn.target_statistics(targets, classes, overlaps)
    # dy over {1, 3} twice (the flipped copies): mean 2, std 1; dx over {0.2, 0.4, -0.2, -0.4}: mean 0
    np.testing.assert_allclose(means[3], [0.0, 2.0, 0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(stds[3], [np.sqrt(0.1), 1.0, 1.0, 1.0])  # constant dw / dh: std 1
    np.testing.assert_allclose(stds[5], 1.0)  # a class never seen: identity
    np.testing.assert_allclose(means[5], 0.0)


def test_roi_pooling_is_a_crop_and_max_pool_of_conv5():
    encoder = create_model("alexnet_lab", geometry="transfer").eval()
    model = fast_rcnn.FastRCNN(encoder).eval()
    assert model.spatial_scale == 1 / 16 and model.roi_size == 6
    images = torch.rand(2, 1, 227, 227) * 100
    # (no coordinate at a half cell, where C++ and numpy round differently; all inside the 13 x 13 map)
    rois = [torch.tensor([[0.0, 0.0, 176.0, 176.0], [33.0, 17.0, 90.0, 180.0]]),
            torch.tensor([[41.0, 9.0, 122.0, 60.0]])]
    pooled = model.pool(images, fast_rcnn.roi_batch(rois, [1.0, 1.0], torch.device("cpu")))
    with torch.no_grad():
        conv5 = encoder.forward_taps(images, ["conv5"])["conv5"]
    assert conv5.shape[-1] == 13
    expected = []
    for n, image_rois in enumerate(rois):
        for x1, y1, x2, y2 in (np.round(image_rois.numpy() / 16)).astype(int):  # Caffe's rounding to cells
            crop = conv5[n:n + 1, :, y1:y2 + 1, x1:x2 + 1]
            expected.append(F.adaptive_max_pool2d(crop, 6)[0])
    torch.testing.assert_close(pooled, torch.stack(expected))
    # the first RoI covers 12 x 12 cells: each bin is a 2 x 2 max
    torch.testing.assert_close(pooled[0], F.max_pool2d(conv5[0, :, :12, :12], 2))


def test_head_dropout_in_training_only_and_loss_by_hand():
    model = fast_rcnn.FastRCNN(create_model("alexnet_lab", geometry="transfer"))
    assert sum(isinstance(m, torch.nn.Dropout) for m in model.head.stages) == 2
    assert model.head.stages[0] is model.encoder.fc6 and model.head.stages[2] is model.encoder.fc7
    pooled = torch.randn(4, 256, 6, 6)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.head(pooled), model.head(pooled))
        model.train()
        model.encoder.eval()  # BatchNorm frozen; the dropout modules belong to the head
        assert not torch.equal(model.head(pooled), model.head(pooled))
    logits = torch.zeros(3, 21)
    deltas = torch.zeros(3, 84)
    deltas[0, 4 * 7: 4 * 7 + 4] = torch.tensor([0.5, 2.0, 0.0, 0.0])
    deltas[1, 4 * 2] = 100.0  # a background RoI's regression is not penalised
    losses = fast_rcnn.fast_rcnn_loss(logits, deltas, torch.tensor([7, 0, 3]), torch.zeros(3, 4))
    # smooth L1: 0.5 * 0.5^2 + (2 - 0.5) = 1.625 over 3 RoIs; softmax of zeros: log 21
    assert losses["loss_bbox"].item() == pytest.approx(1.625 / 3)
    assert losses["loss_cls"].item() == pytest.approx(np.log(21))


def test_default_detector_follows_the_card():
    parsed = det_bench.get_args_parser().parse_args([])
    assert resolve_detector(parsed, "alexnet_lab") == "fast-rcnn"
    assert resolve_detector(parsed, "alexnet_rgb_torchvision") == "fast-rcnn"
    assert resolve_detector(parsed, "resnet50_lab") == "faster-rcnn"
    parsed = det_bench.get_args_parser().parse_args(["--detector", "faster-rcnn"])
    assert resolve_detector(parsed, "alexnet_lab") == "faster-rcnn"


def test_fast_rcnn_end_to_end(voc, proposals, tmp_path):
    args = det_bench.get_args_parser().parse_args(common(
        voc, tmp_path, "--proposals", proposals, "--iters", 2, "--train-sizes", "64,80", "--test-size", 72,
        "--max-size", 128, "--rois-per-image", 16))
    summary = det_bench.main(args)
    rows = check_rows(tmp_path / "voc.csv", "voc_detection", "mAP", 2)
    assert set(rows["protocol"]) == {"fast_rcnn_11point"} and set(rows["tap"]) == {"all"}
    hparams = json.loads(rows["hparams"].iloc[0])
    assert hparams["detector"] == "fast-rcnn" and hparams["nms"] == 0.3 and hparams["score_thresh"] == 0.05
    assert hparams["clip_grad"] == 0.0 and hparams["test_images"] == 5  # 6 listed, one with an unknown class
    test_records, _ = load_main_split(voc.root, 2007, "test")
    with_objects = {r.labels[i] for r in test_records for i in range(len(r.labels)) if not r.difficult[i]}
    assert len([m for m in rows["metric"] if m.startswith("AP_")]) == len(with_objects)
    check_bad_inputs_reported(summary, voc, ("missing_annotation", "unknown_class"))
    assert np.isfinite(summary["final_loss"])


def refused(argv, capsys, cwd) -> str:
    with pytest.raises(SystemExit) as exit_info:
        det_bench.cli(list(map(str, argv)))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not any(cwd.iterdir()), "a refused run left files behind"
    return err


def test_bad_proposals_are_one_line_naming_the_file(voc, proposals, tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    bare = make_voc_fixture(tmp_path / "bare", n_trainval07=2, n_test07=2, n_train12=2, n_val12=2,
                            image_size=(48, 48), proposals=False)
    assert "--proposals: required" in refused(["--data", bare.root, "--workers", 0], capsys, work)
    base = ["--data", voc.root, "--workers", 0]
    assert f"--proposals {tmp_path / 'none'}: no such folder" in refused(
        base + ["--proposals", tmp_path / "none"], capsys, work)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "voc_2007_trainval.mat").write_bytes((proposals / "voc_2007_trainval.mat").read_bytes())
    assert str(bad / "voc_2007_test.mat") in refused(base + ["--proposals", bad], capsys, work)
    savemat(bad / "voc_2007_test.mat", {"images": np.array([["x"]], dtype=object)})
    err = refused(base + ["--proposals", bad], capsys, work)
    assert str(bad / "voc_2007_test.mat") in err and "no 'boxes'" in err
    cells = np.empty((1, 1), dtype=object)
    cells[0, 0] = np.ones((3, 5))
    savemat(bad / "voc_2007_test.mat", {"boxes": cells})
    assert "boxes{1} has shape (3, 5)" in refused(base + ["--proposals", bad], capsys, work)
    test_ids = read_ids(voc.devkit / "VOC2007" / "ImageSets" / "Main" / "test.txt")
    released_mat(bad / "voc_2007_test.mat", test_ids[:2] + test_ids[3:], {i: np.ones((1, 4)) for i in test_ids})
    err = refused(base + ["--proposals", bad], capsys, work)
    assert f"{bad / 'voc_2007_test.mat'}: no proposals for image {test_ids[2]}" in err
    assert "encoder colornet has no detection split" in refused(
        base + ["--detector", "fast-rcnn", "--encoder", "colornet", "--proposals", proposals], capsys, work)


def test_training_steps_lower_the_loss_on_one_batch(voc, proposals):
    from ssl_colorize.data.proposals import read_proposals
    from ssl_colorize.engine.transfer_run import to_model_input

    records, _ = load_main_split(voc.root, 2007, "trainval")
    ids = read_ids(voc.devkit / "VOC2007" / "ImageSets" / "Main" / "trainval.txt")
    items = fast_rcnn.training_set(records, read_proposals(proposals / "voc_2007_trainval.mat", ids),
                                   rois_per_image=16, use_difficult=True, scales=[64], max_size=128)
    torch.manual_seed(0)
    batch = [items[i] for i in range(2)]
    images, targets = [b[0] for b in batch], [b[1] for b in batch]
    assert all(0 < (t["labels"] > 0).sum() <= 4 for t in targets)  # round(0.25 * 16) foreground at most
    model = fast_rcnn.FastRCNN(create_model("alexnet_lab", geometry="transfer"), dropout=0.0)
    model.set_target_statistics(items.sampler.means, items.sampler.stds)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    cpu = torch.device("cpu")
    scales = [t["scale"] for t in targets]
    inputs = fast_rcnn.image_batch(images, scales, lambda x: to_model_input(x, "L"), (50.0,), cpu)
    sizes = [fast_rcnn.scaled_size(*im.shape[-2:], s) for im, s in zip(images, scales)]
    assert all(min(size) == 64 for size in sizes)  # the shorter side at the scale
    assert inputs.shape[-2:] == tuple(max(size[k] for size in sizes) for k in (0, 1))  # padded to the largest
    assert (inputs[1, :, sizes[1][0]:, :] == 50.0).all() and (inputs[1, :, :, sizes[1][1]:] == 50.0).all()
    rois = fast_rcnn.roi_batch([t["rois"] for t in targets], scales, cpu)
    labels, bbox_targets = torch.cat([t["labels"] for t in targets]), torch.cat([t["bbox_targets"] for t in targets])
    model.train()
    model.encoder.eval()  # BatchNorm statistics fixed (--bn frozen)
    losses = []
    for _ in range(6):
        out = fast_rcnn.fast_rcnn_loss(*model(inputs, rois), labels, bbox_targets)
        loss = out["loss_cls"] + out["loss_bbox"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
