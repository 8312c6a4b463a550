"""HC18-style scores of a head segmenter (van den Heuvel et al., PLoS ONE 2018).

Per image (:func:`score_image`): Dice and Hausdorff distance between the filled
fitted ellipse and the reference mask, the raw-segmentation Dice, and the
signed / absolute HC difference in mm; :func:`summarise` turns them into means,
SDs, exam-bootstrap intervals, Bland-Altman limits and a breakdown by head size.
:func:`evaluate_checkpoint` scores a trained segmenter and returns
:class:`BiometryScores`; the files of a scored run (``biometry_images.csv``,
``biometry_metrics.json``, ``bland_altman.png``, ``report.html``) are written by
:mod:`fetalscan.report.biometry`. Nothing here prints.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fetalscan.biometry.geometry import (
    measure_mask,
)
from fetalscan.biometry.segmenter import HeadSegmenter, upsample_logits
from fetalscan.data.hc18 import BiometryItem, read_mask
from fetalscan.errors import DataError, FetalscanError
from fetalscan.texts import BIOMETRY_DISCLAIMER as DISCLAIMER
from fetalscan.texts import BIOMETRY_PLANE

log = logging.getLogger(__name__)


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
    from fetalscan.data.records import read_image
    from fetalscan.progress import track

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
    from fetalscan.evaluation.bootstrap import (
        group_bootstrap_weights,
        percentile_interval,
    )

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
                 "n_no_head": int((df["status"] == "no_head").sum()),
                 "n_check": int((df["status"] == "check").sum())}
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
    # no measurable head (every image "no head found", or no reference HC): there is nothing to compare
    # with the goal, so the goal is neither met nor missed
    out["measurable_heads"] = int(len(within))
    out["goal_met"] = bool(out["hc_abs_diff_mm_mean"] <= GOAL_HC_ABS_DIFF_MM) if len(within) else None
    return out


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


@dataclass
class BiometryScores:
    """What scoring a segmenter produced: one row per image, the summary, and a title for the report."""

    per_image: pd.DataFrame  # rows of biometry_images.csv
    metrics: dict  # content of biometry_metrics.json
    title: str  # e.g. "Held-out exams"
    folds: pd.DataFrame | None = None  # cross-validation: exam -> fold (folds.csv)


def evaluate_checkpoint(model_path: str | Path, items: Sequence[BiometryItem], *, split: str = "all",
                        device: str = "auto", backend: str = "auto", n_boot: int = 1000, seed: int = 0,
                        manifest: str | None = None) -> BiometryScores:
    """Score a trained segmenter on a manifest, refusing images it was trained on.

    ``split="holdout"`` keeps only the exams the checkpoint's training held out;
    ``split="all"`` scores every row, but raises :class:`DataError` if any image
    (by file content) was used to train or early-stop the model. Writes nothing
    (:func:`fetalscan.report.biometry.evaluate_checkpoint_to_folder` writes the files).
    """
    from fetalscan.fileio import provenance, sha256_file
    from fetalscan.runtime import resolve_device

    if split not in ("all", "holdout"):
        raise FetalscanError(f"split must be 'all' or 'holdout', got {split!r}")
    seg = HeadSegmenter.load(model_path, resolve_device(device), backend)
    data_block = seg.meta.get("data") or {}
    if split == "holdout":
        held = set(data_block.get("holdout_exams") or [])
        if not held:
            raise DataError(f"{model_path} records no held-out exams (it was trained with a holdout fraction "
                            "of 0); score it on all rows of data it has not seen instead")
        items = [it for it in items if it.exam in held]
        if not items:
            raise DataError(f"none of the manifest's exams is among the {len(held)} exams held out by {model_path}")
    trained = set(data_block.get("train_image_sha256") or [])
    seen = [it for it in items if sha256_file(it.image) in trained]
    if seen:
        raise DataError(f"{len(seen)} of the {len(items)} images were used to train or early-stop {model_path} "
                        f"(e.g. {seen[0].name}); scoring them would be optimistic. Score its held-out exams "
                        "(split=\"holdout\") or data the model has not seen")
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
    return BiometryScores(per_image, metrics, "Held-out exams" if split == "holdout" else "Unseen images")


METRIC_DEFINITIONS = {
    "dice": "Dice between the filled fitted ellipse and the reference mask (HC18 scoring); no head found = 0",
    "dice_raw": "Dice between the thresholded segmentation and the reference mask",
    "hausdorff_mm": "symmetric Hausdorff distance between the outlines of the fitted ellipse and of the "
                    "reference mask, in mm",
    "hc_diff_mm": "predicted minus reference HC (mm); reference = manifest hc_mm",
    "hc_abs_diff_mm": "absolute HC difference (mm); images without a head found are excluded and counted in "
                      "n_no_head; non-elliptical head regions (status 'check', counted in n_check) are included",
    "hc_ref_mask_fit_diff_mm": "HC of the same ellipse fit applied to the reference mask minus hc_mm: the "
                               "measurement error alone, without segmentation error",
    "ci95": "95 % percentile bootstrap interval of the mean, resampling exams (1000 resamples)",
}


LIMITATIONS = [
    "HC18 images come from one centre and one device family (Radboud UMC); accuracy on other scanners, "
    "settings and populations is unknown.",
    "The reference masks are ellipses fitted to the sonographer's outline, not free-form skull segmentations; "
    "the method is scored against ellipses and fits ellipses.",
    "The images were chosen as good head planes by the sonographers. " + BIOMETRY_PLANE + "; the measurement "
    "assumes that plane. SonoNet-16 (`fetalscan view`, `--plane-check`) has no transthalamic class: it can tell a "
    "brain plane from other views, not the transthalamic from the neighbouring transventricular plane.",
    "BPD and OFD are outer-to-outer axes of the fitted ellipse; the clinical (outer-to-inner) BPD is smaller "
    "by about one skull-bone thickness. No reference BPD/OFD exists in HC18, so they are not scored.",
    "Gestational age is the Hadlock 1984 population regression on HC; its +/-2 SD spread grows from about "
    "1.2 weeks in the second trimester to about 3 weeks at term, far larger than the HC measurement error.",
]




HC18_REFERENCE = {
    "paper": "van den Heuvel et al., PLoS ONE 2018;13(8):e0200412",
    "reference_method_hc_abs_diff_mm": 2.8,
    "note": "the paper's reference method reached a mean absolute HC difference of about 2.8 mm on the "
            "HC18 test set; the best challenge entries are near 2 mm or below",
}


GOAL_HC_ABS_DIFF_MM = 2.0


#: Reference-HC bands (mm) for the breakdown of errors (roughly: first trimester, second, early and late third).
HC_BANDS: tuple[tuple[float, float], ...] = ((0.0, 100.0), (100.0, 200.0), (200.0, 280.0), (280.0, math.inf))


def manifest_hash(items: Sequence[BiometryItem]) -> str:
    """SHA-256 over (name, exam, pixel size, HC, image bytes hash) of every item."""
    import hashlib

    from fetalscan.fileio import sha256_file

    h = hashlib.sha256()
    for it in items:
        h.update(f"{it.name}\t{it.exam}\t{it.pixel_size_mm}\t{it.hc_mm}\t{sha256_file(it.image)}\n".encode())
    return h.hexdigest()
