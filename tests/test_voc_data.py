"""VOC / SBD readers on a tiny VOCdevkit-format fixture, and the built-in data that writes one."""

import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_colorize.data import builtin_voc
from ssl_colorize.data.builtin_voc import BAD_CASES, CLASS_SHAPES, ensure_builtin_voc, make_voc_fixture
from ssl_colorize.data.voc import (
    CLASS_INDEX,
    IGNORE_LABEL,
    SkippedItem,
    VOCDataError,
    VOCImages,
    boxes_to_continuous,
    boxes_to_inclusive,
    classification_targets,
    find_devkit,
    load_main_split,
    parse_annotation,
    voc_palette,
)
from ssl_colorize.data.voc_segmentation import (
    VOCSegmentation,
    load_sbd_split,
    load_segmentation_split,
    read_mask,
    read_png_mask,
)

SIZE = (48, 64)


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    return make_voc_fixture(tmp_path_factory.mktemp("voc"), n_trainval07=6, n_test07=4, n_train12=4, n_val12=4,
                            image_size=SIZE, sbd=True, n_sbd=4)


@pytest.fixture(scope="module")
def bad_fixture(tmp_path_factory):
    return make_voc_fixture(tmp_path_factory.mktemp("voc_bad"), n_trainval07=6, n_test07=4, n_train12=4, n_val12=4,
                            image_size=SIZE, bad=BAD_CASES)


def test_layout_is_the_real_one(fixture):
    voc07, voc12 = fixture.devkit / "VOC2007", fixture.devkit / "VOC2012"
    for split in ("train", "val", "trainval", "test"):
        assert (voc07 / "ImageSets" / "Main" / f"{split}.txt").is_file()
    for split in ("train", "val", "trainval"):
        assert (voc12 / "ImageSets" / "Segmentation" / f"{split}.txt").is_file()
    ids = (voc07 / "ImageSets" / "Main" / "trainval.txt").read_text().split()
    assert len(ids) == 6
    for image_id in ids:
        assert Image.open(voc07 / "JPEGImages" / f"{image_id}.jpg").format == "JPEG"
        assert (voc07 / "Annotations" / f"{image_id}.xml").is_file()
    png = Image.open(voc12 / "SegmentationClass" / "2012_000001.png")
    assert png.mode == "P" and png.getpalette()[:6] == [0, 0, 0, 128, 0, 0]
    assert (fixture.sbd / "cls" / "2008_000001.mat").is_file()


def test_find_devkit_accepts_the_parent_or_the_devkit(fixture, tmp_path):
    assert find_devkit(fixture.root) == fixture.devkit
    assert find_devkit(fixture.devkit) == fixture.devkit
    assert find_devkit(fixture.devkit / "VOC2007") == fixture.devkit
    with pytest.raises(ValueError, match="VOC<year>"):
        find_devkit(tmp_path)
    with pytest.raises(ValueError, match="no such folder"):
        find_devkit(tmp_path / "absent")


def test_palette_is_the_devkit_colour_map():
    palette = np.array(voc_palette()).reshape(256, 3)
    # VOC's documented colours: background, aeroplane, bicycle, bird, boat ... and 255 (void)
    np.testing.assert_array_equal(palette[:5], [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128]])
    np.testing.assert_array_equal(palette[15], [192, 128, 128])  # person
    np.testing.assert_array_equal(palette[255], [224, 224, 192])


def test_annotations_carry_difficult_and_truncated_flags(fixture):
    records, report = load_main_split(fixture.root, 2007, "trainval")
    assert report.total == 0 and len(records) == 6
    # the builder's guarantee: the first image holds one difficult object, the second a truncated one
    assert records[0].difficult.tolist() == [True]
    assert records[1].truncated[0]
    for rec in records:
        assert set(rec.labels) <= {CLASS_INDEX[n] for n in CLASS_SHAPES}
        assert (rec.boxes[:, 0] >= 1).all() and (rec.boxes[:, 2] <= rec.width).all()
        assert (rec.boxes[:, 2] >= rec.boxes[:, 0]).all() and (rec.boxes[:, 3] >= rec.boxes[:, 1]).all()
        # a truncated object touches the border; the others do not
        touches = (rec.boxes[:, 0] == 1) | (rec.boxes[:, 1] == 1) | (rec.boxes[:, 2] == rec.width) | (
            rec.boxes[:, 3] == rec.height)
        np.testing.assert_array_equal(touches, rec.truncated)


def test_boxes_enclose_their_segmentation_masks(fixture):
    records, _ = load_main_split(fixture.root, 2012, "train")
    for rec in records:
        mask = read_mask(fixture.devkit / "VOC2012" / "SegmentationClass" / f"{rec.image_id}.png")
        for box, label in zip(rec.boxes.astype(int), rec.labels):
            rows, cols = np.nonzero(mask == label + 1)
            inside = (cols + 1 >= box[0]) & (cols + 1 <= box[2]) & (rows + 1 >= box[1]) & (rows + 1 <= box[3])
            # pixels of this class belong to this box or to another object of the same class
            others = [b for b, lab in zip(rec.boxes.astype(int), rec.labels) if lab == label]
            in_any = np.zeros_like(inside)
            for b in others:
                in_any |= (cols + 1 >= b[0]) & (cols + 1 <= b[2]) & (rows + 1 >= b[1]) & (rows + 1 <= b[3])
            assert in_any.all() and inside.any()


def test_classification_targets_follow_the_devkit(tmp_path):
    xml = tmp_path / "a.xml"
    root = ET.Element("annotation")
    size = ET.SubElement(root, "size")
    for tag, v in (("width", 50), ("height", 40), ("depth", 3)):
        ET.SubElement(size, tag).text = str(v)
    for name, difficult in (("cat", 1), ("cat", 0), ("dog", 1), ("Person", 0)):
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = name
        ET.SubElement(obj, "difficult").text = str(difficult)
        box = ET.SubElement(obj, "bndbox")
        for tag, v in (("xmin", 2), ("ymin", 3), ("xmax", 20), ("ymax", 30)):
            ET.SubElement(box, tag).text = str(v)
    ET.ElementTree(root).write(xml)
    ann = parse_annotation(xml)
    assert [o.name for o in ann.objects] == ["cat", "cat", "dog", "person"]
    from ssl_colorize.data.voc import DetectionRecord

    targets = classification_targets([DetectionRecord.from_annotation("a", tmp_path / "a.jpg", ann)])[0]
    assert targets[CLASS_INDEX["cat"]] == 1      # one non-difficult cat: present
    assert targets[CLASS_INDEX["dog"]] == 0      # only a difficult dog: ignored
    assert targets[CLASS_INDEX["person"]] == 1
    assert (np.delete(targets, [CLASS_INDEX[c] for c in ("cat", "dog", "person")]) == -1).all()


def test_box_conversion_round_trips():
    boxes = np.array([[1.0, 1.0, 10.0, 20.0]])
    cont = boxes_to_continuous(boxes)
    np.testing.assert_array_equal(cont, [[0.0, 0.0, 10.0, 20.0]])  # a 10-pixel-wide box is 10 wide
    np.testing.assert_array_equal(boxes_to_inclusive(cont), boxes)


def test_masks_have_255_borders_and_palette_values(fixture):
    records, report = load_segmentation_split(fixture.root, 2012, "train")
    assert report.total == 0
    values = set()
    for rec in records:
        mask = read_png_mask(rec.mask_path)
        values |= set(np.unique(mask).tolist())
        # every object is outlined by void: its pixels never touch background directly
        obj = (mask > 0) & (mask != IGNORE_LABEL)
        bg = mask == 0
        assert not (obj[:, 1:] & bg[:, :-1]).any() and not (obj[1:, :] & bg[:-1, :]).any()
    assert 0 in values and IGNORE_LABEL in values and values - {0, IGNORE_LABEL}


def test_rgb_rendered_masks_are_mapped_back(tmp_path, fixture):
    index_mask = read_png_mask(fixture.devkit / "VOC2012" / "SegmentationClass" / "2012_000002.png")
    rgb = np.array(voc_palette(), dtype=np.uint8).reshape(256, 3)[index_mask]
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(read_png_mask(tmp_path / "rgb.png"), index_mask)
    rgb[0, 0] = (1, 2, 3)
    Image.fromarray(rgb).save(tmp_path / "odd.png")
    with pytest.raises(VOCDataError, match="odd.png"):
        read_png_mask(tmp_path / "odd.png")


def test_sbd_masks_are_read_from_mat_files(fixture):
    records, report = load_sbd_split(fixture.root)  # the folder holding benchmark_RELEASE
    assert report.total == 0 and len(records) == 6
    # the two ids SBD shares with VOC2012 val carry the same objects (SBD without the 255 borders)
    shared = [r for r in records if r.image_id.startswith("2012_")]
    assert len(shared) == 2
    for rec in shared:
        sbd = read_mask(rec.mask_path)
        voc = read_mask(fixture.devkit / "VOC2012" / "SegmentationClass" / f"{rec.image_id}.png")
        assert IGNORE_LABEL not in sbd
        known = voc != IGNORE_LABEL
        np.testing.assert_array_equal(sbd[known], voc[known])
    assert load_sbd_split(fixture.sbd)[0][0].image_id == records[0].image_id
    with pytest.raises(ValueError, match="SBD"):
        load_sbd_split(fixture.devkit)


def test_datasets_yield_images_masks_and_skip_undecodable_files(bad_fixture):
    records, _ = load_main_split(bad_fixture.root, 2007, "trainval")
    items = [VOCImages(records)[i] for i in range(len(records))]
    skipped = [it for it in items if isinstance(it, SkippedItem)]
    assert [s.path for s in skipped] == [str(bad_fixture.bad_files["corrupt_image"])]
    image, index = next(it for it in items if not isinstance(it, SkippedItem))
    assert image.dtype == torch.uint8 and image.shape[0] == 3
    seg, _ = load_segmentation_split(bad_fixture.root, 2012, "val")
    image, mask, _ = VOCSegmentation(seg)[0]
    assert tuple(mask.shape) == tuple(image.shape[-2:]) and mask.dtype == torch.uint8


def test_missing_split_file_is_a_value_error_naming_it(bad_fixture):
    with pytest.raises(ValueError, match=str(bad_fixture.bad_files["missing_split"])):
        load_main_split(bad_fixture.root, 2007, "test")
    with pytest.raises(ValueError, match="seg11valid.txt"):
        load_segmentation_split(bad_fixture.root, 2012, ids_file=bad_fixture.root / "seg11valid.txt")


def test_bad_files_are_skipped_counted_and_named(bad_fixture):
    records, report = load_main_split(bad_fixture.root, 2007, "trainval")
    assert len(records) == 5 and report.total == 1
    assert report.skipped["image without annotation"] == [str(bad_fixture.bad_files["missing_annotation"])]
    assert str(bad_fixture.bad_files["missing_annotation"]) in report.summary()

    # the unknown class: the test split file is gone in this fixture, so list the ids of a new one
    test_ids = (bad_fixture.devkit / "VOC2007" / "ImageSets" / "Main" / "trainval.txt").read_text().split()
    unknown_id = bad_fixture.bad_files["unknown_class"].stem
    (bad_fixture.devkit / "VOC2007" / "ImageSets" / "Main" / "mixed.txt").write_text("\n".join(test_ids + [unknown_id]))
    records, report = load_main_split(bad_fixture.root, 2007, "mixed")
    assert len(report.skipped["unknown class"]) == 1
    assert str(bad_fixture.bad_files["unknown_class"]) in report.skipped["unknown class"][0]
    assert "unicorn" in report.summary()
    with pytest.warns(UserWarning, match="unicorn"):
        report.warn()

    seg, report = load_segmentation_split(bad_fixture.root, 2012, "train")
    assert len(seg) == 3 and report.total == 1
    (message,) = report.skipped["mask outside the palette"]
    assert str(bad_fixture.bad_files["bad_mask"]) in message and "[42]" in message
    with pytest.raises(VOCDataError, match=bad_fixture.bad_files["bad_mask"].name):
        read_mask(bad_fixture.bad_files["bad_mask"])


def test_unknown_bad_case_is_refused(tmp_path):
    with pytest.raises(ValueError, match="bad case"):
        make_voc_fixture(tmp_path, bad=("gremlins",))


def test_builtin_voc_is_written_once_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setattr(builtin_voc, "BUILTIN_COUNTS", {"trainval07": 3, "test07": 2, "train12": 2, "val12": 2})
    monkeypatch.setattr(builtin_voc, "BUILTIN_SIZE", SIZE)
    monkeypatch.setenv("SSL_COLORIZE_CACHE", str(tmp_path / "cache"))
    root = ensure_builtin_voc()
    assert root.parent == tmp_path / "cache" and (root / ".complete").is_file()
    assert find_devkit(root) == root / "VOCdevkit"
    records, _ = load_main_split(root, 2007, "test")
    assert len(records) == 2
    stamp = (root / "VOCdevkit" / "VOC2007" / "Annotations" / "000001.xml").stat().st_mtime_ns
    assert ensure_builtin_voc() == root  # second call: reused, not regenerated
    assert (root / "VOCdevkit" / "VOC2007" / "Annotations" / "000001.xml").stat().st_mtime_ns == stamp
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_detection_images_mirror_their_boxes(fixture):
    from ssl_colorize.data.voc import DetectionImages

    records, _ = load_main_split(fixture.root, 2007, "trainval")
    dataset = DetectionImages(records, train=True)
    index = next(i for i, r in enumerate(records) if not r.difficult.all())
    keep = ~records[index].difficult
    plain = torch.from_numpy(boxes_to_continuous(records[index].boxes[keep])).float()
    flips = 0
    for seed in range(8):
        torch.manual_seed(seed)
        image, target, got_index = dataset[index]
        assert got_index == index and torch.equal(target["labels"], torch.from_numpy(records[index].labels[keep] + 1))
        if torch.equal(target["boxes"], plain):
            continue
        flips += 1
        width = image.shape[-1]
        torch.testing.assert_close(target["boxes"][:, [2, 0]], width - plain[:, [0, 2]])
    assert 0 < flips < 8


def test_collates_keep_the_skipped_items_apart():
    from ssl_colorize.data.voc import ListBatch, StackBatch

    good = (torch.zeros(3, 4, 4, dtype=torch.uint8), 0)
    skipped = SkippedItem("x.jpg", "undecodable")
    images, indices, dropped = StackBatch(2)([good, skipped, (torch.ones(3, 4, 4, dtype=torch.uint8), 5)])
    assert images.shape == (2, 3, 4, 4) and indices.tolist() == [0, 5] and dropped == [skipped]
    assert StackBatch(3)([skipped]) == (None, None, None, [skipped])
    assert ListBatch(3)([skipped]) == ([], [], [], [skipped])
