"""Progress reporting for long loops, off unless the command line turns it on.

Library functions wrap long loops in :func:`track`; it is a no-op (the iterable is
returned unchanged) until :func:`enable` is called, which the CLI does when stderr
is a terminal or ``--progress`` is given. Library code therefore never writes to the
terminal by itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
_enabled = False


def enable(on: bool = True) -> None:
    """Switch progress bars on (CLI) or off (library default, tests)."""
    global _enabled
    _enabled = on


def is_enabled() -> bool:
    """Whether :func:`track` draws progress bars."""
    return _enabled


def track(iterable: Iterable[T], description: str, total: int | None = None) -> Iterator[T] | Iterable[T]:
    """Iterate with a progress bar on stderr when enabled, silently otherwise."""
    if not _enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=description, total=total, leave=False, dynamic_ncols=True)
