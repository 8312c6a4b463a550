"""``fetalscan reader-study analyze``: a readings CSV -> ``mrmc.json`` and ``report.html``.

Everything for the empirical AUC (per reader and treatment, with DeLong CIs), sensitivity and
specificity of the binary answer (Wilson CIs), the Obuchowski-Rockette analysis with three
covariance estimators (jackknife, DeLong, unbiased) under RRRC, FRRC and RRFC, the DBM
cross-check, OR for sensitivity and specificity, and reading times. The maths lives in
:mod:`~fetalscan.reader.covariance`, :mod:`~fetalscan.reader.mrmc` and
:mod:`~fetalscan.reader.timing`; this module assembles and writes.

``mrmc.json`` has a fixed top-level shape that other tools can read::

    {"treatments": [...], "readers": [...], "auc": {treatment: {reader: value}},
     "auc_mean": {treatment: value},
     "or": {"jackknife"|"delong"|"unbiased": {"rrrc": {"diff", "F", "df1", "df2", "p", "ci_low", "ci_high"},
                                              "frrc": {"diff", "chi2", "p", "ci_low", "ci_high"},
                                              "rrfc": {"diff", "F", "df1", "df2", "p", "ci_low", "ci_high"}}},
     "time": {...} or null, ...}

``diff`` is the first treatment minus the second in sorted (natural) order; with more than
two treatments ``F``/``chi2`` and ``p`` are the omnibus test and ``pairwise`` lists every pair.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import stats

from fetalscan.fileio import check_out_dir, prepare_out_dir, provenance, sha256_file, write_json
from fetalscan.reader import mrmc
from fetalscan.reader.covariance import METHODS, auc_covariance, auc_leave_one_out, proportion_covariance
from fetalscan.reader.fom import empirical_auc, sensitivity, specificity, wilson_ci
from fetalscan.reader.reads import Reads, load_reads
from fetalscan.reader.timing import time_summary
from fetalscan.texts import DISCLAIMER

log = logging.getLogger(__name__)

_KEEP = {"rrrc": ("diff", "F", "df1", "df2", "p", "ci_low", "ci_high"),
         "frrc": ("diff", "chi2", "p", "ci_low", "ci_high"),
         "rrfc": ("diff", "F", "df1", "df2", "p", "ci_low", "ci_high")}


@dataclass
class AnalyzeConfig:
    """Options of ``reader-study analyze``."""

    alpha: float = 0.05
    normal_label: str = "normal"
    cases: str | None = None  # a design's cases.csv (case,truth): unknown cases and wrong truths are errors
    time_model: str = "anova"  # anova (balanced crossed mixed model), mixedlm (statsmodels) or none


def _or_block(full: dict) -> dict:
    """The fixed-shape part of an OR analysis plus its pairwise and single-treatment details."""
    out = {key: {k: full[key][k] for k in keys} for key, keys in _KEEP.items()}
    for key in _KEEP:
        out[key]["pairwise"] = full[key]["pairwise"]
    out["rrrc"]["components"] = full["rrrc"]["components"]
    out["single_treatment"] = full["single"]
    return out


def _table(values: np.ndarray, reads: Reads) -> dict:
    return {t: {r: float(values[i, j]) for j, r in enumerate(reads.readers)} for i, t in enumerate(reads.treatments)}


def _auc_ci(theta: np.ndarray, cov: np.ndarray, alpha: float) -> np.ndarray:
    """DeLong Wald CIs ``(t, r, 2)`` of each AUC, clipped to [0, 1]."""
    se = np.sqrt(np.clip(np.diag(cov), 0, None)).reshape(theta.shape)
    z = stats.norm.ppf(1 - alpha / 2)
    return np.clip(np.stack([theta - z * se, theta + z * se], axis=-1), 0, 1)


def estimates(reads: Reads, figure: str = "auc", method: str = "jackknife") -> tuple[np.ndarray, np.ndarray]:
    """Figures of merit ``(t, r)`` and their ``(t*r, t*r)`` covariance, block by block.

    ``figure``: ``auc`` (ratings), ``sensitivity`` or ``specificity`` (answers). In a split-plot
    study each block (a reader group and its cases) is estimated alone and readers of different
    blocks share no case, so their covariances are 0; averaging ``Cov2``/``Cov3`` over all reader
    pairs then gives the split-plot variance of Obuchowski, Gallas & Hillis (2012),
    ``(2/r)[sigma2_TR + Var - Cov1 + (r/G - 1)(Cov2_w - Cov3_w)]`` with within-group ``Cov2_w, Cov3_w``.
    """
    t, r, _ = reads.shape
    theta = np.empty((t, r))
    cov = np.zeros((t * r, t * r))
    for ri, ci in reads.blocks():
        truth = reads.truth[ci]
        if figure == "auc":
            x = reads.ratings[:, ri][:, :, ci]
            th, cv = empirical_auc(x, truth), auc_covariance(x, truth, method)
        else:
            a = reads.answers[:, ri][:, :, ci]
            if figure == "sensitivity":
                th, cv = sensitivity(a, truth), proportion_covariance(a, truth, 1, method)
            else:
                th, cv = specificity(a, truth), proportion_covariance(1 - a, truth, 0, method)
        theta[:, ri] = th
        idx = (np.arange(t)[:, None] * r + ri[None, :]).reshape(-1)
        cov[np.ix_(idx, idx)] = cv
    return theta, cov


def _binary(reads: Reads, alpha: float) -> dict | None:
    """Sensitivity and specificity per reader x treatment (Wilson CIs) and their OR analyses."""
    if reads.answers is None:
        return None
    out: dict = {}
    for name, which in (("sensitivity", 1), ("specificity", 0)):
        count = {j: int((reads.truth[reads.case_block == reads.reader_block[j]] == which).sum())
                 for j in range(len(reads.readers))}
        analyses = {}
        for method in ("jackknife", "delong"):
            theta, cov = estimates(reads, name, method)
            analyses[method] = _or_block(mrmc.or_analysis(theta, cov, reads.treatments, alpha))
        per = {t: {r: {"value": float(theta[i, j]),
                       "ci": list(wilson_ci(round(theta[i, j] * count[j]), count[j], alpha)), "n": count[j]}
                   for j, r in enumerate(reads.readers)} for i, t in enumerate(reads.treatments)}
        out[name] = {"per_reader": per, "mean": {t: float(theta[i].mean()) for i, t in enumerate(reads.treatments)},
                     "or": analyses}
    out["note"] = ("jackknife and delong (= the unbiased sample covariance of a proportion) covariances; "
                   "the answer counts as abnormal unless it is 0/normal/negative/no")
    return out


def analyze_reads(reads: Reads, config: AnalyzeConfig | None = None) -> dict:
    """The full analysis as a JSON-ready dict (see the module docstring for its shape)."""
    cfg = config or AnalyzeConfig()
    covs = {}
    for m in METHODS:
        theta, covs[m] = estimates(reads, "auc", m)
    full = {m: mrmc.or_analysis(theta, covs[m], reads.treatments, cfg.alpha) for m in METHODS}
    ci = _auc_ci(theta, covs["delong"], cfg.alpha)
    t, r, c = reads.shape
    if reads.split_plot:
        dbm = {"jackknife_pseudovalues": None, "note": "not computed for a split-plot study"}
    else:
        pseudo = mrmc.dbm_pseudovalues(theta, auc_leave_one_out(reads.ratings, reads.truth))
        dbm = {"jackknife_pseudovalues": mrmc.dbm(pseudo, cfg.alpha),
               "note": "Dorfman-Berbaum-Metz (1992) with the Hillis (2007) df; equals OR with jackknife covariance"}
    return {
        "treatments": reads.treatments,
        "readers": reads.readers,
        "auc": _table(theta, reads),
        "auc_mean": {tr: float(theta[i].mean()) for i, tr in enumerate(reads.treatments)},
        "or": {m: _or_block(full[m]) for m in METHODS},
        "time": time_summary(reads, cfg.alpha, cfg.time_model),
        "auc_ci": {tr: {rd: [float(ci[i, j, 0]), float(ci[i, j, 1])] for j, rd in enumerate(reads.readers)}
                   for i, tr in enumerate(reads.treatments)},
        "auc_ci_method": "DeLong (1988) standard error, Wald interval clipped to [0, 1]",
        "per_reader_differences": full["delong"]["frrc"]["per_reader"],
        "dbm": dbm,
        "design": (f"split-plot: {reads.n_blocks} reader groups, each reading its own case block"
                   if reads.split_plot else "fully crossed"),
        "binary": _binary(reads, cfg.alpha),
        "n": {"treatments": t, "readers": r, "cases": c, "abnormal": int(reads.truth.sum()),
              "normal": int((reads.truth == 0).sum()),
              "readings": int((~np.isnan(reads.ratings)).sum()), "blocks": reads.n_blocks},
        "alpha": cfg.alpha,
        "disclaimer": DISCLAIMER,
    }


def read_case_list(path: str | Path) -> dict[str, int]:
    """``case -> truth`` from a design's ``cases.csv`` (columns ``case,truth``)."""
    import csv

    from fetalscan.errors import DataError

    path = Path(path)
    if not path.is_file():
        raise DataError(f"case list not found: {path}")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or not {"case", "truth"} <= set(rows[0]):
        raise DataError(f"{path}: a case list needs columns case,truth (the cases.csv of `reader-study create`)")
    out = {}
    for line, row in enumerate(rows, start=2):
        if row["truth"] not in ("0", "1"):
            raise DataError(f"{path}, line {line}: truth must be 0 or 1, got {row['truth']!r}")
        out[row["case"]] = int(row["truth"])
    return out


def analyze(reads_csv: str | Path, out: str | Path, config: AnalyzeConfig | None = None,
            overwrite: bool = False) -> dict:
    """Analyse a readings CSV and write ``out/mrmc.json`` and ``out/report.html``; returns the JSON dict."""
    from fetalscan.reader.report import write_report

    cfg = config or AnalyzeConfig()
    check_out_dir(out, overwrite)
    known = read_case_list(cfg.cases) if cfg.cases else None
    reads = load_reads(reads_csv, known_cases=known, normal_label=cfg.normal_label)
    result = analyze_reads(reads, cfg)
    result["provenance"] = provenance(data_hash=sha256_file(reads_csv), readings=str(reads_csv))
    out = prepare_out_dir(out, overwrite)
    write_json(out / "mrmc.json", result)
    write_report(out / "report.html", result, reads)
    return result
