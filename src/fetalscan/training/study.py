"""The study design end to end: grouped cross-validation and the final model.

``run_cv``: rare-class policy -> decode images once -> folds + inner splits ->
leakage audit (refuses to train on failure) -> one model per fold, its head's
regularisation (C or epoch count) chosen by an inner grouped CV on the fold's
training groups (:mod:`fetalscan.training.selection`) -> out-of-fold predictions ->
image- and patient-level metrics -> the linear-probe baseline on the same folds ->
with ``repeats`` > 1, the whole split again with other seeds (mean and spread).

``run_train``: the same selection over all data, then one refit (or the ensemble
of the inner-fold models), written to ``model.pt``.

Run folder of ``run_cv``::

    predictions.csv            out-of-fold image-level predictions (the contract)
    patients.csv               the same aggregated per group
    inner_val_predictions.csv  held-out predictions of each fold's inner CV on its training
                               groups (for calibration / thresholds chosen without test data)
    baseline_predictions.csv   the linear-probe baseline's out-of-fold predictions (same folds)
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
from fetalscan.evaluation.baseline import BASELINE_FILE
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
from fetalscan.training import distributed
from fetalscan.training.loop import (
    FitResult,
    TrainConfig,
    freeze_backbone,
    new_model,
)
from fetalscan.training.selection import (
    HeadFit,
    fit_cached_head,
    fit_finetuned,
    is_linear_probe,
    linear_probe_config,
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
    repeats: int = 1  # grouped k-fold rerun with seeds seed, seed+1, ...; mean and spread reported
    baseline: bool = True  # the linear-probe baseline on the same folds (logreg on frozen embeddings)

    def validate(self) -> None:
        if self.scheme not in ("kfold", "logo"):
            raise FetalscanError(f"scheme must be 'kfold' or 'logo', got {self.scheme!r}")
        if self.near_duplicates not in ("error", "merge"):
            raise FetalscanError(f"near_duplicates must be 'error' or 'merge', got {self.near_duplicates!r}")
        if self.save_fold_models not in ("auto", "yes", "no"):
            raise FetalscanError(f"save_fold_models must be auto, yes or no, got {self.save_fold_models!r}")
        if self.aggregate not in AGGREGATIONS:
            raise FetalscanError(f"aggregate must be one of {AGGREGATIONS}, got {self.aggregate!r}")
        if self.repeats < 1:
            raise FetalscanError(f"repeats must be >= 1, got {self.repeats}")
        if self.repeats > 1 and self.scheme != "kfold":
            raise FetalscanError("repeats > 1 needs scheme='kfold': leave-one-group-out has a single split, "
                                 "so every repeat would be the same")

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
    val_idx: np.ndarray | None = None  # records of val_probs (None: fold.inner_val)

    @property
    def held_out(self) -> np.ndarray:
        """Record indices of ``val_probs``."""
        return self.fold.inner_val if self.val_idx is None else self.val_idx


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
    fold: Fold, dataset: Dataset, images: torch.Tensor, emb: torch.Tensor | None,
    cfg: TrainConfig, n_classes: int, device: torch.device, seed: int, fixed_epochs: bool = False,
) -> HeadFit:
    """Train one model on ``fold``'s training groups (its test records are never read).

    Its hyper-parameter is chosen by an inner grouped CV over those groups
    (:mod:`fetalscan.training.selection`). Returns the trained head (cached mode) or
    the whole model (fine-tuning) with the inner CV's held-out predictions.
    """
    y, labels, groups = dataset.y, dataset.labels, dataset.groups
    if cfg.mode == "cached":
        if emb is None:
            raise FetalscanError("cached mode needs the embeddings of the images (emb)")
        return fit_cached_head(emb, y, labels, groups, fold, n_classes, cfg, seed)
    return fit_finetuned(images, y, labels, groups, fold, n_classes, cfg, device, seed, fixed_epochs)


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

    n = len(dataset.classes)
    if cfg.mode == "cached" and emb is None:
        _, emb = embed_dataset(images, cfg, n, device)
    outputs = []
    for fold in track(folds, "cross-validation folds", total=len(folds)):
        t0 = time.perf_counter()
        seed = cfg.seed + fold.index
        hf = _train_fold(fold, dataset, images, emb, cfg, n, device, seed, fixed_epochs)
        outputs.append(FoldOutput(
            fold,
            _fold_probs(hf.module, fold.test, images, emb, cfg, device),
            hf.val_probs,
            hf.fit,
            time.perf_counter() - t0,
            hf.val_idx,
        ))
        if on_fold is not None:
            on_fold(fold, hf.module)
        log.info("fold %d: %s = %s (%s)", fold.index, hf.fit.selection.get("parameter"),
                 hf.fit.selection.get("chosen"), hf.fit.selection.get("method"))
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
                    final: bool) -> tuple[Dataset, torch.Tensor, list[Fold], dict, np.ndarray]:
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
    return dataset, images, folds, report.to_dict(), hashes


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
    baseline: pd.DataFrame | None = None  # the linear-probe baseline's out-of-fold predictions


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
    # in a DDP process group (fetalscan.training.distributed) every rank trains, rank 0 alone writes
    out = check_out_dir(out, overwrite) if out is not None and distributed.is_main() else None
    t0 = time.perf_counter()
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    dataset = apply_rare_class_policy(dataset, min_groups_required(cv.scheme, cv.folds), cv.rare_classes,
                                      cv.merged_name)
    dataset, images, folds, audit, hashes = _load_and_audit(dataset, cfg, cv, out, final=False)
    backbone, emb = (embed_dataset(images, cfg, len(dataset.classes), device) if cfg.mode == "cached"
                     else (None, None))
    on_fold, finish = (_fold_model_saver(out, dataset, cfg, cv, len(folds)) if out is not None
                       else (None, lambda backbone=None: None))
    outputs = cross_validate_folds(dataset, images, folds, cfg, device, emb=emb, on_fold=on_fold)
    finish(backbone)

    classes = dataset.classes
    preds, inner = _oof_frames(dataset, outputs)
    patients = aggregate_groups(preds, classes, cv.aggregate, cv.normal_class)
    probe = _LinearProbe(dataset, images, cfg, device, emb) if cv.baseline else None
    baseline_preds, baseline_block = None, {"available": False, "note": "switched off (baseline=False)"}
    if probe is not None:
        baseline_preds, baseline_block = probe.run(folds, outputs, preds, cv)
    repeats_block = None
    if cv.repeats > 1:
        repeats_block = _repeat_cv(dataset, images, hashes, cfg, cv, device, emb, probe, patients, baseline_preds)

    metrics = {
        "disclaimer": DISCLAIMER,
        "task": {"classes": classes, "class_map": _class_map(dataset), "notes": dataset.notes},
        "data": {"source": dataset.source, **dataset.summary(), "loading": dataset.loading},
        "cv": {**cv.to_dict(), "n_folds_run": len(folds), "val_fraction": cfg.val_fraction},
        "training": cfg.to_dict(),
        "image_level": metrics_from_frame(preds, classes),
        "patient_level": metrics_from_frame(patients, classes),
        "patient_level_by_aggregation": _all_aggregations(preds, classes, cv.normal_class),
        "folds": [{"fold": o.fold.index, "n_test": int(len(o.fold.test)), "n_inner_val": int(len(o.held_out)),
                   "best_epoch": o.fit.best_epoch, "inner_val_loss": o.fit.best_val_loss,
                   "epochs_run": o.fit.epochs_run, "seconds": round(o.seconds, 3),
                   "selection": o.fit.selection} for o in outputs],
        "baseline": baseline_block,
        "repeats": repeats_block,
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
        if baseline_preds is not None:
            write_csv(out / BASELINE_FILE, baseline_preds)
        write_prediction_files(out, preds, patients)
        write_json(out / "metrics.json", metrics)
    return CVResult(preds, patients, inner, folds_table, audit, metrics, list(classes), out, baseline_preds)


def _oof_frames(dataset: Dataset, outputs: list[FoldOutput]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Out-of-fold test predictions (sorted as ``predictions.csv``) and the held-out inner predictions."""
    classes = dataset.classes
    test_parts, val_parts = [], []
    for o in outputs:
        recs = [dataset.records[i] for i in o.fold.test]
        test_parts.append(predictions_frame(recs, o.test_probs, classes, o.fold.index))
        vrecs = [dataset.records[i] for i in o.held_out]
        val_parts.append(predictions_frame(vrecs, o.val_probs, classes, o.fold.index))
    preds = pd.concat(test_parts, ignore_index=True).sort_values(["fold", "group", "path", "frame"], kind="stable")
    return preds, pd.concat(val_parts, ignore_index=True)


def patient_summary(patients: pd.DataFrame, classes: list[str], normal_class: str = "normal") -> dict:
    """Patient-level macro AUROC, abnormal-vs-normal AUROC (1 - p(normal)), balanced accuracy and accuracy."""
    from fetalscan.evaluation.bootstrap import auroc_with_ci
    from fetalscan.evaluation.metrics import labelled_rows

    m = metrics_from_frame(patients, classes)
    abnormal = None
    if normal_class in classes:
        lab = labelled_rows(patients)
        truth = lab["label"].astype(str).to_numpy() != normal_class
        if 0 < truth.sum() < len(truth):
            abnormal = auroc_with_ci(1 - lab[f"p_{normal_class}"].to_numpy(), truth, lab["group"].astype(str).tolist(),
                                     n_boot=0)["auroc"]
    return {"macro_auroc": m["macro_auroc"], "abnormal_auroc": abnormal, "balanced_accuracy": m["balanced_accuracy"],
            "accuracy": m["accuracy"], "n": m["n"]}


class _LinearProbe:
    """The linear-probe baseline of a cv run: ``logreg`` (C by inner grouped 5-fold CV) on the frozen
    embeddings of the run's backbone, trained under the run's folds. The embeddings are the run's own
    in cached mode, else computed once with the frozen pretrained backbone."""

    def __init__(self, dataset: Dataset, images: torch.Tensor, cfg: TrainConfig, device: torch.device,
                 emb: torch.Tensor | None) -> None:
        self.dataset, self.images, self.cfg, self.device = dataset, images, cfg, device
        self.same = is_linear_probe(cfg)
        self._emb = emb if cfg.mode == "cached" else None

    def emb(self) -> torch.Tensor:
        if self._emb is None:
            _, self._emb = embed_dataset(self.images, linear_probe_config(self.cfg), len(self.dataset.classes),
                                         self.device)
        return self._emb

    def predictions(self, folds: list[Fold], cfg: TrainConfig, outputs: list[FoldOutput] | None = None,
                    preds: pd.DataFrame | None = None) -> tuple[pd.DataFrame, list]:
        """Out-of-fold baseline predictions under ``folds`` and the C chosen in each fold."""
        if self.same and outputs is not None and preds is not None:
            return preds, [o.fit.selection.get("chosen") for o in outputs]
        base = linear_probe_config(cfg)
        outs = cross_validate_folds(self.dataset, self.images, folds, base, self.device, emb=self.emb())
        return _oof_frames(self.dataset, outs)[0], [o.fit.selection.get("chosen") for o in outs]

    def run(self, folds: list[Fold], outputs: list[FoldOutput], preds: pd.DataFrame, cv: CVConfig
            ) -> tuple[pd.DataFrame, dict]:
        from fetalscan.training.selection import C_GRID

        t0 = time.perf_counter()
        base_preds, chosen = self.predictions(folds, self.cfg, outputs, preds)
        classes = self.dataset.classes
        pat = aggregate_groups(base_preds, classes, cv.aggregate, cv.normal_class)
        cfg = self.cfg
        block = {
            "available": True, "name": "linear-probe baseline",
            "recipe": (f"L2 logistic regression, class-balanced, on the standardised frozen {cfg.backbone} "
                       f"({cfg.pretrained}) embeddings; C chosen from {C_GRID[0]:g}..{C_GRID[-1]:g} "
                       f"({len(C_GRID)} values) by an inner grouped 5-fold CV on each fold's training groups; "
                       "the model's folds and patient-level rule"),
            "same_as_model": self.same, "chosen_c": chosen, "predictions": BASELINE_FILE,
            "image_level": {k: v for k, v in metrics_from_frame(base_preds, classes).items()
                            if k in ("n", "accuracy", "balanced_accuracy", "macro_auroc")},
            "patient_level": patient_summary(pat, classes, cv.normal_class),
            "seconds": round(time.perf_counter() - t0, 2),
        }
        return base_preds, block


def _spread(values: list) -> dict:
    v = np.array([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if not len(v):
        return {"mean": None, "sd": None, "min": None, "max": None, "n": 0}
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "min": float(v.min()),
            "max": float(v.max()), "n": int(len(v))}


REPEAT_METRICS = ("macro_auroc", "abnormal_auroc", "balanced_accuracy")


def _repeat_cv(dataset: Dataset, images: torch.Tensor, hashes: np.ndarray, cfg: TrainConfig, cv: CVConfig,
               device: torch.device, emb: torch.Tensor | None, probe: _LinearProbe | None, patients: pd.DataFrame,
               baseline_preds: pd.DataFrame | None) -> dict:
    """Rerun the grouped split with seeds ``seed + 1 .. seed + repeats - 1``; per-repeat patient-level
    figures of the model (and baseline) and their mean, SD and range over all repeats."""
    from fetalscan.progress import track

    classes, labels, groups = dataset.classes, dataset.labels, dataset.groups
    names = [r.image_id for r in dataset.records]

    def summary(frame: pd.DataFrame | None) -> dict | None:
        if frame is None:
            return None
        return patient_summary(aggregate_groups(frame, classes, cv.aggregate, cv.normal_class), classes,
                               cv.normal_class)

    rows = [{"seed": cfg.seed, "model": patient_summary(patients, classes, cv.normal_class),
             "baseline": summary(baseline_preds)}]
    for r in track(range(1, cv.repeats), "repeated cross-validation", total=cv.repeats - 1):
        cfg_r = replace(cfg, seed=cfg.seed + r)
        folds_r = make_folds(labels, groups, cv.scheme, cv.folds, cfg_r.seed, cfg.val_fraction)
        report = audit_folds(folds_r, labels, groups, names, hashes, cv.phash_threshold)
        raise_if_failed(report, f"the leakage audit of repeat seed {cfg_r.seed}")
        outs = cross_validate_folds(dataset, images, folds_r, cfg_r, device, emb=emb)
        preds_r, _ = _oof_frames(dataset, outs)
        base_r = probe.predictions(folds_r, cfg_r, outs, preds_r)[0] if probe is not None else None
        rows.append({"seed": cfg_r.seed, "model": summary(preds_r), "baseline": summary(base_r)})
    out = {"n": cv.repeats, "seeds": [row["seed"] for row in rows], "per_repeat": rows,
           "metrics": list(REPEAT_METRICS), "level": "patient",
           "note": (f"predictions.csv, patients.csv, the report's tables and intervals are those of the first "
                    f"repeat (seed {cfg.seed}); the other repeats only give the spread across splits"),
           "summary": {}}
    for who in ("model", "baseline"):
        if all(row[who] is not None for row in rows):
            out["summary"][who] = {k: _spread([row[who][k] for row in rows]) for k in REPEAT_METRICS}
    return out


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
    """Train the final model on all data.

    Its head's C (or epoch count) is chosen by an inner grouped CV over all the
    groups, then the head is refitted on all of them (or, with ``ensemble`` = k, the
    k inner-fold models are kept and averaged); ``inner_folds=0`` keeps the old
    single inner split with early stopping. The classes follow the same rare-class
    policy as cross-validation (so the final model has the classes CV evaluated);
    temperature and screening thresholds are fitted on the held-out predictions of
    the inner CV (or the inner split) only. With ``out``, ``audit.json`` is written there.
    """
    cfg.validate()
    cv.validate()
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    dataset = apply_rare_class_policy(dataset, min_groups_required(cv.scheme, cv.folds), cv.rare_classes,
                                      cv.merged_name)
    dataset, images, folds, audit, _ = _load_and_audit(dataset, cfg, cv, out, final=True)
    fold = folds[0]
    n = len(dataset.classes)
    if cfg.mode == "cached":
        model, emb = embed_dataset(images, cfg, n, device)
        hf = _train_fold(fold, dataset, images, emb, cfg, n, device, cfg.seed)
        set_head(model, hf.module.to(device))
    else:
        hf = _train_fold(fold, dataset, images, None, cfg, n, device, cfg.seed)
        model = hf.module
    fit = hf.fit
    model.eval()
    val_df = predictions_frame([dataset.records[i] for i in hf.val_idx], hf.val_probs, dataset.classes)
    calibration = final_model_calibration(val_df, dataset.classes, normal_class=cv.normal_class,
                                          aggregate=cv.aggregate)
    prov = provenance(cfg.seed, dataset.data_hash(), device=str(device), data_source=dataset.source)
    training = {
        "config": cfg.to_dict(),
        "fit": fit.to_dict(),
        "split": ({"n_inner_train": int(len(fold.inner_train)), "n_inner_val": int(len(fold.inner_val)),
                   "inner_val_groups": sorted({dataset.records[i].group for i in fold.inner_val})}
                  if cfg.selection_folds == 0 else
                  {"n_train": int(len(fold.train)), "n_train_groups": len(set(dataset.groups)),
                   "inner_folds": fit.selection.get("n_inner_folds"),
                   "calibration_data": "held-out predictions of the inner grouped CV (every training group)"}),
        "data": dataset.summary(),
        "notes": dataset.notes,
    }
    meta = {"training": training, "provenance": prov, "class_map": _class_map(dataset), "calibration": calibration}
    loaded = LoadedModel(model, list(dataset.classes), get_backbone_spec(cfg.backbone).preprocessing,
                         architecture_of(cfg, n), meta)
    summary = {"classes": dataset.classes, "best_epoch": fit.best_epoch,
               "inner_val_loss": fit.best_val_loss, "epochs_run": fit.epochs_run, "selection": fit.selection,
               "audit_passed": audit["passed"], "notes": dataset.notes, "calibration": calibration,
               "provenance": prov}
    return FinalModel(loaded, val_df, audit, summary)


def run_train(dataset: Dataset, cfg: TrainConfig, cv: CVConfig, out: str | Path, overwrite: bool = False) -> dict:
    """Train the final model on all data (:func:`fit_final`) and write ``out/model.pt``,
    ``inner_val_predictions.csv``, ``audit.json`` and ``train.json``; returns the summary.
    In a DDP process group every rank trains and rank 0 alone writes."""
    if not distributed.is_main():
        return {"model": None, **fit_final(dataset, cfg, cv, None).summary}
    out = check_out_dir(out, overwrite)
    final = fit_final(dataset, cfg, cv, out)
    write_csv(out / "inner_val_predictions.csv", final.inner_val)
    path = save_loaded(out / "model.pt", final.loaded)
    summary = {"model": str(path), **final.summary}
    write_json(out / "train.json", summary)
    return summary
