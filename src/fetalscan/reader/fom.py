"""Figures of merit of a reader study: empirical AUC, sensitivity, specificity, ROC points.

The empirical AUC is the Mann-Whitney statistic with ties counted one half (Hanley & McNeil
1982), written through its structural components (DeLong, DeLong & Clarke-Pearson 1988):
``V10[a]`` = share of normal cases that abnormal case ``a`` outranks, ``V01[b]`` = share of
abnormal cases that outrank normal case ``b``; the AUC is the mean of either.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass
class Structural:
    """Structural components of the AUC of every (treatment, reader): ``auc`` (t, r),
    ``v10`` (t, r, m) over abnormal cases, ``v01`` (t, r, n) over normal cases, and
    ``psi`` (t, r, m, n) the pairwise kernel (1 when the abnormal case ranks higher, ½ on a tie)."""

    auc: np.ndarray
    v10: np.ndarray
    v01: np.ndarray
    psi: np.ndarray


def structural_components(ratings: np.ndarray, truth: np.ndarray) -> Structural:
    """Mann-Whitney kernel and structural components of ratings ``(..., c)`` for cases with ``truth`` (c,)."""
    pos = ratings[..., truth == 1]
    neg = ratings[..., truth == 0]
    psi = (pos[..., :, None] > neg[..., None, :]).astype(float)
    psi += 0.5 * (pos[..., :, None] == neg[..., None, :])
    return Structural(auc=psi.mean(axis=(-1, -2)), v10=psi.mean(axis=-1), v01=psi.mean(axis=-2), psi=psi)


def empirical_auc(ratings: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Empirical (trapezoidal) AUC of ratings ``(..., c)``: Mann-Whitney, ties ½."""
    return structural_components(ratings, truth).auc


def sensitivity(answers: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Share of abnormal cases answered abnormal; ``answers`` (..., c) of 0/1."""
    return answers[..., truth == 1].mean(axis=-1)


def specificity(answers: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Share of normal cases answered normal; ``answers`` (..., c) of 0/1."""
    return 1.0 - answers[..., truth == 0].mean(axis=-1)


def wilson_ci(successes: float, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Wilson score interval of a proportion (Wilson 1927); ``(nan, nan)`` for ``n == 0``."""
    if n == 0:
        return float("nan"), float("nan")
    z = stats.norm.ppf(1 - alpha / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def roc_points(ratings: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Empirical ROC operating points ``(fpr, tpr)`` of one reader's ratings (c,), from (0, 0) to (1, 1)."""
    thresholds = np.unique(ratings)[::-1]
    pos, neg = ratings[truth == 1], ratings[truth == 0]
    tpr = np.array([0.0] + [(pos >= t).mean() for t in thresholds])
    fpr = np.array([0.0] + [(neg >= t).mean() for t in thresholds])
    return fpr, tpr
