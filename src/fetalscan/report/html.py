"""``report.html``: one self-contained page a clinician can read, and its figures.

The page is rendered with Jinja2 from ``templates/report.html.j2``; every figure
is drawn with matplotlib (Agg) and embedded as a ``data:`` URI, so the file can be
mailed or archived alone. Every number on the page comes from ``metrics.json``
(its JSON twin); figures are drawn from the run's prediction files.

Sections: key findings, dataset, overall metrics, per-class metrics, ROC and PR
curves, confusion matrices, screening view, calibration, subgroups (with forest
plots), shortcut check, explainability (when ``RUN/explain/`` holds
``faithfulness.json`` / ``gallery.json``), limitations, provenance.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from fetalscan.errors import DataError
from fetalscan.fileio import write_text
from fetalscan.texts import DISCLAIMER

log = logging.getLogger(__name__)




SECTIONS = (
    ("findings", "Key findings"), ("dataset", "Dataset"), ("overall", "Overall performance"),
    ("per-class", "Per-class performance"), ("curves", "ROC and precision-recall curves"),
    ("confusion", "Confusion matrices"), ("screening", "Screening view: any anomaly vs normal"),
    ("calibration", "Calibration"), ("subgroups", "Subgroups"), ("shortcut", "Shortcut check"),
    ("explainability", "Explainability"), ("limitations", "What these results cannot show"),
    ("provenance", "Provenance"),
)


_COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
            "#bcbd22", "#17becf", "#393b79", "#ad494a", "#637939", "#8c6d31", "#7b4173", "#3182bd"]


def fmt(value, digits: int = 3) -> str:
    """A number for the page: fixed decimals; missing / NaN as an en dash."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    return "–" if not math.isfinite(v) else f"{v:.{digits}f}"


def fmt_ci(interval, digits: int = 3) -> str:
    """``[lo, hi]`` as ``lo–hi`` (en dash when undefined)."""
    if not interval or interval[0] is None or interval[1] is None:
        return "–"
    lo, hi = float(interval[0]), float(interval[1])
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "–"
    return f"{lo:.{digits}f}–{hi:.{digits}f}"


def boot(block: dict | None, name: str) -> list | None:
    """The bootstrap interval of ``name`` inside a ``ci`` block."""
    return ((block or {}).get(name) or {}).get("bootstrap")


def wilson(block: dict | None, name: str) -> list | None:
    return ((block or {}).get(name) or {}).get("wilson")


#: Report figures are drawn at 100 dpi (one figure pixel = one CSS pixel), at least ~700 px wide,
#: with text of at least 11 pt, so they stay readable on a 1,400 px page and on paper; legends sit
#: below the axes, never over the curves.
FIG_WIDTH = 8.2
FONT = 12
SMALL_FONT = 11


def _fig(width: float = FIG_WIDTH, height: float = 5.0):
    from fetalscan.figures import new_figure

    return new_figure(width, height)


def _style(ax, legend: bool = True, ncol: int = 1) -> None:
    """Text of at least 11 pt and, when there is one, the legend below the axes (it covers no curve)."""
    ax.tick_params(labelsize=SMALL_FONT)
    ax.xaxis.label.set_size(FONT)
    ax.yaxis.label.set_size(FONT)
    ax.title.set_size(FONT + 1)
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=SMALL_FONT, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=ncol,
                  frameon=False, borderaxespad=0.0)


def _uri(fig) -> str:
    from fetalscan.figures import figure_data_uri

    return figure_data_uri(fig, dpi=100)


def _wrap_label(name: str, width: int = 14) -> str:
    """A class name broken at underscores / spaces into lines of about ``width`` characters."""
    import textwrap

    return "\n".join(textwrap.wrap(str(name).replace("_", " "), width, break_long_words=False)) or str(name)


def _prob_matrix(df: pd.DataFrame, classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    from fetalscan.evaluation.metrics import labelled_rows

    lab = labelled_rows(df)
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[c] for c in lab["label"].astype(str)], dtype=np.int64)
    return y, lab[[f"p_{c}" for c in classes]].to_numpy(dtype=np.float64)


def _any_defined(y: np.ndarray, k: int) -> bool:
    """Whether some class has both positive and negative cases (else no curve exists)."""
    counts = np.bincount(y, minlength=k)
    return bool(((counts > 0) & (counts < len(y))).any())


def _one_vs_rest(df: pd.DataFrame, classes: Sequence[str]):
    """``(y, p, [(k, class, positives)])`` for the classes with both positive and negative cases,
    or ``None`` when no class has both (no ROC or PR curve is defined)."""
    y, p = _prob_matrix(df, classes)
    if not _any_defined(y, len(classes)):
        return None
    return y, p, [(k, c, y == k) for k, c in enumerate(classes) if 0 < (y == k).sum() < len(y)]


def roc_figure(df: pd.DataFrame, classes: Sequence[str], metrics: dict, title: str) -> str | None:
    """One-vs-rest ROC curve of every class (AUROC in the legend) plus the micro-average;
    ``None`` when the data hold a single class (no curve is defined)."""
    from sklearn.metrics import roc_curve

    curves = _one_vs_rest(df, classes)
    if curves is None:
        return None
    y, p, per_class = curves
    fig, ax = _fig(FIG_WIDTH, 6.2)
    for k, c, pos in per_class:
        fpr, tpr, _ = roc_curve(pos, p[:, k])
        ax.plot(fpr, tpr, color=_COLOURS[k % len(_COLOURS)], lw=1.8,
                label=f"{c} (AUROC {fmt(metrics['per_class'][c]['auroc'], 2)}, n={int(pos.sum())})")
    micro = metrics.get("micro_auroc")
    if micro is not None and math.isfinite(micro):
        onehot = np.eye(len(classes), dtype=bool)[y]
        fpr, tpr, _ = roc_curve(onehot.ravel(), p.ravel())
        ax.plot(fpr, tpr, "k--", lw=1.5, label=f"micro-average (AUROC {fmt(micro, 2)})")
    ax.plot([0, 1], [0, 1], color="#bbbbbb", lw=0.8)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=title, xlim=(0, 1), ylim=(0, 1.01))
    _style(ax)
    return _uri(fig)


def pr_figure(df: pd.DataFrame, classes: Sequence[str], metrics: dict, title: str) -> str | None:
    """Precision-recall curve of every class (average precision and prevalence in the legend);
    ``None`` when the data hold a single class."""
    from sklearn.metrics import precision_recall_curve

    curves = _one_vs_rest(df, classes)
    if curves is None:
        return None
    _, p, per_class = curves
    fig, ax = _fig(FIG_WIDTH, 6.2)
    for k, c, pos in per_class:
        prec, rec, _ = precision_recall_curve(pos, p[:, k])
        ax.step(rec, prec, where="post", color=_COLOURS[k % len(_COLOURS)], lw=1.8,
                label=f"{c} (AP {fmt(metrics['per_class'][c]['average_precision'], 2)}, "
                      f"prevalence {pos.mean():.2f})")
    ax.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", title=title, xlim=(0, 1), ylim=(0, 1.02))
    _style(ax)
    return _uri(fig)


def confusion_figure(cm: dict, title: str) -> str:
    """Confusion matrix: colour = share of each true class (row), text = count.

    Class names are written horizontally, wrapped at underscores, in 11 pt; with more
    than 8 classes the column names are turned 45 degrees (still 11 pt)."""
    labels, m = cm["labels"], np.asarray(cm["matrix"], dtype=float)
    k = len(labels)
    width = max(FIG_WIDTH, 1.25 * k + 2.6)
    fig, ax = _fig(width, max(5.6, 1.0 * k + 2.0))
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.nan_to_num(m / m.sum(1, keepdims=True))
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    for i in range(k):
        for j in range(k):
            ax.text(j, i, int(m[i, j]), ha="center", va="center", fontsize=FONT,
                    color="white" if share[i, j] > 0.6 else "black")
    names = [_wrap_label(c) for c in labels]
    if k <= 8:
        ax.set_xticks(range(k), names, fontsize=SMALL_FONT)
    else:
        ax.set_xticks(range(k), names, rotation=45, ha="right", rotation_mode="anchor", fontsize=SMALL_FONT)
    ax.set_yticks(range(k), names, fontsize=SMALL_FONT)
    ax.set(xlabel="predicted class", ylabel="true class", title=title)
    _style(ax, legend=False)
    return _uri(fig)


def reliability_figure(before: dict, after: dict | None, title: str) -> str:
    """Reliability diagram: accuracy vs confidence per bin, before and after temperature scaling."""
    fig, ax = _fig(FIG_WIDTH, 6.2)
    ax.plot([0, 1], [0, 1], color="#999999", lw=0.8, label="perfect calibration")
    for block, name, colour in ((before, "before", "#d62728"), (after, "after", "#1f77b4")):
        if not block:
            continue
        bins = block["bins"]
        conf = np.array(bins["confidence"], dtype=float)
        acc = np.array(bins["accuracy"], dtype=float)
        cnt = np.array(bins["count"], dtype=float)
        ok = cnt > 0
        label = (f"{name} temperature scaling" if after else "as given") + f" (ECE {fmt(block['ece'])})"
        ax.plot(conf[ok], acc[ok], "o-", color=colour, ms=5, lw=1.5, label=label)
    ax.set(xlabel="confidence (top-class probability)", ylabel="accuracy", title=title, xlim=(0, 1), ylim=(0, 1.02))
    _style(ax)
    return _uri(fig)


def screening_figure(frames: dict, screening: dict) -> str | None:
    """ROC of p(abnormal) at image and patient level with the operating points."""
    from sklearn.metrics import roc_curve

    from fetalscan.evaluation.metrics import labelled_rows

    normal = screening["normal_class"]
    truths = {key: labelled_rows(frames[key])["label"].astype(str).to_numpy() != normal for key in ("image", "patient")}
    if not any(0 < t.sum() < len(t) for t in truths.values()):
        return None
    fig, ax = _fig(FIG_WIDTH, 6.2)
    for level, key, colour in (("image", "image", "#ff7f0e"), ("patient", "patient", "#1f77b4")):
        df = labelled_rows(frames[key])
        truth = truths[key]
        if not 0 < truth.sum() < len(truth):
            continue
        fpr, tpr, _ = roc_curve(truth, 1 - df[f"p_{normal}"].to_numpy())
        block = screening[level]
        ax.plot(fpr, tpr, color=colour, lw=1.8, label=f"{level} level (AUROC {fmt(block['roc']['auroc'])})")
        op = block.get("operating_point")
        if op:
            ax.plot([1 - op["specificity"]], [op["sensitivity"]], "o", color=colour, ms=8,
                    markeredgecolor="black", label=f"{level}-level operating point")
    ax.plot([0, 1], [0, 1], color="#bbbbbb", lw=0.8)
    ax.axhline(screening["target_sensitivity"], color="#999999", ls=":", lw=0.8)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="Any anomaly vs normal", xlim=(0, 1), ylim=(0, 1.01))
    _style(ax, ncol=2)
    return _uri(fig)


def forest_figure(block: dict, overall: float | None) -> str:
    """Forest plot: accuracy per subgroup with its interval; small subgroups hollow.

    Patient-level subgroups use the Wilson interval (independent patients; honest
    for one or two patients, where a bootstrap interval collapses to a point);
    image-level subgroups use the patient-bootstrap interval.
    """
    rows = block["rows"]
    kind = "wilson" if block["level"] == "patient" else "bootstrap"
    fig, ax = _fig(FIG_WIDTH, 0.42 * len(rows) + 1.6)
    for i, r in enumerate(rows):
        y = len(rows) - 1 - i
        lo, hi = (r.get("accuracy_ci") or {}).get(kind) or [np.nan, np.nan]
        ax.plot([lo, hi], [y, y], color="#333333", lw=1.4)
        ax.plot([r["accuracy"]], [y], "s", ms=7, color="white" if r["small"] else "#1f77b4",
                markeredgecolor="#1f77b4")
    ax.set_yticks(range(len(rows))[::-1], [f"{r['subgroup']} (n={r['n_groups']} pt{', small' if r['small'] else ''})"
                                          for r in rows], fontsize=SMALL_FONT)
    if overall is not None and math.isfinite(overall):
        ax.axvline(overall, color="#999999", ls="--", lw=0.8)
    ax.set(xlim=(0, 1.02), xlabel="accuracy (95% CI, " + ("Wilson, patients" if kind == "wilson" else
                                                         "patient bootstrap") + ")", title=f"By {block['column']}")
    _style(ax, legend=False)
    return _uri(fig)


def shortcut_figure(block: dict) -> str:
    """Model vs probe AUROC (with intervals) for each comparison."""
    comps = block["comparisons"]
    fig, ax = _fig(FIG_WIDTH, 0.7 * len(comps) + 1.8)
    for i, c in enumerate(comps):
        y = len(comps) - 1 - i
        for off, key, colour, name in ((0.15, "model", "#1f77b4", "model"), (-0.15, "probe", "#d62728",
                                                                              "image-statistics probe")):
            ci = c[f"{key}_ci"] or [np.nan, np.nan]
            ax.plot([ci[0], ci[1]], [y + off, y + off], color=colour, lw=1.4)
            ax.plot([c[key]], [y + off], "o", color=colour, label=name if i == 0 else None)
    ax.axvline(0.5, color="#bbbbbb", lw=0.8)
    ax.set_yticks(range(len(comps))[::-1], [c["metric"] for c in comps], fontsize=SMALL_FONT)
    ax.set(xlim=(0.3, 1.02), xlabel="AUROC (95% CI)", title="Model vs a probe that sees no anatomy")
    _style(ax, ncol=2)
    return _uri(fig)


def counts_figure(dataset: dict) -> str:
    """Images and patients per class."""
    classes = list(dataset["per_class"])
    imgs = [dataset["per_class"][c]["images"] for c in classes]
    grps = [dataset["per_class"][c]["groups"] for c in classes]
    fig, ax = _fig(max(FIG_WIDTH, 0.9 * len(classes) + 2), 4.4)
    x = np.arange(len(classes))
    ax.bar(x - 0.2, imgs, 0.4, label="images", color="#9ecae1")
    ax.bar(x + 0.2, grps, 0.4, label="patients (groups)", color="#3182bd")
    if len(classes) <= 8:
        ax.set_xticks(x, [_wrap_label(c) for c in classes], fontsize=SMALL_FONT)
    else:
        ax.set_xticks(x, [_wrap_label(c) for c in classes], rotation=45, ha="right", rotation_mode="anchor",
                      fontsize=SMALL_FONT)
    ax.set(ylabel="count", title="Cases per class")
    _style(ax, ncol=2)
    return _uri(fig)


def read_explainability(run_dir: Path) -> dict:
    """Read ``RUN/explain/faithfulness.json`` and ``gallery.json`` when present.

    Returns ``{"summary": <for metrics.json>, "faithfulness": dict|None, "gallery":
    [items with "uri"], "notes": [...]}``. A malformed file does not stop the
    report: the section says what is wrong with it.
    """
    base = Path(run_dir) / "explain"
    notes: list[str] = []
    faith = gallery = None
    fpath, gpath = base / "faithfulness.json", base / "gallery.json"
    if fpath.is_file():
        try:
            faith = json.loads(fpath.read_text(encoding="utf-8"))
            if not isinstance(faith, dict) or not isinstance(faith.get("methods"), dict):
                raise ValueError("expected an object with a 'methods' object")
        except (ValueError, OSError) as exc:
            notes.append(f"{fpath} could not be used: {exc}")
            faith = None
    items = []
    if gpath.is_file():
        try:
            gallery = json.loads(gpath.read_text(encoding="utf-8"))
            if not isinstance(gallery, list):
                raise ValueError("expected a list of gallery items")
        except (ValueError, OSError) as exc:
            notes.append(f"{gpath} could not be used: {exc}")
            gallery = None
        from fetalscan.figures import file_data_uri

        shown: dict = {}
        for i, item in enumerate(gallery or []):
            if not isinstance(item, dict) or "overlay" not in item:
                notes.append(f"{gpath}: item {i} has no 'overlay'; skipped")
                continue
            key = (item.get("path"), item.get("frame"))
            if item.get("path") and key in shown:  # one image, two roles (older gallery.json): show it once
                role = f"{item.get('kind', '')} for {item.get('class', '')}"
                shown[key]["also"] = [*shown[key].get("also", []), role]
                continue
            png = (Path(run_dir) / str(item["overlay"]))
            if not png.is_file():
                notes.append(f"{gpath}: item {i}: overlay {png} not found; skipped")
                continue
            items.append({**item, "uri": file_data_uri(png)})
            shown[key] = items[-1]
    curves = None
    if faith is not None:
        rel = (faith.get("figures") or {}).get("curves") if isinstance(faith.get("figures"), dict) else None
        if rel and (base / str(rel)).is_file():
            from fetalscan.figures import file_data_uri

            curves = file_data_uri(base / str(rel))
    present = faith is not None or bool(items)
    summary = {
        "available": present,
        "faithfulness": faith,
        "gallery": [{k: v for k, v in it.items() if k != "uri"} for it in items],
        "notes": notes,
        "how_to": "fetalscan explain --run RUN_DIR (see `fetalscan explain --help`) writes RUN/explain/"
                  "faithfulness.json and gallery.json; then `fetalscan report RUN_DIR` adds them here",
    }
    return {"summary": summary, "faithfulness": faith, "gallery": items, "notes": notes, "curves": curves}


def build_figures(metrics: dict, frames: dict) -> dict:
    """Every figure of the page as a data URI (missing pieces are simply absent)."""
    classes = metrics["task"]["classes"]
    figs: dict = {"dataset": counts_figure(metrics["dataset"])}
    for level, key in (("image", "image_level"), ("patient", "patient_level")):
        df = frames[level]
        figs[f"roc_{level}"] = roc_figure(df, classes, metrics[key], f"ROC, {level} level")
        figs[f"pr_{level}"] = pr_figure(df, classes, metrics[key], f"Precision-recall, {level} level")
        figs[f"cm_{level}"] = confusion_figure(metrics[key]["confusion_matrix"], f"Confusion matrix, {level} level")
    calib = metrics.get("calibration") or {}
    for level in ("image", "patient"):
        before = (calib.get("before") or {}).get(level)
        after = (calib.get("after") or {}).get(level) if calib.get("after") else None
        if before:
            figs[f"rel_{level}"] = reliability_figure(before, after, f"Reliability, {level} level")
    sc = metrics.get("screening") or {}
    if sc.get("available"):
        figs["screening"] = screening_figure(frames, sc)
    figs["forest"] = [forest_figure(b, (metrics["patient_level"] if b["level"] == "patient"
                                        else metrics["image_level"])["accuracy"]) if b["rows"] else None
                      for b in metrics.get("subgroups") or []]
    short = metrics.get("shortcut") or {}
    if short.get("available"):
        figs["shortcut"] = shortcut_figure(short)
    return figs


def _environment():
    from fetalscan.report.templating import environment

    env = environment()
    env.filters.update({"fmt": fmt, "ci": fmt_ci})
    env.globals.update({"boot": boot, "wilson": wilson})
    return env


def render_report(metrics: dict, frames: dict, run_dir: Path, explain: dict | None = None, *,
                  card: dict | None = None) -> str:
    """The HTML of ``report.html`` for an evaluated run.

    Parameters
    ----------
    metrics : dict
        The full ``metrics.json`` content after :func:`fetalscan.evaluate.evaluate_run`.
    frames : dict
        Prediction frames for the figures (``image``, ``patient``, ``image_calibrated``,
        ``patient_calibrated``).
    run_dir : path
        The run folder (explainability overlays are read from it).
    card : dict, optional
        The model card of the run's final model (:func:`fetalscan.report.model_card.model_card`);
        shown as its own section when given.
    """
    for key in ("task", "image_level", "patient_level", "dataset"):
        if key not in metrics:
            raise DataError(f"metrics lack {key!r}: run fetalscan.evaluate.evaluate_run first")
    explain = explain or read_explainability(Path(run_dir))
    figs = build_figures(metrics, frames)
    template = _environment().get_template("report.html.j2")
    sections = SECTIONS if card is None else SECTIONS[:-1] + (("model-card", "Model card"),) + SECTIONS[-1:]
    return template.render(m=metrics, figs=figs, explain=explain, sections=sections, disclaimer=DISCLAIMER, card=card,
                           classes=metrics["task"]["classes"], run_dir=str(run_dir),
                           json_dump=lambda o: json.dumps(o, indent=1, default=str))


def write_report(path: str | Path, html: str) -> Path:
    """Write the page atomically."""
    return write_text(path, html)
