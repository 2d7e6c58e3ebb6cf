"""Serve a study folder as a local web page with a small JSON API (standard library only).

Bound to 127.0.0.1 only: the study is run on the experimenter's machine (or reached through a tunnel
or reverse proxy the experimenter sets up), never exposed by this server itself.

Routes (JSON bodies; errors are ``{"error": message}`` with status 400, 404 or 409):

- ``GET /`` and ``GET /static/<file>``: the participant's page (static/index.html, app.js, style.css);
- ``GET /api/config``: the protocol (display time, numbers of practice and test pairs);
- ``POST /api/sessions`` ``{"participant": optional id}``: start a session; the server assigns the
  arm (balanced: the arm with the fewest sessions) and fixes the plan; the reply lists the trials'
  phases only, never the arm nor which side is fake;
- ``GET /api/sessions/<id>``: the session's progress (to resume after a reload);
- ``GET /api/sessions/<id>/trials/<k>/<left|right>``: the trial's images, as opaque URLs;
- ``POST /api/sessions/<id>/answers`` ``{"trial": k, "choice": "left"|"right", "response_ms": int,
  "shown_ms": int}``: record the answer (duplicates and out-of-order answers get 409 and nothing is
  written); practice trials get their feedback in the reply.

Every request opens its own SQLite connection (ssl_colorize.study.db), so the threads of
ThreadingHTTPServer never share one.
"""

from __future__ import annotations

import json
import re
import sys
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

from ssl_colorize.study.db import StudyDB, StudyError
from ssl_colorize.study.plan import DATABASE_FILE, RANDOM_DIR, REAL_DIR, image_path, load_study, plan_session, session_rng

HOST = "127.0.0.1"
STATIC_DIR = Path(__file__).resolve().parent / "static"
MAX_BODY_BYTES = 16 * 1024
STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8"}
_SESSION_RE = re.compile(r"^/api/sessions/([A-Za-z0-9_-]{1,64})(/.*)?$")
_IMAGE_RE = re.compile(r"^/trials/(\d{1,6})/(left|right)$")


class StudyServer(ThreadingHTTPServer):
    """The HTTP server of one study folder."""

    daemon_threads = True

    def __init__(self, study_dir: str | Path, port: int = 8000, display_ms: int | None = None, quiet: bool = False):
        self.study_dir = Path(study_dir)
        self.study = load_study(self.study_dir)
        self.protocol = self.study["protocol"]
        self.display_ms = int(display_ms) if display_ms is not None else self.protocol.display_ms
        if self.display_ms < 1:
            raise ValueError(f"--display-ms must be a positive number of milliseconds, got {display_ms}")
        self.arm_folders = {arm["name"]: arm["folder"] for arm in self.study["arms"]}
        self.image_ids = [image["id"] for image in self.study["images"]]
        self.db_path = self.study_dir / DATABASE_FILE
        StudyDB(self.db_path, arms=list(self.arm_folders)).close()  # create the schema, check the arms
        self.quiet = quiet
        super().__init__((HOST, port), StudyHandler)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.server_address[1]}/"

    def plan(self, number: int, arm: str):
        return plan_session(self.image_ids, self.protocol, session_rng(self.study["seed"], number))

    def database(self) -> StudyDB:
        return StudyDB(self.db_path)


class StudyHandler(BaseHTTPRequestHandler):
    server: StudyServer
    server_version = "ssl_colorize-study/1"

    # ----------------------------------------------------------------------------- plumbing
    def log_message(self, format: str, *args) -> None:
        if not self.server.quiet:
            sys.stderr.write(f"[study] {self.address_string()} {format % args}\n")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, payload: dict) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json")

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message})

    def _body(self) -> dict:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            raise StudyError(f"request body too large ({length} bytes; at most {MAX_BODY_BYTES})")
        raw = self.rfile.read(length) if length else b"{}"
        try:
            body = json.loads(raw or b"{}")
        except json.JSONDecodeError as exc:
            raise StudyError(f"request body is not valid JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise StudyError("request body must be a JSON object")
        return body

    def _dispatch(self, handler) -> None:
        try:
            handler()
        except StudyError as exc:
            self._error(exc.status, str(exc))

    # -------------------------------------------------------------------------------- GET
    def do_GET(self) -> None:
        self._dispatch(self._get)

    def _get(self) -> None:
        path = urlparse(self.path).path
        if path in ("/", "/index.html"):
            return self._static("index.html")
        if path.startswith("/static/"):
            return self._static(path.removeprefix("/static/"))
        if path == "/api/config":
            p = self.server.protocol
            return self._json(200, {"display_ms": self.server.display_ms, "practice": p.practice, "test": p.test,
                                    "size": p.size})
        match = _SESSION_RE.match(path)
        if match:
            session_id, rest = match.group(1), match.group(2) or ""
            if rest == "":
                with self.server.database() as db:
                    return self._json(200, db.session(session_id))
            image = _IMAGE_RE.match(rest)
            if image:
                return self._trial_image(session_id, int(image.group(1)), image.group(2))
        self._error(404, f"no such page: {path}")

    def _static(self, name: str) -> None:
        if name not in ("index.html", "app.js", "style.css"):
            return self._error(404, f"no such file: {name}")
        data = (STATIC_DIR / name).read_bytes()
        self._send(200, data, STATIC_TYPES[Path(name).suffix])

    def _trial_image(self, session_id: str, index: int, side: str) -> None:
        with self.server.database() as db:
            trial = db.trial(session_id, index)
            arm = db.arm_of(session_id)
        if side != trial["fake_side"]:
            folder = REAL_DIR
        elif trial["kind"] == "attention":
            folder = RANDOM_DIR
        else:
            folder = self.server.arm_folders[arm]
        path = image_path(self.server.study_dir, folder, trial["image"])
        if not path.is_file():
            return self._error(404, f"study image missing on disk: {path.relative_to(self.server.study_dir)}")
        self._send(200, path.read_bytes(), "image/png")

    # ------------------------------------------------------------------------------- POST
    def do_POST(self) -> None:
        self._dispatch(self._post)

    def _post(self) -> None:
        path = urlparse(self.path).path
        body = self._body()
        if path == "/api/sessions":
            participant = body.get("participant")
            if participant is not None and (not isinstance(participant, str) or len(participant) > 200):
                raise StudyError("participant must be a string of at most 200 characters")
            with self.server.database() as db:
                session = db.create_session(self.server.plan, self.server.display_ms, participant or None,
                                            self.headers.get("User-Agent"))
            return self._json(HTTPStatus.CREATED, session)
        match = _SESSION_RE.match(path)
        if match and match.group(2) == "/answers":
            trial = body.get("trial")
            if not isinstance(trial, int) or isinstance(trial, bool):
                raise StudyError(f"'trial' must be the trial's index (an integer), got {trial!r}")
            with self.server.database() as db:
                outcome = db.record_answer(match.group(1), trial, body.get("choice"),
                                           body.get("response_ms"), body.get("shown_ms"))
            return self._json(200, outcome)
        self._error(404, f"no such endpoint: POST {path}")


def make_server(study_dir: str | Path, port: int = 8000, display_ms: int | None = None, quiet: bool = False) -> StudyServer:
    """A ready server (port 0 picks a free one; ``server.url`` tells which)."""
    return StudyServer(study_dir, port=port, display_ms=display_ms, quiet=quiet)


def serve(study_dir: str | Path, port: int = 8000, display_ms: int | None = None, quiet: bool = False) -> None:
    """Serve until interrupted (Ctrl-C)."""
    server = make_server(study_dir, port=port, display_ms=display_ms, quiet=quiet)
    print(f"study {study_dir}: open {server.url} (Ctrl-C stops; answers are in {server.db_path})", file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        server.server_close()
