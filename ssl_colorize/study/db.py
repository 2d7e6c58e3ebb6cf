"""The study's answers, kept durably in SQLite (WAL journal, full sync, one transaction per write).

Tables: ``arms``, ``sessions`` (one participant session, assigned one arm), ``trials`` (the session's
plan, fixed when the session starts) and ``answers``. The rules that keep the data whole are enforced
by the database itself, not only by the server:

- an answer refers to a planned trial (foreign key), names a side, and its ``fooled`` flag must agree
  with the trial's fake side (trigger);
- a trial is answered once (primary key): a second answer is rejected, the first one stands;
- trials are answered in order: answer k is accepted only when answers 0..k-1 exist (trigger);
- answers and plans are never updated or deleted (triggers).

The question (the paper's wording): "click on the photo whose colours are fake". ``chosen_side`` is
the photo the participant clicked as fake; ``fooled`` is 1 when they clicked the real photograph,
i.e. took the recolorization for the real one: the study's score is the share of fooled trials.

``synchronous=FULL`` with WAL makes every committed answer survive a crash of the server or a power
cut; a crash mid-transaction leaves the previous state.
"""

from __future__ import annotations

import datetime as _dt
import secrets
import sqlite3
from pathlib import Path
from typing import Callable

from ssl_colorize.study.plan import Trial

SCHEMA = """
CREATE TABLE IF NOT EXISTS arms (
    name TEXT PRIMARY KEY,
    position INTEGER NOT NULL UNIQUE CHECK (position >= 0)
);
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    number INTEGER NOT NULL UNIQUE CHECK (number >= 1),
    arm TEXT NOT NULL REFERENCES arms(name),
    participant TEXT,
    user_agent TEXT,
    display_ms INTEGER NOT NULL CHECK (display_ms > 0),
    n_trials INTEGER NOT NULL CHECK (n_trials >= 1),
    created TEXT NOT NULL,
    completed TEXT
);
CREATE TABLE IF NOT EXISTS trials (
    session_id TEXT NOT NULL REFERENCES sessions(id),
    idx INTEGER NOT NULL CHECK (idx >= 0),
    phase TEXT NOT NULL CHECK (phase IN ('practice', 'test')),
    kind TEXT NOT NULL CHECK (kind IN ('fake', 'attention')),
    image TEXT NOT NULL,
    fake_side TEXT NOT NULL CHECK (fake_side IN ('left', 'right')),
    PRIMARY KEY (session_id, idx)
);
CREATE TABLE IF NOT EXISTS answers (
    session_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    chosen_side TEXT NOT NULL CHECK (chosen_side IN ('left', 'right')),
    fooled INTEGER NOT NULL CHECK (fooled IN (0, 1)),
    response_ms INTEGER CHECK (response_ms IS NULL OR response_ms >= 0),
    shown_ms INTEGER CHECK (shown_ms IS NULL OR shown_ms >= 0),
    created TEXT NOT NULL,
    PRIMARY KEY (session_id, idx),
    FOREIGN KEY (session_id, idx) REFERENCES trials(session_id, idx)
);
CREATE TRIGGER IF NOT EXISTS answers_in_order BEFORE INSERT ON answers
WHEN NEW.idx <> (SELECT COUNT(*) FROM answers WHERE session_id = NEW.session_id)
BEGIN
    SELECT RAISE(ABORT, 'answer out of order');
END;
CREATE TRIGGER IF NOT EXISTS answers_consistent BEFORE INSERT ON answers
WHEN NEW.fooled <> ((SELECT fake_side FROM trials WHERE session_id = NEW.session_id AND idx = NEW.idx)
                    <> NEW.chosen_side)
BEGIN
    SELECT RAISE(ABORT, 'fooled flag disagrees with the trial');
END;
CREATE TRIGGER IF NOT EXISTS answers_no_update BEFORE UPDATE ON answers
BEGIN
    SELECT RAISE(ABORT, 'answers are final');
END;
CREATE TRIGGER IF NOT EXISTS answers_no_delete BEFORE DELETE ON answers
BEGIN
    SELECT RAISE(ABORT, 'answers are final');
END;
CREATE TRIGGER IF NOT EXISTS trials_no_update BEFORE UPDATE ON trials
BEGIN
    SELECT RAISE(ABORT, 'session plans are final');
END;
CREATE TRIGGER IF NOT EXISTS trials_no_delete BEFORE DELETE ON trials
BEGIN
    SELECT RAISE(ABORT, 'session plans are final');
END;
"""


class StudyError(ValueError):
    """A request the study cannot take; ``status`` is the HTTP status the server answers with."""

    status = 400


class UnknownSession(StudyError):
    status = 404


class AnswerRejected(StudyError):
    """A duplicate or out-of-order answer: nothing is written."""

    status = 409


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


class StudyDB:
    """One connection to the study database (SQLite connections are per thread: open one per request)."""

    def __init__(self, path: str | Path, arms: list[str] | None = None):
        self.path = Path(path)
        self.conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        self.conn.row_factory = sqlite3.Row
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.execute("PRAGMA foreign_keys=ON")
        if arms is not None:
            self._init(arms)

    # ------------------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "StudyDB":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _transaction(self):
        """BEGIN IMMEDIATE ... COMMIT (or ROLLBACK on any error): writers are serialised."""
        return _Transaction(self.conn)

    def _init(self, arms: list[str]) -> None:
        with self._transaction():
            # executescript() would commit on its own: run the statements inside this transaction.
            for statement in _statements(SCHEMA):
                self.conn.execute(statement)
            known = [r["name"] for r in self.conn.execute("SELECT name FROM arms ORDER BY position")]
            if not known:
                self.conn.executemany("INSERT INTO arms (name, position) VALUES (?, ?)",
                                      [(name, i) for i, name in enumerate(arms)])
            elif known != list(arms):
                raise StudyError(f"{self.path} was created for arms {known}, not {list(arms)}")

    # ------------------------------------------------------------------------------- sessions
    def create_session(
        self,
        plan: Callable[[int, str], list[Trial]],
        display_ms: int,
        participant: str | None = None,
        user_agent: str | None = None,
    ) -> dict:
        """Start a session: assign the arm with the fewest sessions so far (ties: the first arm), store
        its plan (``plan(session_number, arm)``), and return the session's public description."""
        session_id = secrets.token_urlsafe(12)
        with self._transaction():
            arm = self.conn.execute(
                "SELECT a.name FROM arms a LEFT JOIN sessions s ON s.arm = a.name "
                "GROUP BY a.name ORDER BY COUNT(s.id), a.position LIMIT 1"
            ).fetchone()["name"]
            number = self.conn.execute("SELECT COALESCE(MAX(number), 0) + 1 FROM sessions").fetchone()[0]
            trials = plan(number, arm)
            self.conn.execute(
                "INSERT INTO sessions (id, number, arm, participant, user_agent, display_ms, n_trials, created) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (session_id, number, arm, participant, user_agent, int(display_ms), len(trials), _now()),
            )
            self.conn.executemany(
                "INSERT INTO trials (session_id, idx, phase, kind, image, fake_side) VALUES (?, ?, ?, ?, ?, ?)",
                [(session_id, t.index, t.phase, t.kind, t.image, t.fake_side) for t in trials],
            )
        return self.session(session_id)

    def session(self, session_id: str) -> dict:
        """The session's public state: no arm, no fake sides (the participant must not learn them)."""
        row = self.conn.execute("SELECT * FROM sessions WHERE id = ?", (session_id,)).fetchone()
        if row is None:
            raise UnknownSession(f"unknown session {session_id!r}")
        phases = [r["phase"] for r in self.conn.execute(
            "SELECT phase FROM trials WHERE session_id = ? ORDER BY idx", (session_id,))]
        answered = self.conn.execute("SELECT COUNT(*) FROM answers WHERE session_id = ?", (session_id,)).fetchone()[0]
        return {
            "session": session_id,
            "number": row["number"],
            "display_ms": row["display_ms"],
            "trials": [{"index": i, "phase": p} for i, p in enumerate(phases)],
            "practice": phases.count("practice"),
            "test": phases.count("test"),
            "next": answered,
            "completed": row["completed"] is not None,
        }

    def arm_of(self, session_id: str) -> str:
        row = self.conn.execute("SELECT arm FROM sessions WHERE id = ?", (session_id,)).fetchone()
        if row is None:
            raise UnknownSession(f"unknown session {session_id!r}")
        return row["arm"]

    def trial(self, session_id: str, index: int) -> sqlite3.Row:
        self.arm_of(session_id)
        row = self.conn.execute("SELECT * FROM trials WHERE session_id = ? AND idx = ?", (session_id, index)).fetchone()
        if row is None:
            n = self.conn.execute("SELECT COUNT(*) FROM trials WHERE session_id = ?", (session_id,)).fetchone()[0]
            raise StudyError(f"session {session_id!r} has trials 0..{n - 1}; there is no trial {index}")
        return row

    # -------------------------------------------------------------------------------- answers
    def record_answer(
        self, session_id: str, index: int, chosen_side: str,
        response_ms: int | None = None, shown_ms: int | None = None,
    ) -> dict:
        """Store the answer to trial ``index``; reject a duplicate or out-of-order one, writing nothing.

        Returns the outcome: ``fooled``, and for practice trials the feedback (``correct``,
        ``fake_side``), ``next`` (the next trial to answer) and ``done``.
        """
        if chosen_side not in ("left", "right"):
            raise StudyError(f"choice must be 'left' or 'right', got {chosen_side!r}")
        for name, value in (("response_ms", response_ms), ("shown_ms", shown_ms)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise StudyError(f"{name} must be a non-negative integer (milliseconds), got {value!r}")
        with self._transaction():
            trial = self.trial(session_id, index)
            previous = self.conn.execute(
                "SELECT chosen_side, created FROM answers WHERE session_id = ? AND idx = ?", (session_id, index)
            ).fetchone()
            if previous is not None:
                raise AnswerRejected(
                    f"trial {index} of session {session_id!r} was already answered ('{previous['chosen_side']}' "
                    f"at {previous['created']}); answers are final, this one was not recorded"
                )
            answered = self.conn.execute("SELECT COUNT(*) FROM answers WHERE session_id = ?", (session_id,)).fetchone()[0]
            if index != answered:
                raise AnswerRejected(
                    f"answer to trial {index} of session {session_id!r} is out of order: trial {answered} is the "
                    "next one to answer; it was not recorded"
                )
            fooled = int(chosen_side != trial["fake_side"])
            try:
                self.conn.execute(
                    "INSERT INTO answers (session_id, idx, chosen_side, fooled, response_ms, shown_ms, created) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (session_id, index, chosen_side, fooled, response_ms, shown_ms, _now()),
                )
            except sqlite3.IntegrityError as exc:  # the database's own rules (see the module docstring)
                raise AnswerRejected(f"answer to trial {index} of session {session_id!r} rejected: {exc}") from exc
            n_trials = self.conn.execute("SELECT n_trials FROM sessions WHERE id = ?", (session_id,)).fetchone()[0]
            done = index + 1 == n_trials
            if done:
                self.conn.execute("UPDATE sessions SET completed = ? WHERE id = ?", (_now(), session_id))
        outcome = {"recorded": True, "trial": index, "next": index + 1, "done": done}
        if trial["phase"] == "practice":
            outcome["feedback"] = {"correct": not fooled, "fake_side": trial["fake_side"]}
        return outcome

    # -------------------------------------------------------------------------------- reading
    def answers(self) -> list[dict]:
        """Every answer joined with its trial and session (for the report)."""
        rows = self.conn.execute(
            "SELECT s.id AS session_id, s.number, s.arm, s.participant, s.completed IS NOT NULL AS completed, "
            "t.idx, t.phase, t.kind, t.image, t.fake_side, a.chosen_side, a.fooled, a.response_ms, a.shown_ms "
            "FROM answers a JOIN trials t ON t.session_id = a.session_id AND t.idx = a.idx "
            "JOIN sessions s ON s.id = a.session_id ORDER BY s.number, t.idx"
        )
        return [dict(r) for r in rows]

    def arms(self) -> list[str]:
        return [r["name"] for r in self.conn.execute("SELECT name FROM arms ORDER BY position")]

    def integrity_ok(self) -> bool:
        return self.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok" and not list(
            self.conn.execute("PRAGMA foreign_key_check")
        )


def _statements(script: str) -> list[str]:
    """Split the schema into statements (triggers contain ';' inside BEGIN ... END)."""
    statements, current = [], []
    for line in script.strip().splitlines():
        current.append(line)
        text = "\n".join(current).strip()
        if text.endswith(";") and sqlite3.complete_statement(text):
            statements.append(text)
            current = []
    return statements


class _Transaction:
    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def __enter__(self):
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.conn.execute("COMMIT")
        else:
            self.conn.execute("ROLLBACK")
        return False
