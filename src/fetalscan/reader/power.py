"""Power of the Obuchowski-Rockette random-reader random-case test for a planned study.

The method of Hillis & Berbaum (2004, Acad Radiol 11:1261-1270) in its OR form (Hillis,
Obuchowski & Berbaum 2011, "Power estimation for multireader ROC methods: an updated and
unified approach", Acad Radiol 18:129-142): the OR parameters ``sigma2_TR`` (treatment x
reader variance), ``Var``, ``Cov1``, ``Cov2``, ``Cov3`` come from a pilot study (or are given);
the error covariances scale with the number of cases as ``c_pilot / K``; for ``J`` readers,

    E[den]   = sigma2_TR + Var - Cov1 + (J-1) (Cov2 - Cov3)
    lambda   = J * sum_i (tau_i - mean tau)^2 / E[den]      (= J d^2 / (2 E[den]) for two treatments)
    ddf_H    = E[den]^2 / {[sigma2_TR + Var - Cov1 - Cov2 + Cov3]^2 / ((t-1)(J-1))}
    power    = P(F'(t-1, ddf_H; lambda) > F_{1-alpha}(t-1, ddf_H)),

with ``sigma2_TR = MS(T*R) - (Var - Cov1 - Cov2 + Cov3)`` estimated from the pilot and set to 0
when negative, and ``Cov2 - Cov3`` set to 0 when negative (Hillis 2007). Checked against a
Roe-Metz (1997) simulation in ``tests/test_reader_mrmc.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

from fetalscan.errors import FetalscanError
from fetalscan.reader.covariance import auc_covariance
from fetalscan.reader.fom import empirical_auc
from fetalscan.reader.mrmc import components
from fetalscan.reader.reads import Reads


@dataclass
class ORParameters:
    """OR variance components of an AUC study, at ``n_cases`` cases; ``effect`` is the pilot's
    difference (first minus second treatment), a default for the planned effect."""

    var_tr: float
    var: float
    cov1: float
    cov2: float
    cov3: float
    n_cases: int
    effect: float = float("nan")
    n_treatments: int = 2

    def as_dict(self) -> dict:
        return {k: float(v) if isinstance(v, float) else v for k, v in self.__dict__.items()}


@dataclass
class PowerResult:
    """Power of the RRRC test and the quantities it came from."""

    power: float
    readers: int
    cases: int
    effect: float
    alpha: float
    df1: int
    df2: float
    noncentrality: float
    f_critical: float
    parameters: ORParameters

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "parameters"}
        d["parameters"] = self.parameters.as_dict()
        return d


def or_parameters(theta: np.ndarray, cov: np.ndarray, n_cases: int) -> ORParameters:
    """OR parameters from figures of merit ``(t, r)`` and their covariance (a pilot study)."""
    k = components(theta, cov)
    var_tr = max(k.ms_tr - (k.var - k.cov1 - k.cov2 + k.cov3), 0.0)
    effect = float(theta[0].mean() - theta[1].mean())
    return ORParameters(var_tr, k.var, k.cov1, k.cov2, k.cov3, n_cases, effect, theta.shape[0])


def or_parameters_from_reads(reads: Reads, treatments: tuple[str, str] | None = None,
                             cov_method: str = "jackknife") -> ORParameters:
    """OR parameters of the empirical AUC of a pilot study (two of its treatments; default the first two)."""
    names = list(treatments) if treatments else reads.treatments[:2]
    unknown = [n for n in names if n not in reads.treatments]
    if unknown:
        raise FetalscanError(f"{reads.source}: treatment(s) {', '.join(map(repr, unknown))} not in the pilot; it has "
                             f"{', '.join(map(repr, reads.treatments))}")
    if reads.split_plot:
        raise FetalscanError(f"{reads.source}: a split-plot pilot; power is computed from a fully crossed pilot only "
                             "(or give the OR components directly)")
    sub = reads.subset_treatments(names)
    theta = empirical_auc(sub.ratings, sub.truth)
    return or_parameters(theta, auc_covariance(sub.ratings, sub.truth, cov_method), len(sub.cases))


def or_power(params: ORParameters, readers: int, cases: int, effect: float | None = None,
             alpha: float = 0.05) -> PowerResult:
    """Power of the two-treatment OR RRRC test with ``readers`` readers and ``cases`` cases."""
    if readers < 2 or cases < 2:
        raise FetalscanError(f"a planned study needs at least 2 readers and 2 cases; got {readers} and {cases}")
    if not 0 < alpha < 1:
        raise FetalscanError(f"alpha must lie between 0 and 1; got {alpha}")
    d = params.effect if effect is None else effect
    if not np.isfinite(d):
        raise FetalscanError("no effect size: give --effect (the AUC difference the study should detect)")
    scale = params.n_cases / cases
    var, cov1, cov2, cov3 = (scale * v for v in (params.var, params.cov1, params.cov2, params.cov3))
    t, j = 2, readers
    den = params.var_tr + var - cov1 + (j - 1) * max(cov2 - cov3, 0.0)
    ms_tr = params.var_tr + var - cov1 - cov2 + cov3
    if den <= 0 or ms_tr <= 0:
        raise FetalscanError("the variance components give a non-positive error variance; check them")
    lam = j * d * d / 2 / den
    df2 = den ** 2 / (ms_tr ** 2 / ((t - 1) * (j - 1)))
    fcrit = float(stats.f.ppf(1 - alpha, t - 1, df2))
    # scipy's non-central F is wrong at noncentrality 0 (it returns sf - 1); the central F is exact there
    power = float(stats.f.sf(fcrit, t - 1, df2) if lam == 0 else stats.ncf.sf(fcrit, t - 1, df2, lam))
    return PowerResult(power, readers, cases, float(d), alpha, t - 1, float(df2), float(lam), fcrit, params)
