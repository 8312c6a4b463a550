"""The screening view: any anomaly vs normal at an operating point chosen without test data.

The score is ``1 - p(normal)``. The threshold is the highest one that reaches the target
sensitivity (default 0.95) on the inner-validation predictions (or the one a final model
stored), then applied unchanged to the test predictions; sensitivity and specificity are
reported with group-bootstrap intervals, at image and patient level. When no validation
predictions exist, 0.5 is used and the report says so."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from fetalscan.evaluation.bootstrap import auroc_with_ci, binary_metrics
from fetalscan.evaluation.config import EvaluationConfig
from fetalscan.evaluation.metrics import labelled_rows
from fetalscan.inference.tables import aggregate_groups

log = logging.getLogger(__name__)


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
                        "(set normal_class)"}
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
