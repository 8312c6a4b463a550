"""Terminal output of the CLI: error lines, warnings, tables, shared options."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import re
import sys
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path


def _console_width(stream) -> int | None:
    """Columns to lay out for: the terminal's own width on a terminal (``None``: rich asks it),
    else at least 120 (log files and pipes are read in wide windows)."""
    import shutil

    return None if stream.isatty() else max(120, shutil.get_terminal_size((120, 24)).columns)


def _console(stderr: bool = False):
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, highlight=False, soft_wrap=True, width=_console_width(stream))


#: Text that libraries (torch, pydicom ...) address to *their* developers; it never reaches our users.
_ISSUE_URL = re.compile(r"\s*(?:at\s+)?https?://\S*?(?:issues|bugs|bug-report)\S*?(?=[.,;:)]?(?:\s|$))",
                        re.IGNORECASE)
_LIBRARY_NOISE = re.compile(
    r"\s*[^.!?]*\b(?:please|kindly)\b[^.!?]*\b(?:file|open|report|submit|raise)\b[^.!?]*\b(?:issue|bug)\b[^.!?]*"
    r"(?:[.!?]|$)", re.IGNORECASE)
_LEADING_LEVEL = re.compile(r"^\s*(?:warning|error)\s*:\s*", re.IGNORECASE)


def clean_message(message: str) -> str:
    """One line for the console: the first line of ``message``, without a leading "warning:" /
    "error:" (the line adds its own) and without a library's "please file an issue" request."""
    lines = [ln.strip() for ln in str(message).strip().splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    text = _LIBRARY_NOISE.sub("", _ISSUE_URL.sub("", text)).strip()
    while _LEADING_LEVEL.match(text):
        text = _LEADING_LEVEL.sub("", text, count=1)
    return text.strip() or str(message).strip()


def error_line(message: str) -> None:
    """One red line on stderr: ``error: <message>``."""
    from rich.markup import escape

    _console(stderr=True).print(f"[bold red]error:[/] {escape(clean_message(message))}", markup=True)


def warn_line(message: str) -> None:
    """One yellow line on stderr: ``warning: <message>`` (the one warning style of the CLI)."""
    from rich.markup import escape

    _console(stderr=True).print(f"[yellow]warning:[/] {escape(clean_message(message))}", markup=True)


def info_line(message: str) -> None:
    """A plain line on stdout."""
    _console().print(message, markup=False)


#: A frame index in a message (``cine.dcm#12``, ``frame 12``): messages that differ only in it are one warning.
_FRAME = re.compile(r"(#|\bframe\s+)\d+\b", re.IGNORECASE)


class _ConsoleLogHandler(logging.Handler):
    """Log records and Python warnings as the CLI's own lines: ``warning: ...`` / ``error: ...``.

    Each warning is shown once: a repeat, or the same warning for another frame of a
    cine, is counted and summed up at the end instead of printed. Tracebacks attached
    to records (``exc_info``) are shown only with ``--verbose``.
    """

    def __init__(self, verbose: bool) -> None:
        super().__init__(logging.INFO if verbose else logging.WARNING)
        self.verbose = verbose
        self.repeats: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string in a library's log call must not stop the run
            text = str(record.msg)
        if record.levelno < logging.WARNING:
            _console(stderr=True).print(f"{record.name}: {clean_message(text)}", markup=False, highlight=False)
            return
        self.say(text, record.levelno, record.exc_info if self.verbose else None)

    def say(self, text: str, level: int = logging.WARNING, exc_info=None) -> None:
        key = _FRAME.sub(r"\1N", clean_message(text))
        if key in self.repeats:
            self.repeats[key] += 1
            return
        self.repeats[key] = 0
        (error_line if level >= logging.ERROR else warn_line)(text)
        if exc_info:
            import traceback

            sys.stderr.write("".join(traceback.format_exception(*exc_info)))

    def summary(self) -> None:
        for key, n in self.repeats.items():
            if n:
                warn_line(f"the warning \"{key[:80]}{'…' if len(key) > 80 else ''}\" was repeated {n} more "
                          "time(s) (other frames or images); shown once")


def _library_of(filename: str) -> str:
    """The top-level package a file belongs to (``torch``, ``pydicom`` ...), or ''."""
    parts = Path(filename).parts
    if "site-packages" in parts:
        i = parts.index("site-packages")
        if i + 1 < len(parts):
            return Path(parts[i + 1]).stem.split("-")[0]
    return ""


@contextlib.contextmanager
def console_logging(verbose: bool = False) -> Iterator[_ConsoleLogHandler]:
    """Route log records and Python warnings (pydicom's, torch's ...) to one-line ``warning:`` messages
    for the duration of a command; restores the previous logging and warnings set-up afterwards."""
    import warnings

    root = logging.getLogger()
    handler = _ConsoleLogHandler(verbose)
    old_level, old_show = root.level, warnings.showwarning
    fetalscan_logger = logging.getLogger("fetalscan")
    old_fs_level = fetalscan_logger.level

    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ARG001 - warnings API
        origin = _library_of(str(filename))
        text = clean_message(str(message))
        handler.say(f"{text} ({origin})" if origin and origin != "fetalscan" else text)

    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    fetalscan_logger.setLevel(logging.INFO if verbose else logging.WARNING)
    warnings.showwarning = show
    try:
        yield handler
    finally:
        handler.summary()
        warnings.showwarning = old_show
        root.removeHandler(handler)
        root.setLevel(old_level)
        fetalscan_logger.setLevel(old_fs_level)


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A readable table on stdout (floats with 3 decimals, None as '-').

    No cell is cut: when the table is wider than the console, its columns are dealt
    into several tables that each repeat the first column (the row names), so every
    class name and column name stays whole.
    """
    from rich.table import Table
    from rich.text import Text

    console = _console()
    cells = [[_fmt(v) for v in row] for row in rows]
    need = [max([len(str(col))] + [len(r[i]) for r in cells if i < len(r)]) + 3 for i, col in enumerate(columns)]
    width = console.width
    groups: list[list[int]] = []
    for i in range(1, len(columns)):
        if groups and need[0] + sum(need[j] for j in groups[-1]) + need[i] + 1 <= width:
            groups[-1].append(i)
        else:
            groups.append([i])
    groups = groups or [[]]
    for k, group in enumerate(groups):
        part = f" ({k + 1}/{len(groups)})" if len(groups) > 1 else ""
        table = Table(title=Text(title + part), title_justify="left")
        for i in [0, *group]:
            table.add_column(Text(str(columns[i])), justify="left" if i == 0 else "right", no_wrap=True,
                             overflow="fold", min_width=need[i] - 3)
        for row in cells:
            table.add_row(*[Text(row[i] if i < len(row) else "") for i in [0, *group]])
        console.print(table)


def _fmt(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "-" if v != v else f"{v:.3f}"
    return str(v)


def add_runtime_options(p: argparse.ArgumentParser, out: bool = True) -> None:
    """``--device``, ``--seed``, ``--progress`` and optionally ``--out`` / ``--overwrite``."""
    p.add_argument("--device", default="auto",
                   help="'auto' (CUDA when present, else CPU), 'cpu', 'cuda' or 'cuda:N' (default: auto)")
    p.add_argument("--seed", type=int, default=0, help="random seed for splits, training and bootstrap (default: 0)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help=PROGRESS_HELP)
    if out:
        p.add_argument("--out", type=Path, required=True, help="output folder (must be empty unless --overwrite)")
        p.add_argument("--overwrite", action="store_true",
                       help="allow a non-empty --out; its files are replaced atomically")


#: Help of every command's ``--progress`` flag.
PROGRESS_HELP = ("progress on stderr: bars on a terminal, plain lines (one per epoch, fold or tenth of a "
                 "long loop) when stderr is a file or pipe (default); --progress: bars; --no-progress: none")


def setup_progress(args: argparse.Namespace) -> None:
    """Progress on stderr: bars when asked or on a terminal, plain lines when stderr is not a terminal
    (a log file, a pipe, a batch job), nothing with ``--no-progress``."""
    from fetalscan import progress

    asked = getattr(args, "progress", None)
    if asked is None:
        progress.enable("bars" if sys.stderr.isatty() else "lines")
    else:
        progress.enable("bars" if asked else False)


def add_dataclass_options(p: argparse.ArgumentParser, cls, help: Mapping[str, str], *, title: str | None = None,
                          skip: Collection[str] = (), rename: Mapping[str, str] | None = None,
                          defaults: Mapping[str, object] | None = None) -> None:
    """One flag per field of a config dataclass (``--field-name``, booleans as ``--x/--no-x``),
    with the default shown; so the CLI maps onto the config 1:1. ``defaults`` overrides a
    field's default on the command line; a field whose default is ``None`` takes a string."""
    group = p.add_argument_group(title or cls.__name__)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + (rename or {}).get(f.name, f.name).replace("_", "-")
        default = (defaults or {}).get(f.name, f.default)
        text = help.get(f.name, "") + ("" if default is None else f" (default: {default})")
        if isinstance(default, bool):
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=text)
        else:
            kind = str if default is None else type(default)
            group.add_argument(flag, dest=f.name, type=kind, default=default, help=text)


def dataclass_from_args(cls, args: argparse.Namespace, **overrides):
    """Build a config dataclass from the parsed flags that exist for its fields, and validate it
    (its ``validate()``, when it has one), so every option is checked before any work starts."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    values.update(overrides)
    config = cls(**values)
    if callable(getattr(config, "validate", None)):
        config.validate()
    return config
