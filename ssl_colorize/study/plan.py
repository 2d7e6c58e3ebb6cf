"""The study's protocol and each participant's session plan (docs/protocols.md section 6, "Perceptual realism").

The paper's real-vs-fake test ("colorization Turing test"): pairs of a real photograph and a
recolorized version of it, 256 x 256, each pair shown for one second, then hidden, with unlimited time
to answer; 10 practice pairs with feedback, then 40 test pairs without; 10% of the trials are
attention checks, the real photograph against a *random* recolorization (its L with the ab of another
photograph), which an attentive participant should always tell apart; one algorithm (arm) per session.

Attention checks are 10% of each block, rounded to the nearest whole trial: 1 of the 10 practice
trials (so the participant meets one with feedback) and 4 of the 40 test trials. A session draws its
photographs from the study's pool in a seeded random order without repetition, reshuffling the pool
when it runs out (a pool of at least 50 photographs gives a session with no repeated photograph).
Each trial puts the fake on the left or right with probability 1/2.

A study folder holds ``study.json`` (written by :mod:`ssl_colorize.study.build`), the images, and
``answers.sqlite`` (:mod:`ssl_colorize.study.db`).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

STUDY_FORMAT = 1
STUDY_FILE = "study.json"
DATABASE_FILE = "answers.sqlite"
IMAGES_DIR = "images"
REAL_DIR = "real"
RANDOM_DIR = "random"
PHASES = ("practice", "test")
KINDS = ("fake", "attention")
SIDES = ("left", "right")


@dataclass(frozen=True)
class Protocol:
    """The paper's numbers by default; every one is a build option (display_ms also a serve option)."""

    practice: int = 10
    test: int = 40
    attention_rate: float = 0.1
    display_ms: int = 1000
    size: int = 256

    def validate(self) -> "Protocol":
        if self.practice < 0 or self.test < 1:
            raise ValueError(f"need practice >= 0 and test >= 1 trials, got practice={self.practice}, test={self.test}")
        if not 0.0 <= self.attention_rate < 1.0:
            raise ValueError(f"attention_rate must be in [0, 1), got {self.attention_rate}")
        if self.display_ms < 1:
            raise ValueError(f"display_ms must be a positive number of milliseconds, got {self.display_ms}")
        if self.size < 8:
            raise ValueError(f"image size must be at least 8 pixels, got {self.size}")
        return self

    def attention_trials(self, n: int) -> int:
        """Attention checks in a block of n trials: the rate times n, rounded half up."""
        return int(math.floor(n * self.attention_rate + 0.5))

    @property
    def trials(self) -> int:
        return self.practice + self.test


@dataclass(frozen=True)
class Trial:
    index: int
    phase: str  # "practice" (with feedback) or "test"
    kind: str  # "fake": real vs the arm's recolorization; "attention": real vs random colours
    image: str  # the photograph's id in the study
    fake_side: str  # where the non-real image is shown: "left" or "right"

    def as_dict(self) -> dict:
        return asdict(self)


def session_rng(study_seed: int, session_number: int) -> random.Random:
    """The session's own random stream: reproducible from the study seed and the session's number."""
    return random.Random(f"ssl_colorize-study:{study_seed}:{session_number}")


def plan_session(image_ids: list[str], protocol: Protocol, rng: random.Random) -> list[Trial]:
    """The trials of one session, practice block first, then the test block."""
    if len(image_ids) < 1:
        raise ValueError("a study needs at least one photograph")
    protocol.validate()
    pool: list[str] = []
    trials: list[Trial] = []
    for phase, count in (("practice", protocol.practice), ("test", protocol.test)):
        checks = protocol.attention_trials(count)
        kinds = ["attention"] * checks + ["fake"] * (count - checks)
        rng.shuffle(kinds)
        for kind in kinds:
            if not pool:
                pool = list(image_ids)
                rng.shuffle(pool)
            image = pool.pop()
            side = "left" if rng.random() < 0.5 else "right"
            trials.append(Trial(len(trials), phase, kind, image, side))
    return trials


# ------------------------------------------------------------------------------------- study.json
def load_study(study_dir: str | Path) -> dict:
    """Read and check ``study.json``; raise ValueError naming the folder when it is not a study."""
    study_dir = Path(study_dir)
    path = study_dir / STUDY_FILE
    if not path.is_file():
        raise ValueError(f"{study_dir} is not a study folder (no {STUDY_FILE}); build one with "
                         "`python -m ssl_colorize.study build`")
    try:
        study = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if study.get("format") != STUDY_FORMAT:
        raise ValueError(f"{path}: unsupported study format {study.get('format')!r} (expected {STUDY_FORMAT})")
    for key in ("arms", "images", "protocol", "seed"):
        if key not in study:
            raise ValueError(f"{path} lacks {key!r}")
    if not study["arms"]:
        raise ValueError(f"{path} defines no arm")
    study["protocol"] = Protocol(**study["protocol"]).validate()
    return study


def protocol_dict(protocol: Protocol) -> dict:
    return asdict(protocol)


def image_path(study_dir: str | Path, folder: str, image_id: str) -> Path:
    """Where an image of the study lives: images/<folder>/<id>.png."""
    return Path(study_dir) / IMAGES_DIR / folder / f"{image_id}.png"
