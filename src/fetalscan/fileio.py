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


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """Open a temporary file beside ``path``; rename it over ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **kwargs) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


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
           "pid": os.getpid(), "folders": []}
    token = _RUN.set(run)
    try:
        yield run
        for folder in run["folders"]:
            with contextlib.suppress(OSError):
                (folder / UNFINISHED_MARKER).unlink()
    finally:
        _RUN.reset(token)


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
    left = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir() if p.name != UNFINISHED_MARKER)
    shown = ", ".join(left[:8]) + (f" and {len(left) - 8} more" if len(left) > 8 else "")
    command = info.get("command") or "an earlier fetalscan command"
    when = f" (started {info['started']})" if info.get("started") else ""
    return (f"output folder {out} holds an unfinished run: `{command}`{when} was interrupted or failed before it "
            f"finished, and left {len(left)} file(s)" + (f": {shown}" if left else "") + ". Those files are complete "
            "(each is written whole or not at all) but the set is not, and fetalscan cannot resume this run. Start "
            "over by running the same command with --overwrite (overwrite=True in Python; its files are replaced), "
            "or choose another output folder")


def check_out_dir(out: str | Path, overwrite: bool = False) -> Path:
    """Refuse an ``out`` that is a file, a folder left by an unfinished run, or a non-empty folder,
    unless ``overwrite``.

    Creates nothing, so a run that fails on its input leaves no trace; call it
    before any work and :func:`prepare_out_dir` right before the first write.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"output folder {out} exists and is not a folder")
    if not out.is_dir() or overwrite:
        return out
    marker = out / UNFINISHED_MARKER
    others = [p for p in out.iterdir() if p.name != UNFINISHED_MARKER]
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
    out.mkdir(parents=True, exist_ok=True)
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
