"""The one prediction path: a checkpoint and records -> image and patient tables.

:func:`predict` is what ``fetalscan predict``, ``fetalscan evaluate``, the Python API
(:class:`fetalscan.Classifier`) and the service call. It decodes every image once, in
chunks (so memory stays bounded on large archives), feeds the same decoded pixels to
the classifier and, when asked, to the SonoNet-16 standard-plane gate, applies the
model's temperature, and returns a :class:`Prediction` whose :meth:`Prediction.write`
is the single writer of ``predictions.csv`` / ``patients.csv`` (their columns are
documented in :mod:`fetalscan.inference.tables`).

The classifier runs on one of two backends (``PredictConfig.backend``): ``torch``
(PyTorch, the model as trained) or ``onnx`` (ONNX Runtime on the CPU, the graph exported
on first use and cached beside the checkpoint, :mod:`fetalscan.inference.onnx`); ``auto``
is ``onnx`` on a CPU device and ``torch`` on CUDA. Left unset, a model runs on the backend
:func:`use_backend` bound it to (the service does that once), else on ``torch`` -- so the
callers of one model share one backend and agree exactly.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from fetalscan.data.records import Dataset, Record, iter_record_images
from fetalscan.data.transforms import Preprocessing, normalize, prepare
from fetalscan.errors import DataError, FetalscanError
from fetalscan.inference.tables import (
    AGGREGATIONS,
    PLANE_COLUMNS,
    add_plane_columns,
    aggregate_groups,
    predictions_frame,
    write_prediction_files,
)
from fetalscan.progress import track

log = logging.getLogger(__name__)

#: Images decoded and held at once per chunk, as a multiple of the batch size.
CHUNK_BATCHES = 4

#: Inference engines of the classifier (``auto``: ``onnx`` on a CPU device, ``torch`` on CUDA).
BACKENDS = ("auto", "torch", "onnx")


@dataclass
class PredictConfig:
    """How a trained model is applied; the CLI maps its flags 1:1 onto these fields.

    ``aggregate`` is the patient-level rule (:mod:`fetalscan.inference.tables`),
    ``plane_check`` runs the SonoNet-16 plane gate on the same decoded images and flags
    (never drops) images that are not a brain plane; ``crop`` is the gate's
    scanner-frame crop (``auto``, ``none`` or ``x0,y0,x1,y1``). ``backend`` is the
    classifier's engine, ``torch``, ``onnx`` or ``auto`` (see the module docstring); ``None``
    (the default) = the backend the model was bound to with :func:`use_backend`, else ``torch``.
    ONNX Runtime agrees with PyTorch within 1e-4 in probability (checked at export), not bit
    for bit, so the default keeps PyTorch, whose numbers are those of ``fetalscan cv``.
    """

    aggregate: str = "mean"
    normal_class: str = "normal"
    batch_size: int = 32
    plane_check: bool = False
    crop: str = "auto"
    backend: str | None = None

    def validate(self) -> None:
        if self.backend is not None and self.backend not in BACKENDS:
            raise FetalscanError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.aggregate not in AGGREGATIONS:
            raise FetalscanError(f"aggregate must be one of {', '.join(AGGREGATIONS)}, got {self.aggregate!r}")
        if self.batch_size < 1:
            raise FetalscanError(f"batch_size must be at least 1, got {self.batch_size}")
        from fetalscan.quality.planes import parse_crop

        parse_crop(self.crop)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Prediction:
    """What :func:`predict` returns: the two tables and what the user should know about them."""

    images: pd.DataFrame
    patients: pd.DataFrame
    classes: list[str]
    unknown_labels: set[str] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)
    config: PredictConfig = field(default_factory=PredictConfig)
    #: With ``plane_check``: the plane gate's full reading of each image (rows of ``images``), for
    #: callers that need more than the table's columns (the service's quality score); not written.
    planes: list | None = None

    @property
    def probabilities(self) -> np.ndarray:
        """Image-level class probabilities, ``(n_images, n_classes)`` in class order."""
        return self.images[[f"p_{c}" for c in self.classes]].to_numpy(dtype=np.float64)

    def write(self, out: str | Path, prefix: str = "") -> tuple[Path, Path]:
        """Write ``predictions.csv`` and ``patients.csv`` atomically into ``out`` (which must exist)."""
        return write_prediction_files(Path(out), self.images, self.patients, prefix=prefix)


def predict(loaded, dataset: Dataset, config: PredictConfig | None = None,
            device: torch.device | str = "cpu", *, aggregate_patients: bool = True) -> Prediction:
    """Apply a loaded checkpoint to every record of ``dataset``.

    Parameters
    ----------
    loaded : fetalscan.models.checkpoint.LoadedModel
        From :func:`fetalscan.models.checkpoint.load_checkpoint`.
    dataset : fetalscan.data.records.Dataset
        Labelled or not. Labels the model does not know (after its ``class_map``)
        are kept only in ``label_original`` and reported in ``unknown_labels``.
    config : PredictConfig, optional
    device : torch.device or str
    aggregate_patients : bool
        ``False``: leave ``patients`` empty (:mod:`fetalscan.inference.batch` calls this
        function on chunks of an archive and aggregates the groups once, at the end).

    Returns
    -------
    Prediction
        ``images`` (rows of ``predictions.csv``) and ``patients`` (``patients.csv``).
    """
    cfg = config or PredictConfig()
    cfg.validate()
    if cfg.aggregate == "max_abnormal" and cfg.normal_class not in loaded.classes:
        raise FetalscanError(f"the max_abnormal rule needs the normal class {cfg.normal_class!r}, which is not "
                             f"one of the model's classes {loaded.classes}; name it with normal_class")
    device = torch.device(device)
    data, unknown = labels_for_model(dataset, loaded.classes, loaded.class_map)
    probs, planes = predict_probabilities(loaded, data.records, device, cfg.batch_size,
                                          plane_crop=cfg.crop if cfg.plane_check else None, backend=cfg.backend)
    images = predictions_frame(data.records, probs, loaded.classes)
    notes = []
    if unknown:
        notes.append(f"label(s) {sorted(unknown)} are not classes of the model; left empty in 'label' "
                     "(kept in 'label_original')")
    if planes is not None:
        images = add_plane_columns(images, planes)
        notes.extend(_plane_notes(images))
    patients = (aggregate_groups(images, loaded.classes, cfg.aggregate, cfg.normal_class) if aggregate_patients
                else pd.DataFrame())
    return Prediction(images, patients, list(loaded.classes), unknown, notes, cfg, planes)


def _plane_notes(images: pd.DataFrame) -> list[str]:
    off = images.loc[~images[PLANE_COLUMNS[2]].astype(bool)]
    if not len(off):
        return []
    # one entry per file: a cine's frames are named once, with how many of them are off-plane
    parts = []
    for path, rows in off.groupby(off["path"].astype(str), sort=False):
        n_file = int((images["path"].astype(str) == path).sum())
        planes = rows["plane"].astype(str).value_counts()
        if n_file > 1:
            what = ", ".join(f"{pl} x{k}" for pl, k in planes.items())
            parts.append(f"{Path(path).name} ({len(rows)} of {n_file} frames: {what})")
        else:
            parts.append(f"{Path(path).name} ({rows['plane'].iloc[0]}, {rows['plane_confidence'].iloc[0]:.2f})")
    shown = ", ".join(parts[:5])
    return [f"{len(off)} of {len(images)} image(s) do not look like a brain plane (SonoNet-16): "
            f"{shown}{', ...' if len(parts) > 5 else ''}; their predictions are kept and flagged "
            "in the 'brain_plane' column: read them with care."]


def probabilities_of_arrays(loaded, images: Sequence[np.ndarray], device: torch.device | str = "cpu",
                            batch_size: int = 32, backend: str | None = None) -> np.ndarray:
    """Class probabilities (temperature applied) of decoded RGB ``uint8`` images ``(H, W, 3)``
    (or grey ``(H, W)``), on ``backend`` (see :class:`PredictConfig`)."""
    if not len(images):
        return np.zeros((0, len(loaded.classes)))
    pre = loaded.preprocessing
    for i, a in enumerate(images):
        if not isinstance(a, np.ndarray) or a.dtype != np.uint8 or a.ndim not in (2, 3):
            raise DataError(f"image {i}: expected a uint8 array (H, W) or (H, W, 3), got "
                            f"{getattr(a, 'dtype', type(a).__name__)} {getattr(a, 'shape', '')}")
    x = torch.stack([prepare(a if a.ndim == 3 else np.repeat(a[..., None], 3, axis=2), pre) for a in images])
    return probabilities_of_prepared(loaded, x, device, batch_size, backend)


def probabilities_of_prepared(loaded, batch: torch.Tensor, device: torch.device | str = "cpu",
                              batch_size: int = 32, backend: str | None = None) -> np.ndarray:
    """Class probabilities of a prepared ``uint8`` batch ``(n, C, h, w)``
    (:func:`~fetalscan.data.transforms.prepare`), on ``backend`` (see :class:`PredictConfig`)."""
    device = torch.device(device)
    engine = engine_for(loaded, backend, device)
    if engine is not None:
        logits = torch.from_numpy(engine.logits(batch, batch_size))
    else:
        logits = predict_logits(loaded.model, batch, loaded.preprocessing, device, batch_size)
    return softmax_with_temperature(logits, loaded.temperature)


# --------------------------------------------------------------------------- backends
#: ONNX Runtime engines per model object (``False``: the export failed, PyTorch is used).
_ENGINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_ENGINES_LOCK = threading.RLock()


def resolve_backend(backend: str | None, device: torch.device | str = "cpu") -> str:
    """``torch`` or ``onnx`` for a requested backend on ``device`` (``auto``: onnx on CPU, torch on CUDA)."""
    backend = backend or "torch"
    if backend not in BACKENDS:
        raise FetalscanError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        return "onnx" if torch.device(device).type == "cpu" else "torch"
    return backend


def use_backend(loaded, backend: str = "auto", device: torch.device | str = "cpu", *, export_now: bool = False):
    """Bind ``loaded`` to ``backend``: every later prediction of it that does not name a backend
    runs there (so all callers of one served model agree exactly); returns ``loaded``.
    The ONNX Runtime session is made on first use, or now with ``export_now``."""
    resolve_backend(backend, device)
    loaded.meta["backend"] = backend
    if export_now:
        engine_for(loaded, None, device)
    return loaded


def backend_of(loaded, backend: str | None = None, device: torch.device | str = "cpu") -> str:
    """The engine a prediction of ``loaded`` actually runs on: ``torch`` or ``onnx``."""
    return "onnx" if engine_for(loaded, backend, device) is not None else "torch"


def engine_for(loaded, backend: str | None, device: torch.device | str = "cpu"):
    """The :class:`~fetalscan.inference.onnx.OnnxClassifier` a prediction uses, or ``None`` for PyTorch.

    ``backend`` ``None`` = the model's bound backend (:func:`use_backend`), else ``torch``.
    The session is made once per model object, from the cache beside the checkpoint
    (``loaded.meta["file"]``) when the model came from a file. When the export fails,
    ``auto`` falls back to PyTorch with a logged reason; an explicit ``onnx`` raises.
    """
    requested = backend or loaded.meta.get("backend") or "torch"
    if resolve_backend(requested, device) == "torch":
        return None
    with _ENGINES_LOCK:  # one export per model, also when two requests arrive at once
        engine = _ENGINES.get(loaded.model)
        if engine is None:
            from fetalscan.inference.onnx import cached_onnx

            try:
                engine = cached_onnx(loaded, loaded.meta.get("file"))
            except (FetalscanError, ImportError, OSError, RuntimeError) as exc:
                if requested == "onnx":
                    raise FetalscanError(f"backend onnx: {exc}") from exc
                log.warning("ONNX Runtime is not used for this model (%s); running it in PyTorch", exc)
                engine = False
            _ENGINES[loaded.model] = engine
    if engine is False:
        if requested == "onnx":
            raise FetalscanError("backend onnx: the ONNX export of this model failed earlier (see the log); "
                                 "use backend torch")
        return None
    return engine


def predict_to_folder(model: str | Path, dataset: Dataset, out: str | Path, config: PredictConfig | None = None, *,
                      device: torch.device | str = "cpu", overwrite: bool = False) -> Prediction:
    """``fetalscan predict``: load ``model``, :func:`predict`, write ``predictions.csv`` and ``patients.csv``.

    ``out`` is checked before any work (refused when not empty unless ``overwrite``)
    and created only when the predictions exist, so a failed run writes nothing.
    This holds every row in memory until the end; ``fetalscan predict`` on a folder (or with
    ``--resume`` / ``--shard`` / ``--engine ray``) streams instead, through
    :func:`fetalscan.inference.batch.predict_archive`, which calls :func:`predict` on chunks.
    """
    from fetalscan.fileio import check_out_dir, prepare_out_dir
    from fetalscan.models.checkpoint import load_checkpoint

    cfg = config or PredictConfig()
    cfg.validate()
    out = check_out_dir(out, overwrite)
    loaded = load_checkpoint(model, device)
    prediction = predict(loaded, dataset, cfg, device)
    prediction.write(prepare_out_dir(out, overwrite=True))
    return prediction


def predict_probabilities(loaded, records: Sequence[Record], device: torch.device | str = "cpu",
                          batch_size: int = 32, *, plane_crop: str | None = None,
                          description: str = "predicting", backend: str | None = None
                          ) -> tuple[np.ndarray, list | None]:
    """Class probabilities (temperature applied) of every record; each image decoded once.

    With ``plane_crop`` (``auto``, ``none`` or ``x0,y0,x1,y1``) the SonoNet-16 plane
    gate reads the same decoded images and its :class:`~fetalscan.quality.planes.PlaneResult`
    list is returned second (else ``None``). Images are decoded in chunks of
    ``CHUNK_BATCHES * batch_size``, so memory does not grow with the number of records.
    """
    from fetalscan.quality.planes import classify_planes, parse_crop

    device = torch.device(device)
    n = len(records)
    probs = np.zeros((n, len(loaded.classes)), dtype=np.float64)
    planes: list | None = [None] * n if plane_crop is not None else None
    crop = parse_crop(plane_crop) if plane_crop is not None else None
    chunk = max(1, CHUNK_BATCHES * batch_size)
    index: list[int] = []
    arrays: list[np.ndarray] = []

    def flush() -> None:
        probs[index] = probabilities_of_arrays(loaded, arrays, device, batch_size, backend)
        if planes is not None:
            for i, res in zip(index, classify_planes(arrays, device, crop=crop)):
                planes[i] = res
        index.clear()
        arrays.clear()

    for i, image in track(iter_record_images(records), description, total=n):
        index.append(i)
        arrays.append(image)
        if len(arrays) >= chunk:
            flush()
    if arrays:
        flush()
    return probs, planes


def softmax_with_temperature(logits: torch.Tensor, temperature: float = 1.0) -> np.ndarray:
    """Class probabilities ``softmax(logits / T)`` as float64 NumPy."""
    if temperature <= 0:
        raise FetalscanError(f"temperature must be positive, got {temperature}")
    return torch.softmax(logits.double() / temperature, dim=1).numpy()








def labels_for_model(dataset: Dataset, classes: Sequence[str], class_map: dict[str, str]) -> tuple[Dataset, set[str]]:
    """Map a dataset's labels into a model's classes (through its ``class_map``).

    Returns the relabelled dataset and the set of labels the model does not know;
    those records keep their label only in ``label_original`` (``label`` empty), so
    no later metric silently scores a class the model cannot output.
    """
    from dataclasses import replace

    unknown: set[str] = set()
    records = []
    for r in dataset.records:
        if r.label is None:
            records.append(r)
            continue
        mapped: str | None = class_map.get(r.label, r.label)
        if mapped not in classes:
            unknown.add(r.label)
            mapped = None
        records.append(replace(r, label=mapped, label_original=r.label))
    return Dataset(records, list(classes), dataset.source, list(dataset.notes), dict(dataset.loading)), unknown






def _autocast(device: torch.device, amp: bool):
    if device.type == "cuda" and amp:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


@torch.inference_mode()
def predict_logits(
    model: nn.Module, images: torch.Tensor, pre: Preprocessing, device: torch.device,
    batch_size: int = 32, amp: bool = True,
) -> torch.Tensor:
    """Logits of a prepared uint8 batch, computed in evaluation mode (float32 on CPU)."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = normalize(images[start:start + batch_size].to(device), pre)
        with _autocast(device, amp):
            out.append(model(x).float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


@torch.inference_mode()
def compute_embeddings(
    model: nn.Module, images: torch.Tensor, pre: Preprocessing, device: torch.device,
    batch_size: int = 32, amp: bool = True, description: str = "embedding images",
) -> torch.Tensor:
    """Pooled backbone embeddings (``forward_head(pre_logits=True)``) of prepared images."""
    model.eval()
    out = []
    starts = range(0, len(images), batch_size)
    for start in track(starts, description, total=len(starts)):
        x = normalize(images[start:start + batch_size].to(device), pre)
        with _autocast(device, amp):
            f = model.forward_head(model.forward_features(x), pre_logits=True)
        out.append(f.float().cpu())
    return torch.cat(out) if out else torch.empty(0)
