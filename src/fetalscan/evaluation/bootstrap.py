"""Confidence intervals that respect patients: the group (cluster) bootstrap.

Images of one patient are correlated, so every interval here resamples *groups*
(patients), never images (Field & Welsh, "Bootstrapping clustered data", JRSS-B 2007).
Each replicate is a vector of group weights (:func:`group_bootstrap_weights`), and the
metrics are computed as weighted statistics in one vectorised pass: weighted AUROC
(Mann-Whitney with ties counted 1/2) and average precision, accuracy, balanced accuracy,
per-class sensitivity, specificity, PPV, NPV and F1. Intervals are percentile intervals;
a metric undefined in a replicate (e.g. no positives drawn) is left out of that replicate
and the number of defined replicates is reported."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import pandas as pd

from fetalscan.evaluation.metrics import (
    _class_index,
    _ratio,
    labelled_rows,
    metrics_from_frame,
    wilson_interval,
)
from fetalscan.inference.tables import prob_columns

log = logging.getLogger(__name__)


#: Largest bootstrap weight matrix held at once (elements); larger resamples run in chunks.
_CHUNK_ELEMENTS = 4_000_000


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
    micro = weighted_auroc(proba.ravel(), onehot.ravel(), np.repeat(w, k, axis=1))
    classes_drawn = ((w @ np.eye(k)[y]) > 0).sum(1)  # classes with a case in each resample
    micro[classes_drawn < 2] = np.nan  # as the point estimate: undefined with one class
    out["micro_auroc"] = micro
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
