"""Heads that hold up on unseen patients: the logistic-regression head and its C chosen on training
groups only, fold ensembles, the linear-probe baseline row and its warning, repeated CV."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fetalscan.data.records import Dataset, Record, load_dataset
from fetalscan.evaluation.config import EvaluationConfig
from fetalscan.models.checkpoint import architecture_of, load_checkpoint, save_checkpoint
from fetalscan.models.heads import EnsembleHead, build_classifier, cached_head, linear_head_from_logreg
from fetalscan.models.registry import get_head
from fetalscan.splits import Fold, inner_group_folds, make_folds
from fetalscan.training.loop import TrainConfig
from fetalscan.training.selection import C_GRID, fit_cached_head, fit_logreg, is_linear_probe
from fetalscan.training.study import CVConfig, cross_validate_folds, run_cv


def _synthetic(n_groups: int = 10, per_group: int = 2, classes=("abnormal", "normal")) -> Dataset:
    recs = [Record(path=Path(f"{c}{g}_{i}.png"), label=c, group=f"{c}_{g}", name=f"{c}{g}_{i}.png")
            for c in classes for g in range(n_groups) for i in range(per_group)]
    return Dataset(recs, list(classes), "synthetic")


# --------------------------------------------------------------------------- logistic regression head


@pytest.mark.parametrize("n_classes", [2, 4])
def test_logreg_head_gives_sklearns_probabilities(n_classes: int) -> None:
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    f = torch.tensor(rng.normal(size=(60, 7)) * 3 + 5, dtype=torch.float32)
    y = rng.integers(0, n_classes, 60)
    head = fit_logreg(f, y, n_classes, c=0.5)
    x = ((f - f.mean(0)) / f.std(0, unbiased=False)).double().numpy()
    ref = LogisticRegression(C=0.5, class_weight="balanced", max_iter=5000).fit(x, y).predict_proba(x)
    with torch.inference_mode():
        ours = torch.softmax(head(f).double(), 1).numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_logreg_head_gives_absent_classes_no_probability() -> None:
    head = linear_head_from_logreg(np.ones((1, 3)), np.zeros(1), np.array([0, 2]), torch.zeros(3), torch.ones(3), 3)
    with torch.inference_mode():
        p = torch.softmax(head(torch.tensor([[1.0, 1.0, 1.0]])), 1)[0]
    assert p[1] < 1e-9 and p[2] > p[0]  # binary: logits -/+ (w.x + b) / 2 for classes 0 and 2
    assert float(head[2].weight[0].detach().sum()) == pytest.approx(-1.5)  # class 0's logit depends on x (Grad-CAM)


def test_inner_group_folds_keep_groups_whole_and_allow_rare_classes() -> None:
    labels = ["a"] * 10 + ["b"] * 4 + ["c"] * 2
    groups = [f"a{i // 2}" for i in range(10)] + ["b0", "b0", "b1", "b1", "c0", "c0"]
    folds = inner_group_folds(labels, groups, 5, seed=3)
    assert len(folds) == 5
    assert sorted(np.concatenate(folds).tolist()) == list(range(16))
    for f in folds:  # a group is never split between held-out folds
        inside = set(f.tolist())
        for g in {groups[i] for i in f}:
            assert all(i in inside for i in range(16) if groups[i] == g)


def test_logreg_c_is_chosen_on_training_groups_only() -> None:
    """A planted leak: the test fold's embeddings carry a strong signal that would pull C up if the
    selection saw them. The C that cross-validation records must be the training-only choice."""
    ds = _synthetic()
    y = ds.y
    folds = make_folds(ds.labels, ds.groups, "kfold", 5, 0, 0.2)
    rng = np.random.default_rng(0)
    emb = torch.tensor(rng.normal(size=(len(y), 8)), dtype=torch.float32)
    emb[:, 0] += torch.tensor(0.3 * (2 * y - 1), dtype=torch.float32)
    test0 = folds[0].test
    emb[test0, 0] = torch.tensor(6.0 * (2 * y[test0] - 1), dtype=torch.float32)  # the plant
    cfg = TrainConfig()
    clean = fit_cached_head(emb, y, ds.labels, ds.groups, folds[0], 2, cfg, 0).fit.selection["chosen"]
    leaky_fold = Fold(0, np.array([], dtype=int), np.sort(np.concatenate([folds[0].train, test0])),
                      np.array([], dtype=int))
    leaky = fit_cached_head(emb, y, ds.labels, ds.groups, leaky_fold, 2, cfg, 0).fit.selection["chosen"]
    assert leaky != clean, "the plant must move C when the test rows are seen, or this test has no power"
    outputs = cross_validate_folds(ds, torch.zeros(len(y), 1, 2, 2, dtype=torch.uint8), folds[:1], cfg,
                                   torch.device("cpu"), emb=emb)
    sel = outputs[0].fit.selection
    assert sel["chosen"] == clean and sel["grid"] == list(C_GRID)
    assert sel["n_train_groups"] == len({ds.groups[i] for i in folds[0].train})
    held = outputs[0].held_out  # the held-out predictions used for calibration: training rows only
    assert not set(held.tolist()) & set(test0.tolist()) and set(held.tolist()) == set(folds[0].train.tolist())


# --------------------------------------------------------------------------- ensembles


def test_ensemble_probabilities_are_the_mean_of_its_members() -> None:
    torch.manual_seed(0)
    members = [cached_head(6, 3, "mlp" if i % 2 else "linear", 8, 0.0).eval() for i in range(3)]
    for m in members:
        m[0].mean.normal_()
    ens = EnsembleHead(members).eval()
    x = torch.randn(5, 6)
    with torch.inference_mode():
        mean = torch.stack([torch.softmax(m(x), 1) for m in members]).mean(0)
        assert torch.allclose(torch.softmax(ens(x), 1), mean, atol=1e-6)


def test_ensemble_checkpoint_round_trip_keeps_every_member(tmp_path: Path) -> None:
    cfg = TrainConfig(pretrained="none", ensemble=3)
    model = build_classifier("sononet16", 2, head="logreg", ensemble=3)
    for p in get_head(model).parameters():
        torch.nn.init.normal_(p)
    from fetalscan.data.transforms import Preprocessing

    path = save_checkpoint(tmp_path / "m.pt", model, classes=["a", "b"], architecture=architecture_of(cfg, 2),
                           preprocessing=Preprocessing())
    loaded = load_checkpoint(path)
    assert loaded.architecture["ensemble"] == 3
    head = get_head(loaded.model)
    assert isinstance(head, EnsembleHead) and len(head.members) == 3
    x = torch.randn(4, head.members[0][0].mean.shape[0])
    with torch.inference_mode():
        assert torch.allclose(head(x), get_head(model).eval()(x), atol=1e-6)


@pytest.mark.slow
def test_train_with_ensemble_predicts_the_mean_of_its_fold_models(toy_manifest, tmp_path: Path) -> None:
    from fetalscan.inference.predict import predict
    from fetalscan.training.study import run_train

    manifest = toy_manifest(groups=5)
    summary = run_train(load_dataset(manifest), TrainConfig(pretrained="none", ensemble=3), CVConfig(folds=3),
                        tmp_path / "model")
    sel = summary["selection"]
    assert sel["parameter"] == "C" and sel["n_inner_folds"] == 3 and sel["chosen"] in C_GRID
    assert "ensemble of the 3" in sel["final"]
    loaded = load_checkpoint(summary["model"])
    head = get_head(loaded.model)
    assert isinstance(head, EnsembleHead) and len(head.members) == 3
    data = load_dataset(manifest)
    pred = predict(loaded, data)
    # the prediction path returns softmax(log mean p / T): with T = 1 exactly the members' mean
    from fetalscan.data.records import prepare_images
    from fetalscan.data.transforms import normalize

    images, _ = prepare_images(data.records, loaded.preprocessing)
    x = normalize(images, loaded.preprocessing)
    with torch.inference_mode():
        f = loaded.model.forward_head(loaded.model.forward_features(x), pre_logits=True)
        members = torch.stack([torch.softmax(m(f), 1) for m in head.members]).mean(0).double()
    t = loaded.temperature
    expected = torch.softmax(torch.log(members) / t, 1).numpy()
    np.testing.assert_allclose(pred.probabilities, expected, atol=1e-5)


# --------------------------------------------------------------------------- baseline row, warning, repeats


@pytest.mark.slow
def test_baseline_row_appears_and_warns_for_a_model_worse_than_it(toy_manifest, tmp_path: Path) -> None:
    from fetalscan.report.runs import evaluate_run

    manifest = toy_manifest(groups=5)
    cfg = TrainConfig(pretrained="none", head="linear", inner_folds=0)
    assert not is_linear_probe(cfg)
    res = run_cv(load_dataset(manifest), cfg, CVConfig(folds=3, repeats=2), tmp_path / "run")
    run = tmp_path / "run"
    assert (run / "baseline_predictions.csv").is_file()
    block = res.metrics["baseline"]
    assert block["available"] and not block["same_as_model"] and len(block["chosen_c"]) == 3
    rep = res.metrics["repeats"]
    assert rep["seeds"] == [0, 1] and len(rep["per_repeat"]) == 2
    assert set(rep["summary"]) == {"model", "baseline"} and rep["summary"]["model"]["macro_auroc"]["n"] == 2
    first = rep["per_repeat"][0]["model"]["macro_auroc"]
    assert first == pytest.approx(res.metrics["patient_level"]["macro_auroc"])
    # make the model worse than the baseline on purpose: swap its two probability columns
    for name in ("predictions.csv", "patients.csv"):
        df = pd.read_csv(run / name)
        df["p_abnormal"], df["p_normal"] = df["p_normal"].copy(), df["p_abnormal"].copy()
        df["pred"] = np.where(df["p_abnormal"] >= df["p_normal"], "abnormal", "normal")
        df.to_csv(run / name, index=False)
    metrics = evaluate_run(run, EvaluationConfig(n_boot=200, shortcut=False))
    bl = metrics["baseline"]
    assert bl["available"] and bl["warning"] and not bl["model_is_probe"]
    row = bl["rows"][0]
    assert row["key"] == "macro_auroc" and row["model"] <= row["baseline_ci"][1]
    assert any(r["key"] == "abnormal_auroc" for r in bl["rows"])
    assert any("linear-probe baseline" in x for x in metrics["limitations"])
    html = (run / "report.html").read_text()
    assert "Baseline warning." in html and "Linear-probe baseline" in html and "Repeated cross-validation" in html
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["baseline"]["warning"] and saved["baseline"]["chosen_c"] == block["chosen_c"]


@pytest.mark.slow
def test_default_logreg_run_is_its_own_baseline_and_does_not_warn(toy_manifest, tmp_path: Path) -> None:
    from fetalscan.report.runs import evaluate_run

    cfg = TrainConfig(pretrained="none")
    assert cfg.head == "logreg" and is_linear_probe(cfg)
    res = run_cv(load_dataset(toy_manifest(groups=5)), cfg, CVConfig(folds=3), tmp_path / "run")
    assert res.metrics["baseline"]["same_as_model"] and res.metrics["repeats"] is None
    pd.testing.assert_frame_equal(res.baseline, res.predictions)
    metrics = evaluate_run(tmp_path / "run", EvaluationConfig(n_boot=100, shortcut=False))
    assert metrics["baseline"]["model_is_probe"] and not metrics["baseline"]["warning"]
    assert "Baseline warning." not in (tmp_path / "run" / "report.html").read_text()


def test_config_rules_for_ensemble_inner_folds_and_repeats() -> None:
    from fetalscan.errors import FetalscanError

    with pytest.raises(FetalscanError, match="ensemble >= 2 needs mode='cached'"):
        TrainConfig(mode="finetune", ensemble=3).validate()
    with pytest.raises(FetalscanError, match="inner_folds must be 0"):
        TrainConfig(inner_folds=1).validate()
    with pytest.raises(FetalscanError, match="head must be one of"):
        TrainConfig(head="svm").validate()
    with pytest.raises(FetalscanError, match="repeats > 1 needs scheme='kfold'"):
        CVConfig(scheme="logo", repeats=3).validate()
    assert TrainConfig(ensemble=4).selection_folds == 4 and TrainConfig(inner_folds=0).selection_folds == 0
