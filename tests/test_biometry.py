"""Head biometry: ellipse maths, gestational age, bad inputs, training on real HC18 images, CLI."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import write_png

from fetalscan.biometry.geometry import (
    Ellipse,
    draw_overlay,
    fit_head_ellipse,
    hadlock_ga,
    measure_mask,
    ramanujan_perimeter,
)
from fetalscan.biometry.scoring import dice, hausdorff_mm
from fetalscan.biometry.segmenter import HeadSegmenter
from fetalscan.biometry.training import (
    BiometryTrainConfig,
    calibrate_axis_offset,
    prepare_set,
)
from fetalscan.data.hc18 import load_biometry_manifest, read_mask
from fetalscan.errors import CheckpointError, DataError, FetalscanError
from fetalscan.models.segmenters import build_segmenter, read_segmenter_checkpoint

# --------------------------------------------------------------------------- helpers


def analytic_ellipse_mask(shape, cx, cy, a, b, angle_deg) -> np.ndarray:
    """Pixels whose centre lies inside the ellipse (x-right, y-down, angle from +x towards +y)."""
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float64)
    t = math.radians(angle_deg)
    u = (xx - cx) * math.cos(t) + (yy - cy) * math.sin(t)
    v = -(xx - cx) * math.sin(t) + (yy - cy) * math.cos(t)
    return (u / a) ** 2 + (v / b) ** 2 <= 1.0


def exact_perimeter(a: float, b: float) -> float:
    from scipy.special import ellipe

    return 4 * a * ellipe(1 - (b / a) ** 2)


# --------------------------------------------------------------------------- ellipse maths


@pytest.mark.parametrize("a, b", [(100.0, 100.0), (200.0, 150.0), (300.0, 120.0), (50.0, 10.0)])
def test_ramanujan_matches_the_exact_elliptic_integral(a, b):
    assert ramanujan_perimeter(a, b) == pytest.approx(exact_perimeter(a, b), rel=1e-6)
    assert ramanujan_perimeter(b, a) == pytest.approx(ramanujan_perimeter(a, b))


@pytest.mark.parametrize("cx, cy, a, b, angle", [
    (400.3, 270.7, 230.0, 170.0, 0.0),
    (390.0, 260.0, 180.0, 140.0, 33.0),
    (420.5, 280.2, 120.0, 95.0, 118.0),
    (300.0, 250.0, 60.0, 59.0, 75.0),
])
def test_hc_of_an_analytic_ellipse_is_within_half_a_percent(cx, cy, a, b, angle):
    mask = analytic_ellipse_mask((540, 800), cx, cy, a, b, angle)
    ps = 0.12
    m = measure_mask(mask, ps)
    true_hc = exact_perimeter(a, b) * ps
    assert m.status == "ok" and m.unit == "mm"
    assert m.hc == pytest.approx(true_hc, rel=0.005)
    assert m.ofd == pytest.approx(2 * a * ps, rel=0.01)
    assert m.bpd == pytest.approx(2 * b * ps, rel=0.01)
    e = m.ellipse
    assert (e.cx, e.cy) == pytest.approx((cx, cy), abs=0.5)
    if a - b > 5:  # the direction of a near-circle is undefined
        assert min(abs(e.angle_deg - angle) % 180, 180 - abs(e.angle_deg - angle) % 180) < 1.0
    assert m.fit.fit_iou > 0.97 and not m.fit.touches_border and m.warnings == []


def test_axis_end_points_lie_on_the_ellipse():
    e = Ellipse(200.0, 150.0, 80.0, 50.0, 30.0)
    major, minor = e.axis_endpoints()
    t = math.radians(e.angle_deg)
    for (x, y) in (*major, *minor):
        u = (x - e.cx) * math.cos(t) + (y - e.cy) * math.sin(t)
        v = -(x - e.cx) * math.sin(t) + (y - e.cy) * math.cos(t)
        assert (u / e.semi_major) ** 2 + (v / e.semi_minor) ** 2 == pytest.approx(1.0)
    assert math.dist(*major) == pytest.approx(160.0) and math.dist(*minor) == pytest.approx(100.0)
    filled = e.filled_mask((300, 400))
    assert filled.sum() == pytest.approx(math.pi * 80 * 50, rel=0.02)


def test_axis_offset_grows_both_semi_axes():
    mask = analytic_ellipse_mask((400, 400), 200, 200, 120, 90, 0)
    plain, grown = measure_mask(mask, 1.0), measure_mask(mask, 1.0, axis_offset_px=-1.0)
    assert grown.ofd == pytest.approx(plain.ofd - 2.0, abs=1e-6)
    assert grown.hc == pytest.approx(ramanujan_perimeter(plain.ofd / 2 - 1, plain.bpd / 2 - 1), rel=1e-9)
    cal = calibrate_axis_offset([plain.ellipse], np.array([ramanujan_perimeter(plain.ofd / 2 + 0.7,
                                                                                plain.bpd / 2 + 0.7)]))
    assert cal["axis_offset_px"] == pytest.approx(0.7, abs=1e-3) and cal["n"] == 1


# --------------------------------------------------------------------------- gestational age


def test_hadlock_formula_reproduces_hand_computed_values():
    # GA = 8.96 + 0.540 HC + 0.0003 HC^3 (HC in cm), Hadlock et al., Radiology 1984
    for hc_mm, weeks in [(100.0, 14.66), (175.0, 20.0178125), (200.0, 22.16), (250.0, 27.1475), (300.0, 33.26)]:
        assert hadlock_ga(hc_mm).weeks == pytest.approx(weeks, abs=1e-6)


# Mean HC (cm) at menstrual age (weeks) tabulated "from Hadlock (1984)" (medicalalgorithms.com,
# head circumference). That table is the size-for-age direction, so the GA predicted from its HC
# must fall within the formula's stated +/-2 SD spread, not match it exactly.
HADLOCK_TABLE = [(14.0, 9.7), (16.0, 12.4), (18.0, 15.1), (20.0, 17.7), (22.0, 20.1), (24.0, 22.4),
                 (26.0, 24.6), (28.0, 26.6), (30.0, 28.4), (32.0, 30.1), (34.0, 31.5), (36.0, 32.8),
                 (38.0, 33.8), (40.0, 34.6)]


@pytest.mark.parametrize("weeks, hc_cm", HADLOCK_TABLE)
def test_hadlock_ga_agrees_with_the_published_table_within_its_variability(weeks, hc_cm):
    ga = hadlock_ga(hc_cm * 10)
    assert abs(ga.weeks - weeks) <= ga.two_sd_weeks


def test_hadlock_variability_and_range():
    assert hadlock_ga(120.0).two_sd_weeks == pytest.approx(1.19)
    assert hadlock_ga(200.0).two_sd_weeks == pytest.approx(1.48)
    assert hadlock_ga(340.0).two_sd_weeks == pytest.approx(3.20)
    assert hadlock_ga(147.0).two_sd_weeks == pytest.approx(1.48)  # gap between bands takes the wider
    below = hadlock_ga(44.3)
    assert below.weeks is None and "outside the range" in below.note and below.text().startswith("not estimated")
    assert hadlock_ga(None).weeks is None
    assert hadlock_ga(175.0).text().startswith("20w 0d")


# --------------------------------------------------------------------------- bad inputs


def test_missing_pixel_size_reports_pixels_with_a_warning_and_no_mm(caplog):
    mask = analytic_ellipse_mask((300, 400), 200, 150, 100, 80, 10)
    m = measure_mask(mask, None, where="scan.png")
    assert m.status == "ok" and m.unit == "px"
    assert m.hc == pytest.approx(exact_perimeter(100, 80), rel=0.005)
    assert m.ga.weeks is None
    assert any("pixel size unknown" in w and "scan.png" in w for w in m.warnings)
    assert "pixel size unknown" in caplog.text
    row = m.to_row()
    assert row["hc_mm"] is None and row["bpd_mm"] is None and row["ofd_mm"] is None and row["ga_weeks"] is None
    assert row["hc_px"] == pytest.approx(m.hc) and row["unit"] == "px"
    assert "px" in m.summary() and "mm" not in m.summary()


def test_empty_mask_is_no_head_not_an_exception():
    m = measure_mask(np.zeros((100, 120), np.uint8), 0.1)
    assert m.status == "no_head" and m.hc is None and not m.found
    assert "no head found" in m.fit.reason and "empty" in m.fit.reason
    assert "no head found" in m.summary()
    overlay = draw_overlay(np.zeros((100, 120, 3), np.uint8), m)
    assert overlay.shape == (100, 120, 3) and overlay.any()


def test_two_similar_blobs_are_no_head_but_a_dominant_blob_is_measured():
    two = analytic_ellipse_mask((300, 600), 150, 150, 80, 60, 0) | analytic_ellipse_mask((300, 600), 450, 150, 75, 60, 0)
    m = measure_mask(two, 0.1)
    assert m.status == "no_head" and "separate regions" in m.fit.reason and m.fit.n_components == 2
    speck = analytic_ellipse_mask((300, 600), 150, 150, 80, 60, 0) | analytic_ellipse_mask((300, 600), 450, 150, 8, 6, 0)
    m = measure_mask(speck, 0.1)
    assert m.status == "ok" and m.hc == pytest.approx(exact_perimeter(80, 60) * 0.1, rel=0.01)
    assert any("extra region" in w for w in m.warnings)
    tiny = analytic_ellipse_mask((300, 600), 150, 150, 3, 2, 0)
    assert measure_mask(tiny, 0.1).status == "no_head"


def test_bad_pixel_size_and_bad_mask_arrays_are_clear_errors():
    mask = analytic_ellipse_mask((100, 100), 50, 50, 30, 20, 0)
    with pytest.raises(DataError, match="pixel size must be > 0"):
        measure_mask(mask, -0.2, where="x.png")
    with pytest.raises(DataError, match="2-D"):
        fit_head_ellipse(np.zeros((4, 5, 6, 7)))


def _hc18_like(tmp_path: Path, n: int = 4, mask_shape=None) -> Path:
    rows = []
    for i in range(n):
        img = np.full((90, 120), 40, np.uint8)
        mask = analytic_ellipse_mask((90, 120), 60, 45, 30 + i, 22 + i, 10 * i).astype(np.uint8) * 255
        img[mask > 0] = 140
        write_png(tmp_path / f"images/{i}_HC.png", img)
        if mask_shape is not None and i == 1:
            mask = np.zeros(mask_shape, np.uint8)
        write_png(tmp_path / f"masks/{i}_HC_mask.png", mask)
        rows.append({"image": f"images/{i}_HC.png", "mask": f"masks/{i}_HC_mask.png", "exam": str(i // 2),
                     "pixel_size_mm": "0.2", "hc_mm": f"{exact_perimeter(30 + i, 22 + i) * 0.2:.2f}"})
    path = tmp_path / "manifest.csv"
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def test_wrong_shaped_mask_file_is_an_error_naming_the_file(tmp_path):
    manifest = _hc18_like(tmp_path, mask_shape=(50, 50))
    items = load_biometry_manifest(manifest)
    with pytest.raises(DataError, match=r"1_HC_mask\.png has shape 50x50.*1_HC\.png is 120x90"):
        prepare_set(items, BiometryTrainConfig(input_height=64, input_width=96).segmenter())
    with pytest.raises(DataError, match="1_HC_mask.png"):
        read_mask(items[1], (90, 120))


def test_manifest_errors_name_file_line_and_field(tmp_path):
    manifest = _hc18_like(tmp_path)
    text = manifest.read_text().splitlines()
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join([text[0], text[1], text[2].replace(",0.2,", ",abc,")]) + "\n")
    with pytest.raises(DataError, match=r"bad\.csv, line 3, field 'pixel_size_mm': expected a number"):
        load_biometry_manifest(bad)
    bad.write_text("image,exam\nimages/0_HC.png,0\n")
    with pytest.raises(DataError, match="missing column\\(s\\) mask"):
        load_biometry_manifest(bad)
    bad.write_text(text[0] + "\n" + text[1].replace("images/0_HC.png", "images/nope.png") + "\n")
    with pytest.raises(DataError, match="line 2, field 'image': file does not exist: images/nope.png"):
        load_biometry_manifest(bad)
    # the same image on two lines would count twice in every score (and could sit on both sides of a split)
    bad.write_text("\n".join([text[0], text[1], text[2], text[1].replace(",0,", ",9,")]) + "\n")
    with pytest.raises(DataError, match=r"bad\.csv: 1 repeated row\(s\): line 4 repeats line 2 \(images/0_HC\.png\)"):
        load_biometry_manifest(bad)


def test_hausdorff_and_dice_on_known_shapes():
    a = analytic_ellipse_mask((200, 200), 100, 100, 50, 50, 0)
    b = analytic_ellipse_mask((200, 200), 103, 100, 50, 50, 0)
    assert dice(a, a) == 1.0 and 0.9 < dice(a, b) < 1.0
    assert hausdorff_mm(a, b, 0.5) == pytest.approx(1.5, abs=0.5)
    assert math.isnan(hausdorff_mm(a, np.zeros_like(a), 1.0))


def test_not_a_segmenter_checkpoint_is_refused(tmp_path):
    import torch

    p = tmp_path / "x.pt"
    torch.save({"format": "fetalscan-classifier", "format_version": 1}, p)
    with pytest.raises(CheckpointError, match="not a fetalscan head-segmenter checkpoint.*classifier"):
        read_segmenter_checkpoint(p)
    with pytest.raises(CheckpointError, match="not found"):
        read_segmenter_checkpoint(tmp_path / "missing.pt")


# --------------------------------------------------------------------------- real HC18 data


@pytest.fixture(scope="module")
def hc18(shared_data: Path) -> Path:
    path = shared_data / "hc18" / "manifest.csv"
    if not path.is_file():
        pytest.skip(f"HC18 data not found at {path}")
    return path


def test_ellipse_fit_on_reference_masks_reproduces_the_reference_hc(hc18):
    """Measurement error alone: the masks reach ~1.4 px beyond the reference ellipse (drawing convention)."""
    items = load_biometry_manifest(hc18)[::40]
    from fetalscan.data.records import read_image

    ellipses, ref = [], []
    for it in items:
        mask = read_mask(it, read_image(it.image).shape[:2])
        fit = fit_head_ellipse(mask)
        assert fit.found
        ellipses.append(fit.ellipse)
        ref.append(it.hc_mm / it.pixel_size_mm)
    raw = np.array([e.perimeter() for e in ellipses]) / np.array(ref) - 1
    assert 0 < np.median(raw) < 0.015  # the masks are slightly larger than the reference ellipse
    cal = calibrate_axis_offset(ellipses[::2], np.array(ref[::2]))  # estimate on half, check on the other half
    assert -2.0 < cal["axis_offset_px"] < -0.8
    rel = [e.grown(cal["axis_offset_px"]).perimeter() / r - 1 for e, r in zip(ellipses[1::2], ref[1::2])]
    assert np.abs(rel).mean() < 0.003


# The small training run below is reproducible and far from its pass/fail edges: every generator is
# seeded, torch runs on one thread with deterministic kernels (restored afterwards; 2 threads already
# give another trajectory), and 25 epochs instead of 10 let the one-cycle schedule settle, so the kept
# (best inner-validation) epoch is a trained one. Measured on 2 cores, torch 2.14, seeds 0-7:
#   train loss last/first 0.16-0.23; validation Dice 0.78-0.88 (seed 0: 0.82) against 0.55 for the
#   average training mask; Dice with the image's own mask minus Dice with the other images' masks 0.23-0.36.
# Broken training fails: lr 0 or an optimizer that never steps -> loss ratio 0.995, Dice 0.06 (every check);
# masks shuffled between images (the net can only learn where heads usually are) -> loss ratio 0.48 and
# Dice 0.71-0.73, but own-minus-other 0.08-0.10. (The old 10-epoch set-up: Dice 0.73-0.81 here, 0.43
# on a fresh install elsewhere.)
# The figures above were measured with the MobileNet-V2 encoder from scratch (the default recipe then), so the
# encoder is pinned here; the default recipe (SonoNet-16 encoder) is trained by the `trained` fixture below.
SMALL_FIT = dict(encoder="mobilenet_v2", pretrained="none", input_height=64, input_width=96, epochs=25, batch_size=4,
                 lr=3e-3, patience=100, decoder_channels="16,16,8,8,8", device="cpu", seed=0)


@pytest.fixture(scope="module")
def small_fit(hc18):
    """A tiny U-Net trained once, deterministically, on 36 HC18 images; 12 images of other exams validate it.

    Returns ``(model, cfg, train, val, fit)``; the model holds the kept (best inner-validation) epoch.
    """
    import random

    import torch

    from fetalscan.biometry.training import fit_segmenter

    items = load_biometry_manifest(hc18)
    items = [it for it in items if it.exam < "200"][:48]
    cfg = BiometryTrainConfig(**SMALL_FIT)
    data = prepare_set(items, cfg.segmenter())
    train, val = data.subset(range(36)), data.subset(range(36, 48))
    assert not {it.exam for it in train.items} & {it.exam for it in val.items}
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        torch.set_num_threads(1)  # the summation order no longer depends on the machine's core count
        torch.use_deterministic_algorithms(True)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        model = build_segmenter(cfg.segmenter())
        fit = fit_segmenter(model, train, val, cfg, torch.device("cpu"), seed=cfg.seed)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    return model, cfg, train, val, fit


@pytest.mark.slow
def test_training_on_a_small_hc18_subset_lowers_the_loss_and_beats_a_trivial_baseline(small_fit):
    import torch

    from fetalscan.biometry.training import predict_low_res

    model, cfg, train, val, fit = small_fit
    losses = [h["train_loss"] for h in fit.history]
    assert len(losses) == cfg.epochs  # patience never stops this run early
    assert losses[-1] < 0.5 * losses[0], [round(v, 3) for v in losses]
    pre = cfg.segmenter().preprocessing()
    pred = predict_low_res(model, val.images, pre, torch.device("cpu")) > 0
    truth = val.masks[:, 0].numpy() > 127
    baseline = (train.masks[:, 0].float().mean(0).numpy() > 127)  # the average training mask
    ours = np.mean([dice(p, t) for p, t in zip(pred, truth)])
    trivial = np.mean([dice(baseline, t) for t in truth])
    assert ours > 0.7 and ours > trivial + 0.1, f"Dice {ours:.3f} vs average-mask baseline {trivial:.3f}"
    # the segmentation follows the image: another image's mask fits a prediction far worse than its own
    others = np.mean([dice(p, t) for i, p in enumerate(pred) for j, t in enumerate(truth) if i != j])
    assert ours - others > 0.15, f"Dice {ours:.3f} with the image's own mask, {others:.3f} with other images' masks"


# --------------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def hc18_small(hc18, tmp_path_factory) -> Path:
    """A 16-image HC18 manifest (8 exams) with absolute paths."""
    out = tmp_path_factory.mktemp("hc18_small") / "manifest.csv"
    with open(hc18, newline="") as fh:
        rows = list(csv.DictReader(fh))
    by_exam: dict[str, list[dict]] = {}
    for r in rows:
        by_exam.setdefault(r["exam"], []).append(r)
    picked = [r for e in sorted(by_exam)[:40] for r in by_exam[e]][:16]
    for r in picked:
        r["image"] = str(hc18.parent / r["image"])
        r["mask"] = str(hc18.parent / r["mask"])
    with open(out, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(picked[0]))
        w.writeheader()
        w.writerows(picked)
    return out


TINY = ["--input-height", "64", "--input-width", "96", "--decoder-channels", "16,16,8,8,8", "--batch-size", "4",
        "--device", "cpu"]


@pytest.fixture(scope="module")
def trained(hc18_small, tmp_path_factory) -> Path:
    from fetalscan.cli import main

    out = tmp_path_factory.mktemp("bio_train")
    assert main(["biometry", "train", "--data", str(hc18_small), "--out", str(out), "--overwrite",
                 "--epochs", "2", "--holdout-fraction", "0.25", *TINY]) == 0
    return out


@pytest.mark.slow
def test_train_writes_a_loadable_segmenter_with_its_split(trained):
    blob = read_segmenter_checkpoint(trained / "model.pt")
    assert blob["format"] == "fetalscan-segmenter" and "axis_offset_px" in blob["calibration"]
    assert blob["data"]["holdout_exams"]
    with open(trained / "split.csv") as fh:
        roles = {r["exam"]: r["role"] for r in csv.DictReader(fh)}
    assert set(roles.values()) == {"train", "inner_val", "holdout"}
    assert set(blob["data"]["holdout_exams"]) == {e for e, r in roles.items() if r == "holdout"}
    summary = json.loads((trained / "train.json").read_text())
    assert summary["fit"]["epochs_run"] == 2


@pytest.mark.slow
def test_predict_writes_overlay_and_measurements(small_fit, tmp_path, capsys):
    """`biometry predict` with the segmenter trained above finds and measures the 12 validation heads."""
    from PIL import Image

    from fetalscan.cli import main
    from fetalscan.models.segmenters import save_segmenter

    model, cfg, _, val, fit = small_fit
    ckpt = save_segmenter(tmp_path / "model.pt", model, cfg.segmenter(), calibration=fit.calibration)
    manifest = tmp_path / "val.csv"  # an HC18-style manifest: the pixel size comes from each row
    with open(manifest, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "exam", "pixel_size_mm"])
        w.writerows([str(it.image), it.exam, repr(it.pixel_size_mm)] for it in val.items)
    out = tmp_path / "pred_all"
    assert main(["biometry", "predict", "--model", str(ckpt), "--data", str(manifest), "--out", str(out),
                 "--device", "cpu"]) == 0
    with open(out / "measurements.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 12
    statuses = [r["status"] for r in rows]
    # every head is found; "check" (measured, but the region is not elliptical: no GA) stays a minority
    # (measured, seed 0: 9 ok, 3 check; the 2-epoch model of `trained` found no head in the images tried)
    assert set(statuses) <= {"ok", "check"} and statuses.count("ok") >= 6, statuses
    ref = np.array([it.hc_mm for it in val.items])
    hc = np.array([float(r["hc_mm"]) for r in rows])
    rel = np.abs(hc / ref - 1)
    # measured (seed 0): median |HC error| 5 %, worst 26 %
    assert np.median(rel) < 0.15 and rel.max() < 0.6, np.round(rel, 3)
    for r, it in zip(rows, val.items):
        assert r["unit"] == "mm" and float(r["pixel_size_mm"]) == pytest.approx(it.pixel_size_mm)
        assert float(r["hc_px"]) * it.pixel_size_mm == pytest.approx(float(r["hc_mm"]), rel=1e-6)
        assert 0 < float(r["bpd_mm"]) <= float(r["ofd_mm"]) < float(r["hc_mm"])
        ga = hadlock_ga(float(r["hc_mm"]))
        if r["status"] == "ok" and ga.weeks is not None:
            assert float(r["ga_weeks"]) == pytest.approx(ga.weeks)
        else:
            assert r["ga_weeks"] == ""
        assert (out / r["overlay"]).is_file()

    # one file with --pixel-size and the plane check gives that image's row again, plus the plane columns
    first, row_all = val.items[0], rows[0]
    out1 = tmp_path / "pred"
    assert main(["biometry", "predict", "--model", str(ckpt), "--data", str(first.image), "--out", str(out1),
                 "--pixel-size", repr(first.pixel_size_mm), "--device", "cpu", "--plane-check"]) == 0
    with open(out1 / "measurements.csv") as fh:
        (row,) = list(csv.DictReader(fh))
    for col in ("hc_mm", "bpd_mm", "ofd_mm", "ga_weeks", "status", "overlay", "plane", "plane_confidence"):
        assert col in row
    assert row["status"] == row_all["status"]
    assert float(row["hc_mm"]) == pytest.approx(float(row_all["hc_mm"]), rel=1e-6)
    assert 0.0 <= float(row["plane_confidence"]) <= 1.0
    overlay = np.asarray(Image.open(out1 / row["overlay"]))
    assert overlay.shape[:2] == (540, 800)
    # without a pixel size: the same head in pixels and a warning, never mm
    out2 = tmp_path / "pred_px"
    capsys.readouterr()
    assert main(["biometry", "predict", "--model", str(ckpt), "--data", str(first.image), "--out", str(out2),
                 "--device", "cpu"]) == 0
    with open(out2 / "measurements.csv") as fh:
        (row,) = list(csv.DictReader(fh))
    assert row["status"] == row_all["status"] and row["unit"] == "px"
    assert row["hc_mm"] == "" and row["ga_weeks"] == ""
    assert float(row["hc_px"]) == pytest.approx(float(row_all["hc_px"]), rel=1e-6)
    assert "without a pixel size" in capsys.readouterr().err


@pytest.mark.slow
def test_evaluate_scores_the_held_out_exams_and_refuses_training_images(trained, hc18_small, tmp_path, capsys):
    from fetalscan.cli import main

    out = tmp_path / "eval"
    assert main(["biometry", "evaluate", "--model", str(trained / "model.pt"), "--data", str(hc18_small),
                 "--out", str(out), "--split", "holdout", "--device", "cpu", "--n-boot", "50"]) == 0
    m = json.loads((out / "biometry_metrics.json").read_text())
    for key in ("dice_mean", "hausdorff_mm_mean", "hc_abs_diff_mm_mean", "hc_abs_diff_mm_sd", "disclaimer"):
        assert key in m
    assert sum(b["n_images"] for b in m["by_reference_hc"]) == m["n_images"]
    assert (out / "biometry_images.csv").is_file()
    # a Bland-Altman plot only when some head was measured (this 2-epoch segmenter may find none)
    assert (out / "bland_altman.png").is_file() == bool(m["hc_abs_diff_mm_n"])
    assert "supports, and never replaces" in (out / "report.html").read_text()
    printed = capsys.readouterr().out
    assert "Dice" in printed and "HC difference" in printed
    assert main(["biometry", "evaluate", "--model", str(trained / "model.pt"), "--data", str(hc18_small),
                 "--out", str(tmp_path / "eval_all"), "--device", "cpu"]) == 2
    assert "were used to train" in capsys.readouterr().err


@pytest.mark.slow
def test_evaluate_without_a_model_runs_grouped_cross_validation(hc18_small, tmp_path, capsys):
    from fetalscan.cli import main

    out = tmp_path / "cv"
    assert main(["biometry", "evaluate", "--data", str(hc18_small), "--out", str(out), "--folds", "2",
                 "--epochs", "1", "--n-boot", "50", *TINY]) == 0
    printed = capsys.readouterr().out
    assert "cross-validation" in printed and "Dice" in printed and "HC difference" in printed
    with open(out / "biometry_images.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 16
    exam_folds: dict[str, set] = {}
    for r in rows:
        exam_folds.setdefault(r["exam"], set()).add(r["fold"])
    assert all(len(f) == 1 for f in exam_folds.values()), "an exam was split across folds"
    assert {r["fold"] for r in rows} == {"0", "1"}


@pytest.mark.slow
def test_segmenter_backends_agree(trained):
    torch_seg = HeadSegmenter.load(trained / "model.pt", backend="torch")
    onnx_seg = HeadSegmenter.load(trained / "model.pt", backend="onnx")
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (540, 800, 3), dtype=np.uint8)
    x = torch_seg.prepare(img)[None]
    assert np.allclose(torch_seg.logits(x), onnx_seg.logits(x), atol=1e-3)


# --------------------------------------------------------------------------- levers: encoder, TTA, ensemble


def test_sononet_segmenter_starts_from_the_bundled_plane_classifier_weights():
    import torch

    from fetalscan.models.segmenters import SegmenterConfig
    from fetalscan.models.sononet import sononet16

    pre = build_segmenter(SegmenterConfig(encoder="sononet16", pretrained="sononet", input_height=64, input_width=96))
    scratch = build_segmenter(SegmenterConfig(encoder="sononet16", pretrained="none", input_height=64, input_width=96))
    ref = sononet16(pretrained=True)
    for k, v in ref.features.state_dict().items():
        assert torch.equal(pre.encoder.state_dict()[k], v), k
    assert not torch.equal(scratch.encoder.state_dict()["0.0.0.weight"], ref.features.state_dict()["0.0.0.weight"])
    out = pre.eval()(torch.zeros(2, 1, 64, 96))
    assert out.shape == (2, 1, 64, 96)
    # SonoNet was trained on 255 * standardised grey values: the segmenter feeds it the same scale
    assert SegmenterConfig(encoder="sononet16").preprocessing().scale == 255.0
    assert SegmenterConfig().preprocessing().scale == 1.0
    with pytest.raises(FetalscanError, match="sononet"):
        SegmenterConfig(encoder="sononet16", pretrained="imagenet").validate()
    with pytest.raises(FetalscanError, match="imagenet"):
        SegmenterConfig(encoder="mobilenet_v2", pretrained="sononet").validate()


@pytest.mark.slow
def test_mirror_tta_is_mirror_equivariant_and_an_ensemble_of_copies_equals_one_model(trained, small_fit):
    plain = HeadSegmenter.load(trained / "model.pt", backend="torch")
    tta = HeadSegmenter.load(trained / "model.pt", backend="torch", tta=True)
    rng = np.random.default_rng(1)
    x = tta.prepare(rng.integers(0, 255, (270, 400, 3), dtype=np.uint8))[None]
    a, b = tta.logits(x), tta.logits(x.flip(-1))
    assert np.allclose(a, b[..., ::-1], atol=1e-4)  # mirroring the input mirrors the averaged output
    assert not np.allclose(plain.logits(x), plain.logits(x.flip(-1))[..., ::-1], atol=1e-4)  # the net alone is not
    assert np.allclose(a, 0.5 * (plain.logits(x) + plain.logits(x.flip(-1))[..., ::-1]), atol=1e-5)
    pair = HeadSegmenter.load([trained / "model.pt", trained / "model.pt"], backend="torch")
    assert np.allclose(pair.logits(x), plain.logits(x), atol=1e-5)
    assert pair.axis_offset_px == pytest.approx(plain.axis_offset_px)


@pytest.mark.slow
def test_quality_signals_of_a_tta_segmenter_measure_the_network_but_report_the_tta_measurement(small_fit):
    from fetalscan.biometry.quality import image_quality_signals, tta_logits
    from fetalscan.data.records import read_image

    model, cfg, _, val, fit = small_fit
    plain = HeadSegmenter(model, cfg.segmenter(), fit.calibration, backend="torch")
    tta = HeadSegmenter(model, cfg.segmenter(), fit.calibration, backend="torch", tta=True)
    found = 0
    for item in val.items[:4]:
        img = read_image(item.image)
        for a_map, b_map in zip(tta_logits(tta, img), tta_logits(plain, img)):
            assert np.allclose(a_map, b_map, atol=1e-5)
        sig_t, m_t = image_quality_signals(tta, img, item.pixel_size_mm)
        sig_p, m_p = image_quality_signals(plain, img, item.pixel_size_mm)
        assert sig_t["tta_dice_disagreement"] == pytest.approx(sig_p["tta_dice_disagreement"], nan_ok=True)
        for seg, m in ((tta, m_t), (plain, m_p)):
            direct = seg.measure(img, item.pixel_size_mm)
            assert m.found == direct.found and (not m.found or m.hc == pytest.approx(direct.hc, rel=1e-4))
        found += m_t.found
    assert found >= 2  # the check ran on measured heads, not only on "no head found"


@pytest.mark.slow
def test_fetalscan_quality_on_real_hc18_images_with_a_trained_segmenter(small_fit, tmp_path):
    """Real HC18 images through ``fetalscan quality`` with a segmenter that finds heads (the small fit)."""
    from fetalscan.biometry.quality_run import QualityConfig, quality_to_folder
    from fetalscan.models.segmenters import save_segmenter

    model, cfg, _, val, fit = small_fit
    ckpt = save_segmenter(tmp_path / "seg.pt", model, cfg.segmenter(), calibration=fit.calibration)
    man = tmp_path / "m.csv"
    with open(man, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["image", "exam", "pixel_size_mm", "hc_mm"])
        w.writeheader()
        for it in val.items[:4]:
            w.writerow({"image": str(it.image), "exam": it.exam, "pixel_size_mm": it.pixel_size_mm, "hc_mm": it.hc_mm})
    res = quality_to_folder(man, tmp_path / "q", biometry_model=ckpt, cfg=QualityConfig(), device="cpu")
    df = res.table
    assert len(df) == 4 and df["quality"].between(0, 1).all() and df["head_found"].sum() >= 2
    found = df[df["head_found"]]
    assert found["gcnr"].between(0, 1).all() and (found["fit_iou"] > 0.5).all()
    assert (df.loc[~df["head_found"], "quality"] == 0).all()  # no head: quality 0 by rule
    assert (df["reacquire"] == (df["quality"] < res.threshold)).all()
    assert np.isfinite(found["hc_diff_mm"].astype(float)).all()
