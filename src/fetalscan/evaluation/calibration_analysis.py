"""Calibration of a run: reliability, ECE / MCE / Brier / NLL, and temperature scaling.

The temperature (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017) is
fitted on each fold's *inner validation* predictions and applied to that fold's test
predictions, so no test label is used; the report shows the calibration before and after,
at image and patient level. :func:`final_model_calibration` fits the temperature and the
screening thresholds that a final model stores, on its inner validation split only."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd

from fetalscan.evaluation import calibration as cal
from fetalscan.evaluation.bootstrap import (
    _div,
    group_bootstrap_weights,
    percentile_interval,
)
from fetalscan.evaluation.config import EvaluationConfig
from fetalscan.evaluation.metrics import _class_index, labelled_rows
from fetalscan.evaluation.screening import screening_threshold
from fetalscan.inference.tables import aggregate_groups, prob_columns

log = logging.getLogger(__name__)


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
    block["ci"] = {"ece": ece_interval(block["ece"], np.concatenate(eces), cfg.confidence),
                   "brier": {"bootstrap": percentile_interval(np.concatenate(briers), cfg.confidence)}}
    return block


def ece_interval(estimate: float, boot: np.ndarray, confidence: float = 0.95) -> dict:
    """The bootstrap interval of a binned ECE, with a bias-corrected version and a note.

    The binned ECE is biased upwards: with few cases per bin, chance gaps between
    accuracy and confidence add up instead of cancelling. A resample draws fewer
    distinct patients than the data hold, so its ECE is more biased still, and with
    a few dozen patients the whole percentile interval can lie *above* the estimate.
    The bias-corrected interval shifts the percentile interval down by the bootstrap
    estimate of that bias (``median(boot) - estimate``; Efron & Tibshirani 1993,
    ch. 10), clipped at 0; it always contains the estimate. The report shows it, and
    says so when the plain percentile interval excludes the estimate.

    Returns
    -------
    dict
        ``{"bootstrap": [lo, hi], "bias_corrected": [lo, hi], "bootstrap_bias": float,
        "note": str | None}``.
    """
    percentile = percentile_interval(boot, confidence)
    fin = np.asarray(boot, dtype=np.float64)
    fin = fin[np.isfinite(fin)]
    out: dict = {"bootstrap": percentile, "bias_corrected": [float("nan")] * 2, "bootstrap_bias": float("nan"),
                 "note": None}
    if not fin.size or not np.isfinite(estimate):
        return out
    bias = float(np.median(fin) - estimate)
    lo, hi = percentile
    out["bootstrap_bias"] = bias
    out["bias_corrected"] = [max(0.0, min(lo - bias, estimate)), max(hi - bias, estimate)]
    if not lo <= estimate <= hi:
        side = "above" if lo > estimate else "below"
        out["note"] = (f"the plain percentile interval {lo:.3f}-{hi:.3f} lies {side} the estimate {estimate:.3f}: "
                       f"resamples repeat patients, which shifts the binned ECE (bootstrap bias {bias:+.3f}); "
                       "the interval shown is corrected by that bias")
    return out


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
        _interval_notes(block, block["notes"])
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
    change = {level: _change(before[level]["ece"], after[level]["ece"]) for level in ("image", "patient")}
    if {change["image"], change["patient"]} == {"lower", "higher"}:
        worse = "patient" if change["patient"] == "higher" else "image"
        better = "image" if worse == "patient" else "patient"
        notes.append(f"temperature scaling lowered the {better}-level ECE ({before[better]['ece']:.3f} -> "
                     f"{after[better]['ece']:.3f}) but raised the {worse}-level ECE ({before[worse]['ece']:.3f} -> "
                     f"{after[worse]['ece']:.3f}); patient probabilities are the {aggregate} of rescaled image "
                     "probabilities, so calibrating images does not calibrate patients")
    block.update({"fitted": True, "temperatures": temps, "before": before, "after": after, "ece_change": change,
                  "notes": notes})
    _interval_notes(block, notes)
    return block, test_cal, inner_cal


def _change(before: float, after: float, tol: float = 5e-4) -> str:
    """``"lower"``, ``"higher"`` or ``"unchanged"`` (ECE: lower is better)."""
    if not (np.isfinite(before) and np.isfinite(after)):
        return "undefined"
    return "unchanged" if abs(after - before) < tol else ("lower" if after < before else "higher")


def _interval_notes(block: dict, notes: list[str]) -> None:
    """A note for every ECE whose plain bootstrap interval excludes the estimate."""
    for when in ("before", "after"):
        for level, b in (block.get(when) or {}).items():
            note = ((b.get("ci") or {}).get("ece") or {}).get("note")
            if note:
                label = f"{level} level" + (f", {when} temperature scaling" if block.get("fitted") else "")
                notes.append(f"ECE ({label}): {note}")


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
