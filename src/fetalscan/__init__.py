"""fetalscan: AI-assisted detection of fetal anomalies in prenatal ultrasound.

A second reader, never a replacement for the clinician. The pipeline flows one way::

    manifest / folder / DICOM / video -> data -> splits -> models -> training
    -> inference (predictions.csv, patients.csv) -> evaluation -> explain -> report

The Python API (see :mod:`fetalscan.api`)::

    from fetalscan import load_dataset, Classifier, Study
    data = load_dataset("manifest.csv")
    result = Study(Classifier(backbone="sononet16"), folds=5).cross_validate(data)
    clf = Classifier().fit(data); clf.predict_proba(["scan.png"]); clf.save("model.pt")

The names are imported on first use, so ``import fetalscan`` stays cheap.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_API = {
    "Classifier": "fetalscan.api",
    "Study": "fetalscan.api",
    "load_dataset": "fetalscan.api",
    "run_study": "fetalscan.api",
    "PredictConfig": "fetalscan.inference.predict",
    "Prediction": "fetalscan.inference.predict",
    "predict": "fetalscan.inference.predict",
    "EvaluationConfig": "fetalscan.evaluation.config",
    "FetalscanError": "fetalscan.errors",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'fetalscan' has no attribute {name!r}")
