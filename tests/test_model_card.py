"""Model cards: built from the checkpoint and the run that evaluated it, never from a run that did not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fetalscan.cli import main
from fetalscan.errors import DataError
from fetalscan.fileio import sha256_file
from fetalscan.models.checkpoint import read_checkpoint
from fetalscan.report.model_card import matching_run_metrics, model_card, render_markdown
from fetalscan.texts import DISCLAIMER


def _metrics(ckpt: Path, *, classes=None, data_hash=None) -> dict:
    """A metrics.json content as ``fetalscan cv`` writes it (the parts a card reads)."""
    blob = read_checkpoint(ckpt)
    classes = classes or blob["classes"]
    per_class = {c: {"n": 6, "sensitivity": 0.5 + 0.1 * i, "specificity": 0.9, "auroc": 0.81 + 0.01 * i,
                     "ci": {"sensitivity": {"bootstrap": [0.2, 0.8]}, "specificity": {"wilson": [0.7, 0.97]},
                            "auroc": {"bootstrap": [0.6, 0.95]}}} for i, c in enumerate(classes)}
    return {
        "task": {"classes": list(classes), "notes": []},
        "data": {"source": "/secret/place/manifest.csv", "n_images": 24, "n_groups": 12,
                 "per_class": {c: {"images": 12, "groups": 6} for c in classes}},
        "cv": {"scheme": "kfold", "folds": 3},
        "evaluation": {"kind": "cv"},
        "provenance": {"data_hash": data_hash or blob["provenance"]["data_hash"]},
        "patient_level": {"accuracy": 0.75, "balanced_accuracy": 0.7, "macro_auroc": 0.8123,
                          "ci": {"accuracy": {"bootstrap": [0.5, 0.9]}, "macro_auroc": {"bootstrap": [0.64, 0.93]}},
                          "per_class": per_class},
        "calibration": {"after": {"patient": {"ece": 0.12, "ci": {"ece": {"bootstrap": [0.05, 0.2]}}}}},
        "shortcut": {"available": True, "warning": True, "message": "Warning: the probe separates the classes."},
        "limitations": ["Warning: the probe separates the classes.", "Labels were taken as given."],
        "subgroups": [],
    }


def test_card_states_use_limits_oversight_and_the_run_metrics(tiny_classifier: Path) -> None:
    card = model_card(tiny_classifier, metrics=_metrics(tiny_classifier))
    md = render_markdown(card)
    assert card["model"]["sha256"] == sha256_file(tiny_classifier) and card["model"]["sha256"] in md
    for text in ("## Intended use", "## Out of scope", "## Human oversight", DISCLAIMER,
                 "macro auroc, patient level | 0.812 (0.640–0.930)",  # metric with its 95% CI
                 "**Warning: the probe separates the classes.**", "Labels were taken as given."):
        assert text in md, text
    assert md.count("Warning: the probe separates the classes.") == 1  # said once, as the shortcut warning
    assert "/secret/place" not in md  # no paths of the training data, only the file name
    assert "| abnormal | 6 | 0.500 (0.200–0.800) | 0.900 (0.700–0.970) | 0.810 (0.600–0.950) |" in md


def test_card_without_an_evaluation_says_so(tiny_classifier: Path) -> None:
    card = model_card(tiny_classifier)
    assert not card["evaluation"]["available"]
    assert any("no metrics" in n for n in card["notes"])
    assert "No evaluation was given" in render_markdown(card)


def test_a_run_of_other_classes_or_other_data_does_not_describe_the_model(tiny_classifier: Path,
                                                                          tmp_path: Path) -> None:
    with pytest.raises(DataError, match="classes"):
        model_card(tiny_classifier, metrics=_metrics(tiny_classifier, classes=["a", "b"]))
    assert matching_run_metrics(tiny_classifier, _metrics(tiny_classifier)) is not None
    assert matching_run_metrics(tiny_classifier, _metrics(tiny_classifier, data_hash="0" * 64)) is None
    assert matching_run_metrics(tiny_classifier, _metrics(tiny_classifier, classes=["a", "b"])) is None


def test_cli_writes_the_card_and_refuses_a_bad_run(tiny_classifier: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps(_metrics(tiny_classifier)))
    out = tmp_path / "card.md"
    assert main(["model-card", str(tiny_classifier), "--run", str(run), "--out", str(out)]) == 0
    assert "0.812 (0.640–0.930)" in out.read_text()
    (run / "metrics.json").write_text(json.dumps(_metrics(tiny_classifier, classes=["x", "y"])))
    assert main(["model-card", str(tiny_classifier), "--run", str(run), "--out", str(out)]) == 2
    assert "classes" in capsys.readouterr().err
    assert main(["model-card", str(tmp_path / "missing.pt")]) == 2


def test_service_shows_the_card(tiny_classifier: Path, tmp_path: Path) -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from fetalscan.serve import ServeSettings, create_app

    token = "model-card-token-0123456789"
    app = create_app(ServeSettings(model=tiny_classifier, token=token, db=tmp_path / "r.sqlite", device="cpu",
                                   warm_up=False))
    with TestClient(app) as client:
        assert client.get("/api/v1/model/card").status_code == 401
        body = client.get("/api/v1/model/card", headers={"Authorization": f"Bearer {token}"}).json()
    assert body["card"]["model"]["sha256"] == sha256_file(tiny_classifier)
    assert body["markdown"].startswith("# Model card") and DISCLAIMER in body["markdown"]
