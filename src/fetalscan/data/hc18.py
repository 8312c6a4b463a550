"""HC18-style biometry manifests: the one reader and the one mask reader.

A biometry manifest has the columns ``image,mask,exam,pixel_size_mm,hc_mm``
(the shared HC18 layout; ``path`` is accepted for ``image``, ``group`` for
``exam`` and ``pixel_spacing_mm`` for ``pixel_size_mm``), paths relative to the
CSV. :func:`load_biometry_manifest` reads and validates it for biometry
training / evaluation / prediction and for the energy-in-head check of the
heatmap faithfulness; :func:`read_mask` reads a reference mask with the one
threshold of :func:`as_binary_mask` (non-zero = head for 8-bit masks).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fetalscan.errors import DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BiometryItem:
    """One row of a biometry manifest."""

    image: Path
    mask: Path | None
    exam: str
    pixel_size_mm: float | None
    hc_mm: float | None
    name: str  # image path as written in the manifest
    line: int  # 1-based manifest line (header = 1)

    def where(self) -> str:
        return f"{self.image} [manifest line {self.line}]"


_ALIASES = {"image": ("image", "path"), "exam": ("exam", "group"),
            "pixel_size_mm": ("pixel_size_mm", "pixel_spacing_mm"), "mask": ("mask",), "hc_mm": ("hc_mm",)}


def _column(columns: Sequence[str], key: str) -> str | None:
    return next((c for c in _ALIASES[key] if c in columns), None)


def load_biometry_manifest(csv_path: str | Path, require_masks: bool = True,
                           require_exam: bool = True) -> list[BiometryItem]:
    """Read and validate a biometry manifest (paths relative to the CSV).

    Raises :class:`DataError` naming the file, line and field for a missing
    column, an empty or non-existent image / mask, an empty exam, or a
    non-numeric / non-positive pixel size or HC. An empty ``pixel_size_mm`` is
    allowed (that image is then measured in pixels). With ``require_exam=False``
    a missing ``exam`` column or an empty exam cell makes each image its own exam
    (its name as written in the manifest).
    """
    from fetalscan.data.records import read_csv_table, refuse_repeated_lines

    csv_path = Path(csv_path)
    columns, rows = read_csv_table(csv_path)
    required = ["image"] + (["exam"] if require_exam else []) + (["mask"] if require_masks else [])
    names = {k: _column(columns, k) for k in _ALIASES}
    missing = [k for k in required if names[k] is None]
    if missing:
        raise DataError(f"{csv_path}: missing column(s) {', '.join(missing)}; found: {', '.join(columns) or '(none)'}; "
                        "a biometry manifest has image,mask,exam,pixel_size_mm,hc_mm")
    if not rows:
        raise DataError(f"{csv_path}: the manifest has no rows")
    root = csv_path.parent
    items = []
    for line, raw in enumerate(rows, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in raw.items()}

        def path_of(key: str, optional: bool = False) -> Path | None:
            col = names[key]
            rel = row.get(col, "") if col else ""
            if not rel:
                if optional:
                    return None
                raise DataError(f"{csv_path}, line {line}, field {col!r}: empty")
            p = Path(rel) if Path(rel).is_absolute() else (root / rel).resolve()
            if not p.is_file():
                raise DataError(f"{csv_path}, line {line}, field {col!r}: file does not exist: {rel}")
            return p

        image = path_of("image")
        mask = path_of("mask", optional=not require_masks)
        exam = row.get(names["exam"] or "", "")
        if not exam and not require_exam:
            exam = row[names["image"]]  # type: ignore[index]
        if not exam:
            raise DataError(f"{csv_path}, line {line}, field {names['exam']!r}: empty (the exam groups images "
                            "that must stay on one side of a split)")
        ps = _positive(row, names["pixel_size_mm"], line, csv_path)
        hc = _positive(row, names["hc_mm"], line, csv_path)
        items.append(BiometryItem(image, mask, exam, ps, hc, row[names["image"]], line))  # type: ignore[arg-type]
    refuse_repeated_lines(((it.image, it.line, it.name) for it in items), csv_path)
    return items


def _positive(row: dict, col: str | None, line: int, csv_path: Path) -> float | None:
    from fetalscan.data.records import parse_float

    value = row.get(col, "") if col else ""
    v = parse_float(value, col or "", line, csv_path)
    if v is None:
        return None
    if not math.isfinite(v) or v <= 0:
        raise DataError(f"{csv_path}, line {line}, field {col!r}: must be a positive number, got {value!r}")
    return v


def read_mask(item: BiometryItem, shape: tuple[int, int]) -> np.ndarray:
    """The item's reference mask as bool (H, W); a mask of another size than its image is an error."""
    from fetalscan.data.records import read_image

    if item.mask is None:
        raise DataError(f"{item.where()}: no mask given")
    m = read_image(item.mask)
    if m.shape[:2] != tuple(shape):
        raise DataError(f"mask {item.mask} has shape {m.shape[1]}x{m.shape[0]} (W x H) but its image {item.image} "
                        f"is {shape[1]}x{shape[0]}; a mask must have the size of its image")
    return as_binary_mask(m, where=str(item.mask))


def as_binary_mask(mask: np.ndarray, where: str = "mask") -> np.ndarray:
    """A (H, W) head mask as bool: bool as is, floats > 0.5, integers > 0.

    A 3-channel mask with identical channels is accepted (first channel used).
    """
    m = np.asarray(mask)
    if m.ndim == 3 and m.shape[2] in (3, 4) and np.array_equal(m[..., 0], m[..., 1]):
        m = m[..., 0]
    if m.ndim != 2:
        raise DataError(f"{where}: a head mask must be a 2-D (H, W) array, got shape {m.shape}")
    if m.dtype == bool:
        return m
    if np.issubdtype(m.dtype, np.floating):
        return m > 0.5
    return m > 0
