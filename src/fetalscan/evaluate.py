"""Metrics of a run: image level and patient level.

``classification_metrics`` computes, from true labels and class probabilities,
accuracy, balanced accuracy, per-class sensitivity and specificity, one-vs-rest
AUROC per class and their macro average, and the confusion matrix. Decisions
are the arg-max class. Edge-case rules: a class without positives (or without
negatives) in the data has sensitivity (specificity) and AUROC ``NaN``, and the
macro AUROC averages the classes where it is defined (listed in
``auroc_classes``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from .errors import DataError
from .predict import classes_from_columns, prob_columns


def classification_metrics(y_true: Sequence[str], proba: np.ndarray, classes: Sequence[str]) -> dict:
    """Accuracy, balanced accuracy, per-class sensitivity / specificity / AUROC, macro AUROC.

    Parameters
    ----------
    y_true : sequence of str, shape (n,)
        True class names; each must be in ``classes``.
    proba : array, shape (n, k)
        Class probabilities (or scores) in ``classes`` order.
    classes : sequence of str, length k
    """
    from sklearn.metrics import confusion_matrix, roc_auc_score

    classes = list(classes)
    proba = np.asarray(proba, dtype=np.float64)
    if proba.ndim != 2 or proba.shape != (len(y_true), len(classes)):
        raise DataError(f"proba has shape {proba.shape}, expected ({len(y_true)}, {len(classes)})")
    unknown = sorted(set(y_true) - set(classes))
    if unknown:
        raise DataError(f"labels {unknown} are not among the classes {classes}")
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[c] for c in y_true], dtype=np.int64)
    pred = proba.argmax(1)
    cm = confusion_matrix(y, pred, labels=np.arange(len(classes)))
    per_class: dict[str, dict] = {}
    aurocs = []
    for k, c in enumerate(classes):
        pos = y == k
        tp = int(cm[k, k])
        fn = int(cm[k].sum() - tp)
        fp = int(cm[:, k].sum() - tp)
        tn = int(cm.sum() - tp - fn - fp)
        auc = float("nan")
        if 0 < pos.sum() < len(y):
            auc = float(roc_auc_score(pos, proba[:, k]))
            aurocs.append((c, auc))
        per_class[c] = {
            "n": int(pos.sum()),
            "tp": tp, "fn": fn, "fp": fp, "tn": tn,
            "sensitivity": tp / (tp + fn) if tp + fn else float("nan"),
            "specificity": tn / (tn + fp) if tn + fp else float("nan"),
            "auroc": auc,
        }
    present = [per_class[c]["sensitivity"] for c in classes if per_class[c]["n"] > 0]
    return {
        "n": int(len(y)),
        "accuracy": float((pred == y).mean()) if len(y) else float("nan"),
        "balanced_accuracy": float(np.mean(present)) if present else float("nan"),
        "macro_auroc": float(np.mean([a for _, a in aurocs])) if aurocs else float("nan"),
        "auroc_classes": [c for c, _ in aurocs],
        "per_class": per_class,
        "confusion_matrix": {"labels": classes, "matrix": cm.tolist()},
    }


def metrics_from_frame(df: pd.DataFrame, classes: Sequence[str] | None = None) -> dict:
    """:func:`classification_metrics` of a ``predictions.csv`` / ``patients.csv`` frame."""
    classes = list(classes) if classes else classes_from_columns(df.columns)
    cols = prob_columns(classes)
    missing = [c for c in ["label", *cols] if c not in df.columns]
    if missing:
        raise DataError(f"predictions lack column(s) {missing}")
    labelled = df[df["label"].fillna("").astype(str) != ""]
    if labelled.empty:
        raise DataError("no labelled rows: metrics need the true label of each image")
    return classification_metrics(labelled["label"].astype(str).tolist(), labelled[cols].to_numpy(), classes)
