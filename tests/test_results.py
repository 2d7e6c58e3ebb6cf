"""Result rows and tables: concurrent merging, the published numbers, the paper-style pivot, the CLI."""

from __future__ import annotations

import multiprocessing as mp
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ssl_colorize import results

REPO = Path(__file__).resolve().parent.parent
TAPS = ("conv1", "conv2", "conv3", "conv4", "conv5")


def _row(run_id="r", tap="conv1", value=1.0, metric="top1", dataset="imagenet", checkpoint="random",
         encoder="alexnet_lab", protocol="linear-avg", seed=0, benchmark="linear_probe", **extra):
    return results.make_row(run_id=run_id, benchmark=benchmark, checkpoint=checkpoint, encoder=encoder, tap=tap,
                            dataset=dataset, split="val", protocol=protocol, metric=metric, value=value, seed=seed,
                            hparams={"lr": 0.01}, **extra)


# ----------------------------------------------------------------------------------------------
# Many writers, one table: one file per append_rows call, no lock, nothing torn or lost
# ----------------------------------------------------------------------------------------------

ROWS_PER_APPEND = 10


def _writer(csv_path: str, worker: int, appends: int) -> None:
    for i in range(appends):
        results.append_rows(csv_path, [_row(run_id=f"w{worker}-{i}", tap=f"t{k}", value=worker + i / 1000 + k)
                                       for k in range(ROWS_PER_APPEND)])


def test_concurrent_writers_lose_nothing(tmp_path):
    csv_path = tmp_path / "results" / "merged.csv"
    workers, appends = 4, 100
    context = mp.get_context("fork")
    processes = [context.Process(target=_writer, args=(str(csv_path), w, appends)) for w in range(workers)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(timeout=120)
        assert p.exitcode == 0
    table = results.read_rows(csv_path)
    assert len(table) == workers * appends * ROWS_PER_APPEND == 4000
    expected = {(f"w{w}-{i}", f"t{k}") for w in range(workers) for i in range(appends) for k in range(ROWS_PER_APPEND)}
    assert set(zip(table["run_id"], table["tap"])) == expected
    worker_index = table["run_id"].str[1:].str.split("-", expand=True).astype(int)
    tap_index = table["tap"].str[1:].astype(int)
    # every value intact, next to its own run id
    assert np.allclose(table["value"], worker_index[0] + worker_index[1] / 1000 + tap_index)
    # One file per call, every one complete; no lock files, no temporary files, no shared main CSV.
    parts = sorted(results.parts_dir(csv_path).iterdir())
    assert len(parts) == workers * appends and all(p.suffix == ".csv" and not p.name.startswith(".") for p in parts)
    assert all(p.read_text().count("\n") == ROWS_PER_APPEND + 1 for p in parts)
    assert sorted(f.name for f in csv_path.parent.iterdir()) == ["merged.csv.d"]
    # Each process's files read back in the order it wrote them (names start with the UTC time).
    mine = table[table["run_id"].str.startswith("w2-")]
    assert list(dict.fromkeys(mine["run_id"])) == [f"w2-{i}" for i in range(appends)]


def test_the_launchers_finished_run_lookup_sees_per_run_files(tmp_path):
    """The sweep launcher skips runs whose rows exist: it must see rows written as per-run files."""
    submit = pytest.importorskip("ssl_colorize.launch.submit", reason="the launcher's module moved")
    csv_path = tmp_path / "sweep.csv"
    assert submit.finished_run_ids(csv_path) == set()
    results.append_rows(csv_path, [_row(run_id="a")])
    results.append_rows(csv_path, [_row(run_id="b"), _row(run_id="b", tap="conv2")])
    assert submit.finished_run_ids(csv_path) == {"a", "b"} and submit.rows_exist(csv_path, "b")


def test_a_part_file_is_named_after_its_run_and_empty_appends_write_nothing(tmp_path):
    csv_path = tmp_path / "rows.csv"
    assert results.append_rows(csv_path, []) == results.parts_dir(csv_path)
    assert not results.parts_dir(csv_path).exists() and results.read_rows(csv_path).empty
    written = results.append_rows(csv_path, [_row(run_id="probe a/b", tap="conv1")])
    assert written.parent == tmp_path / "rows.csv.d" and "-probe_a_b-" in written.name
    assert written.read_text().splitlines()[0] == ",".join(results.COLUMNS)
    mixed = results.append_rows(csv_path, [_row(run_id="x"), _row(run_id="y")])
    assert "-mixed-" in mixed.name and mixed != written
    with pytest.raises(ValueError, match="lacks"):
        results.append_rows(csv_path, [{"run_id": "z"}])


def test_read_rows_gathers_the_main_csv_and_the_per_run_files(tmp_path):
    """A table written before the per-run layout (one CSV) still counts, its rows first."""
    csv_path = tmp_path / "old.csv"
    legacy = pd.DataFrame([vars(_row(run_id="legacy", tap=t, value=1.0)) for t in TAPS])
    legacy.to_csv(csv_path, index=False)
    results.append_rows(csv_path, [_row(run_id="new", tap="conv1", value=2.0)])
    table = results.read_rows(csv_path)
    assert list(table["run_id"]) == ["legacy"] * 5 + ["new"]
    # The per-run folder can be named on its own, and several tables read together.
    other = tmp_path / "other.csv"
    results.append_rows(other, [_row(run_id="o")])
    assert list(results.read_rows(results.parts_dir(csv_path))["run_id"]) == ["new"]
    assert len(results.read_rows([csv_path, other, tmp_path / "absent.csv"])) == 7
    # A killed writer's hidden temporary file is skipped; a foreign CSV is named in the error.
    (results.parts_dir(csv_path) / ".x.csv.abc.tmp").write_text("run_id\ntorn")
    assert len(results.read_rows(csv_path)) == 6
    (results.parts_dir(csv_path) / "foreign.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="foreign.csv is not a results table"):
        results.read_rows(csv_path)


def test_find_tables_sees_main_csvs_and_per_run_folders_only(tmp_path):
    results.append_rows(tmp_path / "a.csv", [_row()])
    pd.DataFrame([vars(_row())]).to_csv(tmp_path / "b.csv", index=False)
    (tmp_path / "throughput.csv").write_text("section,value\nloss,1\n")
    assert results.find_tables(tmp_path) == [tmp_path / "a.csv", tmp_path / "b.csv"]
    assert results.find_tables(tmp_path / "absent") == []


def test_code_version_is_the_package_version():
    import ssl_colorize

    assert results.code_version() == ssl_colorize.__version__ and ssl_colorize.__version__
    assert _row().code_version == ssl_colorize.__version__


# ----------------------------------------------------------------------------------------------
# The published numbers (docs/protocols.md sections 4-6, transcribed)
# ----------------------------------------------------------------------------------------------

# docs/protocols.md section 4, "As published" (AlexNet, top-1, conv1..conv5).
PROTOCOL_IMAGENET = {
    "colorization (Zhang et al. 2016)": "12.5 24.5 30.4 31.5 30.3",
    "colorization (Zhang et al. 2016), re-probed 2017": "13.1 24.8 31.0 32.6 31.8",
    "ImageNet labels": "19.3 36.3 44.2 48.3 50.5",
    "random (Gaussian)": "11.6 17.1 16.9 16.3 14.1",
    "k-means init (Krahenbuhl et al. 2016)": "17.5 23.0 24.5 23.2 20.6",
    "context (Doersch et al. 2015)": "16.2 23.3 30.2 31.7 29.6",
    "context encoder (Pathak et al. 2016)": "14.1 20.7 21.0 19.8 15.5",
    "BiGAN (Donahue et al. 2017)": "17.7 24.5 31.0 29.9 28.0",
    "jigsaw (Noroozi & Favaro 2016)": "18.2 28.8 34.0 33.9 27.1",
    "split-brain (Zhang et al. 2017)": "17.7 29.3 35.4 35.2 32.8",
}
PROTOCOL_PLACES = {
    "colorization (Zhang et al. 2016)": "16.0 25.7 29.6 30.3 29.7",
    "Places labels": "22.1 35.1 40.2 43.3 44.6",
    "ImageNet labels": "22.7 34.8 38.4 39.4 38.7",
    "random (Gaussian)": "15.7 20.3 19.8 19.1 17.5",
}


def test_published_csv_holds_every_protocol_number_with_a_source():
    published = results.load_published()
    # Package data, read through importlib.resources (the same table as the file beside the module).
    assert results.PUBLISHED_CSV.is_file()
    assert published.equals(results.load_published(Path(results.__file__).with_name("published.csv")))
    assert list(published.columns) == results.PUBLISHED_COLUMNS
    assert (published["source"].str.len() > 20).all() and (published["tag"].str.len() > 0).all()
    assert published["value"].dtype.kind == "f"
    for dataset, expected in (("imagenet", PROTOCOL_IMAGENET), ("places205", PROTOCOL_PLACES)):
        rows = published.query("benchmark == 'linear_probe' and dataset == @dataset and tap != 'best'")
        assert set(rows["method"]) == set(expected)
        for method, numbers in expected.items():
            got = rows[rows["method"] == method].set_index("tap")["value"]
            assert [got[t] for t in TAPS] == [float(v) for v in numbers.split()], method
    best = published.query("tap == 'best'").set_index("encoder")["value"]
    assert best.to_dict() == {"alexnet": 30.39, "resnet50": 40.11}
    # Section 5: classification fc8 / fc6-8 / all, detection, segmentation.
    cls = published.query("benchmark == 'voc_classification'")
    colorization = cls[cls["method"] == "colorization (Zhang et al. 2016)"].set_index("tap")["value"]
    assert colorization.to_dict() == {"fc8": 52.4, "fc6-8": 61.5, "all": 65.9}
    det = published.query("benchmark == 'voc_detection'").set_index("method")["value"]
    assert det["ImageNet labels"] == 56.8 and det["random (Gaussian)"] == 43.4 and len(det) == 5
    seg = published.query("benchmark == 'voc_segmentation'").set_index("method")["value"]
    assert seg["k-means init (Krahenbuhl et al. 2016)"] == 32.6 and len(seg) == 5
    # Section 6: 6 methods x 4 metrics, less grey's missing study score.
    quality = published.query("benchmark == 'colorization_quality'")
    assert len(quality) == 6 * 4 - 1
    full = quality[quality["method"] == "classification + rebalancing (full)"].set_index("metric")["value"]
    assert full.to_dict() == {"auc_raw": 89.5, "auc_rebalanced": 67.3, "vgg16_top1": 56.0, "amt_fooled": 32.3}


def test_every_published_row_names_its_protocol_split_and_one_source():
    published = results.load_published()
    assert results.published_problems(published) == []
    assert (published["protocol"].str.len() > 0).all() and (published["split"].str.len() > 0).all()
    probes = published[published["benchmark"] == "linear_probe"]
    assert set(probes["protocol"]) == {"zhang", "goyal", "zhang_eccv16_avg"}  # the ECCV paper average-pooled
    assert set(probes.loc[probes["tap"] == "best", "protocol"]) == {"goyal"}  # VISSL re-evaluations
    # The protocols our benchmarks write, so our rows can sit beside these (docs/published-numbers.md).
    by_benchmark = published.groupby("benchmark")["protocol"].agg(set).to_dict()
    assert by_benchmark["voc_classification"] == {"10crop"}
    assert by_benchmark["voc_detection"] == {"fast_rcnn_11point"}  # Fast R-CNN: not beside our Faster R-CNN
    assert by_benchmark["voc_segmentation"] == {"fcn32s", "fcn32s_colour_input"}
    assert set(published.loc[published["benchmark"] == "voc_segmentation", "split"]) == {"seg11valid"}
    assert by_benchmark["colorization_quality"] == {"annealed_mean", "baseline", "classifier_top1_imagenet_labels",
                                                    "real_vs_fake_2afc"}
    # The row once without a source is the split-brain paper's re-probe of the colorization model.
    reprobed = published[published["method"] == "colorization (Zhang et al. 2016), re-probed 2017"]
    assert set(reprobed["source"]) == {"Zhang et al. CVPR 2017 (Split-Brain Autoencoders, arXiv 1611.09842), Table 2"}
    # The probe protocols are the probe's own names.
    from ssl_colorize.heads.probe_pool import LEGACY_POOL, PROTOCOLS
    assert results.PROBE_PROTOCOLS == PROTOCOLS
    assert {results.canonical_protocol(f"linear-{old}") for old in LEGACY_POOL} == set(PROTOCOLS)


@pytest.mark.parametrize("column, value, expect", [
    ("protocol", "", "empty protocol"),
    ("split", " ", "empty split"),
    ("source", "", "empty source"),
    ("protocol", "linear-avg", "is not one of"),
    ("source", "Zhang et al. ECCV 2016 and Split-Brain Autoencoders, CVPR 2017: comparison tables", "one publication"),
    ("source", "Zhang et al. ECCV 2016, Table 2; Zhang et al. CVPR 2017, Table 2", "one publication"),
    ("source", "Zhang et al. ECCV 2016, Noroozi et al. ECCV 2016, Table 2", "one publication"),
    ("source", "Zhang et al. ECCV 2016 (Colorful Image Colorization)", "one publication"),  # no table
    ("source", "a secondary table (docs/protocols.md section 4)", "one publication"),  # no paper
])
def test_a_published_row_without_protocol_or_with_two_sources_is_a_problem(column, value, expect):
    published = results.load_published()
    assert results.published_problems(published) == []
    broken = published.copy()
    broken.loc[3, column] = value
    problems = results.published_problems(broken)
    assert len(problems) == 1 and expect in problems[0] and "line 5 " in problems[0]


def test_two_published_rows_for_one_cell_are_a_problem():
    published = results.load_published()
    doubled = pd.concat([published, published.iloc[[0]]], ignore_index=True)
    problems = results.published_problems(doubled)
    assert len(problems) == 1 and "more than once" in problems[0]


# ----------------------------------------------------------------------------------------------
# The paper-style table
# ----------------------------------------------------------------------------------------------

def _ours_frame() -> pd.DataFrame:
    rows = []
    for seed, offset in ((0, 0.0), (1, 2.0)):  # two seeds of the random baseline
        rows += [_row(run_id=f"rand{seed}", tap=t, value=10.0 + i + offset, seed=seed) for i, t in enumerate(TAPS)]
    # The pretrained run lacks conv1 and has a duplicated (re-appended) conv3 row: the latest one counts.
    rows += [_row(run_id="pre", tap=t, value=20.0 + i, checkpoint="runs/a/checkpoint.pth") for i, t in enumerate(TAPS[1:], 1)]
    rows += [_row(run_id="pre", tap="conv3", value=99.0, checkpoint="runs/a/checkpoint.pth",
                  time="2099-01-01T00:00:00+00:00")]
    rows += [_row(run_id="pre", tap="conv2", value=70.0, metric="top5", checkpoint="runs/a/checkpoint.pth")]
    rows += [_row(run_id="other", tap="conv2", value=1.0, dataset="places205")]
    frame = pd.DataFrame([vars(r) for r in rows])
    return frame.sample(frac=1.0, random_state=0).reset_index(drop=True)  # order must not matter


def test_table_pivots_ours_beside_the_published():
    published = results.load_published()
    table = results.paper_table(_ours_frame(), published, benchmark="linear_probe", dataset="imagenet", metric="top1")
    assert list(table.columns) == ["method", "kind", "protocol", *TAPS, "best", "runs"]
    # Published rows first, in the published table's order, with their numbers.
    kinds = list(table["kind"])
    assert kinds == ["published"] * 12 + ["ours"] * 2
    first = table.iloc[0]
    assert first["method"] == "colorization (Zhang et al. 2016)"
    assert [first[t] for t in TAPS] == [12.5, 24.5, 30.4, 31.5, 30.3]
    ours = table[table["kind"] == "ours"].set_index("method")
    rand = ours.loc["ours: alexnet_lab random"]
    # Mean of the two seeds: 10 + i + 1.
    assert [rand[t] for t in TAPS] == [11.0, 12.0, 13.0, 14.0, 15.0] and rand["runs"] == 2
    pre = ours.loc["ours: alexnet_lab runs/a/checkpoint.pth"]
    assert np.isnan(pre["conv1"]) and pre["conv2"] == 21.0 and pre["conv3"] == 99.0 and pre["runs"] == 1
    assert rand["protocol"] == "goyal"  # written as linear-avg, read by today's name
    # Other metric and dataset stay out; the top-5 table has only ours.
    top5 = results.paper_table(_ours_frame(), published, benchmark="linear_probe", dataset="imagenet", metric="top5")
    assert list(top5["method"]) == ["ours: alexnet_lab runs/a/checkpoint.pth"] and top5.iloc[0]["conv2"] == 70.0


def test_tables_cover_each_benchmark_dataset_metric_and_single_tap_benchmarks_pivot_on_metrics():
    ours = pd.DataFrame([vars(_row(run_id="d", tap="all", metric="mAP", value=40.0, dataset="voc2007",
                                   benchmark="voc_detection"))])
    ours = pd.concat([ours, _ours_frame()], ignore_index=True)
    tables = dict(results.paper_tables(ours, results.load_published(), reference=False))
    assert set(tables) == {"voc_detection | voc2007 [goyal]", "linear_probe | imagenet | top1 [goyal]",
                           "linear_probe | imagenet | top5 [goyal]", "linear_probe | places205 | top1 [goyal]"}
    det = tables["voc_detection | voc2007 [goyal]"]
    assert value_cols(det) == ["mAP"]
    assert det.set_index("method").loc["ours: alexnet_lab random", "mAP"] == 40.0
    with_reference = dict(results.paper_tables(ours[ours["dataset"] == "voc2007"], results.load_published()))
    # The same benchmark's published tables on other datasets are not invented; voc_detection has only voc2007.
    assert set(with_reference) == {"voc_detection | voc2007 [goyal]",
                                   "voc_detection | voc2007 (published) [fast_rcnn_11point]"}
    builtin = pd.DataFrame([vars(_row(run_id="b", tap=t, dataset="builtin-shapes")) for t in TAPS])
    shown = [title for title, _ in results.paper_tables(builtin, results.load_published())]
    assert shown == ["linear_probe | builtin-shapes | top1 [goyal]",
                     "linear_probe | imagenet | top1 (published) [zhang_eccv16_avg]",
                     "linear_probe | imagenet | top1 (published) [zhang]",
                     "linear_probe | imagenet | top1 (published) [goyal]",
                     "linear_probe | places205 | top1 (published) [zhang]"]


def test_our_rows_appear_only_in_the_table_of_their_protocol():
    rows = [_row(run_id=f"{proto}-run", tap=t, value=float(i), protocol=proto, checkpoint=f"runs/{proto}")
            for proto in ("zhang", "goyal", "max") for i, t in enumerate(TAPS)]
    rows += [_row(run_id="old", tap=t, protocol="linear-bilinear", checkpoint="runs/old") for t in TAPS]
    rows += [_row(run_id="det", benchmark="voc_detection", dataset="voc2007", tap="all", metric="mAP", value=40.0,
                  protocol="faster_rcnn_11point")]
    ours = pd.DataFrame([vars(r) for r in rows])
    tables = dict(results.paper_tables(ours, results.load_published()))
    where = {}  # our method -> the tables it appears in
    for title, table in tables.items():
        protocol = title.rsplit(" [", 1)[1].removesuffix("]")
        assert set(table["protocol"]) <= {protocol}, title  # one protocol per table, ours and published
        for method in table.loc[table["kind"] == "ours", "method"]:
            where.setdefault(method, []).append(title)
    assert where == {
        "ours: alexnet_lab runs/zhang": ["linear_probe | imagenet | top1 [zhang]"],
        "ours: alexnet_lab runs/old": ["linear_probe | imagenet | top1 [zhang]"],  # linear-bilinear = zhang
        "ours: alexnet_lab runs/goyal": ["linear_probe | imagenet | top1 [goyal]"],
        "ours: alexnet_lab runs/max": ["linear_probe | imagenet | top1 [max]"],
        "ours: alexnet_lab random": ["voc_detection | voc2007 [faster_rcnn_11point]"],
    }
    zhang = tables["linear_probe | imagenet | top1 [zhang]"].set_index("method")
    assert "split-brain (Zhang et al. 2017)" in zhang.index
    assert "colorization, Goyal et al. weights (VISSL)" not in zhang.index
    goyal = tables["linear_probe | imagenet | top1 [goyal]"]
    assert set(goyal.loc[goyal["kind"] == "published", "method"]) == {
        "colorization, Goyal et al. weights (VISSL)", "colorization ResNet-50, Goyal et al. weights (VISSL)"}
    assert list(tables["linear_probe | imagenet | top1 [max]"]["kind"]) == ["ours"]  # nothing published for max
    # Our Faster R-CNN is not placed beside the paper's Fast R-CNN; the paper's table is a reference of its own.
    assert list(tables["voc_detection | voc2007 [faster_rcnn_11point]"]["kind"]) == ["ours"]
    assert "voc_detection | voc2007 (published) [fast_rcnn_11point]" in tables
    # The printed label carries the protocol; one protocol asked for keeps ours and published to it.
    text = results.format_table(tables["linear_probe | imagenet | top1 [zhang]"])
    assert "ours: alexnet_lab runs/zhang [zhang]" in text and "split-brain (Zhang et al. 2017) [zhang]" in text
    only = dict(results.paper_tables(ours, results.load_published(), protocol="linear-avg"))
    assert list(only) == ["linear_probe | imagenet | top1 [goyal]"]


def value_cols(table):
    return results.value_columns(table)


def test_format_table_shows_dashes_for_missing_numbers():
    table = results.paper_table(_ours_frame(), None, benchmark="linear_probe", dataset="imagenet", metric="top1")
    text = results.format_table(table, "title")
    lines = text.splitlines()
    assert lines[0] == "title"
    row = next(line for line in lines if line.startswith("ours: alexnet_lab runs/a"))
    assert row.split()[-6:] == ["-", "21.0", "99.0", "23.0", "24.0", "1"]


def test_cli_prints_the_table_and_draws_the_plot(tmp_path, capsys):
    csv_path = tmp_path / "rows.csv"
    results.append_rows(csv_path, [_row(run_id="x", tap=t, value=5.0 * (i + 1)) for i, t in enumerate(TAPS)])
    png = tmp_path / "layers.png"
    assert results.cli([str(csv_path), "--benchmark", "linear_probe", "--dataset", "imagenet", "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "linear_probe | imagenet | top1 [goyal]" in out
    assert "ours: alexnet_lab random [goyal]" in out and "split-brain (Zhang et al. 2017) [zhang]" in out
    assert "5.0   10.0   15.0   20.0   25.0" in out
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] > 300
    # The module entry point (python -m ssl_colorize.results) and the filters.
    done = subprocess.run([sys.executable, "-m", "ssl_colorize.results", str(csv_path), "--no-published"],
                          capture_output=True, text=True, cwd=REPO, check=True)
    assert "ours: alexnet_lab random" in done.stdout and "Zhang" not in done.stdout


def _module_cli(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ssl_colorize.results", *argv], capture_output=True, text=True,
                          cwd=cwd)


def test_cli_reads_our_tables_from_the_current_folder_and_prints_the_published_alone_without_them(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    done = _module_cli(cwd=empty)
    assert done.returncode == 0, done.stderr
    assert "linear_probe | imagenet | top1 (published) [zhang]" in done.stdout and "ours:" not in done.stdout
    assert list(empty.iterdir()) == []  # reading the tables writes nothing
    # Rows of ours under ./results/ (a per-run folder only, as jobs write them) are found by default.
    results.append_rows(empty / "results" / "linear_probe.csv", [_row(run_id="x", tap=t, value=7.0) for t in TAPS])
    done = _module_cli("--benchmark", "linear_probe", "--dataset", "imagenet", cwd=empty)
    assert done.returncode == 0 and "ours: alexnet_lab random" in done.stdout
    # Named explicitly by its main CSV name, though only the per-run folder exists.
    assert "ours: alexnet_lab random" in _module_cli("results/linear_probe.csv", cwd=empty).stdout
    assert "ours: alexnet_lab random" in _module_cli("results", cwd=tmp_path / "empty").stdout  # a folder of tables
    # --export gathers the (filtered) rows into one CSV, which reads back as the same rows.
    results.append_rows(empty / "results" / "voc.csv", [_row(run_id="v", benchmark="voc_detection", tap="all")])
    done = _module_cli("--export", "all.csv", "--benchmark", "linear_probe", cwd=empty)
    assert done.returncode == 0 and "5 rows -> all.csv" in done.stdout
    exported = results.read_rows(empty / "all.csv")
    pd.testing.assert_frame_equal(exported, results.read_rows(empty / "results" / "linear_probe.csv"))


@pytest.mark.parametrize("argv, expect", [
    (["missing.csv"], "CSV missing.csv: no such results table"),
    (["--published", "nope.csv"], "--published nope.csv: no such file"),
    (["--png", "a_file/plot.png"], "--png a_file/plot.png: "),
    (["foreign.csv"], "foreign.csv is not a results table"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["foreign.csv", "--export", "foreign.csv"], "--export foreign.csv: is one of the tables read"),
])
def test_cli_mistakes_are_one_line_exit_2_and_write_nothing(tmp_path, argv, expect):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "foreign.csv").write_text("a,b\n1,2\n")
    before = sorted(tmp_path.iterdir())
    done = _module_cli(*argv, cwd=tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0] and "Traceback" not in done.stderr
    assert sorted(tmp_path.iterdir()) == before


def test_plots_leave_pyplot_alone(tmp_path):
    """A figure of its own: pyplot is neither imported nor switched to another backend."""
    code = ("import sys; from ssl_colorize import results as r; import pandas as pd\n"
            "t = r.paper_table(pd.DataFrame(columns=r.COLUMNS), r.load_published(), benchmark='linear_probe',"
            " dataset='imagenet')\n"
            f"r.plot_accuracy_vs_layer(t, {str(tmp_path / 'p.png')!r})\n"
            "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
    with Image.open(tmp_path / "p.png") as image:
        assert image.format == "PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.png"]  # no temporary file left


def test_text_columns_stay_text_when_they_look_like_numbers(tmp_path):
    """A commit hash of decimal digits only (it happens: 264756118506) or a numeric run id is still text."""
    path = tmp_path / "rows.csv"
    results.append_rows(path, [results.ResultRow(run_id="7", benchmark="b", checkpoint="c", encoder="e", tap="conv1",
                                                 dataset="d", split="val", protocol="p", metric="top1", value=1.5,
                                                 seed=3, code_version="264756118506", time="t")])
    table = results.read_rows(path)
    assert table.loc[0, "code_version"] == "264756118506" and table.loc[0, "run_id"] == "7"
    assert table["code_version"].str.len().min() == 12
    assert table.loc[0, "seed"] == 3 and table.loc[0, "value"] == 1.5
