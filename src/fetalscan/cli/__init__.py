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
import logging
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
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    from fetalscan.errors import FetalscanError

    try:
        return int(args.func(args) or 0)
    except FetalscanError as exc:
        from fetalscan.cli._ui import error_line

        error_line(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        from fetalscan.cli._ui import error_line

        error_line("interrupted; files already written are complete, the rest were not written")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
