"""ssl_colorize.atomic.atomic_write: all or nothing, with the permissions of a plain open()."""

import os

import pytest

from ssl_colorize.atomic import atomic_write


def test_the_file_appears_whole_with_a_plain_files_mode(tmp_path):
    path = tmp_path / "rows.csv"
    with atomic_write(path, "w") as handle:
        handle.write("a,b\n")
        assert not path.exists()  # nothing at the target until the block ends
    assert path.read_text() == "a,b\n"
    (tmp_path / "plain.csv").write_text("x")  # what open() gives, under this process's umask
    assert os.stat(path).st_mode & 0o777 == os.stat(tmp_path / "plain.csv").st_mode & 0o777


def test_a_failure_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("old\n")
    with pytest.raises(RuntimeError):
        with atomic_write(path, "w") as handle:
            handle.write("half")
            raise RuntimeError("killed")
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["rows.csv"]
