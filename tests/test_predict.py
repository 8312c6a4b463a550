"""Checkpoints round-trip exactly; patient-level aggregation maths; bad checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fetalscan.data.records import load_dataset
from fetalscan.errors import CheckpointError, FetalscanError
from fetalscan.inference.predict import predict_probabilities
from fetalscan.inference.tables import (
    aggregate_groups,
    classes_from_columns,
    predictions_frame,
)
from fetalscan.models.checkpoint import (
    FORMAT_VERSION,
    architecture_of,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from fetalscan.models.registry import get_backbone_spec
from fetalscan.training.loop import TrainConfig, new_model

CLASSES = ["anomaly", "normal"]


def _frame(rows):
    df = pd.DataFrame(rows, columns=["group", "label", "fold", "p_anomaly", "p_normal"])
    df.insert(3, "pred", "")
    return df


def test_mean_aggregation_averages_probabilities() -> None:
    df = _frame([("g", "anomaly", 0, 0.9, 0.1), ("g", "anomaly", 0, 0.3, 0.7)])
    out = aggregate_groups(df, CLASSES, "mean")
    assert out.loc[0, "p_anomaly"] == pytest.approx(0.6)
    assert out.loc[0, "pred"] == "anomaly" and out.loc[0, "n_images"] == 2 and out.loc[0, "fold"] == 0


def test_vote_aggregation_counts_image_decisions_and_breaks_ties_by_mean() -> None:
    # two of three images say normal although the mean probability favours anomaly
    df = _frame([("g", "", 0, 0.45, 0.55), ("g", "", 0, 0.49, 0.51), ("g", "", 0, 0.99, 0.01)])
    out = aggregate_groups(df, CLASSES, "vote")
    assert out.loc[0, "pred"] == "normal"
    assert out.loc[0, "p_normal"] == pytest.approx(2 / 3, abs=0.02)
    tie = _frame([("t", "", 0, 0.45, 0.55), ("t", "", 0, 0.9, 0.1)])
    assert aggregate_groups(tie, CLASSES, "vote").loc[0, "pred"] == "anomaly"  # mean 0.675 breaks the tie


def test_max_abnormal_takes_the_most_suspicious_image() -> None:
    df = _frame([("g", "", 0, 0.2, 0.8), ("g", "", 0, 0.6, 0.4), ("g", "", 0, 0.1, 0.9)])
    out = aggregate_groups(df, CLASSES, "max_abnormal")
    assert out.loc[0, "p_anomaly"] == pytest.approx(0.6) and out.loc[0, "pred"] == "anomaly"
    with pytest.raises(FetalscanError, match="needs a normal class"):
        aggregate_groups(df, CLASSES, "max_abnormal", normal_class="healthy")


def test_groups_with_two_labels_in_predictions_are_refused() -> None:
    df = _frame([("g", "anomaly", 0, 0.2, 0.8), ("g", "normal", 0, 0.6, 0.4)])
    with pytest.raises(FetalscanError, match="two labels"):
        aggregate_groups(df, CLASSES, "mean")


def test_class_columns_are_read_after_pred_only() -> None:
    cols = ["path", "group", "label", "fold", "pred", "p_a", "p_b", "label_original", "p_value"]
    assert classes_from_columns(cols) == ["a", "b"]


# --------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, example_manifest: Path):
    """A cached-mode SonoNet model with a trained-looking head, saved and its predictions."""
    ds = load_dataset(example_manifest)
    ds = ds.subset(range(0, len(ds), 11))
    cfg = TrainConfig()
    torch.manual_seed(0)
    model = new_model(cfg, len(ds.classes)).eval()
    for p in model.classifier.parameters():
        torch.nn.init.normal_(p, std=0.5)
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_checkpoint(path, model, classes=ds.classes, architecture=architecture_of(cfg, len(ds.classes)),
                    preprocessing=get_backbone_spec("sononet16").preprocessing,
                    calibration={"temperature": 1.7})
    return path, model, ds


def test_checkpoint_round_trip_reproduces_predictions_exactly(saved_model) -> None:
    path, model, ds = saved_model
    first = load_checkpoint(path)
    second = load_checkpoint(path)
    p1 = predict_probabilities(first, ds.records, torch.device("cpu"))[0]
    p2 = predict_probabilities(second, ds.records, torch.device("cpu"))[0]
    assert np.array_equal(p1, p2)
    assert first.classes == ds.classes and first.temperature == 1.7
    for k, v in model.state_dict().items():
        assert torch.equal(first.model.state_dict()[k], v)
    assert read_checkpoint(path)["format_version"] == FORMAT_VERSION


def test_predictions_frame_contract(saved_model) -> None:
    path, _, ds = saved_model
    loaded = load_checkpoint(path)
    probs = predict_probabilities(loaded, ds.records, torch.device("cpu"))[0]
    df = predictions_frame(ds.records, probs, loaded.classes, fold=None)
    assert list(df.columns[:6]) == ["path", "frame", "group", "label", "fold", "pred"]
    assert classes_from_columns(df.columns) == loaded.classes
    assert np.allclose(df[[f"p_{c}" for c in loaded.classes]].sum(axis=1), 1.0)


def _tamper(path: Path, out: Path, **changes) -> Path:
    blob = torch.load(path, weights_only=True)
    for key, value in changes.items():
        if value is None:
            del blob[key]
        else:
            blob[key] = value
    torch.save(blob, out)
    return out


def test_checkpoint_of_another_version_is_refused(saved_model, tmp_path: Path) -> None:
    path = _tamper(saved_model[0], tmp_path / "v9.pt", format_version=FORMAT_VERSION + 8)
    with pytest.raises(CheckpointError, match="newer fetalscan"):
        load_checkpoint(path)


def test_checkpoint_of_another_architecture_is_refused(saved_model, tmp_path: Path) -> None:
    blob = torch.load(saved_model[0], weights_only=True)
    arch = dict(blob["architecture"], backbone="resnet34")
    path = _tamper(saved_model[0], tmp_path / "arch.pt", architecture=arch)
    with pytest.raises(CheckpointError, match="do not match the architecture 'resnet34'"):
        load_checkpoint(path)


def test_corrupt_and_foreign_files_are_refused(saved_model, tmp_path: Path) -> None:
    cut = tmp_path / "cut.pt"
    cut.write_bytes(saved_model[0].read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cut.pt"):
        load_checkpoint(cut)
    foreign = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="not a fetalscan classifier checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "absent.pt")
