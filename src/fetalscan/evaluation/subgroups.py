"""Results by subgroup (gestational-age band, centre, device, view, original label).

For each metadata column: patient-level accuracy with Wilson intervals and, where both
classes occur, AUROC with a group-bootstrap interval per subgroup; small subgroups are
flagged (never hidden); a permutation test of heterogeneity asks whether accuracy differs
between subgroups more than chance would make it. Gestational age is binned as
< 14, 14-< 20, 20-< 28 and >= 28 weeks."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from fetalscan.errors import DataError
from fetalscan.evaluation.bootstrap import auroc_with_ci, metrics_with_ci
from fetalscan.evaluation.config import EvaluationConfig
from fetalscan.evaluation.metrics import labelled_rows

log = logging.getLogger(__name__)


#: Subgroups with fewer groups (patients) than this are flagged as small.


#: Gestational-age bins (weeks): [lower, upper) and their labels.
GA_BINS: tuple[tuple[float, float, str], ...] = (
    (-math.inf, 14.0, "<14 wk"), (14.0, 20.0, "14-<20 wk"), (20.0, 28.0, "20-<28 wk"), (28.0, math.inf, ">=28 wk"),
)


MISSING = "missing"


def ga_bin(weeks: float) -> str:
    """Gestational-age bin label of ``weeks`` (``missing`` for NaN)."""
    if weeks is None or not np.isfinite(weeks):
        return MISSING
    for lo, hi, name in GA_BINS:
        if lo <= weeks < hi:
            return name
    return MISSING


def subgroup_columns(img: pd.DataFrame, requested: str = "auto", class_map: dict | None = None) -> list[str]:
    """Metadata columns to break results down by.

    ``auto``: ``ga_weeks``, ``center``, ``device``, ``view`` when filled, every other
    manifest column with 2-12 distinct values (at most half the number of
    patients, so identifiers are skipped), and ``label_original`` when classes were
    merged. ``none``: no subgroups. Otherwise a comma-separated list; an unknown
    column is an error.
    """
    requested = (requested or "auto").strip()
    if requested.lower() == "none":
        return []
    if requested.lower() != "auto":
        cols = [c.strip() for c in requested.split(",") if c.strip()]
        missing = [c for c in cols if c not in img.columns]
        if missing:
            raise DataError(f"subgroups: column(s) {missing} are not in predictions.csv "
                            f"(available: {[c for c in img.columns if not c.startswith('p_')]})")
        return cols
    n_groups = img["group"].nunique()
    out = []
    for col in ("ga_weeks", "center", "device", "view"):
        if col in img and img[col].notna().any() and (col == "ga_weeks" or img[col].nunique() >= 2):
            out.append(col)
    if "label_original" in img.columns:
        start = list(img.columns).index("label_original") + 1
        for col in img.columns[start:]:
            if col in out or col in ("ga_weeks", "center", "device", "view"):
                continue
            k = img[col].nunique(dropna=True)
            if 2 <= k <= min(12, max(2, n_groups // 2)):
                out.append(col)
        if class_map and img["label_original"].nunique() > img["label"].nunique():
            out.append("label_original")
    return out


def _subgroup_values(img: pd.DataFrame, pat: pd.DataFrame, column: str) -> tuple[str, pd.DataFrame, list[str]]:
    """Choose the level of a subgroup column and label each unit with its subgroup."""
    if column == "ga_weeks":
        ga = pd.to_numeric(img[column], errors="coerce").groupby(img["group"].astype(str)).mean()
        units = pat.copy()
        units["_sub"] = [ga_bin(ga.get(g, np.nan)) for g in units["group"].astype(str)]
        order = [name for _, _, name in GA_BINS] + [MISSING]
        return "patient", units, order
    vals = img[column].astype(object).where(img[column].notna(), MISSING).astype(str)
    per_group = vals.groupby(img["group"].astype(str)).nunique()
    if (per_group <= 1).all():
        first = vals.groupby(img["group"].astype(str)).first()
        units = pat.copy()
        units["_sub"] = [first.get(g, MISSING) for g in units["group"].astype(str)]
        level = "patient"
    else:
        units = img.copy()
        units["_sub"] = vals.to_numpy()
        level = "image"
    order = sorted(set(units["_sub"]) - {MISSING}) + ([MISSING] if MISSING in set(units["_sub"]) else [])
    return level, units, order


def heterogeneity_test(subgroup: Sequence[str], correct: Sequence[bool], *, n_perm: int = 2000,
                       seed: int = 0) -> dict:
    """Does accuracy differ between subgroups? Pearson chi-square on the subgroup x correct table.

    The p-value is a permutation p-value (subgroup labels shuffled ``n_perm``
    times, seeded; ``(1 + #{X2_perm >= X2}) / (1 + n_perm)``), valid with the small
    counts of clinical subgroups where the chi-square approximation is not; the
    asymptotic p-value is given too. Units should be independent (patients).
    """
    from scipy.stats import chi2

    sub = pd.Series(list(subgroup), dtype=object)
    codes, names = pd.factorize(sub)
    corr = np.asarray(correct, dtype=np.int64)
    k = len(names)
    if k < 2 or len(corr) == 0:
        return {"test": "chi-square (permutation)", "statistic": None, "df": None, "p_value": None,
                "p_value_asymptotic": None, "n_subgroups": int(k), "note": "fewer than two subgroups"}

    def stat(c: np.ndarray) -> np.ndarray:  # c: (m, n) subgroup codes
        m = c.shape[0]
        idx = c + k * corr[None, :]
        table = np.zeros((m, 2 * k))
        np.add.at(table, (np.repeat(np.arange(m), c.shape[1]), idx.ravel()), 1.0)
        obs = table.reshape(m, 2, k)
        row = obs.sum(2, keepdims=True)
        col = obs.sum(1, keepdims=True)
        exp = row * col / len(corr)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(exp > 0, (obs - exp) ** 2 / np.where(exp > 0, exp, 1), 0.0).sum((1, 2))

    x2 = float(stat(codes[None, :])[0])
    rng = np.random.default_rng(seed)
    perms = np.stack([rng.permutation(codes) for _ in range(n_perm)]) if n_perm else np.zeros((0, len(codes)))
    null = stat(perms) if n_perm else np.array([])
    both = int(corr.min() != corr.max())
    dof = (k - 1) * both
    return {
        "test": "chi-square of correct decisions across subgroups (permutation p-value)",
        "statistic": x2, "df": int(dof),
        "p_value": float((1 + (null >= x2 - 1e-12).sum()) / (1 + n_perm)) if n_perm else None,
        "p_value_asymptotic": float(chi2.sf(x2, dof)) if dof else 1.0,
        "n_subgroups": int(k), "n_perm": int(n_perm),
    }


def _against_the_rest(part: pd.DataFrame, units: pd.DataFrame, classes: Sequence[str], row: dict,
                      cfg: EvaluationConfig, normal_class: str) -> dict:
    """AUROCs of a one-class subgroup against the other-class cases of the whole table.

    Inside a subgroup whose cases all have one true class ``c`` (e.g. one original
    label), no AUROC is defined. What is defined is how the model ranks *these*
    cases against all cases of the other classes: AUROC of ``p_c`` (and of
    p(abnormal) = 1 - p(normal) against the other side of normal/abnormal), with a
    group-bootstrap interval. Returns ``auroc_vs_rest`` / ``abnormal_auroc_vs_rest``
    blocks (``{"class", "against", "auroc", "ci", "n_against"}``) or, when even that
    is undefined, a ``"reason"``.
    """
    out: dict = {}
    labels = part["label"].astype(str)
    present = sorted(set(labels))
    if len(present) != 1 or math.isfinite(row.get("macro_auroc", float("nan"))):
        return out
    (c,) = present

    def vs(score_col, positive_mask_rest, against: str, flip: bool = False) -> dict:
        rest = units[positive_mask_rest]
        block = {"class": c, "against": against, "n_against": int(rest["group"].nunique())}
        if rest.empty:
            block.update({"auroc": float("nan"), "ci": [float("nan")] * 2,
                          "reason": f"these data hold no {against}"})
            return block
        both = pd.concat([part, rest])
        score = both[score_col].to_numpy(dtype=np.float64)
        sc = auroc_with_ci(1 - score if flip else score, np.r_[np.ones(len(part), bool), np.zeros(len(rest), bool)],
                           both["group"].astype(str).tolist(), n_boot=cfg.n_boot, seed=cfg.seed,
                           confidence=cfg.confidence)
        block.update({"auroc": sc["auroc"], "ci": sc["ci"]})
        return block

    unit_labels = units["label"].astype(str)
    out["auroc_vs_rest"] = vs(f"p_{c}", (unit_labels != c).to_numpy(), "cases of the other classes")
    if normal_class in classes:
        if c == normal_class:
            out["abnormal_auroc_vs_rest"] = vs(f"p_{normal_class}", (unit_labels != normal_class).to_numpy(),
                                               "abnormal cases")
        else:
            # p(abnormal) of these abnormal cases against every normal case
            out["abnormal_auroc_vs_rest"] = vs(f"p_{normal_class}", (unit_labels == normal_class).to_numpy(),
                                               f"{normal_class} cases", flip=True)
    return out


def subgroup_analysis(img: pd.DataFrame, pat: pd.DataFrame, classes: Sequence[str], column: str,
                      cfg: EvaluationConfig, *, normal_class: str = "normal") -> dict:
    """Results by the values of one metadata column, each with its n, CIs and a small-n flag.

    The unit is the patient when the column is constant within every patient
    (``ga_weeks`` is always taken per patient, as the mean over its images, and
    binned <14, 14-<20, 20-<28, >=28 weeks); otherwise the image (then the
    heterogeneity test treats images as independent and its p-value is optimistic).
    Subgroups with fewer than ``cfg.small_subgroup`` patients are flagged, never hidden.
    """
    classes = list(classes)
    img_l, pat_l = labelled_rows(img), labelled_rows(pat)
    level, units, order = _subgroup_values(img_l, pat_l, column)
    rows = []
    for name in order:
        part = units[units["_sub"] == name]
        if part.empty:
            continue
        m = metrics_with_ci(part, classes, n_boot=cfg.n_boot, seed=cfg.seed, confidence=cfg.confidence)
        n_groups = int(part["group"].nunique())
        row = {
            "subgroup": name, "n": int(len(part)), "n_groups": n_groups,
            "per_class_n": {c: m["per_class"][c]["n"] for c in classes},
            "accuracy": m["accuracy"], "accuracy_ci": m["ci"]["accuracy"],
            "balanced_accuracy": m["balanced_accuracy"], "balanced_accuracy_ci": m["ci"]["balanced_accuracy"],
            "macro_auroc": m["macro_auroc"], "macro_auroc_ci": m["ci"]["macro_auroc"],
            "small": n_groups < cfg.small_subgroup,
        }
        if normal_class in classes:
            truth = part["label"].astype(str).to_numpy() != normal_class
            sc = auroc_with_ci(1 - part[f"p_{normal_class}"].to_numpy(dtype=np.float64), truth,
                               part["group"].astype(str).tolist(), n_boot=cfg.n_boot, seed=cfg.seed,
                               confidence=cfg.confidence)
            row["abnormal_auroc"], row["abnormal_auroc_ci"] = sc["auroc"], sc["ci"]
        row.update(_against_the_rest(part, units, classes, row, cfg, normal_class))
        rows.append(row)
    correct = units["pred"].astype(str).to_numpy() == units["label"].astype(str).to_numpy()
    het = heterogeneity_test(units["_sub"].tolist(), correct, n_perm=cfg.n_perm, seed=cfg.seed)
    notes = []
    if level == "image":
        notes.append(f"{column} varies within patients, so this table counts images; the heterogeneity test "
                     "treats images as independent and its p-value is optimistic")
    if column == "label_original":
        notes.append("original labels before rare classes were merged: accuracy here is the sensitivity for "
                     "each original label; subgroups are confounded with the label by construction")
    if any("auroc_vs_rest" in r or "abnormal_auroc_vs_rest" in r for r in rows):
        notes.append("an AUROC needs cases and non-cases; a subgroup that holds one class only has none inside it. "
                     "Values marked * compare the subgroup's cases with every case of the other classes in these "
                     "data (abnormal-vs-normal: with every normal, or every abnormal, case); '–' means even that "
                     "is undefined (reason in metrics.json)")
    small = [r["subgroup"] for r in rows if r["small"]]
    if small:
        notes.append(f"subgroups with fewer than {cfg.small_subgroup} patients ({', '.join(small)}): "
                     "estimates are imprecise, read their intervals")
    return {"column": column, "level": level,
            "binning": "<14, 14-<20, 20-<28, >=28 weeks (per-patient mean)" if column == "ga_weeks" else None,
            "small_threshold": cfg.small_subgroup, "rows": rows, "heterogeneity": het, "notes": notes}
