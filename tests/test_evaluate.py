"""Evaluation metrics: agreement with scikit-learn, group-level bootstrap, screening rule,
subgroups, input validation and the run-level evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm
from sklearn.preprocessing import label_binarize

from fetalscan.errors import DataError
from fetalscan.evaluation.bootstrap import (
    add_confidence_intervals,
    group_bootstrap_weights,
    metrics_with_ci,
    weighted_auroc,
    weighted_average_precision,
)
from fetalscan.evaluation.config import EvaluationConfig
from fetalscan.evaluation.metrics import classification_metrics, wilson_interval
from fetalscan.evaluation.runs import read_predictions
from fetalscan.evaluation.screening import screening_analysis, screening_threshold
from fetalscan.evaluation.subgroups import (
    ga_bin,
    heterogeneity_test,
    subgroup_analysis,
    subgroup_columns,
)
from fetalscan.inference.tables import aggregate_groups
from fetalscan.report.runs import evaluate_run

CLASSES = ["cyst", "normal", "ventriculomegaly"]


def synthetic_predictions(seed: int = 0, n_groups: int = 12, per_group: int = 3, signal: float = 1.5,
                          classes=CLASSES, folds: int = 3) -> pd.DataFrame:
    """predictions.csv-shaped rows: informative but imperfect probabilities, groups within one fold."""
    rng = np.random.default_rng(seed)
    rows = []
    for k, c in enumerate(classes):
        for g in range(n_groups):
            fold = (g + k) % folds
            for i in range(int(rng.integers(1, per_group + 1))):
                logits = rng.normal(0, 1, len(classes))
                logits[k] += signal
                p = np.exp(logits) / np.exp(logits).sum()
                rows.append({"path": f"/nonexistent/{c}_{g}_{i}.png", "frame": pd.NA, "group": f"{c}_{g}",
                             "label": c, "fold": fold, **{f"p_{cc}": p[j] for j, cc in enumerate(classes)}})
    df = pd.DataFrame(rows)
    df.insert(5, "pred", [classes[i] for i in df[[f"p_{c}" for c in classes]].to_numpy().argmax(1)])
    df["label_original"] = df["label"]
    for col in ("ga_weeks", "center", "device", "view"):
        df[col] = pd.NA
    return df


def write_run(tmp: Path, seed: int = 0, **kw) -> Path:
    """A run folder as `fetalscan cv` writes it (images need not exist)."""
    run = tmp / f"run{seed}"
    run.mkdir(parents=True, exist_ok=True)
    preds = synthetic_predictions(seed, **kw)
    classes = kw.get("classes", CLASSES)
    inner = synthetic_predictions(seed + 100, **kw)
    inner = inner[inner["fold"] != inner["fold"].max()].copy()
    inner["fold"] = (inner["fold"] + 1) % 3  # each fold's inner split holds groups of other folds
    preds.to_csv(run / "predictions.csv", index=False)
    inner.to_csv(run / "inner_val_predictions.csv", index=False)
    aggregate_groups(preds, classes, "mean", "normal").to_csv(run / "patients.csv", index=False)
    preds[["group", "fold"]].drop_duplicates().to_csv(run / "folds.csv", index=False)
    (run / "metrics.json").write_text(json.dumps({
        "disclaimer": "x", "task": {"classes": classes, "class_map": {}, "notes": []},
        "cv": {"aggregate": "mean", "normal_class": "normal"}, "seconds": 1.0,
        "provenance": {"command": "test", "seed": 0, "data_hash": "abc", "versions": {}, "created": "now"},
        "custom_key": {"kept": True}}))
    return run


# --------------------------------------------------------------------------- metrics vs scikit-learn


def test_classification_metrics_agree_with_scikit_learn():
    df = synthetic_predictions(1, n_groups=20)
    y = df["label"].tolist()
    p = df[[f"p_{c}" for c in CLASSES]].to_numpy()
    m = classification_metrics(y, p, CLASSES)
    pred = [CLASSES[i] for i in p.argmax(1)]
    yb = label_binarize(y, classes=CLASSES)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["micro_auroc"] == pytest.approx(skm.roc_auc_score(yb, p, average="micro"))
    assert m["macro_auroc"] == pytest.approx(skm.roc_auc_score(yb, p, average="macro"))
    ppv = skm.precision_score(y, pred, labels=CLASSES, average=None)
    sens = skm.recall_score(y, pred, labels=CLASSES, average=None)
    f1 = skm.f1_score(y, pred, labels=CLASSES, average=None)
    for k, c in enumerate(CLASSES):
        row = m["per_class"][c]
        neg = [t != c for t in y]
        assert row["ppv"] == pytest.approx(ppv[k])
        assert row["sensitivity"] == pytest.approx(sens[k])
        assert row["f1"] == pytest.approx(f1[k])
        assert row["specificity"] == pytest.approx(skm.recall_score(neg, [q != c for q in pred]))
        assert row["npv"] == pytest.approx(skm.precision_score(neg, [q != c for q in pred]))
        assert row["auroc"] == pytest.approx(skm.roc_auc_score(yb[:, k], p[:, k]))
        assert row["average_precision"] == pytest.approx(skm.average_precision_score(yb[:, k], p[:, k]))
    assert np.array_equal(m["confusion_matrix"]["matrix"], skm.confusion_matrix(y, pred, labels=CLASSES))


def test_class_without_cases_has_undefined_auroc_and_is_left_out_of_the_macro_average():
    p = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.3, 0.6, 0.1]])
    m = classification_metrics(["cyst", "normal", "cyst", "normal"], p, CLASSES)
    assert np.isnan(m["per_class"]["ventriculomegaly"]["auroc"])
    assert np.isnan(m["per_class"]["ventriculomegaly"]["sensitivity"])
    assert m["auroc_classes"] == ["cyst", "normal"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weighted_kernels_match_scikit_learn_with_sample_weights(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 6, 40) / 5.0  # many ties
    positive = rng.random(40) < 0.4
    w = rng.integers(0, 4, 40).astype(float)
    assert weighted_auroc(scores, positive, w[None])[0] == pytest.approx(
        skm.roc_auc_score(positive, scores, sample_weight=w))
    assert weighted_average_precision(scores, positive, w[None])[0] == pytest.approx(
        skm.average_precision_score(positive, scores, sample_weight=w))


def test_wilson_interval_known_values():
    assert wilson_interval(9, 10) == pytest.approx([0.5958, 0.9821], abs=1e-4)
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(0, 20)[1] == pytest.approx(0.1611, abs=1e-4)
    assert all(np.isnan(wilson_interval(0, 0)))


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_resamples_groups_not_images():
    """Ten images per patient, all right or all wrong: patient-level resampling gives a much
    wider interval than (wrongly) resampling images as if they were independent."""
    rng = np.random.default_rng(0)
    n_groups, per = 30, 10
    rows = []
    for g in range(n_groups):
        label = CLASSES[g % 3]
        right = rng.random() < 0.6
        for _ in range(per):
            p = np.full(3, 0.1)
            p[CLASSES.index(label) if right else (CLASSES.index(label) + 1) % 3] = 0.8
            rows.append((label, f"g{g}", p))
    y = np.array([CLASSES.index(r[0]) for r in rows])
    proba = np.array([r[2] for r in rows])
    base = classification_metrics([r[0] for r in rows], proba, CLASSES)
    by_group = add_confidence_intervals(dict(base), y, proba, [r[1] for r in rows], n_boot=600, seed=0)
    base2 = classification_metrics([r[0] for r in rows], proba, CLASSES)
    by_image = add_confidence_intervals(base2, y, proba, list(range(len(rows))), n_boot=600, seed=0)
    w_group = np.diff(by_group["ci"]["accuracy"]["bootstrap"])[0]
    w_image = np.diff(by_image["ci"]["accuracy"]["bootstrap"])[0]
    assert w_group > 2.0 * w_image
    assert by_group["bootstrap"]["n_units"] == n_groups


def test_group_bootstrap_weights_draw_whole_groups_and_are_seeded():
    groups = ["a", "a", "b", "c", "c", "c"]
    w1 = np.concatenate(list(group_bootstrap_weights(groups, 50, seed=3, chunk=7)))
    w2 = np.concatenate(list(group_bootstrap_weights(groups, 50, seed=3)))
    assert w1.shape == (50, 6) and np.array_equal(w1, w2)
    assert np.array_equal(w1[:, 0], w1[:, 1]) and np.array_equal(w1[:, 3], w1[:, 5])
    assert np.all(w1[:, [0, 2, 3]].sum(1) == 3)  # three groups drawn per resample


def test_metrics_with_ci_contains_intervals_around_the_estimates():
    m = metrics_with_ci(synthetic_predictions(2), CLASSES, n_boot=300, seed=1)
    lo, hi = m["ci"]["macro_auroc"]["bootstrap"]
    assert lo <= m["macro_auroc"] <= hi
    for c in CLASSES:
        lo, hi = m["per_class"][c]["ci"]["sensitivity"]["wilson"]
        assert lo <= m["per_class"][c]["sensitivity"] <= hi
    assert m["bootstrap"]["unit"] == "group" and "note" in m["bootstrap"]


# --------------------------------------------------------------------------- screening


def test_screening_threshold_is_highest_meeting_the_target():
    scores = np.r_[np.linspace(1.0, 0.05, 20), [0.9, 0.08, 0.02]]
    abnormal = np.r_[np.ones(20, bool), np.zeros(3, bool)]
    th = screening_threshold(scores, abnormal, 0.95)
    assert th["threshold"] == pytest.approx(np.sort(scores[:20])[::-1][18])  # the 19th of 20
    assert th["sensitivity"] >= 0.95
    assert th["specificity"] == pytest.approx(2 / 3)
    assert screening_threshold(scores[20:], abnormal[20:])["threshold"] is None


def test_screening_operating_point_is_chosen_on_inner_validation_only():
    test = synthetic_predictions(3)
    inner = synthetic_predictions(4)
    cfg = EvaluationConfig(n_boot=50)
    out1 = screening_analysis(test, aggregate_groups(test, CLASSES), inner, CLASSES, cfg)
    # change only the TEST probabilities of the normal class: the thresholds must not move
    test2 = test.copy()
    test2["p_normal"] = test2["p_normal"] * 0.5
    out2 = screening_analysis(test2, aggregate_groups(test2, CLASSES), inner, CLASSES, cfg)
    t1 = [f["threshold"] for f in out1["image"]["folds"]]
    t2 = [f["threshold"] for f in out2["image"]["folds"]]
    assert t1 == t2 and len(t1) == 3
    # and they are the rule applied to each fold's inner rows
    for f in out1["image"]["folds"]:
        rows = inner[inner["fold"] == f["fold"]]
        expect = screening_threshold(1 - rows["p_normal"].to_numpy(), rows["label"].to_numpy() != "normal", 0.95)
        assert f["threshold"] == pytest.approx(expect["threshold"])


def test_screening_without_normal_class_is_skipped_with_a_note():
    classes = ["a", "b"]
    df = synthetic_predictions(0, classes=classes)
    out = screening_analysis(df, aggregate_groups(df, classes, "mean", "a"), None, classes, EvaluationConfig(n_boot=10))
    assert out["available"] is False and "normal" in out["note"]


# --------------------------------------------------------------------------- subgroups


def test_gestational_age_bins():
    assert [ga_bin(w) for w in (12, 14, 19.9, 20, 27.9, 28, 35, float("nan"))] == [
        "<14 wk", "14-<20 wk", "14-<20 wk", "20-<28 wk", "20-<28 wk", ">=28 wk", ">=28 wk", "missing"]


def test_subgroups_by_ga_weeks_flag_small_groups_and_detect_heterogeneity():
    df = synthetic_predictions(5, n_groups=15)
    groups = sorted(df["group"].unique())
    ga_of = {g: (16.0 if i % 5 else 30.0) for i, g in enumerate(groups)}
    df["ga_weeks"] = df["group"].map(ga_of) + np.random.default_rng(0).normal(0, 0.2, len(df))
    late = df["group"].map(ga_of) == 30.0
    # make every late-pregnancy case wrong: accuracy must differ across bins
    wrong = {"cyst": "normal", "normal": "ventriculomegaly", "ventriculomegaly": "cyst"}
    for i in np.flatnonzero(late.to_numpy()):
        p = np.full(3, 0.05)
        p[CLASSES.index(wrong[df["label"].iloc[i]])] = 0.9
        df.loc[df.index[i], [f"p_{c}" for c in CLASSES]] = p
    df["pred"] = [CLASSES[i] for i in df[[f"p_{c}" for c in CLASSES]].to_numpy().argmax(1)]
    pat = aggregate_groups(df, CLASSES)
    assert "ga_weeks" in subgroup_columns(df)
    block = subgroup_analysis(df, pat, CLASSES, "ga_weeks", EvaluationConfig(n_boot=100, n_perm=500))
    assert block["level"] == "patient"
    names = {r["subgroup"]: r for r in block["rows"]}
    assert set(names) == {"14-<20 wk", ">=28 wk"}
    assert names[">=28 wk"]["accuracy"] == 0.0 and names[">=28 wk"]["small"] is True
    assert names[">=28 wk"]["n_groups"] == 9 and names["14-<20 wk"]["n_groups"] == 36
    assert block["heterogeneity"]["p_value"] < 0.01


def test_heterogeneity_test_does_not_fire_without_a_difference():
    rng = np.random.default_rng(1)
    sub = rng.choice(["a", "b", "c"], 300)
    correct = rng.random(300) < 0.7
    assert heterogeneity_test(sub, correct, n_perm=500, seed=0)["p_value"] > 0.05


def test_subgroup_columns_auto_skips_identifiers_and_unknown_column_is_an_error():
    df = synthetic_predictions(0)
    df["scanner"] = np.where(df.index % 2, "GE", "Philips")
    df["image_id"] = [f"id{i}" for i in range(len(df))]
    cols = subgroup_columns(df)
    assert "scanner" in cols and "image_id" not in cols
    with pytest.raises(DataError, match="nosuchcolumn"):
        subgroup_columns(df, "nosuchcolumn")


# --------------------------------------------------------------------------- bad input


def test_bad_prediction_files_give_clear_errors(tmp_path):
    df = synthetic_predictions(0)
    path = tmp_path / "predictions.csv"
    df.drop(columns=["p_ventriculomegaly"]).to_csv(path, index=False)
    with pytest.raises(DataError, match=r"predictions\.csv.*ventriculomegaly.*no probability column"):
        read_predictions(path)
    df.drop(columns=["group"]).to_csv(path, index=False)
    with pytest.raises(DataError, match=r"missing column\(s\) \['group'\]"):
        read_predictions(path)
    bad = df.copy()
    bad.loc[3, "p_cyst"] = 1.7
    bad.to_csv(path, index=False)
    with pytest.raises(DataError, match=r"row 5, column p_cyst"):
        read_predictions(path)
    with pytest.raises(DataError, match="file not found"):
        read_predictions(tmp_path / "nope.csv")
    df.to_csv(path, index=False)
    with pytest.raises(DataError, match="differ"):
        read_predictions(path, classes=["cyst", "normal"])


# --------------------------------------------------------------------------- run level


def test_evaluate_run_keeps_existing_keys_and_adds_every_block(tmp_path):
    run = write_run(tmp_path, seed=7)
    m = evaluate_run(run, EvaluationConfig(n_boot=200, n_perm=200))
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["custom_key"] == {"kept": True} and saved["seconds"] == 1.0
    for key in ("image_level", "patient_level", "dataset", "screening", "calibration", "subgroups", "shortcut",
                "explainability", "limitations", "evaluation"):
        assert key in saved, key
    assert saved["patient_level"]["ci"]["macro_auroc"]["bootstrap"][0] is not None
    assert m["calibration"]["fitted"] is True and len(m["calibration"]["temperatures"]) == 3
    assert m["screening"]["patient"]["operating_point"]["n"] == saved["patient_level"]["n"]
    assert m["shortcut"]["available"] is False and "not on disk" in m["shortcut"]["note"]
    assert (run / "report.html").is_file()


def test_evaluate_run_rejects_a_folder_without_predictions(tmp_path):
    with pytest.raises(DataError, match="predictions.csv"):
        evaluate_run(tmp_path)
