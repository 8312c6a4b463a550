"""The pixel limit every image reader checks before it decodes (images, DICOM frames).

A decompression bomb — a 30000 x 30000 PNG of a few kB, or a DICOM header that claims
65535 x 65535 pixels — would need gigabytes once decoded; ultrasound frames are below
2 million pixels. Readers check ``width x height`` from the header against
:func:`max_image_pixels` and refuse larger images naming the file.
"""

from __future__ import annotations

import os
from pathlib import Path

from fetalscan.errors import DataError, ImageReadError

#: Largest image or frame (width x height) fetalscan decodes. Override with ``FETALSCAN_MAX_IMAGE_PIXELS``.
MAX_IMAGE_PIXELS = 50_000_000


def max_image_pixels() -> int:
    """The pixel limit: ``$FETALSCAN_MAX_IMAGE_PIXELS``, else :data:`MAX_IMAGE_PIXELS`."""
    raw = os.environ.get("FETALSCAN_MAX_IMAGE_PIXELS", "").strip()
    if not raw:
        return MAX_IMAGE_PIXELS
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise DataError(f"FETALSCAN_MAX_IMAGE_PIXELS must be a positive whole number of pixels, got {raw!r}")
    return value


def check_size(path: Path, width: int, height: int, limit: int | None = None, what: str = "the image") -> None:
    """Raise :class:`ImageReadError` naming ``path`` when ``width x height`` is empty or above the limit."""
    limit = max_image_pixels() if limit is None else int(limit)
    if width < 1 or height < 1:
        raise ImageReadError(f"{path}: {what} has no pixels ({width} x {height})")
    if width * height > limit:
        raise ImageReadError(
            f"{path}: refused, {what} of {width} x {height} = {width * height:,} pixels is above the limit of "
            f"{limit:,} (a decompression bomb, or not an ultrasound frame); if it is genuine, raise "
            "FETALSCAN_MAX_IMAGE_PIXELS")
