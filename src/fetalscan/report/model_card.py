"""Model cards: what a classifier is for, what it was trained on, how well it did, and its limits.

Follows Mitchell M. et al., "Model Cards for Model Reporting", FAT* 2019 (sections: model
details, intended use, factors, metrics, evaluation and training data, ethical
considerations, caveats), adapted to prenatal ultrasound: the shortcut check (the
classes may be told apart by image source, not anatomy) is stated beside the metrics,
every metric carries its 95% confidence interval, and the human-oversight statement is
part of the card.

:func:`model_card` collects the card as a plain dict from a checkpoint and, optionally,
the cross-validation run whose evaluation describes it (``metrics.json`` of ``fetalscan
cv`` / ``demo``); :func:`render_markdown` writes it as Markdown (``fetalscan model-card``,
``model_card.md`` of ``make demo``); the run report and the service show the same dict.
Nothing here names a file path of the training data beyond its file name, nor any patient.
"""

from __future__ import annotations

import json
from pathlib import Path

from fetalscan.errors import DataError
from fetalscan.texts import DISCLAIMER

#: What the card says the model is for (the same for every fetalscan classifier).
INTENDED_USE = (
    "A second reader for research on prenatal ultrasound of the fetal brain: given images of one "
    "fetus, it gives class probabilities per image and for the fetus, a standard-plane check and "
    "heatmaps, for a qualified sonographer or fetal-medicine specialist who reads the images "
    "themselves and makes every decision.")

#: Uses the card rules out, for every model.
OUT_OF_SCOPE = (
    "Diagnosis, triage or reporting without a qualified clinician's own reading of the images.",
    "Images other than the planes and anatomy it was trained on (check the plane gate's result), "
    "other organs, or other imaging modalities.",
    "Populations, scanners, centres or gestational ages unlike its training data, before a local "
    "validation on labelled cases from the new setting (`fetalscan evaluate`).",
    "Anomalies that are not among its classes: an image of an unseen anomaly is still scored as one "
    "of the known classes.",
    "Use as a medical device: fetalscan is not one.")

#: How people stay in charge, as the service implements it.
HUMAN_OVERSIGHT = (
    DISCLAIMER + " In the service, every result is shown with this statement, and the reader confirms or "
    "overrides the finding: each decision is stored with who and when, never overwritten, and is "
    "reported beside the model's output in the study report and the exports.")


def _ci(block: dict | None, name: str) -> list | None:
    """The bootstrap CI of ``name`` in ``block['ci']`` (Wilson when there is no bootstrap one)."""
    ci = ((block or {}).get("ci") or {}).get(name) or {}
    if isinstance(ci, list):
        return ci
    return ci.get("bootstrap") or ci.get("wilson")


def _metric(name: str, value, ci) -> dict:
    return {"metric": name, "value": value, "ci": list(ci) if ci else None}


def _overall(m: dict) -> list[dict]:
    p = m.get("patient_level") or {}
    rows = [_metric(f"{k.replace('_', ' ')}, patient level", p.get(k), _ci(p, k))
            for k in ("accuracy", "balanced_accuracy", "macro_auroc") if k in p]
    scr = ((m.get("screening") or {}).get("patient") or {})
    if scr:
        roc, op = scr.get("roc") or {}, scr.get("operating_point") or {}
        rows.append(_metric("any anomaly vs normal AUROC, patient level", roc.get("auroc"), roc.get("ci")))
        for k in ("sensitivity", "specificity"):
            if k in op:
                ci = (op.get(f"{k}_ci") or {})
                rows.append(_metric(f"any anomaly {k} at the screening threshold, patient level", op[k],
                                    ci.get("bootstrap") or ci.get("wilson")))
    return rows


def _per_class(m: dict) -> list[dict]:
    out = []
    for cls, b in ((m.get("patient_level") or {}).get("per_class") or {}).items():
        out.append({"class": cls, "n": b.get("n"),
                    **{k: b.get(k) for k in ("sensitivity", "specificity", "auroc")},
                    **{f"{k}_ci": _ci(b, k) for k in ("sensitivity", "specificity", "auroc")}})
    return out


def _subgroups(m: dict) -> list[dict]:
    out = []
    for block in m.get("subgroups") or []:
        for row in block.get("rows") or []:
            acc_ci = row.get("accuracy_ci") or {}
            out.append({"column": block.get("column"), "level": block.get("level"), "subgroup": row.get("subgroup"),
                        "n": row.get("n"), "small": bool(row.get("small")),
                        "accuracy": row.get("accuracy"), "accuracy_ci": acc_ci.get("bootstrap") or acc_ci.get("wilson"),
                        "macro_auroc": row.get("macro_auroc"),
                        "macro_auroc_ci": (row.get("macro_auroc_ci") or {}).get("bootstrap")})
    return out


def _calibration(ckpt_cal: dict, m: dict) -> dict:
    patient = (((m.get("calibration") or {}).get("after") or {}).get("patient") or {})
    return {"temperature": ckpt_cal.get("temperature"), "fitted_on": ckpt_cal.get("fitted_on"),
            "method": ckpt_cal.get("method"),
            "inner_ece_before": ckpt_cal.get("ece_before"), "inner_ece_after": ckpt_cal.get("ece_after"),
            "cv_patient_ece": patient.get("ece"), "cv_patient_ece_ci": _ci(patient, "ece"),
            "screening_threshold": (ckpt_cal.get("screening") or {}).get("patient")}


def _read_run(run: Path) -> dict:
    path = Path(run) / "metrics.json"
    if not path.is_file():
        raise DataError(f"{path} not found: --run must be a folder written by `fetalscan cv` or `fetalscan demo`")
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not readable as JSON ({exc})") from exc
    if "patient_level" not in metrics:
        raise DataError(f"{path}: has no evaluation (patient_level); run `fetalscan report {run}` first")
    return metrics


def matching_run_metrics(checkpoint: str | Path, metrics: dict | None = None) -> dict | None:
    """The evaluation that describes ``checkpoint`` when it sits in its own run folder, else ``None``.

    ``fetalscan demo`` / ``cv`` + ``train`` put ``model.pt`` beside ``metrics.json``. They describe
    the same model only when the classes are the same and the data hash is the same; a stale
    checkpoint from another run is not described by these metrics, so ``None``. ``metrics``
    (already in memory) is used instead of reading the file.
    """
    from fetalscan.models.checkpoint import read_checkpoint

    checkpoint = Path(checkpoint)
    if metrics is None:
        path = checkpoint.parent / "metrics.json"
        try:
            metrics = json.loads(path.read_text()) if path.is_file() else None
        except (OSError, ValueError):
            metrics = None
    if not metrics or "patient_level" not in metrics or not checkpoint.is_file():
        return None
    blob = read_checkpoint(checkpoint)
    same_classes = list((metrics.get("task") or {}).get("classes") or []) == list(blob.get("classes") or [])
    run_hash = (metrics.get("provenance") or {}).get("data_hash")
    same_data = run_hash is not None and run_hash == (blob.get("provenance") or {}).get("data_hash")
    return metrics if same_classes and same_data else None


def model_card(checkpoint: str | Path, run: str | Path | None = None, *, metrics: dict | None = None) -> dict:
    """The card of ``checkpoint`` as a JSON-able dict.

    The metrics come from ``metrics`` (a ``metrics.json`` content) or from ``run``'s
    ``metrics.json`` when given; without either the card says it has no evaluation.
    Raises :class:`~fetalscan.errors.DataError` when the run's classes differ from the model's
    (the run would then not describe this model).
    """
    from fetalscan.fileio import sha256_file
    from fetalscan.models.checkpoint import read_checkpoint

    checkpoint = Path(checkpoint)
    blob = read_checkpoint(checkpoint)
    prov = blob.get("provenance") or {}
    training = blob.get("training") or {}
    classes = list(blob.get("classes") or [])
    m = metrics if metrics is not None else _read_run(Path(run)) if run is not None else {}
    notes: list[str] = []
    if m:
        run_classes = list((m.get("task") or {}).get("classes") or [])
        if run_classes != classes:
            raise DataError(f"{run or 'the evaluation'}: its classes {run_classes} are not the model's {classes}; "
                            "give the cv run made on the same data and classes")
        run_hash = (m.get("provenance") or {}).get("data_hash")
        if run_hash and prov.get("data_hash") and run_hash != prov["data_hash"]:
            notes.append("The evaluation run used different data (another data hash) than the final model: its "
                          "metrics describe the method on those data, not this model's training set.")
    else:
        notes.append("No evaluation was given (`--run`): the card has no metrics. A model without a "
                      "cross-validated or external evaluation should not be used.")
    data = m.get("data") or {}
    shortcut = m.get("shortcut") or {}
    return {
        "model": {
            "file": checkpoint.name, "sha256": sha256_file(checkpoint),
            "fetalscan_version": blob.get("fetalscan_version"), "created": prov.get("created"),
            "command": prov.get("command"), "seed": prov.get("seed"),
            "architecture": blob.get("architecture") or {}, "classes": classes,
            "class_map": blob.get("class_map") or {}, "preprocessing": blob.get("preprocessing") or {},
            "pretrained": (training.get("config") or {}).get("pretrained"),
            "versions": prov.get("versions") or {},
        },
        "intended_use": INTENDED_USE,
        "out_of_scope": list(OUT_OF_SCOPE),
        "training_data": {
            "source": Path(str(prov.get("data_source") or data.get("source") or "")).name or None,
            "data_hash": prov.get("data_hash"),
            "n_images": data.get("n_images"), "n_groups": data.get("n_groups"),
            "per_class": data.get("per_class") or {},
            "class_notes": list((m.get("task") or {}).get("notes") or []),
        },
        "evaluation": {
            "available": bool(m),
            "kind": (m.get("evaluation") or {}).get("kind"),
            "scheme": m.get("cv") or {},
            "overall": _overall(m) if m else [],
            "per_class": _per_class(m) if m else [],
            "subgroups": _subgroups(m) if m else [],
        },
        "calibration": _calibration(blob.get("calibration") or {}, m),
        "shortcut": {"checked": bool(shortcut.get("available")), "warning": bool(shortcut.get("warning")),
                     "message": shortcut.get("message")},
        "limitations": [t for t in m.get("limitations") or [] if t != shortcut.get("message")],
        "human_oversight": HUMAN_OVERSIGHT,
        "notes": notes,
        "reference": "Mitchell M. et al., Model Cards for Model Reporting, FAT* 2019",
    }


def render_markdown(card: dict) -> str:
    """The card as Markdown (``templates/model_card.md``)."""
    from fetalscan.report.templating import plain_environment

    return plain_environment().get_template("model_card.md").render(c=card, fmt=_fmt, ci=_fmt_ci)


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _fmt_ci(interval, digits: int = 3) -> str:
    if not interval or any(v is None for v in interval):
        return ""
    lo, hi = interval
    return f" ({lo:.{digits}f}–{hi:.{digits}f})"


def write_model_card(checkpoint: str | Path, out: str | Path, run: str | Path | None = None) -> tuple[Path, dict]:
    """Write the Markdown card of ``checkpoint`` to ``out`` (atomically); returns the path and the card."""
    from fetalscan.fileio import write_text

    card = model_card(checkpoint, run)
    return write_text(out, render_markdown(card)), card
