"""Matplotlib helpers shared by every report: headless backend, PNG files, inline images.

Figures are drawn with the non-interactive Agg backend (no display needed), saved
atomically, and embedded in self-contained HTML as ``data:`` URIs.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg", force=True)

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from fetalscan.fileio import write_bytes  # noqa: E402


def new_figure(width: float = 6.0, height: float = 4.0, **kwargs) -> tuple[Figure, object]:
    """A figure and axes, independent of pyplot's global state (safe in threads)."""
    fig = Figure(figsize=(width, height), dpi=100, **kwargs)
    return fig, fig.subplots()


def figure_png(fig: Figure, dpi: int = 110) -> bytes:
    """PNG bytes of a figure (tight bounding box)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def png_data_uri(png: bytes) -> str:
    """``data:image/png;base64,...`` for embedding in HTML."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def figure_data_uri(fig: Figure, dpi: int = 110) -> str:
    """A figure as an inline HTML image source."""
    return png_data_uri(figure_png(fig, dpi))


def save_figure(fig: Figure, path: str | Path, dpi: int = 110) -> Path:
    """Write a figure as PNG atomically."""
    return write_bytes(path, figure_png(fig, dpi))


def file_data_uri(path: str | Path) -> str:
    """An existing PNG/JPEG file as an inline HTML image source."""
    path = Path(path)
    mime = "image/jpeg" if path.suffix.lower() in (".jpg", ".jpeg") else "image/png"
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


__all__ = ["figure_data_uri", "figure_png", "file_data_uri", "new_figure", "plt", "png_data_uri", "save_figure"]
