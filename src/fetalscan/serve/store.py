"""Where the service keeps things: an append-only SQLite file of studies and reviews, and an
in-memory cache of recent studies' images and heatmaps.

SQLite (the standard library's ``sqlite3``) holds

``studies``
    one row per analysed study: id, time (UTC), number of images, the model's study-level
    finding and probabilities, the image names, the model file and its SHA-256.
``reviews``
    one row per confirm / override: who (the reader's name as typed), when (UTC), the
    decision, the final class, the comment, and the finding and model hash it refers to.
    An edit is a new row (``supersedes`` names the row it replaces); triggers make the
    table append-only, so no row is ever updated or deleted.

Pixels never go to the database: a study's images and heatmaps live only in
:class:`StudyCache` (bounded, oldest dropped first) while the service runs.
"""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import threading
from collections import OrderedDict
from contextlib import closing
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from fetalscan.errors import FetalscanError

SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    id            TEXT PRIMARY KEY,
    created_utc   TEXT NOT NULL,
    n_images      INTEGER NOT NULL,
    prediction    TEXT NOT NULL,
    probabilities TEXT NOT NULL,
    classes       TEXT NOT NULL,
    images        TEXT NOT NULL,
    model_name    TEXT NOT NULL,
    model_sha256  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS reviews (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    study_id         TEXT NOT NULL REFERENCES studies(id),
    created_utc      TEXT NOT NULL,
    reader           TEXT NOT NULL,
    decision         TEXT NOT NULL CHECK (decision IN ('confirm', 'override')),
    model_prediction TEXT NOT NULL,
    final_class      TEXT NOT NULL,
    comment          TEXT NOT NULL,
    model_sha256     TEXT NOT NULL,
    supersedes       INTEGER REFERENCES reviews(id)
);
CREATE INDEX IF NOT EXISTS reviews_by_study ON reviews(study_id, id);
CREATE TRIGGER IF NOT EXISTS reviews_append_only_update BEFORE UPDATE ON reviews
BEGIN SELECT RAISE(ABORT, 'reviews are append-only: add a new review instead'); END;
CREATE TRIGGER IF NOT EXISTS reviews_append_only_delete BEFORE DELETE ON reviews
BEGIN SELECT RAISE(ABORT, 'reviews are append-only: they are never deleted'); END;
CREATE TRIGGER IF NOT EXISTS studies_append_only_update BEFORE UPDATE ON studies
BEGIN SELECT RAISE(ABORT, 'studies are append-only'); END;
"""

#: Columns of ``reviews.csv``, in order.
REVIEW_COLUMNS = ("review_id", "study_id", "created_utc", "reader", "decision", "model_prediction",
                  "final_class", "comment", "supersedes", "model_name", "model_sha256", "study_created_utc",
                  "n_images", "images", "model_probabilities")


def utc_now() -> str:
    """The current time, UTC, ISO 8601 to the second (``2025-01-31T12:00:00+00:00``)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class ReviewStore:
    """The SQLite file of studies and reviews (a new connection per call: safe across threads).

    Crash-safe: the database runs in write-ahead-log mode with ``synchronous = FULL``, and
    every write is one transaction (``with con``), so a process killed while writing leaves
    every committed study and review intact and no half-written row.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with closing(self._connect()) as con:
                # write-ahead log: a writer killed mid-transaction leaves the last committed state intact
                con.execute("PRAGMA journal_mode = WAL")
                with con:
                    con.executescript(SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise FetalscanError(f"cannot open the review database {self.path}: {exc}") from exc

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=10.0)
        con.row_factory = sqlite3.Row
        con.execute("PRAGMA foreign_keys = ON")
        con.execute("PRAGMA synchronous = FULL")  # a committed review survives a power cut, not just a crash
        return con

    # ------------------------------------------------------------------ studies
    def add_study(self, study: dict) -> None:
        """Record an analysed study (``id``, ``created_utc``, ``n_images``, ``prediction``,
        ``probabilities``, ``classes``, ``images``, ``model_name``, ``model_sha256``)."""
        with closing(self._connect()) as con, con:
            con.execute(
                "INSERT INTO studies (id, created_utc, n_images, prediction, probabilities, classes, images, "
                "model_name, model_sha256) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (study["id"], study["created_utc"], int(study["n_images"]), study["prediction"],
                 json.dumps(study["probabilities"]), json.dumps(study["classes"]), json.dumps(study["images"]),
                 study["model_name"], study["model_sha256"]))

    def get_study(self, study_id: str) -> dict | None:
        with closing(self._connect()) as con:
            row = con.execute("SELECT * FROM studies WHERE id = ?", (study_id,)).fetchone()
        if row is None:
            return None
        out = dict(row)
        for key in ("probabilities", "classes", "images"):
            out[key] = json.loads(out[key])
        return out

    # ------------------------------------------------------------------ reviews
    def add_review(self, study_id: str, *, reader: str, decision: str, final_class: str, comment: str) -> dict:
        """Append a review of ``study_id``; it supersedes the study's latest review, if any."""
        with closing(self._connect()) as con, con:
            study = con.execute("SELECT prediction, model_sha256 FROM studies WHERE id = ?",
                                (study_id,)).fetchone()
            if study is None:
                raise FetalscanError(f"study {study_id} not found")
            last = con.execute("SELECT MAX(id) FROM reviews WHERE study_id = ?", (study_id,)).fetchone()[0]
            cur = con.execute(
                "INSERT INTO reviews (study_id, created_utc, reader, decision, model_prediction, final_class, "
                "comment, model_sha256, supersedes) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (study_id, utc_now(), reader, decision, study["prediction"], final_class, comment,
                 study["model_sha256"], last))
            review_id = cur.lastrowid
        return self.get_review(int(review_id))

    def get_review(self, review_id: int) -> dict:
        with closing(self._connect()) as con:
            row = con.execute("SELECT * FROM reviews WHERE id = ?", (review_id,)).fetchone()
        return dict(row)

    def reviews_of(self, study_id: str) -> list[dict]:
        """Every review of a study, oldest first (the last one is in force)."""
        with closing(self._connect()) as con:
            rows = con.execute("SELECT * FROM reviews WHERE study_id = ? ORDER BY id", (study_id,)).fetchall()
        return [dict(r) for r in rows]

    def reviews_csv(self) -> str:
        """Every review, oldest first, joined with its study, as CSV text (:data:`REVIEW_COLUMNS`).

        Text a spreadsheet would run as a formula (a leading ``= + - @``, tab or CR in the
        reader's name or the comment) is prefixed with ``'``.
        """
        with closing(self._connect()) as con:
            rows = con.execute(
                "SELECT r.id AS review_id, r.study_id, r.created_utc, r.reader, r.decision, r.model_prediction, "
                "r.final_class, r.comment, r.supersedes, s.model_name, r.model_sha256, "
                "s.created_utc AS study_created_utc, s.n_images, s.images, s.probabilities AS model_probabilities "
                "FROM reviews r JOIN studies s ON s.id = r.study_id ORDER BY r.id").fetchall()
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(REVIEW_COLUMNS)
        for row in rows:
            d = dict(row)
            d["images"] = ";".join(json.loads(d["images"]))
            d["reader"] = _no_formula(d["reader"])
            d["comment"] = _no_formula(d["comment"])
            writer.writerow(["" if d[c] is None else d[c] for c in REVIEW_COLUMNS])
        return buf.getvalue()


def _no_formula(text: str) -> str:
    return "'" + text if text and text[0] in "=+-@\t\r" else text


# ---------------------------------------------------------------------- memory cache
@dataclass
class CachedImage:
    """What the page needs to show one analysed image again."""

    image_png: bytes
    heatmap: object  # uint8 (H, W) numpy array: evidence 0-255 at the image's own size
    biometry_png: bytes | None = None
    #: The DICOM instance (and frame) the image came from, with its patient/study header
    #: (:class:`fetalscan.data.dicom.DicomSource`); None for a still image or video. Memory only:
    #: reports and DICOM outputs refer back to it; it never goes to the database or the log.
    dicom: object | None = None


@dataclass
class CachedStudy:
    result: dict
    images: list[CachedImage] = field(default_factory=list)


class StudyCache:
    """The most recent ``capacity`` studies, in memory (oldest dropped first); thread-safe."""

    def __init__(self, capacity: int) -> None:
        self.capacity = int(capacity)
        self._items: OrderedDict[str, CachedStudy] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, study_id: str, study: CachedStudy) -> None:
        with self._lock:
            self._items[study_id] = study
            self._items.move_to_end(study_id)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def get(self, study_id: str) -> CachedStudy | None:
        with self._lock:
            study = self._items.get(study_id)
            if study is not None:
                self._items.move_to_end(study_id)
            return study

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)
