"""Where the project's shared data folder is (``../shared`` beside the repository).

The public data sets (``shared/data/hc18``, ``shared/data/fetal_brain`` ...) live
outside the repository. Candidates, in order:

1. ``$FETALSCAN_SHARED`` (when set),
2. ``<repository>/../shared`` (the folder beside this source checkout),
3. ``<cwd>/../shared``,
4. ``<cwd>/shared``.

Nothing here raises: a missing folder is ``None`` and the caller decides whether
that is an error (a command given an explicit path) or a skipped extra (the
energy-in-head measurement of ``fetalscan explain``).
"""

from __future__ import annotations

import os
from pathlib import Path


def _candidates() -> list[Path]:
    roots = [Path(os.environ["FETALSCAN_SHARED"])] if os.environ.get("FETALSCAN_SHARED") else []
    repo = Path(__file__).resolve().parents[3]  # src/fetalscan/data/shared.py -> repository root
    roots += [repo.parent / "shared", Path.cwd().parent / "shared", Path.cwd() / "shared"]
    return roots


def shared_root() -> Path | None:
    """The first candidate shared folder that exists (see the module docstring), else ``None``."""
    return next((root for root in _candidates() if root.is_dir()), None)


def shared_data(name: str) -> Path | None:
    """``<shared>/data/<name>`` from the first candidate that has it, else ``None``.

    ``name`` may be a data set folder (``"hc18"``) or a path inside ``data/``
    (``"hc18/manifest.csv"``); candidates lacking it are skipped, so a
    ``FETALSCAN_SHARED`` without that data set falls through to ``../shared``.
    """
    for root in _candidates():
        path = root / "data" / name
        if path.exists():
            return path
    return None
