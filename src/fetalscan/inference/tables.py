"""Predictions: image-level probabilities and patient (group) level aggregation.

The two files written here are the contract every later stage reads.

``predictions.csv`` — one row per image::

    path, frame, group, label, fold, pred, p_<class> ..., label_original,
    ga_weeks, center, device, view, <any other manifest column> ...

``patients.csv`` — one row per group::

    group, label, fold, n_images, pred, p_<class> ..., aggregation,
    ga_weeks (mean), center, device, view (first), <other manifest columns constant in the group>

``path`` is the absolute path of the image file and ``frame`` the frame index for
cine DICOM / video (empty for still images); ``label`` is empty when unknown;
``fold`` is the outer CV fold that held the image out (empty for a final model's
predictions on new data); ``pred`` is the class with the highest probability.

Patient-level aggregation (the published CNS study read a patient from all of
its images by a vote) — three rules:

- ``mean``: average the image probabilities of the group (default).
- ``vote``: majority vote of the image predictions; the group's scores are the
  vote shares, and ties are broken by the mean probability.
- ``max_abnormal``: take the single image of the group that is most abnormal
  (lowest probability of the normal class) and use its probabilities; a
  screening rule: one suspicious image flags the patient.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from fetalscan.data.records import Record
from fetalscan.errors import DataError, FetalscanError

log = logging.getLogger(__name__)


AGGREGATIONS = ("mean", "vote", "max_abnormal")


META_COLUMNS = ("ga_weeks", "center", "device", "view")


#: Columns added by ``fetalscan predict --plane-check`` (see :func:`add_plane_columns`).
PLANE_COLUMNS: tuple[str, ...] = ("plane", "plane_confidence", "brain_plane")


def prob_columns(classes: Sequence[str]) -> list[str]:
    """``p_<class>`` column names in class order."""
    return [f"p_{c}" for c in classes]


def classes_from_columns(columns: Sequence[str]) -> list[str]:
    """Class order recovered from the ``p_<class>`` columns of a predictions file.

    These are the consecutive ``p_`` columns right after ``pred`` (so an extra
    manifest column that happens to start with ``p_`` is not taken for a class).
    """
    columns = list(columns)
    start = columns.index("pred") + 1 if "pred" in columns else 0
    out = []
    for c in columns[start:]:
        if not c.startswith("p_"):
            break
        out.append(c[2:])
    return out




def predictions_frame(
    records: Sequence[Record], probs: np.ndarray, classes: Sequence[str],
    fold: Sequence[int | None] | int | None = None,
) -> pd.DataFrame:
    """Build ``predictions.csv`` rows for ``records`` and their probabilities."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.shape != (len(records), len(classes)):
        raise DataError(f"probabilities have shape {probs.shape}, expected {(len(records), len(classes))} "
                        "(one row per record, one column per class)")
    folds = fold if isinstance(fold, (list, tuple, np.ndarray)) else [fold] * len(records)
    df = pd.DataFrame({
        "path": [str(r.path) for r in records],
        "frame": pd.array([r.frame for r in records], dtype="Int64"),
        "group": [r.group for r in records],
        "label": [r.label or "" for r in records],
        "fold": pd.array(list(folds), dtype="Int64"),
        "pred": [classes[i] for i in probs.argmax(1)] if len(records) else [],
    })
    for j, col in enumerate(prob_columns(classes)):
        df[col] = probs[:, j]
    df["label_original"] = [r.label_original or r.label or "" for r in records]
    for col in META_COLUMNS:
        df[col] = [getattr(r, col) for r in records]
    extra_cols = list(dict.fromkeys(k for r in records for k in r.extra))
    for col in extra_cols:
        if col not in df.columns:
            df[col] = [r.extra.get(col, "") for r in records]
    return df


def aggregate_groups(
    df: pd.DataFrame, classes: Sequence[str], method: str = "mean", normal_class: str = "normal",
) -> pd.DataFrame:
    """Patient-level rows (``patients.csv``) from image-level predictions.

    Parameters
    ----------
    df : DataFrame
        Rows of ``predictions.csv`` (needs ``group``, ``label``, ``fold`` and the
        ``p_<class>`` columns).
    method : {"mean", "vote", "max_abnormal"}
    normal_class : str
        The class whose low probability means "abnormal" (``max_abnormal`` only).
    """
    if method not in AGGREGATIONS:
        raise FetalscanError(f"aggregate must be one of {', '.join(AGGREGATIONS)}, got {method!r}")
    cols = prob_columns(classes)
    missing = [c for c in ["group", *cols] if c not in df.columns]
    if missing:
        raise DataError(f"predictions lack column(s) {missing}")
    if method == "max_abnormal" and normal_class not in classes:
        raise FetalscanError(
            f"aggregate max_abnormal needs a normal class; {normal_class!r} is not one of "
            f"{list(classes)} (set normal_class)"
        )
    rows = []
    for group, part in df.groupby("group", sort=True, dropna=False):
        p = part[cols].to_numpy(dtype=np.float64)
        scores = _aggregate(p, method, list(classes).index(normal_class) if method == "max_abnormal" else -1)
        labels = sorted({lab for lab in part.get("label", pd.Series(dtype=str)).fillna("") if lab})
        if len(labels) > 1:
            raise DataError(f"group {group!r} carries two labels in the predictions: {labels}")
        folds = part["fold"].dropna().unique() if "fold" in part else []
        row = {
            "group": group,
            "label": labels[0] if labels else "",
            "fold": int(folds[0]) if len(folds) == 1 else pd.NA,
            "n_images": len(part),
            "pred": classes[int(np.argmax(scores))],
        }
        row.update(dict(zip(cols, scores)))
        row["aggregation"] = method
        if PLANE_COLUMNS[2] in part:
            row["n_not_brain_plane"] = int((~part[PLANE_COLUMNS[2]].astype(bool)).sum())
        for col in META_COLUMNS:
            if col in part:
                vals = part[col].dropna()
                row[col] = (vals.astype(float).mean() if col == "ga_weeks" else vals.iloc[0]) if len(vals) else None
        for col in part.columns[part.columns.get_loc("label_original") + 1:] if "label_original" in part else []:
            if col not in row and col not in META_COLUMNS and col not in PLANE_COLUMNS and part[col].nunique(dropna=False) == 1:
                row[col] = part[col].iloc[0]  # extra manifest columns constant within the group
        rows.append(row)
    out = pd.DataFrame(rows)
    if len(out):
        out["fold"] = out["fold"].astype("Int64")
    return out


def _aggregate(p: np.ndarray, method: str, normal_idx: int) -> np.ndarray:
    if method == "mean":
        return p.mean(0)
    if method == "vote":
        votes = np.bincount(p.argmax(1), minlength=p.shape[1]).astype(np.float64) / len(p)
        # tie-break by mean probability, scaled far below one vote's share (1 / n)
        scores = votes + p.mean(0) * (0.05 / len(p))
        return scores / scores.sum()
    return p[int(np.argmin(p[:, normal_idx]))]






def add_plane_columns(df: pd.DataFrame, planes: Sequence) -> pd.DataFrame:
    """Add SonoNet's plane reading (``plane``, ``plane_confidence``, ``brain_plane``) to predictions.

    ``planes`` are :class:`fetalscan.quality.PlaneResult` in the order of ``df``'s rows.
    The rows are kept: an image off the brain planes is flagged, never dropped, because
    an abnormal brain need not look like a standard plane.
    """
    if len(planes) != len(df):
        raise DataError(f"{len(planes)} plane results for {len(df)} predictions; give one per image row")
    df = df.copy()
    plane, confidence, brain = PLANE_COLUMNS
    df[plane] = [p.plane for p in planes]
    df[confidence] = [p.confidence for p in planes]
    df[brain] = [p.is_brain for p in planes]
    return df


def write_prediction_files(out: Path, images: pd.DataFrame, patients: pd.DataFrame,
                           prefix: str = "") -> tuple[Path, Path]:
    """The one writer of ``predictions.csv`` and ``patients.csv`` (each atomically) in ``out``."""
    from fetalscan.fileio import write_csv

    return write_csv(out / f"{prefix}predictions.csv", images), write_csv(out / f"{prefix}patients.csv", patients)
