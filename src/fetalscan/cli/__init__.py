"""The ``fetalscan`` command line.

Each module in this package (``core``, ``evaluate``, ``explain``, ``biometry`` ...)
defines ``register(subparsers)``, which adds its sub-commands and binds each one to
a ``run(args) -> int`` handler with ``set_defaults(func=...)``. Modules import only
``argparse`` at top level; torch and friends are imported inside the handlers so
that ``fetalscan --help`` is instant.

A :class:`~fetalscan.errors.FetalscanError` becomes one red line on stderr and
exit code 2; nothing else is printed for it.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence

from fetalscan import __version__
from fetalscan.texts import DISCLAIMER


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every command module's sub-commands."""
    parser = argparse.ArgumentParser(
        prog="fetalscan",
        description="AI-assisted detection of fetal anomalies in prenatal ultrasound. "
        + DISCLAIMER,
    )
    parser.add_argument("--version", action="version", version=f"fetalscan {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more detail")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = [importlib.import_module(f"{__name__}.{info.name}")
               for info in pkgutil.iter_modules(__path__) if not info.name.startswith("_")]
    # each module may set ORDER (the place of its commands in --help; the data flow's order)
    for module in sorted(modules, key=lambda m: (getattr(m, "ORDER", 100), m.__name__)):
        register = getattr(module, "register", None)
        if register is not None:
            register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fetalscan`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # a command may re-run itself (torchrun, DDP)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from fetalscan.cli._ui import console_logging, error_line
    from fetalscan.errors import FetalscanError
    from fetalscan.fileio import unfinished_marker

    command = " ".join(["fetalscan", *(sys.argv[1:] if argv is None else argv)])
    with console_logging(args.verbose):
        try:
            with unfinished_marker(command):  # an --out left by Ctrl-C or a failure says so on the next run
                return int(args.func(args) or 0)
        except FetalscanError as exc:
            error_line(str(exc))
            return exc.exit_code
        except KeyboardInterrupt:
            error_line("interrupted; files already written are complete, the rest were not written"
                       + _resume_hint(args))
            return 130
        except Exception as exc:  # noqa: BLE001 - a library's own error: one line, its traceback only with -v
            if args.verbose:
                raise
            error_line(_unexpected(exc))
            return 1


def _unexpected(exc: BaseException) -> str:
    """One line for an error that is not a :class:`~fetalscan.errors.FetalscanError` (a bug, or a
    library failing on an input fetalscan does not check): what, where, and what to do."""
    import traceback

    from fetalscan.cli._ui import _library_of, clean_message

    frames = traceback.extract_tb(exc.__traceback__)
    origin = next((lib for f in reversed(frames) if (lib := _library_of(f.filename))), "")
    where = f" in {origin}" if origin else ""
    text = clean_message(str(exc)).rstrip(".")
    return (f"unexpected {type(exc).__name__}{where}: {text}. This is a fetalscan bug or an input it does not "
            "handle yet; rerun as `fetalscan --verbose <command> ...` for the traceback and report it with the "
            "command line")


def _resume_hint(args) -> str:
    """What an interrupted command left in --out, and how to go on (see fetalscan.fileio.unfinished_marker)."""
    from pathlib import Path

    from fetalscan.fileio import UNFINISHED_MARKER

    out = getattr(args, "out", None)
    if out is None or not (Path(out) / UNFINISHED_MARKER).is_file():
        return ""
    return (f"; {out} is marked unfinished: run the same command with --overwrite to start over "
            "(without it, a re-run says what is there)")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
