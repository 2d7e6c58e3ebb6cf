"""VOC2007 linear SVMs on frozen features (ssl_colorize.benchmarks.voc_svm, heads.svm, heads.svm_features)."""

import json

import numpy as np
import pytest

from ssl_colorize.benchmarks import voc_svm as svm_bench
from ssl_colorize.data.builtin_voc import make_voc_fixture
from ssl_colorize.heads.svm import choose_cost
from ssl_colorize.voc_metrics import average_precision
from voc_testing import check_bad_inputs_reported, check_rows, common, make_small_voc



@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    return make_small_voc(tmp_path_factory.mktemp("vocdata"))


def run_cli(argv):
    """The CLI as a user runs it: validate, then main (exit 2 and one stderr line on a user's mistake)."""
    return svm_bench.cli(argv)


def test_svm_end_to_end_with_feature_cache(voc, tmp_path, monkeypatch):
    argv = common(voc, tmp_path, "--taps", "conv1,conv5", "--costs", "0.1,10", "--batch-size", 8)
    summary = run_cli(argv)
    rows = check_rows(tmp_path / "voc.csv", "voc_svm", "mAP", 2)
    maps = rows[rows["metric"] == "mAP"]
    assert list(maps["tap"]) == ["conv1", "conv5"]
    dims = {tap: json.loads(h)["dims"] for tap, h in zip(maps["tap"], maps["hparams"])}
    assert dims == {"conv1": 96 * 10 * 10, "conv5": 256 * 6 * 6}  # docs/protocols.md section 4 pooling
    cached = sorted(p.name for p in (tmp_path / "run" / "features").glob("*.npz"))
    assert len(cached) == 2 and [name.split("_")[0] for name in cached] == ["test", "trainval"]  # one per split
    assert not list((tmp_path / "run" / "features").glob(".*"))  # no temporary file left behind
    check_bad_inputs_reported(summary, voc, ("missing_annotation", "unknown_class", "corrupt_image"))
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["tap"]) for r in log] == [(1, "conv1"), (2, "conv5")]

    # The features come from the cache on a resumed run: the encoder is neither built nor run.
    def refuse(*args, **kwargs):
        raise AssertionError("features should have come from the cache")

    monkeypatch.setattr(svm_bench, "extract_features", refuse)
    (tmp_path / "run" / "checkpoint.pth").unlink()  # as if killed before the first tap's SVMs finished
    again = run_cli(argv + ["--resume"])
    for tap in ("conv1", "conv5"):
        assert again["metrics"][tap]["mAP"] == pytest.approx(summary["metrics"][tap]["mAP"])
    # The runtime-skipped files are remembered with the cached features.
    assert again["skipped_at_runtime"] == summary["skipped_at_runtime"] and summary["skipped_at_runtime"]
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]  # no step twice after the resume


def test_svm_used_run_folder_is_refused_and_settings_kept_on_resume(voc, tmp_path, capsys):
    argv = common(voc, tmp_path, "--taps", "conv5", "--costs", "1", "--batch-size", 8)
    run_cli(argv)
    capsys.readouterr()
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as exit_info:
        run_cli(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--resume" in err[0] and "--overwrite" in err[0]
    with pytest.raises(SystemExit):
        run_cli(argv[:-6] + ["--taps", "conv5", "--costs", "10", "--batch-size", "8", "--resume"])
    assert "costs" in capsys.readouterr().err
    after = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    assert after == before  # the first run's files are untouched
    # --overwrite starts clean: the features are extracted again.
    run_cli(argv + ["--overwrite"])
    assert "saved" in capsys.readouterr().out


@pytest.mark.parametrize("extra, option", [
    (["--crop", "0"], "--crop 0"),
    (["--costs", "1,-1"], "--costs 1,-1"),
    (["--folds", "1"], "--folds 1"),
    (["--taps", "conv9"], "--taps conv9"),
    (["--checkpoint", "/nonexistent/ckpt.pth"], "--checkpoint /nonexistent/ckpt.pth"),
    (["--encoder", "nonet"], "--encoder nonet"),
    (["--input", "rgb"], "--input rgb"),
    (["--resume", "--overwrite"], "--resume and --overwrite"),
])
def test_svm_bad_options_exit_2_with_one_line_and_nothing_written(voc, tmp_path, monkeypatch, capsys, extra, option):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(common(voc, tmp_path, *extra))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and option in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_svm_unwritable_outputs_and_missing_split_fail_before_any_work(voc, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setattr(svm_bench, "extract_features", lambda *a, **k: pytest.fail("work started"))
    for argv, option in (([*common(voc, tmp_path)[:-6], "--out-csv", str(blocker / "voc.csv")], "--out-csv"),
                         ([*common(voc, tmp_path)[:4], "--out", str(blocker / "run")], "--out")):
        with pytest.raises(SystemExit) as exit_info:
            run_cli(argv)
        assert exit_info.value.code == 2 and option in capsys.readouterr().err
    broken = make_voc_fixture(tmp_path / "data", n_trainval07=2, n_test07=2, n_train12=2, n_val12=2,
                              image_size=(32, 40), bad=("missing_split",))
    with pytest.raises(SystemExit):
        run_cli(["--data", str(broken.root), "--out", str(tmp_path / "run")])
    assert str(broken.bad_files["missing_split"]) in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "data"]


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")  # the reference fits below
def test_svm_cost_is_chosen_as_cross_validation_by_hand_would():
    from sklearn.model_selection import StratifiedKFold
    from sklearn.svm import LinearSVC

    rng = np.random.default_rng(1)
    x = rng.normal(size=(45, 12))
    y = np.where(x[:, 0] + 0.7 * rng.normal(size=45) > 0.4, 1, -1)
    costs = [1e-4, 1e-2, 1.0, 100.0]
    model, best, info = choose_cost(x, y, costs, folds=3, fallback=1.0, max_iter=5000, seed=0)
    # Independently: unshuffled stratified folds, the VOC AP of each held-out fold, averaged.
    reference = {}
    for c in costs:
        fold_aps = []
        for train, held in StratifiedKFold(3).split(x, y):
            svm = LinearSVC(C=c, class_weight={1: 2, -1: 1}, dual=True, max_iter=5000, random_state=0).fit(x[train], y[train])
            fold_aps.append(average_precision(svm.decision_function(x[held]), y[held] > 0))
        reference[c] = float(np.mean(fold_aps))
    for c in costs:
        assert info["cv_ap"][c] == pytest.approx(reference[c], abs=1e-9)
    assert info["folds"] == 3
    assert best == max(costs, key=lambda c: (reference[c], -costs.index(c)))  # first best wins ties
    refit = LinearSVC(C=best, class_weight={1: 2, -1: 1}, dual=True, max_iter=5000, random_state=0).fit(x, y)
    np.testing.assert_allclose(model.coef_, refit.coef_)
    # A single positive: nothing to cross-validate, the fallback cost.
    y_one = -np.ones(45, dtype=int)
    y_one[3] = 1
    _, cost, info = choose_cost(x, y_one, costs, folds=3, fallback=0.5, max_iter=5000, seed=0)
    assert cost == 0.5 and info == {"fallback": True}
