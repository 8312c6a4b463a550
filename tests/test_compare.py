"""Paired comparison of two runs: DeLong (fast algorithm) and McNemar."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import binomtest
from sklearn.metrics import roc_auc_score

from fetalscan.cli import main
from fetalscan.errors import DataError
from fetalscan.evaluation.compare import (
    compare_runs,
    delong_covariance,
    delong_test,
    mcnemar_test,
)
from fetalscan.inference.tables import aggregate_groups

CLASSES = ["cyst", "normal", "ventriculomegaly"]


def naive_delong(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong et al. (1988) by the definition: O(m n) structural components."""
    x, y = scores[:, positive], scores[:, ~positive]
    psi = (x[:, :, None] > y[:, None, :]) + 0.5 * (x[:, :, None] == y[:, None, :])
    v10, v01 = psi.mean(2), psi.mean(1)
    m, n = x.shape[1], y.shape[1]
    return psi.mean((1, 2)), np.cov(v10) / m + np.cov(v01) / n


def test_fast_delong_equals_the_definition_and_scikit_learn():
    rng = np.random.default_rng(0)
    positive = rng.random(60) < 0.4
    scores = np.vstack([positive + rng.normal(0, 1, 60), np.round(positive * 0.5 + rng.normal(0, 1, 60), 1)])
    aucs, cov = delong_covariance(scores, positive)
    ref_aucs, ref_cov = naive_delong(scores, positive)
    assert np.allclose(aucs, ref_aucs) and np.allclose(cov, ref_cov)
    assert aucs[0] == pytest.approx(roc_auc_score(positive, scores[0]))


def test_delong_test_finds_a_better_model_and_not_an_equal_one():
    rng = np.random.default_rng(1)
    y = rng.random(300) < 0.5
    good = y * 1.5 + rng.normal(0, 1, 300)
    weak = y * 0.3 + rng.normal(0, 1, 300)
    r = delong_test(y, good, weak)
    assert r["difference"] > 0.15 and r["p_value"] < 0.001 and r["ci"][0] > 0
    twin = y * 1.5 + rng.normal(0, 1, 300)
    assert delong_test(y, good, twin)["p_value"] > 0.05
    same = delong_test(y, good, good)
    assert same["difference"] == 0 and same["p_value"] == 1.0


def test_mcnemar_counts_discordant_pairs_and_uses_the_exact_binomial():
    a = np.array([1, 1, 1, 1, 1, 1, 0, 0, 1, 0], bool)
    b = np.array([1, 0, 0, 0, 0, 1, 1, 0, 1, 0], bool)
    r = mcnemar_test(a, b)
    assert (r["b"], r["c"]) == (4, 1)
    assert r["p_value"] == pytest.approx(binomtest(4, 5, 0.5).pvalue)
    assert r["difference"] == pytest.approx(0.3)
    assert r["ci_wald"][0] < 0.3 < r["ci_wald"][1]


def write_run(path: Path, seed: int, signal: float, labels_seed: int = 0, classes=CLASSES, drop: int = 0) -> Path:
    """predictions.csv + patients.csv for the same 36 patients (labels fixed by labels_seed)."""
    lab_rng, rng = np.random.default_rng(labels_seed), np.random.default_rng(seed)
    rows = []
    for g in range(36 - drop):
        k = int(lab_rng.integers(0, len(classes)))
        for i in range(2):
            z = rng.normal(0, 1, len(classes))
            z[k] += signal
            p = np.exp(z) / np.exp(z).sum()
            rows.append({"path": f"/x/{g}_{i}.png", "frame": pd.NA, "group": f"{classes[k]}_{g}",
                         "label": classes[k], "fold": g % 3, "pred": classes[int(p.argmax())],
                         **{f"p_{c}": p[j] for j, c in enumerate(classes)}, "label_original": classes[k]})
    df = pd.DataFrame(rows)
    path.mkdir(parents=True, exist_ok=True)
    df.to_csv(path / "predictions.csv", index=False)
    aggregate_groups(df, classes).to_csv(path / "patients.csv", index=False)
    (path / "metrics.json").write_text(json.dumps({"cv": {"aggregate": "mean", "normal_class": "normal"},
                                                   "provenance": {"command": f"run {seed}"}}))
    return path


def test_compare_runs_reports_paired_differences(tmp_path):
    a = write_run(tmp_path / "a", seed=1, signal=3.0)
    b = write_run(tmp_path / "b", seed=2, signal=0.2)
    r = compare_runs(a, b, n_boot=300)
    assert r["level"] == "patient" and r["n"] == 36
    assert r["accuracy"]["difference"] > 0 and r["accuracy"]["ci_bootstrap"][0] <= r["accuracy"]["difference"]
    assert r["auroc"]["macro"]["difference"] > 0
    assert r["auroc"]["screening"]["normal_class"] == "normal"
    assert set(r["auroc"]["per_class"]) == set(CLASSES)
    img = compare_runs(a, b, level="image", n_boot=100)
    assert img["n"] == 72 and any("independent" in n for n in img["notes"])


def test_compare_refuses_runs_on_different_cases_labels_or_classes(tmp_path):
    a = write_run(tmp_path / "a", seed=1, signal=2.0)
    with pytest.raises(DataError, match="not on the same cases"):
        compare_runs(a, write_run(tmp_path / "fewer", seed=2, signal=2.0, drop=3))
    with pytest.raises(DataError, match="different classes"):
        compare_runs(a, write_run(tmp_path / "cls", seed=2, signal=2.0, classes=["cyst", "normal", "other"]))
    relabelled = write_run(tmp_path / "lab", seed=2, signal=2.0)
    df = pd.read_csv(relabelled / "patients.csv")
    df.loc[0, "label"] = "normal" if df.loc[0, "label"] != "normal" else "cyst"
    df.to_csv(relabelled / "patients.csv", index=False)
    with pytest.raises(DataError, match="disagree on the true label"):
        compare_runs(a, relabelled)
    with pytest.raises(DataError, match="run folder not found"):
        compare_runs(a, tmp_path / "nothing")


def test_compare_cli_writes_json_and_bad_input_is_one_error_line(tmp_path, capsys):
    a = write_run(tmp_path / "a", seed=1, signal=2.0)
    b = write_run(tmp_path / "b", seed=3, signal=1.0)
    assert main(["compare", str(a), str(b), "--n-boot", "50", "--out", str(tmp_path / "cmp")]) == 0
    saved = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert saved["n"] == 36 and "DeLong" in saved["methods"]
    capsys.readouterr()
    c = write_run(tmp_path / "c", seed=1, signal=2.0, drop=1)
    assert main(["compare", str(a), str(c)]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "not on the same cases" in err
