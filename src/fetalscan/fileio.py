"""Safe file handling: atomic writes, output-folder checks, reading torch files, provenance.

Every file fetalscan writes goes to a temporary file in the same folder first and
is then renamed over the target (``os.replace`` is atomic on POSIX and Windows), so
an interrupted or failed run never leaves a half-written or overwritten file.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import logging
import math
import os
import platform
import sys
import tempfile
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from fetalscan.errors import OutputError

log = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """Open a temporary file beside ``path``; rename it over ``path`` only on success."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {_why_not_writable(path.parent, exc)}") from exc
    try:
        with os.fdopen(fd, mode, **kwargs) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists (a path under a file stops at the file)."""
    probe = path
    while not (probe.exists() or probe.is_symlink()) and probe.parent != probe:
        probe = probe.parent
    return probe


def _why_not_writable(folder: Path, exc: OSError | None = None) -> str:
    """Why files cannot be created in ``folder`` (which may not exist yet), in words."""
    probe = _nearest_existing(Path(folder))
    if probe.exists() and not probe.is_dir():
        return f"{probe} is a file, not a folder"
    with contextlib.suppress(OSError, AttributeError):
        if os.statvfs(probe).f_flag & os.ST_RDONLY:
            return f"{probe} is on a read-only file system"
    if exc is not None and exc.strerror:
        return f"{probe}: {exc.strerror.lower()}"
    return f"{probe} is not writable (read-only or immutable folder, or no permission)"


def check_writable(folder: str | Path) -> Path:
    """Raise :class:`OutputError` when files cannot be created in ``folder`` (or, if it does not exist
    yet, when it cannot be created): a path under a file, a read-only / immutable folder or file
    system, no permission. Creates nothing; call it before any work."""
    folder = Path(folder)
    probe = _nearest_existing(folder)
    bad = (probe.exists() and not probe.is_dir()) or not os.access(probe, os.W_OK | os.X_OK)
    if bad:
        raise OutputError(f"cannot write the output folder {folder}: {_why_not_writable(folder)}; "
                          "choose another output folder (--out)")
    return folder


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    with atomic_open(path, "w", encoding="utf-8", newline="") as fh:
        fh.write(text)
    return Path(path)


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_open(path, "wb") as fh:
        fh.write(data)
    return Path(path)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):  # numpy arrays and scalars
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _clean_nan(obj: Any) -> Any:
    """Replace NaN/inf by None so the JSON is standard (``null``), recursively."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean_nan(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean_nan(v) for v in obj]
    return obj


def to_json(obj: Any) -> str:
    """Serialise to standard JSON (NaN -> null, numpy -> lists), indented."""
    obj = json.loads(json.dumps(obj, default=_json_default))
    return json.dumps(_clean_nan(obj), indent=2, sort_keys=False, allow_nan=False) + "\n"


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as JSON atomically."""
    return write_text(path, to_json(obj))


def write_csv(path: str | Path, frame: Any) -> Path:
    """Write a pandas DataFrame as CSV atomically (no index column)."""
    with atomic_open(path, "w", encoding="utf-8", newline="") as fh:
        frame.to_csv(fh, index=False, lineterminator="\n")
    return Path(path)


#: Written into an output folder when a command starts writing there, removed when it finishes: a
#: folder that still holds it was left by a run that was interrupted (Ctrl-C) or failed.
UNFINISHED_MARKER = ".fetalscan-incomplete"

#: Held (``flock``) in an output folder by the command writing there, with its pid and command line: a
#: second command given the same folder at the same time is refused; a lock left by a dead process is taken over.
LOCK_FILE = ".fetalscan-lock"

#: Files of fetalscan's own bookkeeping in an output folder (not counted as the folder's content).
_OWN_FILES = frozenset({UNFINISHED_MARKER, LOCK_FILE})

_RUN: contextvars.ContextVar[dict | None] = contextvars.ContextVar("fetalscan_unfinished_run", default=None)


@contextlib.contextmanager
def unfinished_marker(command: str) -> Iterator[dict]:
    """Mark the output folders of a command as unfinished until it returns (the CLI wraps every command).

    Inside the block, :func:`prepare_out_dir` writes :data:`UNFINISHED_MARKER` (the
    command line and the start time) into each folder it prepares; when the block
    ends normally the markers are removed. An exception or Ctrl-C leaves them, so a
    re-run into the same folder can say what is there (:func:`check_out_dir`).
    """
    run = {"command": command, "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "pid": os.getpid(), "folders": [], "locks": {}, "created": []}
    token = _RUN.set(run)
    try:
        yield run
        for folder in run["folders"]:
            with contextlib.suppress(OSError):
                (folder / UNFINISHED_MARKER).unlink()
    finally:
        _RUN.reset(token)
        _release_locks(run)


def _holder(fd: int) -> dict:
    """The pid / command / start time written into a lock file (empty when unreadable)."""
    try:
        info = json.loads(os.pread(fd, 65536, 0).decode("utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _describe_holder(info: dict) -> str:
    command = info.get("command") or "another fetalscan command"
    when = f", started {info['started']}" if info.get("started") else ""
    return f"`{command}` (pid {info.get('pid', '?')}{when})"


def _take_lock(out: Path, run: dict) -> int | None:
    """Hold :data:`LOCK_FILE` in ``out`` for ``run`` (an exclusive ``flock``, released by the kernel if the
    process dies); :class:`OutputError` naming the holder when another live run has it."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no lock
        return None
    lock = out / LOCK_FILE
    for _ in range(5):
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutputError(f"cannot write the output folder {out}: {_why_not_writable(out, exc)}; "
                              "choose another output folder (--out)") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            info = _holder(fd)
            os.close(fd)
            raise OutputError(f"output folder {out} is in use by another run: {_describe_holder(info)} is writing "
                              "there; wait until it has finished, or choose another output folder") from None
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino  # not unlinked by a finishing holder meanwhile
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        stale = _holder(fd)
        if stale.get("pid") and stale.get("pid") != os.getpid():
            log.warning("output folder %s held the lock of a run that is no longer running: %s; taking it over "
                        "(that run did not finish: its files there may be incomplete)", out, _describe_holder(stale))
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps({k: run[k] for k in ("command", "started", "pid")}) + "\n").encode("utf-8"), 0)
        return fd
    raise OutputError(f"output folder {out}: could not take its lock {lock} (other runs keep replacing it)")


def lock_out_dir(out: str | Path) -> Path:
    """Inside :func:`unfinished_marker` (every CLI command), hold ``out``'s :data:`LOCK_FILE` until the
    command ends, creating ``out`` if needed (removed again at the end if the command wrote nothing there).

    A second command given the same folder while the first runs gets :class:`OutputError` naming the
    first (its pid and command line); a lock left by a process that died is taken over with a warning.
    Outside a command (the Python API) this does nothing.
    """
    out = Path(out)
    run = _RUN.get()
    if run is None:
        return out
    key = out.resolve()
    if key in run["locks"]:
        return out
    check_writable(out)
    missing = [p for p in [out, *out.parents] if not p.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the output folder {out}: {_why_not_writable(out, exc)}") from exc
    run["created"].extend(missing)  # deepest first
    run["locks"][key] = (out, _take_lock(out, run))
    return out


def _release_locks(run: dict) -> None:
    """Drop the run's locks; remove the folders it created for them and left empty."""
    for out, fd in run["locks"].values():
        if fd is None:
            continue
        with contextlib.suppress(OSError):
            (out / LOCK_FILE).unlink()
        with contextlib.suppress(OSError):
            os.close(fd)
    run["locks"].clear()
    for folder in run["created"]:  # deepest first; a folder with any file in it stays
        with contextlib.suppress(OSError):
            folder.rmdir()


def _own_marker(marker: Path) -> bool:
    """Whether ``marker`` was written by the run in progress (not by an earlier, unfinished one)."""
    run = _RUN.get()
    return run is not None and any(marker.parent.resolve() == f.resolve() for f in run["folders"])


def describe_unfinished(out: Path) -> str:
    """What an unfinished run left in ``out`` and how to go on (the message of a refused re-run)."""
    marker = out / UNFINISHED_MARKER
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        info = {}
    left = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir() if p.name not in _OWN_FILES)
    shown = ", ".join(left[:8]) + (f" and {len(left) - 8} more" if len(left) > 8 else "")
    command = info.get("command") or "an earlier fetalscan command"
    when = f" (started {info['started']})" if info.get("started") else ""
    head = (f"output folder {out} holds an unfinished run: `{command}`{when} was interrupted or failed before it "
            f"finished, and left {len(left)} file(s)" + (f": {shown}" if left else "") + ". ")
    if (out / "predict_run.json").is_file():  # archive-scale prediction appends and resumes (inference.batch)
        return head + ("Its rows are complete; run the same command with --resume to go on without redoing "
                       "finished images, or with --overwrite to start over")
    return head + ("Those files are complete (each is written whole or not at all) but the set is not, and "
                   "fetalscan cannot resume this run. Start over by running the same command with --overwrite "
                   "(overwrite=True in Python; its files are replaced), or choose another output folder")


def check_out_dir(out: str | Path, overwrite: bool = False) -> Path:
    """Refuse an ``out`` that is a file, lies under a file, cannot be written (read-only or immutable
    folder or file system), is in use by another run, was left by an unfinished run, or is not empty
    (unless ``overwrite``).

    Creates nothing, so a run that fails on its input leaves no trace (inside a CLI command
    it takes the folder's lock, :func:`lock_out_dir`, and removes a folder it had to create
    for it if nothing was written there); call it before any work and :func:`prepare_out_dir`
    right before the first write.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"output folder {out} exists and is not a folder")
    check_writable(out)
    lock_out_dir(out)
    if not out.is_dir() or overwrite:
        return out
    marker = out / UNFINISHED_MARKER
    others = [p for p in out.iterdir() if p.name not in _OWN_FILES]
    if marker.is_file() and not _own_marker(marker):
        if not others:  # the unfinished run wrote nothing: nothing to lose, nothing to explain
            return out
        raise OutputError(describe_unfinished(out))
    if others and not marker.is_file():
        raise OutputError(
            f"output folder {out} is not empty; choose another folder or allow overwriting (--overwrite) "
            "to replace its files"
        )
    return out


def prepare_out_dir(out: str | Path, overwrite: bool = False) -> Path:
    """Make sure ``out`` can receive a run's files (see :func:`check_out_dir`), creating it.

    With ``overwrite`` the files of an existing folder are replaced one by one
    (atomically) as the run writes them; nothing is deleted up front. Inside
    :func:`unfinished_marker` (every CLI command) the folder is marked unfinished
    until the command returns.
    """
    out = check_out_dir(out, overwrite)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the output folder {out}: {_why_not_writable(out, exc)}") from exc
    run = _RUN.get()
    if run is not None and not any(out.resolve() == f.resolve() for f in run["folders"]):
        write_text(out / UNFINISHED_MARKER, json.dumps({k: run[k] for k in ("command", "started", "pid")}) + "\n")
        run["folders"].append(out)
    return out


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def package_versions() -> dict[str, str]:
    """Versions of Python and of the packages that change results."""
    from importlib import metadata

    versions = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in ("fetalscan", "torch", "torchvision", "timm", "numpy", "scikit-learn",
                 "pandas", "pillow", "pydicom", "opencv-python-headless"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def provenance(seed: int | None = None, data_hash: str | None = None, **extra: Any) -> dict:
    """The provenance block written into every output: when, what, with which versions."""
    block: dict[str, Any] = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "",
        "seed": seed,
        "data_hash": data_hash,
        "versions": package_versions(),
    }
    block.update(extra)
    return block


def read_torch_file(path: str | Path, error: type[Exception], what: str) -> Any:
    """Load a torch file safely (``weights_only=True``: tensors and plain containers, no code).

    A missing or unreadable file raises ``error`` (a :class:`~fetalscan.errors.FetalscanError`
    subclass chosen by the caller) naming the file and ``what`` it should have been.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise error(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for corrupt files
        raise error(f"{path} is not a readable {what} (corrupt or not a torch file): {exc}") from exc
