"""Helpers for tests that need the real service and a real browser.

:func:`running_service` is :func:`fetalscan.serve.process.running_service` (a
``fetalscan serve`` process on a free loopback port, always stopped afterwards);
:func:`chromium_path` finds Debian's Chromium (``make system`` installs it).
"""

from __future__ import annotations

import shutil

from fetalscan.serve.process import Service, free_port, running_service

__all__ = ["Service", "chromium_path", "free_port", "running_service"]


def chromium_path() -> str | None:
    """Debian's Chromium, or ``None``."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None

