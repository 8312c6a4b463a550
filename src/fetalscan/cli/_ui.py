"""Terminal output of the CLI: error lines, warnings, tables, shared options."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path


def _console(stderr: bool = False):
    import shutil

    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else max(120, shutil.get_terminal_size((120, 24)).columns)
    return Console(stderr=stderr, highlight=False, soft_wrap=True, width=width)


def error_line(message: str) -> None:
    """One red line on stderr: ``error: <message>``."""
    from rich.markup import escape

    _console(stderr=True).print(f"[bold red]error:[/] {escape(message)}", markup=True)


def warn_line(message: str) -> None:
    """One yellow line on stderr."""
    from rich.markup import escape

    _console(stderr=True).print(f"[yellow]warning:[/] {escape(message)}", markup=True)


def info_line(message: str) -> None:
    """A plain line on stdout."""
    _console().print(message, markup=False)


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A readable table on stdout (floats with 3 decimals, None as '-')."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(title), title_justify="left")
    for i, col in enumerate(columns):
        table.add_column(Text(col), justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*[Text(_fmt(v)) for v in row])
    _console().print(table)


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
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show progress bars (default: when stderr is a terminal)")
    if out:
        p.add_argument("--out", type=Path, required=True, help="output folder (must be empty unless --overwrite)")
        p.add_argument("--overwrite", action="store_true",
                       help="allow a non-empty --out; its files are replaced atomically")


def setup_progress(args: argparse.Namespace) -> None:
    """Turn library progress bars on when asked, or when stderr is a terminal."""
    from fetalscan import progress

    want = args.progress if getattr(args, "progress", None) is not None else sys.stderr.isatty()
    progress.enable(bool(want))


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
    """Build a config dataclass from the parsed flags that exist for its fields."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    values.update(overrides)
    return cls(**values)
