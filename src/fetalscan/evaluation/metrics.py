"""Point estimates of classification metrics, and Wilson intervals for proportions.

Per class (one-vs-rest): sensitivity, specificity, PPV, NPV, F1, AUROC and average
precision; overall: accuracy, balanced accuracy, macro / micro AUROC and macro AP, and
the confusion matrix. Edge cases are stated, not hidden: a class without positives (or
without negatives) has sensitivity (or specificity) and AUROC undefined (NaN), and the
macro averages are over the classes where the metric is defined; the micro AUROC needs
cases of at least two classes (else NaN, like the macro AUROC). The Wilson score
interval (Wilson, JASA 1927) is used for proportions where a bootstrap is not needed."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from fetalscan.errors import DataError
from fetalscan.inference.tables import classes_from_columns, prob_columns

log = logging.getLogger(__name__)


def wilson_interval(k: float, n: float, confidence: float = 0.95) -> list[float]:
    """Wilson score interval of the proportion ``k / n`` (Wilson 1927).

    Returns ``[lower, upper]``; ``[nan, nan]`` when ``n == 0``.

    Examples
    --------
    >>> [round(v, 3) for v in wilson_interval(9, 10)]
    [0.596, 0.982]
    """
    from scipy.stats import norm

    if n <= 0:
        return [float("nan"), float("nan")]
    z = float(norm.ppf(0.5 + confidence / 2))
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return [max(0.0, centre - half), min(1.0, centre + half)]


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def _class_index(y_true: Sequence[str], classes: Sequence[str]) -> np.ndarray:
    unknown = sorted(set(y_true) - set(classes))
    if unknown:
        raise DataError(f"labels {unknown} are not among the classes {list(classes)} "
                        f"(no p_<class> column for them)")
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index[c] for c in y_true], dtype=np.int64)


def classification_metrics(y_true: Sequence[str], proba: np.ndarray, classes: Sequence[str]) -> dict:
    """Accuracy, balanced accuracy, per-class sensitivity / specificity / PPV / NPV / F1 /
    AUROC / average precision, macro and micro AUROC, confusion matrix.

    Parameters
    ----------
    y_true : sequence of str, shape (n,)
        True class names; each must be in ``classes``.
    proba : array, shape (n, k)
        Class probabilities (or scores) in ``classes`` order.
    classes : sequence of str, length k

    Returns
    -------
    dict
        ``n, accuracy, balanced_accuracy, macro_auroc, micro_auroc,
        macro_average_precision, auroc_classes, per_class{c: n, tp, fn, fp, tn,
        sensitivity, specificity, ppv, npv, f1, auroc, average_precision},
        confusion_matrix{labels, matrix}`` (rows = truth, columns = prediction).
    """
    from sklearn.metrics import average_precision_score, confusion_matrix, roc_auc_score

    classes = list(classes)
    proba = np.asarray(proba, dtype=np.float64)
    if proba.ndim != 2 or proba.shape != (len(y_true), len(classes)):
        raise DataError(f"proba has shape {proba.shape}, expected ({len(y_true)}, {len(classes)})")
    y = _class_index(y_true, classes)
    pred = proba.argmax(1)
    cm = confusion_matrix(y, pred, labels=np.arange(len(classes)))
    per_class: dict[str, dict] = {}
    aurocs, aps = [], []
    for k, c in enumerate(classes):
        pos = y == k
        tp = int(cm[k, k])
        fn = int(cm[k].sum() - tp)
        fp = int(cm[:, k].sum() - tp)
        tn = int(cm.sum() - tp - fn - fp)
        auc = ap = float("nan")
        if 0 < pos.sum() < len(y):
            auc = float(roc_auc_score(pos, proba[:, k]))
            ap = float(average_precision_score(pos, proba[:, k]))
            aurocs.append((c, auc))
            aps.append(ap)
        per_class[c] = {
            "n": int(pos.sum()),
            "tp": tp, "fn": fn, "fp": fp, "tn": tn,
            "sensitivity": _ratio(tp, tp + fn),
            "specificity": _ratio(tn, tn + fp),
            "ppv": _ratio(tp, tp + fp),
            "npv": _ratio(tn, tn + fn),
            "f1": _ratio(2 * tp, 2 * tp + fp + fn),
            "auroc": auc,
            "average_precision": ap,
        }
    present = [per_class[c]["sensitivity"] for c in classes if per_class[c]["n"] > 0]
    micro = float("nan")
    onehot = np.eye(len(classes))[y] if len(y) else np.zeros((0, len(classes)))
    # like the macro AUROC, the micro AUROC needs cases of two classes: with one class present it
    # would only rank p(that class) against the other columns' probabilities, which measures nothing
    if len(y) and len(np.unique(y)) >= 2:
        micro = float(roc_auc_score(onehot.ravel(), proba.ravel()))
    return {
        "n": int(len(y)),
        "accuracy": float((pred == y).mean()) if len(y) else float("nan"),
        "balanced_accuracy": float(np.mean(present)) if present else float("nan"),
        "macro_auroc": float(np.mean([a for _, a in aurocs])) if aurocs else float("nan"),
        "micro_auroc": micro,
        "macro_average_precision": float(np.mean(aps)) if aps else float("nan"),
        "auroc_classes": [c for c, _ in aurocs],
        "per_class": per_class,
        "confusion_matrix": {"labels": classes, "matrix": cm.tolist()},
    }


def labelled_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Rows with a known label (external data may hold images the model has no class for)."""
    if "label" not in df.columns:
        raise DataError("predictions lack column(s) ['label']")
    return df[df["label"].fillna("").astype(str) != ""]


def metrics_from_frame(df: pd.DataFrame, classes: Sequence[str] | None = None) -> dict:
    """:func:`classification_metrics` of a ``predictions.csv`` / ``patients.csv`` frame."""
    classes = list(classes) if classes else classes_from_columns(df.columns)
    cols = prob_columns(classes)
    missing = [c for c in ["label", *cols] if c not in df.columns]
    if missing:
        raise DataError(f"predictions lack column(s) {missing}")
    labelled = labelled_rows(df)
    if labelled.empty:
        raise DataError("no labelled rows: metrics need the true label of each image")
    return classification_metrics(labelled["label"].astype(str).tolist(), labelled[cols].to_numpy(), classes)
