"""Obuchowski-Rockette (OR) and Dorfman-Berbaum-Metz (DBM) analysis of a multi-reader multi-case study.

Input: figures of merit ``theta`` (t treatments, r readers) and their error covariance over
cases (:mod:`fetalscan.reader.covariance`). The OR model (Obuchowski & Rockette 1995,
Commun Stat Simul Comput 24:285-308) is a treatment x reader ANOVA of ``theta`` whose errors
are correlated through the shared cases; their covariance is summarised by ``Var``, ``Cov1``
(same reader, different treatments), ``Cov2`` (different readers, same treatment) and ``Cov3``
(different readers, different treatments).

Three generalisations (Hillis, Obuchowski & Berbaum 2008; Hillis 2007):

- **random readers, random cases (RRRC)**: ``F = MS(T) / (MS(T*R) + r max(Cov2 - Cov3, 0))``
  with the denominator degrees of freedom of Hillis (2007, Stat Med 26:596-619)
  ``df2 = [MS(T*R) + r max(Cov2-Cov3, 0)]^2 / {MS(T*R)^2 / ((t-1)(r-1))}``; the CI of a
  difference of treatment means is ``diff +/- t_{df2} sqrt(2/r * denominator)``.
- **fixed readers, random cases (FRRC)**: ``chi2 = (t-1) MS(T) / (Var - Cov1 + (r-1) max(Cov2-Cov3, 0))``
  on ``t-1`` df; normal-theory CI.
- **random readers, fixed cases (RRFC)**: ``F = MS(T) / MS(T*R)`` on ``(t-1, (t-1)(r-1))`` df.

With more than two treatments the omnibus test is reported and every pairwise difference
uses the same error term and df (as OR-DBM MRMC and MRMCaov do). Single-treatment CIs use
``MS(R_i)/r + max(Cov2_i, 0)`` with a Satterthwaite df (Hillis, Obuchowski & Berbaum 2008).

DBM (Dorfman, Berbaum & Metz 1992, Invest Radiol 27:723-731) runs a treatment x reader x
case ANOVA on jackknife pseudovalues; with the Hillis (2007) df and pseudovalues centred on
the figures of merit its RRRC test equals OR with jackknife covariance, a cross-check.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import numpy as np
from scipy import stats


@dataclass
class Components:
    """Averaged OR covariance components and ANOVA mean squares of one analysis."""

    var: float
    cov1: float
    cov2: float
    cov3: float
    ms_t: float
    ms_tr: float
    ms_r: float
    n_treatments: int
    n_readers: int

    def as_dict(self) -> dict:
        return {k: float(v) for k, v in self.__dict__.items()}


def average_covariances(cov: np.ndarray, t: int, r: int) -> tuple[float, float, float, float]:
    """``Var, Cov1, Cov2, Cov3`` of a ``(t*r, t*r)`` covariance in treatment-major order."""
    trt = np.repeat(np.arange(t), r)
    rdr = np.tile(np.arange(r), t)
    same_t = trt[:, None] == trt[None, :]
    same_r = rdr[:, None] == rdr[None, :]

    def mean(mask: np.ndarray) -> float:
        return float(cov[mask].mean()) if mask.any() else 0.0

    return mean(same_t & same_r), mean(~same_t & same_r), mean(same_t & ~same_r), mean(~same_t & ~same_r)


def mean_squares(theta: np.ndarray) -> tuple[float, float, float]:
    """``MS(T), MS(T*R), MS(R)`` of a ``(t, r)`` table with one value per cell."""
    t, r = theta.shape
    grand = theta.mean()
    ti, rj = theta.mean(axis=1), theta.mean(axis=0)
    ms_t = r * ((ti - grand) ** 2).sum() / (t - 1) if t > 1 else float("nan")
    ms_r = t * ((rj - grand) ** 2).sum() / (r - 1)
    resid = theta - ti[:, None] - rj[None, :] + grand
    ms_tr = (resid ** 2).sum() / ((t - 1) * (r - 1)) if t > 1 else float("nan")
    return float(ms_t), float(ms_tr), float(ms_r)


def components(theta: np.ndarray, cov: np.ndarray) -> Components:
    """OR components of figures of merit ``theta`` (t, r) with covariance ``cov`` (t*r, t*r)."""
    t, r = theta.shape
    var, c1, c2, c3 = average_covariances(cov, t, r)
    ms_t, ms_tr, ms_r = mean_squares(theta)
    return Components(var, c1, c2, c3, ms_t, ms_tr, ms_r, t, r)


def _pairs(t: int) -> list[tuple[int, int]]:
    return list(combinations(range(t), 2))


def _pairwise(theta: np.ndarray, names: list[str], se: float, df: float | None, alpha: float) -> list[dict]:
    """Differences of treatment means (first minus second) with t (or z when ``df`` is None) tests."""
    means = theta.mean(axis=1)
    q = stats.norm.ppf(1 - alpha / 2) if df is None else stats.t.ppf(1 - alpha / 2, df)
    out = []
    for a, b in _pairs(len(names)):
        diff = float(means[a] - means[b])
        stat = diff / se if se > 0 else float("nan")
        p = 2 * (stats.norm.sf(abs(stat)) if df is None else stats.t.sf(abs(stat), df))
        out.append({"a": names[a], "b": names[b], "diff": diff, "se": float(se), "stat": float(stat),
                    "df": None if df is None else float(df), "p": float(p),
                    "ci_low": diff - q * se, "ci_high": diff + q * se})
    return out


def rrrc(theta: np.ndarray, cov: np.ndarray, names: list[str], alpha: float = 0.05) -> dict:
    """Random readers and random cases: OR F test with the Hillis (2007) denominator df."""
    k = components(theta, cov)
    t, r = theta.shape
    den = k.ms_tr + r * max(k.cov2 - k.cov3, 0.0)
    df1 = t - 1
    df2 = den ** 2 / (k.ms_tr ** 2 / ((t - 1) * (r - 1))) if k.ms_tr > 0 else float("inf")
    f = k.ms_t / den if den > 0 else float("nan")
    pairs = _pairwise(theta, names, np.sqrt(2 / r * den), df2, alpha)
    return {"diff": pairs[0]["diff"], "F": float(f), "df1": df1, "df2": float(df2),
            "p": float(stats.f.sf(f, df1, df2)), "ci_low": pairs[0]["ci_low"], "ci_high": pairs[0]["ci_high"],
            "pairwise": pairs, "denominator": float(den), "components": k.as_dict()}


def frrc(theta: np.ndarray, cov: np.ndarray, names: list[str], alpha: float = 0.05) -> dict:
    """Fixed readers, random cases: chi-square test on t-1 df (Hillis, Obuchowski & Berbaum 2008)."""
    k = components(theta, cov)
    t, r = theta.shape
    den = k.var - k.cov1 + (r - 1) * max(k.cov2 - k.cov3, 0.0)
    chi2 = (t - 1) * k.ms_t / den if den > 0 else float("nan")
    pairs = _pairwise(theta, names, np.sqrt(2 / r * den), None, alpha)
    return {"diff": pairs[0]["diff"], "chi2": float(chi2), "df": t - 1, "p": float(stats.chi2.sf(chi2, t - 1)),
            "ci_low": pairs[0]["ci_low"], "ci_high": pairs[0]["ci_high"], "pairwise": pairs,
            "per_reader": _per_reader(theta, cov, alpha)}


def _per_reader(theta: np.ndarray, cov: np.ndarray, alpha: float) -> list[dict]:
    """Each reader's difference (first minus second treatment of every pair) with a normal CI."""
    t, r = theta.shape
    z = stats.norm.ppf(1 - alpha / 2)
    out = []
    for a, b in _pairs(t):
        for j in range(r):
            ia, ib = a * r + j, b * r + j
            var = cov[ia, ia] + cov[ib, ib] - 2 * cov[ia, ib]
            se = float(np.sqrt(max(var, 0.0)))
            d = float(theta[a, j] - theta[b, j])
            out.append({"pair": [a, b], "reader": j, "diff": d, "se": se, "ci_low": d - z * se, "ci_high": d + z * se})
    return out


def rrfc(theta: np.ndarray, names: list[str], alpha: float = 0.05) -> dict:
    """Random readers, fixed cases: ``F = MS(T)/MS(T*R)`` on ``(t-1, (t-1)(r-1))`` df."""
    t, r = theta.shape
    ms_t, ms_tr, _ = mean_squares(theta)
    df1, df2 = t - 1, (t - 1) * (r - 1)
    f = ms_t / ms_tr if ms_tr > 0 else float("nan")
    pairs = _pairwise(theta, names, np.sqrt(2 / r * ms_tr), df2, alpha)
    return {"diff": pairs[0]["diff"], "F": float(f), "df1": df1, "df2": float(df2),
            "p": float(stats.f.sf(f, df1, df2)), "ci_low": pairs[0]["ci_low"], "ci_high": pairs[0]["ci_high"],
            "pairwise": pairs}


def single_treatment(theta: np.ndarray, cov: np.ndarray, names: list[str], alpha: float = 0.05) -> dict:
    """Per-treatment mean with RRRC, FRRC and RRFC confidence intervals (clipped to [0, 1])."""
    t, r = theta.shape
    out = {}
    for i, name in enumerate(names):
        block = cov[i * r:(i + 1) * r, i * r:(i + 1) * r]
        var, _, cov2, _ = average_covariances(block, 1, r)
        mean = float(theta[i].mean())
        ms_r = float(theta[i].var(ddof=1))
        se_rr = np.sqrt(ms_r / r + max(cov2, 0.0))
        df = (ms_r + r * max(cov2, 0.0)) ** 2 / (ms_r ** 2 / (r - 1)) if ms_r > 0 else float("inf")
        se_fr = np.sqrt((var + (r - 1) * max(cov2, 0.0)) / r)
        se_fc = np.sqrt(ms_r / r)

        def ci(se: float, q: float) -> list[float]:
            return [float(max(0.0, mean - q * se)), float(min(1.0, mean + q * se))]

        out[name] = {"mean": mean,
                     "rrrc": {"se": float(se_rr), "df": float(df), "ci": ci(se_rr, stats.t.ppf(1 - alpha / 2, df))},
                     "frrc": {"se": float(se_fr), "ci": ci(se_fr, stats.norm.ppf(1 - alpha / 2))},
                     "rrfc": {"se": float(se_fc), "df": r - 1, "ci": ci(se_fc, stats.t.ppf(1 - alpha / 2, r - 1))}}
    return out


def or_analysis(theta: np.ndarray, cov: np.ndarray, names: list[str], alpha: float = 0.05) -> dict:
    """RRRC, FRRC and RRFC analyses plus single-treatment CIs of one figure of merit."""
    return {"rrrc": rrrc(theta, cov, names, alpha), "frrc": frrc(theta, cov, names, alpha),
            "rrfc": rrfc(theta, names, alpha), "single": single_treatment(theta, cov, names, alpha)}


def dbm_pseudovalues(theta: np.ndarray, loo: np.ndarray) -> np.ndarray:
    """Jackknife pseudovalues ``(t, r, c)``, centred so that each cell's mean is its figure of merit.

    ``Y_ijk = c theta_ij - (c-1) theta_ij(k)``, shifted by ``theta_ij - mean_k Y_ijk`` (RJafroc's
    normalisation; for statistics other than the mean the raw pseudovalue mean differs slightly).
    """
    t, r = theta.shape
    c = loo.shape[0]
    y = (c * theta.reshape(-1)[None, :] - (c - 1) * loo).T.reshape(t, r, c)
    return y + (theta - y.mean(axis=2))[:, :, None]


def dbm(pseudo: np.ndarray, alpha: float = 0.05) -> dict:
    """DBM random-reader random-case F test on pseudovalues ``(t, r, c)`` with the Hillis (2007) df.

    ``F = MS(T) / (MS(T*R) + max(MS(T*C) - MS(T*R*C), 0))``.
    """
    t, r, c = pseudo.shape
    g = pseudo.mean()
    m_t, m_r, m_c = pseudo.mean(axis=(1, 2)), pseudo.mean(axis=(0, 2)), pseudo.mean(axis=(0, 1))
    m_tr, m_tc, m_rc = pseudo.mean(axis=2), pseudo.mean(axis=1), pseudo.mean(axis=0)
    ms_t = r * c * ((m_t - g) ** 2).sum() / (t - 1)
    ms_tr = c * ((m_tr - m_t[:, None] - m_r[None, :] + g) ** 2).sum() / ((t - 1) * (r - 1))
    ms_tc = r * ((m_tc - m_t[:, None] - m_c[None, :] + g) ** 2).sum() / ((t - 1) * (c - 1))
    resid = (pseudo - m_tr[:, :, None] - m_tc[:, None, :] - m_rc[None, :, :] + m_t[:, None, None]
             + m_r[None, :, None] + m_c[None, None, :] - g)
    ms_trc = (resid ** 2).sum() / ((t - 1) * (r - 1) * (c - 1))
    den = ms_tr + max(ms_tc - ms_trc, 0.0)
    f = ms_t / den
    df2 = den ** 2 / (ms_tr ** 2 / ((t - 1) * (r - 1)))
    return {"F": float(f), "df1": t - 1, "df2": float(df2), "p": float(stats.f.sf(f, t - 1, df2)),
            "ms": {"T": float(ms_t), "TR": float(ms_tr), "TC": float(ms_tc), "TRC": float(ms_trc)}}
