"""The service's audit trail: who did what to which (pseudonymous) study, hash-chained, append-only.

Every entry is one line of JSON (a JSON-lines file, ``runs/serve/audit.jsonl`` beside the
review database by default)::

    {"seq": 7, "time_utc": "2026-01-31T12:00:00+00:00", "actor": "token:3f2a9c1d5e7b",
     "action": "review", "study_id": "9c0e...", "details": {"decision": "confirm", ...},
     "prev_hash": "<hash of entry 6>", "hash": "<SHA-256 of this entry>"}

``hash`` is the SHA-256 (hex) of the entry's canonical JSON without ``hash`` (keys sorted,
no spaces, UTF-8), which includes ``prev_hash``, the previous entry's ``hash`` (64 zeros
for the first entry). So editing, inserting, deleting or reordering an entry breaks the
chain at that line, and :func:`verify` names the first bad line.

What a chain alone cannot show: entries cut off the *end* of the log (the rest is still a
valid chain), or a log rewritten as a whole with new hashes. :class:`AuditLog` therefore
also keeps the head (``seq`` and ``hash`` of the last entry) in a sidecar file
``<log>.head``, and :func:`verify` checks the log against it, or against a head hash
recorded elsewhere (``fetalscan audit verify LOG --expect-head HASH``): copy the head that
``verify`` prints to a place the service cannot write (a ticket, a signed e-mail, a
write-once store) to make truncation and rewriting detectable too.

Appends are atomic: the entry is one ``write`` of one line to a file opened with
``O_APPEND``, then ``fsync``; a lock across threads (``threading.Lock``) and processes
(``fcntl.flock`` on the log) makes each read-the-head-then-append one step.

No patient identifiers: study ids are random pseudonyms made by the service, and the
callers put counts, classes and decisions in ``details``, never file names (a DICOM
file's name may carry a patient's name or ID).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fetalscan.errors import FetalscanError

#: The keys of every entry, in the order they are written.
FIELDS = ("seq", "time_utc", "actor", "action", "study_id", "details", "prev_hash", "hash")

#: ``prev_hash`` of the first entry.
GENESIS = "0" * 64

#: Actions the service records.
ACTIONS = ("analyze", "review", "report_download")


class AuditError(FetalscanError):
    """The audit log cannot be written, or it is not intact (the message names the first bad line)."""


def canonical(entry: dict) -> bytes:
    """The bytes an entry's hash covers: its JSON without ``hash``, keys sorted, no spaces, UTF-8."""
    body = {k: v for k, v in entry.items() if k != "hash"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def entry_hash(entry: dict) -> str:
    """Hex SHA-256 of :func:`canonical` ``(entry)``."""
    return hashlib.sha256(canonical(entry)).hexdigest()


def head_path(log_path: str | Path) -> Path:
    """The sidecar file that holds the log's head (``<log>.head``)."""
    log_path = Path(log_path)
    return log_path.with_name(log_path.name + ".head")


def token_actor(token: str | None) -> str:
    """The actor of a request made with the service's access token: a fingerprint, never the token.

    ``token:`` and the first 12 hex digits of the token's SHA-256; ``local`` when
    authentication is off (``--insecure-local``).
    """
    if not token:
        return "local (no authentication)"
    return "token:" + hashlib.sha256(token.encode("utf-8")).hexdigest()[:12]


class AuditLog:
    """An append-only, hash-chained JSON-lines audit log (see the module documentation).

    Parameters
    ----------
    path : path-like
        The log file; created (with its folder) on the first append.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise AuditError(f"cannot create the folder of the audit log {self.path}: {exc.strerror or exc}") from exc

    def append(self, *, actor: str, action: str, study_id: str | None = None,
               details: dict[str, Any] | None = None) -> dict:
        """Append one entry, chained to the last one; returns it (with ``seq`` and ``hash``).

        Raises :class:`AuditError` when the log cannot be written or its last line is
        damaged (the service then refuses to go on unrecorded).
        """
        with self._lock, _locked_append(self.path) as fd:
            last = _last_entry(fd, self.path)
            entry = {"seq": (last["seq"] + 1) if last else 1,
                     "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                     "actor": str(actor), "action": str(action), "study_id": study_id,
                     "details": details or {}, "prev_hash": last["hash"] if last else GENESIS}
            entry["hash"] = entry_hash(entry)
            line = json.dumps({k: entry[k] for k in FIELDS}, ensure_ascii=False, separators=(",", ":")) + "\n"
            data = line.encode("utf-8")
            try:
                if os.write(fd, data) != len(data):  # pragma: no cover - a short write to a regular file
                    raise OSError("short write")
                os.fsync(fd)
            except OSError as exc:
                raise AuditError(f"cannot append to the audit log {self.path}: {exc}") from exc
            _write_head(self.path, entry)
        return entry

    def head(self) -> dict:
        """``{"seq", "hash"}`` of the last entry (``seq`` 0 and :data:`GENESIS` for an empty log)."""
        result = verify(self.path, head_file=False)
        return {"seq": result.n_entries, "hash": result.head_hash}


@contextlib.contextmanager
def _locked_append(path: Path) -> Iterator[int]:
    """The log opened for appending, under an exclusive ``flock`` (other processes wait)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
    except OSError as exc:
        raise AuditError(f"cannot open the audit log {path}: {exc.strerror or exc}") from exc
    try:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: the thread lock only
            fcntl = None
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)  # closing drops the flock


def _last_entry(fd: int, path: Path) -> dict | None:
    """The last entry of the log open at ``fd`` (None when empty); :class:`AuditError` when damaged."""
    size = os.fstat(fd).st_size
    if size == 0:
        return None
    chunk, tail = 4096, b""
    pos = size
    while pos > 0:
        step = min(chunk, pos)
        pos -= step
        tail = os.pread(fd, step, pos) + tail
        if tail.rstrip(b"\n").count(b"\n") >= 1:
            break
    last = tail.rstrip(b"\n").rsplit(b"\n", 1)[-1]
    try:
        entry = json.loads(last.decode("utf-8"))
        if not tail.endswith(b"\n") or not isinstance(entry, dict) or entry_hash(entry) != entry.get("hash"):
            raise ValueError("not a complete entry")
        int(entry["seq"])
    except (ValueError, KeyError, TypeError) as exc:
        raise AuditError(f"the audit log {path} is damaged at its last line ({exc}); nothing was appended. "
                         f"Check it with `fetalscan audit verify {path}`, keep the damaged file as evidence and "
                         "start a new log (--audit-log)") from None
    return entry


def _write_head(path: Path, entry: dict) -> None:
    from fetalscan.fileio import write_text

    write_text(head_path(path), json.dumps({"seq": entry["seq"], "hash": entry["hash"]}) + "\n")


@dataclass
class VerifyResult:
    """What :func:`verify` found. ``ok`` is True when the log is intact."""

    path: Path
    ok: bool
    n_entries: int
    head_hash: str
    bad_line: int | None = None  # 1-based line of the first problem
    problem: str = ""
    notes: list[str] = field(default_factory=list)

    def message(self) -> str:
        if self.ok:
            return (f"{self.path}: intact, {self.n_entries} entr{'y' if self.n_entries == 1 else 'ies'}; "
                    f"head hash {self.head_hash}")
        where = f", line {self.bad_line}" if self.bad_line is not None else ""
        return f"{self.path}{where}: {self.problem}"


def verify(path: str | Path, *, expect_head: str | None = None, head_file: bool | str | Path = True) -> VerifyResult:
    """Check an audit log: every entry's hash, the chain of ``prev_hash`` and ``seq``, and the head.

    Parameters
    ----------
    path : path-like
        The JSON-lines log.
    expect_head : str, optional
        A head hash recorded elsewhere earlier: it must be the hash of an entry of the log
        (entries appended after it are fine). Detects entries cut off the end, and a log
        rewritten as a whole.
    head_file : bool or path
        Check the log against its sidecar head file (``<log>.head``, written by
        :class:`AuditLog`) when it exists (True, default), against this file, or not (False).

    Returns
    -------
    VerifyResult
        ``ok`` and, when not, the first bad line and what is wrong there: an edited entry
        (its hash no longer matches its content), an inserted, deleted or reordered entry
        (``prev_hash`` or ``seq`` out of the chain), or a truncated end.
    """
    path = Path(path)
    if not path.is_file():
        raise AuditError(f"audit log not found: {path}")
    prev_hash, n, hashes = GENESIS, 0, {}
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            problem = _check_line(raw, lineno, n, prev_hash)
            if problem:
                return VerifyResult(path, False, n, prev_hash, lineno, problem)
            entry = json.loads(raw)
            prev_hash, n = entry["hash"], n + 1
            hashes[entry["hash"]] = n
    result = VerifyResult(path, True, n, prev_hash)
    head = _recorded_head(path, head_file)
    if head is not None:
        _check_recorded(result, hashes, head)
    if result.ok and expect_head:
        _check_expected(result, hashes, expect_head.strip().lower())
    return result


def _check_line(raw: bytes, lineno: int, n_before: int, prev_hash: str) -> str:
    """What is wrong with one line of the log ('' when it continues the chain)."""
    if not raw.endswith(b"\n"):
        return "the last line is incomplete (no line end): a write was cut off, or the line was edited"
    try:
        entry = json.loads(raw)
    except ValueError:
        return "not a JSON entry (edited, or damaged)"
    if not isinstance(entry, dict) or set(entry) != set(FIELDS):
        return f"not an audit entry (expected the keys {', '.join(FIELDS)})"
    if entry["hash"] != entry_hash(entry):
        return "edited: the entry's hash does not match its content"
    if entry["seq"] != n_before + 1:
        return (f"seq {entry['seq']} where {n_before + 1} was expected: an entry was deleted, inserted or moved "
                "before this line")
    if entry["prev_hash"] != prev_hash:
        what = "the start of the log" if n_before == 0 else f"line {lineno - 1}"
        return (f"prev_hash does not match the hash of {what}: an entry was inserted, deleted or reordered "
                "before this line")
    return ""


def _recorded_head(path: Path, head_file: bool | str | Path) -> dict | None:
    if head_file is False:
        return None
    hp = head_path(path) if head_file is True else Path(head_file)
    if not hp.is_file():
        if head_file is True:
            return None
        raise AuditError(f"head file not found: {hp}")
    try:
        head = json.loads(hp.read_text(encoding="utf-8"))
        return {"seq": int(head["seq"]), "hash": str(head["hash"]), "file": str(hp)}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AuditError(f"{hp} is not a readable audit head file ({exc})") from exc


def _check_recorded(result: VerifyResult, hashes: dict, head: dict) -> None:
    """The log must reach the head recorded in the sidecar file (more entries after it are allowed)."""
    at = hashes.get(head["hash"])
    if at == head["seq"]:
        if at < result.n_entries:
            result.notes.append(f"{result.n_entries - at} entr(ies) after the head recorded in {head['file']}")
        return
    result.ok = False
    result.bad_line = result.n_entries + 1 if result.n_entries < head["seq"] else None
    if result.n_entries < head["seq"]:
        result.problem = (f"truncated: the log ends after {result.n_entries} entries, but {head['file']} records "
                          f"entry {head['seq']} (hash {head['hash'][:16]}…); entries were cut off its end")
    else:
        result.problem = (f"the head recorded in {head['file']} (entry {head['seq']}, hash {head['hash'][:16]}…) is "
                          "not in the log: the log was rewritten, or the head file belongs to another log")


def _check_expected(result: VerifyResult, hashes: dict, expected: str) -> None:
    if expected in hashes:
        return
    result.ok = False
    result.bad_line = result.n_entries + 1
    result.problem = (f"the expected head {expected[:16]}… is not the hash of any of its {result.n_entries} entries: "
                      "entries were cut off its end, or the log was rewritten")
