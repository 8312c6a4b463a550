"""Quality signals behave as defined; the score is monotone as fitted and fitted out of fold;
``fetalscan quality`` writes quality.csv and refuses bad input."""

from __future__ import annotations

import csv
import math

import numpy as np
import pandas as pd
import pytest

from fetalscan.quality import signals as S
from fetalscan.quality.score import (
    QualityModel,
    choose_threshold,
    error_coverage,
    evaluate_out_of_fold,
    failure_labels,
    fit_quality_model,
    load_quality_model,
)


def _textured(seed: int = 0, shape=(120, 160)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.integers(40, 220, shape).astype(np.uint8)
    img[40:80, 60:100] = 250
    return img


def _ellipse_mask(shape=(200, 300), cx=150, cy=100, a=80, b=55, angle=20):
    import cv2

    m = np.zeros(shape, np.uint8)
    cv2.ellipse(m, (cx, cy), (a, b), angle, 0, 360, 1, thickness=-1)
    return m.astype(bool)


def test_blur_lowers_sharpness_and_gradient_energy():
    import cv2

    img = _textured()
    blurred = cv2.GaussianBlur(img, (0, 0), 2.0)
    assert S.sharpness(blurred) < 0.5 * S.sharpness(img)
    assert S.gradient_energy(blurred) < 0.5 * S.gradient_energy(img)


def test_contrast_falls_when_the_range_is_compressed():
    img = _textured()
    flat = (128 + (img.astype(float) - 128) * 0.3).astype(np.uint8)
    assert S.contrast(flat) < S.contrast(img)


def test_gcnr_and_cnr_higher_for_a_clean_head_than_for_noise():
    rng = np.random.default_rng(1)
    mask = _ellipse_mask()
    ring = S.surround_ring(mask)
    clean = np.where(mask, 200, 40).astype(np.uint8) + rng.integers(0, 10, mask.shape).astype(np.uint8)
    noise = rng.integers(0, 256, mask.shape).astype(np.uint8)
    assert S.gcnr(clean, mask, ring) > 0.95
    assert S.gcnr(noise, mask, ring) < 0.1
    assert S.cnr(clean, mask, ring) > 5 * S.cnr(noise, mask, ring)
    assert 0.0 <= S.gcnr(noise, mask, ring) <= 1.0


def test_gcnr_is_invariant_to_a_monotone_grey_level_change():
    rng = np.random.default_rng(2)
    mask = _ellipse_mask()
    ring = S.surround_ring(mask)
    img = np.clip(np.where(mask, 140, 90) + rng.normal(0, 25, mask.shape), 0, 255).astype(np.uint8)
    gamma = (255 * (img / 255.0) ** 0.5).astype(np.uint8)
    assert S.gcnr(img, mask, ring) == pytest.approx(S.gcnr(gamma, mask, ring), abs=0.03)


def test_perfect_ellipse_has_almost_no_fit_residual_and_area_ratio_one():
    import cv2

    mask = _ellipse_mask()
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    c = contours[0].reshape(-1, 2)
    (cx, cy), (w, h), ang = cv2.fitEllipse(c)
    res = S.ellipse_residual(c, cx, cy, w / 2 + 0.5, h / 2 + 0.5, ang)
    assert res < 0.01
    area_ratio = mask.sum() / (math.pi * (w / 2 + 0.5) * (h / 2 + 0.5))
    assert area_ratio == pytest.approx(1.0, abs=0.02)
    # a dented head has a clearly larger residual
    dented = mask.copy()
    dented[60:140, 200:260] = False
    contours, _ = cv2.findContours(dented.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    c2 = contours[0].reshape(-1, 2)
    (cx, cy), (w, h), ang = cv2.fitEllipse(c2)
    assert S.ellipse_residual(c2, cx, cy, w / 2, h / 2, ang) > 3 * res


def test_tta_disagreement_and_spread():
    m = _ellipse_mask()
    assert S.tta_disagreement(m, [m, m]) == 0.0
    shifted = np.roll(m, 20, axis=1)
    assert S.tta_disagreement(m, [shifted]) > 0.1
    assert S.relative_spread([100, 100, 100]) == 0.0
    assert S.relative_spread([100, None]) == 1.0
    assert S.uncertain_fraction(np.where(m, 0.99, 0.01)) == 0.0


def _synthetic_table(n=240, seed=0):
    """Signals whose failure probability rises with blur / TTA disagreement, with exam groups."""
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(n // 2), 2)
    latent = rng.normal(size=n)
    df = pd.DataFrame({
        "plane_brain_prob": rng.uniform(0.5, 1.0, n),
        "sharpness": np.exp(-latent + rng.normal(0, 0.5, n)) * 1e-3,
        "gradient_energy": np.exp(rng.normal(size=n)) * 1e-2,
        "contrast": rng.uniform(0.1, 0.3, n),
        "cnr": np.exp(rng.normal(size=n)),
        "gcnr": rng.uniform(0, 1, n),
        "ellipse_residual": np.exp(rng.normal(size=n)) * 1e-2,
        "area_ratio": 1 + rng.normal(0, 0.01, n),
        "fit_iou": rng.uniform(0.9, 1.0, n),
        "tta_dice_disagreement": np.exp(latent + rng.normal(0, 0.5, n)) * 1e-2,
        "tta_hc_spread": np.exp(rng.normal(size=n)) * 1e-2,
        "uncertain_fraction": rng.uniform(0.05, 0.2, n),
        "head_found": np.ones(n, bool),
    })
    y = (latent + rng.normal(0, 0.5, n) > 1.0).astype(int)
    return df, y, groups


def test_score_is_monotone_in_each_input_as_fitted():
    df, y, _ = _synthetic_table()
    feats = ["sharpness", "tta_dice_disagreement", "contrast"]
    model = fit_quality_model(df, y, feats)
    base = df.iloc[[0]].copy()
    for j, f in enumerate(feats):
        vals = np.linspace(df[f].min(), df[f].max(), 7)
        rows = pd.concat([base.assign(**{f: v}) for v in vals], ignore_index=True)
        q = model.predict_quality(rows)
        step = np.diff(q)
        if model.coef[j] > 0:  # more of it -> more failure -> lower quality
            assert np.all(step <= 1e-12), f
        else:
            assert np.all(step >= -1e-12), f
    # the planted signals get the expected signs
    assert model.coef[feats.index("sharpness")] < 0 < model.coef[feats.index("tta_dice_disagreement")]
    assert np.all((model.predict_quality(df) >= 0) & (model.predict_quality(df) <= 1))


def test_no_head_found_gets_quality_zero_and_json_round_trip(tmp_path):
    df, y, _ = _synthetic_table()
    model = fit_quality_model(df, y, ["sharpness", "tta_dice_disagreement"])
    df2 = df.head(3).copy()
    df2.loc[1, "head_found"] = False
    df2.loc[1, "tta_dice_disagreement"] = np.nan
    q = model.predict_quality(df2)
    assert q[1] == 0.0 and q[0] > 0
    path = tmp_path / "m.json"
    model.to_json(path)
    again = QualityModel.from_json(path)
    assert np.allclose(again.predict_quality(df2), q)


def test_threshold_is_chosen_on_training_quality_only():
    q = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.9, 0.95])
    y = np.array([1, 1, 0, 1, 0, 1, 0])
    t = choose_threshold(q, y, 0.75)  # 3 of 4 failures flagged: up to 0.4 -> between 0.4 and 0.5
    assert t == pytest.approx(0.45)
    assert (q[y == 1] < t).mean() >= 0.75


def test_out_of_fold_is_grouped_and_beats_chance_on_planted_signal():
    df, y, groups = _synthetic_table()
    res = evaluate_out_of_fold(df, y, groups, ["sharpness", "tta_dice_disagreement"], n_splits=4, n_boot=200,
                               abs_err=np.where(y == 1, 8.0, 1.0))
    assert res["auroc"] > 0.75
    lo, hi = res["auroc_ci95"]
    assert lo <= res["auroc"] <= hi
    for g in np.unique(groups):  # every exam in exactly one held-out fold
        assert len(set(res["fold"][groups == g])) == 1
    ec = res["error_coverage"]
    assert ec[0]["mean_abs_hc_diff_mm"] >= ec[-1]["mean_abs_hc_diff_mm"]


def test_failure_labels_and_error_coverage():
    y = failure_labels([1.0, 6.0, None, -7.0], [True, True, False, True])
    assert y.tolist() == [0, 1, 1, 1]
    ec = error_coverage(np.array([0.9, 0.1, 0.5, 0.8]), np.array([1.0, 10.0, 2.0, 3.0]), (0.0, 0.25))
    assert ec[0]["mean_abs_hc_diff_mm"] == pytest.approx(4.0)
    assert ec[1]["mean_abs_hc_diff_mm"] == pytest.approx(2.0)


def test_shipped_models_load():
    for kind in ("full", "image"):
        m = load_quality_model(None, kind)
        assert 0.0 < m.threshold < 1.0 and len(m.coef) == len(m.features)


# ---------------------------------------------------------------- CLI


@pytest.mark.slow
def test_cli_quality_writes_csv_with_columns(tmp_path):
    from PIL import Image

    from fetalscan.cli import main

    img = _textured(seed=3, shape=(96, 128))
    Image.fromarray(img).save(tmp_path / "a.png")
    Image.fromarray(np.ascontiguousarray(img[:, ::-1])).save(tmp_path / "b.png")
    rc = main(["quality", "--data", str(tmp_path), "--out", str(tmp_path / "q"), "--no-progress"])
    assert rc == 0
    rows = list(csv.DictReader(open(tmp_path / "q" / "quality.csv")))
    assert len(rows) == 2
    for col in ("path", "quality", "reacquire", "sharpness", "gradient_energy", "contrast", "plane_brain_prob"):
        assert col in rows[0]
    assert all(0.0 <= float(r["quality"]) <= 1.0 for r in rows)
    assert {r["reacquire"] for r in rows} <= {"True", "False", "true", "false"}


def test_cli_quality_bad_input_exits_2_naming_the_file(tmp_path, capsys):
    from fetalscan.cli import main

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png at all")
    rc = main(["quality", "--data", str(bad), "--out", str(tmp_path / "q"), "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "broken.png" in err


def test_planted_leakage_between_folds_is_refused():
    from fetalscan.errors import FetalscanError

    df, y, groups = _synthetic_table()
    folds = np.arange(len(y)) % 4  # images of one exam (consecutive rows) land in different folds
    with pytest.raises(FetalscanError, match="leakage"):
        evaluate_out_of_fold(df, y, groups, ["sharpness"], folds=folds, n_boot=10)


def test_real_hc18_images_image_only_quality(tmp_path, shared_data):
    """Two real HC18 images through `fetalscan quality` without a segmenter (image-only model)."""
    import shutil

    from fetalscan.cli import main

    for src in sorted((shared_data / "hc18" / "images").glob("*.png"))[:2]:
        shutil.copy(src, tmp_path / src.name)
    rc = main(["quality", "--data", str(tmp_path), "--out", str(tmp_path / "q"), "--no-progress"])
    assert rc == 0
    df = pd.read_csv(tmp_path / "q" / "quality.csv")
    assert len(df) == 2 and df["quality"].between(0, 1).all()
    assert df["plane_brain_prob"].between(0, 1).all() and (df["sharpness"] > 0).all()
