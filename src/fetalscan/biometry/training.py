"""Training, grouped cross-validation and HC18-style evaluation of the head segmenter.

Data: a manifest with columns ``image,mask,exam,pixel_size_mm,hc_mm`` (the shared
HC18 layout; ``path`` is accepted for ``image``, ``group`` for ``exam`` and
``pixel_spacing_mm`` for ``pixel_size_mm``). Images of one exam stay on one side
of every split.

Protocol
--------
- **Splits** come from :mod:`fetalscan.splits`: exams are the groups, stratified
  on the exam's head-size tertile (mean ``hc_mm``), so every fold spans all
  trimesters; each training set holds an inner-validation split of exams.
- **Training** (:func:`fit_segmenter`): BCE + soft Dice loss on the head mask at
  the reduced input size, AdamW with a cosine schedule, joint geometric
  augmentation of image and mask and intensity augmentation of the image
  (:class:`fetalscan.transforms.Augment`). After each epoch the inner-validation
  images are measured at full resolution; the epoch with the lowest
  inner-validation mean absolute HC difference is kept (early stopping with
  ``patience``). The test exams are never looked at.
- **Calibration**: the HC18 masks are drawn so that the reference ellipse lies
  about 1.4 pixels inside the mask's outer edge; the segmenter learns that
  drawing. The constant ``axis_offset_px`` added to both semi-axes is the median
  over the inner-validation images of the offset that makes the predicted HC
  equal the reference (1 parameter, inner validation only).
- **Evaluation** (:func:`evaluate_segmenter`) scores it the way HC18 does
  (van den Heuvel et al. 2018): Dice and Hausdorff distance between the filled
  fitted ellipse and the reference mask, and the signed and absolute HC
  difference in mm, as mean +/- SD, with 95 % bootstrap intervals that resample
  exams. The raw segmentation Dice and the HC error of the same ellipse fit on
  the *reference* masks (measurement error alone) are reported beside them.

Reference
---------
van den Heuvel TLA, de Bruijn D, de Korte CL, van Ginneken B. Automated
measurement of fetal head circumference using 2D ultrasound images. PLoS ONE
2018;13(8):e0200412.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from fetalscan.biometry.geometry import (
    fit_head_ellipse,
    ramanujan_perimeter,
)
from fetalscan.biometry.scoring import (
    DISCLAIMER,
    HC18_REFERENCE,
    LIMITATIONS,
    METRIC_DEFINITIONS,
    BiometryScores,
    evaluate_segmenter,
    manifest_hash,
    summarise,
)
from fetalscan.biometry.segmenter import HeadSegmenter, upsample_logits
from fetalscan.data.hc18 import BiometryItem, read_mask
from fetalscan.errors import FetalscanError, SplitError
from fetalscan.models.segmenters import SegmenterConfig, build_segmenter, save_segmenter

log = logging.getLogger(__name__)








@dataclass
class BiometryTrainConfig:
    """Every knob of segmenter training; the CLI maps its flags 1:1 onto these fields.

    The defaults are the recipe chosen by inner-validation HC error in the ablation of
    ``docs/biometry.md`` (``benchmarks/biometry_ablation.py``): the SonoNet-16 trunk with its
    bundled in-domain weights as the U-Net encoder, at 192 x 288.
    """

    encoder: str = "sononet16"
    decoder_channels: str = "64,32,24,16,16"
    input_height: int = 192
    input_width: int = 288
    pretrained: str = "sononet"
    epochs: int = 25
    batch_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 1e-4
    patience: int = 6
    augment: bool = True
    rotate_deg: float = 20.0
    val_fraction: float = 0.15
    seed: int = 0
    device: str = "auto"

    def segmenter(self) -> SegmenterConfig:
        return SegmenterConfig(self.encoder, self.decoder_channels, self.input_height, self.input_width,
                               self.pretrained)

    def validate(self) -> None:
        self.segmenter().validate()
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise FetalscanError(f"--{name.replace('_', '-')} must be >= 1")
        if self.batch_size < 2:
            raise FetalscanError("--batch-size must be >= 2 (batch norm)")
        if not 0.0 < self.val_fraction < 1.0:
            raise FetalscanError(f"--val-fraction must be between 0 and 1, got {self.val_fraction}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PreparedSet:
    """Images and masks decoded once, at the network input size, plus what measuring needs."""

    items: list[BiometryItem]
    images: object  # torch uint8 (N, 1, h, w)
    masks: object  # torch uint8 (N, 1, h, w), 0-255 (soft after resizing)
    shapes: list[tuple[int, int]]  # original (H, W)
    ref_perimeter_px: np.ndarray  # reference HC in pixels (hc_mm / pixel size, else mask fit)
    mask_ellipses: list  # ellipse fitted to each reference mask (no offset), None if no head

    def subset(self, idx: Sequence[int]) -> PreparedSet:
        idx = list(map(int, idx))
        return PreparedSet([self.items[i] for i in idx], self.images[idx], self.masks[idx],
                           [self.shapes[i] for i in idx], self.ref_perimeter_px[idx],
                           [self.mask_ellipses[i] for i in idx])


def prepare_set(items: Sequence[BiometryItem], cfg: SegmenterConfig) -> PreparedSet:
    """Decode every image and mask once, check the mask sizes, resize both for the network."""
    import torch

    from fetalscan.data.records import read_image
    from fetalscan.data.transforms import prepare
    from fetalscan.progress import track

    pre = cfg.preprocessing()
    h, w = pre.input_size
    n = len(items)
    images = torch.empty((n, 1, h, w), dtype=torch.uint8)
    masks = torch.empty((n, 1, h, w), dtype=torch.uint8)
    shapes, ref, ellipses = [], np.full(n, np.nan), []
    for i, item in enumerate(track(items, "reading images and masks", total=n)):
        img = read_image(item.image)
        mask = read_mask(item, img.shape[:2])
        images[i] = prepare(img, pre)
        masks[i] = prepare(np.repeat((mask.astype(np.uint8) * 255)[..., None], 3, axis=2), pre)
        shapes.append(img.shape[:2])
        fit = fit_head_ellipse(mask)
        ellipses.append(fit.ellipse if fit.found else None)
        if item.hc_mm is not None and item.pixel_size_mm is not None:
            ref[i] = item.hc_mm / item.pixel_size_mm
        elif fit.found and fit.ellipse is not None:
            ref[i] = fit.ellipse.perimeter()
    return PreparedSet(list(items), images, masks, shapes, ref, ellipses)


def perimeter_offset(semi_major: float, semi_minor: float, target_perimeter: float) -> float:
    """The ``delta`` (px) with ``perimeter(a + delta, b + delta) == target`` (Newton, 4 steps)."""

    def p(d: float) -> float:
        return ramanujan_perimeter(max(semi_major + d, 0.0), max(semi_minor + d, 0.0))

    d = 0.0
    for _ in range(4):
        slope = (p(d + 0.5) - p(d)) / 0.5
        if slope <= 0:
            break
        d += (target_perimeter - p(d)) / slope
    return d


def calibrate_axis_offset(ellipses: Sequence, ref_perimeter_px: np.ndarray) -> dict:
    """Median per-image axis offset (px) that makes the fitted ellipses match the reference HC.

    ``ellipses`` holds fitted :class:`~fetalscan.biometry.Ellipse` objects or None
    (no head found, skipped). Returns ``{"axis_offset_px", "n", "iqr_px"}``.
    """
    deltas = [perimeter_offset(e.semi_major, e.semi_minor, r)
              for e, r in zip(ellipses, ref_perimeter_px) if e is not None and np.isfinite(r)]
    if not deltas:
        return {"axis_offset_px": 0.0, "n": 0, "iqr_px": None}
    q1, med, q3 = np.percentile(deltas, [25, 50, 75])
    return {"axis_offset_px": float(med), "n": len(deltas), "iqr_px": float(q3 - q1)}


@dataclass
class SegFitResult:
    """What one training produced (the model is returned beside it)."""

    best_epoch: int
    best_val_hc_abs_diff_mm: float
    epochs_run: int
    calibration: dict
    seconds: float
    history: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _loss(logits, target):
    import torch.nn.functional as F

    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = logits.sigmoid()
    inter = (p * target).sum(dim=(1, 2, 3))
    dice = 1.0 - (2 * inter + 1.0) / (p.sum(dim=(1, 2, 3)) + target.sum(dim=(1, 2, 3)) + 1.0)
    return bce + dice.mean()


def _augmenters(cfg: BiometryTrainConfig, seed: int):
    from fetalscan.data.transforms import Augment, AugmentConfig

    geometric = Augment(AugmentConfig(rotate_deg=cfg.rotate_deg, scale=0.15, translate=0.08, hflip=0.5,
                                      gain=0.0, contrast=0.0, gamma=0.0, speckle=0.0, blur=0.0), seed=seed)
    intensity = Augment(AugmentConfig(rotate_deg=0.0, scale=0.0, translate=0.0, hflip=0.0), seed=seed + 1)
    return geometric, intensity


def train_one_epoch(model, data: PreparedSet, pre, optimizer, scheduler, device, batch_size: int,
                    gen, augment) -> float:
    """One seeded pass over the training images; mean loss."""
    import torch

    from fetalscan.data.transforms import normalize

    model.train()
    order = torch.randperm(len(data.items), generator=gen)
    total, seen = 0.0, 0
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        if len(idx) < 2:
            continue
        x, m = data.images[idx].float(), data.masks[idx].float()
        if augment is not None:
            geometric, intensity = augment
            both = geometric(torch.cat([x, m], dim=1))
            x, m = intensity(both[:, :1]), both[:, 1:]
        x = normalize(x.to(device), pre)
        loss = _loss(model(x), (m / 255.0).to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total += float(loss.detach()) * len(idx)
        seen += len(idx)
    return total / max(seen, 1)


def predict_low_res(model, images, pre, device, batch_size: int = 16) -> np.ndarray:
    """Logits ``(N, h, w)`` of prepared images, evaluation mode, model state restored."""
    import torch

    from fetalscan.data.transforms import normalize

    was = model.training
    model.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            x = normalize(images[start:start + batch_size].to(device), pre)
            out.append(model(x).float()[:, 0].cpu().numpy())
    model.train(was)
    return np.concatenate(out) if out else np.empty((0,) + tuple(pre.input_size), np.float32)


def fitted_ellipses(logits: np.ndarray, shapes: Sequence[tuple[int, int]]) -> list:
    """The ellipse fitted to each upsampled logit map (None where no head is found)."""
    out = []
    for logit, shape in zip(logits, shapes):
        fit = fit_head_ellipse(upsample_logits(logit, shape) > 0.0)
        out.append(fit.ellipse if fit.found else None)
    return out


def _val_hc_error_mm(ellipses: Sequence, data: PreparedSet, offset: float) -> float:
    """Mean absolute HC difference (mm) on validation images; a missed head counts its whole HC."""
    errs = []
    for e, item, ref in zip(ellipses, data.items, data.ref_perimeter_px):
        ps = item.pixel_size_mm or 1.0
        if not np.isfinite(ref):
            continue
        pred = e.grown(offset).perimeter() if e is not None else 0.0
        errs.append(abs(pred - ref) * ps)
    return float(np.mean(errs)) if errs else math.nan


def effective_batch_size(n_train: int, batch_size: int) -> int:
    """The mini-batch size used: ``batch_size``, lowered (with a warning) to the number of training images
    when there are fewer; :class:`FetalscanError` when fewer than 2 images are left to train on."""
    if n_train < 2:
        raise FetalscanError(f"segmenter training needs at least 2 training images after the validation (and "
                             f"hold-out) split, got {n_train}; give more images or a smaller --val-fraction")
    if batch_size > n_train:
        log.warning("--batch-size %d is larger than the %d training images: using batches of %d", batch_size,
                    n_train, n_train)
        return n_train
    return batch_size


def _steps_per_epoch(n_train: int, batch_size: int) -> int:
    """Optimiser steps in one epoch (:func:`train_one_epoch` skips a last batch of one image)."""
    return n_train // batch_size + (1 if n_train % batch_size >= 2 else 0)


def one_cycle(optimizer, lr: float, total_steps: int, warm_up: float = 0.1):
    """The one-cycle LR schedule (warm-up ``warm_up`` of the steps, then cosine decay) for any number of
    steps: torch's ``OneCycleLR`` divides by zero when ``warm_up * total_steps`` is exactly 1 (e.g. 10 steps)."""
    import torch

    total_steps = max(1, int(total_steps))
    if abs(warm_up * total_steps - 1.0) < 1e-9:
        warm_up += 0.5 / total_steps  # the warm-up ends half a step later: same shape, no empty phase
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total_steps, pct_start=warm_up)


def fit_segmenter(model, train: PreparedSet, val: PreparedSet, cfg: BiometryTrainConfig, device,
                  seed: int, description: str = "training segmenter") -> SegFitResult:
    """Train; keep the epoch with the lowest inner-validation HC difference; calibrate the axis offset.

    The model is left with the weights of the best epoch (on ``device``).
    """
    import torch

    from fetalscan.progress import step, track

    t0 = time.perf_counter()
    pre = cfg.segmenter().preprocessing()
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    batch_size = effective_batch_size(len(train.items), cfg.batch_size)
    scheduler = one_cycle(optimizer, cfg.lr, cfg.epochs * _steps_per_epoch(len(train.items), batch_size))
    gen = torch.Generator().manual_seed(seed)
    augment = _augmenters(cfg, seed) if cfg.augment else None
    best = (math.inf, 0, copy.deepcopy(model.state_dict()), {"axis_offset_px": 0.0, "n": 0, "iqr_px": None})
    history = []
    for epoch in track(range(1, cfg.epochs + 1), description, total=cfg.epochs, lines=False):
        loss = train_one_epoch(model, train, pre, optimizer, scheduler, device, batch_size, gen, augment)
        row = {"epoch": epoch, "train_loss": loss, "val_loss": math.nan, "val_hc_abs_diff_mm": math.nan}
        if len(val.items):
            logits = predict_low_res(model, val.images, pre, device)
            with torch.no_grad():
                row["val_loss"] = float(_loss(torch.from_numpy(logits)[:, None], val.masks.float() / 255.0))
            ellipses = fitted_ellipses(logits, val.shapes)
            calib = calibrate_axis_offset(ellipses, val.ref_perimeter_px)
            row["val_hc_abs_diff_mm"] = _val_hc_error_mm(ellipses, val, calib["axis_offset_px"])
            row["axis_offset_px"] = calib["axis_offset_px"]
            row["val_no_head"] = sum(e is None for e in ellipses)
        history.append(row)
        log.info("epoch %d: train loss %.4f, val loss %.4f, val HC |diff| %.2f mm", epoch, loss,
                 row["val_loss"], row["val_hc_abs_diff_mm"])
        step(f"{description}: epoch {epoch}/{cfg.epochs}: train loss {loss:.4f}"
             + (f", inner-validation |HC difference| {row['val_hc_abs_diff_mm']:.2f} mm"
                if math.isfinite(row["val_hc_abs_diff_mm"]) else "")
             + f" ({time.perf_counter() - t0:.0f} s)")
        if not len(val.items):
            best = (math.nan, epoch, copy.deepcopy(model.state_dict()), best[3])
            continue
        if row["val_hc_abs_diff_mm"] < best[0] - 1e-4:
            best = (row["val_hc_abs_diff_mm"], epoch, copy.deepcopy(model.state_dict()), calib)
        elif epoch - best[1] >= cfg.patience:
            break
    model.load_state_dict(best[2])
    calibration = {**best[3], "source": "inner validation", "method": "median per-image offset of both semi-axes"}
    return SegFitResult(best[1], best[0], len(history), calibration, time.perf_counter() - t0, history)


def exam_strata(items: Sequence[BiometryItem], n_bins: int = 3) -> list[str]:
    """Per-image stratum: the tertile of its exam's mean reference HC (one label per exam)."""
    by_exam: dict[str, list[float]] = {}
    for it in items:
        if it.hc_mm is not None:
            by_exam.setdefault(it.exam, []).append(it.hc_mm)
    if len(by_exam) < n_bins * 2:
        return ["all"] * len(items)
    mean_hc = {e: float(np.mean(v)) for e, v in by_exam.items()}
    edges = np.quantile(list(mean_hc.values()), np.linspace(0, 1, n_bins + 1)[1:-1])
    label = {e: f"hc_tertile_{int(np.searchsorted(edges, v, side='right'))}" for e, v in mean_hc.items()}
    return [label.get(it.exam, "hc_unknown") for it in items]


def make_exam_folds(items: Sequence[BiometryItem], n_splits: int, seed: int, val_fraction: float):
    """Grouped (by exam), HC-stratified outer folds with inner-validation splits; audited."""
    from fetalscan.splits import audit_folds, make_folds, raise_if_failed

    labels = exam_strata(items)
    groups = [it.exam for it in items]
    folds = make_folds(labels, groups, "kfold", n_splits, seed, val_fraction)
    report = audit_folds(folds, labels, groups, [it.name for it in items], None)
    raise_if_failed(report, "(in memory)")
    return folds, report


def holdout_split(items: Sequence[BiometryItem], fraction: float, seed: int, val_fraction: float):
    """A held-out exam split (about ``fraction`` of the exams) and an inner split of the rest."""
    from fetalscan.splits import inner_split, stratified_group_kfold

    labels = exam_strata(items)
    groups = [it.exam for it in items]
    if fraction <= 0:
        tr, va = inner_split(np.arange(len(items)), labels, groups, val_fraction, seed)
        return np.array([], dtype=int), tr, va
    k = max(2, int(round(1.0 / fraction)))
    test = stratified_group_kfold(labels, groups, k, seed)[0]
    rest = np.setdiff1d(np.arange(len(items)), test)
    tr, va = inner_split(rest, labels, groups, val_fraction, seed + 1)
    exams = [set(groups[i] for i in s) for s in (test, tr, va)]
    if exams[0] & exams[1] or exams[0] & exams[2] or exams[1] & exams[2]:
        raise SplitError("internal error: an exam is on two sides of the held-out split")
    return test, tr, va




def _provenance(cfg: BiometryTrainConfig, items: Sequence[BiometryItem], **extra) -> dict:
    from fetalscan.fileio import provenance

    return provenance(seed=cfg.seed, data_hash=manifest_hash(items), **extra)




def _mask_offset(data: PreparedSet) -> dict:
    """Mask-drawing offset of the reference masks (their fitted ellipse vs the reference HC)."""
    return calibrate_axis_offset(data.mask_ellipses, data.ref_perimeter_px)


def train_final(items: Sequence[BiometryItem], cfg: BiometryTrainConfig, out: str | Path, *,
                holdout_fraction: float = 0.0, overwrite: bool = False, manifest: str | None = None) -> dict:
    """Train one segmenter (optionally keeping a held-out exam split) and write ``out/model.pt``.

    Also writes ``split.csv`` (image, exam, role: train / inner_val / holdout) and
    ``train.json`` (configuration, history, calibration, provenance).
    """
    from fetalscan.fileio import (
        check_out_dir,
        prepare_out_dir,
        sha256_file,
        write_csv,
        write_json,
    )
    from fetalscan.runtime import resolve_device, seed_everything

    cfg.validate()
    out = check_out_dir(out, overwrite)
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    test, tr, va = holdout_split(items, holdout_fraction, cfg.seed, cfg.val_fraction)
    seg_cfg = cfg.segmenter()
    data = prepare_set([items[i] for i in np.concatenate([tr, va])], seg_cfg)
    n_tr = len(tr)
    train_set, val_set = data.subset(range(n_tr)), data.subset(range(n_tr, len(data.items)))
    model = build_segmenter(seg_cfg)
    fit = fit_segmenter(model, train_set, val_set, cfg, device, cfg.seed)
    mask_cal = _mask_offset(train_set)
    calibration = {**fit.calibration, "mask_axis_offset_px": mask_cal["axis_offset_px"],
                   "mask_axis_offset_n": mask_cal["n"]}
    roles = {int(i): "train" for i in tr} | {int(i): "inner_val" for i in va} | {int(i): "holdout" for i in test}
    split = pd.DataFrame([{"image": it.name, "exam": it.exam, "role": roles[i]} for i, it in enumerate(items)])
    data_block = {
        "manifest": manifest,
        "n_train_images": int(len(tr)), "n_inner_val_images": int(len(va)), "n_holdout_images": int(len(test)),
        "train_image_sha256": sorted({sha256_file(items[i].image) for i in np.concatenate([tr, va])}),
        "holdout_exams": sorted({items[i].exam for i in test}),
        "holdout_fraction": holdout_fraction,
    }
    out = prepare_out_dir(out, overwrite)
    prov = _provenance(cfg, items)
    save_segmenter(out / "model.pt", model, seg_cfg, calibration=calibration,
                   training={"config": cfg.to_dict(), "fit": fit.to_dict()}, data=data_block, provenance=prov)
    write_csv(out / "split.csv", split)
    summary = {"disclaimer": DISCLAIMER, "model": str(out / "model.pt"), "config": cfg.to_dict(),
               "fit": fit.to_dict(), "calibration": calibration, "device": str(device),
               "split": {k: v for k, v in data_block.items() if k != "train_image_sha256"}, "provenance": prov}
    write_json(out / "train.json", summary)
    return summary


def cross_validate(items: Sequence[BiometryItem], cfg: BiometryTrainConfig, *, folds: int = 5,
                   n_boot: int = 1000, manifest: str | None = None,
                   models_dir: str | Path | None = None) -> BiometryScores:
    """Grouped k-fold CV by exam: one segmenter per fold, out-of-fold HC18-style scores.

    Returns the per-image scores (one row per image, with its fold), the metrics
    and the exam -> fold table. With ``models_dir`` each fold's model is saved
    there as ``fold<k>_model.pt`` as soon as it is trained (the folder is
    created); nothing else is written
    (:func:`fetalscan.report.biometry.cross_validate_to_folder` writes the files).
    """
    from fetalscan.runtime import resolve_device, seed_everything

    cfg.validate()
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    fold_list, audit = make_exam_folds(items, folds, cfg.seed, cfg.val_fraction)
    seg_cfg = cfg.segmenter()
    data = prepare_set(items, seg_cfg)
    from fetalscan.progress import step

    frames, fold_rows = [], []
    for f in fold_list:
        step(f"fold {f.index + 1}/{len(fold_list)}: training on {len(f.train)} images, testing on {len(f.test)} "
             f"({time.perf_counter() - t0:.0f} s so far)")
        seed_everything(cfg.seed + f.index)
        model = build_segmenter(seg_cfg)
        fit = fit_segmenter(model, data.subset(f.inner_train), data.subset(f.inner_val), cfg, device,
                            cfg.seed + f.index, description=f"fold {f.index + 1}/{len(fold_list)}")
        mask_cal = _mask_offset(data.subset(f.train))
        calibration = {**fit.calibration, "mask_axis_offset_px": mask_cal["axis_offset_px"]}
        seg = HeadSegmenter(model, seg_cfg, calibration, device=device, backend="torch")
        df = evaluate_segmenter(seg, [items[i] for i in f.test], description=f"scoring fold {f.index + 1}")
        df.insert(2, "fold", f.index)
        frames.append(df)
        fold_rows.append({"fold": f.index, "n_test_images": int(len(f.test)), "best_epoch": fit.best_epoch,
                          "epochs_run": fit.epochs_run, "seconds": fit.seconds, "calibration": calibration,
                          "val_hc_abs_diff_mm": fit.best_val_hc_abs_diff_mm,
                          "test_hc_abs_diff_mm_mean": float(df["hc_abs_diff_mm"].mean()),
                          "test_dice_mean": float(df["dice"].mean()), "history": fit.history})
        log.info("fold %d: test HC |diff| %.2f mm, Dice %.4f", f.index, fold_rows[-1]["test_hc_abs_diff_mm_mean"],
                 fold_rows[-1]["test_dice_mean"])
        err = fold_rows[-1]["test_hc_abs_diff_mm_mean"]
        step(f"fold {f.index + 1}/{len(fold_list)} done: test |HC difference| "
             + (f"{err:.2f} mm" if math.isfinite(err) else "- (no measurable head)")
             + f", Dice {fold_rows[-1]['test_dice_mean']:.3f}")
        if models_dir is not None:
            Path(models_dir).mkdir(parents=True, exist_ok=True)
            save_segmenter(Path(models_dir) / f"fold{f.index}_model.pt", model, seg_cfg, calibration=calibration,
                           training={"config": cfg.to_dict(), "fit": fit.to_dict()},
                           data={"holdout_exams": sorted({items[i].exam for i in f.test})})
        del model
    per_image = pd.concat(frames, ignore_index=True)
    metrics = {
        "disclaimer": DISCLAIMER,
        "evaluation": f"grouped {len(fold_list)}-fold cross-validation by exam (out-of-fold)",
        **summarise(per_image, n_boot, cfg.seed),
        "definitions": METRIC_DEFINITIONS,
        "hc18_reference": HC18_REFERENCE,
        "cv": {"folds": len(fold_list), "stratified_on": "exam mean HC tertile", "val_fraction": cfg.val_fraction,
               "audit_passed": audit.passed},
        "per_fold": fold_rows,
        "config": cfg.to_dict(),
        "device": str(device),
        "limitations": LIMITATIONS,
        "seconds": time.perf_counter() - t0,
        "provenance": _provenance(cfg, items, manifest=manifest),
    }
    folds_csv = pd.DataFrame([{"exam": items[i].exam, "fold": f.index} for f in fold_list for i in f.test])
    return BiometryScores(per_image, metrics, f"Grouped {len(fold_list)}-fold CV (out-of-fold)",
                          folds_csv.drop_duplicates())
