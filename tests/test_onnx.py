"""ONNX export and the ONNX Runtime backend of the one prediction path.

Every registered backbone exports and agrees with PyTorch within 1e-4; the graph carries
its preprocessing and classes; the cache beside the checkpoint is reused, and a corrupt one
is exported again with a message; ``fetalscan predict --backend onnx`` equals ``--backend
torch`` within 1e-4; ``fetalscan export --quantize int8 --check`` reports the AUROC change
(and says so when it was not measured); a failed export under ``auto`` falls back to PyTorch.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import blob_image, write_png

from fetalscan.cli import main
from fetalscan.errors import FetalscanError, ModelError
from fetalscan.inference import onnx as fonnx
from fetalscan.inference import predict as fpredict
from fetalscan.models.registry import list_backbones

#: Backbones whose export takes more than a few seconds on 2 CPU cores.
_HEAVY = {"densenet169", "resnet34", "efficientnet_b0"}


def _loaded(name: str, size: tuple[int, int] = (64, 64), num_classes: int = 3):
    from fetalscan.models.checkpoint import LoadedModel
    from fetalscan.models.heads import build_classifier
    from fetalscan.models.registry import get_backbone_spec

    torch.manual_seed(0)
    model = build_classifier(name, num_classes, mode="finetune", pretrained="none").eval()
    pre = replace(get_backbone_spec(name).preprocessing, input_size=size)
    return LoadedModel(model, [f"c{i}" for i in range(num_classes)], pre, {"backbone": name, "mode": "finetune"},
                       {"calibration": {"temperature": 1.5}})


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in _HEAVY else n
                                  for n in list_backbones()])
def test_every_backbone_exports_and_agrees_with_pytorch(name: str) -> None:
    loaded = _loaded(name)
    data = fonnx.export_onnx(loaded, checkpoint_sha256="ab" * 32)
    engine = fonnx.OnnxClassifier(data)
    batch = fonnx.example_batch(loaded.preprocessing, 3, seed=1)
    check = fonnx.verify_against_torch(loaded, engine, batch)
    assert check["n"] == 3
    assert check["max_abs_diff_probability"] <= 1e-4
    # the comparison is not vacuous: the model's outputs differ between images
    probs = fpredict.softmax_with_temperature(torch.from_numpy(engine.logits(batch)), loaded.temperature)
    assert probs.shape == (3, 3) and np.ptp(probs, axis=0).max() > 0
    # the graph says how to feed it
    meta = fonnx.read_metadata(data)
    assert json.loads(meta["classes"]) == ["c0", "c1", "c2"]
    assert json.loads(meta["preprocessing"]) == loaded.preprocessing.to_dict()
    assert float(meta["temperature"]) == 1.5 and meta["checkpoint_sha256"] == "ab" * 32
    assert engine.preprocessing == loaded.preprocessing and engine.classes == loaded.classes


# --------------------------------------------------------------------------- the cache beside the checkpoint
@pytest.fixture
def model_copy(tiny_classifier, tmp_path: Path) -> Path:
    """The tiny real checkpoint copied into this test's folder (its ONNX cache is written there)."""
    return Path(shutil.copy(tiny_classifier, tmp_path / "model.pt"))


@pytest.fixture
def count_exports(monkeypatch) -> list:
    calls: list = []
    real = fonnx.export_onnx

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(fonnx, "export_onnx", counting)
    return calls


def _images(n: int = 4) -> list[np.ndarray]:
    return [blob_image(100 + i, bright=i % 2 == 0) for i in range(n)]


def test_onnx_backend_exports_once_and_reuses_the_cache(model_copy: Path, count_exports: list) -> None:
    from fetalscan.fileio import sha256_file
    from fetalscan.models.checkpoint import load_checkpoint

    first = load_checkpoint(model_copy)
    p_onnx = fpredict.probabilities_of_arrays(first, _images(), backend="onnx")
    p_torch = fpredict.probabilities_of_arrays(first, _images(), backend="torch")
    np.testing.assert_allclose(p_onnx, p_torch, atol=1e-4)
    assert len(count_exports) == 1
    cache = fonnx.cache_path(model_copy, sha256_file(model_copy))
    assert cache.is_file() and cache.parent == model_copy.parent
    assert fonnx.read_metadata(cache)["checkpoint_sha256"] == sha256_file(model_copy)
    stamp = cache.stat().st_mtime_ns
    # the same model again: the session is kept; a new process (a fresh load) reads the cache
    fpredict.probabilities_of_arrays(first, _images(), backend="onnx")
    again = load_checkpoint(model_copy)
    np.testing.assert_array_equal(fpredict.probabilities_of_arrays(again, _images(), backend="onnx"), p_onnx)
    assert len(count_exports) == 1 and cache.stat().st_mtime_ns == stamp
    assert not [p for p in model_copy.parent.iterdir() if p.name.endswith(".tmp")]


def test_a_corrupt_cache_is_exported_again_with_a_message(model_copy: Path, count_exports: list, caplog) -> None:
    from fetalscan.fileio import sha256_file
    from fetalscan.models.checkpoint import load_checkpoint

    cache = fonnx.cache_path(model_copy, sha256_file(model_copy))
    cache.write_bytes(b"this is not an ONNX graph")
    loaded = load_checkpoint(model_copy)
    with caplog.at_level(logging.WARNING, logger="fetalscan.inference.onnx"):
        p = fpredict.probabilities_of_arrays(loaded, _images(), backend="onnx")
    assert len(count_exports) == 1
    assert any("unusable" in r.getMessage() and str(cache) in r.getMessage() for r in caplog.records)
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-9)
    assert fonnx.read_metadata(cache)["checkpoint_sha256"] == sha256_file(model_copy)  # repaired


def test_a_cache_of_another_checkpoint_is_not_used(model_copy: Path, count_exports: list, caplog) -> None:
    from fetalscan.fileio import sha256_file
    from fetalscan.models.checkpoint import load_checkpoint

    loaded = load_checkpoint(model_copy)
    cache = fonnx.cache_path(model_copy, sha256_file(model_copy))
    cache.write_bytes(fonnx.export_onnx(loaded, checkpoint_sha256="0" * 64))
    with caplog.at_level(logging.WARNING, logger="fetalscan.inference.onnx"):
        fpredict.probabilities_of_arrays(loaded, _images(2), backend="onnx")
    assert len(count_exports) == 2 and "unusable" in caplog.text


def test_backend_binding_auto_and_the_fallback_to_torch(model_copy: Path, monkeypatch, caplog) -> None:
    from fetalscan.models.checkpoint import load_checkpoint

    loaded = fpredict.use_backend(load_checkpoint(model_copy), "auto", "cpu")
    assert fpredict.backend_of(loaded) == "onnx"  # auto on a CPU
    assert fpredict.resolve_backend("auto", "cuda") == "torch"
    # a bound model: a prediction that names no backend runs on it, and callers agree exactly
    bound = fpredict.probabilities_of_arrays(loaded, _images())
    np.testing.assert_array_equal(bound, fpredict.probabilities_of_arrays(loaded, _images(), backend="onnx"))
    with pytest.raises(FetalscanError, match="backend must be one of"):
        fpredict.PredictConfig(backend="tensorrt").validate()

    def broken(*args, **kwargs):
        raise ModelError("the exporter does not know operator Foo")

    monkeypatch.setattr(fonnx, "cached_onnx", broken)
    other = load_checkpoint(model_copy)
    with caplog.at_level(logging.WARNING, logger="fetalscan.inference.predict"):
        p = fpredict.probabilities_of_arrays(other, _images(), backend="auto")
    assert "running it in PyTorch" in caplog.text and "operator Foo" in caplog.text
    np.testing.assert_array_equal(p, fpredict.probabilities_of_arrays(other, _images(), backend="torch"))
    with pytest.raises(FetalscanError, match="backend onnx"):
        fpredict.probabilities_of_arrays(load_checkpoint(model_copy), _images(), backend="onnx")


def test_predict_cli_onnx_equals_torch(model_copy: Path, tmp_path: Path, capsys) -> None:
    data = tmp_path / "scans"
    for i, img in enumerate(_images(5)):
        write_png(data / f"scan{i}.png", img)
    out = {}
    for backend in ("torch", "onnx"):
        assert main(["predict", "--model", str(model_copy), "--data", str(data), "--out", str(tmp_path / backend),
                     "--device", "cpu", "--backend", backend]) == 0
        out[backend] = pd.read_csv(tmp_path / backend / "predictions.csv")
    assert list(out["torch"]["path"]) == list(out["onnx"]["path"])
    cols = ["p_abnormal", "p_normal"]
    np.testing.assert_allclose(out["onnx"][cols], out["torch"][cols], atol=1e-4)
    assert main(["predict", "--model", str(model_copy), "--data", str(data), "--out", str(tmp_path / "bad"),
                 "--backend", "tensorrt"]) == 2
    assert "backend must be one of" in capsys.readouterr().err


# --------------------------------------------------------------------------- fetalscan export
def test_export_cli_writes_a_verified_graph_with_metadata(model_copy: Path, tmp_path: Path, capsys) -> None:
    from fetalscan.data.transforms import prepare
    from fetalscan.models.checkpoint import load_checkpoint

    out = tmp_path / "model.onnx"
    assert main(["export", "--model", str(model_copy), "--format", "onnx", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "max |difference|" in text and "ok" in text
    meta = fonnx.read_metadata(out)
    assert json.loads(meta["classes"]) == ["abnormal", "normal"] and meta["quantization"] == "none"
    assert json.loads(meta["preprocessing"])["input_size"] == [224, 288]
    loaded = load_checkpoint(model_copy)
    engine = fonnx.OnnxClassifier(out)
    batch = torch.stack([prepare(im, loaded.preprocessing) for im in _images()])
    p = fpredict.softmax_with_temperature(torch.from_numpy(engine.logits(batch)), engine.temperature)
    np.testing.assert_allclose(p, fpredict.probabilities_of_arrays(loaded, _images()), atol=1e-4)
    # an existing file is kept unless --overwrite
    assert main(["export", "--model", str(model_copy), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_export_refuses_a_graph_that_disagrees_with_pytorch(model_copy: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(fonnx, "verify_against_torch",
                        lambda *a, **k: {"max_abs_diff_probability": 3e-3, "max_abs_diff_logit": 1e-2, "n": 8})
    with pytest.raises(ModelError, match="disagrees with PyTorch by 3.00e-03"):
        fonnx.export_model(model_copy, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.slow
def test_int8_export_reports_the_auroc_change(model_copy: Path, tiny_classifier: Path, tmp_path: Path,
                                              capsys) -> None:
    manifest = tiny_classifier.parent / "manifest.csv"  # labelled images of the fixture
    out = tmp_path / "int8.onnx"
    assert main(["export", "--model", str(model_copy), "--quantize", "int8", "--check", str(manifest),
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "patient-level macro AUROC" in text and "change" in text and "int8" in text
    report = fonnx.export_model(model_copy, tmp_path / "again.onnx",
                                fonnx.ExportConfig(quantize="int8", check=manifest))
    a = report.auroc
    assert a["n_patients"] == 12 and a["n_images"] == 24
    assert 0.0 <= a["float32"] <= 1.0 and 0.0 <= a["int8"] <= 1.0
    assert a["change"] == pytest.approx(a["int8"] - a["float32"])
    assert fonnx.read_metadata(out)["quantization"].startswith("int8 dynamic")
    # without a check set the report says, loudly, that the change is unknown
    assert main(["export", "--model", str(model_copy), "--quantize", "int8", "--out", str(tmp_path / "q.onnx")]) == 0
    assert "NOT measured" in capsys.readouterr().err


@pytest.mark.slow
def test_static_int8_export_calibrates_and_runs(model_copy: Path, tiny_classifier: Path, tmp_path: Path) -> None:
    manifest = tiny_classifier.parent / "manifest.csv"
    report = fonnx.export_model(model_copy, tmp_path / "s.onnx",
                                fonnx.ExportConfig(quantize="int8-static", calibration=manifest, check=manifest))
    assert report.quantized_verify["n"] == 8 and "int8" in report.auroc
    assert fonnx.read_metadata(tmp_path / "s.onnx")["quantization"].startswith("int8 static")
    with pytest.raises(FetalscanError, match="calibrat"):
        fonnx.ExportConfig(quantize="int8-static").validate()


def test_physical_cores_is_positive_and_bounded() -> None:
    import os

    n = fonnx.physical_cores()
    assert 1 <= n <= (os.cpu_count() or 1)
    assert fonnx.session_options().intra_op_num_threads == n
