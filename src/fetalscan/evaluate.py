"""Clinical evaluation of a run: metrics with confidence intervals, screening view,
calibration, subgroups, shortcut check, and the report.

Point metrics
-------------
``classification_metrics`` computes, from true labels and class probabilities,
accuracy, balanced accuracy, per-class sensitivity, specificity, PPV, NPV, F1,
one-vs-rest AUROC and average precision, their macro averages, the micro AUROC
and the confusion matrix. Decisions are the arg-max class. Edge-case rules: a
class without positives (or without negatives) in the data has sensitivity
(specificity) and AUROC ``NaN``; a class never predicted has PPV ``NaN``; the
macro AUROC averages the classes where it is defined (listed in
``auroc_classes``).

Confidence intervals
--------------------
Two kinds, both two-sided at ``confidence`` (default 95 %):

- **Group bootstrap** (Efron & Tibshirani 1993, percentile method): the *groups*
  (patients) are resampled with replacement, never single images, because the
  images of one patient are not independent; 1000 resamples by default, seeded.
  It is vectorised: a resample is a weight vector (how often each group was
  drawn) and every metric is computed from weighted sums, so 1000 resamples of
  a few hundred images take well under a second.
- **Wilson score interval** (Wilson 1927) for proportions (sensitivity,
  specificity, PPV, NPV, accuracy). It assumes independent units: exact at the
  patient level, too narrow at the image level when patients contribute
  several images (the bootstrap interval is the one to quote there).

Everything else (screening operating point, temperature scaling, subgroups,
run-level orchestration) is documented at its function; ``docs/evaluation.md``
explains how to read each number.

References
----------
Efron B, Tibshirani RJ. An Introduction to the Bootstrap. Chapman & Hall, 1993.
Wilson EB. Probable inference, the law of succession, and statistical inference.
JASA 1927;22:209-212.
Hanley JA, McNeil BJ. The meaning and use of the area under a receiver operating
characteristic (ROC) curve. Radiology 1982;143:29-36.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from . import calibration as cal
from .errors import DataError, FetalscanError
from .predict import AGGREGATIONS, aggregate_groups, classes_from_columns, prob_columns

log = logging.getLogger(__name__)

#: Subgroups with fewer groups (patients) than this are flagged as small.
SMALL_SUBGROUP = 10
#: Gestational-age bins (weeks): [lower, upper) and their labels.
GA_BINS: tuple[tuple[float, float, str], ...] = (
    (-math.inf, 14.0, "<14 wk"), (14.0, 20.0, "14-<20 wk"), (20.0, 28.0, "20-<28 wk"), (28.0, math.inf, ">=28 wk"),
)
MISSING = "missing"
#: Largest bootstrap weight matrix held at once (elements); larger resamples run in chunks.
_CHUNK_ELEMENTS = 4_000_000


@dataclass
class EvaluationConfig:
    """How a run is evaluated; the CLI maps its flags 1:1 onto these fields."""

    n_boot: int = 1000
    confidence: float = 0.95
    target_sensitivity: float = 0.95
    n_bins: int = cal.DEFAULT_BINS
    subgroups: str = "auto"
    small_subgroup: int = SMALL_SUBGROUP
    shortcut: bool = True
    probe_floor: float = 0.80
    probe_margin: float = 0.05
    n_perm: int = 2000
    seed: int = 0

    def validate(self) -> None:
        if self.n_boot < 1:
            raise FetalscanError(f"--n-boot must be at least 1, got {self.n_boot}")
        if not 0.5 < self.confidence < 1.0:
            raise FetalscanError(f"--confidence must be between 0.5 and 1, got {self.confidence}")
        if not 0.0 < self.target_sensitivity <= 1.0:
            raise FetalscanError(f"--target-sensitivity must be in (0, 1], got {self.target_sensitivity}")
        if self.n_bins < 2:
            raise FetalscanError(f"--n-bins must be at least 2, got {self.n_bins}")
        if self.small_subgroup < 1:
            raise FetalscanError(f"--small-subgroup must be at least 1, got {self.small_subgroup}")

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- point metrics


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
    if len(y) and 0 < onehot.sum() < onehot.size:
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


# --------------------------------------------------------------------------- weighted kernels (bootstrap)


def _sorted_weights(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray, descending: bool):
    s = np.asarray(scores, dtype=np.float64)
    pos = np.asarray(positive, dtype=bool)
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    order = np.argsort(-s if descending else s, kind="mergesort")
    return s[order], pos[order], w[:, order]


def weighted_auroc(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUROC under each row of a weight matrix (Mann-Whitney form, ties count one half).

    ``AUC = sum_{i pos, j neg} w_i w_j (1[s_i > s_j] + 0.5 1[s_i = s_j]) / (W_pos W_neg)``
    (Hanley & McNeil 1982); with integer weights it equals the AUROC of the data
    with each image repeated ``w`` times, which is what a bootstrap resample is.

    Parameters
    ----------
    scores : array, shape (n,)
    positive : bool array, shape (n,)
    weights : array, shape (b, n) or (n,)

    Returns
    -------
    array, shape (b,)
        ``NaN`` where a row has no positive or no negative weight.
    """
    s, pos, w = _sorted_weights(scores, positive, weights, descending=False)
    b = w.shape[0]
    wneg = w * ~pos
    cum = np.zeros((b, len(s) + 1))
    np.cumsum(wneg, axis=1, out=cum[:, 1:])
    pi = np.flatnonzero(pos)
    left = np.searchsorted(s, s[pi], side="left")
    right = np.searchsorted(s, s[pi], side="right")
    below = cum[:, left]
    ties = cum[:, right] - below
    wpos = w[:, pi]
    num = (wpos * (below + 0.5 * ties)).sum(1)
    p_tot, n_tot = wpos.sum(1), wneg.sum(1)
    out = np.full(b, np.nan)
    ok = (p_tot > 0) & (n_tot > 0)
    out[ok] = num[ok] / (p_tot[ok] * n_tot[ok])
    return out


def weighted_average_precision(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Average precision ``sum_t (R_t - R_{t-1}) P_t`` under each row of a weight matrix.

    Thresholds are the distinct scores in decreasing order (scikit-learn's
    definition, no interpolation). ``NaN`` where a row has no positive or no
    negative weight (as :func:`classification_metrics` leaves AP undefined then).
    """
    s, pos, w = _sorted_weights(scores, positive, weights, descending=True)
    if len(s) == 0:
        return np.full(w.shape[0], np.nan)
    ends = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]
    tp = np.cumsum(w * pos, axis=1)[:, ends]
    fp = np.cumsum(w * ~pos, axis=1)[:, ends]
    p_tot = tp[:, -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / np.where(tp + fp > 0, tp + fp, 1), 0.0)
        recall = tp / p_tot[:, None]
        ap = (np.diff(recall, axis=1, prepend=0.0) * precision).sum(1)
    ap[(p_tot <= 0) | (fp[:, -1] <= 0)] = np.nan  # undefined without positives or negatives, as the point estimate
    return ap


def group_bootstrap_weights(groups: Sequence, n_boot: int, seed: int,
                            chunk: int | None = None) -> Iterator[np.ndarray]:
    """Yield bootstrap weight matrices ``(b, n)`` that resample *groups* with replacement.

    Each resample draws as many groups as there are, uniformly with replacement
    (a multinomial count per group); every image gets the count of its group. Pass
    one distinct value per row in ``groups`` to resample rows instead. The same
    ``seed`` always gives the same resamples, in chunks of at most ``chunk`` rows.
    """
    codes, uniq = pd.factorize(pd.Series(list(groups), dtype=object), sort=True)
    n_groups = len(uniq)
    if n_groups == 0:
        return
    rng = np.random.default_rng(seed)
    chunk = chunk or max(1, _CHUNK_ELEMENTS // max(1, len(codes)))
    done = 0
    while done < n_boot:
        b = min(chunk, n_boot - done)
        counts = rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=b).astype(np.float64)
        yield counts[:, codes]
        done += b


def percentile_interval(values: np.ndarray, confidence: float = 0.95) -> list[float]:
    """Two-sided percentile interval of the finite bootstrap values (``[nan, nan]`` if none)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return [float("nan"), float("nan")]
    a = (1 - confidence) / 2
    lo, hi = np.percentile(v, [100 * a, 100 * (1 - a)])
    return [float(lo), float(hi)]


def _nanmean_rows(a: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(a, axis=1)


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1), np.nan)


def _replicate_stats(y: np.ndarray, proba: np.ndarray, w: np.ndarray) -> dict[str, np.ndarray]:
    """Every bootstrapped metric for a block of weight rows ``w`` (b, n)."""
    from scipy import sparse

    k = proba.shape[1]
    pred = proba.argmax(1)
    pair = sparse.csr_matrix((np.ones(len(y)), (np.arange(len(y)), y * k + pred)), shape=(len(y), k * k))
    cm = np.asarray((pair.T @ w.T).T).reshape(len(w), k, k)  # weighted confusion matrix per resample
    total = cm.sum((1, 2))
    tp = np.diagonal(cm, axis1=1, axis2=2)
    fn = cm.sum(2) - tp
    fp = cm.sum(1) - tp
    tn = total[:, None] - tp - fn - fp
    sens = _div(tp, tp + fn)
    out: dict[str, np.ndarray] = {
        "accuracy": _div(tp.sum(1), total),
        "balanced_accuracy": _nanmean_rows(sens),
        "sensitivity": sens,
        "specificity": _div(tn, tn + fp),
        "ppv": _div(tp, tp + fp),
        "npv": _div(tn, tn + fn),
        "f1": _div(2 * tp, 2 * tp + fp + fn),
    }
    auc = np.column_stack([weighted_auroc(proba[:, j], y == j, w) for j in range(k)])
    ap = np.column_stack([weighted_average_precision(proba[:, j], y == j, w) for j in range(k)])
    onehot = np.eye(k, dtype=bool)[y]
    out["auroc"] = auc
    out["average_precision"] = ap
    out["macro_auroc"] = _nanmean_rows(auc)
    out["macro_average_precision"] = _nanmean_rows(ap)
    out["micro_auroc"] = weighted_auroc(proba.ravel(), onehot.ravel(), np.repeat(w, k, axis=1))
    return out


def bootstrap_classification(y: np.ndarray, proba: np.ndarray, groups: Sequence, *, n_boot: int = 1000,
                             seed: int = 0) -> dict[str, np.ndarray]:
    """Bootstrap distributions of every metric of :func:`classification_metrics`.

    Parameters
    ----------
    y : int array, shape (n,)
        True class indices.
    proba : array, shape (n, k)
    groups : sequence, length n
        The resampling unit of each row (patient); distinct values per row
        resample rows.

    Returns
    -------
    dict
        metric -> array of shape ``(n_boot,)`` (overall metrics) or
        ``(n_boot, k)`` (per-class metrics).
    """
    y = np.asarray(y, dtype=np.int64)
    proba = np.asarray(proba, dtype=np.float64)
    blocks = [_replicate_stats(y, proba, w) for w in group_bootstrap_weights(groups, n_boot, seed,
                                                                           max(1, _CHUNK_ELEMENTS // max(1, y.size * proba.shape[1])))]
    if not blocks:
        return {}
    return {key: np.concatenate([b[key] for b in blocks]) for key in blocks[0]}


_PROPORTIONS = {  # metric -> (numerator, denominator) counts for its Wilson interval
    "sensitivity": ("tp", ("tp", "fn")),
    "specificity": ("tn", ("tn", "fp")),
    "ppv": ("tp", ("tp", "fp")),
    "npv": ("tn", ("tn", "fn")),
}
_PER_CLASS_BOOT = ("sensitivity", "specificity", "ppv", "npv", "f1", "auroc", "average_precision")
_OVERALL_BOOT = ("accuracy", "balanced_accuracy", "macro_auroc", "micro_auroc", "macro_average_precision")


def add_confidence_intervals(metrics: dict, y: np.ndarray, proba: np.ndarray, groups: Sequence, *,
                             n_boot: int = 1000, seed: int = 0, confidence: float = 0.95,
                             unit: str = "group") -> dict:
    """Attach ``ci`` blocks (group bootstrap and Wilson) to a :func:`classification_metrics` dict.

    Overall metrics get ``metrics["ci"][name] = {"bootstrap": [lo, hi]}`` (plus
    ``"wilson"`` for accuracy); each class gets ``per_class[c]["ci"][name]`` the same
    way (Wilson for sensitivity, specificity, PPV and NPV). ``metrics["bootstrap"]``
    records how the intervals were made.
    """
    dist = bootstrap_classification(y, proba, groups, n_boot=n_boot, seed=seed)
    n_units = len(set(groups))
    ci: dict[str, dict] = {}
    for name in _OVERALL_BOOT:
        ci[name] = {"bootstrap": percentile_interval(dist.get(name, np.array([])), confidence)}
    correct = sum(metrics["per_class"][c]["tp"] for c in metrics["per_class"])
    ci["accuracy"]["wilson"] = wilson_interval(correct, metrics["n"], confidence)
    metrics["ci"] = ci
    for j, (c, row) in enumerate(metrics["per_class"].items()):
        block: dict[str, dict] = {}
        for name in _PER_CLASS_BOOT:
            block[name] = {"bootstrap": percentile_interval(dist[name][:, j], confidence) if dist else
                           [float("nan")] * 2}
        for name, (num, den) in _PROPORTIONS.items():
            block[name]["wilson"] = wilson_interval(row[num], sum(row[d] for d in den), confidence)
        row["ci"] = block
    metrics["bootstrap"] = {
        "n_boot": int(n_boot), "seed": int(seed), "confidence": confidence, "unit": unit,
        "n_units": int(n_units), "method": "percentile bootstrap resampling groups (patients) with replacement",
    }
    return metrics


def metrics_with_ci(df: pd.DataFrame, classes: Sequence[str], *, n_boot: int = 1000, seed: int = 0,
                    confidence: float = 0.95) -> dict:
    """:func:`metrics_from_frame` plus group-bootstrap and Wilson intervals.

    The resampling unit is the ``group`` column: images of one patient are drawn
    together. On ``patients.csv`` (one row per group) that is the patient itself.
    """
    m = metrics_from_frame(df, classes)
    lab = labelled_rows(df)
    y = _class_index(lab["label"].astype(str).tolist(), classes)
    proba = lab[prob_columns(classes)].to_numpy(dtype=np.float64)
    groups = lab["group"].astype(str).tolist() if "group" in lab else list(range(len(lab)))
    per_image = len(set(groups)) < len(groups)
    m = add_confidence_intervals(m, y, proba, groups, n_boot=n_boot, seed=seed, confidence=confidence)
    m["n_groups"] = int(len(set(groups)))
    if per_image:
        m["bootstrap"]["note"] = ("Wilson intervals treat images as independent; with several images per "
                                  "patient they are too narrow, quote the bootstrap interval")
    return m


# --------------------------------------------------------------------------- binary (screening) metrics


def binary_metrics(truth: np.ndarray, decision: np.ndarray, groups: Sequence, *, n_boot: int = 1000,
                   seed: int = 0, confidence: float = 0.95) -> dict:
    """Sensitivity, specificity, PPV and NPV of binary decisions with Wilson and group-bootstrap CIs.

    ``truth`` and ``decision`` are booleans (True = abnormal / positive).
    """
    truth = np.asarray(truth, dtype=bool)
    decision = np.asarray(decision, dtype=bool)
    cells = {"tp": truth & decision, "fn": truth & ~decision, "fp": ~truth & decision, "tn": ~truth & ~decision}
    counts = {k: int(v.sum()) for k, v in cells.items()}
    out: dict = {"n": int(len(truth)), **counts}
    mat = np.column_stack([cells[k] for k in ("tp", "fn", "fp", "tn")]).astype(np.float64)
    boots = [w @ mat for w in group_bootstrap_weights(groups, n_boot, seed)]
    boot = np.concatenate(boots) if boots else np.zeros((0, 4))
    btp, bfn, bfp, btn = boot.T
    dist = {"sensitivity": _div(btp, btp + bfn), "specificity": _div(btn, btn + bfp),
            "ppv": _div(btp, btp + bfp), "npv": _div(btn, btn + bfn)}
    for name, (num, den) in _PROPORTIONS.items():
        d = sum(counts[x] for x in den)
        out[name] = _ratio(counts[num], d)
        out[f"{name}_ci"] = {"wilson": wilson_interval(counts[num], d, confidence),
                             "bootstrap": percentile_interval(dist[name], confidence)}
    return out


def auroc_with_ci(scores: np.ndarray, positive: np.ndarray, groups: Sequence, *, n_boot: int = 1000,
                  seed: int = 0, confidence: float = 0.95) -> dict:
    """AUROC of one score with its group-bootstrap interval."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    point = float(weighted_auroc(scores, positive, np.ones((1, len(scores))))[0]) if len(scores) else float("nan")
    boots = [weighted_auroc(scores, positive, w) for w in group_bootstrap_weights(groups, n_boot, seed)]
    dist = np.concatenate(boots) if boots else np.array([])
    return {"auroc": point, "ci": percentile_interval(dist, confidence), "n": int(len(scores)),
            "n_positive": int(positive.sum()), "n_negative": int((~positive).sum())}


# --------------------------------------------------------------------------- screening view


def screening_threshold(p_abnormal: np.ndarray, is_abnormal: np.ndarray, target_sensitivity: float = 0.95) -> dict:
    """The highest threshold whose sensitivity on these (validation) cases reaches the target.

    Rule: with the abnormal cases' scores sorted from high to low, the threshold is
    the ``ceil(target * n_abnormal)``-th of them, and a case is called abnormal when
    ``p_abnormal >= threshold``. This is the threshold with the best specificity
    among those meeting the sensitivity target on the cases given. With few
    abnormal cases the achieved sensitivity on new data can be well below target.

    Returns
    -------
    dict
        ``threshold`` (``None`` without abnormal cases), ``sensitivity`` and
        ``specificity`` on these cases, ``n_abnormal``, ``n_normal``.
    """
    s = np.asarray(p_abnormal, dtype=np.float64)
    a = np.asarray(is_abnormal, dtype=bool)
    n_abn, n_norm = int(a.sum()), int((~a).sum())
    if n_abn == 0:
        return {"threshold": None, "sensitivity": float("nan"), "specificity": float("nan"),
                "n_abnormal": 0, "n_normal": n_norm}
    ranked = np.sort(s[a])[::-1]
    k = max(1, math.ceil(target_sensitivity * n_abn - 1e-9))
    t = float(ranked[k - 1])
    called = s >= t
    return {"threshold": t, "sensitivity": float(called[a].mean()),
            "specificity": float((~called[~a]).mean()) if n_norm else float("nan"),
            "n_abnormal": n_abn, "n_normal": n_norm}


FALLBACK_THRESHOLD = 0.5


def _screening_level(test: pd.DataFrame, inner: pd.DataFrame | None, thresholds: dict | None,
                     normal_col: str, normal_class: str, cfg: EvaluationConfig, level: str) -> dict:
    """Screening ROC and operating point at one level (image or patient)."""
    test = labelled_rows(test)
    score = 1.0 - test[normal_col].to_numpy(dtype=np.float64)
    truth = test["label"].astype(str).to_numpy() != normal_class
    groups = test["group"].astype(str).tolist()
    out: dict = {"level": level,
                 "roc": auroc_with_ci(score, truth, groups, n_boot=cfg.n_boot, seed=cfg.seed,
                                      confidence=cfg.confidence)}
    folds_info, notes = [], []
    decision = np.zeros(len(test), dtype=bool)
    fold_col = test["fold"] if "fold" in test else pd.Series([pd.NA] * len(test), index=test.index)
    if inner is not None:
        for f in sorted(fold_col.dropna().unique().tolist()):
            rows = (fold_col == f).to_numpy()
            val = labelled_rows(inner[inner["fold"] == f])
            vscore = 1.0 - val[normal_col].to_numpy(dtype=np.float64)
            vtruth = val["label"].astype(str).to_numpy() != normal_class
            th = screening_threshold(vscore, vtruth, cfg.target_sensitivity)
            n_abn_groups = int(val.loc[vtruth, "group"].nunique()) if len(val) else 0
            t = th["threshold"]
            if t is None:
                t = FALLBACK_THRESHOLD
                notes.append(f"fold {f}: no abnormal case in its inner validation split; the fixed threshold "
                             f"{FALLBACK_THRESHOLD} was used instead of a chosen one")
            elif n_abn_groups < 5:
                notes.append(f"fold {f}: the threshold rests on only {n_abn_groups} abnormal patient(s) of its "
                             "inner validation split; sensitivity on new cases may fall well short of the target")
            decision[rows] = score[rows] >= t
            folds_info.append({"fold": int(f), "threshold": t, "chosen": th["threshold"] is not None,
                               "inner_n_abnormal": th["n_abnormal"], "inner_n_normal": th["n_normal"],
                               "inner_abnormal_groups": n_abn_groups,
                               "inner_sensitivity": th["sensitivity"], "inner_specificity": th["specificity"],
                               "test_n": int(rows.sum())})
        rule = (f"per fold: the highest threshold on p(abnormal) = 1 - p({normal_class}) that reaches "
                f"sensitivity >= {cfg.target_sensitivity:g} on that fold's inner validation split "
                "(never on test data), applied to the fold's test cases")
    elif thresholds and thresholds.get(level) is not None:
        t = float(thresholds[level])
        decision = score >= t
        rule = (f"the threshold stored with the model ({t:.4g}), chosen on its inner validation split for "
                f"sensitivity >= {thresholds.get('target_sensitivity', cfg.target_sensitivity):g}")
        folds_info.append({"fold": None, "threshold": t, "chosen": True})
    else:
        out.update({"operating_point": None, "rule": None, "folds": [],
                    "notes": ["no operating point: no validation predictions and no threshold stored with the "
                              "model; only the ROC curve is reported"]})
        return out
    op = binary_metrics(truth, decision, groups, n_boot=cfg.n_boot, seed=cfg.seed, confidence=cfg.confidence)
    out.update({"operating_point": op, "rule": rule, "folds": folds_info, "notes": notes})
    return out


def screening_analysis(test_img: pd.DataFrame, test_pat: pd.DataFrame, inner_img: pd.DataFrame | None,
                       classes: Sequence[str], cfg: EvaluationConfig, *, normal_class: str = "normal",
                       aggregate: str = "mean", thresholds: dict | None = None) -> dict:
    """"Any anomaly vs normal" from the multi-class probabilities.

    ``p(abnormal) = 1 - p(normal)``. The ROC curve and AUROC use every threshold;
    the operating point is chosen on validation data only: per CV fold on that
    fold's inner validation split (:func:`screening_threshold`), at image level on
    its images and at patient level on its images aggregated per patient with the
    run's rule; on external data, the thresholds stored with the model.
    """
    classes = list(classes)
    if normal_class not in classes:
        return {"available": False,
                "note": f"no class named {normal_class!r} among {classes}; the screening view needs one "
                        "(set --normal-class)"}
    col = f"p_{normal_class}"
    inner_pat = None
    if inner_img is not None and len(inner_img):
        parts = [aggregate_groups(part, classes, aggregate, normal_class).assign(fold=f)
                 for f, part in inner_img.groupby("fold", sort=True)]
        inner_pat = pd.concat(parts, ignore_index=True) if parts else None
    out = {"available": True, "normal_class": normal_class, "score": f"1 - p_{normal_class}",
           "target_sensitivity": cfg.target_sensitivity, "aggregate": aggregate}
    for level, test, inner in (("image", test_img, inner_img), ("patient", test_pat, inner_pat)):
        out[level] = _screening_level(test, inner if inner is not None and len(inner) else None, thresholds,
                                      col, normal_class, cfg, level)
    return out


# --------------------------------------------------------------------------- calibration (CV)


def _probs_and_y(df: pd.DataFrame, classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    lab = labelled_rows(df)
    return (lab[prob_columns(classes)].to_numpy(dtype=np.float64),
            _class_index(lab["label"].astype(str).tolist(), classes))


def _with_probs(df: pd.DataFrame, probs: np.ndarray, classes: Sequence[str]) -> pd.DataFrame:
    out = df.copy()
    out[prob_columns(classes)] = probs
    out["pred"] = [classes[i] for i in probs.argmax(1)] if len(out) else []
    return out


def _calibration_block(df: pd.DataFrame, classes: Sequence[str], cfg: EvaluationConfig) -> dict:
    probs, y = _probs_and_y(df, classes)
    block = cal.calibration_metrics(probs, y, cfg.n_bins)
    groups = labelled_rows(df)["group"].astype(str).tolist()
    conf, correct = probs.max(1), (probs.argmax(1) == y)
    onehot = np.eye(len(classes))[y]
    brier_i = ((probs - onehot) ** 2).sum(1)
    eces, briers = [], []
    for w in group_bootstrap_weights(groups, cfg.n_boot, cfg.seed):
        ece, _ = cal.calibration_errors_weighted(conf, correct, w, cfg.n_bins)
        eces.append(ece)
        briers.append(_div(w @ brier_i, w.sum(1)))
    block["ci"] = {"ece": {"bootstrap": percentile_interval(np.concatenate(eces), cfg.confidence)},
                   "brier": {"bootstrap": percentile_interval(np.concatenate(briers), cfg.confidence)}}
    return block


def calibration_analysis(test_img: pd.DataFrame, inner_img: pd.DataFrame | None, classes: Sequence[str],
                         cfg: EvaluationConfig, *, aggregate: str = "mean", normal_class: str = "normal",
                         temperature_note: str | None = None) -> tuple[dict, pd.DataFrame, pd.DataFrame | None]:
    """Calibration before and after temperature scaling fitted per fold on inner validation only.

    For each CV fold, ``T`` is fitted (:func:`fetalscan.calibration.fit_temperature`)
    on that fold's inner-validation images and applied to the same fold's test
    images; test data never choose ``T``. Without inner-validation predictions
    (external data) nothing is fitted: the block reports the probabilities as
    given (a checkpoint's own temperature is already in them).

    Returns
    -------
    block : dict
        ``before`` / ``after`` at image and patient level (ECE, MCE, Brier, NLL,
        reliability bins, bootstrap CIs of ECE and Brier), ``temperatures`` per fold.
    test_calibrated, inner_calibrated : DataFrames
        The image-level predictions with temperature-scaled probabilities.
    """
    classes = list(classes)
    notes: list[str] = []
    block: dict = {"n_bins": cfg.n_bins, "method": "temperature scaling (Guo et al. 2017) fitted per fold on the "
                   "inner validation split, applied to that fold's test images"}
    if inner_img is None or not len(inner_img) or "fold" not in test_img or test_img["fold"].isna().all():
        block.update({"fitted": False, "temperatures": [], "notes": [],
                      "note": temperature_note or "no inner-validation predictions: no temperature was fitted"})
        img = _calibration_block(test_img, classes, cfg)
        pat = _calibration_block(aggregate_groups(test_img, classes, aggregate, normal_class), classes, cfg)
        block["before"] = {"image": img, "patient": pat}
        block["after"] = None
        return block, test_img, inner_img
    test_cal, inner_cal = test_img.copy(), inner_img.copy()
    temps = []
    for f in sorted(test_img["fold"].dropna().unique().tolist()):
        val = labelled_rows(inner_img[inner_img["fold"] == f])
        t_rows = (test_img["fold"] == f).to_numpy()
        if len(val) == 0:
            t = 1.0
            notes.append(f"fold {f}: empty inner validation split; temperature left at 1")
            info = {"n": 0}
        else:
            probs, y = _probs_and_y(val, classes)
            info = cal.temperature_block(probs, y, "inner validation", cfg.n_bins)
            t = info["temperature"]
            if len(val) < 20:
                notes.append(f"fold {f}: temperature fitted on only {len(val)} inner-validation images")
            if t <= cal.T_MIN * 1.01 or t >= cal.T_MAX * 0.99:
                notes.append(f"fold {f}: the temperature hit its search bound ({t:.3g}); the inner split is too "
                             "small or perfectly separated for a reliable fit")
        part = test_img.loc[t_rows, prob_columns(classes)].to_numpy(dtype=np.float64)
        test_cal.loc[t_rows, prob_columns(classes)] = cal.apply_temperature(part, t) if len(part) else part
        v_rows = (inner_img["fold"] == f).to_numpy()
        vpart = inner_img.loc[v_rows, prob_columns(classes)].to_numpy(dtype=np.float64)
        inner_cal.loc[v_rows, prob_columns(classes)] = cal.apply_temperature(vpart, t) if len(vpart) else vpart
        temps.append({"fold": int(f), "temperature": t, "n_inner_val": int(info.get("n", 0)),
                      "inner_ece_before": info.get("ece_before"), "inner_ece_after": info.get("ece_after")})
    test_cal = _with_probs(test_cal, test_cal[prob_columns(classes)].to_numpy(dtype=np.float64), classes)
    inner_cal = _with_probs(inner_cal, inner_cal[prob_columns(classes)].to_numpy(dtype=np.float64), classes)
    before = {"image": _calibration_block(test_img, classes, cfg),
              "patient": _calibration_block(aggregate_groups(test_img, classes, aggregate, normal_class),
                                            classes, cfg)}
    pat_cal = aggregate_groups(test_cal, classes, aggregate, normal_class)
    after = {"image": _calibration_block(test_cal, classes, cfg), "patient": _calibration_block(pat_cal, classes, cfg)}
    pat_before = aggregate_groups(test_img, classes, aggregate, normal_class)
    changed = int((pat_before["pred"].to_numpy() != pat_cal["pred"].to_numpy()).sum())
    if changed:
        notes.append(f"temperature scaling changed the patient-level decision of {changed} patient(s) "
                     f"({aggregate} aggregation of rescaled image probabilities); image-level decisions never change")
    block.update({"fitted": True, "temperatures": temps, "before": before, "after": after, "notes": notes})
    return block, test_cal, inner_cal


def final_model_calibration(inner_val: pd.DataFrame, classes: Sequence[str], *, normal_class: str = "normal",
                            aggregate: str = "mean", target_sensitivity: float = 0.95,
                            n_bins: int = cal.DEFAULT_BINS) -> dict:
    """The ``calibration`` block of a final model's checkpoint, from its inner-validation predictions.

    Fits the temperature (Guo et al. 2017) on the inner validation images and,
    when a normal class exists, chooses the screening thresholds on the
    *temperature-scaled* inner-validation probabilities (image level, and patient
    level after ``aggregate``), so that ``fetalscan evaluate`` can report an
    operating point chosen without the external data.

    Parameters
    ----------
    inner_val : DataFrame
        ``inner_val_predictions.csv`` rows of the final model (temperature 1).

    Returns
    -------
    dict
        ``{"temperature", "fitted_on", "n", "ece_before", "ece_after", "nll_before",
        "nll_after", "method", "screening": {...} | None}``.
    """
    classes = list(classes)
    probs, y = _probs_and_y(inner_val, classes)
    block = cal.temperature_block(probs, y, "inner validation", n_bins)
    block["screening"] = None
    if normal_class in classes:
        lab = labelled_rows(inner_val)
        scaled = _with_probs(lab, cal.apply_temperature(probs, block["temperature"]), classes)
        col = f"p_{normal_class}"
        img = screening_threshold(1 - scaled[col].to_numpy(), scaled["label"].astype(str).to_numpy() != normal_class,
                                  target_sensitivity)
        pat_df = aggregate_groups(scaled, classes, aggregate, normal_class)
        pat = screening_threshold(1 - pat_df[col].to_numpy(), pat_df["label"].astype(str).to_numpy() != normal_class,
                                  target_sensitivity)
        block["screening"] = {"image": img["threshold"], "patient": pat["threshold"], "aggregate": aggregate,
                              "normal_class": normal_class, "target_sensitivity": target_sensitivity,
                              "n_abnormal_images": img["n_abnormal"], "n_abnormal_patients": pat["n_abnormal"],
                              "fitted_on": "inner validation (temperature-scaled)"}
    return block


# --------------------------------------------------------------------------- subgroups


def ga_bin(weeks: float) -> str:
    """Gestational-age bin label of ``weeks`` (``missing`` for NaN)."""
    if weeks is None or not np.isfinite(weeks):
        return MISSING
    for lo, hi, name in GA_BINS:
        if lo <= weeks < hi:
            return name
    return MISSING


def subgroup_columns(img: pd.DataFrame, requested: str = "auto", class_map: dict | None = None) -> list[str]:
    """Metadata columns to break results down by.

    ``auto``: ``ga_weeks``, ``center``, ``device``, ``view`` when filled, every other
    manifest column with 2-12 distinct values (at most half the number of
    patients, so identifiers are skipped), and ``label_original`` when classes were
    merged. ``none``: no subgroups. Otherwise a comma-separated list; an unknown
    column is an error.
    """
    requested = (requested or "auto").strip()
    if requested.lower() == "none":
        return []
    if requested.lower() != "auto":
        cols = [c.strip() for c in requested.split(",") if c.strip()]
        missing = [c for c in cols if c not in img.columns]
        if missing:
            raise DataError(f"--subgroups: column(s) {missing} are not in predictions.csv "
                            f"(available: {[c for c in img.columns if not c.startswith('p_')]})")
        return cols
    n_groups = img["group"].nunique()
    out = []
    for col in ("ga_weeks", "center", "device", "view"):
        if col in img and img[col].notna().any() and (col == "ga_weeks" or img[col].nunique() >= 2):
            out.append(col)
    if "label_original" in img.columns:
        start = list(img.columns).index("label_original") + 1
        for col in img.columns[start:]:
            if col in out or col in ("ga_weeks", "center", "device", "view"):
                continue
            k = img[col].nunique(dropna=True)
            if 2 <= k <= min(12, max(2, n_groups // 2)):
                out.append(col)
        if class_map and img["label_original"].nunique() > img["label"].nunique():
            out.append("label_original")
    return out


def _subgroup_values(img: pd.DataFrame, pat: pd.DataFrame, column: str) -> tuple[str, pd.DataFrame, list[str]]:
    """Choose the level of a subgroup column and label each unit with its subgroup."""
    if column == "ga_weeks":
        ga = pd.to_numeric(img[column], errors="coerce").groupby(img["group"].astype(str)).mean()
        units = pat.copy()
        units["_sub"] = [ga_bin(ga.get(g, np.nan)) for g in units["group"].astype(str)]
        order = [name for _, _, name in GA_BINS] + [MISSING]
        return "patient", units, order
    vals = img[column].astype(object).where(img[column].notna(), MISSING).astype(str)
    per_group = vals.groupby(img["group"].astype(str)).nunique()
    if (per_group <= 1).all():
        first = vals.groupby(img["group"].astype(str)).first()
        units = pat.copy()
        units["_sub"] = [first.get(g, MISSING) for g in units["group"].astype(str)]
        level = "patient"
    else:
        units = img.copy()
        units["_sub"] = vals.to_numpy()
        level = "image"
    order = sorted(set(units["_sub"]) - {MISSING}) + ([MISSING] if MISSING in set(units["_sub"]) else [])
    return level, units, order


def heterogeneity_test(subgroup: Sequence[str], correct: Sequence[bool], *, n_perm: int = 2000,
                       seed: int = 0) -> dict:
    """Does accuracy differ between subgroups? Pearson chi-square on the subgroup x correct table.

    The p-value is a permutation p-value (subgroup labels shuffled ``n_perm``
    times, seeded; ``(1 + #{X2_perm >= X2}) / (1 + n_perm)``), valid with the small
    counts of clinical subgroups where the chi-square approximation is not; the
    asymptotic p-value is given too. Units should be independent (patients).
    """
    from scipy.stats import chi2

    sub = pd.Series(list(subgroup), dtype=object)
    codes, names = pd.factorize(sub)
    corr = np.asarray(correct, dtype=np.int64)
    k = len(names)
    if k < 2 or len(corr) == 0:
        return {"test": "chi-square (permutation)", "statistic": None, "df": None, "p_value": None,
                "p_value_asymptotic": None, "n_subgroups": int(k), "note": "fewer than two subgroups"}

    def stat(c: np.ndarray) -> np.ndarray:  # c: (m, n) subgroup codes
        m = c.shape[0]
        idx = c + k * corr[None, :]
        table = np.zeros((m, 2 * k))
        np.add.at(table, (np.repeat(np.arange(m), c.shape[1]), idx.ravel()), 1.0)
        obs = table.reshape(m, 2, k)
        row = obs.sum(2, keepdims=True)
        col = obs.sum(1, keepdims=True)
        exp = row * col / len(corr)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(exp > 0, (obs - exp) ** 2 / np.where(exp > 0, exp, 1), 0.0).sum((1, 2))

    x2 = float(stat(codes[None, :])[0])
    rng = np.random.default_rng(seed)
    perms = np.stack([rng.permutation(codes) for _ in range(n_perm)]) if n_perm else np.zeros((0, len(codes)))
    null = stat(perms) if n_perm else np.array([])
    both = int(corr.min() != corr.max())
    dof = (k - 1) * both
    return {
        "test": "chi-square of correct decisions across subgroups (permutation p-value)",
        "statistic": x2, "df": int(dof),
        "p_value": float((1 + (null >= x2 - 1e-12).sum()) / (1 + n_perm)) if n_perm else None,
        "p_value_asymptotic": float(chi2.sf(x2, dof)) if dof else 1.0,
        "n_subgroups": int(k), "n_perm": int(n_perm),
    }


def subgroup_analysis(img: pd.DataFrame, pat: pd.DataFrame, classes: Sequence[str], column: str,
                      cfg: EvaluationConfig, *, normal_class: str = "normal") -> dict:
    """Results by the values of one metadata column, each with its n, CIs and a small-n flag.

    The unit is the patient when the column is constant within every patient
    (``ga_weeks`` is always taken per patient, as the mean over its images, and
    binned <14, 14-<20, 20-<28, >=28 weeks); otherwise the image (then the
    heterogeneity test treats images as independent and its p-value is optimistic).
    Subgroups with fewer than ``cfg.small_subgroup`` patients are flagged, never hidden.
    """
    classes = list(classes)
    img_l, pat_l = labelled_rows(img), labelled_rows(pat)
    level, units, order = _subgroup_values(img_l, pat_l, column)
    rows = []
    for name in order:
        part = units[units["_sub"] == name]
        if part.empty:
            continue
        m = metrics_with_ci(part, classes, n_boot=cfg.n_boot, seed=cfg.seed, confidence=cfg.confidence)
        n_groups = int(part["group"].nunique())
        row = {
            "subgroup": name, "n": int(len(part)), "n_groups": n_groups,
            "per_class_n": {c: m["per_class"][c]["n"] for c in classes},
            "accuracy": m["accuracy"], "accuracy_ci": m["ci"]["accuracy"],
            "balanced_accuracy": m["balanced_accuracy"], "balanced_accuracy_ci": m["ci"]["balanced_accuracy"],
            "macro_auroc": m["macro_auroc"], "macro_auroc_ci": m["ci"]["macro_auroc"],
            "small": n_groups < cfg.small_subgroup,
        }
        if normal_class in classes:
            truth = part["label"].astype(str).to_numpy() != normal_class
            sc = auroc_with_ci(1 - part[f"p_{normal_class}"].to_numpy(dtype=np.float64), truth,
                               part["group"].astype(str).tolist(), n_boot=cfg.n_boot, seed=cfg.seed,
                               confidence=cfg.confidence)
            row["abnormal_auroc"], row["abnormal_auroc_ci"] = sc["auroc"], sc["ci"]
        rows.append(row)
    correct = units["pred"].astype(str).to_numpy() == units["label"].astype(str).to_numpy()
    het = heterogeneity_test(units["_sub"].tolist(), correct, n_perm=cfg.n_perm, seed=cfg.seed)
    notes = []
    if level == "image":
        notes.append(f"{column} varies within patients, so this table counts images; the heterogeneity test "
                     "treats images as independent and its p-value is optimistic")
    if column == "label_original":
        notes.append("original labels before rare classes were merged: accuracy here is the sensitivity for "
                     "each original label; subgroups are confounded with the label by construction")
    small = [r["subgroup"] for r in rows if r["small"]]
    if small:
        notes.append(f"subgroups with fewer than {cfg.small_subgroup} patients ({', '.join(small)}): "
                     "estimates are imprecise, read their intervals")
    return {"column": column, "level": level,
            "binning": "<14, 14-<20, 20-<28, >=28 weeks (per-patient mean)" if column == "ga_weeks" else None,
            "small_threshold": cfg.small_subgroup, "rows": rows, "heterogeneity": het, "notes": notes}


# --------------------------------------------------------------------------- run folder


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


def dataset_summary(img: pd.DataFrame, classes: Sequence[str], metrics: dict) -> dict:
    """Counts per class (images, patients), per original label, and per metadata column."""
    per_class = {}
    lab = labelled_rows(img)
    for c in classes:
        part = lab[lab["label"] == c]
        per_class[c] = {"images": int(len(part)), "groups": int(part["group"].nunique())}
    original = {}
    if "label_original" in img.columns:
        for name, part in img.groupby(img["label_original"].fillna("").astype(str), sort=True):
            if name:
                original[name] = {"images": int(len(part)), "groups": int(part["group"].nunique()),
                                  "class": str(part["label"].iloc[0]) if len(part) else ""}
    columns = {}
    for col in ("center", "device", "view"):
        if col in img and img[col].notna().any():
            columns[col] = {str(k): int(v) for k, v in img[col].astype(str).value_counts().items()}
    if "ga_weeks" in img and img["ga_weeks"].notna().any():
        ga = pd.to_numeric(img["ga_weeks"], errors="coerce")
        columns["ga_weeks"] = {"min": float(ga.min()), "median": float(ga.median()), "max": float(ga.max()),
                               "missing": int(ga.isna().sum())}
    return {
        "n_images": int(len(img)), "n_labelled_images": int(len(lab)),
        "n_groups": int(img["group"].nunique()), "images_per_group_max": int(img.groupby("group").size().max()),
        "per_class": per_class, "original_labels": original, "metadata": columns,
        "source": (metrics.get("data") or {}).get("source"), "class_map": (metrics.get("task") or {}).get("class_map", {}),
    }


def _limitations(result: dict, classes: Sequence[str], small: int) -> list[str]:
    """Plain-language list of what these results cannot show."""
    out = []
    ds = result["dataset"]
    few = [c for c, v in ds["per_class"].items() if 0 < v["groups"] < small]
    if few:
        out.append(f"Classes with fewer than {small} patients ({', '.join(few)}): per-class estimates are "
                   "imprecise; their intervals are wide and may be unstable.")
    absent = [c for c, v in ds["per_class"].items() if v["groups"] == 0]
    if absent:
        out.append(f"Classes absent from these data ({', '.join(absent)}): nothing is known about them here.")
    sc = result.get("shortcut") or {}
    if sc.get("warning"):
        out.append(sc.get("message", "Image-level statistics separate the classes: results may reflect image "
                   "source rather than anatomy."))
    if result.get("kind") == "cv":
        out.append("Cross-validation estimates come from one dataset; performance on another centre, device or "
                   "population must be shown by external validation (`fetalscan evaluate`).")
    else:
        out.append("External validation on one dataset; it shows performance there only.")
    out.append("Labels were taken as given; no clinician re-read them for this evaluation.")
    out.append("These are retrospective, image-based results; they do not show the effect on clinical decisions "
               "or outcomes, which needs a prospective reader study.")
    return out


def evaluate_frames(run: RunData, cfg: EvaluationConfig, *, thresholds: dict | None = None) -> tuple[dict, dict]:
    """Compute every evaluation block of a run. Returns (blocks for metrics.json, frames for figures)."""
    classes, agg, normal = run.classes, run.aggregate, run.normal_class
    timings: dict[str, float] = {}

    def timed(name: str, fn, *a, **k):
        t = time.perf_counter()
        value = fn(*a, **k)
        timings[name] = round(time.perf_counter() - t, 3)
        return value

    img, pat = run.predictions, run.patients
    if labelled_rows(img).empty:
        raise DataError(f"{run.run_dir / 'predictions.csv'}: no labelled rows; evaluation needs the true label "
                        "(column 'label') of each image")
    blocks: dict = {"kind": run.kind}
    blocks["image_level"] = timed("image_level", metrics_with_ci, img, classes, n_boot=cfg.n_boot, seed=cfg.seed,
                                  confidence=cfg.confidence)
    blocks["patient_level"] = timed("patient_level", metrics_with_ci, pat, classes, n_boot=cfg.n_boot,
                                    seed=cfg.seed, confidence=cfg.confidence)
    blocks["dataset"] = dataset_summary(img, classes, run.metrics)
    temp_note = None
    if run.kind == "external":
        t = (run.metrics.get("external") or {}).get("temperature")
        temp_note = (f"external data: no temperature is fitted here; the model's own temperature "
                     f"(T = {t:.3g}, fitted on its inner validation split) is already applied"
                     if t is not None else "external data: no temperature is fitted here")
    cal_block, test_cal, inner_cal = timed("calibration", calibration_analysis, img, run.inner, classes, cfg,
                                           aggregate=agg, normal_class=normal, temperature_note=temp_note)
    blocks["calibration"] = cal_block
    pat_cal = aggregate_groups(test_cal, classes, agg, normal) if cal_block.get("fitted") else pat
    screening = timed("screening", screening_analysis, img, pat, run.inner, classes, cfg, normal_class=normal,
                      aggregate=agg, thresholds=thresholds)
    if screening.get("available"):
        screening["probabilities"] = ("as the fold models gave them; each threshold is chosen on the same scale, "
                                      "so no temperature is needed" if run.kind == "cv" else
                                      "as the model gives them (its own temperature applied)")
    blocks["screening"] = screening
    cols = subgroup_columns(img, cfg.subgroups, (run.metrics.get("task") or {}).get("class_map"))
    blocks["subgroups"] = [timed(f"subgroup_{c}", subgroup_analysis, img, pat, classes, c, cfg, normal_class=normal)
                           for c in cols]
    blocks["shortcut"] = None
    probe_img = None
    if cfg.shortcut:
        from .shortcut import run_shortcut_check

        blocks["shortcut"], probe_img = timed("shortcut", run_shortcut_check, img, classes, cfg,
                                              model_image=blocks["image_level"], model_patient=blocks["patient_level"],
                                              model_screening=screening, folds=run.folds, aggregate=agg,
                                              normal_class=normal)
    else:
        blocks["shortcut"] = {"available": False, "note": "shortcut check switched off (--no-shortcut)"}
    blocks["timings_s"] = timings
    frames = {"image": img, "patient": pat, "image_calibrated": test_cal, "patient_calibrated": pat_cal,
              "inner": run.inner, "probe_image": probe_img}
    return blocks, frames


def evaluate_run(run_dir: str | Path, config: EvaluationConfig | None = None, *, seed: int | None = None,
                 n_boot: int | None = None, write: bool = True) -> dict:
    """Evaluate a run folder and write ``metrics.json`` (all keys kept, ours added) and ``report.html``.

    Reads ``predictions.csv``, ``patients.csv``, ``inner_val_predictions.csv``,
    ``folds.csv`` and ``metrics.json`` (those present), computes metrics with group
    bootstrap and Wilson CIs at image and patient level, the screening view,
    calibration with per-fold temperature scaling, subgroups, the shortcut check
    and, when ``RUN/explain/`` holds them, the explainability summary; then writes
    ``metrics.json`` and ``report.html`` atomically.

    Parameters
    ----------
    run_dir : path
        A folder written by ``fetalscan cv`` or ``fetalscan evaluate``.
    config : EvaluationConfig, optional
    seed, n_boot : int, optional
        Override the config's values.
    write : bool
        Write ``metrics.json`` and ``report.html`` (default) or only return the dict.

    Returns
    -------
    dict
        The full content of the new ``metrics.json``.
    """
    from . import report as report_mod
    from .fileio import provenance, write_json

    cfg = config or EvaluationConfig()
    if seed is not None:
        cfg.seed = seed
    if n_boot is not None:
        cfg.n_boot = n_boot
    cfg.validate()
    t0 = time.perf_counter()
    run = load_run(run_dir)
    thresholds = (run.metrics.get("external") or {}).get("screening_thresholds")
    blocks, frames = evaluate_frames(run, cfg, thresholds=thresholds)
    metrics = dict(run.metrics)
    metrics.setdefault("disclaimer", report_mod.DISCLAIMER)
    metrics.setdefault("task", {"classes": run.classes, "class_map": {}, "notes": []})
    if "provenance" not in metrics:
        metrics["provenance"] = provenance(cfg.seed)
    explain = report_mod.read_explainability(run.run_dir)
    blocks["explainability"] = explain["summary"]
    blocks["limitations"] = _limitations(blocks, run.classes, cfg.small_subgroup)
    metrics.update({k: v for k, v in blocks.items() if k != "timings_s"})
    metrics["evaluation"] = {
        "config": cfg.to_dict(), "kind": run.kind, "aggregate": run.aggregate, "normal_class": run.normal_class,
        "notes": run.notes, "timings_s": blocks["timings_s"],
        "seconds": round(time.perf_counter() - t0, 2),
        "provenance": provenance(cfg.seed, (metrics.get("provenance") or {}).get("data_hash")),
        "report": "report.html",
    }
    if write:
        html = report_mod.render_report(metrics, frames, run.run_dir, explain)
        write_json(run.run_dir / "metrics.json", metrics)
        report_mod.write_report(run.run_dir / "report.html", html)
    return metrics


# --------------------------------------------------------------------------- external validation


def evaluate_external(model: str | Path, dataset, out: str | Path, config: EvaluationConfig | None = None, *,
                      device=None, aggregate: str = "mean", normal_class: str = "normal", batch_size: int = 32,
                      overwrite: bool = False, description: str = "") -> dict:
    """Score a trained model on another dataset and write the same report (external validation).

    Writes ``predictions.csv``, ``patients.csv``, ``metrics.json`` and ``report.html``
    into ``out``. There are no folds: nothing is fitted on these data. The model's
    own temperature (fitted on its inner validation split) is already applied by
    :func:`fetalscan.predict.predict_dataset`; the screening operating point is the
    one stored with the model, when it has one.

    Parameters
    ----------
    model : path
        ``model.pt`` written by ``fetalscan train``.
    dataset : fetalscan.data.Dataset
        The external data, labelled (labels the model does not know are kept only
        in ``label_original`` and left out of the metrics).
    description : str
        What the external set is (centre, device, period, how labels were
        obtained); printed at the top of the report.
    """
    from .checkpoint import load_checkpoint
    from .fileio import prepare_out_dir, provenance, write_json
    from .predict import labels_for_model, predict_dataset, predictions_frame, write_prediction_files
    from .runtime import resolve_device

    cfg = config or EvaluationConfig()
    cfg.validate()
    if aggregate not in AGGREGATIONS:
        raise FetalscanError(f"--aggregate must be one of {AGGREGATIONS}, got {aggregate!r}")
    device = device if device is not None else resolve_device("auto")
    loaded = load_checkpoint(model, device)
    data, unknown = labels_for_model(dataset, loaded.classes, loaded.class_map)
    if not any(r.label for r in data.records):
        raise DataError(f"{dataset.source}: none of its labels {sorted(unknown)} is a class of the model "
                        f"{loaded.classes}; external validation needs labelled cases of the model's classes")
    if aggregate == "max_abnormal" and normal_class not in loaded.classes:
        raise FetalscanError(f"--aggregate max_abnormal needs the normal class {normal_class!r}")
    out = prepare_out_dir(out, overwrite)
    t0 = time.perf_counter()
    probs = predict_dataset(loaded, data, device, batch_size)
    df = predictions_frame(data.records, probs, loaded.classes)
    write_prediction_files(out, df, loaded.classes, aggregate, normal_class)
    calib = loaded.meta.get("calibration") or {}
    screening = calib.get("screening") or None
    thresholds = None
    if screening and screening.get("normal_class", normal_class) == normal_class:
        thresholds = {"image": screening.get("image"), "patient": screening.get("patient") if
                      screening.get("aggregate", aggregate) == aggregate else None,
                      "target_sensitivity": screening.get("target_sensitivity")}
    notes = list(data.notes)
    if unknown:
        notes.append(f"label(s) {sorted(unknown)} are not classes of the model; those images are predicted but "
                     "left out of the metrics (kept in label_original)")
    from .fileio import sha256_file

    base = {
        "disclaimer": _disclaimer(),
        "task": {"classes": loaded.classes, "class_map": loaded.class_map, "notes": notes},
        "data": {"source": dataset.source, **data.summary()},
        "external": {
            "model": str(Path(model).resolve()), "model_sha256": sha256_file(model),
            "model_provenance": loaded.meta.get("provenance", {}),
            "model_training_data": ((loaded.meta.get("training") or {}).get("data") or {}),
            "temperature": loaded.temperature, "calibration": {k: v for k, v in calib.items() if k != "screening"},
            "screening_thresholds": thresholds, "aggregate": aggregate, "normal_class": normal_class,
            "unknown_labels": sorted(unknown), "description": description,
            "note": "external validation: the model was trained elsewhere and nothing is fitted on these data",
        },
        "seconds_predict": round(time.perf_counter() - t0, 2),
        "provenance": provenance(cfg.seed, dataset.data_hash(), device=str(device)),
    }
    write_json(out / "metrics.json", base)
    return evaluate_run(out, cfg)


def _disclaimer() -> str:
    from .report import DISCLAIMER

    return DISCLAIMER


__all__ = [
    "EvaluationConfig", "RunData", "add_confidence_intervals", "auroc_with_ci", "binary_metrics",
    "bootstrap_classification", "calibration_analysis", "classification_metrics", "dataset_summary",
    "evaluate_external", "evaluate_frames", "evaluate_run", "final_model_calibration", "ga_bin",
    "group_bootstrap_weights", "heterogeneity_test", "labelled_rows", "load_run", "metrics_from_frame",
    "metrics_with_ci", "percentile_interval", "read_predictions", "screening_analysis", "screening_threshold",
    "subgroup_analysis", "subgroup_columns", "weighted_auroc", "weighted_average_precision", "wilson_interval",
]
