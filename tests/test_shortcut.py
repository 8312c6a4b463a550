"""The shortcut probe: image statistics without anatomy, under grouped folds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fetalscan.evaluation.bootstrap import metrics_with_ci
from fetalscan.evaluation.config import EvaluationConfig
from fetalscan.evaluation.shortcut import (
    feature_names,
    image_features,
    run_shortcut_check,
    verdict,
)
from fetalscan.inference.tables import aggregate_groups

CLASSES = ["abnormal", "normal"]


def texture(rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """A speckled fan-free texture; the same distribution for both classes."""
    coarse = rng.integers(20, 120, (4, 4)).astype(np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), dtype=np.int16)
    img = np.clip(base + rng.integers(-25, 25, (size, size)), 0, 255).astype(np.uint8)
    return np.repeat(img[..., None], 3, axis=2)


def make_run(tmp: Path, marker: bool, n_groups: int = 20, per_group: int = 2, seed: int = 0) -> pd.DataFrame:
    """Images of two classes; with ``marker``, every abnormal image carries a white corner square
    (a planted source cue). The 'model' probabilities are informative but carry no image."""
    rng = np.random.default_rng(seed)
    rows = []
    for k, c in enumerate(CLASSES):
        for g in range(n_groups):
            for i in range(per_group):
                img = texture(rng)
                if marker and c == "abnormal":
                    img[1:7, 1:7] = 255
                path = tmp / c / f"{c}_{g}_{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(img).save(path)
                p_abn = float(np.clip(rng.normal(0.7 if k == 0 else 0.3, 0.15), 0.01, 0.99))
                rows.append({"path": str(path), "frame": pd.NA, "group": f"{c}_{g}", "label": c, "fold": g % 4,
                             "pred": "abnormal" if p_abn >= 0.5 else "normal", "p_abnormal": p_abn,
                             "p_normal": 1 - p_abn, "label_original": c})
    return pd.DataFrame(rows)


def probe(df: pd.DataFrame, **cfg_kw):
    cfg = EvaluationConfig(n_boot=200, **cfg_kw)
    mi = metrics_with_ci(df, CLASSES, n_boot=200)
    mp = metrics_with_ci(aggregate_groups(df, CLASSES), CLASSES, n_boot=200)
    return run_shortcut_check(df, CLASSES, cfg, model_image=mi, model_patient=mp)


def test_probe_detects_a_planted_corner_marker(tmp_path):
    df = make_run(tmp_path, marker=True)
    block, probe_df = probe(df)
    assert block["available"] and block["warning"]
    by = {c["metric"]: c for c in block["comparisons"]}
    assert by["macro AUROC, patient level"]["probe"] >= 0.95
    assert by["normal vs abnormal AUROC, patient level"]["warning"]
    assert "image source" in block["message"]
    assert any(f["feature"].startswith(("corner_top_left", "overlay_r0c0", "strip_top", "strip_left",
                                        "frac_saturated", "hist_31")) for f in block["top_features"])
    assert list(probe_df.columns[:6]) == ["path", "frame", "group", "label", "fold", "pred"]
    assert block["folds"].startswith("the model's cross-validation folds")
    assert probe_df["fold"].tolist() == df["fold"].tolist()  # the run's grouped folds, out-of-fold


def test_probe_does_not_fire_without_the_marker(tmp_path):
    block, _ = probe(make_run(tmp_path, marker=False))
    assert block["available"]
    assert not block["warning"]
    assert block["probe_patient_level"]["macro_auroc"] < 0.75


def test_missing_images_skip_the_check_with_a_reason(tmp_path):
    df = make_run(tmp_path, marker=False, n_groups=4)
    df.loc[0, "path"] = str(tmp_path / "gone.png")
    block, probe_df = probe(df)
    assert block["available"] is False and "not on disk" in block["note"] and probe_df is None


def test_image_features_describe_size_borders_and_colour_marks():
    rng = np.random.default_rng(0)
    img = texture(rng, 64)
    img = np.asarray(Image.fromarray(img).resize((80, 60)))  # width 80, height 60
    f = dict(zip(feature_names(), image_features(img, file_bytes=1200)))
    assert len(feature_names()) == len(image_features(img))
    assert f["height"] == 60 and f["width"] == 80 and f["aspect_w_over_h"] == pytest.approx(80 / 60)
    assert f["file_bits_per_pixel"] == pytest.approx(8 * 1200 / (60 * 80))
    bordered = img.copy()
    bordered[:12] = 0
    bordered[20:24, 30:50] = [255, 0, 0]  # a red calliper mark
    g = dict(zip(feature_names(), image_features(bordered)))
    assert g["black_border_top"] > 0.15 and f["black_border_top"] == 0
    assert g["frac_coloured"] > f["frac_coloured"]


@pytest.mark.parametrize("probe_auc, low, model_auc, expect", [
    (0.85, 0.7, 0.95, True),    # strong on its own
    (0.72, 0.6, 0.75, True),    # above chance and as good as the model
    (0.72, 0.45, 0.75, False),  # not clearly above chance
    (0.60, 0.52, 0.90, False),  # clearly worse than the model
])
def test_warning_rule(probe_auc, low, model_auc, expect):
    assert verdict(probe_auc, low, model_auc, 0.80, 0.05)[0] is expect
