"""The report never contradicts itself (issue #17, item 1).

- an external set of one class: no AUROC of any kind (the ROC section already says no curve exists);
- every ECE is shown with an interval that contains it, and a note when the plain bootstrap
  interval does not;
- the key findings give the calibration change at image *and* patient level;
- a one-class subgroup (an original label) gets the AUROC that is defined: its cases against
  every case of the other classes, marked and explained;
- the explain gallery shows each image once.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fetalscan.evaluation.bootstrap import metrics_with_ci
from fetalscan.evaluation.calibration_analysis import calibration_analysis
from fetalscan.evaluation.config import EvaluationConfig
from fetalscan.evaluation.metrics import classification_metrics
from fetalscan.evaluation.subgroups import subgroup_analysis
from fetalscan.explain.gallery import select_gallery
from fetalscan.inference.tables import aggregate_groups
from fetalscan.report.runs import evaluate_run

CLASSES = ["cyst", "normal", "ventriculomegaly"]


def one_class_frame(seed: int = 5, n_patients: int = 24) -> pd.DataFrame:
    """Image predictions for patients who are all ``normal``: top-class confidence 0.3-0.7 and correct
    about that often (calibrated). Seed 5 reproduces the issue: a small patient-level ECE (0.063) whose
    plain bootstrap interval lies entirely above it."""
    rng = np.random.default_rng(seed)
    rows = []
    for g in range(n_patients):
        c = rng.uniform(0.3, 0.7)
        top = 1 if rng.random() < c else int(rng.choice([0, 2]))
        p = np.full(3, (1 - c) / 2)
        p[top] = c
        rows.append({"path": f"/ext/{g}.png", "frame": pd.NA, "group": f"p{g}", "label": "normal", "fold": pd.NA,
                     "pred": CLASSES[top], **{f"p_{k}": p[j] for j, k in enumerate(CLASSES)},
                     "label_original": "normal"})
    return pd.DataFrame(rows)


def external_run(tmp_path: Path, frame: pd.DataFrame) -> Path:
    """A `fetalscan evaluate` run folder (no folds, an external block) holding ``frame``."""
    run = tmp_path / "ext"
    run.mkdir()
    frame.to_csv(run / "predictions.csv", index=False)
    aggregate_groups(frame, CLASSES).to_csv(run / "patients.csv", index=False)
    (run / "metrics.json").write_text(json.dumps({
        "kind": "external", "task": {"classes": CLASSES, "class_map": {}, "notes": []},
        "external": {"note": "external validation", "model": "model.pt", "model_sha256": "ab" * 32,
                     "model_training_data": {"n_images": 166}, "model_provenance": {"data_hash": "cd" * 32},
                     "temperature": 1.0, "unknown_labels": [], "aggregate": "mean", "normal_class": "normal",
                     "screening_thresholds": {"image": 0.6, "patient": 0.6, "target_sensitivity": 0.95}},
        "provenance": {"command": "fetalscan evaluate", "seed": 0, "created": "t"}}))
    return run


def _cfg(**kw) -> EvaluationConfig:
    return EvaluationConfig(n_boot=200, n_perm=50, shortcut=False, **kw)


# --------------------------------------------------------------------------- one class: no AUROC at all


def test_micro_auroc_is_undefined_when_every_case_has_one_class():
    df = one_class_frame()
    point = classification_metrics(df["label"].tolist(), df[[f"p_{c}" for c in CLASSES]].to_numpy(), CLASSES)
    assert np.isnan(point["macro_auroc"]) and np.isnan(point["micro_auroc"])
    m = metrics_with_ci(df, CLASSES, n_boot=100, seed=0)
    assert np.isnan(m["micro_auroc"]) and all(np.isnan(m["ci"]["micro_auroc"]["bootstrap"]))
    # with two classes present it is defined, as before
    two = df.copy()
    two.loc[:5, "label"] = "cyst"
    assert np.isfinite(metrics_with_ci(two, CLASSES, n_boot=50, seed=0)["micro_auroc"])


def test_single_class_external_report_shows_no_auroc_and_says_why(tmp_path):
    run = external_run(tmp_path, one_class_frame())
    evaluate_run(run, _cfg())
    html = (run / "report.html").read_text()
    overall = html[html.index('<section id="overall">'):html.index('<section id="per-class">')]
    micro = re.search(r"<tr><td>micro AUROC</td><td>([^<]*)</td><td class=\"ci\">([^<]*)</td>", overall)
    assert micro and micro.group(1) == "–" and micro.group(2) == "–", micro and micro.groups()
    assert "No AUROC or average precision" in overall
    assert "No ROC or precision-recall curve" in html
    findings = re.sub(r"\s+", " ", html[html.index('<section id="findings">'):html.index('<section id="dataset">')])
    assert "AUROC –" not in findings and "no AUROC (one class only)" in findings
    assert "every patient here is normal" in findings


# --------------------------------------------------------------------------- ECE and its interval


def _shown_ece(html: str, level: str) -> tuple[float, float, float]:
    """(estimate, lower, upper) of the ECE the calibration table shows for ``level``."""
    cal = html[html.index('<section id="calibration">'):html.index('<section id="subgroups">')]
    m = re.search(rf"<tr><td>{level}</td><td>[^<]*</td><td>([0-9.]+) <span class=\"ci\">\(([0-9.]+)–([0-9.]+)", cal)
    assert m, cal[:2000]
    return float(m.group(1)), float(m.group(2)), float(m.group(3))


def test_every_shown_ece_interval_contains_its_estimate_and_a_note_says_why(tmp_path):
    run = external_run(tmp_path, one_class_frame())
    m = evaluate_run(run, _cfg())
    block = m["calibration"]["before"]["patient"]
    plain = block["ci"]["ece"]["bootstrap"]
    assert not plain[0] <= block["ece"] <= plain[1], "fixture no longer reproduces the issue"
    html = (run / "report.html").read_text()
    for level in ("image", "patient"):
        est, lo, hi = _shown_ece(html, level)
        assert lo <= est <= hi, (level, est, lo, hi)
    assert any("ECE (patient level)" in n and "lies above the estimate" in n for n in m["calibration"]["notes"])
    assert "bias-corrected" in html


def test_key_findings_give_the_patient_level_calibration_change_too():
    rng = np.random.default_rng(3)
    rows, inner = [], []
    for f in range(3):
        for g in range(10):
            label = CLASSES[g % 3]
            for i in range(3):
                z = rng.normal(0, 1, 3)
                z[g % 3] += 1.5
                p = np.exp(2.5 * z) / np.exp(2.5 * z).sum()  # overconfident: temperature scaling matters
                row = {"path": f"/{f}/{g}/{i}.png", "group": f"f{f}g{g}", "label": label, "fold": f,
                       "pred": CLASSES[int(p.argmax())], **{f"p_{k}": p[j] for j, k in enumerate(CLASSES)}}
                (rows if i < 2 else inner).append(row)
    img, inn = pd.DataFrame(rows), pd.DataFrame(inner)
    block, _, _ = calibration_analysis(img, inn, CLASSES, _cfg())
    change = block["ece_change"]
    assert set(change) == {"image", "patient"} and set(change.values()) <= {"lower", "higher", "unchanged"}
    if {change["image"], change["patient"]} == {"lower", "higher"}:
        assert any("calibrating images does not calibrate patients" in n for n in block["notes"])


def test_key_findings_give_the_ece_change_at_image_and_patient_level(tmp_path):
    """The issue's run cited only the image-level gain (0.162 -> 0.125), not that patient-level ECE rose."""
    from test_report import make_cv_run

    run = make_cv_run(tmp_path)
    m = evaluate_run(run, _cfg())
    html = (run / "report.html").read_text()
    findings = re.sub(r"\s+", " ", html[html.index('<section id="findings">'):html.index('<section id="dataset">')])
    cb, ca = m["calibration"]["before"], m["calibration"]["after"]
    for level in ("image", "patient"):
        assert f"{level}-level ECE {cb[level]['ece']:.3f} → {ca[level]['ece']:.3f}" in findings, level
    word = {"lower": "better", "higher": "worse"}
    assert f"({word[m['calibration']['ece_change']['patient']]})" in findings


# --------------------------------------------------------------------------- subgroups of one class


def test_original_label_subgroups_get_the_auroc_that_is_defined(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    originals = {"cyst": ["arachnoid_cyst", "porencephaly"], "normal": ["normal"],
                 "ventriculomegaly": ["mild_vm", "severe_vm"]}
    for k, c in enumerate(CLASSES):
        for g in range(8):
            z = rng.normal(0, 1, 3)
            z[k] += 1.0
            p = np.exp(z) / np.exp(z).sum()
            rows.append({"path": f"/{c}/{g}.png", "group": f"{c}_{g}", "label": c, "fold": g % 2,
                         "pred": CLASSES[int(p.argmax())], **{f"p_{x}": p[j] for j, x in enumerate(CLASSES)},
                         "label_original": originals[c][g % len(originals[c])]})
    img = pd.DataFrame(rows)
    pat = aggregate_groups(img, CLASSES)
    block = subgroup_analysis(img, pat, CLASSES, "label_original", _cfg())
    assert len(block["rows"]) == 5
    for r in block["rows"]:
        assert np.isnan(r["macro_auroc"])  # one class inside: undefined, and not pretended otherwise
        vr, avr = r["auroc_vs_rest"], r["abnormal_auroc_vs_rest"]
        assert np.isfinite(vr["auroc"]) and np.isfinite(vr["ci"]).all(), r["subgroup"]
        assert np.isfinite(avr["auroc"]), r["subgroup"]
    assert any("compare the subgroup's cases with every case of the other classes" in n for n in block["notes"])
    # the AUROC vs the rest is that of p(class): cases of the subgroup against all other-class cases
    from sklearn.metrics import roc_auc_score

    cysts = next(r for r in block["rows"] if r["subgroup"] == "porencephaly")
    part = pat[pat["group"].isin(img.loc[img["label_original"] == "porencephaly", "group"])]
    rest = pat[pat["label"] != "cyst"]
    expected = roc_auc_score([1] * len(part) + [0] * len(rest), list(part["p_cyst"]) + list(rest["p_cyst"]))
    assert cysts["auroc_vs_rest"]["auroc"] == pytest.approx(expected)


# --------------------------------------------------------------------------- gallery: each image once


def test_gallery_shows_an_image_once_even_when_it_tops_two_lists():
    # image 0 is normal's most confident false positive AND other's most confident false negative
    preds = pd.DataFrame([
        {"label": "other", "pred": "normal", "p_normal": 0.99, "p_other": 0.01},
        {"label": "other", "pred": "normal", "p_normal": 0.80, "p_other": 0.20},
        {"label": "other", "pred": "other", "p_normal": 0.10, "p_other": 0.90},
        {"label": "normal", "pred": "normal", "p_normal": 0.95, "p_other": 0.05},
        {"label": "normal", "pred": "other", "p_normal": 0.30, "p_other": 0.70},
    ])
    picks = select_gallery(preds, ["normal", "other"])
    rows = [p["row"] for p in picks]
    assert len(rows) == len(set(rows)), picks
    first = next(p for p in picks if p["row"] == 0)
    assert (first["class"], first["kind"]) == ("normal", "FP")
    assert first["also"] == [{"class": "other", "kind": "FN", "prob": pytest.approx(0.01)}]
    fn_other = next(p for p in picks if (p["class"], p["kind"]) == ("other", "FN"))
    assert fn_other["row"] == 1  # the next most confident miss takes the place


@pytest.mark.slow
def test_report_gallery_of_an_older_run_shows_a_duplicated_image_once(tmp_path):
    from test_report import make_cv_run, tiny_png

    run = make_cv_run(tmp_path, with_images=False)
    ex = run / "explain"
    ex.mkdir()
    tiny_png(ex / "a.png", 1)
    tiny_png(ex / "b.png", 2)
    item = {"path": "/img/colphocephaly-23g.jpg", "frame": None, "prob": 0.99, "label": "other",
            "pred": "normal", "method": "gradcam"}
    (ex / "gallery.json").write_text(json.dumps([
        {**item, "class": "normal", "kind": "FP", "overlay": "explain/a.png"},
        {**item, "class": "other", "kind": "FN", "overlay": "explain/b.png", "prob": 0.01}]))
    m = evaluate_run(run, _cfg())
    html = (run / "report.html").read_text()
    assert len(m["explainability"]["gallery"]) == 1
    gallery = html[html.index("<h3>Gallery</h3>"):]
    assert gallery.count("<figure>") == 1 and "also the FN for other" in gallery
