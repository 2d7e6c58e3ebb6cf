"""The study's results per arm: how often the fake was taken for real, with a bootstrap standard error.

For each arm, over the *test* trials of the real-vs-recolorized kind (practice and attention checks
excluded, as in the paper):

- ``fooled_rate`` (result rows: ``amt_fooled``): 100 x (trials where the participant clicked the real photo as the fake one, i.e.
  took the recolorization for real) / trials. 50% means indistinguishable from real photographs.
- ``fooled_rate_se`` (``amt_fooled_se``): bootstrap standard error of that rate, in percentage points. By default the
  unit resampled is the participant (session): B resamples of the arm's n sessions, with replacement,
  each giving the pooled rate sum(fooled) / sum(trials) over the drawn sessions; the standard error
  is the standard deviation (ddof = 1) of the B rates. It reflects that answers of one person are
  correlated. ``unit="trial"`` resamples individual trials instead (the binomial-like error). The
  generator is ``numpy.random.default_rng(seed)``, drawing all indices at once as
  ``integers(0, n, size=(B, n))``, so a seed reproduces the number exactly.
- ``attention_accuracy``: 100 x attention checks answered correctly (the random recolorization
  clicked as fake) / attention checks, in the test block; ``participants_passing_attention``: sessions
  that passed every test-block attention check.

Only completed sessions count unless ``include_incomplete``; ``min_attention`` (a fraction) drops the
sessions whose attention accuracy is below it before anything is computed (default 0: keep all).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ssl_colorize.inference import PAPER_METHOD_BY_LOSS
from ssl_colorize.study.db import StudyDB
from ssl_colorize.study.plan import DATABASE_FILE, load_study

DEFAULT_BOOTSTRAP = 10000
UNITS = ("participant", "trial")
#: result-row metric -> ArmReport field. The rate is named as the published Table 1 column
#: (results/published.csv: "amt_fooled"; the paper ran its study on Amazon Mechanical Turk) so that
#: our rows line up with the paper's.
METRICS = {
    "amt_fooled": "fooled_rate",
    "amt_fooled_se": "fooled_rate_se",
    "attention_accuracy": "attention_accuracy",
    "participants": "participants",
    "test_trials": "test_trials",
}


@dataclass
class ArmReport:
    arm: str
    checkpoint: str
    encoder: str
    participants: int
    test_trials: int
    fooled: int
    fooled_rate: float
    fooled_rate_se: float
    attention_checks: int
    attention_correct: int
    attention_accuracy: float
    participants_passing_attention: int
    excluded_participants: int


def bootstrap_se(fooled: np.ndarray, trials: np.ndarray, n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0) -> float:
    """Bootstrap standard error (percentage points) of the pooled rate sum(fooled) / sum(trials).

    ``fooled`` and ``trials`` hold one entry per resampling unit (a participant, or a trial with
    trials = 1). Returns NaN with fewer than 2 units (no spread to resample).
    """
    fooled = np.asarray(fooled, dtype=np.float64)
    trials = np.asarray(trials, dtype=np.float64)
    n = len(fooled)
    if n < 2:
        return math.nan
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(n_boot, n))
    total = trials[draws].sum(1)
    rates = np.where(total > 0, fooled[draws].sum(1) / np.maximum(total, 1), np.nan)
    return float(100.0 * np.nanstd(rates, ddof=1))


def summarize(
    study_dir: str | Path,
    unit: str = "participant",
    n_boot: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
    include_incomplete: bool = False,
    min_attention: float = 0.0,
) -> list[ArmReport]:
    """One :class:`ArmReport` per arm of the study (arms with no answer yet get zeros and NaN rates)."""
    if unit not in UNITS:
        raise ValueError(f"bootstrap unit must be one of {UNITS}, got {unit!r}")
    if n_boot < 2:
        raise ValueError(f"need at least 2 bootstrap resamples, got {n_boot}")
    if not 0.0 <= min_attention <= 1.0:
        raise ValueError(f"min_attention is a fraction in [0, 1], got {min_attention}")
    study = load_study(study_dir)
    db_path = Path(study_dir) / DATABASE_FILE
    if not db_path.is_file():
        raise ValueError(f"{study_dir} has no answers yet ({DATABASE_FILE} is missing): serve the study first")
    with StudyDB(db_path) as db:
        answers = db.answers()
    if not include_incomplete:
        answers = [a for a in answers if a["completed"]]
    reports = []
    for arm in study["arms"]:
        rows = [a for a in answers if a["arm"] == arm["name"] and a["phase"] == "test"]
        sessions = sorted({a["session_id"] for a in rows})
        per_session = {}
        for s in sessions:
            mine = [a for a in rows if a["session_id"] == s]
            fake = [a["fooled"] for a in mine if a["kind"] == "fake"]
            checks = [1 - a["fooled"] for a in mine if a["kind"] == "attention"]
            per_session[s] = (fake, checks)
        kept = {s: v for s, v in per_session.items()
                if not v[1] or sum(v[1]) / len(v[1]) >= min_attention}
        fake_all = [f for fake, _ in kept.values() for f in fake]
        checks_all = [c for _, checks in kept.values() for c in checks]
        if unit == "participant":
            fooled_units = np.array([sum(fake) for fake, _ in kept.values()])
            trial_units = np.array([len(fake) for fake, _ in kept.values()])
        else:
            fooled_units = np.array(fake_all)
            trial_units = np.ones(len(fake_all))
        n_trials = len(fake_all)
        reports.append(ArmReport(
            arm=arm["name"], checkpoint=arm["checkpoint"], encoder=arm.get("encoder", ""),
            participants=len(kept), test_trials=n_trials, fooled=int(sum(fake_all)),
            fooled_rate=100.0 * sum(fake_all) / n_trials if n_trials else math.nan,
            fooled_rate_se=bootstrap_se(fooled_units, trial_units, n_boot, seed) if n_trials else math.nan,
            attention_checks=len(checks_all), attention_correct=int(sum(checks_all)),
            attention_accuracy=100.0 * sum(checks_all) / len(checks_all) if checks_all else math.nan,
            participants_passing_attention=sum(1 for _, checks in kept.values() if all(checks)),
            excluded_participants=len(per_session) - len(kept),
        ))
    return reports


def format_report(reports: list[ArmReport], unit: str) -> str:
    lines = [f"{'arm':<36} {'people':>6} {'trials':>6} {'fooled %':>9} {'+- SE':>6} {'attention %':>11}"]
    for r in reports:
        lines.append(f"{r.arm[:36]:<36} {r.participants:>6} {r.test_trials:>6} {r.fooled_rate:>9.1f} "
                     f"{r.fooled_rate_se:>6.1f} {r.attention_accuracy:>11.1f}")
    lines.append(f"(fooled: the recolorization was taken for the real photo; 50% = indistinguishable; "
                 f"SE: bootstrap over {unit}s)")
    if all(r.participants == 0 for r in reports):
        lines.append("no completed session yet (--include-incomplete counts unfinished ones)")
    return "\n".join(lines)


def result_rows(reports: list[ArmReport], study: dict, study_dir: str | Path, run_id: str, unit: str,
                n_boot: int, seed: int, min_attention: float) -> list[dict]:
    """Rows for ssl_colorize.results (benchmark colorization_quality, protocol real_vs_fake_2afc)."""
    rows = []
    arms = {arm["name"]: arm for arm in study["arms"]}
    for r in reports:
        hparams = json.dumps({
            "label": r.arm, "paper_method": PAPER_METHOD_BY_LOSS.get(arms[r.arm].get("loss")), "bootstrap_unit": unit, "bootstrap": n_boot, "min_attention": min_attention,
            "study": str(study_dir), "protocol": asdict(study["protocol"]), "temperature": study.get("temperature"),
            "participants": r.participants, "test_trials": r.test_trials,
            "excluded_participants": r.excluded_participants,
        }, sort_keys=True, default=str)
        for metric, field_name in METRICS.items():
            value = getattr(r, field_name)
            if isinstance(value, float) and math.isnan(value):
                continue
            rows.append(dict(
                run_id=run_id, benchmark="colorization_quality", checkpoint=r.checkpoint, encoder=r.encoder,
                tap="head", dataset=study.get("photos", ""), split="study", protocol="real_vs_fake_2afc",
                metric=metric, value=float(value), seed=seed, hparams=hparams,
            ))
    return rows


def report_dict(reports: list[ArmReport]) -> list[dict]:
    return [asdict(r) for r in reports]
