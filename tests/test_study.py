"""The real-vs-fake study (ssl_colorize.study): build, plan, database rules, the server, a real headless
Chromium participant, and the report against a hand computation from the raw answers.

The study is built at 32 px from random colornet / alexnet_lab inits on the built-in photographs (the
images' content does not matter to the mechanics); the browser session runs the paper's default
numbers (10 practice + 40 test pairs, 10% attention checks) with the display time shortened to 150 ms.
"""

import json
import math
import os
import random
import shutil
import sqlite3
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_colorize.color import rgb_to_lab
from ssl_colorize.results import read_rows
from ssl_colorize.study.__main__ import cli as study_cli, get_args_parser, main as study_main
from ssl_colorize.study.build import build_study
from ssl_colorize.study.db import AnswerRejected, StudyDB
from ssl_colorize.study.plan import Protocol, load_study, plan_session, session_rng
from ssl_colorize.study.report import summarize
from ssl_colorize.study.server import make_server

SIZE = 32
DISPLAY_MS = 150
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "s1"
    build_study(["random:colornet", "random:alexnet_lab"], out, arm_names=["colornet", "alexnet"],
                protocol=Protocol(size=SIZE), seed=5, device="cpu")
    return out


def _read_png(path: Path) -> torch.Tensor:
    with Image.open(path) as image:
        return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1).float() / 255.0


# ------------------------------------------------------------------------------------ build and plan
def test_built_study_has_the_papers_protocol_and_images(study_dir):
    study = load_study(study_dir)
    p = study["protocol"]
    assert (p.practice, p.test, p.attention_rate, p.display_ms) == (10, 40, 0.1, 1000)
    assert [arm["name"] for arm in study["arms"]] == ["colornet", "alexnet"]
    ids = [image["id"] for image in study["images"]]
    assert len(ids) == 10  # the built-in photographs, none grey
    donors = study["random_donors"]
    assert sorted(donors.values()) == sorted(ids) and all(donors[i] != i for i in ids)  # a derangement
    for image_id in ids[:3]:
        real = _read_png(study_dir / "images" / "real" / f"{image_id}.png")
        assert real.shape == (3, SIZE, SIZE)
        L_real = rgb_to_lab(real[None])[0, 0]
        # Every fake keeps the photograph's own L (up to 8-bit rounding and the sRGB clip).
        for folder in [arm["folder"] for arm in study["arms"]] + ["random"]:
            fake = _read_png(study_dir / "images" / folder / f"{image_id}.png")
            assert float((rgb_to_lab(fake[None])[0, 0] - L_real).abs().median()) < 1.0
        # The attention-check image carries the donor's colours, not its own.
        random_ab = rgb_to_lab(_read_png(study_dir / "images" / "random" / f"{image_id}.png")[None])[0, 1:]
        donor_ab = rgb_to_lab(_read_png(study_dir / "images" / "real" / f"{donors[image_id]}.png")[None])[0, 1:]
        own_ab = rgb_to_lab(real[None])[0, 1:]
        assert (random_ab - donor_ab).abs().mean() < (random_ab - own_ab).abs().mean()


def test_default_session_plan(study_dir):
    study = load_study(study_dir)
    ids = [image["id"] for image in study["images"]]
    trials = plan_session(ids, study["protocol"], session_rng(study["seed"], 1))
    assert len(trials) == 50 and [t.index for t in trials] == list(range(50))
    practice = [t for t in trials if t.phase == "practice"]
    test = [t for t in trials if t.phase == "test"]
    assert trials[:10] == practice and len(test) == 40
    assert sum(t.kind == "attention" for t in practice) == 1  # 10% of 10
    assert sum(t.kind == "attention" for t in test) == 4  # 10% of 40
    # Photographs are drawn without repetition until the pool of 10 runs out.
    for start in range(0, 50, 10):
        assert len({t.image for t in trials[start : start + 10]}) == 10
    # Random left/right order, reproducible from the study seed and the session number.
    sides = [t.fake_side for t in trials]
    assert 10 <= sides.count("left") <= 40
    assert plan_session(ids, study["protocol"], session_rng(study["seed"], 1)) == trials
    assert plan_session(ids, study["protocol"], session_rng(study["seed"], 2)) != trials


def test_build_refuses_bad_input(tmp_path, study_dir):
    with pytest.raises(ValueError, match="already holds a study"):
        build_study(["random:colornet"], study_dir, protocol=Protocol(size=SIZE))
    grey = tmp_path / "grey"
    grey.mkdir()
    for k in range(3):
        Image.fromarray(np.full((40, 40, 3), 60 * k, dtype=np.uint8)).save(grey / f"{k}.png")
    with pytest.raises(ValueError, match=r"grey.* 0 readable colour photograph"):
        build_study(["random:colornet"], tmp_path / "new", photos=grey, protocol=Protocol(size=SIZE))
    with pytest.raises(ValueError, match="attention_rate"):
        Protocol(attention_rate=1.5).validate()


def _cli_error(capsys, argv) -> str:
    """Run ``python -m ssl_colorize.study ARGV``: it must exit 2 with one stderr line; return that line."""
    with pytest.raises(SystemExit) as exit_info:
        study_cli(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_cli_bad_options_and_paths_exit_2_with_one_line(study_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    build = ["build", "--checkpoint", "random:colornet", "--out"]
    for argv, expected in (
        ([*build, str(tmp_path / "s"), "--size", "4"], "--size 4: must be >= 8"),
        ([*build, str(tmp_path / "s"), "--attention-rate", "1.5"], "--attention-rate 1.5: must be in [0, 1)"),
        ([*build, str(tmp_path / "s"), "--temperature", "0"], "--temperature 0.0: must be > 0"),
        ([*build, str(tmp_path / "s"), "--photos", str(tmp_path / "nope")], "--photos"),
        ([*build, str(tmp_path / "s"), "--arm-name", "a", "b"], "--arm-name a b: 2 names for 1 checkpoints"),
        (["build", "--checkpoint", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "s")], "missing.pth"),
        ([*build, str(blocker / "s")], f"--out {blocker / 's'}"),
        ([*build, str(study_dir)], "already holds a study"),
        (["serve", str(tmp_path / "nope"), "--port", "0"], "is not a study folder"),
        (["serve", str(study_dir), "--port", "70000"], "--port 70000: must be <= 65535"),
        (["report", str(study_dir)], "no answers yet"),
        (["report", str(tmp_path)], "is not a study folder"),
        (["report", str(study_dir), "--bootstrap", "1"], "--bootstrap 1"),
        (["build", "--out"], "--out: expected one argument"),
    ):
        line = _cli_error(capsys, argv)
        assert line.startswith("python -m ssl_colorize.study") and expected in line, (argv, line)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # nothing written, no results/ folder


def test_cli_report_out_csv_checked_before_reading_answers(study_dir, tmp_path, capsys):
    study = tmp_path / "study"
    shutil.copytree(study_dir, study)
    StudyDB(study / "answers.sqlite", arms=["colornet", "alexnet"]).close()
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    line = _cli_error(capsys, ["report", str(study), "--out-csv", str(blocker / "rows.csv")])
    assert f"--out-csv {blocker / 'rows.csv'}" in line
    assert not (tmp_path / "a-file.d").exists()


# -------------------------------------------------------------------------------------- database rules
def _plan_for(study):
    ids = [image["id"] for image in study["images"]]
    return lambda number, arm: plan_session(ids, study["protocol"], session_rng(study["seed"], number))


def test_database_rejects_duplicates_and_out_of_order_answers(tmp_path, study_dir):
    study = load_study(study_dir)
    db = StudyDB(tmp_path / "answers.sqlite", arms=["colornet", "alexnet"])
    assert db.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL: a committed answer survives a crash
    first = db.create_session(_plan_for(study), display_ms=1000)
    second = db.create_session(_plan_for(study), display_ms=1000)
    assert [db.arm_of(first["session"]), db.arm_of(second["session"])] == ["colornet", "alexnet"]
    sid = first["session"]
    outcome = db.record_answer(sid, 0, "left", response_ms=5, shown_ms=1000)
    assert outcome["next"] == 1 and "feedback" in outcome
    with pytest.raises(AnswerRejected, match="trial 0 .* already answered .*not recorded"):
        db.record_answer(sid, 0, "right")
    with pytest.raises(AnswerRejected, match="out of order: trial 1 is the next one"):
        db.record_answer(sid, 3, "right")
    # The database enforces the same rules on its own, against any writer.
    fooled_5 = int(db.trial(sid, 5)["fake_side"] != "left")
    with pytest.raises(sqlite3.IntegrityError, match="out of order"):
        db.conn.execute("INSERT INTO answers VALUES (?, 5, 'left', ?, NULL, NULL, 'now')", (sid, fooled_5))
    fake_side = db.trial(sid, 1)["fake_side"]
    with pytest.raises(sqlite3.IntegrityError, match="fooled flag disagrees"):
        db.conn.execute("INSERT INTO answers VALUES (?, 1, ?, 1, NULL, NULL, 'now')", (sid, fake_side))
    with pytest.raises(sqlite3.IntegrityError, match="answers are final"):
        db.conn.execute("UPDATE answers SET chosen_side = 'right' WHERE session_id = ?", (sid,))
    with pytest.raises(sqlite3.IntegrityError, match="answers are final"):
        db.conn.execute("DELETE FROM answers")
    assert [(a["idx"], a["chosen_side"]) for a in db.answers()] == [(0, "left")]
    assert db.integrity_ok()
    db.close()


# ------------------------------------------------------------------------------------------ the server
def _http(url, payload=None):
    """(status, JSON body) of a GET, or a POST when payload is given."""
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, method="GET" if data is None else "POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_server_defaults_to_the_papers_one_second_on_localhost(study_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(study_dir, copy)
    server = make_server(copy, port=0, quiet=True)
    try:
        assert server.server_address[0] == "127.0.0.1"
        assert server.display_ms == 1000
    finally:
        server.server_close()


def _replays_are_rejected(server, session_id):
    """A replayed, an unknown and an out-of-order answer are refused with a clear message."""
    base = server.url + f"api/sessions/{session_id}/answers"
    status, body = _http(base, {"trial": 0, "choice": "right"})
    assert status == 409 and "already answered" in body["error"] and "not recorded" in body["error"]
    status, body = _http(base, {"trial": 50, "choice": "right"})
    assert status == 400 and "no trial 50" in body["error"]
    status, body = _http(server.url + "api/sessions/nosuchsession/answers", {"trial": 0, "choice": "left"})
    assert status == 404 and "unknown session" in body["error"]
    status, body = _http(base, {"trial": "0", "choice": "left"})
    assert status == 400 and "integer" in body["error"]


def _api_participants(server):
    """Two more participants answering through the JSON API, with an out-of-order attempt on the way."""
    status, other = _http(server.url + "api/sessions", {"participant": "api-1"})
    assert status == 201 and "arm" not in other and all("fake_side" not in t for t in other["trials"])
    other_url = server.url + f"api/sessions/{other['session']}/answers"
    status, body = _http(other_url, {"trial": 2, "choice": "left"})
    assert status == 409 and "out of order: trial 0 is the next one" in body["error"]
    for k in range(50):
        assert _http(other_url, {"trial": k, "choice": "right"})[0] == 200
    status, third = _http(server.url + "api/sessions", {})
    third_url = server.url + f"api/sessions/{third['session']}/answers"
    for k in range(50):
        assert _http(third_url, {"trial": k, "choice": "left" if k % 3 else "right"})[0] == 200
    status, body = _http(third_url, {"trial": 49, "choice": "left"})
    assert status == 409  # the completed session takes no more answers
    return other["session"], third["session"]


def _check_database_and_report(study: Path, sessions: list[str], tmp_path: Path):
    """Arms alternate by session; the database is whole; the report matches the hand computation."""
    db_path = study / "answers.sqlite"
    with StudyDB(db_path) as db:
        assert db.integrity_ok()
        answers = db.answers()
    assert len(answers) == 50 * len(sessions)
    arms = {a["session_id"]: a["arm"] for a in answers}
    assert [arms[s] for s in sessions] == ["colornet", "alexnet", "colornet"]

    reports = {r.arm: r for r in summarize(study, n_boot=2000, seed=4)}
    for arm, participants in (("colornet", 2), ("alexnet", 1)):
        rate, se, attention, fooled = _hand_report(db_path, arm, 2000, 4)
        r = reports[arm]
        assert r.participants == participants and r.test_trials == 36 * participants
        assert r.fooled_rate == pytest.approx(rate, abs=1e-9)
        assert r.attention_accuracy == pytest.approx(attention, abs=1e-9)
        if participants > 1:
            assert r.fooled_rate_se == pytest.approx(se, abs=1e-9)
        else:
            assert math.isnan(r.fooled_rate_se)  # one participant: nothing to resample
        # Bootstrap over trials agrees with the binomial standard error sqrt(p (1 - p) / n).
        trial_se = {x.arm: x for x in summarize(study, unit="trial", n_boot=4000, seed=4)}[arm].fooled_rate_se
        p = rate / 100.0
        assert trial_se == pytest.approx(100.0 * math.sqrt(p * (1 - p) / len(fooled)), rel=0.15)

    # The CLI writes the same numbers as result rows.
    out_csv = tmp_path / "rows.csv"
    study_main(get_args_parser().parse_args(
        ["report", str(study), "--bootstrap", "2000", "--seed", "4", "--out-csv", str(out_csv), "--run-id", "t"]))
    rows = read_rows(out_csv)
    sel = rows[(rows.metric == "amt_fooled") & (rows.checkpoint == "random:colornet")]
    assert float(sel.value.iloc[0]) == pytest.approx(reports["colornet"].fooled_rate)
    assert set(rows.protocol) == {"real_vs_fake_2afc"} and set(rows.benchmark) == {"colorization_quality"}


def test_api_participants_and_report_match_hand_computation(study_dir, tmp_path):
    """The JSON API alone (no browser): three sessions, rejected replays, the report by hand."""
    study = tmp_path / "study"
    shutil.copytree(study_dir, study)
    server = make_server(study, port=0, display_ms=DISPLAY_MS, quiet=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        status, config = _http(server.url + "api/config")
        assert status == 200 and (config["practice"], config["test"], config["display_ms"]) == (10, 40, DISPLAY_MS)
        status, first = _http(server.url + "api/sessions", {"participant": "api-0"})
        url = server.url + f"api/sessions/{first['session']}/answers"
        for k in range(50):
            status, outcome = _http(url, {"trial": k, "choice": "left", "response_ms": 300, "shown_ms": DISPLAY_MS})
            assert status == 200 and outcome["next"] == k + 1 and ("feedback" in outcome) == (k < 10)
        assert outcome["done"] is True
        request = urllib.request.urlopen(server.url + f"api/sessions/{first['session']}/trials/0/left", timeout=30)
        assert request.headers["Content-Type"] == "image/png"
        with Image.open(request) as image:
            assert image.size == (SIZE, SIZE)
        _replays_are_rejected(server, first["session"])
        others = _api_participants(server)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    _check_database_and_report(study, [first["session"], *others], tmp_path)


def _browser_available() -> bool:
    return Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()


def _start_chromium(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=800,900", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def _hand_report(db_path: Path, arm: str, n_boot: int, seed: int):
    """From the raw tables: fooled = the participant clicked the real photo as the fake one."""
    conn = sqlite3.connect(db_path)
    rows = conn.execute(
        "SELECT a.session_id, t.kind, t.fake_side, a.chosen_side FROM answers a "
        "JOIN trials t ON t.session_id = a.session_id AND t.idx = a.idx JOIN sessions s ON s.id = a.session_id "
        "WHERE s.arm = ? AND t.phase = 'test' AND s.completed IS NOT NULL ORDER BY s.number, a.idx", (arm,)
    ).fetchall()
    conn.close()
    sessions = sorted({r[0] for r in rows})
    fooled = {s: [int(r[3] != r[2]) for r in rows if r[0] == s and r[1] == "fake"] for s in sessions}
    checks = [int(r[3] == r[2]) for r in rows if r[1] == "attention"]
    all_fooled = [f for s in sessions for f in fooled[s]]
    rate = 100.0 * sum(all_fooled) / len(all_fooled)
    # Bootstrap over participants: B resamples of the sessions, pooled rate, std with ddof = 1.
    rng = np.random.default_rng(seed)
    per_fooled = np.array([sum(fooled[s]) for s in sessions], dtype=float)
    per_trials = np.array([len(fooled[s]) for s in sessions], dtype=float)
    draws = rng.integers(0, len(sessions), size=(n_boot, len(sessions)))
    rates = per_fooled[draws].sum(1) / per_trials[draws].sum(1)
    se = 100.0 * float(np.std(rates, ddof=1))
    return rate, se, 100.0 * sum(checks) / len(checks), all_fooled


@pytest.mark.browser
def test_browser_participant_completes_a_session(study_dir, tmp_path):
    if not _browser_available():
        if os.environ.get("SSL_COLORIZE_REQUIRE_BROWSER") == "1":
            pytest.fail(f"SSL_COLORIZE_REQUIRE_BROWSER=1 but {CHROMIUM} or {CHROMEDRIVER} is missing")
        pytest.skip(f"needs Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER})")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    study = tmp_path / "study"
    shutil.copytree(study_dir, study)
    server = make_server(study, port=0, display_ms=DISPLAY_MS, quiet=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    driver = _start_chromium(tmp_path / "chromium-profile")
    rng = random.Random(11)
    clicked, feedback, saw_break, visible_while_showing = [], [], 0, []
    try:
        driver.get(server.url)
        state = lambda: driver.execute_script("return document.body.dataset.state")  # noqa: E731
        wait = WebDriverWait(driver, 30, poll_frequency=0.02)
        wait.until(lambda d: state() == "intro")
        assert "1 second" not in driver.find_element(By.ID, "display-seconds").text  # shortened for the test
        driver.find_element(By.ID, "participant").send_keys("sim-1")
        driver.find_element(By.ID, "start").click()
        for index in range(50):
            wait.until(lambda d: state() in ("showing", "answer", "break"))
            if state() == "break":
                saw_break += 1
                driver.find_element(By.ID, "continue").click()
                wait.until(lambda d: state() in ("showing", "answer"))
            if state() == "showing":
                visible_while_showing.append(driver.execute_script(
                    "return !document.getElementById('left').classList.contains('hidden-image')"))
            wait.until(lambda d: state() == "answer")
            assert driver.execute_script("return document.body.dataset.trial") == str(index)
            # Once the pair is hidden, both photos are hidden and clickable.
            assert driver.execute_script("return document.getElementById('right').classList.contains('hidden-image')")
            side = rng.choice(["left", "right"])
            clicked.append(side)
            driver.find_element(By.ID, f"choose-{side}").click()
            if index < 10:
                wait.until(lambda d: state() == "feedback")
                feedback.append(driver.find_element(By.ID, "feedback-text").text)
                driver.find_element(By.ID, "next").click()
        wait.until(lambda d: state() == "done")
        code = driver.find_element(By.ID, "completion-code").text
    finally:
        driver.quit()

    assert saw_break == 1 and len(feedback) == 10 and any(visible_while_showing)
    db_path = study / "answers.sqlite"
    conn = sqlite3.connect(db_path)
    session = conn.execute("SELECT id, arm, participant, completed, display_ms FROM sessions").fetchall()
    assert len(session) == 1 and session[0][0] == code and session[0][2] == "sim-1" and session[0][3]
    assert session[0][1] == "colornet" and session[0][4] == DISPLAY_MS  # the server assigned the first arm
    answers = conn.execute("SELECT a.idx, a.chosen_side, a.fooled, a.shown_ms, t.fake_side, t.phase FROM answers a "
                           "JOIN trials t USING (session_id, idx) ORDER BY a.idx").fetchall()
    conn.close()
    assert [a[0] for a in answers] == list(range(50))
    assert [a[1] for a in answers] == clicked
    # The pair stayed up for the display time (the browser measures it; timers never fire early).
    assert all(DISPLAY_MS - 5 <= a[3] < DISPLAY_MS + 2000 for a in answers)
    # Practice feedback told the truth.
    for a, text in zip(answers[:10], feedback):
        assert text.startswith("Correct") == (a[1] == a[4])

    _replays_are_rejected(server, code)
    other, third = _api_participants(server)
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)
    _check_database_and_report(study, [code, other, third], tmp_path)
