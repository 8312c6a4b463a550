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
import torch
from torch import nn

from fetalscan.data.records import Dataset, Record
from fetalscan.data.transforms import Preprocessing, normalize
from fetalscan.errors import DataError, FetalscanError
from fetalscan.progress import track

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


def softmax_with_temperature(logits: torch.Tensor, temperature: float = 1.0) -> np.ndarray:
    """Class probabilities ``softmax(logits / T)`` as float64 NumPy."""
    if temperature <= 0:
        raise FetalscanError(f"temperature must be positive, got {temperature}")
    return torch.softmax(logits.double() / temperature, dim=1).numpy()


def predictions_frame(
    records: Sequence[Record], probs: np.ndarray, classes: Sequence[str],
    fold: Sequence[int | None] | int | None = None,
) -> pd.DataFrame:
    """Build ``predictions.csv`` rows for ``records`` and their probabilities."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.shape != (len(records), len(classes)):
        raise ValueError(f"probs has shape {probs.shape}, expected {(len(records), len(classes))}")
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
        raise FetalscanError(f"--aggregate must be one of {', '.join(AGGREGATIONS)}, got {method!r}")
    cols = prob_columns(classes)
    missing = [c for c in ["group", *cols] if c not in df.columns]
    if missing:
        raise DataError(f"predictions lack column(s) {missing}")
    if method == "max_abnormal" and normal_class not in classes:
        raise FetalscanError(
            f"--aggregate max_abnormal needs a normal class; {normal_class!r} is not one of "
            f"{list(classes)} (set --normal-class)"
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


def predict_dataset(
    loaded, dataset: Dataset, device: torch.device, batch_size: int = 32,
) -> np.ndarray:
    """Probabilities of every record under a loaded checkpoint (with its temperature)."""
    from fetalscan.data.records import prepare_images
    from fetalscan.inference.predict import predict_logits

    images, _ = prepare_images(dataset.records, loaded.preprocessing, description="predicting")
    logits = predict_logits(loaded.model, images, loaded.preprocessing, device, batch_size)
    return softmax_with_temperature(logits, loaded.temperature)


def labels_for_model(dataset: Dataset, classes: Sequence[str], class_map: dict[str, str]) -> tuple[Dataset, set[str]]:
    """Map a dataset's labels into a model's classes (through its ``class_map``).

    Returns the relabelled dataset and the set of labels the model does not know;
    those records keep their label only in ``label_original`` (``label`` empty), so
    no later metric silently scores a class the model cannot output.
    """
    from dataclasses import replace

    unknown: set[str] = set()
    records = []
    for r in dataset.records:
        if r.label is None:
            records.append(r)
            continue
        mapped: str | None = class_map.get(r.label, r.label)
        if mapped not in classes:
            unknown.add(r.label)
            mapped = None
        records.append(replace(r, label=mapped, label_original=r.label))
    return Dataset(records, list(classes), dataset.source, list(dataset.notes), dict(dataset.loading)), unknown


def add_plane_columns(df: pd.DataFrame, planes: Sequence) -> pd.DataFrame:
    """Add SonoNet's plane reading (``plane``, ``plane_confidence``, ``brain_plane``) to predictions.

    ``planes`` are :class:`fetalscan.quality.PlaneResult` in the order of ``df``'s rows.
    The rows are kept: an image off the brain planes is flagged, never dropped, because
    an abnormal brain need not look like a standard plane.
    """
    if len(planes) != len(df):
        raise ValueError(f"{len(planes)} plane results for {len(df)} predictions")
    df = df.copy()
    plane, confidence, brain = PLANE_COLUMNS
    df[plane] = [p.plane for p in planes]
    df[confidence] = [p.confidence for p in planes]
    df[brain] = [p.is_brain for p in planes]
    return df


def write_prediction_files(out: Path, df: pd.DataFrame, classes: Sequence[str],
                           method: str = "mean", normal_class: str = "normal",
                           prefix: str = "") -> tuple[Path, Path]:
    """Write ``predictions.csv`` and ``patients.csv`` (atomically) into ``out``."""
    from fetalscan.fileio import write_csv

    patients = aggregate_groups(df, classes, method, normal_class)
    a = write_csv(out / f"{prefix}predictions.csv", df)
    b = write_csv(out / f"{prefix}patients.csv", patients)
    return a, b


def _autocast(device: torch.device, amp: bool):
    if device.type == "cuda" and amp:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


@torch.inference_mode()
def predict_logits(
    model: nn.Module, images: torch.Tensor, pre: Preprocessing, device: torch.device,
    batch_size: int = 32, amp: bool = True,
) -> torch.Tensor:
    """Logits of a prepared uint8 batch, computed in evaluation mode (float32 on CPU)."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = normalize(images[start:start + batch_size].to(device), pre)
        with _autocast(device, amp):
            out.append(model(x).float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


@torch.inference_mode()
def compute_embeddings(
    model: nn.Module, images: torch.Tensor, pre: Preprocessing, device: torch.device,
    batch_size: int = 32, amp: bool = True, description: str = "embedding images",
) -> torch.Tensor:
    """Pooled backbone embeddings (``forward_head(pre_logits=True)``) of prepared images."""
    model.eval()
    out = []
    starts = range(0, len(images), batch_size)
    for start in track(starts, description, total=len(starts)):
        x = normalize(images[start:start + batch_size].to(device), pre)
        with _autocast(device, amp):
            f = model.forward_head(model.forward_features(x), pre_logits=True)
        out.append(f.float().cpu())
    return torch.cat(out) if out else torch.empty(0)
