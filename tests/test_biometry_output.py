"""What biometry tells the user when the model fails or a fit is doubtful (issue #17, items 4 and 5).

- no head found anywhere: "no measurable heads", never "– mm does not meet the goal" or "nan ± nan";
  no empty Bland-Altman plot;
- a head region that is not elliptical: status ``check``, the warning on the console line and on
  the overlay, and no gestational age;
- the warnings column of the report wraps inside the page;
- ``biometry predict`` takes a manifest with only an image column, and keeps the input's reference
  ``hc_mm`` (as ``hc_ref_mm``) beside the measured ``hc_mm``.

Everything runs on synthetic masks and a stand-in segmenter: no training, a few seconds.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import write_png

from fetalscan.biometry.geometry import draw_overlay, measure_mask
from fetalscan.biometry.scoring import BiometryScores

SHAPE = (270, 400)


def ellipse_mask(shape=SHAPE, cx=200.0, cy=135.0, a=120.0, b=90.0) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(float)
    return ((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2 <= 1.0


def lumpy_mask(shape=SHAPE) -> np.ndarray:
    """A head region that is clearly not an ellipse (a bulge as big as the head)."""
    m = ellipse_mask(shape, a=90, b=70)
    m[100:170, 200:380] = True
    return m


def scored_images(n: int = 4, found: bool = True):
    """Rows of biometry_images.csv: ``n`` images of ``n`` exams, measured (or no head found)."""
    import math

    import pandas as pd

    rows = []
    for i in range(n):
        ref = 170.0 + 10 * i
        pred = ref + 1.0 if found else math.nan
        rows.append({"image": f"images/{i:03d}_HC.png", "exam": f"{i:03d}", "fold": "",
                     "status": "ok" if found else "no_head", "hc_ref_mm": ref, "hc_pred_mm": pred,
                     "hc_diff_mm": pred - ref, "hc_abs_diff_mm": abs(pred - ref), "dice": 0.97 if found else 0.0,
                     "dice_raw": 0.96 if found else 0.1, "hausdorff_mm": 1.0 if found else math.nan,
                     "hc_ref_mask_fit_diff_mm": 0.01,
                     "warnings": "" if found else f"images/{i:03d}_HC.png: no head found: 35 separate regions and "
                                                  "the largest holds only 41% of the head pixels (< 80%); cannot "
                                                  "tell which is the head"})
    return pd.DataFrame(rows)


def biometry_metrics(df) -> dict:
    """biometry_metrics.json as :func:`fetalscan.biometry.scoring.evaluate_checkpoint` writes it."""
    from fetalscan.biometry.scoring import HC18_REFERENCE, LIMITATIONS, METRIC_DEFINITIONS, summarise
    from fetalscan.texts import BIOMETRY_DISCLAIMER

    return {"disclaimer": BIOMETRY_DISCLAIMER, "evaluation": "trained model m.pt on its held-out exams",
            **summarise(df, n_boot=20, seed=0), "definitions": METRIC_DEFINITIONS, "hc18_reference": HC18_REFERENCE,
            "limitations": LIMITATIONS, "provenance": {"created": "t", "data_hash": "x" * 12}}


# --------------------------------------------------------------------------- no measurable heads


def test_no_measurable_heads_is_said_plainly_in_the_report_files_and_console(tmp_path, capsys):
    from fetalscan.cli.biometry import _print_metrics
    from fetalscan.report.biometry import write_biometry_report

    df = scored_images(found=False)
    m = biometry_metrics(df)
    assert m["goal_met"] is None and m["measurable_heads"] == 0
    stale = tmp_path / "bland_altman.png"
    stale.write_bytes(b"an earlier run's plot")
    write_biometry_report(tmp_path, BiometryScores(df, m, "Held-out exams"))
    html = (tmp_path / "report.html").read_text()
    assert "No measurable heads" in html
    assert "does not meet the goal" not in html and "– mm" not in html
    assert "Bland-Altman plot of predicted" not in html and not stale.exists()
    _print_metrics(m, "Held-out exams")
    out = capsys.readouterr()
    assert "nan" not in (out.out + out.err).lower()
    assert "no measurable heads" in out.err.lower()


def test_measured_heads_still_get_the_goal_and_the_plot(tmp_path):
    from fetalscan.report.biometry import write_biometry_report

    df = scored_images(found=True)
    m = biometry_metrics(df)
    write_biometry_report(tmp_path, BiometryScores(df, m, "Held-out exams"))
    html = (tmp_path / "report.html").read_text()
    assert m["goal_met"] is True and "meets the goal" in html and "No measurable heads" not in html
    assert (tmp_path / "bland_altman.png").is_file() and "Bland-Altman plot of predicted" in html


def test_warnings_column_wraps_inside_the_page_and_drops_the_repeated_image_name(tmp_path):
    from fetalscan.report.biometry import render_biometry_report

    df = scored_images(found=False)
    html = render_biometry_report(biometry_metrics(df), df, "Held-out exams", None)
    assert '<table class="wide">' in html and "table-layout: fixed" in html and "overflow-wrap: anywhere" in html
    cell = html[html.index('<td class="warnings muted">'):]
    cell = cell[:cell.index("</td>")]
    assert "<li>no head found: 35 separate regions" in cell and "images/000_HC.png" not in cell


# --------------------------------------------------------------------------- doubtful fits


def test_a_non_elliptical_head_is_flagged_check_with_no_gestational_age():
    from fetalscan.biometry.geometry import overlay_lines

    m = measure_mask(lumpy_mask(), 0.25, where="lumpy.png")
    assert m.status == "check" and m.found and m.hc is not None
    assert m.ga.weeks is None and "not elliptical" in m.ga.note
    line = m.summary()
    assert "CHECK" in line and "not elliptical" in line and "GA" not in line.split("CHECK")[0]
    row = m.to_row()
    assert row["status"] == "check" and row["ga_weeks"] is None and "not elliptical" in row["ga_note"]
    lines = overlay_lines(m)
    assert lines[0][0].startswith("CHECK: head region not elliptical") and lines[0][1] != (255, 255, 255)
    assert any(text.startswith("GA  not given") for text, _ in lines)
    assert draw_overlay(np.zeros(SHAPE + (3,), np.uint8), m).shape == SHAPE + (3,)
    ok = measure_mask(ellipse_mask(), 0.25)
    assert ok.status == "ok" and ok.ga.weeks is not None and "CHECK" not in ok.summary()


class StandIn:
    """A segmenter whose mask is an ellipse, or a lumpy region for images whose name has 'lumpy'."""

    axis_offset_px = 0.0

    def measure(self, image, pixel_size_mm=None, where="image"):
        return measure_mask(lumpy_mask(image.shape[:2]) if "lumpy" in where else ellipse_mask(image.shape[:2]),
                            pixel_size_mm, where=where)


@pytest.fixture
def stand_in_segmenter(monkeypatch):
    from fetalscan.biometry import segmenter

    monkeypatch.setattr(segmenter.HeadSegmenter, "load", classmethod(lambda cls, *a, **k: StandIn()))


def _images(folder: Path, names) -> list[str]:
    for n in names:
        write_png(folder / n, np.full(SHAPE, 60, np.uint8))
    return list(names)


def test_predict_takes_a_manifest_with_only_an_image_column_and_keeps_the_reference_hc(
        tmp_path, stand_in_segmenter, capsys):
    from fetalscan.cli import main

    names = _images(tmp_path, ["a.png", "b_lumpy.png", "c.png"])
    manifest = tmp_path / "scans.csv"
    with open(manifest, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "pixel_size_mm", "hc_mm"])  # no exam column, as --help promises
        w.writerows([[names[0], "0.25", "170.5"], [names[1], "0.25", "150.0"], [names[2], "0.25", ""]])
    out = tmp_path / "pred"
    assert main(["biometry", "predict", "--model", "stand-in.pt", "--data", str(manifest), "--out", str(out),
                 "--device", "cpu"]) == 0
    rows = list(csv.DictReader(open(out / "measurements.csv")))
    header = list(rows[0])
    assert header.index("hc_ref_mm") == header.index("hc_mm") + 1  # side by side, both named
    a, lumpy, c = rows
    assert float(a["hc_ref_mm"]) == 170.5 and float(a["hc_mm"]) != 170.5
    assert float(a["hc_diff_mm"]) == pytest.approx(float(a["hc_mm"]) - 170.5)
    assert c["hc_ref_mm"] == "" and c["hc_diff_mm"] == "" and float(c["hc_mm"]) > 0
    assert lumpy["status"] == "check" and lumpy["ga_weeks"] == ""
    printed = capsys.readouterr()
    warned = [ln for ln in printed.err.splitlines() if "b_lumpy.png" in ln]
    assert warned and warned[0].startswith("warning:") and "CHECK" in warned[0] and "no GA given" in warned[0]
    assert ", GA " not in warned[0]  # a doubtful fit never shows an age
    assert "a.png: HC" in printed.out and "GA" in printed.out.split("a.png: HC")[1].splitlines()[0]


def test_a_cine_gets_one_console_line_not_one_per_frame(tmp_path):
    from fetalscan.biometry.predict import BiometryPredictConfig, measure_records
    from fetalscan.data.records import Record

    recs = [Record(tmp_path / "cine.dcm", None, "s", "cine.dcm", frame=i) for i in range(5)]
    frames = [np.full(SHAPE + (3,), 60, np.uint8)] * 5

    import fetalscan.data.records as records_mod

    original = records_mod.iter_record_images
    records_mod.iter_record_images = lambda rs: iter(enumerate(frames))
    try:
        res = measure_records(StandIn(), recs, BiometryPredictConfig(pixel_size_mm=0.25), tmp_path)
    finally:
        records_mod.iter_record_images = original
    lines = res.console_lines()
    assert len(lines) == 1 and lines[0][0].startswith("cine.dcm (5 frames): head measured in 5")
    assert len(pd.read_csv(tmp_path / "measurements.csv")) == 5
    assert pd.read_csv(tmp_path / "measurements.csv")["hc_mm"].notna().all()
