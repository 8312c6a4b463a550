"""The head-biometry report: the output folder of ``fetalscan biometry evaluate``.

A scored run (:class:`fetalscan.biometry.scoring.BiometryScores`, from grouped
cross-validation or from a trained model) becomes, in its output folder:

- ``folds.csv`` (cross-validation only: exam -> fold),
- ``biometry_images.csv`` (one row per image),
- ``biometry_metrics.json`` (the summary; every number of the page),
- ``bland_altman.png`` (predicted vs reference HC; absent when no head was measured),
- ``report.html`` (self-contained: ``templates/biometry_report.html.j2`` through the
  one Jinja environment of :mod:`fetalscan.report.templating`, the figure embedded).

:func:`evaluate_checkpoint_to_folder` and :func:`cross_validate_to_folder` run the
scoring of :mod:`fetalscan.biometry` and write that folder; they refuse a
non-empty folder (without ``overwrite``) before any work.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from fetalscan.biometry.scoring import BiometryScores
from fetalscan.errors import FetalscanError


def bland_altman_figure(df: pd.DataFrame, title: str):
    """Bland-Altman plot of predicted vs reference HC (difference against mean), as a Figure."""
    from fetalscan.figures import new_figure

    ok = np.isfinite(df["hc_pred_mm"]) & np.isfinite(df["hc_ref_mm"])
    pred, ref = df.loc[ok, "hc_pred_mm"].to_numpy(float), df.loc[ok, "hc_ref_mm"].to_numpy(float)
    fig, ax = new_figure(6.4, 4.2)
    mean, diff = (pred + ref) / 2, pred - ref
    ax.scatter(mean, diff, s=8, alpha=0.6, color="#1f77b4", linewidths=0)
    if len(diff) > 1:
        bias, sd = diff.mean(), diff.std(ddof=1)
        for y, style, label in ((bias, "-", f"bias {bias:+.2f} mm"),
                                (bias + 1.96 * sd, "--", f"+1.96 SD {bias + 1.96 * sd:+.2f} mm"),
                                (bias - 1.96 * sd, "--", f"-1.96 SD {bias - 1.96 * sd:+.2f} mm")):
            ax.axhline(y, color="#d62728", linestyle=style, linewidth=1, label=label)
        ax.legend(loc="upper left", fontsize=8, frameon=False)
    ax.axhline(0, color="grey", linewidth=0.6)
    ax.set_xlabel("mean of predicted and reference HC (mm)")
    ax.set_ylabel("predicted - reference HC (mm)")
    ax.set_title(title, fontsize=10)
    return fig


def render_biometry_report(metrics: dict, per_image: pd.DataFrame, title: str, bland_altman_uri: str | None) -> str:
    """The self-contained HTML report (``templates/biometry_report.html.j2``).

    ``bland_altman_uri`` is ``None`` when no image has both a measured and a reference
    HC (no measurable heads): the page then says so instead of showing an empty plot.
    """
    from fetalscan.report.templating import render
    from fetalscan.texts import BIOMETRY_PLANE, ISUOG_BIOMETRY_2019

    worst = per_image.sort_values("hc_abs_diff_mm", ascending=False, na_position="first").head(10)
    rows = []
    for r in worst.to_dict("records"):
        prefix = f"{r.get('image')}: "  # each warning starts with the image's name, already in the first column
        r["warning_list"] = [w.strip()[len(prefix):] if w.strip().startswith(prefix) else w.strip()
                             for w in str(r.get("warnings") or "").split(" | ") if w.strip()]
        rows.append(r)
    # fewer than two HC differences give no Bland-Altman limits
    m = {"bland_altman": None, "n_check": 0, "measurable_heads": metrics.get("hc_abs_diff_mm_n", 0), **metrics}
    return render("biometry_report.html.j2", title=title, m=m, bland_altman=bland_altman_uri,
                  worst=rows, fmt=_fmt, plane=BIOMETRY_PLANE, sources=[ISUOG_BIOMETRY_2019])


def _fmt(v, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def write_biometry_report(out: Path, scores: BiometryScores) -> None:
    """``folds.csv`` (CV), ``biometry_images.csv``, ``biometry_metrics.json``, ``bland_altman.png``, ``report.html``."""
    from fetalscan.figures import figure_data_uri, save_figure
    from fetalscan.fileio import write_csv, write_json, write_text

    out = Path(out)
    if scores.folds is not None:
        write_csv(out / "folds.csv", scores.folds)
    write_csv(out / "biometry_images.csv", scores.per_image)
    write_json(out / "biometry_metrics.json", scores.metrics)
    df = scores.per_image
    uri = None
    if (np.isfinite(df["hc_pred_mm"]) & np.isfinite(df["hc_ref_mm"])).any():
        fig = bland_altman_figure(df, f"Bland-Altman, {scores.title}")
        save_figure(fig, out / "bland_altman.png")
        uri = figure_data_uri(fig)
    else:  # no measurable heads: no plot (and no stale one from an earlier run in this folder)
        (out / "bland_altman.png").unlink(missing_ok=True)
    write_text(out / "report.html", render_biometry_report(scores.metrics, df, scores.title, uri))


def evaluate_checkpoint_to_folder(model_path: str | Path, items: Sequence, out: str | Path, *, split: str = "all",
                                  device: str = "auto", backend: str = "auto", overwrite: bool = False,
                                  n_boot: int = 1000, seed: int = 0, manifest: str | None = None) -> dict:
    """Score a trained segmenter (:func:`fetalscan.biometry.scoring.evaluate_checkpoint`) and write
    the report folder ``out``; returns the metrics."""
    from fetalscan.biometry.scoring import evaluate_checkpoint
    from fetalscan.fileio import check_out_dir, prepare_out_dir

    _check_options(n_boot)
    out = check_out_dir(out, overwrite)
    scores = evaluate_checkpoint(model_path, items, split=split, device=device, backend=backend, n_boot=n_boot,
                                 seed=seed, manifest=manifest)
    write_biometry_report(prepare_out_dir(out, overwrite), scores)
    return scores.metrics


def _check_options(n_boot: int, folds: int | None = None) -> None:
    """Refuse unusable evaluation options before any work (not after the training)."""
    if n_boot < 1:
        raise FetalscanError(f"--n-boot must be at least 1, got {n_boot}")
    if folds is not None and folds < 2:
        raise FetalscanError(f"--folds must be at least 2, got {folds}")


def cross_validate_to_folder(items: Sequence, cfg, out: str | Path, *, folds: int = 5, overwrite: bool = False,
                             n_boot: int = 1000, manifest: str | None = None, save_models: bool = False) -> dict:
    """Grouped cross-validation (:func:`fetalscan.biometry.training.cross_validate`) written to the report
    folder ``out`` (with ``save_models``, each fold's ``fold<k>_model.pt`` too); returns the metrics."""
    from fetalscan.biometry.training import cross_validate
    from fetalscan.fileio import check_out_dir, prepare_out_dir

    cfg.validate()
    _check_options(n_boot, folds)
    # fold models are written as soon as each is trained: the folder is prepared (and, under the CLI,
    # marked unfinished) first, so an interrupted run is recognised on the next one
    out = prepare_out_dir(out, overwrite) if save_models else check_out_dir(out, overwrite)
    scores = cross_validate(items, cfg, folds=folds, n_boot=n_boot, manifest=manifest,
                            models_dir=out if save_models else None)
    # the fold models were written into ``out`` by this run, so it may be non-empty now
    write_biometry_report(prepare_out_dir(out, overwrite or save_models), scores)
    return scores.metrics
