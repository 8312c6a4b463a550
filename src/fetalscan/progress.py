"""Progress reporting for long work, off unless the command line turns it on.

Library functions wrap long loops in :func:`track` and announce milestones (an epoch, a
fold) with :func:`step`; both do nothing until :func:`enable` is called, which the CLI
does. Library code therefore never writes to the terminal by itself. Two styles:

- ``"bars"``: tqdm progress bars on stderr (the CLI's choice on a terminal, or with
  ``--progress``); :func:`step` lines are written above the bar.
- ``"lines"``: plain, flushed lines on stderr, for logs and pipes where a bar would be
  garbage (the CLI's choice when stderr is not a terminal): every :func:`step` line,
  and for :func:`track` loops that run longer than :data:`LINES_AFTER_S` a line at each
  tenth of the way (and at the end); short loops stay silent.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
_mode = "off"  # "off", "bars" or "lines"

#: In "lines" mode a :func:`track` loop reports only once it has run this long (seconds).
LINES_AFTER_S = 5.0


def enable(on: bool | str = True) -> None:
    """Switch progress reporting on (``True`` / ``"bars"``, or ``"lines"``) or off (``False``, the default)."""
    global _mode
    if on is True:
        on = "bars"
    if on not in (False, "off", "bars", "lines"):
        raise ValueError(f"progress mode must be True, False, 'bars', 'lines' or 'off', got {on!r}")
    _mode = "off" if on is False else str(on)


def is_enabled() -> bool:
    """Whether progress is reported at all."""
    return _mode != "off"


def mode() -> str:
    """``"off"``, ``"bars"`` or ``"lines"``."""
    return _mode


def step(message: str) -> None:
    """One progress line (an epoch finished, a fold started): on stderr when enabled, else nothing."""
    if _mode == "off":
        return
    if _mode == "bars":
        from tqdm.auto import tqdm

        tqdm.write(message, file=sys.stderr)
        return
    print(message, file=sys.stderr, flush=True)


def _lines(iterable: Iterable[T], description: str, total: int | None) -> Iterator[T]:
    """``description: k/total (elapsed)`` at every tenth of the way (every 100 items without a total),
    once the loop has run :data:`LINES_AFTER_S` seconds."""
    t0 = time.perf_counter()
    marks = {max(1, round(total * k / 10)) for k in range(1, 11)} if total else set()
    done = 0
    for item in iterable:
        yield item
        done += 1
        due = (done in marks) if total else done % 100 == 0
        if due and time.perf_counter() - t0 >= LINES_AFTER_S:
            of = f"/{total}" if total else ""
            print(f"{description}: {done}{of} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)


def track(iterable: Iterable[T], description: str, total: int | None = None,
          lines: bool = True) -> Iterator[T] | Iterable[T]:
    """Iterate with progress on stderr when enabled (bar or plain lines), silently otherwise.

    ``lines=False``: no plain lines for this loop (it announces each step with :func:`step`).
    """
    if _mode == "off" or (_mode == "lines" and not lines):
        return iterable
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    if _mode == "lines":
        return _lines(iterable, description, total)
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=description, total=total, leave=False, dynamic_ncols=True)
