"""One 0-1 image-quality score from the label-free signals, and how it is fitted and judged.

The score is ``1 - P(measurement failure | signals)`` from an L2-regularised logistic
regression on standardised, partly log-transformed signals (scikit-learn), where *failure*
is ``|HC difference| > 5 mm`` or *no head found*. The fitted model is a small JSON file —
feature list, transforms, imputation values, scaler mean/scale, coefficients, intercept and
the re-acquire threshold — so shipping and loading it needs no pickle
(:meth:`QualityModel.to_json` / :meth:`QualityModel.from_json`).

Rules:

- A model that uses segmentation signals gives **quality 0** to an image where no head was
  found (``head_found`` false): the measurement has already failed.
- Missing signal values are imputed with the training median (stored in the JSON).
- The re-acquire threshold is chosen on the *training* data only
  (:func:`choose_threshold`: the lowest quality cut-off that flags at least
  ``target_sensitivity`` of the training failures), never on the data it is judged on.

:func:`evaluate_out_of_fold` fits and thresholds the model on K-1 folds of exams and scores
the held-out fold (grouped by exam: no exam on both sides), and reports AUROC with an
exam-bootstrap CI and the error-coverage curve.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from fetalscan.errors import DataError, FetalscanError
from fetalscan.quality.signals import IMAGE_SIGNALS, SEGMENTATION_SIGNALS

#: Signals that enter the model through log(x + eps) (heavy right tails).
LOG_SIGNALS: dict[str, float] = {
    "sharpness": 1e-6, "gradient_energy": 1e-6, "cnr": 1e-3, "ellipse_residual": 1e-4,
    "tta_dice_disagreement": 1e-4, "tta_hc_spread": 1e-4, "uncertain_fraction": 1e-3,
}

#: Signals that enter as their distance from the ideal value 1: |log(x)|.
ABS_LOG_SIGNALS: frozenset[str] = frozenset({"area_ratio"})

FULL_FEATURES: tuple[str, ...] = IMAGE_SIGNALS + SEGMENTATION_SIGNALS
IMAGE_FEATURES: tuple[str, ...] = IMAGE_SIGNALS

#: The shipped models, written by ``benchmarks/quality_score.py``.
MODEL_DIR = Path(__file__).with_name("models")


@dataclass
class QualityModel:
    """A fitted quality model (see the module docstring); JSON-serialisable."""

    name: str
    features: list[str]
    impute: list[float]
    mean: list[float]
    scale: list[float]
    coef: list[float]
    intercept: float
    threshold: float = 0.5
    uses_segmentation: bool = True
    meta: dict = field(default_factory=dict)

    # ---- features

    @staticmethod
    def transform_column(name: str, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=float)
        if name in LOG_SIGNALS:
            return np.log(np.clip(x, 0.0, None) + LOG_SIGNALS[name])
        if name in ABS_LOG_SIGNALS:
            return np.abs(np.log(np.clip(x, 1e-3, None)))
        return x

    def design(self, table) -> np.ndarray:
        """Transformed, imputed, standardised (n, k) matrix of a table with the feature columns."""
        cols = []
        for j, name in enumerate(self.features):
            if name not in table:
                raise DataError(f"quality model {self.name!r}: the signals table has no column {name!r}")
            x = self.transform_column(name, np.asarray(table[name], dtype=float))
            x = np.where(np.isfinite(x), x, self.impute[j])
            cols.append(x)
        X = np.stack(cols, axis=1) if cols else np.zeros((len(table), 0))
        return (X - np.asarray(self.mean)) / np.asarray(self.scale)

    def failure_probability(self, table) -> np.ndarray:
        z = self.design(table) @ np.asarray(self.coef) + self.intercept
        p = 1.0 / (1.0 + np.exp(-np.clip(z, -60, 60)))
        if self.uses_segmentation and "head_found" in table:
            found = np.asarray(table["head_found"]).astype(str) == "True"
            p = np.where(found, p, 1.0)
        return p

    def predict_quality(self, table) -> np.ndarray:
        """Quality in [0, 1] (1 - failure probability) of each row of ``table``."""
        return 1.0 - self.failure_probability(table)

    # ---- files

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(asdict(self), indent=1, allow_nan=False)
        if path is not None:
            Path(path).write_text(text + "\n", encoding="utf-8")
        return text

    @classmethod
    def from_json(cls, path: str | Path) -> QualityModel:
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
            model = cls(**d)
        except FileNotFoundError:
            raise DataError(f"{path}: no such quality model file") from None
        except (json.JSONDecodeError, TypeError, UnicodeDecodeError) as exc:
            raise DataError(f"{path}: not a fetalscan quality model JSON ({exc})") from None
        k = len(model.features)
        if not all(len(v) == k for v in (model.impute, model.mean, model.scale, model.coef)):
            raise DataError(f"{path}: features, impute, mean, scale and coef must have the same length")
        return model


def load_quality_model(path: str | Path | None = None, kind: str = "full") -> QualityModel:
    """A quality model from ``path``, else the shipped one of ``kind`` (``full`` or ``image``)."""
    if path is not None:
        return QualityModel.from_json(path)
    if kind not in ("full", "image"):
        raise FetalscanError(f"kind must be 'full' or 'image', got {kind!r}")
    return QualityModel.from_json(MODEL_DIR / f"quality_{kind}.json")


def failure_labels(abs_diff_mm: Sequence[float | None], head_found: Sequence[bool], limit_mm: float = 5.0) -> np.ndarray:
    """1 where ``|HC difference| > limit_mm`` or no head was found, else 0."""
    d = np.array([np.nan if v is None else float(v) for v in abs_diff_mm], dtype=float)
    found = np.asarray(head_found, dtype=bool)
    return ((~found) | (np.nan_to_num(np.abs(d), nan=np.inf) > limit_mm)).astype(int)


def fit_quality_model(table, y: Sequence[int], features: Sequence[str], *, name: str = "quality",
                      C: float = 1.0, target_sensitivity: float = 0.8, seed: int = 0) -> QualityModel:
    """Fit the logistic regression on ``table[features]`` -> ``y`` (1 = failure) and its threshold.

    Rows without a head (``head_found`` false) are left out of the regression when segmentation
    signals are used (their quality is 0 by rule) but count in the threshold choice.
    """
    from sklearn.linear_model import LogisticRegression

    y = np.asarray(y, dtype=int)
    features = list(features)
    uses_seg = any(f in SEGMENTATION_SIGNALS for f in features)
    found = (np.asarray(table["head_found"]).astype(str) == "True") if "head_found" in table else np.ones(len(y), bool)
    rows = found if uses_seg else np.ones(len(y), bool)
    raw = np.stack([QualityModel.transform_column(f, np.asarray(table[f], dtype=float)) for f in features], axis=1)
    impute = [float(np.nanmedian(raw[rows, j])) if np.isfinite(raw[rows, j]).any() else 0.0 for j in range(len(features))]
    X = np.where(np.isfinite(raw), raw, np.asarray(impute))
    mean = X[rows].mean(axis=0)
    scale = X[rows].std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    Z = (X - mean) / scale
    if len(set(y[rows].tolist())) < 2:
        raise DataError(f"cannot fit the quality model: the training rows have only class {sorted(set(y[rows].tolist()))}")
    lr = LogisticRegression(C=C, max_iter=2000, random_state=seed).fit(Z[rows], y[rows])
    model = QualityModel(name=name, features=features, impute=impute, mean=mean.tolist(), scale=scale.tolist(),
                         coef=lr.coef_[0].tolist(), intercept=float(lr.intercept_[0]), uses_segmentation=uses_seg,
                         meta={"C": C, "target_sensitivity": target_sensitivity, "n_train": int(len(y)),
                               "n_failures": int(y.sum()), "failure": "|HC difference| > 5 mm or no head found"})
    model.threshold = choose_threshold(model.predict_quality(table), y, target_sensitivity)
    return model


def choose_threshold(quality: np.ndarray, y: np.ndarray, target_sensitivity: float = 0.8) -> float:
    """Smallest cut-off ``t`` such that ``quality < t`` flags >= ``target_sensitivity`` of the failures.

    The cut-off lies halfway between the deciding failure's quality and the next higher quality.
    """
    q, y = np.asarray(quality, float), np.asarray(y, int)
    fails = np.sort(q[y == 1])
    if fails.size == 0:
        return 0.0
    k = int(math.ceil(target_sensitivity * fails.size)) - 1
    qk = fails[max(k, 0)]
    above = q[q > qk]
    return float((qk + above.min()) / 2.0) if above.size else float(qk + 1e-9)


def auroc(y: np.ndarray, score: np.ndarray) -> float:
    """AUROC of ``score`` for ``y == 1`` (Mann-Whitney; ties count one half); NaN with one class."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y, int)
    return float(roc_auc_score(y, score)) if len(set(y.tolist())) == 2 else float("nan")


def bootstrap_auroc(y: np.ndarray, score: np.ndarray, groups: Sequence, n_boot: int = 2000, seed: int = 0) -> list[float]:
    """95 % percentile CI of the AUROC, resampling groups (exams) with replacement."""
    rng = np.random.default_rng(seed)
    y, score, groups = np.asarray(y, int), np.asarray(score, float), np.asarray(groups)
    uniq, inv = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inv == g) for g in range(len(uniq))]
    vals = []
    for _ in range(n_boot):
        idx = np.concatenate([members[g] for g in rng.integers(0, len(uniq), len(uniq))])
        v = auroc(y[idx], score[idx])
        if math.isfinite(v):
            vals.append(v)
    return [float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))] if vals else [float("nan")] * 2


def error_coverage(quality: np.ndarray, abs_err: np.ndarray, fractions: Sequence[float] = (0.0, 0.05, 0.10, 0.20)) -> list[dict]:
    """Mean |HC difference| of the measured images kept when the lowest-quality fraction is set aside.

    ``abs_err`` NaN = no head found; such an image counts in the fraction set aside (if it is among
    the lowest) but never in a mean. Ties in quality are broken by order (stable sort).
    """
    q, e = np.asarray(quality, float), np.asarray(abs_err, float)
    order = np.argsort(q, kind="stable")
    out = []
    for f in fractions:
        n_drop = int(round(f * len(q)))
        keep = order[n_drop:]
        ek = e[keep]
        ek = ek[np.isfinite(ek)]
        out.append({"set_aside": float(f), "n_set_aside": n_drop, "n_kept_measured": int(ek.size),
                    "mean_abs_hc_diff_mm": float(ek.mean()) if ek.size else float("nan"),
                    "share_over_5mm": float(np.mean(ek > 5.0)) if ek.size else float("nan")})
    return out


def evaluate_out_of_fold(table, y: Sequence[int], groups: Sequence, features: Sequence[str], *, n_splits: int = 5,
                         C: float = 1.0, target_sensitivity: float = 0.8, seed: int = 0, n_boot: int = 2000,
                         abs_err: Sequence[float] | None = None, folds: Sequence[int] | None = None) -> dict:
    """Grouped K-fold: fit + threshold on K-1 folds of groups, score the held-out fold.

    Returns a dict with the out-of-fold ``quality``, ``reacquire`` (each row against its own
    fold's threshold), ``fold``, AUROC + CI, sensitivity / specificity / share flagged of the
    re-acquire rule, and the error-coverage curve (with ``abs_err``). ``folds`` (one fold number
    per row) replaces the seeded StratifiedGroupKFold; an exam found in two folds is refused.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    y = np.asarray(y, int)
    groups = np.asarray(groups).astype(str)
    n = len(y)
    q = np.full(n, np.nan)
    flag = np.zeros(n, bool)
    fold = np.full(n, -1)
    thresholds = []
    if folds is None:
        splits = list(StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed).split(np.zeros(n), y, groups))
    else:
        f = np.asarray(folds)
        splits = [(np.flatnonzero(f != k), np.flatnonzero(f == k)) for k in np.unique(f)]
        n_splits = len(splits)
    for k, (tr, te) in enumerate(splits):
        if set(groups[tr]) & set(groups[te]):
            raise FetalscanError("leakage: an exam is on both sides of a quality-model fold")
        tab_tr = table.iloc[tr].reset_index(drop=True)
        tab_te = table.iloc[te].reset_index(drop=True)
        model = fit_quality_model(tab_tr, y[tr], features, C=C, target_sensitivity=target_sensitivity, seed=seed)
        q[te] = model.predict_quality(tab_te)
        flag[te] = q[te] < model.threshold
        fold[te] = k
        thresholds.append(model.threshold)
    fails = y == 1
    res = {
        "n": int(n), "n_groups": int(len(set(groups))), "n_failures": int(fails.sum()),
        "features": list(features), "n_splits": n_splits, "C": C,
        "auroc": auroc(y, -q), "auroc_ci95": bootstrap_auroc(y, -q, groups, n_boot, seed),
        "thresholds": thresholds,
        "reacquire_rule": {
            "target_sensitivity_on_training_folds": target_sensitivity,
            "sensitivity": float(flag[fails].mean()) if fails.any() else float("nan"),
            "specificity": float((~flag[~fails]).mean()) if (~fails).any() else float("nan"),
            "share_flagged": float(flag.mean()),
        },
        "quality": q, "reacquire": flag, "fold": fold,
    }
    if abs_err is not None:
        res["error_coverage"] = error_coverage(q, np.asarray(abs_err, float))
    return res
