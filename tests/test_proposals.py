"""Selective-search proposals in the released Fast R-CNN .mat layout (ssl_colorize.data.proposals).

Files are written here with scipy.io.savemat as rbgirshick/fast-rcnn's ``voc_2007_*.mat`` hold them:
``boxes`` a 1 x N cell array of K x 4 ``[y1 x1 y2 x2]`` 1-based arrays, ``images`` the ids.
"""

import numpy as np
import pytest
import torch
from scipy.io import savemat

from ssl_colorize.data.builtin_voc import make_voc_fixture, write_builtin_proposals
from ssl_colorize.data.proposals import (
    FastRCNNImages, flip_pixels, image_scale, proposal_file, read_proposals, scaled_size, write_proposals,
)
from ssl_colorize.data.voc import load_main_split, read_ids


def cell(arrays, shape=None):
    out = np.empty((1, len(arrays)) if shape is None else shape, dtype=object)
    for n, a in enumerate(arrays):
        out.reshape(-1)[n] = a
    return out


def test_reader_turns_released_columns_into_zero_based_xyxy(tmp_path):
    path = tmp_path / "voc_2007_test.mat"
    first = np.array([[10.0, 20.0, 30.0, 40.0], [1.0, 1.0, 5.0, 8.0]])  # [y1 x1 y2 x2], 1-based
    second = np.array([[2.0, 3.0, 4.0, 5.0]])
    savemat(path, {"boxes": cell([first, second]), "images": cell(["000007", "000009"], shape=(2, 1))})
    got = read_proposals(path, ["000009", "000007"])
    # by hand: x1 = col 1 - 1, y1 = col 0 - 1, x2 = col 3 - 1, y2 = col 2 - 1
    np.testing.assert_array_equal(got["000007"], [[19, 9, 39, 29], [0, 0, 7, 4]])
    np.testing.assert_array_equal(got["000009"], [[2, 1, 4, 3]])
    assert list(got) == ["000009", "000007"]
    # without ``images`` the boxes pair with the split's ids by position, as the released loader does
    plain = tmp_path / "plain.mat"
    savemat(plain, {"boxes": cell([first, second])})
    got = read_proposals(plain, ["a", "b"])
    np.testing.assert_array_equal(got["b"], [[2, 1, 4, 3]])
    # our writer round-trips through the same layout
    written = tmp_path / "ours.mat"
    write_proposals(written, {"x": np.array([[3.0, 4.0, 10.0, 12.0]]), "y": np.zeros((0, 4))})
    back = read_proposals(written, ["x", "y"])
    np.testing.assert_array_equal(back["x"], [[3, 4, 10, 12]])
    assert back["y"].shape == (0, 4)
    from scipy.io import loadmat

    np.testing.assert_array_equal(loadmat(written)["boxes"][0, 0], [[5, 4, 13, 11]])  # 1-based [y1 x1 y2 x2]


@pytest.mark.parametrize("content,message", [
    ({"images": cell(["a"], shape=(1, 1))}, "no 'boxes' variable"),
    ({"boxes": cell([np.ones((2, 3))])}, r"boxes\{1\} has shape \(2, 3\)"),
    ({"boxes": np.ones((4, 4))}, "not a 1 x N cell array"),
    ({"boxes": cell([np.array([[5.0, 5.0, 1.0, 9.0]])])}, "y2 < y1"),
])
def test_wrong_layouts_are_named(tmp_path, content, message):
    path = tmp_path / "voc_2007_trainval.mat"
    savemat(path, content)
    with pytest.raises(ValueError, match=message) as info:
        read_proposals(path, ["a"])
    assert str(path) in str(info.value)


def test_missing_image_and_missing_file_are_named(tmp_path):
    path = tmp_path / "voc_2007_trainval.mat"
    savemat(path, {"boxes": cell([np.ones((1, 4)), np.ones((1, 4))]), "images": cell(["a", "b"], shape=(2, 1))})
    with pytest.raises(ValueError, match=f"{path}: no proposals for image c$"):
        read_proposals(path, ["a", "c", "d"])
    positional = tmp_path / "positional.mat"
    savemat(positional, {"boxes": cell([np.ones((1, 4))])})
    with pytest.raises(ValueError, match="no proposals for image b "):
        read_proposals(positional, ["a", "b"])
    with pytest.raises(ValueError, match="proposals file not found"):
        read_proposals(tmp_path / "voc_2007_test.mat", ["a"])


def test_scales_and_flips_by_hand():
    assert image_scale(375, 500, 600, 1000) == pytest.approx(1.6)  # 800 on the longer side: under the cap
    assert image_scale(375, 500, 1200, 2000) == pytest.approx(3.2)
    assert image_scale(100, 1000, 600, 1000) == pytest.approx(1.0)  # capped: the longer side to 1000
    assert scaled_size(375, 500, 1.6) == (600, 800)
    np.testing.assert_array_equal(flip_pixels(np.array([[0.0, 2.0, 9.0, 5.0]]), 100), [[90, 2, 99, 5]])


def test_builtin_proposals_cover_every_id_and_training_items_follow_the_flip(tmp_path):
    make_voc_fixture(tmp_path, n_trainval07=4, n_test07=2, n_train12=2, n_val12=2, image_size=(64, 80),
                     bad=("missing_annotation",))
    folder = write_builtin_proposals(tmp_path)
    devkit = tmp_path / "VOCdevkit" / "VOC2007"
    for split in ("trainval", "test"):
        ids = read_ids(devkit / "ImageSets" / "Main" / f"{split}.txt")
        props = read_proposals(proposal_file(folder, 2007, split), ids)  # the id without annotation included
        assert all(len(p) and (p[:, 2] >= p[:, 0]).all() and p.min() >= 0 for p in props.values())
    records, _ = load_main_split(tmp_path, 2007, "test")
    items = FastRCNNImages(records, train=False, scales=[40], max_size=200,
                           rois=[np.array([[1.0, 2.0, 3.0, 4.0]])] * len(records))
    image, target, _ = items[0]
    assert target["scale"] == pytest.approx(40 / min(image.shape[-2:]))
    torch.testing.assert_close(target["rois"], torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
