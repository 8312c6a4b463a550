"""The Python API and the one prediction path.

``fetalscan predict``, ``fetalscan evaluate`` and :class:`fetalscan.Classifier` all go
through :func:`fetalscan.inference.predict.predict`; the plane check reads the same
decoded images as the classifier; the API's tables are the CLI's files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import blob_image, write_manifest, write_png

import fetalscan
from fetalscan import Classifier, Study, load_dataset
from fetalscan.cli import main
from fetalscan.errors import FetalscanError

FAST = {"head_epochs": 30, "head_patience": 10, "seed": 0, "device": "cpu"}


@pytest.fixture
def toy(toy_manifest) -> Path:
    return toy_manifest(groups=6, per_group=2)


@pytest.fixture
def spy_predict(monkeypatch):
    """Record every call of the one prediction function."""
    import fetalscan.inference.predict as mod

    calls = []
    real = mod.predict

    def wrapped(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(mod, "predict", wrapped)
    return calls


@pytest.mark.slow
def test_classifier_fit_predict_save_load_round_trip(tmp_path: Path, toy: Path) -> None:
    data = load_dataset(toy)
    clf = Classifier(**FAST).fit(data)
    assert clf.classes_ == ["abnormal", "normal"]
    p = clf.predict_proba(data)
    assert p.shape == (len(data.records), 2)
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-9)
    # arrays, paths and the dataset give the same probabilities
    paths = [str(r.path) for r in data.records]
    from fetalscan.data.records import read_image

    np.testing.assert_allclose(clf.predict_proba(paths), p, atol=1e-12)
    np.testing.assert_allclose(clf.predict_proba([read_image(Path(x)) for x in paths]), p, atol=1e-12)
    path = clf.save(tmp_path / "model.pt")
    again = Classifier.load(path, device="cpu")
    np.testing.assert_allclose(again.predict_proba(data), p, atol=1e-12)
    assert "trained" in repr(again)


@pytest.mark.slow
def test_classifier_trained_in_python_equals_the_cli_model(tmp_path: Path, toy: Path, capsys) -> None:
    clf = Classifier(**FAST).fit(toy)
    flags = ["--head-epochs", "30", "--head-patience", "10", "--seed", "0", "--device", "cpu"]
    assert main(["train", "--data", str(toy), "--out", str(tmp_path / "cli"), *flags]) == 0
    cli = Classifier.load(tmp_path / "cli" / "model.pt", device="cpu")
    np.testing.assert_allclose(clf.predict_proba(toy), cli.predict_proba(toy), atol=1e-10)


def test_untrained_classifier_and_unknown_options_are_clear_errors(toy: Path) -> None:
    with pytest.raises(FetalscanError, match="not trained yet"):
        Classifier().predict_proba(toy)
    with pytest.raises(FetalscanError, match="unknown option 'epoch'"):
        Classifier(epoch=3)
    with pytest.raises(FetalscanError, match="mode"):
        Classifier(mode="magic")


@pytest.mark.slow
def test_study_cross_validate_returns_the_tables_cv_writes(tmp_path: Path, toy: Path, capsys) -> None:
    result = Study(Classifier(**FAST), folds=3).cross_validate(toy)
    assert result.out is None and set(result.predictions["fold"]) == {0, 1, 2}
    flags = ["--folds", "3", "--head-epochs", "30", "--head-patience", "10", "--seed", "0", "--device", "cpu",
             "--n-boot", "20", "--no-shortcut"]
    assert main(["cv", "--data", str(toy), "--out", str(tmp_path / "run"), *flags]) == 0
    written = pd.read_csv(tmp_path / "run" / "predictions.csv")
    ours = result.predictions.reset_index(drop=True)
    assert list(written["path"]) == list(ours["path"])
    np.testing.assert_allclose(written[["p_abnormal", "p_normal"]], ours[["p_abnormal", "p_normal"]], atol=1e-12)
    patients = pd.read_csv(tmp_path / "run" / "patients.csv")
    assert list(patients["group"]) == list(result.patients["group"])


@pytest.mark.slow
def test_predict_and_evaluate_share_the_one_prediction_path(tmp_path: Path, toy: Path, spy_predict,
                                                            capsys) -> None:
    flags = ["--head-epochs", "30", "--seed", "0", "--device", "cpu"]
    assert main(["train", "--data", str(toy), "--out", str(tmp_path / "m"), *flags]) == 0
    model = str(tmp_path / "m" / "model.pt")
    assert main(["predict", "--model", model, "--data", str(toy), "--out", str(tmp_path / "p"),
                 "--device", "cpu"]) == 0
    assert len(spy_predict) == 1
    assert main(["evaluate", "--model", model, "--data", str(toy), "--out", str(tmp_path / "e"),
                 "--device", "cpu", "--n-boot", "20", "--no-shortcut"]) == 0
    assert len(spy_predict) == 2
    a = pd.read_csv(tmp_path / "p" / "predictions.csv")
    b = pd.read_csv(tmp_path / "e" / "predictions.csv")
    np.testing.assert_allclose(a[["p_abnormal", "p_normal"]], b[["p_abnormal", "p_normal"]], atol=1e-12)
    clf = Classifier.load(model, device="cpu")
    clf.predict(toy)
    assert len(spy_predict) == 3


@pytest.mark.slow
def test_plane_check_decodes_each_image_once(tmp_path: Path, toy: Path, monkeypatch, capsys) -> None:
    import fetalscan.data.records as records

    flags = ["--head-epochs", "20", "--seed", "0", "--device", "cpu"]
    assert main(["train", "--data", str(toy), "--out", str(tmp_path / "m"), *flags]) == 0
    reads: list[str] = []
    real = records._read_frames

    def counting(path, frames):
        reads.append(str(path))
        return real(path, frames)

    monkeypatch.setattr(records, "_read_frames", counting)
    assert main(["predict", "--model", str(tmp_path / "m" / "model.pt"), "--data", str(toy),
                 "--out", str(tmp_path / "p"), "--plane-check", "--device", "cpu"]) == 0
    n_images = len(load_dataset(toy).records)
    assert len(reads) == n_images == len(set(reads))
    df = pd.read_csv(tmp_path / "p" / "predictions.csv")
    assert {"plane", "plane_confidence", "brain_plane"} <= set(df.columns)


def test_predict_chunks_give_the_same_probabilities_as_one_batch(tmp_path: Path, monkeypatch) -> None:
    import fetalscan.inference.predict as mod

    rows = []
    for i in range(7):
        write_png(tmp_path / f"im{i}.png", blob_image(i, bright=i % 2 == 0))
        rows.append({"path": f"im{i}.png", "label": ["abnormal", "normal"][i % 2], "group": f"g{i}"})
    toy = write_manifest(tmp_path / "m.csv", rows)
    data = load_dataset(toy)
    clf = Classifier(**FAST)
    clf.model_ = _tiny_model()
    whole = clf.predict_proba(data)
    monkeypatch.setattr(mod, "CHUNK_BATCHES", 1)
    chunked = mod.predict_probabilities(clf.model_, data.records, "cpu", batch_size=2)[0]
    np.testing.assert_allclose(chunked, whole, atol=1e-6)


def _tiny_model():
    import torch

    from fetalscan.models.checkpoint import LoadedModel
    from fetalscan.models.heads import build_classifier
    from fetalscan.models.registry import get_backbone_spec

    torch.manual_seed(0)
    model = build_classifier("sononet16", 2, mode="cached", pretrained="none").eval()
    arch = {"backbone": "sononet16", "num_classes": 2, "mode": "cached", "head": "linear", "head_hidden": 256,
            "drop_rate": 0.0}
    return LoadedModel(model, ["abnormal", "normal"], get_backbone_spec("sononet16").preprocessing, arch, {})


def test_package_exports_the_api_lazily() -> None:
    assert fetalscan.Classifier is Classifier and fetalscan.Study is Study
    with pytest.raises(AttributeError):
        fetalscan.nothing_here  # noqa: B018
