"""The linear-probe baseline row of a cv report, and the rule that warns when the model does not beat it.

``fetalscan cv`` trains, beside the model and under the same folds, the standard
answer for small data: a class-balanced L2 logistic regression on the frozen
embeddings of the same backbone, its strength chosen by an inner grouped CV on
each fold's training groups (:mod:`fetalscan.training.selection`). Its out-of-fold
predictions are in ``baseline_predictions.csv``. Here they are scored like the
model (same patient-level rule, same patient bootstrap, same seed) and compared.

Warning rule (``docs/evaluation.md``): the report warns when the model's
patient-level macro AUROC is **not above the upper bound of the baseline's 95 %
patient-bootstrap interval** -- then the trained model has not been shown to do
better than a linear probe on features it did not train. When the model *is* a
logistic-regression head on those embeddings (the default recipe), the row is shown
for reference and the rule is not applied.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from fetalscan.errors import DataError

log = logging.getLogger(__name__)


BASELINE_FILE = "baseline_predictions.csv"


def _auroc_abnormal(frame: pd.DataFrame, normal_class: str, **kw) -> dict | None:
    from fetalscan.evaluation.bootstrap import auroc_with_ci
    from fetalscan.evaluation.metrics import labelled_rows

    lab = labelled_rows(frame)
    truth = lab["label"].astype(str).to_numpy() != normal_class
    if not 0 < truth.sum() < len(truth):
        return None
    return auroc_with_ci(1 - lab[f"p_{normal_class}"].to_numpy(), truth, lab["group"].astype(str).tolist(), **kw)


def baseline_comparison(run_dir: str | Path, model_patients: pd.DataFrame, classes: Sequence[str], cfg, *,
                        model_patient: dict, training_block: dict | None, is_probe: bool,
                        aggregate: str = "mean", normal_class: str = "normal") -> tuple[dict, pd.DataFrame | None]:
    """Score ``baseline_predictions.csv`` like the model and apply the warning rule.

    Parameters
    ----------
    run_dir : path
        The cv run folder.
    model_patients : DataFrame
        The model's ``patients.csv``.
    cfg : EvaluationConfig
        ``n_boot``, ``seed``, ``confidence``.
    model_patient : dict
        The model's patient-level metrics with their ``ci`` block.
    training_block : dict or None
        ``metrics.json``'s ``baseline`` block as ``fetalscan cv`` wrote it.
    is_probe : bool
        The model is itself a logistic-regression head on the frozen embeddings
        (the rule is then not applied).

    Returns
    -------
    block : dict
        ``available``; ``rows`` (metric, model, model_ci, baseline, baseline_ci);
        ``warning``; ``rule``; ``message``.
    baseline_patients : DataFrame or None
    """
    from fetalscan.evaluation.bootstrap import metrics_with_ci
    from fetalscan.evaluation.runs import read_predictions
    from fetalscan.inference.tables import aggregate_groups

    block = dict(training_block or {})
    path = Path(run_dir) / BASELINE_FILE
    if not path.is_file():
        block.update({"available": False, "warning": False,
                      "note": block.get("note") or f"no {BASELINE_FILE} in this run (external validation, a run "
                      "made with baseline=False, or by an older fetalscan); rerun `fetalscan cv` to add it"})
        return block, None
    try:
        img, _ = read_predictions(path, classes)
    except DataError as exc:
        block.update({"available": False, "warning": False, "note": f"baseline not scored: {exc}"})
        return block, None
    pat = aggregate_groups(img, list(classes), aggregate, normal_class)
    kw = {"n_boot": cfg.n_boot, "seed": cfg.seed, "confidence": cfg.confidence}
    bp = metrics_with_ci(pat, list(classes), **kw)
    rows = []
    for key, name in (("macro_auroc", "macro AUROC, patient level"),
                      ("balanced_accuracy", "balanced accuracy, patient level")):
        rows.append({"metric": name, "key": key, "model": model_patient[key],
                     "model_ci": model_patient["ci"][key]["bootstrap"], "baseline": bp[key],
                     "baseline_ci": bp["ci"][key]["bootstrap"]})
    if normal_class in classes:
        a, b = _auroc_abnormal(model_patients, normal_class, **kw), _auroc_abnormal(pat, normal_class, **kw)
        if a and b:
            rows.append({"metric": f"abnormal vs {normal_class} AUROC, patient level", "key": "abnormal_auroc",
                         "model": a["auroc"], "model_ci": a["ci"], "baseline": b["auroc"], "baseline_ci": b["ci"]})
    for r in rows:
        r["difference"] = (r["model"] - r["baseline"]) if np.isfinite(r["model"]) and np.isfinite(r["baseline"]) \
            else None
    main = rows[0]
    upper = main["baseline_ci"][1]
    not_above = bool(np.isfinite(main["model"]) and np.isfinite(upper) and main["model"] <= upper)
    warn = not_above and not is_probe
    rule = (f"warn when the model's patient-level macro AUROC is not above the upper bound of the baseline's "
            f"{cfg.confidence:.0%} patient-bootstrap interval")
    if is_probe:
        message = ("The model is itself a logistic-regression head on these frozen embeddings (the linear-probe "
                   "recipe); the baseline row is shown for reference and the rule is not applied.")
        if training_block and training_block.get("same_as_model"):
            message = ("The model is the linear-probe baseline itself (same recipe, same folds): the row repeats "
                       "the model's figures and the rule is not applied.")
    elif warn:
        message = (f"Warning: the model's patient-level macro AUROC {main['model']:.3f} is not above the linear-probe "
                   f"baseline's interval ({main['baseline']:.3f}, {cfg.confidence:.0%} CI {main['baseline_ci'][0]:.3f}"
                   f"–{upper:.3f}): a logistic regression on the frozen embeddings of the same backbone, under the "
                   "same folds, does as well or better. The trained model has not been shown to add anything to it; "
                   "prefer the simpler model (`--head logreg`) unless other evidence favours this one.")
    else:
        message = (f"The model's patient-level macro AUROC {main['model']:.3f} is above the linear-probe baseline's "
                   f"interval ({main['baseline']:.3f}, CI up to {upper:.3f}).")
    block.update({"available": True, "rows": rows, "warning": warn, "model_is_probe": bool(is_probe),
                  "not_above_ci": not_above, "rule": rule, "message": message,
                  "patient_level_ci": {k: bp["ci"][k]["bootstrap"] for k in ("macro_auroc", "balanced_accuracy",
                                                                              "accuracy")},
                  "bootstrap": {"n_boot": cfg.n_boot, "seed": cfg.seed, "confidence": cfg.confidence,
                                "unit": "patient"}})
    return block, pat
