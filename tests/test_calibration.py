"""Calibration measures and temperature scaling (Guo et al. 2017)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import brier_score_loss, log_loss

from fetalscan.errors import DataError
from fetalscan.evaluation.calibration import (
    apply_temperature,
    brier_score,
    calibration_errors_weighted,
    calibration_metrics,
    expected_calibration_error,
    fit_temperature,
    maximum_calibration_error,
    negative_log_likelihood,
    reliability_bins,
    temperature_block,
)
from fetalscan.evaluation.calibration_analysis import final_model_calibration


def calibrated_sample(n: int, k: int = 4, seed: int = 0, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from softmax(z): probabilities softmax(z) are calibrated; softmax(scale * z) are not."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, (n, k))
    p_true = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    y = np.array([rng.choice(k, p=p) for p in p_true])
    zs = z * scale
    return np.exp(zs) / np.exp(zs).sum(1, keepdims=True), y


def test_ece_and_mce_by_hand():
    # two bins used with 15 bins: confidences 0.95 (bin 14) and 0.55 (bin 8)
    p = np.array([[0.95, 0.05], [0.95, 0.05], [0.55, 0.45], [0.45, 0.55]])
    y = np.array([0, 1, 0, 0])
    # bin 14: conf .95, acc .5 (gap .45, 2 images); bin 8: conf .55, acc .5 (gap .05, 2 images)
    assert expected_calibration_error(p, y) == pytest.approx(0.5 * 0.45 + 0.5 * 0.05)
    assert maximum_calibration_error(p, y) == pytest.approx(0.45)
    bins = reliability_bins(p, y)
    assert bins["count"][14] == 2 and bins["count"][8] == 2 and sum(bins["count"]) == 4
    assert bins["accuracy"][14] == pytest.approx(0.5)


def test_brier_and_nll_agree_with_scikit_learn():
    p, y = calibrated_sample(200, k=2, seed=1)
    # multi-class Brier = 2 x the binary Brier score of the positive class
    assert brier_score(p, y) == pytest.approx(2 * brier_score_loss(y, p[:, 1]))
    p4, y4 = calibrated_sample(200, k=4, seed=2)
    assert negative_log_likelihood(p4, y4) == pytest.approx(log_loss(y4, p4, labels=range(4)))


def test_weighted_errors_equal_repeating_the_rows():
    p, y = calibrated_sample(60, seed=3)
    w = np.random.default_rng(0).integers(0, 3, 60)
    ece, mce = calibration_errors_weighted(p.max(1), p.argmax(1) == y, w[None].astype(float))
    rep = np.repeat(np.arange(60), w)
    assert ece[0] == pytest.approx(expected_calibration_error(p[rep], y[rep]))
    assert mce[0] == pytest.approx(maximum_calibration_error(p[rep], y[rep]))


def test_temperature_scaling_lowers_ece_on_an_overconfident_model():
    """Logits multiplied by 3 make an over-confident model; T fitted on a validation half
    recovers about 3 and lowers the ECE on the other half; accuracy is unchanged."""
    p, y = calibrated_sample(4000, seed=4, scale=3.0)
    val, test = slice(0, 2000), slice(2000, None)
    t = fit_temperature(p[val], y[val])
    assert 2.5 < t < 3.5
    scaled = apply_temperature(p[test], t)
    before, after = expected_calibration_error(p[test], y[test]), expected_calibration_error(scaled, y[test])
    assert before > 0.1 and after < before / 3
    assert np.array_equal(scaled.argmax(1), p[test].argmax(1))
    assert negative_log_likelihood(scaled, y[test]) < negative_log_likelihood(p[test], y[test])


def test_temperature_of_a_calibrated_model_is_near_one_and_underconfidence_gives_t_below_one():
    p, y = calibrated_sample(4000, seed=5)
    assert fit_temperature(p, y) == pytest.approx(1.0, abs=0.1)
    p2, y2 = calibrated_sample(4000, seed=6, scale=0.4)
    assert fit_temperature(p2, y2) < 0.6


def test_apply_temperature_one_is_identity_and_rows_sum_to_one():
    p, _ = calibrated_sample(50, seed=7)
    assert np.allclose(apply_temperature(p, 1.0), p)
    assert np.allclose(apply_temperature(p, 2.7).sum(1), 1.0)
    with pytest.raises(DataError, match="positive"):
        apply_temperature(p, 0.0)


def test_bad_calibration_input_is_rejected():
    with pytest.raises(DataError, match="empty"):
        fit_temperature(np.zeros((0, 3)), np.zeros(0, dtype=int))
    with pytest.raises(DataError, match="out of range"):
        expected_calibration_error(np.full((2, 2), 0.5), np.array([0, 2]))
    with pytest.raises(DataError, match="integers"):
        brier_score(np.full((2, 2), 0.5), np.array(["a", "b"]))
    with pytest.raises(DataError, match="2 rows"):
        calibration_metrics(np.full((2, 2), 0.5), np.array([0, 1, 1]))


def test_temperature_block_and_final_model_calibration():
    p, y = calibrated_sample(600, k=3, seed=8, scale=2.5)
    block = temperature_block(p, y)
    assert block["fitted_on"] == "inner validation" and block["ece_after"] < block["ece_before"]
    classes = ["cyst", "normal", "other"]
    order = np.argsort(y, kind="stable")  # groups of two images of the same class
    p, y = p[order], y[order]
    df = pd.DataFrame({"group": [f"{classes[c]}_{i // 2}" for i, c in enumerate(y)], "label": [classes[i] for i in y],
                       "pred": [classes[i] for i in p.argmax(1)]})
    for j, c in enumerate(classes):
        df[f"p_{c}"] = p[:, j]
    cal = final_model_calibration(df, classes, target_sensitivity=0.9)
    assert cal["temperature"] == pytest.approx(block["temperature"])
    sc = cal["screening"]
    assert sc["normal_class"] == "normal" and 0 < sc["image"] < 1 and 0 < sc["patient"] < 1
    # the stored image threshold reaches the target on the temperature-scaled validation images
    q = apply_temperature(p, cal["temperature"])
    abnormal = y != 1
    assert ((1 - q[abnormal, 1]) >= sc["image"]).mean() >= 0.9
    assert final_model_calibration(df, classes, normal_class="healthy")["screening"] is None
