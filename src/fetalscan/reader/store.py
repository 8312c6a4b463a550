"""SQLite storage of the reading app: studies, reader logins, the worklists and every event.

Tables of its own (prefixed ``reading_``), in any SQLite file (the service uses its review
database). Append-only: an answer is never edited; a changed answer is a new record, and the
export takes the last answer of each reading. Reading time is measured on the server: the time
from the moment the server last *showed* a reading (step) to the moment it received the answer.

Login codes and session tokens are stored as SHA-256 hashes only.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import secrets
import sqlite3
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from fetalscan.errors import DataError, FetalscanError

SCHEMA = """
CREATE TABLE IF NOT EXISTS reading_studies (
    id TEXT PRIMARY KEY, created_utc TEXT NOT NULL, design_dir TEXT NOT NULL, manifest TEXT NOT NULL,
    design_json TEXT NOT NULL, classes TEXT NOT NULL, normal_label TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS reading_cases (
    study_id TEXT NOT NULL, name TEXT NOT NULL, label TEXT NOT NULL, truth INTEGER NOT NULL, images TEXT NOT NULL,
    PRIMARY KEY (study_id, name));
CREATE TABLE IF NOT EXISTS reading_worklist (
    study_id TEXT NOT NULL, reader TEXT NOT NULL, position INTEGER NOT NULL, session INTEGER NOT NULL,
    day INTEGER NOT NULL, case_name TEXT NOT NULL, arm TEXT NOT NULL, ai_shown TEXT NOT NULL,
    sequential INTEGER NOT NULL, PRIMARY KEY (study_id, reader, position));
CREATE TABLE IF NOT EXISTS reading_logins (
    code_sha256 TEXT PRIMARY KEY, study_id TEXT NOT NULL, reader TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS reading_tokens (
    token_sha256 TEXT PRIMARY KEY, study_id TEXT NOT NULL, reader TEXT NOT NULL, created_utc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS reading_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, study_id TEXT NOT NULL, reader TEXT NOT NULL, position INTEGER NOT NULL,
    step TEXT NOT NULL, kind TEXT NOT NULL, utc TEXT NOT NULL, t REAL NOT NULL, answer TEXT, confidence REAL,
    seconds REAL);
CREATE INDEX IF NOT EXISTS reading_events_by_reader ON reading_events (study_id, reader, position);
"""

#: Steps of a reading: one answer (unaided, concurrent) or first + final (second-read).
STEPS = ("single", "first", "final")


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class ReadingStore:
    """The reading app's tables in the SQLite file ``path``; thread-safe (one connection per call)."""

    def __init__(self, path: str | Path, clock=time.time) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.clock = clock  # seconds since the epoch; tests replace it
        self._lock = threading.Lock()
        with self._connect() as con:
            con.executescript(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=30)
        con.row_factory = sqlite3.Row
        return con

    # ------------------------------------------------------------------ registration
    def register_study(self, design_dir: str | Path) -> dict:
        """Load a ``reader-study create`` folder (design.json, cases.csv, worklist.csv, logins.csv)."""
        d = Path(design_dir)
        try:
            design = json.loads((d / "design.json").read_text(encoding="utf-8"))
            cases = _read_csv(d / "cases.csv")
            work = _read_csv(d / "worklist.csv")
            logins = _read_csv(d / "logins.csv")
        except (OSError, ValueError) as exc:
            raise DataError(f"{d} is not a `fetalscan reader-study create` folder: {exc}") from exc
        if not design.get("manifest"):
            raise DataError(f"{d}/design.json names no manifest; the reading app needs the case images")
        normal = design.get("config", {}).get("normal_label", "normal")
        classes = sorted({c["label"] for c in cases})
        study_id = _sha(str(d.resolve()) + design["provenance"]["created"])[:16]
        per_reader: dict[str, list[dict]] = {}
        for w in work:
            per_reader.setdefault(w["reader"], []).append(w)
        with self._lock, self._connect() as con:
            if con.execute("SELECT 1 FROM reading_studies WHERE id=?", (study_id,)).fetchone():
                return self.study(study_id)
            con.execute("INSERT INTO reading_studies VALUES (?,?,?,?,?,?,?)",
                        (study_id, utc_now(), str(d.resolve()), design["manifest"], json.dumps(design),
                         json.dumps(classes), normal))
            con.executemany("INSERT INTO reading_cases VALUES (?,?,?,?,?)",
                            [(study_id, c["case"], c["label"], int(c["truth"]), c["images"]) for c in cases])
            for reader, rows in per_reader.items():
                rows.sort(key=lambda w: (int(w["session"]), int(w["order"])))
                con.executemany("INSERT INTO reading_worklist VALUES (?,?,?,?,?,?,?,?,?)",
                                [(study_id, reader, k, int(w["session"]), int(w["day"]), w["case"], w["arm"],
                                  w["ai_shown"], int(w["sequential"])) for k, w in enumerate(rows)])
            for row in logins:
                con.execute("INSERT OR REPLACE INTO reading_logins VALUES (?,?,?)",
                            (_sha(row["login_code"]), study_id, row["reader"]))
        return self.study(study_id)

    def study(self, study_id: str) -> dict:
        with self._connect() as con:
            row = con.execute("SELECT * FROM reading_studies WHERE id=?", (study_id,)).fetchone()
        if row is None:
            raise FetalscanError(f"reading study {study_id!r} not found")
        return {"id": row["id"], "design_dir": row["design_dir"], "manifest": row["manifest"],
                "classes": json.loads(row["classes"]), "normal_label": row["normal_label"],
                "created_utc": row["created_utc"]}

    # ------------------------------------------------------------------ readers
    def login(self, code: str) -> dict | None:
        """A new session token for the reader whose login code this is, or None."""
        with self._connect() as con:
            row = con.execute("SELECT study_id, reader FROM reading_logins WHERE code_sha256=?",
                              (_sha(code),)).fetchone()
            if row is None:
                return None
            token = secrets.token_urlsafe(24)
            con.execute("INSERT INTO reading_tokens VALUES (?,?,?,?)",
                        (_sha(token), row["study_id"], row["reader"], utc_now()))
        return {"token": token, "study_id": row["study_id"], "reader": row["reader"]}

    def reader_of(self, token: str) -> tuple[str, str] | None:
        """``(study_id, reader)`` of a session token, or None."""
        with self._connect() as con:
            row = con.execute("SELECT study_id, reader FROM reading_tokens WHERE token_sha256=?",
                              (_sha(token),)).fetchone()
        return None if row is None else (row["study_id"], row["reader"])

    def worklist(self, study_id: str, reader: str) -> list[dict]:
        with self._connect() as con:
            rows = con.execute("SELECT * FROM reading_worklist WHERE study_id=? AND reader=? ORDER BY position",
                               (study_id, reader)).fetchall()
        return [dict(r) for r in rows]

    def case(self, study_id: str, name: str) -> dict:
        with self._connect() as con:
            row = con.execute("SELECT * FROM reading_cases WHERE study_id=? AND name=?", (study_id, name)).fetchone()
        return {"name": row["name"], "label": row["label"], "truth": row["truth"],
                "images": [p for p in row["images"].split(";") if p]}

    # ------------------------------------------------------------------ events
    def events(self, study_id: str, reader: str) -> list[dict]:
        with self._connect() as con:
            rows = con.execute("SELECT * FROM reading_events WHERE study_id=? AND reader=? ORDER BY id",
                               (study_id, reader)).fetchall()
        return [dict(r) for r in rows]

    def answered(self, study_id: str, reader: str) -> dict[tuple[int, str], dict]:
        """The last answer of each ``(position, step)``."""
        return {(e["position"], e["step"]): e for e in self.events(study_id, reader) if e["kind"] == "answer"}

    def first_answer_time(self, study_id: str, reader: str) -> float | None:
        with self._connect() as con:
            row = con.execute("SELECT MIN(t) AS t FROM reading_events WHERE study_id=? AND reader=? AND kind='answer'",
                              (study_id, reader)).fetchone()
        return row["t"]

    def record_shown(self, study_id: str, reader: str, position: int, step: str) -> None:
        with self._lock, self._connect() as con:
            con.execute("INSERT INTO reading_events (study_id, reader, position, step, kind, utc, t) "
                        "VALUES (?,?,?,?,?,?,?)", (study_id, reader, position, step, "shown", utc_now(), self.clock()))

    def record_answer(self, study_id: str, reader: str, position: int, step: str, answer: str,
                      confidence: float) -> dict:
        """Append an answer; its seconds run from the last time the server showed this step."""
        now = self.clock()
        with self._lock, self._connect() as con:
            shown = con.execute("SELECT MAX(t) AS t FROM reading_events WHERE study_id=? AND reader=? AND position=? "
                                "AND step=? AND kind='shown'", (study_id, reader, position, step)).fetchone()["t"]
            if shown is None:
                raise FetalscanError(f"reading {position} ({step}) was never shown to {reader}; answer what /next "
                                     "shows")
            cur = con.execute("INSERT INTO reading_events (study_id, reader, position, step, kind, utc, t, answer, "
                              "confidence, seconds) VALUES (?,?,?,?,?,?,?,?,?,?)",
                              (study_id, reader, position, step, "answer", utc_now(), now, answer, confidence,
                               round(now - shown, 3)))
            return {"id": cur.lastrowid, "seconds": round(now - shown, 3)}

    # ------------------------------------------------------------------ export
    def export_csv(self, study_id: str, first_reads: bool = False) -> str:
        """One row per completed reading: ``reader,treatment,case,truth,rating,answer,seconds,session``.

        The last answer of each reading counts. A second-read reading gives its final answer,
        with seconds = first step + final step; ``first_reads`` adds its unaided first answers
        as treatment ``<arm>:first``.
        """
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["reader", "treatment", "case", "truth", "rating", "answer", "seconds", "session"])
        with self._connect() as con:
            readers = [r["reader"] for r in con.execute(
                "SELECT DISTINCT reader FROM reading_worklist WHERE study_id=? ORDER BY reader", (study_id,))]
        for reader in readers:
            answers = self.answered(study_id, reader)
            for item in self.worklist(study_id, reader):
                truth = self.case(study_id, item["case_name"])["truth"]
                pos = item["position"]
                if item["sequential"]:
                    first, final = answers.get((pos, "first")), answers.get((pos, "final"))
                    if final is None or first is None:
                        continue
                    w.writerow([reader, item["arm"], item["case_name"], truth, final["confidence"], final["answer"],
                                round(first["seconds"] + final["seconds"], 3), item["session"]])
                    if first_reads:
                        w.writerow([reader, item["arm"] + ":first", item["case_name"], truth, first["confidence"],
                                    first["answer"], first["seconds"], item["session"]])
                else:
                    a = answers.get((pos, "single"))
                    if a is not None:
                        w.writerow([reader, item["arm"], item["case_name"], truth, a["confidence"], a["answer"],
                                    a["seconds"], item["session"]])
        return buf.getvalue()


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8-sig") as fh:
        return list(csv.DictReader(fh))
