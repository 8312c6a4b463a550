"""Shortcut check: can the classes be told apart without any anatomy?

A model can reach a high AUROC by recognising *where an image comes from*
(scanner, hospital, export software, text overlays, grey-scale bars, black
borders, resizing) when the source is confounded with the label -- "shortcut
learning" (Geirhos et al. 2020). In medical imaging, CNNs have been shown to
identify the hospital from radiographs and to lean on it (Zech et al. 2018), and
models for COVID-19 on chest radiographs learned dataset source rather than
pathology (DeGrave et al. 2021).

The probe: a plain regularised logistic regression on low-level image
statistics that carry no anatomy --

- geometry of the original file: height, width, aspect, log pixel count, and
  bits per pixel of the file (compression);
- a 32-bin grey-level histogram and global brightness statistics;
- near-black border depth (rows / columns from each edge), and a 4 x 4 grid of
  near-black fractions (the layout of the scan sector);
- brightness mean / std of the four corners and the four border strips;
- the share of coloured pixels and an 8 x 8 grid of "overlay-like" pixels
  (thin bright marks found by a morphological top-hat, i.e. text, callipers,
  scale bars, or coloured pixels);

-- trained under the *same grouped folds* as the model (out-of-fold, so a
patient is never in its own training set), aggregated to patients by the same
rule, and scored with the same metrics and group-bootstrap intervals.

Warning rule (documented in ``docs/evaluation.md``): the report warns when,
for the patient-level macro AUROC or the normal-vs-abnormal AUROC,

1. the probe's AUROC is at least ``probe_floor`` (0.80) -- image statistics alone
   separate the classes well; or
2. the probe's lower 95 % bound is above 0.5 and its AUROC is within
   ``probe_margin`` (0.05) of the model's -- the model does no clearly better than
   image statistics.

A warning does not prove the model used the shortcut; it shows that the data let
it, so its performance is not evidence that anatomy was learned. No warning does
not prove the absence of other shortcuts that these statistics miss.

References
----------
Geirhos R, Jacobsen J-H, Michaelis C, et al. Shortcut learning in deep neural
networks. Nature Machine Intelligence 2020;2:665-673.
Zech JR, Badgeley MA, Liu M, et al. Variable generalization performance of a deep
learning model to detect pneumonia in chest radiographs: a cross-sectional study.
PLoS Medicine 2018;15(11):e1002683.
DeGrave AJ, Janizek JD, Lee S-I. AI for radiographic COVID-19 detection selects
shortcuts over signal. Nature Machine Intelligence 2021;3:610-619.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from fetalscan.errors import DataError, FetalscanError

log = logging.getLogger(__name__)


SIZE = 256  # side of the square working image for the pixel statistics


GRID = 8


DARK_GRID = 4


HIST_BINS = 32


DARK = 10  # grey level at or below which a pixel is "near black"


TOPHAT_KERNEL = 5


TOPHAT_LEVEL = 60  # grey-level excess over the local background that marks a thin bright overlay


CHROMA = 30  # max(R,G,B) - min(R,G,B) above which a pixel is "coloured"


C_REGULARISATION = 0.1  # inverse L2 strength of the probe (fixed a priori, never tuned on the data)


def feature_names(grid: int = GRID, hist_bins: int = HIST_BINS) -> list[str]:
    """Names of the columns of :func:`image_features`, in order."""
    names = ["height", "width", "aspect_w_over_h", "log_pixels", "file_bits_per_pixel"]
    names += [f"hist_{i:02d}" for i in range(hist_bins)]
    names += ["grey_mean", "grey_std", "frac_black", "frac_saturated"]
    names += [f"black_border_{s}" for s in ("top", "bottom", "left", "right")]
    for corner in ("top_left", "top_right", "bottom_left", "bottom_right"):
        names += [f"corner_{corner}_mean", f"corner_{corner}_std"]
    for strip in ("top", "bottom", "left", "right"):
        names += [f"strip_{strip}_mean", f"strip_{strip}_std"]
    names += ["frac_coloured"]
    names += [f"overlay_r{r}c{c}" for r in range(grid) for c in range(grid)]
    names += [f"black_r{r}c{c}" for r in range(DARK_GRID) for c in range(DARK_GRID)]
    return names


def _leading(flags: np.ndarray) -> int:
    """Number of leading True values."""
    idx = np.flatnonzero(~flags)
    return int(idx[0]) if len(idx) else int(len(flags))


def _grid_fraction(mask: np.ndarray, n: int) -> np.ndarray:
    s = mask.shape[0] // n
    return mask[: s * n, : s * n].reshape(n, s, n, s).mean((1, 3)).ravel()


def image_features(image: np.ndarray, file_bytes: int | None = None, grid: int = GRID,
                   hist_bins: int = HIST_BINS) -> np.ndarray:
    """Low-level statistics of one RGB ``uint8`` image (no anatomy); see the module docstring.

    Parameters
    ----------
    image : array, shape (H, W, 3), uint8
        The image as decoded from its file (original size).
    file_bytes : int, optional
        Size of the file, for its bits per pixel (0 when unknown, e.g. video frames).

    Returns
    -------
    array, shape (len(feature_names()),)
    """
    import cv2

    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise DataError(f"image_features needs an RGB uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    h, w = image.shape[:2]
    small = cv2.resize(image, (SIZE, SIZE), interpolation=cv2.INTER_AREA)
    r, gr, b = (small[..., i] for i in range(3))  # channel slices: much faster than reductions over axis 2
    g = (r.astype(np.float32) + gr + b) / 3.0
    g8 = np.clip(g, 0, 255).astype(np.uint8)
    chroma = np.maximum(np.maximum(r, gr), b).astype(np.int16) - np.minimum(np.minimum(r, gr), b)
    feats: list[float] = [h, w, w / h, math.log(h * w), (8.0 * file_bytes / (h * w)) if file_bytes else 0.0]
    feats += (np.histogram(g, bins=hist_bins, range=(0, 256))[0] / g.size).tolist()
    feats += [g.mean() / 255, g.std() / 255, float((g <= DARK).mean()), float((g >= 245).mean())]
    row_dark, col_dark = g.mean(1) <= DARK, g.mean(0) <= DARK
    feats += [_leading(row_dark) / SIZE, _leading(row_dark[::-1]) / SIZE,
              _leading(col_dark) / SIZE, _leading(col_dark[::-1]) / SIZE]
    c = SIZE // 8
    for patch in (g[:c, :c], g[:c, -c:], g[-c:, :c], g[-c:, -c:]):
        feats += [patch.mean() / 255, patch.std() / 255]
    t = max(2, round(0.06 * SIZE))
    for strip in (g[:t], g[-t:], g[:, :t], g[:, -t:]):
        feats += [strip.mean() / 255, strip.std() / 255]
    coloured = chroma > CHROMA
    feats += [float(coloured.mean())]
    tophat = cv2.morphologyEx(g8, cv2.MORPH_TOPHAT, np.ones((TOPHAT_KERNEL, TOPHAT_KERNEL), np.uint8))
    overlay = (tophat > TOPHAT_LEVEL) | coloured
    feats += _grid_fraction(overlay, grid).tolist()
    feats += _grid_fraction(g <= DARK, DARK_GRID).tolist()
    return np.asarray(feats, dtype=np.float64)


def extract_features(df: pd.DataFrame) -> np.ndarray:
    """Features of every row of a predictions frame (``path`` and optional ``frame`` columns).

    Images are read with :func:`fetalscan.data.iter_record_images` (each multi-frame
    file decoded once). A missing or unreadable file raises :class:`DataError`
    naming it.
    """
    from fetalscan.data.records import Record, iter_record_images
    from fetalscan.errors import ImageReadError
    from fetalscan.progress import track

    records = []
    for i, row in enumerate(df.itertuples(index=False)):
        frame = getattr(row, "frame", None)
        frame = None if frame is None or pd.isna(frame) else int(frame)
        path = Path(str(row.path))
        records.append(Record(path=path, label=None, group=str(row.group), name=str(path), frame=frame,
                              source_row=i + 2))
    out = np.zeros((len(records), len(feature_names())))
    sizes: dict[Path, int] = {}
    try:
        for i, image in track(iter_record_images(records), "shortcut probe: image statistics", total=len(records)):
            r = records[i]
            if r.path not in sizes:
                sizes[r.path] = r.path.stat().st_size
            out[i] = image_features(image, sizes[r.path] if r.frame is None else None)
    except ImageReadError as exc:
        raise DataError(f"shortcut probe: {exc}") from exc
    return out


def _fold_assignment(img: pd.DataFrame, folds: pd.DataFrame | None, seed: int) -> tuple[np.ndarray, str]:
    """Fold of each image: the run's own folds, or new grouped folds for external data."""
    if "fold" in img.columns and img["fold"].notna().all():
        return img["fold"].astype(int).to_numpy(), "the model's cross-validation folds (folds.csv)"
    if folds is not None and len(folds):
        fold_of = dict(zip(folds["group"].astype(str), folds["fold"].astype(int)))
        missing = sorted(set(img["group"].astype(str)) - set(fold_of))
        if not missing:
            return img["group"].astype(str).map(fold_of).to_numpy(dtype=int), "the run's folds (folds.csv)"
    from fetalscan.splits import groups_per_class, stratified_group_kfold

    labels, groups = img["label"].astype(str).tolist(), img["group"].astype(str).tolist()
    per_class = groups_per_class(labels, groups)
    if len(per_class) < 2 or sum(per_class.values()) < 4:
        raise FetalscanError(f"the probe needs two classes and at least four patients "
                             f"(patients per class: {per_class})")
    fold = np.zeros(len(img), dtype=int)
    k = min(5, min(per_class.values()))
    if k >= 2:
        for f, idx in enumerate(stratified_group_kfold(labels, groups, k, seed)):
            fold[idx] = f
        return fold, f"{k} new stratified grouped folds (no CV folds on these data)"
    # a class with a single patient cannot be stratified: plain grouped folds, seeded
    k = min(5, len(set(groups)))
    uniq = np.array(sorted(set(groups)))
    order = np.random.default_rng(seed).permutation(len(uniq))
    fold_of = {g: i % k for i, g in enumerate(uniq[order])}
    return np.array([fold_of[g] for g in groups]), (
        f"{k} new grouped folds, not stratified (a class has a single patient; no CV folds on these data)")


def _pipeline():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=C_REGULARISATION, class_weight="balanced",
                                                              max_iter=5000))


def out_of_fold_probabilities(features: np.ndarray, y: np.ndarray, fold: np.ndarray, n_classes: int) -> np.ndarray:
    """Probe probabilities for every image from a model trained on the other folds only.

    A class absent from a fold's training images gets probability 0 there. A fold
    whose training images hold a single class predicts that class.
    """
    probs = np.zeros((len(y), n_classes))
    for f in np.unique(fold):
        test, train = fold == f, fold != f
        present = np.unique(y[train])
        if len(present) == 1:
            probs[np.ix_(test, present)] = 1.0
            continue
        model = _pipeline().fit(features[train], y[train])
        probs[np.ix_(test, model.classes_)] = model.predict_proba(features[test])
    return probs


def top_features(features: np.ndarray, y: np.ndarray, classes: Sequence[str], n: int = 8) -> list[dict]:
    """The statistics the probe leans on most (largest standardised coefficients, fit on all images)."""
    present = np.unique(y)
    if len(present) < 2:
        return []
    model = _pipeline().fit(features, y)
    coef = model[-1].coef_
    names = feature_names()
    if coef.shape[0] == 1:  # binary: one row for the second class
        coef = np.vstack([-coef[0], coef[0]])
    strength = np.abs(coef).max(0)
    out = []
    for j in np.argsort(-strength)[:n]:
        k = int(np.argmax(coef[:, j]))
        out.append({"feature": names[j], "weight": float(strength[j]),
                    "favours": str(classes[int(model[-1].classes_[k])])})
    return out


def verdict(probe_auc: float, probe_low: float, model_auc: float, floor: float = 0.80,
            margin: float = 0.05) -> tuple[bool, str]:
    """Apply the warning rule to one AUROC pair; returns (warn, reason)."""
    if probe_auc is None or not np.isfinite(probe_auc):
        return False, "not computable"
    if probe_auc >= floor:
        return True, f"probe AUROC {probe_auc:.3f} >= {floor:.2f}"
    if (probe_low is not None and np.isfinite(probe_low) and probe_low > 0.5 and model_auc is not None
            and np.isfinite(model_auc) and probe_auc >= model_auc - margin):
        return True, (f"probe AUROC {probe_auc:.3f} (lower bound {probe_low:.3f} > 0.5) is within {margin:.2f} of "
                      f"the model's {model_auc:.3f}")
    return False, "below the warning rule"


def run_shortcut_check(img: pd.DataFrame, classes: Sequence[str], cfg, *, model_image: dict, model_patient: dict,
                       folds: pd.DataFrame | None = None, aggregate: str = "mean", normal_class: str = "normal",
                       **_ignored) -> tuple[dict, pd.DataFrame | None]:
    """Fit the probe out-of-fold, score it like the model, and apply the warning rule.

    Parameters
    ----------
    img : DataFrame
        The run's ``predictions.csv`` rows (image paths, groups, labels, folds).
    cfg : fetalscan.evaluate.EvaluationConfig
        ``n_boot``, ``seed``, ``confidence``, ``probe_floor``, ``probe_margin``.
    model_image, model_patient : dict
        The model's metrics (with ``ci``) at image and patient level.

    Returns
    -------
    block : dict
        For ``metrics.json`` (``available`` False with a ``note`` when the probe
        cannot run, e.g. images no longer on disk).
    probe_predictions : DataFrame or None
        The probe's out-of-fold predictions in the ``predictions.csv`` layout.
    """
    from fetalscan.evaluation.bootstrap import auroc_with_ci, metrics_with_ci
    from fetalscan.evaluation.metrics import labelled_rows
    from fetalscan.inference.tables import aggregate_groups, prob_columns

    classes = list(classes)
    lab = labelled_rows(img).reset_index(drop=True)
    base = {"available": False, "features": "intensity histogram, image size and file compression, black "
            "borders and sector layout, corner and border-strip brightness, overlay / text / colour marks; "
            "no anatomy", "classifier": f"L2 logistic regression (C={C_REGULARISATION}, balanced class weights) "
            "on standardised features", "rule": _rule_text(cfg)}
    missing = [p for p in lab["path"].astype(str).unique() if not Path(p).is_file()]
    if missing:
        base["note"] = (f"{len(missing)} image file(s) are not on disk any more (e.g. {missing[0]}); the shortcut "
                        "check needs the images and was skipped")
        return base, None
    try:
        fold, fold_source = _fold_assignment(lab, folds, cfg.seed)
    except FetalscanError as exc:
        base["note"] = f"shortcut check skipped: {exc}"
        return base, None
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[c] for c in lab["label"].astype(str)], dtype=np.int64)
    feats = extract_features(lab)
    probs = out_of_fold_probabilities(feats, y, fold, len(classes))
    keep = [c for c in ("path", "frame", "group", "label") if c in lab.columns]
    probe = lab[keep].copy()
    probe["fold"] = pd.array(fold, dtype="Int64")
    probe["pred"] = [classes[i] for i in probs.argmax(1)]
    for j, col in enumerate(prob_columns(classes)):
        probe[col] = probs[:, j]
    if "label_original" in lab:
        probe["label_original"] = lab["label_original"].to_numpy()
    probe_pat = aggregate_groups(probe, classes, aggregate, normal_class)
    kw = {"n_boot": cfg.n_boot, "seed": cfg.seed, "confidence": cfg.confidence}
    pi, pp = metrics_with_ci(probe, classes, **kw), metrics_with_ci(probe_pat, classes, **kw)
    comparisons = [_pair("macro AUROC, patient level", pp["macro_auroc"], pp["ci"]["macro_auroc"]["bootstrap"],
                         model_patient["macro_auroc"], model_patient["ci"]["macro_auroc"]["bootstrap"], cfg),
                   _pair("macro AUROC, image level", pi["macro_auroc"], pi["ci"]["macro_auroc"]["bootstrap"],
                         model_image["macro_auroc"], model_image["ci"]["macro_auroc"]["bootstrap"], cfg, rule=False)]
    if normal_class in classes:
        model_pat = aggregate_groups(img, classes, aggregate, normal_class)
        for name, pdf, mdf, rule in (("normal vs abnormal AUROC, patient level", probe_pat, model_pat, True),
                                     ("normal vs abnormal AUROC, image level", probe, lab, False)):
            ml = labelled_rows(mdf)
            a = auroc_with_ci(1 - pdf[f"p_{normal_class}"].to_numpy(), pdf["label"].astype(str).to_numpy() != normal_class,
                              pdf["group"].astype(str).tolist(), **kw)
            b = auroc_with_ci(1 - ml[f"p_{normal_class}"].to_numpy(), ml["label"].astype(str).to_numpy() != normal_class,
                              ml["group"].astype(str).tolist(), **kw)
            comparisons.append(_pair(name, a["auroc"], a["ci"], b["auroc"], b["ci"], cfg, rule=rule))
    warn = any(c["warning"] for c in comparisons)
    per_class = {c: {"probe": pp["per_class"][c]["auroc"], "model": model_patient["per_class"][c]["auroc"]}
                 for c in classes}
    base.update({
        "available": True, "folds": fold_source, "n_images": int(len(lab)), "n_groups": int(lab["group"].nunique()),
        "n_features": int(feats.shape[1]), "comparisons": comparisons, "per_class_auroc_patient": per_class,
        "probe_image_level": _brief(pi), "probe_patient_level": _brief(pp),
        "top_features": top_features(feats, y, classes), "warning": warn,
        "message": _message(warn, comparisons, normal_class),
    })
    return base, probe


def _rule_text(cfg) -> str:
    return (f"warn when, for the patient-level macro AUROC or normal-vs-abnormal AUROC, the probe's AUROC is "
            f">= {cfg.probe_floor:.2f}, or its lower {cfg.confidence:.0%} bound is above 0.5 and it is within "
            f"{cfg.probe_margin:.2f} of the model's")


def _pair(name: str, probe_auc: float, probe_ci: list, model_auc: float, model_ci: list, cfg,
          rule: bool = True) -> dict:
    warn, reason = verdict(probe_auc, probe_ci[0], model_auc, cfg.probe_floor, cfg.probe_margin)
    return {"metric": name, "probe": probe_auc, "probe_ci": probe_ci, "model": model_auc, "model_ci": model_ci,
            "difference": (model_auc - probe_auc) if np.isfinite(model_auc) and np.isfinite(probe_auc) else None,
            "warning": bool(warn and rule), "reason": reason if rule else "shown for reference (rule uses patient level)"}


def _brief(m: dict) -> dict:
    return {k: m[k] for k in ("n", "accuracy", "balanced_accuracy", "macro_auroc", "micro_auroc")} | {"ci": m["ci"]}


def _message(warn: bool, comparisons: list[dict], normal_class: str) -> str:
    if not warn:
        return ("The low-level image statistics do not separate the classes by the warning rule. This does not "
                "rule out shortcuts these statistics do not capture.")
    hits = [c for c in comparisons if c["warning"]]
    parts = "; ".join(f"{c['metric']}: probe {c['probe']:.3f} vs model {c['model']:.3f}" for c in hits)
    text = (f"A classifier that sees no anatomy, only image statistics (histogram, size, borders, "
            f"overlays), separates the classes ({parts}). In these data the classes can be told apart by image "
            "source (scanner, centre, export, overlays), so the model's results are not evidence that it "
            "learned the anatomy.")
    if any("normal vs abnormal" in c["metric"] for c in hits):
        text += (f" In particular, on this dataset the separation of {normal_class} from abnormal images can come "
                 "from image source rather than anatomy.")
    return text
