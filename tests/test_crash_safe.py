"""Crash-safe writes (issue 15, item 8): a writer killed or failing midway leaves the old checkpoint,
predictions and review database intact, and nothing partial under the final name."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

#: Run in a child process before the writer: the first ``write`` to a file opened by fetalscan's atomic
#: writer puts half of its bytes on disk and then the process is SIGKILLed (no clean-up can run).
_KILL_MIDWAY = """
import os, signal
_real = os.fdopen
class _HalfThenKill:
    def __init__(self, fh): self.fh = fh
    def write(self, data):
        self.fh.write(data[: max(1, len(data) // 2)]); self.fh.flush(); os.fsync(self.fh.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    def __enter__(self): return self
    def __exit__(self, *exc): return self.fh.__exit__(*exc)
    def __getattr__(self, name): return getattr(self.fh, name)
os.fdopen = lambda fd, mode="r", *a, **kw: _HalfThenKill(_real(fd, mode, *a, **kw))
"""


def _killed_midway(body: str, *args) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-c", _KILL_MIDWAY + body, *map(str, args)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr
    return done


def _final_name_only(folder: Path, name: str) -> list[Path]:
    """Files under ``folder`` that carry the final ``name`` (temporary files are named ``.<name>.*.tmp``)."""
    return [p for p in folder.iterdir() if p.name == name]


def test_a_checkpoint_writer_killed_midway_leaves_the_old_checkpoint_intact(tiny_classifier, tmp_path):
    from fetalscan.fileio import sha256_file
    from fetalscan.models.checkpoint import load_checkpoint, save_loaded

    target = tmp_path / "model.pt"
    save_loaded(target, load_checkpoint(tiny_classifier))
    before = sha256_file(target)
    _killed_midway("""
import sys
from fetalscan.models.checkpoint import load_checkpoint, save_loaded
loaded = load_checkpoint(sys.argv[1])
loaded.classes = ["x", "y"]
save_loaded(sys.argv[2], loaded)
""", tiny_classifier, target)
    assert sha256_file(target) == before
    assert load_checkpoint(target).classes == load_checkpoint(tiny_classifier).classes
    assert _final_name_only(tmp_path, "model.pt") == [target]
    # what the killed writer left is a hidden temporary file, never the checkpoint's name
    assert all(p.name.startswith(".model.pt.") and p.name.endswith(".tmp") for p in tmp_path.iterdir() if p != target)


def test_a_predictions_writer_killed_midway_leaves_the_old_tables_intact(tmp_path):
    from fetalscan.inference.tables import write_prediction_files

    images = pd.DataFrame({"path": [f"img{i}.png" for i in range(2000)], "p_normal": 0.5})
    patients = pd.DataFrame({"group": ["g"], "p_normal": [0.5]})
    write_prediction_files(tmp_path, images, patients)
    old = {name: (tmp_path / name).read_bytes() for name in ("predictions.csv", "patients.csv")}
    _killed_midway("""
import sys
from pathlib import Path
import pandas as pd
from fetalscan.inference.tables import write_prediction_files
images = pd.DataFrame({"path": [f"new{i}.png" for i in range(50000)], "p_normal": 0.9})
write_prediction_files(Path(sys.argv[1]), images, images.head(1))
""", tmp_path)
    for name, data in old.items():
        assert (tmp_path / name).read_bytes() == data, name


def test_a_write_failing_halfway_keeps_the_old_file_and_removes_the_partial_one(tmp_path, monkeypatch):
    from fetalscan import fileio

    target = tmp_path / "predictions.csv"
    fileio.write_csv(target, pd.DataFrame({"a": [1, 2]}))
    old = target.read_bytes()

    class DiskFull:
        def __init__(self, fh):
            self.fh = fh

        def write(self, data):
            self.fh.write(data[: len(data) // 2])
            raise OSError(28, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.fh.__exit__(*exc)

        def __getattr__(self, name):
            return getattr(self.fh, name)

    real = fileio.os.fdopen
    monkeypatch.setattr(fileio.os, "fdopen", lambda fd, mode="r", **kw: DiskFull(real(fd, mode, **kw)))
    with pytest.raises(OSError, match="No space"):
        fileio.write_csv(target, pd.DataFrame({"a": range(10000)}))
    monkeypatch.undo()
    assert target.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions.csv"]  # no partial file left


def test_the_review_database_survives_a_writer_killed_inside_a_transaction(tmp_path):
    from fetalscan.serve.store import ReviewStore

    db = tmp_path / "reviews.sqlite"
    store = ReviewStore(db)
    study = {"id": "a" * 32, "created_utc": "2026-01-01T00:00:00+00:00", "n_images": 1, "prediction": "normal",
             "probabilities": {"normal": 0.9}, "classes": ["abnormal", "normal"], "images": ["x"],
             "model_name": "m", "model_sha256": "0" * 64}
    store.add_study(study)
    store.add_review(study["id"], reader="r", decision="confirm", final_class="normal", comment="first")
    done = subprocess.run([sys.executable, "-c", """
import os, signal, sys
from fetalscan.serve.store import ReviewStore
store = ReviewStore(sys.argv[1])
con = store._connect()
con.execute("BEGIN")
for i in range(500):
    con.execute("INSERT INTO reviews (study_id, created_utc, reader, decision, model_prediction, final_class, "
                "comment, model_sha256) VALUES (?, 't', 'killed', 'confirm', 'normal', 'normal', ?, 'h')",
                (sys.argv[2], "x" * 1000))
os.kill(os.getpid(), signal.SIGKILL)
""", str(db), study["id"]], capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr
    reopened = ReviewStore(db)
    assert [r["comment"] for r in reopened.reviews_of(study["id"])] == ["first"]
    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    reopened.add_review(study["id"], reader="r", decision="confirm", final_class="normal", comment="second")
    assert len(reopened.reviews_of(study["id"])) == 2
