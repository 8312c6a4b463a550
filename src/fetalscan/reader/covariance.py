"""Error covariance of a figure of merit across (treatment, reader) pairs, over random cases.

Each function returns a ``(t*r, t*r)`` matrix, rows in treatment-major order (index
``i*r + j`` is treatment ``i``, reader ``j``): the covariance, across case samples, of the
figure-of-merit estimates. The Obuchowski-Rockette analysis averages it into ``Var``,
``Cov1`` (same reader, different treatments), ``Cov2`` (different readers, same treatment)
and ``Cov3`` (different readers and treatments).

- **jackknife**: leave one case out, ``(c-1)/c * sum_k (theta_(k) - mean)(...)'`` (Efron 1981;
  the estimator of Obuchowski & Rockette 1995 and of the DBM pseudovalues, Dorfman, Berbaum
  & Metz 1992). For the AUC, the leave-one-out values come from the structural components.
- **delong**: ``S10/m + S01/n`` from the structural components (DeLong, DeLong &
  Clarke-Pearson 1988, Biometrics 44:837-845).
- **unbiased**: the unbiased estimator of the covariance of two Mann-Whitney statistics on
  the same cases (Gallas, Pennello & Myers 2007; used in Hillis 2014, Stat Med 33:330-360,
  and MRMCaov's ``unbiased()``). For a proportion (sensitivity, specificity) the sample
  covariance over the relevant cases divided by their number is both the DeLong analogue and
  unbiased.
"""

from __future__ import annotations

import numpy as np

from fetalscan.reader.fom import structural_components

METHODS = ("jackknife", "delong", "unbiased")


def jackknife_cov_from_loo(loo: np.ndarray) -> np.ndarray:
    """Jackknife covariance from leave-one-case-out estimates ``(c, k)``."""
    c = loo.shape[0]
    centred = loo - loo.mean(axis=0)
    return (c - 1) / c * centred.T @ centred


def auc_leave_one_out(ratings: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Leave-one-case-out empirical AUCs ``(c, t*r)`` of ratings ``(t, r, c)``.

    Removing abnormal case ``a`` gives ``(m*AUC - V10[a]) / (m-1)``; removing normal case
    ``b`` gives ``(n*AUC - V01[b]) / (n-1)``.
    """
    t, r, c = ratings.shape
    s = structural_components(ratings, truth)
    m, n = int((truth == 1).sum()), int((truth == 0).sum())
    loo = np.empty((c, t * r))
    auc = s.auc.reshape(-1)
    loo[truth == 1] = ((m * auc[:, None] - s.v10.reshape(t * r, m)) / (m - 1)).T
    loo[truth == 0] = ((n * auc[:, None] - s.v01.reshape(t * r, n)) / (n - 1)).T
    return loo


def proportion_leave_one_out(values: np.ndarray, truth: np.ndarray, which: int) -> np.ndarray:
    """Leave-one-case-out means ``(c, t*r)`` of 0/1 ``values`` (t, r, c) over the cases with
    ``truth == which`` (sensitivity: 1; for specificity pass ``1 - answers`` and 0)."""
    t, r, c = values.shape
    sel = truth == which
    k = int(sel.sum())
    flat = values.reshape(t * r, c)
    mean = flat[:, sel].mean(axis=1)
    loo = np.tile(mean, (c, 1))
    loo[sel] = ((k * mean[:, None] - flat[:, sel]) / (k - 1)).T
    return loo


def auc_covariance(ratings: np.ndarray, truth: np.ndarray, method: str = "jackknife") -> np.ndarray:
    """``(t*r, t*r)`` covariance of the empirical AUCs by ``method`` (jackknife, delong, unbiased)."""
    if method == "jackknife":
        return jackknife_cov_from_loo(auc_leave_one_out(ratings, truth))
    t, r, _ = ratings.shape
    s = structural_components(ratings, truth)
    m, n = s.v10.shape[-1], s.v01.shape[-1]
    if method == "delong":
        v10 = s.v10.reshape(t * r, m)
        v01 = s.v01.reshape(t * r, n)
        return np.cov(v10, ddof=1).reshape(t * r, t * r) / m + np.cov(v01, ddof=1).reshape(t * r, t * r) / n
    if method == "unbiased":
        return _unbiased_auc_cov(s.psi.reshape(t * r, m, n))
    raise ValueError(f"unknown covariance method {method!r}; expected one of {', '.join(METHODS)}")


def _unbiased_auc_cov(psi: np.ndarray) -> np.ndarray:
    """Unbiased covariance of Mann-Whitney statistics from their kernels ``psi`` (k, m, n), same cases.

    With ``S`` the kernel sums, ``P`` the per-abnormal-case sums and ``N`` the per-normal-case
    sums, ``cov = [(1-d) S S' + d (P P' + N N' - K K')] / (mn)^2`` where
    ``d = (mn)^2 / (m(m-1) n(n-1))`` (Gallas, Pennello & Myers 2007).
    """
    k, m, n = psi.shape
    total = psi.sum(axis=(1, 2))
    per_pos = psi.sum(axis=2)
    per_neg = psi.sum(axis=1)
    flat = psi.reshape(k, m * n)
    delta = (m * n) ** 2 / (m * (m - 1) * n * (n - 1))
    out = (1 - delta) * np.outer(total, total) + delta * (per_pos @ per_pos.T + per_neg @ per_neg.T - flat @ flat.T)
    return out / (m * n) ** 2


def proportion_covariance(values: np.ndarray, truth: np.ndarray, which: int, method: str = "jackknife") -> np.ndarray:
    """``(t*r, t*r)`` covariance of a proportion (sensitivity: ``which=1``; specificity: values
    ``1 - answers``, ``which=0``): jackknife, or the unbiased sample covariance / k
    (``delong`` and ``unbiased`` coincide for a mean of 0/1 values)."""
    if method == "jackknife":
        return jackknife_cov_from_loo(proportion_leave_one_out(values, truth, which))
    if method in ("delong", "unbiased"):
        t, r, _ = values.shape
        sel = values.reshape(t * r, -1)[:, truth == which]
        return np.atleast_2d(np.cov(sel, ddof=1)) / sel.shape[1]
    raise ValueError(f"unknown covariance method {method!r}; expected one of {', '.join(METHODS)}")
