"""``report.html`` of a reader study: tables, per-reader forest plots, ROC curves by arm, reading times,
and what the design can and cannot show. Rendered with fetalscan's one Jinja environment."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fetalscan.figures import figure_data_uri, new_figure
from fetalscan.fileio import write_text
from fetalscan.reader.fom import roc_points
from fetalscan.reader.reads import Reads
from fetalscan.report.templating import render


def _fmt(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "–"
    return f"{v:.{digits}f}"


def _p(v) -> str:
    if v is None or not np.isfinite(v):
        return "–"
    return "< 0.0001" if v < 1e-4 else f"{v:.4f}"


def forest_plots(result: dict) -> list[dict]:
    """One forest plot per treatment pair: each reader's AUC difference (DeLong CI) and the
    reader-averaged difference (OR RRRC, jackknife covariance)."""
    out = []
    readers, names = result["readers"], result["treatments"]
    pairs = result["or"]["jackknife"]["rrrc"]["pairwise"]
    for k, pair in enumerate(pairs):
        a, b = names.index(pair["a"]), names.index(pair["b"])
        rows = [d for d in result["per_reader_differences"] if d["pair"] == [a, b]]
        fig, ax = new_figure(6.0, 0.45 * (len(rows) + 2) + 1.0)
        y = np.arange(len(rows) + 1)[::-1]
        diffs = [d["diff"] for d in rows] + [pair["diff"]]
        lows = [d["ci_low"] for d in rows] + [pair["ci_low"]]
        highs = [d["ci_high"] for d in rows] + [pair["ci_high"]]
        labels = [f"reader {readers[d['reader']]}" for d in rows] + ["mean (OR, random readers and cases)"]
        for yi, d, lo, hi, last in zip(y, diffs, lows, highs, [False] * len(rows) + [True]):
            ax.plot([lo, hi], [yi, yi], color="#d62728" if last else "#3182bd", lw=2.5 if last else 1.5)
            ax.plot([d], [yi], "D" if last else "o", color="#d62728" if last else "#3182bd")
        ax.axvline(0, color="#777", lw=1, ls="--")
        ax.set_yticks(y, labels)
        ax.set_xlabel(f"AUC difference, {pair['a']} − {pair['b']} (95% CI)")
        ax.set_title(f"{pair['a']} vs {pair['b']}")
        out.append({"title": f"{pair['a']} − {pair['b']}", "src": figure_data_uri(fig)})
    return out


def roc_figure(reads: Reads) -> str:
    """Empirical ROC curve of every reader, one panel per treatment (arm)."""
    t = len(reads.treatments)
    fig, _ = new_figure(3.6 * t, 3.6)
    fig.clear()
    axes = fig.subplots(1, t, squeeze=False)[0]
    for i, (ax, name) in enumerate(zip(axes, reads.treatments)):
        for j, reader in enumerate(reads.readers):
            read = ~np.isnan(reads.ratings[i, j])
            fpr, tpr = roc_points(reads.ratings[i, j][read], reads.truth[read])
            ax.plot(fpr, tpr, lw=1.2, label=f"reader {reader}")
        ax.plot([0, 1], [0, 1], color="#bbb", lw=1, ls=":")
        ax.set_title(str(name))
        ax.set_xlabel("1 − specificity")
        ax.set_aspect("equal")
    axes[0].set_ylabel("sensitivity")
    axes[-1].legend(fontsize=7, loc="lower right")
    return figure_data_uri(fig)


def time_figure(reads: Reads) -> str | None:
    """Reading-time distributions per arm (log scale), each reading a dot over a box plot."""
    if reads.seconds is None:
        return None
    fig, ax = new_figure(1.8 * len(reads.treatments) + 2, 3.6)
    data = [v[np.isfinite(v)] for v in reads.seconds.reshape(len(reads.treatments), -1)]
    ax.boxplot(data, showfliers=False)
    ax.set_xticks(range(1, len(data) + 1), reads.treatments)
    rng = np.random.default_rng(0)
    for i, v in enumerate(data, start=1):
        ax.plot(i + rng.uniform(-0.18, 0.18, v.size), v, ".", color="#3182bd", alpha=0.35, ms=3)
    ax.set_yscale("log")
    ax.set_ylabel("reading time (s, log scale)")
    return figure_data_uri(fig)


def write_report(path: str | Path, result: dict, reads: Reads) -> Path:
    """Render ``report.html`` for an analysis ``result`` of ``reads``."""
    html = render("reader_report.html.j2", m=result, fmt=_fmt, p=_p, forests=forest_plots(result),
                  roc=roc_figure(reads), times=time_figure(reads))
    return write_text(path, html)
