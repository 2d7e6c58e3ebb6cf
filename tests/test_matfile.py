"""ssl_colorize.data.matfile.load_mat: every unreadable .mat is one ValueError naming the file."""

import numpy as np
import pytest
from scipy.io import savemat

from ssl_colorize.data.matfile import load_mat
from ssl_colorize.data.voc_segmentation import SBDLayoutError, read_sbd_mask


def _v73_file(path):
    """A MATLAB v7.3 file's 128-byte header (text, subsystem offset, version 0x0200, 'IM') before HDF5 data."""
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, HDF5 schema 1.00 .".ljust(116, b" ")
    path.write_bytes(header + b"\x00" * 8 + b"\x00\x02" + b"IM" + b"\x89HDF\r\n\x1a\n" + b"\x00" * 64)
    return path


def test_a_readable_file_round_trips(tmp_path):
    savemat(tmp_path / "ok.mat", {"boxes": np.arange(6.0).reshape(2, 3)})
    assert np.array_equal(load_mat(tmp_path / "ok.mat")["boxes"], np.arange(6.0).reshape(2, 3))


@pytest.mark.parametrize("name,content,message", [
    ("v73.mat", None, "MATLAB v7.3 (HDF5) file"),
    ("text.mat", b"hello world " * 20, "not a MATLAB file"),
    ("empty.mat", b"", "not a MATLAB file"),
    ("missing.mat", "absent", "not a MATLAB file"),
])
def test_unreadable_files_are_one_value_error_naming_them(tmp_path, name, content, message):
    path = tmp_path / name
    if content is None:
        _v73_file(path)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    with pytest.raises(ValueError) as error:
        load_mat(path)
    assert str(error.value).startswith(f"{path}: ") and message in str(error.value)


def test_an_sbd_mask_saved_as_v73_is_a_layout_error(tmp_path):
    with pytest.raises(SBDLayoutError, match="v7.3"):
        read_sbd_mask(_v73_file(tmp_path / "2008_000002.mat"))
