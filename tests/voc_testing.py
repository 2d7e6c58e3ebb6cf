"""What the VOC benchmark tests share: the fixture's bad inputs, the common options, row checks."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from ssl_colorize.data.builtin_voc import make_voc_fixture
from ssl_colorize.results import read_rows

BAD = ("missing_annotation", "unknown_class", "corrupt_image", "bad_mask")


def make_small_voc(root: Path):
    """A tiny VOCdevkit (VOC2007 + VOC2012 + SBD) holding every bad input of BAD."""
    return make_voc_fixture(root, n_trainval07=8, n_test07=6, n_train12=6, n_val12=4,
                            image_size=(64, 96), sbd=True, n_sbd=4, bad=BAD)


def common(voc, tmp_path, *extra):
    return ["--data", str(voc.root), "--workers", "0", "--out", str(tmp_path / "run"),
            "--out-csv", str(tmp_path / "voc.csv"), "--seed", "0", *map(str, extra)]


def check_rows(csv: Path, benchmark: str, metric: str, min_rows: int) -> pd.DataFrame:
    rows = read_rows(csv)
    assert len(rows) >= min_rows
    assert set(rows["benchmark"]) == {benchmark}
    main = rows[rows["metric"] == metric]
    assert len(main) and main["value"].between(0, 100).all()
    assert (rows["encoder"] == "alexnet_lab").all() and (rows["checkpoint"] == "random").all()
    return rows


def check_bad_inputs_reported(summary: dict, voc, expect: tuple[str, ...]) -> None:
    text = json.dumps(summary)
    for case in expect:
        assert str(voc.bad_files[case]) in text, f"{case} not reported"
