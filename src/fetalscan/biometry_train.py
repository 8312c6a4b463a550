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

from .biometry import (
    HeadSegmenter,
    SegmenterConfig,
    as_binary_mask,
    build_segmenter,
    fit_head_ellipse,
    measure_mask,
    ramanujan_perimeter,
    save_segmenter,
    upsample_logits,
)
from .errors import DataError, FetalscanError, SplitError

log = logging.getLogger(__name__)

DISCLAIMER = ("fetalscan biometry is research software that supports, and never replaces, the "
              "sonographer's and clinician's measurement; it is not a medical device.")
HC18_REFERENCE = {
    "paper": "van den Heuvel et al., PLoS ONE 2018;13(8):e0200412",
    "reference_method_hc_abs_diff_mm": 2.8,
    "note": "the paper's reference method reached a mean absolute HC difference of about 2.8 mm on the "
            "HC18 test set; the best challenge entries are near 2 mm or below",
}
GOAL_HC_ABS_DIFF_MM = 2.0


# --------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class BiometryItem:
    """One row of a biometry manifest."""

    image: Path
    mask: Path | None
    exam: str
    pixel_size_mm: float | None
    hc_mm: float | None
    name: str  # image path as written in the manifest
    line: int  # 1-based manifest line (header = 1)

    def where(self) -> str:
        return f"{self.image} [manifest line {self.line}]"


_ALIASES = {"image": ("image", "path"), "exam": ("exam", "group"),
            "pixel_size_mm": ("pixel_size_mm", "pixel_spacing_mm"), "mask": ("mask",), "hc_mm": ("hc_mm",)}


def _column(columns: Sequence[str], key: str) -> str | None:
    return next((c for c in _ALIASES[key] if c in columns), None)


def load_biometry_manifest(csv_path: str | Path, require_masks: bool = True) -> list[BiometryItem]:
    """Read and validate a biometry manifest (paths relative to the CSV).

    Raises :class:`DataError` naming the file, line and field for a missing
    column, an empty or non-existent image / mask, an empty exam, or a
    non-numeric / non-positive pixel size or HC. An empty ``pixel_size_mm`` is
    allowed (that image is then measured in pixels).
    """
    from .data import read_csv_table

    csv_path = Path(csv_path)
    columns, rows = read_csv_table(csv_path)
    required = ["image", "exam"] + (["mask"] if require_masks else [])
    names = {k: _column(columns, k) for k in _ALIASES}
    missing = [k for k in required if names[k] is None]
    if missing:
        raise DataError(f"{csv_path}: missing column(s) {', '.join(missing)}; found: {', '.join(columns) or '(none)'}; "
                        "a biometry manifest has image,mask,exam,pixel_size_mm,hc_mm")
    if not rows:
        raise DataError(f"{csv_path}: the manifest has no rows")
    root = csv_path.parent
    items = []
    for line, raw in enumerate(rows, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in raw.items()}

        def path_of(key: str, optional: bool = False) -> Path | None:
            col = names[key]
            rel = row.get(col, "") if col else ""
            if not rel:
                if optional:
                    return None
                raise DataError(f"{csv_path}, line {line}, field {col!r}: empty")
            p = Path(rel) if Path(rel).is_absolute() else (root / rel).resolve()
            if not p.is_file():
                raise DataError(f"{csv_path}, line {line}, field {col!r}: file does not exist: {rel}")
            return p

        image = path_of("image")
        mask = path_of("mask", optional=not require_masks)
        exam = row.get(names["exam"] or "", "")
        if not exam:
            raise DataError(f"{csv_path}, line {line}, field {names['exam']!r}: empty (the exam groups images "
                            "that must stay on one side of a split)")
        ps = _positive(row, names["pixel_size_mm"], line, csv_path)
        hc = _positive(row, names["hc_mm"], line, csv_path)
        items.append(BiometryItem(image, mask, exam, ps, hc, row[names["image"]], line))  # type: ignore[arg-type]
    return items


def _positive(row: dict, col: str | None, line: int, csv_path: Path) -> float | None:
    from .data import parse_float

    value = row.get(col, "") if col else ""
    v = parse_float(value, col or "", line, csv_path)
    if v is None:
        return None
    if not math.isfinite(v) or v <= 0:
        raise DataError(f"{csv_path}, line {line}, field {col!r}: must be a positive number, got {value!r}")
    return v


def read_mask(item: BiometryItem, shape: tuple[int, int]) -> np.ndarray:
    """The item's reference mask as bool (H, W); a mask of another size than its image is an error."""
    from .data import read_image

    if item.mask is None:
        raise DataError(f"{item.where()}: no mask given")
    m = read_image(item.mask)
    if m.shape[:2] != tuple(shape):
        raise DataError(f"mask {item.mask} has shape {m.shape[1]}x{m.shape[0]} (W x H) but its image {item.image} "
                        f"is {shape[1]}x{shape[0]}; a mask must have the size of its image")
    return as_binary_mask(m, where=str(item.mask))


# --------------------------------------------------------------------------- configuration


@dataclass
class BiometryTrainConfig:
    """Every knob of segmenter training; the CLI maps its flags 1:1 onto these fields."""

    encoder: str = "mobilenet_v2"
    decoder_channels: str = "64,32,24,16,16"
    input_height: int = 128
    input_width: int = 192
    pretrained: str = "none"
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


# --------------------------------------------------------------------------- prepared data


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

    from .data import read_image
    from .progress import track
    from .transforms import prepare

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


# --------------------------------------------------------------------------- calibration


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


# --------------------------------------------------------------------------- training


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
    from .transforms import Augment, AugmentConfig

    geometric = Augment(AugmentConfig(rotate_deg=cfg.rotate_deg, scale=0.15, translate=0.08, hflip=0.5,
                                      gain=0.0, contrast=0.0, gamma=0.0, speckle=0.0, blur=0.0), seed=seed)
    intensity = Augment(AugmentConfig(rotate_deg=0.0, scale=0.0, translate=0.0, hflip=0.0), seed=seed + 1)
    return geometric, intensity


def train_one_epoch(model, data: PreparedSet, pre, optimizer, scheduler, device, batch_size: int,
                    gen, augment) -> float:
    """One seeded pass over the training images; mean loss."""
    import torch

    from .transforms import normalize

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

    from .transforms import normalize

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


def fit_segmenter(model, train: PreparedSet, val: PreparedSet, cfg: BiometryTrainConfig, device,
                  seed: int, description: str = "training segmenter") -> SegFitResult:
    """Train; keep the epoch with the lowest inner-validation HC difference; calibrate the axis offset.

    The model is left with the weights of the best epoch (on ``device``).
    """
    import torch

    from .progress import track

    t0 = time.perf_counter()
    pre = cfg.segmenter().preprocessing()
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * max(1, math.ceil(len(train.items) / cfg.batch_size))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    augment = _augmenters(cfg, seed) if cfg.augment else None
    best = (math.inf, 0, copy.deepcopy(model.state_dict()), {"axis_offset_px": 0.0, "n": 0, "iqr_px": None})
    history = []
    for epoch in track(range(1, cfg.epochs + 1), description, total=cfg.epochs):
        loss = train_one_epoch(model, train, pre, optimizer, scheduler, device, cfg.batch_size, gen, augment)
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


# --------------------------------------------------------------------------- splits


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
    from .splits import audit_folds, make_folds, raise_if_failed

    labels = exam_strata(items)
    groups = [it.exam for it in items]
    folds = make_folds(labels, groups, "kfold", n_splits, seed, val_fraction)
    report = audit_folds(folds, labels, groups, [it.name for it in items], None)
    raise_if_failed(report, "(in memory)")
    return folds, report


def holdout_split(items: Sequence[BiometryItem], fraction: float, seed: int, val_fraction: float):
    """A held-out exam split (about ``fraction`` of the exams) and an inner split of the rest."""
    from .splits import inner_split, stratified_group_kfold

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


# --------------------------------------------------------------------------- evaluation


def hausdorff_mm(a: np.ndarray, b: np.ndarray, pixel_size: float) -> float:
    """Symmetric Hausdorff distance between the outlines of two binary masks, times ``pixel_size``.

    Outlines are the mask pixels with a background 4-neighbour; distances are
    exact Euclidean (OpenCV distance transform, precise mask). NaN if either is empty.
    """
    import cv2

    def outline(m: np.ndarray) -> np.ndarray:
        m8 = m.astype(np.uint8)
        return (m8 - cv2.erode(m8, np.ones((3, 3), np.uint8), borderType=cv2.BORDER_CONSTANT, borderValue=0)) > 0

    oa, ob = outline(a), outline(b)
    if not oa.any() or not ob.any():
        return math.nan
    da = cv2.distanceTransform((~oa).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    db = cv2.distanceTransform((~ob).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return float(max(db[oa].max(), da[ob].max()) * pixel_size)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two boolean masks (NaN when both are empty)."""
    s = int(a.sum()) + int(b.sum())
    return 2.0 * int(np.count_nonzero(a & b)) / s if s else math.nan


def score_image(item: BiometryItem, logit: np.ndarray, ref_mask: np.ndarray, axis_offset_px: float,
                mask_offset_px: float) -> dict:
    """HC18-style scores of one image from its low-resolution logits and reference mask."""
    shape = ref_mask.shape
    pred_mask = upsample_logits(logit, shape) > 0.0
    m = measure_mask(pred_mask, item.pixel_size_mm, axis_offset_px=axis_offset_px, where=item.name)
    ps = item.pixel_size_mm
    row = {"image": item.name, "exam": item.exam, "pixel_size_mm": ps, "hc_ref_mm": item.hc_mm,
           "status": m.status}
    row["dice_raw"] = dice(pred_mask, ref_mask)
    if m.found and m.ellipse is not None:
        ell = m.ellipse.filled_mask(shape)
        row["dice"] = dice(ell, ref_mask)
        row["hausdorff_mm"] = hausdorff_mm(ell, ref_mask, ps) if ps else math.nan
    else:
        row["dice"], row["hausdorff_mm"] = 0.0, math.nan
    mm = m.unit == "mm"
    row["hc_pred_mm"] = m.hc if (m.found and mm) else math.nan
    row["bpd_pred_mm"] = m.bpd if (m.found and mm) else math.nan
    row["ofd_pred_mm"] = m.ofd if (m.found and mm) else math.nan
    row["ga_pred_weeks"] = m.ga.weeks if m.ga.weeks is not None else math.nan
    ref = item.hc_mm if item.hc_mm is not None else math.nan
    row["hc_diff_mm"] = row["hc_pred_mm"] - ref
    row["hc_abs_diff_mm"] = abs(row["hc_diff_mm"])
    gt = measure_mask(ref_mask, ps, axis_offset_px=mask_offset_px, where=f"reference mask of {item.name}")
    row["hc_ref_mask_fit_mm"] = gt.hc if (gt.found and gt.unit == "mm") else math.nan
    row["hc_ref_mask_fit_diff_mm"] = row["hc_ref_mask_fit_mm"] - ref
    row["warnings"] = " | ".join(m.warnings)
    return row


def evaluate_segmenter(segmenter: HeadSegmenter, items: Sequence[BiometryItem], *,
                       mask_offset_px: float | None = None, description: str = "scoring") -> pd.DataFrame:
    """Per-image HC18-style scores of a trained segmenter (see :func:`score_image`).

    ``mask_offset_px`` is the mask-drawing offset used for the reference-mask fit
    (default: the one stored with the segmenter, estimated on its training masks).
    """
    from .data import read_image
    from .progress import track

    if mask_offset_px is None:
        mask_offset_px = float(segmenter.calibration.get("mask_axis_offset_px", 0.0))
    rows = []
    for item in track(items, description, total=len(items)):
        img = read_image(item.image)
        ref = read_mask(item, img.shape[:2])
        logit = segmenter.logits(segmenter.prepare(img)[None])[0]
        rows.append(score_image(item, logit, ref, segmenter.axis_offset_px, mask_offset_px))
    return pd.DataFrame(rows)


def _bootstrap_mean(values: np.ndarray, groups: Sequence[str], n_boot: int, seed: int) -> list[float]:
    from .evaluate import group_bootstrap_weights, percentile_interval

    ok = np.isfinite(values)
    v, g = values[ok], [x for x, k in zip(groups, ok) if k]
    if len(v) < 2:
        return [math.nan, math.nan]
    stats = []
    for w in group_bootstrap_weights(g, n_boot, seed):
        stats.append((w @ v) / np.maximum(w.sum(1), 1e-12))
    return percentile_interval(np.concatenate(stats))


def summarise(df: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> dict:
    """Mean +/- SD of every score, 95 % exam-bootstrap intervals, Bland-Altman limits, counts."""
    groups = df["exam"].astype(str).tolist()
    out: dict = {"n_images": int(len(df)), "n_exams": int(df["exam"].nunique()),
                 "n_no_head": int((df["status"] != "ok").sum())}
    for col in ("dice", "dice_raw", "hausdorff_mm", "hc_abs_diff_mm", "hc_diff_mm",
                "hc_ref_mask_fit_diff_mm"):
        v = df[col].to_numpy(dtype=np.float64)
        fin = v[np.isfinite(v)]
        out[f"{col}_mean"] = float(fin.mean()) if len(fin) else math.nan
        out[f"{col}_sd"] = float(fin.std(ddof=1)) if len(fin) > 1 else math.nan
        out[f"{col}_median"] = float(np.median(fin)) if len(fin) else math.nan
        out[f"{col}_n"] = int(len(fin))
        out[f"{col}_mean_ci95"] = _bootstrap_mean(v, groups, n_boot, seed)
    gt = df["hc_ref_mask_fit_diff_mm"].to_numpy(dtype=np.float64)
    gt = gt[np.isfinite(gt)]
    out["hc_ref_mask_fit_abs_diff_mm_mean"] = float(np.abs(gt).mean()) if len(gt) else math.nan
    out["hc_ref_mask_fit_abs_diff_mm_sd"] = float(np.abs(gt).std(ddof=1)) if len(gt) > 1 else math.nan
    d = df["hc_diff_mm"].to_numpy(dtype=np.float64)
    d = d[np.isfinite(d)]
    if len(d) > 1:
        bias, sd = float(d.mean()), float(d.std(ddof=1))
        out["bland_altman"] = {"bias_mm": bias, "sd_mm": sd, "loa_low_mm": bias - 1.96 * sd,
                               "loa_high_mm": bias + 1.96 * sd, "n": int(len(d))}
    within = df["hc_abs_diff_mm"].to_numpy(dtype=np.float64)
    within = within[np.isfinite(within)]
    for t in (2.0, 3.0, 5.0):
        out[f"share_hc_within_{t:g}mm"] = float((within <= t).mean()) if len(within) else math.nan
    out["by_reference_hc"] = _by_hc_band(df)
    out["goal_hc_abs_diff_mm"] = GOAL_HC_ABS_DIFF_MM
    out["goal_met"] = bool(out["hc_abs_diff_mm_mean"] <= GOAL_HC_ABS_DIFF_MM) if len(within) else False
    return out


#: Reference-HC bands (mm) for the breakdown of errors (roughly: first trimester, second, early and late third).
HC_BANDS: tuple[tuple[float, float], ...] = ((0.0, 100.0), (100.0, 200.0), (200.0, 280.0), (280.0, math.inf))


def _by_hc_band(df: pd.DataFrame) -> list[dict]:
    """Mean absolute and relative HC difference per reference-HC band (small bands are flagged by n)."""
    rows = []
    for lo, hi in HC_BANDS:
        s = df[(df["hc_ref_mm"] >= lo) & (df["hc_ref_mm"] < hi)]
        err = s["hc_abs_diff_mm"].to_numpy(dtype=np.float64)
        ok = np.isfinite(err)
        rel = err[ok] / s["hc_ref_mm"].to_numpy(dtype=np.float64)[ok] * 100 if ok.any() else np.array([])
        rows.append({"hc_ref_mm": f"{lo:.0f}-{hi:.0f}" if math.isfinite(hi) else f">={lo:.0f}",
                     "n_images": int(len(s)), "n_exams": int(s["exam"].nunique()),
                     "hc_abs_diff_mm_mean": float(err[ok].mean()) if ok.any() else math.nan,
                     "hc_abs_diff_percent_mean": float(rel.mean()) if len(rel) else math.nan,
                     "dice_mean": float(s["dice"].mean()) if len(s) else math.nan})
    return rows


def bland_altman_figure(df: pd.DataFrame, title: str):
    """Bland-Altman plot of predicted vs reference HC (difference against mean), as a Figure."""
    from .figures import new_figure

    ok = np.isfinite(df["hc_pred_mm"]) & np.isfinite(df["hc_ref_mm"])
    pred, ref = df.loc[ok, "hc_pred_mm"].to_numpy(float), df.loc[ok, "hc_ref_mm"].to_numpy(float)
    fig, ax = new_figure(6.4, 4.2)
    mean, diff = (pred + ref) / 2, pred - ref
    ax.scatter(mean, diff, s=8, alpha=0.6, color="#1f77b4", linewidths=0)
    if len(diff) > 1:
        bias, sd = diff.mean(), diff.std(ddof=1)
        for y, style, label in ((bias, "-", f"bias {bias:+.2f} mm"),
                                (bias + 1.96 * sd, "--", f"+1.96 SD {bias + 1.96 * sd:+.2f} mm"),
                                (bias - 1.96 * sd, "--", f"-1.96 SD {bias - 1.96 * sd:+.2f} mm")):
            ax.axhline(y, color="#d62728", linestyle=style, linewidth=1, label=label)
        ax.legend(loc="upper left", fontsize=8, frameon=False)
    ax.axhline(0, color="grey", linewidth=0.6)
    ax.set_xlabel("mean of predicted and reference HC (mm)")
    ax.set_ylabel("predicted - reference HC (mm)")
    ax.set_title(title, fontsize=10)
    return fig


# --------------------------------------------------------------------------- orchestration


def _provenance(cfg: BiometryTrainConfig, items: Sequence[BiometryItem], **extra) -> dict:
    from .fileio import provenance

    return provenance(seed=cfg.seed, data_hash=manifest_hash(items), **extra)


def manifest_hash(items: Sequence[BiometryItem]) -> str:
    """SHA-256 over (name, exam, pixel size, HC, image bytes hash) of every item."""
    import hashlib

    from .fileio import sha256_file

    h = hashlib.sha256()
    for it in items:
        h.update(f"{it.name}\t{it.exam}\t{it.pixel_size_mm}\t{it.hc_mm}\t{sha256_file(it.image)}\n".encode())
    return h.hexdigest()


def _mask_offset(data: PreparedSet) -> dict:
    """Mask-drawing offset of the reference masks (their fitted ellipse vs the reference HC)."""
    return calibrate_axis_offset(data.mask_ellipses, data.ref_perimeter_px)


def train_final(items: Sequence[BiometryItem], cfg: BiometryTrainConfig, out: str | Path, *,
                holdout_fraction: float = 0.0, overwrite: bool = False, manifest: str | None = None) -> dict:
    """Train one segmenter (optionally keeping a held-out exam split) and write ``out/model.pt``.

    Also writes ``split.csv`` (image, exam, role: train / inner_val / holdout) and
    ``train.json`` (configuration, history, calibration, provenance).
    """
    from .fileio import check_out_dir, prepare_out_dir, sha256_file, write_csv, write_json
    from .runtime import resolve_device, seed_everything

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


def cross_validate(items: Sequence[BiometryItem], cfg: BiometryTrainConfig, out: str | Path, *,
                   folds: int = 5, overwrite: bool = False, n_boot: int = 1000, manifest: str | None = None,
                   save_models: bool = False) -> dict:
    """Grouped k-fold CV by exam: one segmenter per fold, out-of-fold HC18-style scores.

    Writes ``biometry_images.csv`` (one row per image, with its fold),
    ``biometry_metrics.json``, ``folds.csv``, ``bland_altman.png`` and
    ``report.html`` into ``out``.
    """
    from .fileio import check_out_dir, prepare_out_dir, write_csv
    from .runtime import resolve_device, seed_everything

    cfg.validate()
    out = check_out_dir(out, overwrite)
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    fold_list, audit = make_exam_folds(items, folds, cfg.seed, cfg.val_fraction)
    seg_cfg = cfg.segmenter()
    data = prepare_set(items, seg_cfg)
    frames, fold_rows = [], []
    for f in fold_list:
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
        if save_models:
            prepare_out_dir(out, True)
            save_segmenter(out / f"fold{f.index}_model.pt", model, seg_cfg, calibration=calibration,
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
    out = prepare_out_dir(out, overwrite)
    folds_csv = pd.DataFrame([{"exam": items[i].exam, "fold": f.index} for f in fold_list for i in f.test])
    write_csv(out / "folds.csv", folds_csv.drop_duplicates())
    write_outputs(out, per_image, metrics, f"Grouped {len(fold_list)}-fold CV (out-of-fold)")
    return metrics


def evaluate_checkpoint(model_path: str | Path, items: Sequence[BiometryItem], out: str | Path, *,
                        split: str = "all", device: str = "auto", backend: str = "auto", overwrite: bool = False,
                        n_boot: int = 1000, seed: int = 0, manifest: str | None = None) -> dict:
    """Score a trained segmenter on a manifest, refusing images it was trained on.

    ``split="holdout"`` keeps only the exams the checkpoint's training held out;
    ``split="all"`` scores every row, but raises :class:`DataError` if any image
    (by file content) was used to train or early-stop the model.
    """
    from .fileio import check_out_dir, prepare_out_dir, provenance, sha256_file
    from .runtime import resolve_device

    out = check_out_dir(out, overwrite)
    seg = HeadSegmenter.load(model_path, resolve_device(device), backend)
    data_block = seg.meta.get("data") or {}
    if split == "holdout":
        held = set(data_block.get("holdout_exams") or [])
        if not held:
            raise DataError(f"{model_path} records no held-out exams (trained with --holdout-fraction 0); "
                            "use --split all on data it has not seen")
        items = [it for it in items if it.exam in held]
        if not items:
            raise DataError(f"none of the manifest's exams is among the {len(held)} exams held out by {model_path}")
    elif split != "all":
        raise FetalscanError(f"--split must be 'all' or 'holdout', got {split!r}")
    trained = set(data_block.get("train_image_sha256") or [])
    seen = [it for it in items if sha256_file(it.image) in trained]
    if seen:
        raise DataError(f"{len(seen)} of the {len(items)} images were used to train or early-stop {model_path} "
                        f"(e.g. {seen[0].name}); scoring them would be optimistic. Use --split holdout or data "
                        "the model has not seen")
    t0 = time.perf_counter()
    per_image = evaluate_segmenter(seg, items)
    per_image.insert(2, "fold", "")
    metrics = {
        "disclaimer": DISCLAIMER,
        "evaluation": f"trained model {model_path} on {'its held-out exams' if split == 'holdout' else 'unseen images'}",
        **summarise(per_image, n_boot, seed),
        "definitions": METRIC_DEFINITIONS,
        "hc18_reference": HC18_REFERENCE,
        "model": {"path": str(model_path), "calibration": seg.calibration,
                  "architecture": seg.meta.get("architecture"), "backend": seg.backend},
        "limitations": LIMITATIONS,
        "seconds": time.perf_counter() - t0,
        "provenance": provenance(seed=seed, data_hash=manifest_hash(items), manifest=manifest),
    }
    out = prepare_out_dir(out, overwrite)
    write_outputs(out, per_image, metrics, "Held-out exams" if split == "holdout" else "Unseen images")
    return metrics


METRIC_DEFINITIONS = {
    "dice": "Dice between the filled fitted ellipse and the reference mask (HC18 scoring); no head found = 0",
    "dice_raw": "Dice between the thresholded segmentation and the reference mask",
    "hausdorff_mm": "symmetric Hausdorff distance between the outlines of the fitted ellipse and of the "
                    "reference mask, in mm",
    "hc_diff_mm": "predicted minus reference HC (mm); reference = manifest hc_mm",
    "hc_abs_diff_mm": "absolute HC difference (mm); images without a head found are excluded and counted in n_no_head",
    "hc_ref_mask_fit_diff_mm": "HC of the same ellipse fit applied to the reference mask minus hc_mm: the "
                               "measurement error alone, without segmentation error",
    "ci95": "95 % percentile bootstrap interval of the mean, resampling exams (1000 resamples)",
}
LIMITATIONS = [
    "HC18 images come from one centre and one device family (Radboud UMC); accuracy on other scanners, "
    "settings and populations is unknown.",
    "The reference masks are ellipses fitted to the sonographer's outline, not free-form skull segmentations; "
    "the method is scored against ellipses and fits ellipses.",
    "The images were chosen as good head planes by the sonographers; the measurement assumes a correct "
    "transventricular plane (check it with `fetalscan view`).",
    "BPD and OFD are outer-to-outer axes of the fitted ellipse; the clinical (outer-to-inner) BPD is smaller "
    "by about one skull-bone thickness. No reference BPD/OFD exists in HC18, so they are not scored.",
    "Gestational age is the Hadlock 1984 population regression on HC; its +/-2 SD spread grows from about "
    "1.2 weeks in the second trimester to about 3 weeks at term, far larger than the HC measurement error.",
]


def write_outputs(out: Path, per_image: pd.DataFrame, metrics: dict, title: str) -> None:
    """``biometry_images.csv``, ``biometry_metrics.json``, ``bland_altman.png`` and ``report.html``."""
    from .figures import figure_data_uri, save_figure
    from .fileio import write_csv, write_json, write_text

    write_csv(out / "biometry_images.csv", per_image)
    write_json(out / "biometry_metrics.json", metrics)
    fig = bland_altman_figure(per_image, f"Bland-Altman, {title}")
    save_figure(fig, out / "bland_altman.png")
    write_text(out / "report.html", render_report(metrics, per_image, title, figure_data_uri(fig)))


def render_report(metrics: dict, per_image: pd.DataFrame, title: str, bland_altman_uri: str) -> str:
    """The self-contained HTML report (``templates/biometry_report.html.j2``)."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("fetalscan", "templates"),
                             autoescape=jinja2.select_autoescape(["html", "j2"]))
    worst = per_image.sort_values("hc_abs_diff_mm", ascending=False, na_position="first").head(10)
    return env.get_template("biometry_report.html.j2").render(
        title=title, m=metrics, bland_altman=bland_altman_uri,
        worst=worst.to_dict("records"), fmt=_fmt)


def _fmt(v, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)
