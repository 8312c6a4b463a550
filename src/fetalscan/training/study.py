"""The study design end to end: grouped cross-validation and the final model.

``run_cv``: rare-class policy -> decode images once -> folds + inner splits ->
leakage audit (refuses to train on failure) -> one model per fold, early-stopped
on its inner split -> out-of-fold predictions -> image- and patient-level metrics.

``run_train``: the same on all data, with an inner split for early stopping,
written to ``model.pt``.

Run folder of ``run_cv``::

    predictions.csv            out-of-fold image-level predictions (the contract)
    patients.csv               the same aggregated per group
    inner_val_predictions.csv  each fold's model on its own inner-validation groups
                               (for calibration / thresholds chosen without test data)
    folds.csv                  group -> fold
    audit.json                 leakage audit
    metrics.json               metrics + configuration + provenance
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fetalscan.data.records import Dataset, prepare_images
from fetalscan.errors import FetalscanError, SplitError
from fetalscan.evaluation.calibration_analysis import final_model_calibration
from fetalscan.evaluation.metrics import metrics_from_frame
from fetalscan.fileio import (
    check_out_dir,
    prepare_out_dir,
    provenance,
    write_csv,
    write_json,
)
from fetalscan.inference.predict import (
    compute_embeddings,
    predict_logits,
    softmax_with_temperature,
)
from fetalscan.inference.tables import (
    AGGREGATIONS,
    aggregate_groups,
    predictions_frame,
    write_prediction_files,
)
from fetalscan.models.checkpoint import (
    LoadedModel,
    architecture_of,
    save_checkpoint,
    save_loaded,
)
from fetalscan.models.registry import get_backbone_spec, set_head
from fetalscan.runtime import resolve_device, seed_everything
from fetalscan.splits import (
    PHASH_THRESHOLD,
    Fold,
    apply_rare_class_policy,
    audit_folds,
    final_split,
    hamming_pairs,
    make_folds,
    merge_near_duplicate_groups,
    min_groups_required,
    raise_if_failed,
)
from fetalscan.texts import DISCLAIMER
from fetalscan.training.loop import (
    FitResult,
    TrainConfig,
    fit_finetune,
    fit_head,
    freeze_backbone,
    new_model,
)

log = logging.getLogger(__name__)




@dataclass
class CVConfig:
    """How the data are split and read out; the CLI maps its flags 1:1 onto these."""

    scheme: str = "kfold"  # "kfold" (stratified group k-fold) or "logo"
    folds: int = 5
    rare_classes: str = "merge"  # "error" | "merge" | "drop"
    merged_name: str = "other"
    near_duplicates: str = "error"  # "error" | "merge"
    phash_threshold: int = PHASH_THRESHOLD
    aggregate: str = "mean"
    normal_class: str = "normal"
    save_fold_models: str = "auto"  # "auto" | "yes" | "no"

    def validate(self) -> None:
        if self.scheme not in ("kfold", "logo"):
            raise FetalscanError(f"scheme must be 'kfold' or 'logo', got {self.scheme!r}")
        if self.near_duplicates not in ("error", "merge"):
            raise FetalscanError(f"near_duplicates must be 'error' or 'merge', got {self.near_duplicates!r}")
        if self.save_fold_models not in ("auto", "yes", "no"):
            raise FetalscanError(f"save_fold_models must be auto, yes or no, got {self.save_fold_models!r}")
        if self.aggregate not in AGGREGATIONS:
            raise FetalscanError(f"aggregate must be one of {AGGREGATIONS}, got {self.aggregate!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class FoldOutput:
    """Probabilities a fold's model gave its test and inner-validation records."""

    fold: Fold
    test_probs: np.ndarray
    val_probs: np.ndarray
    fit: FitResult
    seconds: float


def _class_map(dataset: Dataset) -> dict[str, str]:
    return {r.label_original: r.label for r in dataset.records
            if r.label_original and r.label and r.label_original != r.label}


def _merge_duplicate_groups(dataset: Dataset, hashes: np.ndarray, threshold: int) -> Dataset:
    pairs = hamming_pairs(hashes, threshold)
    new_groups = merge_near_duplicate_groups(dataset.groups, pairs)
    records = [replace(r, group=g) for r, g in zip(dataset.records, new_groups)]
    merged = Dataset(records, dataset.classes, dataset.source, list(dataset.notes), dict(dataset.loading))
    from fetalscan.data.records import check_group_labels

    try:
        check_group_labels(records, dataset.source)
    except FetalscanError as exc:
        raise SplitError(f"near_duplicates='merge': near-duplicate images carry different labels: {exc}") from None
    n_before, n_after = len(set(dataset.groups)), len(set(new_groups))
    if n_after < n_before:
        merged.notes.append(f"merged the groups of near-duplicate images: {n_before} -> {n_after} groups")
    return merged


def _train_fold(
    fold: Fold, y: np.ndarray, images: torch.Tensor, emb: torch.Tensor | None,
    cfg: TrainConfig, n_classes: int, device: torch.device, seed: int, fixed_epochs: bool = False,
) -> tuple[torch.nn.Module | torch.nn.Sequential, FitResult]:
    """Train one model on ``fold.inner_train`` early-stopped on ``fold.inner_val``.

    Returns the trained head (cached mode) or the whole model (fine-tuning).
    """
    tr, va = fold.inner_train, fold.inner_val
    if cfg.mode == "cached":
        if emb is None:
            raise FetalscanError("cached mode needs the embeddings of the images (emb)")
        return fit_head(emb[tr], y[tr], emb[va], y[va], n_classes, cfg, seed)
    seed_everything(seed)
    model = new_model(cfg, n_classes)
    pre = get_backbone_spec(cfg.backbone).preprocessing
    fit = fit_finetune(model, pre, images[tr], y[tr], images[va], y[va], n_classes, cfg, device, seed,
                       fixed_epochs=fixed_epochs)
    return model, fit


def _fold_probs(trained, idx: np.ndarray, images: torch.Tensor, emb: torch.Tensor | None,
                cfg: TrainConfig, device: torch.device) -> np.ndarray:
    if len(idx) == 0:
        return np.zeros((0, 0))
    if cfg.mode == "cached":
        with torch.inference_mode():
            logits = trained(emb[idx])
    else:
        pre = get_backbone_spec(cfg.backbone).preprocessing
        logits = predict_logits(trained, images[idx], pre, device, cfg.batch_size * 2, cfg.amp)
    return softmax_with_temperature(logits)


def _frozen_backbone(cfg: TrainConfig, n_classes: int, device: torch.device) -> torch.nn.Module:
    model = new_model(cfg, n_classes).to(device)
    freeze_backbone(model)
    return model


def embed_dataset(images: torch.Tensor, cfg: TrainConfig, n_classes: int,
                  device: torch.device) -> tuple[torch.nn.Module, torch.Tensor]:
    """The frozen backbone of the cached mode and every image's embedding, computed once."""
    seed_everything(cfg.seed)
    backbone = _frozen_backbone(cfg, n_classes, device)
    pre = get_backbone_spec(cfg.backbone).preprocessing
    return backbone, compute_embeddings(backbone, images, pre, device, cfg.batch_size * 2, cfg.amp)


def cross_validate_folds(
    dataset: Dataset, images: torch.Tensor, folds: list[Fold], cfg: TrainConfig,
    device: torch.device, fixed_epochs: bool = False, emb: torch.Tensor | None = None,
    on_fold: Callable[[Fold, torch.nn.Module], None] | None = None,
) -> list[FoldOutput]:
    """Train and read out every fold; embeddings are computed once in cached mode.

    ``on_fold(fold, trained)`` receives each fold's trained head (cached mode) or
    model (fine-tuning) as soon as it exists, e.g. to save it; it is not kept.
    """
    from fetalscan.progress import track

    y = dataset.y
    n = len(dataset.classes)
    if cfg.mode == "cached" and emb is None:
        _, emb = embed_dataset(images, cfg, n, device)
    outputs = []
    for fold in track(folds, "cross-validation folds", total=len(folds)):
        t0 = time.perf_counter()
        seed = cfg.seed + fold.index
        trained, fit = _train_fold(fold, y, images, emb, cfg, n, device, seed, fixed_epochs)
        outputs.append(FoldOutput(
            fold,
            _fold_probs(trained, fold.test, images, emb, cfg, device),
            _fold_probs(trained, fold.inner_val, images, emb, cfg, device),
            fit,
            time.perf_counter() - t0,
        ))
        if on_fold is not None:
            on_fold(fold, trained)
        log.info("fold %d: best epoch %d, inner-val loss %.4f", fold.index, fit.best_epoch, fit.best_val_loss)
    return outputs


def _fold_model_saver(out: Path, dataset: Dataset, cfg: TrainConfig, cv: CVConfig, n_folds: int):
    """``(on_fold, finish)`` that save each fold's model into ``RUN/fold_models/``, or ``(None, noop)``.

    ``auto`` saves cached-mode folds always (one backbone + a small head per fold)
    and fine-tuned folds (a full checkpoint each) only for up to 10 folds.
    """
    from fetalscan.models.checkpoint import (
        fold_checkpoint_path,
        save_cached_fold_models,
    )

    want = cv.save_fold_models == "yes" or (
        cv.save_fold_models == "auto" and (cfg.mode == "cached" or n_folds <= 10))
    if not want:
        return None, lambda backbone=None: None
    classes, n = dataset.classes, len(dataset.classes)
    pre = get_backbone_spec(cfg.backbone).preprocessing
    heads: dict[int, dict] = {}

    def on_fold(fold: Fold, trained: torch.nn.Module) -> None:
        if cfg.mode == "cached":
            heads[fold.index] = trained.state_dict()
        else:
            save_checkpoint(fold_checkpoint_path(out, fold.index), trained, classes=classes,
                            architecture=architecture_of(cfg, n), preprocessing=pre,
                            training={"config": cfg.to_dict(), "fold": fold.index},
                            class_map=_class_map(dataset))

    def finish(backbone: torch.nn.Module | None = None) -> None:
        if cfg.mode == "cached" and backbone is not None:
            save_cached_fold_models(out, backbone, heads, classes=classes, architecture=architecture_of(cfg, n),
                                    preprocessing=pre, class_map=_class_map(dataset))

    return on_fold, finish


def _load_and_audit(dataset: Dataset, cfg: TrainConfig, cv: CVConfig, out: Path | None,
                    final: bool) -> tuple[Dataset, torch.Tensor, list[Fold], dict]:
    """Decode images, build folds (or the final split), audit, write ``audit.json`` (when ``out``)."""
    pre = get_backbone_spec(cfg.backbone).preprocessing
    images, hashes = prepare_images(dataset.records, pre, with_hashes=True)
    if cv.near_duplicates == "merge":
        dataset = _merge_duplicate_groups(dataset, hashes, cv.phash_threshold)
    labels, groups = dataset.labels, dataset.groups
    if final:
        folds = [final_split(labels, groups, cfg.val_fraction, cfg.seed)]
    else:
        folds = make_folds(labels, groups, cv.scheme, cv.folds, cfg.seed, cfg.val_fraction)
    report = audit_folds(folds, labels, groups, [r.image_id for r in dataset.records], hashes,
                         cv.phash_threshold)
    if out is not None:
        prepare_out_dir(out, overwrite=True)  # checked at the start of the run; created only now
        write_json(out / "audit.json", report.to_dict())
    raise_if_failed(report, str(out / "audit.json") if out is not None else "the leakage audit")
    return dataset, images, folds, report.to_dict()


@dataclass
class CVResult:
    """The tables of a cross-validation, as ``run_cv`` writes them into the run folder.

    ``predictions`` (``predictions.csv``, out-of-fold, one row per image), ``patients``
    (``patients.csv``), ``inner_val`` (``inner_val_predictions.csv``), ``folds``
    (``folds.csv``: group -> fold), ``audit`` (``audit.json``) and ``metrics`` (the
    first ``metrics.json``, before the evaluation adds CIs and the report's blocks).
    """

    predictions: pd.DataFrame
    patients: pd.DataFrame
    inner_val: pd.DataFrame
    folds: pd.DataFrame
    audit: dict
    metrics: dict
    classes: list[str]
    out: Path | None = None


def run_cv(dataset: Dataset, cfg: TrainConfig, cv: CVConfig, out: str | Path | None = None,
           overwrite: bool = False) -> CVResult:
    """Grouped cross-validation: out-of-fold predictions of every image, never seen by its fold's model.

    With ``out`` the run folder is written (``predictions.csv``, ``patients.csv``,
    ``inner_val_predictions.csv``, ``folds.csv``, ``audit.json``, ``metrics.json`` and
    ``fold_models/``); the evaluation report is added by
    :func:`fetalscan.report.runs.evaluate_run`. Without ``out`` nothing is written and
    no fold model is kept.
    """
    cfg.validate()
    cv.validate()
    out = check_out_dir(out, overwrite) if out is not None else None
    t0 = time.perf_counter()
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    dataset = apply_rare_class_policy(dataset, min_groups_required(cv.scheme, cv.folds), cv.rare_classes,
                                      cv.merged_name)
    dataset, images, folds, audit = _load_and_audit(dataset, cfg, cv, out, final=False)
    backbone, emb = (embed_dataset(images, cfg, len(dataset.classes), device) if cfg.mode == "cached"
                     else (None, None))
    on_fold, finish = (_fold_model_saver(out, dataset, cfg, cv, len(folds)) if out is not None
                       else (None, lambda backbone=None: None))
    outputs = cross_validate_folds(dataset, images, folds, cfg, device, emb=emb, on_fold=on_fold)
    finish(backbone)

    classes = dataset.classes
    test_parts, val_parts = [], []
    for o in outputs:
        recs = [dataset.records[i] for i in o.fold.test]
        test_parts.append(predictions_frame(recs, o.test_probs, classes, o.fold.index))
        vrecs = [dataset.records[i] for i in o.fold.inner_val]
        val_parts.append(predictions_frame(vrecs, o.val_probs, classes, o.fold.index))
    preds = pd.concat(test_parts, ignore_index=True).sort_values(["fold", "group", "path", "frame"], kind="stable")
    inner = pd.concat(val_parts, ignore_index=True)
    patients = aggregate_groups(preds, classes, cv.aggregate, cv.normal_class)

    metrics = {
        "disclaimer": DISCLAIMER,
        "task": {"classes": classes, "class_map": _class_map(dataset), "notes": dataset.notes},
        "data": {"source": dataset.source, **dataset.summary(), "loading": dataset.loading},
        "cv": {**cv.to_dict(), "n_folds_run": len(folds), "val_fraction": cfg.val_fraction},
        "training": cfg.to_dict(),
        "image_level": metrics_from_frame(preds, classes),
        "patient_level": metrics_from_frame(patients, classes),
        "patient_level_by_aggregation": _all_aggregations(preds, classes, cv.normal_class),
        "folds": [{"fold": o.fold.index, "n_test": int(len(o.fold.test)), "n_inner_val": int(len(o.fold.inner_val)),
                   "best_epoch": o.fit.best_epoch, "inner_val_loss": o.fit.best_val_loss,
                   "epochs_run": o.fit.epochs_run, "seconds": round(o.seconds, 3)} for o in outputs],
        "audit": {"passed": audit["passed"], "near_duplicate_pairs": len(audit["near_duplicate_pairs"]),
                  "warnings": audit["warnings"]},
        "seconds": round(time.perf_counter() - t0, 2),
        "provenance": provenance(cfg.seed, dataset.data_hash(), device=str(device)),
    }
    folds_table = pd.DataFrame(
        sorted({(r.group, o.fold.index) for o in outputs for r in (dataset.records[i] for i in o.fold.test)}),
        columns=["group", "fold"])
    if out is not None:
        write_csv(out / "folds.csv", folds_table)
        write_csv(out / "inner_val_predictions.csv", inner)
        write_prediction_files(out, preds, patients)
        write_json(out / "metrics.json", metrics)
    return CVResult(preds, patients, inner, folds_table, audit, metrics, list(classes), out)


def _all_aggregations(preds: pd.DataFrame, classes: list[str], normal_class: str) -> dict:
    out = {}
    for method in AGGREGATIONS:
        if method == "max_abnormal" and normal_class not in classes:
            continue
        out[method] = metrics_from_frame(aggregate_groups(preds, classes, method, normal_class), classes)
    return out


@dataclass
class FinalModel:
    """A final model trained on all data, ready to predict and to be saved as one checkpoint."""

    loaded: LoadedModel
    inner_val: pd.DataFrame
    audit: dict
    summary: dict


def fit_final(dataset: Dataset, cfg: TrainConfig, cv: CVConfig, out: Path | None = None) -> FinalModel:
    """Train the final model on all data, early-stopped on an inner split of its groups.

    The classes follow the same rare-class policy as cross-validation (so the final
    model has the classes CV evaluated); temperature and screening thresholds are
    fitted on the inner-validation groups only. With ``out``, ``audit.json`` is written there.
    """
    cfg.validate()
    cv.validate()
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    dataset = apply_rare_class_policy(dataset, min_groups_required(cv.scheme, cv.folds), cv.rare_classes,
                                      cv.merged_name)
    dataset, images, folds, audit = _load_and_audit(dataset, cfg, cv, out, final=True)
    fold = folds[0]
    n = len(dataset.classes)
    y = dataset.y
    if cfg.mode == "cached":
        model, emb = embed_dataset(images, cfg, n, device)
        head, fit = fit_head(emb[fold.inner_train], y[fold.inner_train], emb[fold.inner_val], y[fold.inner_val],
                             n, cfg, cfg.seed)
        set_head(model, head.to(device))
        val_probs = _fold_probs(head, fold.inner_val, images, emb, cfg, device)
    else:
        model, fit = _train_fold(fold, y, images, None, cfg, n, device, cfg.seed)
        val_probs = _fold_probs(model, fold.inner_val, images, None, cfg, device)
    model.eval()
    val_df = predictions_frame([dataset.records[i] for i in fold.inner_val], val_probs, dataset.classes)
    calibration = final_model_calibration(val_df, dataset.classes, normal_class=cv.normal_class,
                                          aggregate=cv.aggregate)
    prov = provenance(cfg.seed, dataset.data_hash(), device=str(device), data_source=dataset.source)
    training = {
        "config": cfg.to_dict(),
        "fit": fit.to_dict(),
        "split": {"n_inner_train": int(len(fold.inner_train)), "n_inner_val": int(len(fold.inner_val)),
                  "inner_val_groups": sorted({dataset.records[i].group for i in fold.inner_val})},
        "data": dataset.summary(),
        "notes": dataset.notes,
    }
    meta = {"training": training, "provenance": prov, "class_map": _class_map(dataset), "calibration": calibration}
    loaded = LoadedModel(model, list(dataset.classes), get_backbone_spec(cfg.backbone).preprocessing,
                         architecture_of(cfg, n), meta)
    summary = {"classes": dataset.classes, "best_epoch": fit.best_epoch,
               "inner_val_loss": fit.best_val_loss, "epochs_run": fit.epochs_run,
               "audit_passed": audit["passed"], "notes": dataset.notes, "calibration": calibration,
               "provenance": prov}
    return FinalModel(loaded, val_df, audit, summary)


def run_train(dataset: Dataset, cfg: TrainConfig, cv: CVConfig, out: str | Path, overwrite: bool = False) -> dict:
    """Train the final model on all data (:func:`fit_final`) and write ``out/model.pt``,
    ``inner_val_predictions.csv``, ``audit.json`` and ``train.json``; returns the summary."""
    out = check_out_dir(out, overwrite)
    final = fit_final(dataset, cfg, cv, out)
    write_csv(out / "inner_val_predictions.csv", final.inner_val)
    path = save_loaded(out / "model.pt", final.loaded)
    summary = {"model": str(path), **final.summary}
    write_json(out / "train.json", summary)
    return summary
