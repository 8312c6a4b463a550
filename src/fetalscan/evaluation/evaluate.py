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
import time
from collections.abc import Sequence

import pandas as pd

from fetalscan.errors import DataError
from fetalscan.evaluation.bootstrap import metrics_with_ci
from fetalscan.evaluation.calibration_analysis import calibration_analysis
from fetalscan.evaluation.config import EvaluationConfig
from fetalscan.evaluation.metrics import labelled_rows
from fetalscan.evaluation.runs import RunData
from fetalscan.evaluation.screening import screening_analysis
from fetalscan.evaluation.subgroups import (
    subgroup_analysis,
    subgroup_columns,
)
from fetalscan.inference.tables import aggregate_groups

log = logging.getLogger(__name__)


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
    baseline = result.get("baseline") or {}
    if baseline.get("warning"):
        out.append(baseline.get("message", "The model does not beat the linear-probe baseline."))
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
        from fetalscan.evaluation.shortcut import run_shortcut_check

        blocks["shortcut"], probe_img = timed("shortcut", run_shortcut_check, img, classes, cfg,
                                              model_image=blocks["image_level"], model_patient=blocks["patient_level"],
                                              model_screening=screening, folds=run.folds, aggregate=agg,
                                              normal_class=normal)
    else:
        blocks["shortcut"] = {"available": False, "note": "shortcut check switched off (--no-shortcut)"}
    if run.kind == "cv":
        from fetalscan.evaluation.baseline import baseline_comparison

        training = run.metrics.get("training") or {}
        is_probe = training.get("mode", "cached") == "cached" and training.get("head") == "logreg"
        blocks["baseline"], _ = timed("baseline", baseline_comparison, run.run_dir, pat, classes, cfg,
                                      model_patient=blocks["patient_level"], training_block=run.metrics.get("baseline"),
                                      is_probe=is_probe, aggregate=agg, normal_class=normal)
    blocks["timings_s"] = timings
    frames = {"image": img, "patient": pat, "image_calibrated": test_cal, "patient_calibrated": pat_cal,
              "inner": run.inner, "probe_image": probe_img}
    return blocks, frames
