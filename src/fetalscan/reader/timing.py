"""Reading time by arm: medians, and a paired comparison on log time with readers and cases random.

Two models of ``y = log(seconds)`` (arm ``i``, reader ``j``, case ``k``):

- ``anova`` (default; needs every reading timed): the fully crossed mixed model
  ``y_ijk = beta_i + R_j + C_k + (AR)_ij + (AC)_ik + (RC)_jk + e_ijk`` with every effect but the
  arm random, estimated by the balanced-ANOVA (method of moments) estimators, which coincide
  with REML when no component is truncated at zero. The difference of two arms' mean log
  times has variance ``2/(rc) [MS(AR) + max(MS(AC) - MS(ARC), 0)]``, with a Satterthwaite
  (1946) df - the same construction as the DBM test of the AUC (Dorfman, Berbaum & Metz 1992;
  Hillis 2007), so readers who speed up more than others with the AI widen the CI.
- ``mixedlm``: ``y_ijk = beta_i + a_j + b_k + e_ijk`` fitted by REML with statsmodels
  ``MixedLM`` (reader and case intercepts as crossed variance components, all readings one
  group); no interactions, so its CI is narrower when readers react differently to an arm.
  Slow for large studies (dense crossed design).

``ratio = exp(beta_a - beta_b)`` is the ratio of geometric-mean reading times of arms ``a`` and
``b`` for the same reader and case.
"""

from __future__ import annotations

import logging
import warnings
from itertools import combinations

import numpy as np
from scipy import stats

from fetalscan.errors import FetalscanError
from fetalscan.reader.reads import Reads

log = logging.getLogger(__name__)

MODELS = ("anova", "mixedlm", "none")


def time_summary(reads: Reads, alpha: float = 0.05, model: str = "anova") -> dict | None:
    """Per-arm medians and pairwise ratios of reading time; ``None`` without a ``seconds`` column."""
    if model not in MODELS:
        raise FetalscanError(f"unknown reading-time model {model!r}; expected one of {', '.join(MODELS)}")
    if reads.seconds is None:
        return None
    sec = reads.seconds
    out: dict = {"median": {}, "quartiles": {}, "n": {}}
    for i, t in enumerate(reads.treatments):
        v = sec[i][np.isfinite(sec[i])]
        out["median"][t] = float(np.median(v)) if v.size else None
        out["quartiles"][t] = [float(q) for q in np.percentile(v, [25, 75])] if v.size else None
        out["n"][t] = int(v.size)
    untimed = int((np.isnan(sec) & ~np.isnan(reads.ratings)).sum())
    if model == "anova" and (untimed or reads.split_plot):
        log.warning("%s: the reading-time comparison uses MixedLM instead of the balanced ANOVA",
                    f"{untimed} reading(s) have no time" if untimed else "a split-plot study")
        model = "mixedlm"
    if model == "anova":
        out.update(anova_log_time(np.log(sec), reads.treatments, alpha))
    elif model == "mixedlm":
        out.update(mixedlm_log_time(np.log(sec), reads.treatments, alpha))
    else:
        out.update({"model": "none", "pairwise": []})
    return out


def _pair(a: str, b: str, d: float, se: float, df: float | None, alpha: float) -> dict:
    q = stats.norm.ppf(1 - alpha / 2) if df is None else stats.t.ppf(1 - alpha / 2, df)
    stat = d / se if se > 0 else float("nan")
    p = 2 * (stats.norm.sf(abs(stat)) if df is None else stats.t.sf(abs(stat), df))
    return {"a": a, "b": b, "ratio": float(np.exp(d)), "ci_low": float(np.exp(d - q * se)),
            "ci_high": float(np.exp(d + q * se)), "log_diff": float(d), "se": float(se),
            "df": None if df is None else float(df), "p": float(p)}


def anova_log_time(y: np.ndarray, names: list[str], alpha: float = 0.05) -> dict:
    """Balanced crossed mixed-model comparison of arms on log times ``y`` (t, r, c); see the module docstring."""
    t, r, c = y.shape
    g = y.mean()
    ma, mr, mc = y.mean(axis=(1, 2)), y.mean(axis=(0, 2)), y.mean(axis=(0, 1))
    mar, mac, mrc = y.mean(axis=2), y.mean(axis=1), y.mean(axis=0)
    df_ar, df_ac, df_arc = (t - 1) * (r - 1), (t - 1) * (c - 1), (t - 1) * (r - 1) * (c - 1)
    ms = {
        "R": t * c * ((mr - g) ** 2).sum() / (r - 1),
        "C": t * r * ((mc - g) ** 2).sum() / (c - 1),
        "AR": c * ((mar - ma[:, None] - mr[None, :] + g) ** 2).sum() / df_ar,
        "AC": r * ((mac - ma[:, None] - mc[None, :] + g) ** 2).sum() / df_ac,
        "RC": t * ((mrc - mr[:, None] - mc[None, :] + g) ** 2).sum() / ((r - 1) * (c - 1)),
        "ARC": ((y - mar[:, :, None] - mac[:, None, :] - mrc[None] + ma[:, None, None] + mr[None, :, None]
                 + mc[None, None, :] - g) ** 2).sum() / df_arc,
    }
    extra = ms["AC"] - ms["ARC"]
    if extra > 0:
        den = ms["AR"] + extra
        df = den ** 2 / (ms["AR"] ** 2 / df_ar + ms["AC"] ** 2 / df_ac + ms["ARC"] ** 2 / df_arc)
    else:
        den, df = ms["AR"], float(df_ar)
    se = float(np.sqrt(2 * max(den, 0.0) / (r * c)))
    pairs = [_pair(names[a], names[b], float(ma[a] - ma[b]), se, df, alpha) for a, b in combinations(range(t), 2)]
    variance = {"reader": max((ms["R"] - ms["AR"] - ms["RC"] + ms["ARC"]) / (t * c), 0.0),
                "case": max((ms["C"] - ms["AC"] - ms["RC"] + ms["ARC"]) / (t * r), 0.0),
                "arm_x_reader": max((ms["AR"] - ms["ARC"]) / c, 0.0),
                "arm_x_case": max((ms["AC"] - ms["ARC"]) / r, 0.0),
                "reader_x_case": max((ms["RC"] - ms["ARC"]) / t, 0.0),
                "residual": ms["ARC"]}
    return {"model": ("log(seconds) ~ arm + random reader, case, arm x reader, arm x case, reader x case; "
                      "balanced ANOVA estimators, Satterthwaite df; ratio = geometric-mean time of the first arm / "
                      "the second, same reader and case"),
            "method": "anova", "pairwise": pairs, "df": float(df),
            "variance": {k: float(v) for k, v in variance.items()}}


def mixedlm_log_time(y: np.ndarray, names: list[str], alpha: float = 0.05) -> dict:
    """REML fit of arm + random reader and case intercepts (statsmodels MixedLM); NaN times are left out."""
    import pandas as pd
    import statsmodels.formula.api as smf

    t, r, c = y.shape
    idx = np.indices((t, r, c)).reshape(3, -1)
    frame = pd.DataFrame({"arm": [f"a{i}" for i in idx[0]], "reader": [f"r{j}" for j in idx[1]],
                          "case": [f"c{k}" for k in idx[2]], "y": y.reshape(-1), "one": 1})
    frame = frame[np.isfinite(frame["y"])]
    described = ("log(seconds) ~ arm + (1 | reader) + (1 | case), REML (statsmodels MixedLM); ratio = geometric-mean "
                 "time of the first arm / the second, same reader and case")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = smf.mixedlm("y ~ 0 + C(arm)", frame, groups="one", re_formula="0",
                                vc_formula={"reader": "0 + C(reader)", "case": "0 + C(case)"})
            fit = model.fit(reml=True, method=["lbfgs"])
    except (ValueError, np.linalg.LinAlgError) as exc:  # a singular design: report it, do not fail the analysis
        log.warning("reading-time model could not be fitted: %s", exc)
        return {"model": described, "method": "mixedlm", "pairwise": [], "fit_error": str(exc)}
    notes = sorted({str(w.message) for w in caught})
    cols = [f"C(arm)[a{i}]" for i in range(t)]
    beta = fit.fe_params[cols].to_numpy()
    covb = fit.cov_params().loc[cols, cols].to_numpy()
    pairs = []
    for a, b in combinations(range(t), 2):
        se = float(np.sqrt(covb[a, a] + covb[b, b] - 2 * covb[a, b]))
        pairs.append(_pair(names[a], names[b], float(beta[a] - beta[b]), se, None, alpha))
    vc = dict(zip(model.exog_vc.names, np.asarray(fit.vcomp, dtype=float)))
    return {"model": described, "method": "mixedlm", "pairwise": pairs, "converged": bool(fit.converged),
            "warnings": notes,
            "variance": {"reader": float(vc.get("reader", np.nan)), "case": float(vc.get("case", np.nan)),
                         "residual": float(fit.scale)}}
