"""The Python API, in the scikit-learn style, for notebooks and scripts.

>>> from fetalscan import load_dataset, Classifier, Study          # doctest: +SKIP
>>> data = load_dataset("manifest.csv")                             # doctest: +SKIP
>>> result = Study(Classifier(backbone="sononet16"), folds=5).cross_validate(data)  # doctest: +SKIP
>>> result.patients.head()          # the patients.csv that `fetalscan cv` writes   # doctest: +SKIP
>>> clf = Classifier(backbone="sononet16", pretrained="sononet").fit(data)        # doctest: +SKIP
>>> clf.predict_proba(["scan1.png", "scan2.dcm"])   # (n_images, n_classes)         # doctest: +SKIP
>>> clf.save("model.pt"); Classifier.load("model.pt")                             # doctest: +SKIP

Every method calls the same library functions as the command line (``fetalscan cv``
is :func:`run_study`, ``fetalscan train`` is :func:`fetalscan.training.study.run_train`,
``fetalscan predict`` is :func:`fetalscan.inference.predict.predict_to_folder`), so a
notebook and the CLI give the same numbers for the same seed.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np

from fetalscan.data.records import Dataset, Record, load_dataset
from fetalscan.errors import DataError, FetalscanError
from fetalscan.evaluation.config import EvaluationConfig
from fetalscan.inference import predict as prediction_path
from fetalscan.inference.predict import PredictConfig, Prediction
from fetalscan.models.checkpoint import LoadedModel, load_checkpoint, save_loaded
from fetalscan.report.runs import evaluate_run
from fetalscan.runtime import resolve_device
from fetalscan.training.loop import TrainConfig
from fetalscan.training.study import CVConfig, CVResult, fit_final, run_cv, run_train

__all__ = ["Classifier", "Study", "load_dataset", "run_study", "run_demo", "embedded_sample"]


def _split_options(options: dict[str, Any], *classes: type) -> list[dict[str, Any]]:
    """Share keyword options out among dataclasses by field name; unknown names are an error."""
    names = [{f.name for f in fields(c)} for c in classes]
    parts: list[dict[str, Any]] = [{} for _ in classes]
    for key, value in options.items():
        for i, known in enumerate(names):
            if key in known:
                parts[i][key] = value
                break
        else:
            valid = sorted(set().union(*names))
            raise FetalscanError(f"unknown option {key!r}; valid options: {', '.join(valid)}")
    return parts


def _as_dataset(data: Dataset | str | Path | list, require_labels: bool = False) -> Dataset:
    """A dataset from a Dataset, a manifest / folder / image / DICOM / video path, or a list of paths."""
    if isinstance(data, Dataset):
        return data
    if isinstance(data, (str, Path)):
        return load_dataset(Path(data), require_labels=require_labels)
    if isinstance(data, (list, tuple)) and all(isinstance(p, (str, Path)) for p in data):
        records: list[Record] = []
        for p in data:
            records.extend(load_dataset(Path(p), require_labels=False).records)
        if not records:
            raise DataError("no images given")
        return Dataset(records, [], "images")
    raise DataError(f"expected a Dataset, a path or a list of paths, got {type(data).__name__}")


class Classifier:
    """A fetal-anomaly image classifier: backbone + head, trained leak-free on grouped data.

    Parameters
    ----------
    backbone : str
        ``sononet16`` (default, bundled in-domain weights), ``resnet34``, ``densenet169``,
        ``efficientnet_b0``, ``mobilenetv3_large_100``.
    pretrained : str
        ``sononet``, ``imagenet``, ``none`` or a weights file.
    mode : str
        ``cached`` (frozen backbone, head on cached embeddings) or ``finetune``.
    **options
        Any other :class:`~fetalscan.training.loop.TrainConfig` field (``seed``, ``epochs``,
        ``head``, ``device`` ...) or :class:`~fetalscan.training.study.CVConfig` field
        (``rare_classes``, ``normal_class`` ...).
    """

    def __init__(self, backbone: str = "sononet16", pretrained: str = "sononet", mode: str = "cached",
                 **options: Any) -> None:
        train_opts, cv_opts = _split_options(options, TrainConfig, CVConfig)
        self.config = TrainConfig(backbone=backbone, pretrained=pretrained, mode=mode, **train_opts)
        self.cv_config = CVConfig(**cv_opts)
        self.config.validate()
        self.cv_config.validate()
        self.model_: LoadedModel | None = None
        self.summary_: dict | None = None

    # ------------------------------------------------------------------ training
    def fit(self, dataset: Dataset | str | Path) -> Classifier:
        """Train on all of ``dataset``: C (or the epoch count) chosen by an inner grouped CV over its groups,
        then refitted on all of them (or the inner-fold models kept as an ensemble, ``ensemble=k``)."""
        final = fit_final(_as_dataset(dataset, require_labels=True), self.config, self.cv_config)
        self.model_, self.summary_ = final.loaded, final.summary
        return self

    # ------------------------------------------------------------------ inference
    def _loaded(self) -> LoadedModel:
        if self.model_ is None:
            raise FetalscanError("this Classifier is not trained yet: call fit(dataset) or Classifier.load(path)")
        return self.model_

    @property
    def classes_(self) -> list[str]:
        """Class names in the order of the probability columns."""
        return list(self._loaded().classes)

    def predict(self, data: Dataset | str | Path | list, config: PredictConfig | None = None) -> Prediction:
        """Image and patient tables (as ``fetalscan predict`` writes them) for a dataset or paths."""
        device = resolve_device(self.config.device)
        return prediction_path.predict(self._loaded(), _as_dataset(data), config, device)

    def predict_proba(self, images: Dataset | str | Path | list) -> np.ndarray:
        """Class probabilities ``(n_images, n_classes)``, temperature applied.

        ``images`` is a Dataset, a path (image, folder, manifest, DICOM, video), a list of
        paths, or a list of decoded RGB ``uint8`` arrays ``(H, W, 3)``.
        """
        device = resolve_device(self.config.device)
        if isinstance(images, (list, tuple)) and images and isinstance(images[0], np.ndarray):
            return prediction_path.probabilities_of_arrays(self._loaded(), images, device)
        return self.predict(images).probabilities

    # ------------------------------------------------------------------ files
    def save(self, path: str | Path) -> Path:
        """Write the model as one checkpoint file (the format ``fetalscan train`` writes)."""
        return save_loaded(path, self._loaded())

    @classmethod
    def load(cls, path: str | Path, device: str = "auto") -> Classifier:
        """A Classifier from a checkpoint written by :meth:`save` or ``fetalscan train``."""
        loaded = load_checkpoint(path, resolve_device(device))
        arch = loaded.architecture
        config = ((loaded.meta.get("training") or {}).get("config") or {})
        clf = cls(backbone=arch["backbone"], pretrained="none", mode=arch["mode"], head=arch["head"],
                  head_hidden=int(arch["head_hidden"]), drop_rate=float(arch["drop_rate"]),
                  ensemble=int(arch.get("ensemble") or 0), seed=int(config.get("seed", 0)), device=device)
        clf.model_ = loaded
        return clf

    def __repr__(self) -> str:
        state = f"trained, classes={self.model_.classes}" if self.model_ is not None else "not trained"
        return f"Classifier(backbone={self.config.backbone!r}, mode={self.config.mode!r}; {state})"


class Study:
    """A leak-free grouped cross-validation of a :class:`Classifier` recipe.

    Parameters
    ----------
    classifier : Classifier, optional
        The recipe to cross-validate (its training and class-policy options).
    evaluation : EvaluationConfig, optional
        How :meth:`run` evaluates the run (bootstrap resamples, subgroups, shortcut check).
    **cv_options
        :class:`~fetalscan.training.study.CVConfig` fields: ``scheme`` (``kfold`` or
        ``logo``), ``folds``, ``aggregate`` ...
    """

    def __init__(self, classifier: Classifier | None = None, *, evaluation: EvaluationConfig | None = None,
                 **cv_options: Any) -> None:
        self.classifier = classifier or Classifier()
        (cv_opts,) = _split_options(cv_options, CVConfig)
        base = {f.name: getattr(self.classifier.cv_config, f.name) for f in fields(CVConfig)}
        self.cv_config = CVConfig(**{**base, **cv_opts})
        self.cv_config.validate()
        self.evaluation = evaluation or EvaluationConfig(seed=self.classifier.config.seed)

    def cross_validate(self, dataset: Dataset | str | Path, out: str | Path | None = None,
                       overwrite: bool = False) -> CVResult:
        """Out-of-fold predictions: the tables ``fetalscan cv`` writes (written too when ``out`` is given)."""
        return run_cv(_as_dataset(dataset, require_labels=True), self.classifier.config, self.cv_config, out,
                      overwrite)

    def run(self, dataset: Dataset | str | Path, out: str | Path, overwrite: bool = False) -> dict:
        """:meth:`cross_validate` into ``out`` and evaluate it: ``report.html`` and ``metrics.json``."""
        return run_study(_as_dataset(dataset, require_labels=True), self.classifier.config, self.cv_config,
                         self.evaluation, out, overwrite)


def run_study(dataset: Dataset, cfg: TrainConfig, cv: CVConfig, evaluation: EvaluationConfig | None, out: str | Path,
              overwrite: bool = False) -> dict:
    """``fetalscan cv``: grouped cross-validation into ``out`` and its evaluation report.

    Returns the content of ``metrics.json``. Every configuration is validated before any work,
    so a bad evaluation option (``n_boot=0``) is refused before training, not after it.
    """
    evaluation = evaluation or EvaluationConfig(seed=cfg.seed)
    for config in (cfg, cv, evaluation):
        config.validate()
    result = run_cv(dataset, cfg, cv, out, overwrite)
    if result.out is None:  # a DDP rank other than 0: it trained, rank 0 writes and evaluates
        return result.metrics
    return evaluate_run(result.out, evaluation)


def embedded_sample() -> Path:
    """The manifest of the real sample shipped in ``examples/fetal_brain_sample/`` (a source checkout)."""
    here = Path(__file__).resolve()
    for root in (here.parents[2], Path.cwd()):
        cand = root / "examples" / "fetal_brain_sample" / "manifest.csv"
        if cand.is_file():
            return cand
    raise DataError("the embedded sample examples/fetal_brain_sample/manifest.csv was not found; "
                    "run from the repository root or give a manifest")


def run_demo(out: str | Path = "runs/demo", manifest: str | Path | None = None, *, seed: int = 0,
             device: str = "auto") -> tuple[dict, dict]:
    """``fetalscan demo``: a final model, then 5-fold grouped CV with its report and the model card, into ``out``.

    Returns ``(metrics, train_summary)``.
    """
    manifest = Path(manifest) if manifest is not None else embedded_sample()
    cfg, cv = TrainConfig(seed=seed, device=device), CVConfig()
    # the final model first, so that the run's report and model_card.md describe it
    summary = run_train(load_dataset(manifest), cfg, cv, out, overwrite=True)
    metrics = run_study(load_dataset(manifest), cfg, cv, EvaluationConfig(seed=seed), out, overwrite=True)
    return metrics, summary
