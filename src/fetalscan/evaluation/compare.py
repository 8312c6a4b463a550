"""Comparing two runs on the same cases: paired AUROC (DeLong) and accuracy (McNemar).

Two models scored on the *same* patients give correlated estimates; a paired
test uses that correlation and is far more powerful than comparing two
separate confidence intervals.

- **AUROC**: DeLong, DeLong & Clarke-Pearson (1988) estimate the covariance of
  two correlated AUROCs from their structural components; the fast algorithm
  of Sun & Xu (2014) computes them from mid-ranks in ``O(n log n)``. The
  difference gets a normal-theory CI and a two-sided z-test, one-vs-rest per
  class and for "any anomaly vs normal". The macro AUROC difference gets a
  group-bootstrap CI (the per-class AUROCs share cases, which DeLong's
  per-class covariance does not cover).
- **Accuracy**: McNemar's test (1947) on the discordant pairs
  (``b`` = only A correct, ``c`` = only B correct); exact binomial p-value and the
  continuity-corrected chi-square; the difference ``(b - c) / n`` gets a Wald CI
  for paired proportions and a group-bootstrap CI.

Both tests assume independent cases, so the default level is the patient
(``patients.csv``); at image level, images of one patient are treated as
independent and p-values are optimistic (the bootstrap CIs still resample
patients).

References
----------
DeLong ER, DeLong DM, Clarke-Pearson DL. Comparing the areas under two or more
correlated receiver operating characteristic curves: a nonparametric approach.
Biometrics 1988;44(3):837-845.
Sun X, Xu W. Fast implementation of DeLong's algorithm for comparing the areas
under correlated receiver operating characteristic curves. IEEE Signal
Processing Letters 2014;21(11):1389-1393.
McNemar Q. Note on the sampling error of the difference between correlated
proportions or percentages. Psychometrika 1947;12(2):153-157.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from fetalscan.errors import DataError, FetalscanError

LEVELS = ("patient", "image")


def _midranks(x: np.ndarray) -> np.ndarray:
    """Mid-ranks (1-based, ties averaged) along the last axis."""
    from scipy.stats import rankdata

    return rankdata(x, method="average", axis=-1)


def delong_covariance(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUROCs of several scores on the same cases and their DeLong covariance (Sun & Xu 2014).

    Parameters
    ----------
    scores : array, shape (k, n)
        ``k`` scores (models) for the same ``n`` cases.
    positive : bool array, shape (n,)

    Returns
    -------
    aucs : array, shape (k,)
    cov : array, shape (k, k)
    """
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    positive = np.asarray(positive, dtype=bool)
    m, n = int(positive.sum()), int((~positive).sum())
    if m < 1 or n < 1:
        raise DataError(f"DeLong needs positive and negative cases; got {m} positive and {n} negative")
    x, y = scores[:, positive], scores[:, ~positive]
    tx, ty = _midranks(x), _midranks(y)
    tz = _midranks(np.concatenate([x, y], axis=1))
    aucs = tz[:, :m].sum(1) / (m * n) - (m + 1.0) / (2.0 * n)
    v01 = (tz[:, :m] - tx) / n       # structural components of the positives
    v10 = 1.0 - (tz[:, m:] - ty) / m  # ... and of the negatives
    sx = np.atleast_2d(np.cov(v01)) if m > 1 else np.zeros((len(scores), len(scores)))
    sy = np.atleast_2d(np.cov(v10)) if n > 1 else np.zeros((len(scores), len(scores)))
    return aucs, sx / m + sy / n


def delong_test(positive: np.ndarray, score_a: np.ndarray, score_b: np.ndarray, confidence: float = 0.95) -> dict:
    """Paired DeLong test of AUROC(A) - AUROC(B) on the same cases.

    Returns
    -------
    dict
        ``auroc_a, auroc_b, difference, se, ci`` (normal theory), ``z, p_value``
        (two-sided), ``n_positive, n_negative``.

    Examples
    --------
    >>> import numpy as np
    >>> y = np.array([1, 1, 1, 0, 0, 0], bool)
    >>> r = delong_test(y, np.array([.9, .8, .7, .3, .2, .1]), np.array([.9, .2, .7, .3, .8, .1]))
    >>> round(r["difference"], 3)
    0.333
    """
    from scipy.stats import norm

    aucs, cov = delong_covariance(np.vstack([score_a, score_b]), positive)
    diff = float(aucs[0] - aucs[1])
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    se = math.sqrt(var) if var > 0 else 0.0
    zc = float(norm.ppf(0.5 + confidence / 2))
    if se > 0:
        z = diff / se
        p = float(2 * norm.sf(abs(z)))
    else:
        z, p = (0.0, 1.0) if diff == 0 else (math.copysign(math.inf, diff), 0.0)
    return {"auroc_a": float(aucs[0]), "auroc_b": float(aucs[1]), "difference": diff, "se": se,
            "ci": [diff - zc * se, diff + zc * se], "z": z, "p_value": p,
            "n_positive": int(np.sum(positive)), "n_negative": int(np.sum(~np.asarray(positive, bool)))}


def mcnemar_test(correct_a: np.ndarray, correct_b: np.ndarray, confidence: float = 0.95) -> dict:
    """McNemar's test (1947) of paired accuracies, with the Wald CI of the difference.

    Returns
    -------
    dict
        ``accuracy_a, accuracy_b, difference`` (A - B), ``b`` (A right, B wrong),
        ``c`` (A wrong, B right), ``p_value`` (exact binomial, two-sided),
        ``p_value_chi2`` (continuity-corrected), ``ci_wald``.
    """
    from scipy.stats import binomtest, chi2, norm

    a = np.asarray(correct_a, dtype=bool)
    b_ = np.asarray(correct_b, dtype=bool)
    if a.shape != b_.shape or a.ndim != 1:
        raise DataError(f"McNemar needs paired decisions of equal length; got {a.shape} and {b_.shape}")
    n = len(a)
    b = int((a & ~b_).sum())
    c = int((~a & b_).sum())
    diff = (b - c) / n if n else float("nan")
    p_exact = float(binomtest(b, b + c, 0.5).pvalue) if b + c else 1.0
    x2 = (abs(b - c) - 1) ** 2 / (b + c) if b + c else 0.0
    se = math.sqrt(max(b + c - (b - c) ** 2 / n, 0.0)) / n if n else float("nan")
    zc = float(norm.ppf(0.5 + confidence / 2))
    return {"accuracy_a": float(a.mean()) if n else float("nan"), "accuracy_b": float(b_.mean()) if n else float("nan"),
            "difference": diff, "n": n, "b": b, "c": c, "p_value": p_exact,
            "p_value_chi2": float(chi2.sf(x2, 1)) if b + c else 1.0, "ci_wald": [diff - zc * se, diff + zc * se]}


def _run_frame(run: Path, level: str) -> tuple[pd.DataFrame, list[str], dict]:
    from fetalscan.evaluation.metrics import labelled_rows
    from fetalscan.evaluation.runs import read_predictions

    run = Path(run)
    if not run.is_dir():
        raise DataError(f"run folder not found: {run}")
    metrics = {}
    if (run / "metrics.json").is_file():
        try:
            metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataError(f"{run / 'metrics.json'}: not valid JSON ({exc})") from None
    name = "patients.csv" if level == "patient" else "predictions.csv"
    df, classes = read_predictions(run / name, kind=level)
    df = labelled_rows(df).copy()
    if level == "patient":
        df["_key"] = df["group"].astype(str)
    else:
        frames = (df["frame"].astype("Int64").astype(object).map(lambda v: "" if pd.isna(v) else str(int(v)))
                  if "frame" in df else pd.Series("", index=df.index))
        df["_key"] = df["path"].astype(str) + "#" + frames
    dup = df["_key"][df["_key"].duplicated()]
    if len(dup):
        raise DataError(f"{run / name}: case {dup.iloc[0]!r} appears more than once; compare needs one row per case")
    return df.set_index("_key"), classes, metrics


def _match(fa: pd.DataFrame, fb: pd.DataFrame, a: Path, b: Path, level: str) -> list[str]:
    only_a = fa.index.difference(fb.index)
    only_b = fb.index.difference(fa.index)
    if len(only_a) or len(only_b):
        what = "patients (groups)" if level == "patient" else "images"
        raise DataError(
            f"the runs are not on the same cases: {len(only_a)} {what} only in {a} (e.g. {list(only_a[:2])}), "
            f"{len(only_b)} only in {b} (e.g. {list(only_b[:2])}); compare needs both runs on the same data")
    keys = sorted(fa.index)
    la, lb = fa.loc[keys, "label"].astype(str), fb.loc[keys, "label"].astype(str)
    diff = la.to_numpy() != lb.to_numpy()
    if diff.any():
        k = keys[int(np.flatnonzero(diff)[0])]
        raise DataError(f"the runs disagree on the true label of {int(diff.sum())} case(s), e.g. {k!r}: "
                        f"{la[k]!r} in {a} vs {lb[k]!r} in {b}; they were not made from the same labels")
    return keys


def compare_runs(run_a: str | Path, run_b: str | Path, *, level: str = "patient", n_boot: int = 1000, seed: int = 0,
                 confidence: float = 0.95, normal_class: str | None = None) -> dict:
    """Paired comparison of two runs (``fetalscan cv`` or ``fetalscan evaluate`` folders) on the same cases.

    Parameters
    ----------
    run_a, run_b : path
        Run folders; both must cover the same cases (patients or images) with
        the same labels and classes, or :class:`DataError` says what differs.
    level : {"patient", "image"}
        ``patients.csv`` (default; independent cases) or ``predictions.csv``.

    Returns
    -------
    dict
        ``accuracy`` (McNemar), ``auroc.per_class`` (DeLong), ``auroc.screening``
        (DeLong, when a normal class exists), ``auroc.macro`` (bootstrap CI), ``notes``.
    """
    from fetalscan.evaluation.bootstrap import (
        group_bootstrap_weights,
        percentile_interval,
        weighted_auroc,
    )

    if level not in LEVELS:
        raise FetalscanError(f"level must be one of {LEVELS}, got {level!r}")
    a, b = Path(run_a), Path(run_b)
    fa, ca, ma = _run_frame(a, level)
    fb, cb, mb = _run_frame(b, level)
    if set(ca) != set(cb):
        raise DataError(f"the runs have different classes: {ca} in {a} vs {cb} in {b}; only runs with the same "
                        "classes can be compared")
    keys = _match(fa, fb, a, b, level)
    fa, fb = fa.loc[keys], fb.loc[keys]
    classes = list(ca)
    y = fa["label"].astype(str).to_numpy()
    pa = fa[[f"p_{c}" for c in classes]].to_numpy(dtype=np.float64)
    pb = fb[[f"p_{c}" for c in classes]].to_numpy(dtype=np.float64)
    correct_a = pa.argmax(1) == np.array([classes.index(v) for v in y])
    correct_b = pb.argmax(1) == np.array([classes.index(v) for v in y])
    groups = fa["group"].astype(str).tolist()
    notes = []
    agg_a = ((ma.get("cv") or {}).get("aggregate") or (ma.get("external") or {}).get("aggregate"))
    agg_b = ((mb.get("cv") or {}).get("aggregate") or (mb.get("external") or {}).get("aggregate"))
    if level == "patient" and agg_a and agg_b and agg_a != agg_b:
        notes.append(f"the runs aggregate images to patients differently ({agg_a} vs {agg_b})")
    if level == "image":
        notes.append("image level: DeLong and McNemar treat images as independent, so their p-values are optimistic "
                     "when patients have several images; the bootstrap intervals resample patients")

    acc = mcnemar_test(correct_a, correct_b, confidence)
    mat = np.column_stack([correct_a, correct_b]).astype(np.float64)
    boots = [w @ mat / w.sum(1, keepdims=True) for w in group_bootstrap_weights(groups, n_boot, seed)]
    bd = np.concatenate(boots) if boots else np.zeros((0, 2))
    acc["ci_bootstrap"] = percentile_interval(bd[:, 0] - bd[:, 1], confidence)

    per_class, macro_a = {}, []
    for j, c in enumerate(classes):
        pos = y == c
        if 0 < pos.sum() < len(y):
            per_class[c] = delong_test(pos, pa[:, j], pb[:, j], confidence)
            macro_a.append(j)
        else:
            per_class[c] = {"note": "no positive or no negative case: AUROC undefined"}
    macro: dict = {"classes": [classes[j] for j in macro_a]}
    if macro_a:
        ya = np.array([classes.index(v) for v in y])
        diffs = []
        for w in group_bootstrap_weights(groups, n_boot, seed):
            da = np.column_stack([weighted_auroc(pa[:, j], ya == j, w) for j in macro_a])
            db = np.column_stack([weighted_auroc(pb[:, j], ya == j, w) for j in macro_a])
            with np.errstate(invalid="ignore"):
                diffs.append(np.nanmean(da, 1) - np.nanmean(db, 1))
        point_a = float(np.mean([per_class[classes[j]]["auroc_a"] for j in macro_a]))
        point_b = float(np.mean([per_class[classes[j]]["auroc_b"] for j in macro_a]))
        macro.update({"auroc_a": point_a, "auroc_b": point_b, "difference": point_a - point_b,
                      "ci_bootstrap": percentile_interval(np.concatenate(diffs), confidence)})
    normal = normal_class or (ma.get("cv") or {}).get("normal_class") or "normal"
    screening = None
    if normal in classes:
        abn = y != normal
        if 0 < abn.sum() < len(y):
            j = classes.index(normal)
            screening = {"normal_class": normal, **delong_test(abn, 1 - pa[:, j], 1 - pb[:, j], confidence)}
    return {
        "level": level, "n": int(len(keys)), "classes": classes,
        "run_a": {"path": str(a.resolve()), "command": (ma.get("provenance") or {}).get("command")},
        "run_b": {"path": str(b.resolve()), "command": (mb.get("provenance") or {}).get("command")},
        "accuracy": acc,
        "auroc": {"per_class": per_class, "macro": macro, "screening": screening},
        "confidence": confidence, "n_boot": n_boot, "seed": seed, "notes": notes,
        "methods": "AUROC: paired DeLong test (DeLong et al. 1988; fast algorithm of Sun & Xu 2014); macro AUROC: "
                   "group bootstrap; accuracy: McNemar's exact test (1947), Wald and group-bootstrap CIs",
    }
