"""Evaluate a run folder and write its report; external validation of a trained model.

:func:`evaluate_run` turns any run folder (``fetalscan cv`` or ``fetalscan evaluate``)
into ``metrics.json`` + ``report.html``; :func:`evaluate_external` predicts another
centre's data through the one prediction path and evaluates it the same way.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from fetalscan.errors import DataError, FetalscanError
from fetalscan.evaluation.config import EvaluationConfig
from fetalscan.evaluation.evaluate import (
    _limitations,
    evaluate_frames,
)
from fetalscan.evaluation.runs import load_run
from fetalscan.inference.predict import PredictConfig
from fetalscan.texts import DISCLAIMER

log = logging.getLogger(__name__)


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
    from fetalscan.fileio import check_writable, lock_out_dir, provenance, write_json
    from fetalscan.report import html as report_mod

    cfg = config or EvaluationConfig()
    if seed is not None:
        cfg.seed = seed
    if n_boot is not None:
        cfg.n_boot = n_boot
    cfg.validate()
    t0 = time.perf_counter()
    run = load_run(run_dir)
    if write:  # before any work: a read-only run folder, or one another command is writing, is refused now
        lock_out_dir(check_writable(run.run_dir))
    thresholds = (run.metrics.get("external") or {}).get("screening_thresholds")
    blocks, frames = evaluate_frames(run, cfg, thresholds=thresholds)
    metrics = dict(run.metrics)
    metrics.setdefault("disclaimer", DISCLAIMER)
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
        card = _model_card_of_run(run.run_dir, metrics)
        html = report_mod.render_report(metrics, frames, run.run_dir, explain, card=card)
        write_json(run.run_dir / "metrics.json", metrics)
        report_mod.write_report(run.run_dir / "report.html", html)
    return metrics


def _model_card_of_run(run_dir: Path, metrics: dict) -> dict | None:
    """The model card of the run's final model (``model.pt`` trained on the same data), written as
    ``model_card.md``; ``None`` when the run has no such model."""
    from fetalscan.fileio import write_text
    from fetalscan.report.model_card import matching_run_metrics, model_card, render_markdown

    checkpoint = Path(run_dir) / "model.pt"
    if matching_run_metrics(checkpoint, metrics) is None:
        return None
    card = model_card(checkpoint, metrics=metrics)
    write_text(Path(run_dir) / "model_card.md", render_markdown(card))
    return card


def evaluate_external(model: str | Path, dataset, out: str | Path, config: EvaluationConfig | None = None, *,
                      predict_config: PredictConfig | None = None, device=None, overwrite: bool = False,
                      description: str = "") -> dict:
    """Score a trained model on another dataset and write the same report (external validation).

    Writes ``predictions.csv``, ``patients.csv``, ``metrics.json`` and ``report.html``
    into ``out``. There are no folds: nothing is fitted on these data. Predictions come
    from the one prediction path, :func:`fetalscan.inference.predict.predict`, which
    applies the model's own temperature (fitted on its inner validation split); the
    screening operating point is the one stored with the model, when it has one.

    Parameters
    ----------
    model : path
        ``model.pt`` written by ``fetalscan train``.
    dataset : fetalscan.data.records.Dataset
        The external data, labelled (labels the model does not know are kept only
        in ``label_original`` and left out of the metrics).
    config : EvaluationConfig, optional
    predict_config : PredictConfig, optional
        Patient-level rule, normal class, batch size, optional plane check.
    description : str
        What the external set is (centre, device, period, how labels were
        obtained); printed at the top of the report.
    """
    from fetalscan.fileio import prepare_out_dir, provenance, sha256_file, write_json
    from fetalscan.inference.predict import labels_for_model, predict
    from fetalscan.models.checkpoint import load_checkpoint
    from fetalscan.runtime import resolve_device

    cfg = config or EvaluationConfig()
    cfg.validate()
    pcfg = predict_config or PredictConfig()
    pcfg.validate()
    aggregate, normal_class = pcfg.aggregate, pcfg.normal_class
    device = device if device is not None else resolve_device("auto")
    loaded = load_checkpoint(model, device)
    data, unknown = labels_for_model(dataset, loaded.classes, loaded.class_map)
    if not any(r.label for r in data.records):
        raise DataError(f"{dataset.source}: none of its labels {sorted(unknown)} is a class of the model "
                        f"{loaded.classes}; external validation needs labelled cases of the model's classes")
    if aggregate == "max_abnormal" and normal_class not in loaded.classes:
        raise FetalscanError(f"the max_abnormal rule needs the normal class {normal_class!r}, which is not one of "
                             f"the model's classes {loaded.classes}")
    out = prepare_out_dir(out, overwrite)
    t0 = time.perf_counter()
    prediction = predict(loaded, dataset, pcfg, device)
    prediction.write(out)
    calib = loaded.meta.get("calibration") or {}
    screening = calib.get("screening") or None
    thresholds = None
    if screening and screening.get("normal_class", normal_class) == normal_class:
        thresholds = {"image": screening.get("image"), "patient": screening.get("patient") if
                      screening.get("aggregate", aggregate) == aggregate else None,
                      "target_sensitivity": screening.get("target_sensitivity")}
    notes = list(data.notes) + [n for n in prediction.notes if not n.startswith("label(s)")]
    unknown_counts = {label: sum(r.label == label for r in dataset.records) for label in sorted(unknown)}
    if unknown:
        listed = ", ".join(f"{label!r} ({n} image{'s' if n != 1 else ''})" for label, n in unknown_counts.items())
        notes.append(f"label(s) {listed} are not classes of the model {loaded.classes}; those "
                     f"{sum(unknown_counts.values())} image(s) are predicted but left unscored (out of the metrics; "
                     "kept in label_original)")
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
            "unknown_labels": sorted(unknown), "unknown_label_images": unknown_counts, "description": description,
            "note": "external validation: the model was trained elsewhere and nothing is fitted on these data",
        },
        "seconds_predict": round(time.perf_counter() - t0, 2),
        "provenance": provenance(cfg.seed, dataset.data_hash(), device=str(device)),
    }
    write_json(out / "metrics.json", base)
    return evaluate_run(out, cfg)


def _disclaimer() -> str:
    return DISCLAIMER
