"""``fetalscan explain --run``: the report gallery and the faithfulness of a cross-validation run.

:func:`explain_run` picks the most confident true positives, false positives and
false negatives per class from a run's out-of-fold predictions
(:func:`select_gallery`), explains each image with the fold model that held it
out (or a given model), and writes ``RUN/explain/gallery.json`` with the
panels; with a :class:`~fetalscan.explain.faithfulness.FaithfulnessConfig` it
also writes ``faithfulness.json`` and ``faithfulness_curves.png``, which
``fetalscan report`` shows.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from fetalscan.errors import DataError, FetalscanError
from fetalscan.explain.cams import (
    DISCLAIMER,
    ExplainConfig,
    describe,
    explain_arrays,
    safe_stem,
    write_image_outputs,
)

log = logging.getLogger(__name__)


GALLERY_KINDS = ("TP", "FP", "FN")


def select_gallery(preds, classes: Sequence[str], per_kind: int = 1) -> list[dict]:
    """The most confident true positives, false positives and false negatives per class.

    For class ``c`` with probability column ``p_c``: TP = label ``c`` predicted ``c``,
    highest ``p_c`` first; FP = other label predicted ``c``, highest ``p_c`` first
    (the most confident false alarms); FN = label ``c`` predicted otherwise, lowest
    ``p_c`` first (the most confidently missed). Rows without a label are skipped.

    Each image is shown once: a false negative for one class is a false positive for
    the class it was called, so the same image can top two lists. It is then kept
    where it came first, that pick lists the other role under ``"also"``, and the
    later list takes its next candidate.

    Returns
    -------
    list of dict
        ``{"class", "kind", "row", "prob", "also"}`` with ``row`` the frame's index label
        and ``also`` the other roles of the same image (``[{"class", "kind", "prob"}]``).
    """
    if per_kind < 1:
        raise FetalscanError(f"--gallery-per-kind must be >= 1, got {per_kind}")
    missing = [c for c in ("label", "pred", *[f"p_{c}" for c in classes]) if c not in preds.columns]
    if missing:
        raise DataError(f"predictions lack column(s) {missing}")
    lab = preds["label"].fillna("").astype(str)
    pred = preds["pred"].astype(str)
    picks: list[dict] = []
    by_row: dict = {}
    for c in classes:
        p = preds[f"p_{c}"].astype(float)
        kinds = {
            "TP": (lab == c) & (pred == c),
            "FP": (lab != c) & (lab != "") & (pred == c),
            "FN": (lab == c) & (pred != c),
        }
        for kind in GALLERY_KINDS:
            part = p[kinds[kind]]
            part = part.sort_values(ascending=kind == "FN", kind="stable")
            taken = 0
            for row, prob in part.items():
                if taken == per_kind:
                    break
                if row in by_row:  # already shown for another class / kind: note the role there
                    by_row[row]["also"].append({"class": c, "kind": kind, "prob": float(prob)})
                    continue
                pick = {"class": c, "kind": kind, "row": row, "prob": float(prob), "also": []}
                picks.append(pick)
                by_row[row] = pick
                taken += 1
    return picks


def _read_csv(path: Path):
    import pandas as pd

    if not path.is_file():
        raise DataError(f"{path} not found; is {path.parent} a run folder written by `fetalscan cv`?")
    try:
        return pd.read_csv(path, keep_default_na=False, na_values=[""])
    except Exception as exc:  # noqa: BLE001 - pandas raises many types for bad CSVs
        raise DataError(f"{path} is not a readable CSV file: {exc}") from exc


def run_record(row) -> object:
    """A :class:`~fetalscan.data.Record` for one row of ``predictions.csv``."""
    from fetalscan.data.records import Record

    path = Path(str(row["path"]))
    frame = row.get("frame")
    frame = None if frame is None or (isinstance(frame, float) and math.isnan(frame)) or frame == "" else int(frame)
    label = row.get("label")
    label = None if label is None or (isinstance(label, float) and math.isnan(label)) or label == "" else str(label)
    return Record(path=path, label=label, group=str(row["group"]), name=f"{path.parent.name}/{path.name}", frame=frame)


def _models_for_run(run_dir: Path, model_path, classes, device, has_folds: bool = True):
    """fold -> LoadedModel (or one given model for every row), and a description of it."""
    from fetalscan.models.checkpoint import load_checkpoint

    if model_path is not None:
        loaded = load_checkpoint(model_path, device)
        if list(loaded.classes) != list(classes):
            raise FetalscanError(f"--model {model_path} has classes {loaded.classes} but the run "
                                 f"{run_dir} has {list(classes)}; use the model trained with the same data")
        if has_folds:
            info = {"source": f"final model {model_path}", "held_out": False,
                    "origin": "final model (image in its training data)",
                    "note": "Heatmaps come from the final model, whose training data include these images: "
                            "a true positive here is not a held-out success."}
        else:
            info = {"source": f"model {model_path}", "held_out": None, "origin": "the given model",
                    "note": "Heatmaps come from the given model; these predictions have no cross-validation "
                            "folds (e.g. an external validation), so whether an image was in the model's "
                            "training data cannot be told from the run folder."}
        return (lambda fold: loaded), info
    if not has_folds:
        raise FetalscanError(f"{run_dir}/predictions.csv has no folds (not a `fetalscan cv` run); pass --model "
                             "with the checkpoint that made these predictions")
    from functools import lru_cache

    from fetalscan.models.checkpoint import load_fold_model

    @lru_cache(maxsize=4)
    def model_of(fold: int):
        loaded = load_fold_model(run_dir, int(fold), device)
        if list(loaded.classes) != list(classes):
            raise FetalscanError(f"{run_dir}: fold {fold} model has classes {loaded.classes}, the predictions "
                                 f"have {list(classes)}")
        return loaded

    info = {"source": "fold models saved by `fetalscan cv` (fold_models/)", "held_out": True,
            "origin": "fold {fold} model (image held out)",
            "note": "Each heatmap comes from the fold model that held the image out."}
    return (lambda fold: model_of(int(fold))), info


def explain_run(run_dir: str | Path, cfg: ExplainConfig | None = None, fcfg=None, *,
                model_path: str | Path | None = None, per_kind: int = 1, out: str | Path | None = None,
                overwrite: bool = False, device: torch.device | str = "cpu") -> dict:
    """Gallery and faithfulness of a CV run folder -> ``RUN/explain/``.

    Parameters
    ----------
    run_dir : path
        Folder written by ``fetalscan cv`` (``predictions.csv``, ``metrics.json`` ...).
    cfg : ExplainConfig
        Method and overlay settings of the gallery.
    fcfg : FaithfulnessConfig or None
        ``None`` skips the faithfulness measurement.
    model_path : path, optional
        A checkpoint to explain with instead of the re-trained fold models (required
        for fine-tuned runs). Its training data include the run's images, which
        every gallery item then says.
    per_kind : int
        Images per class and kind (TP, FP, FN) in the gallery.
    out : path, optional
        Output folder (default ``RUN/explain``).

    Returns
    -------
    dict
        ``{"out", "gallery", "faithfulness", "models"}``; ``gallery.json`` and
        ``faithfulness.json`` (formats agreed with :mod:`fetalscan.report`) are written.
    """
    from fetalscan.fileio import prepare_out_dir, write_json
    from fetalscan.inference.tables import classes_from_columns

    cfg = cfg or ExplainConfig()
    cfg.validate()
    run_dir = Path(run_dir)
    preds = _read_csv(run_dir / "predictions.csv")
    classes = classes_from_columns(preds.columns)
    if not classes:
        raise DataError(f"{run_dir / 'predictions.csv'} has no p_<class> columns after 'pred'")
    if fcfg is not None:
        fcfg.validate()
    out = prepare_out_dir(Path(out) if out else run_dir / "explain", overwrite)
    device = torch.device(device)
    has_folds = "fold" in preds.columns and preds["fold"].notna().any()
    model_of, info = _models_for_run(run_dir, model_path, classes, device, has_folds)
    gallery = _write_gallery(run_dir, out, preds, classes, cfg, per_kind, model_of, info, device)
    write_json(out / "gallery.json", gallery)
    faith = None
    if fcfg is not None:
        faith = _run_faithfulness(run_dir, out, preds, fcfg, cfg, model_of, info, device)
    return {"out": str(out), "gallery": gallery, "faithfulness": faith, "models": info}


def _write_gallery(run_dir, out, preds, classes, cfg, per_kind, model_of, info, device) -> list[dict]:
    import os

    picks = select_gallery(preds, classes, per_kind)
    folder = out / "gallery"
    items = []
    for n, pick in enumerate(picks, start=1):
        row = preds.loc[pick["row"]]
        rec = run_record(row)
        fold = row.get("fold")
        loaded = model_of(fold)
        from fetalscan.data.records import read_record_image

        image = read_record_image(rec)
        exp = explain_arrays(loaded, [image], cfg, device)[0]
        origin = info["origin"].format(fold=fold if fold is None or fold != fold else int(fold))
        stem = f"{n:02d}_{pick['kind']}_{safe_stem(pick['class'])}_{safe_stem(Path(rec.image_id).name)}"
        original = row.get("label_original")
        shown = rec.label or ""
        if isinstance(original, str) and original and original != shown:
            shown = f"{shown} ({original})"
        title = (f"{pick['kind']} for {pick['class']}: p({pick['class']}) = {pick['prob']:.2f} in the run | "
                 f"{origin}")
        paths = write_image_outputs(folder, stem, image, exp, cfg, title, describe(exp, shown))
        items.append({
            "class": pick["class"], "kind": pick["kind"], "path": str(rec.path),
            "overlay": os.path.relpath(paths["overlay"], run_dir), "prob": pick["prob"],
            "label": rec.label or "", "pred": str(row["pred"]), "method": cfg.method,
            "label_original": original if isinstance(original, str) else "",
            "panel": os.path.relpath(paths["panel"], run_dir), "target": exp.target,
            "group": rec.group, "frame": rec.frame, "fold": None if fold is None or fold != fold else int(fold),
            "model": origin, "layer": exp.layer,
            "also": [f"{a['kind']} for {a['class']} (p({a['class']}) = {a['prob']:.2f})" for a in pick.get("also", [])],
        })
    return items


def _run_faithfulness(run_dir, out, preds, fcfg, cfg, model_of, info, device) -> dict:
    from fetalscan.explain.faithfulness import (
        Unit,
        evaluate_faithfulness,
        sample_rows,
        write_faithfulness,
    )
    from fetalscan.fileio import provenance

    rows = sample_rows(preds, fcfg.n_images, fcfg.seed)
    by_fold: dict = {}
    for r in rows:
        fold = preds.loc[r].get("fold")
        key = None if fold is None or fold != fold else int(fold)
        by_fold.setdefault(key, []).append(run_record(preds.loc[r]))
    units = []
    for fold, recs in sorted(by_fold.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)):
        name = f"fold {fold} model" if info.get("held_out") else info["source"]
        units.append(Unit(model_of(fold), recs, name, cfg.layer))
    result = evaluate_faithfulness(units, fcfg, device)
    result["notes"].insert(0, info["note"])
    result["models"] = info
    result["disclaimer"] = DISCLAIMER
    result["provenance"] = provenance(fcfg.seed, run=str(run_dir), device=str(device))
    return write_faithfulness(out, result)
