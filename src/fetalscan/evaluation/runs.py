"""Reading a run folder back: ``predictions.csv``, ``patients.csv``, ``inner_val_predictions.csv``,
``folds.csv`` and ``metrics.json``, validated, with the class order recovered from the
``p_<class>`` columns. Every later stage (evaluation, report, compare, explain) reads runs
through :func:`load_run`, so a malformed file fails once, naming the file and the column."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from fetalscan.errors import DataError
from fetalscan.inference.tables import (
    AGGREGATIONS,
    aggregate_groups,
    classes_from_columns,
    prob_columns,
)

log = logging.getLogger(__name__)


@dataclass
class RunData:
    """A run folder read back: the contract files and what they say."""

    run_dir: Path
    predictions: pd.DataFrame
    patients: pd.DataFrame
    inner: pd.DataFrame | None
    folds: pd.DataFrame | None
    metrics: dict
    classes: list[str]
    aggregate: str = "mean"
    normal_class: str = "normal"
    kind: str = "cv"
    notes: list[str] = field(default_factory=list)


_TEXT_COLUMNS = {"path": str, "group": str, "label": str, "pred": str, "label_original": str,
                 "center": str, "device": str, "view": str}


def read_predictions(path: Path, classes: Sequence[str] | None = None, *, kind: str = "image") -> tuple[pd.DataFrame, list[str]]:
    """Read and validate a ``predictions.csv`` / ``patients.csv`` file.

    Checks the required columns, that there are ``p_<class>`` columns right after
    ``pred``, that every label is one of those classes, that probabilities are
    numbers in [0, 1], and (when ``classes`` is given) that the classes match.
    Every problem raises :class:`DataError` naming the file, row and column.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        df = pd.read_csv(path, dtype=_TEXT_COLUMNS, keep_default_na=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{path}: not a readable CSV ({exc})") from None
    required = ["group", "label", "pred"] + (["path"] if kind == "image" else [])
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; expected the predictions.csv contract "
                        "(path, frame, group, label, fold, pred, p_<class>...)")
    found = classes_from_columns(df.columns)
    if not found:
        raise DataError(f"{path}: no p_<class> probability columns after 'pred'")
    if classes is not None and list(classes) != found:
        raise DataError(f"{path}: classes {found} differ from the run's classes {list(classes)}")
    cols = prob_columns(found)
    for col in cols:
        values = pd.to_numeric(df[col], errors="coerce")
        bad = np.flatnonzero(values.isna().to_numpy() | (values < -1e-9).to_numpy() | (values > 1 + 1e-9).to_numpy())
        if len(bad):
            raise DataError(f"{path}: row {bad[0] + 2}, column {col}: {df[col].iloc[bad[0]]!r} is not a "
                            "probability in [0, 1]")
        df[col] = values.astype(np.float64)
    labels = df["label"].fillna("").astype(str)
    unknown = sorted(set(labels) - set(found) - {""})
    if unknown:
        row = int(np.flatnonzero(labels.isin(unknown).to_numpy())[0]) + 2
        raise DataError(f"{path}: label(s) {unknown} (first at row {row}) have no probability column; "
                        f"the file has p_ columns for {found}. Missing classes cannot be evaluated")
    df["label"] = labels
    df["group"] = df["group"].fillna("").astype(str)
    if (df["group"] == "").any():
        row = int(np.flatnonzero((df["group"] == "").to_numpy())[0]) + 2
        raise DataError(f"{path}: row {row}: empty group; metrics resample groups, every row needs one")
    if "fold" in df.columns:
        df["fold"] = pd.to_numeric(df["fold"], errors="coerce").astype("Int64")
    return df, found


def load_run(run_dir: str | Path) -> RunData:
    """Read a run folder written by ``fetalscan cv`` or ``fetalscan evaluate``."""
    import json

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"run folder not found: {run_dir}")
    metrics: dict = {}
    mpath = run_dir / "metrics.json"
    if mpath.is_file():
        try:
            metrics = json.loads(mpath.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataError(f"{mpath}: not valid JSON ({exc})") from None
    preds, classes = read_predictions(run_dir / "predictions.csv")
    task_classes = (metrics.get("task") or {}).get("classes")
    if task_classes and list(task_classes) != classes:
        raise DataError(f"{run_dir / 'predictions.csv'}: classes {classes} differ from metrics.json task.classes "
                        f"{list(task_classes)}")
    cvb = metrics.get("cv") or {}
    ext = metrics.get("external") or {}
    aggregate = cvb.get("aggregate") or ext.get("aggregate") or "mean"
    normal_class = cvb.get("normal_class") or ext.get("normal_class") or "normal"
    if aggregate not in AGGREGATIONS:
        raise DataError(f"{mpath}: unknown aggregation {aggregate!r}")
    notes = []
    ppath = run_dir / "patients.csv"
    if ppath.is_file():
        patients, _ = read_predictions(ppath, classes, kind="patient")
    else:
        patients = aggregate_groups(preds, classes, aggregate, normal_class)
        notes.append("patients.csv was missing; patients were aggregated from predictions.csv")
    inner = None
    ipath = run_dir / "inner_val_predictions.csv"
    if ipath.is_file() and not ext:
        inner, _ = read_predictions(ipath, classes)
    folds = None
    fpath = run_dir / "folds.csv"
    if fpath.is_file():
        folds = pd.read_csv(fpath, dtype={"group": str})
        if not {"group", "fold"} <= set(folds.columns):
            raise DataError(f"{fpath}: expected columns group,fold; found {list(folds.columns)}")
    has_folds = "fold" in preds.columns and preds["fold"].notna().any()
    kind = "external" if ext or not has_folds else "cv"
    return RunData(run_dir, preds, patients, inner, folds, metrics, classes, aggregate, normal_class, kind, notes)
