"""report.html: every section present, self-contained, honest on the real data; external validation."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fetalscan.cli import main
from fetalscan.evaluation.config import EvaluationConfig
from fetalscan.inference.tables import aggregate_groups
from fetalscan.report.html import SECTIONS, fmt, fmt_ci
from fetalscan.report.runs import evaluate_run

CLASSES = ["cyst", "normal", "ventriculomegaly"]


def tiny_png(path: Path, seed: int, bright_corner: bool = False) -> Path:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 120, (48, 48, 3), dtype=np.uint8)
    if bright_corner:
        img[:6, :6] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)
    return path


def make_cv_run(tmp: Path, with_images: bool = True, seed: int = 0) -> Path:
    """A run folder in the `fetalscan cv` layout, with real (tiny) image files and a ga_weeks column."""
    rng = np.random.default_rng(seed)
    run = tmp / "run"
    rows, inner = [], []
    for k, c in enumerate(CLASSES):
        for g in range(9):
            ga = float(rng.choice([12.0, 18.0, 24.0, 32.0]))
            for i in range(2):
                z = rng.normal(0, 1, 3)
                z[k] += 2.0
                p = np.exp(z) / np.exp(z).sum()
                path = tmp / "img" / f"{c}_{g}_{i}.png"
                if with_images:
                    tiny_png(path, seed * 1000 + k * 100 + g * 2 + i, bright_corner=(c == "normal"))
                row = {"path": str(path), "frame": pd.NA, "group": f"{c}_{g}", "label": c, "fold": g % 3,
                       "pred": CLASSES[int(p.argmax())], **{f"p_{cc}": p[j] for j, cc in enumerate(CLASSES)},
                       "label_original": c, "ga_weeks": ga, "center": "A" if g % 2 else "B", "device": pd.NA,
                       "view": pd.NA}
                rows.append(row)
                inner.append({**row, "fold": (g + 1) % 3})
    run.mkdir(parents=True)
    df = pd.DataFrame(rows)
    df.to_csv(run / "predictions.csv", index=False)
    pd.DataFrame(inner).to_csv(run / "inner_val_predictions.csv", index=False)
    aggregate_groups(df, CLASSES).to_csv(run / "patients.csv", index=False)
    df[["group", "fold"]].drop_duplicates().to_csv(run / "folds.csv", index=False)
    (run / "metrics.json").write_text(json.dumps({
        "disclaimer": "d", "task": {"classes": CLASSES, "class_map": {}, "notes": ["a note from cv"]},
        "cv": {"aggregate": "mean", "normal_class": "normal", "scheme": "kfold"}, "audit": {"passed": True},
        "provenance": {"command": "fetalscan cv --data x", "seed": 0, "data_hash": "f00d", "created": "t",
                       "versions": {"numpy": "2"}}}))
    return run


def add_explain(run: Path) -> None:
    ex = run / "explain"
    ex.mkdir()
    tiny_png(ex / "overlay_0.png", 99)
    (ex / "faithfulness.json").write_text(json.dumps({
        "methods": {"gradcam": {"deletion_auc": 0.21, "insertion_auc": 0.64, "random_deletion_auc": 0.35,
                                "random_insertion_auc": 0.41, "randomisation_similarity": 0.12,
                                "energy_in_head": None, "n_images": 20}},
        "notes": ["energy in head needs masks"]}))
    (ex / "gallery.json").write_text(json.dumps([
        {"class": "cyst", "kind": "TP", "path": "/x.png", "overlay": "explain/overlay_0.png", "prob": 0.91,
         "label": "cyst", "pred": "cyst", "method": "gradcam"},
        {"class": "cyst", "kind": "FN", "path": "/y.png", "overlay": "explain/missing.png", "prob": 0.2,
         "label": "cyst", "pred": "normal", "method": "gradcam"}]))


def section_ids(html: str) -> set[str]:
    return set(re.findall(r'<section id="([^"]+)"', html))


def test_report_renders_every_section_self_contained(tmp_path):
    run = make_cv_run(tmp_path)
    add_explain(run)
    m = evaluate_run(run, EvaluationConfig(n_boot=100, n_perm=100))
    html = (run / "report.html").read_text()
    assert section_ids(html) == {s for s, _ in SECTIONS}
    # self-contained: figures inline, nothing fetched from elsewhere
    assert not re.search(r'(src|href)="(?!data:|#)', html)
    assert html.count('src="data:image/png;base64,') >= 10
    for text in ("supports, and never replaces", "Shortcut check", "By ga_weeks", "By center", "gradcam",
                 "f00d", "fetalscan cv --data x", "a note from cv", "Thresholds per fold", "Temperatures per fold"):
        assert text in html, text
    assert ">nan<" not in html.lower() and "None" not in re.sub(r"<pre>.*?</pre>", "", html, flags=re.S)
    # explainability: the good overlay embedded, the missing one reported
    assert m["explainability"]["available"] and len(m["explainability"]["gallery"]) == 1
    assert any("missing.png" in n for n in m["explainability"]["notes"])
    # the planted bright corner on every normal image is caught by the shortcut probe
    assert m["shortcut"]["warning"] and "Shortcut warning" in html
    # the JSON twin holds the numbers shown
    pat = m["patient_level"]
    assert f"{pat['macro_auroc']:.3f}" in html and fmt_ci(pat["ci"]["macro_auroc"]["bootstrap"]) in html


@pytest.mark.slow
def test_report_without_explain_files_says_how_to_make_them(tmp_path):
    run = make_cv_run(tmp_path, with_images=False)
    assert main(["report", str(run), "--n-boot", "50", "--n-perm", "50", "--no-shortcut"]) == 0
    html = (run / "report.html").read_text()
    assert "fetalscan explain" in html and "switched off" in html
    bad = run / "explain"
    bad.mkdir()
    (bad / "gallery.json").write_text("{not json")
    m = evaluate_run(run, EvaluationConfig(n_boot=20, n_perm=20, shortcut=False))
    assert any("gallery.json could not be used" in n for n in m["explainability"]["notes"])


def test_report_cli_on_a_bad_folder_is_one_error_line(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "run folder not found" in capsys.readouterr().err


def test_formatting_helpers():
    assert fmt(float("nan")) == "–" and fmt(None) == "–" and fmt(0.12345) == "0.123" and fmt(3) == "3"
    assert fmt_ci([0.1, 0.2]) == "0.100–0.200" and fmt_ci([float("nan"), 1.0]) == "–"


# --------------------------------------------------------------------------- external validation


@pytest.mark.slow
def test_external_validation_writes_the_same_report(tmp_path):
    """A checkpoint with a stored temperature and screening thresholds, scored on another manifest."""
    import torch

    from fetalscan.data.records import load_dataset
    from fetalscan.models.checkpoint import architecture_of, save_checkpoint
    from fetalscan.models.registry import get_backbone_spec
    from fetalscan.report.runs import evaluate_external
    from fetalscan.training.loop import TrainConfig, new_model

    torch.manual_seed(0)
    cfg = TrainConfig(backbone="sononet16", pretrained="none")
    classes = ["abnormal", "normal"]
    ckpt = save_checkpoint(
        tmp_path / "model.pt", new_model(cfg, 2).eval(), classes=classes, architecture=architecture_of(cfg, 2),
        preprocessing=get_backbone_spec("sononet16").preprocessing, class_map={"cyst": "abnormal"},
        calibration={"temperature": 1.5, "fitted_on": "inner validation",
                     "screening": {"image": 0.5, "patient": 0.5, "aggregate": "mean", "normal_class": "normal",
                                   "target_sensitivity": 0.95}})
    rows = []
    for g in range(8):
        for label in ("cyst", "normal", "hydrops"):  # cyst -> abnormal via class_map; hydrops unknown
            rel = f"ext/{label}_{g}.png"
            tiny_png(tmp_path / rel, g * 10 + len(label), bright_corner=label == "normal")
            rows.append({"path": rel, "label": label, "group": f"{label}_{g}", "center": "other_hospital"})
    pd.DataFrame(rows).to_csv(tmp_path / "external.csv", index=False)
    out = tmp_path / "ext_out"
    m = evaluate_external(ckpt, load_dataset(tmp_path / "external.csv", require_labels=False), out,
                          EvaluationConfig(n_boot=50, n_perm=50), device=torch.device("cpu"))
    for name in ("predictions.csv", "patients.csv", "metrics.json", "report.html"):
        assert (out / name).is_file(), name
    assert m["kind"] == "external" and m["external"]["temperature"] == 1.5
    assert m["external"]["unknown_labels"] == ["hydrops"]
    assert m["image_level"]["n"] == 16  # the 8 unknown-label images are predicted, not scored
    assert m["calibration"]["fitted"] is False and "T = 1.5" in m["calibration"]["note"]
    op = m["screening"]["patient"]["operating_point"]
    assert op is not None and "stored with the model" in m["screening"]["patient"]["rule"]
    assert m["shortcut"]["available"] and "new stratified grouped folds" in m["shortcut"]["folds"]
    html = (out / "report.html").read_text()
    assert section_ids(html) == {s for s, _ in SECTIONS} and "External validation" in html
    # fetalscan report on the external folder re-uses the stored thresholds
    m2 = evaluate_run(out, EvaluationConfig(n_boot=50, n_perm=50, shortcut=False))
    assert m2["screening"]["patient"]["operating_point"]["tp"] == op["tp"]


def test_external_validation_refuses_data_without_any_model_class(tmp_path):
    import torch

    from fetalscan.data.records import load_dataset
    from fetalscan.errors import DataError
    from fetalscan.models.checkpoint import architecture_of, save_checkpoint
    from fetalscan.models.registry import get_backbone_spec
    from fetalscan.report.runs import evaluate_external
    from fetalscan.training.loop import TrainConfig, new_model

    cfg = TrainConfig(backbone="sononet16", pretrained="none")
    ckpt = save_checkpoint(tmp_path / "m.pt", new_model(cfg, 2), classes=["abnormal", "normal"],
                           architecture=architecture_of(cfg, 2),
                           preprocessing=get_backbone_spec("sononet16").preprocessing)
    tiny_png(tmp_path / "a.png", 1)
    pd.DataFrame([{"path": "a.png", "label": "hydrops", "group": "g"}]).to_csv(tmp_path / "e.csv", index=False)
    with pytest.raises(DataError, match="none of its labels"):
        evaluate_external(ckpt, load_dataset(tmp_path / "e.csv", require_labels=False), tmp_path / "o",
                          device=torch.device("cpu"))


# --------------------------------------------------------------------------- real data


@pytest.mark.shared
@pytest.mark.slow
def test_fetal_brain_report_warns_that_source_separates_normal_from_abnormal(fetal_brain, tmp_path):
    """On the shared fetal_brain data the normals come from another source: the report must say so.

    The images, labels, groups, rare-class merge and grouped folds are the real ones that
    `fetalscan cv` uses; the model's probabilities are a stand-in (label-informed noise), so
    that the test exercises the probe on the real images without the cost of training. The
    probe, which never sees these probabilities, must find the source cue by itself.
    """
    from fetalscan.data.records import load_dataset
    from fetalscan.inference.tables import predictions_frame
    from fetalscan.splits import apply_rare_class_policy, make_folds

    ds = apply_rare_class_policy(load_dataset(fetal_brain), 5, "merge")
    folds = make_folds(ds.labels, ds.groups, "kfold", 5, seed=0)
    rng = np.random.default_rng(0)

    def stand_in(idx):
        z = rng.normal(0, 1, (len(idx), len(ds.classes)))
        z[np.arange(len(idx)), ds.y[idx]] += 1.0
        return np.exp(z) / np.exp(z).sum(1, keepdims=True)

    test = pd.concat([predictions_frame([ds.records[i] for i in f.test], stand_in(f.test), ds.classes, f.index)
                      for f in folds], ignore_index=True)
    inner = pd.concat([predictions_frame([ds.records[i] for i in f.inner_val], stand_in(f.inner_val), ds.classes,
                                         f.index) for f in folds], ignore_index=True)
    run = tmp_path / "cv"
    run.mkdir()
    test.to_csv(run / "predictions.csv", index=False)
    inner.to_csv(run / "inner_val_predictions.csv", index=False)
    aggregate_groups(test, ds.classes).to_csv(run / "patients.csv", index=False)
    test[["group", "fold"]].drop_duplicates().to_csv(run / "folds.csv", index=False)
    (run / "metrics.json").write_text(json.dumps({
        "task": {"classes": ds.classes, "class_map": {"arachnoid_cyst": "other"}, "notes": ds.notes},
        "cv": {"aggregate": "mean", "normal_class": "normal"}, "data": {"source": str(fetal_brain)}}))
    m = evaluate_run(run, EvaluationConfig(n_boot=200, n_perm=200))
    html = (run / "report.html").read_text()
    assert section_ids(html) == {s for s, _ in SECTIONS}
    sc = m["shortcut"]
    assert sc["available"] and sc["warning"] and sc["n_images"] == 166
    nvsa = next(c for c in sc["comparisons"] if c["metric"] == "normal vs abnormal AUROC, patient level")
    assert nvsa["probe"] >= 0.9 and nvsa["probe_ci"][0] > 0.8 and nvsa["warning"]
    assert "separation of normal from abnormal images can come from image source" in html
    assert m["screening"]["available"] and len(m["screening"]["patient"]["folds"]) == 5
    assert m["calibration"]["fitted"] and len(m["calibration"]["temperatures"]) == 5
    assert {b["column"] for b in m["subgroups"]} >= {"label_original", "original_split"}
