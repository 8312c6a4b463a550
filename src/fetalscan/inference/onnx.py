"""ONNX export of a classifier and ONNX Runtime inference (the fast CPU path).

A classifier checkpoint (backbone + head, :class:`~fetalscan.models.checkpoint.LoadedModel`)
becomes one ONNX graph whose input is the *prepared* image batch, ``uint8 (batch, C, h, w)``
as :func:`fetalscan.data.transforms.prepare` makes it, and whose output are the logits; the
normalisation (ImageNet mean/std or SonoNet's per-image standardisation) is inside the graph,
so a user of the file needs only the resize. The graph's ``metadata_props`` say everything
else: classes, preprocessing, temperature, the checkpoint's SHA-256, the fetalscan version
(keys under :data:`META_PREFIX`; see :func:`read_metadata`).

:class:`OnnxClassifier` runs such a graph with ONNX Runtime on the CPU (intra-op threads =
physical cores, all graph optimisations). :func:`cached_onnx` is what the prediction path's
``backend="onnx"`` / ``"auto"`` uses: the graph is exported on first use and cached beside
the checkpoint as ``<checkpoint>.<sha256[:16]>.onnx`` (written atomically, so two processes
exporting at once leave one complete file; a corrupt or stale cache file is exported again,
with a logged message). :func:`export_model` is ``fetalscan export``: export, verification
against PyTorch, optional int8 quantisation and its measured effect on patient-level AUROC.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fetalscan import __version__
from fetalscan.data.transforms import Preprocessing, normalize
from fetalscan.errors import FetalscanError, ModelError

log = logging.getLogger(__name__)

#: ONNX opset of the exported graphs.
OPSET = 17

#: Names of the graph's input and output.
INPUT_NAME = "image"
OUTPUT_NAME = "logits"

#: Prefix of fetalscan's keys in the graph's ``metadata_props``.
META_PREFIX = "fetalscan."

#: What fetalscan writes (``fetalscan.format``) and its version; a cache of another version is re-exported.
ONNX_FORMAT = "fetalscan-classifier-onnx"
ONNX_FORMAT_VERSION = 1

#: Largest difference in probability between ONNX Runtime and PyTorch a float32 export may show.
FLOAT32_TOLERANCE = 1e-4

#: Quantisation choices of :class:`ExportConfig`.
QUANTIZE = ("none", "int8", "int8-static")


# --------------------------------------------------------------------------- threads, sessions
def physical_cores() -> int:
    """Physical CPU cores this process may use (hyper-threads not counted); at least 1.

    Read from ``/proc/cpuinfo`` (pairs of ``physical id`` / ``core id``), bounded by the
    CPU affinity mask; falls back to ``os.cpu_count()`` where that file does not exist.
    """
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cores: set[tuple[str, str]] = set()
    with contextlib.suppress(OSError):
        phys = core = ""
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "physical id":
                phys = value.strip()
            elif key == "core id":
                core = value.strip()
            elif not line.strip() and core:
                cores.add((phys, core))
                phys = core = ""
        if core:
            cores.add((phys, core))
    n = len(cores) if cores else logical
    return max(1, min(n, logical))


def session_options(threads: int | None = None):
    """ONNX Runtime options of every fetalscan session: ``threads`` (default: physical cores)
    intra-op threads, one inter-op thread, sequential execution, all graph optimisations."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads or physical_cores())
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return opts


# --------------------------------------------------------------------------- export
class NormalizedClassifier(nn.Module):
    """``model(normalize(x))`` for a prepared ``uint8`` batch: what the ONNX graph computes."""

    def __init__(self, model: nn.Module, pre: Preprocessing) -> None:
        super().__init__()
        self.model = model
        self.pre = pre

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(normalize(x, self.pre)).float()


def example_batch(pre: Preprocessing, n: int = 4, seed: int = 0) -> np.ndarray:
    """A seeded batch of prepared ``uint8`` images ``(n, C, h, w)``: smooth blobs plus speckle,
    so that normalisation and the network see ultrasound-like statistics, not a constant."""
    rng = np.random.default_rng(seed)
    h, w = pre.input_size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = np.empty((n, pre.channels, h, w), dtype=np.uint8)
    for i in range(n):
        cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
        r = rng.uniform(0.15, 0.35) * min(h, w)
        blob = 60 + 140 * np.exp(-(((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r)))
        for c in range(pre.channels):
            out[i, c] = np.clip(blob * rng.gamma(4.0, 0.25, size=(h, w)), 0, 255).astype(np.uint8)
    return out


def _cpu_copy(model: nn.Module) -> nn.Module:
    """The model on the CPU in eval mode (a copy when it lives elsewhere; the caller's is not changed)."""
    import copy

    first = next(model.parameters(), None)
    if first is not None and first.device.type != "cpu":
        model = copy.deepcopy(model).cpu()
    return model


def export_onnx(loaded, *, checkpoint_sha256: str = "", opset: int = OPSET) -> bytes:
    """The ONNX graph (bytes) of a loaded classifier, normalisation included, with metadata.

    Input ``image``: ``uint8 (batch, C, h, w)`` prepared by :func:`fetalscan.data.transforms.prepare`
    at ``loaded.preprocessing.input_size``; output ``logits``: ``float32 (batch, n_classes)``;
    probabilities are ``softmax(logits / temperature)``. The batch axis is dynamic. The
    model's train/eval state is restored afterwards.
    """
    import onnx

    pre = loaded.preprocessing
    model = _cpu_copy(loaded.model)
    was_training = model.training
    model.eval()
    wrapper = NormalizedClassifier(model, pre).eval()
    dummy = torch.from_numpy(example_batch(pre, 2))
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapper, (dummy,), buf, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                              opset_version=opset, do_constant_folding=True, dynamo=False)
    except Exception as exc:  # noqa: BLE001 - the exporter raises many types for unsupported operators
        raise ModelError(f"the {loaded.architecture.get('backbone')!r} classifier cannot be exported to ONNX: "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    finally:
        model.train(was_training)
    proto = onnx.load_from_string(buf.getvalue())
    meta = {
        "format": ONNX_FORMAT,
        "format_version": str(ONNX_FORMAT_VERSION),
        "fetalscan_version": __version__,
        "checkpoint_sha256": checkpoint_sha256,
        "classes": json.dumps(list(loaded.classes)),
        "class_map": json.dumps(loaded.class_map),
        "preprocessing": json.dumps(pre.to_dict()),
        "temperature": repr(float(loaded.temperature)),
        "architecture": json.dumps(loaded.architecture, default=str),
        "input": "uint8 (batch, C, h, w): the RGB image resized to preprocessing.input_size by "
                 "fetalscan.data.transforms.prepare (antialiased bilinear; 1 channel = mean of RGB); "
                 "normalisation is inside the graph",
        "output": "logits (batch, n_classes) in the order of 'classes'; probabilities = softmax(logits / temperature)",
        "quantization": "none",
    }
    set_metadata(proto, meta)
    proto.doc_string = ("fetalscan classifier. It supports, and never replaces, the clinician's reading; "
                        "it is not a medical device.")
    return proto.SerializeToString()


def set_metadata(proto, values: dict[str, str]) -> None:
    """Set fetalscan's ``metadata_props`` (keys prefixed with :data:`META_PREFIX`) on an ONNX model proto."""
    keep = [p for p in proto.metadata_props if p.key not in {META_PREFIX + k for k in values}]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    for key, value in values.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = META_PREFIX + key, str(value)


def read_metadata(model: str | Path | bytes) -> dict[str, str]:
    """fetalscan's metadata of an ONNX file or bytes (prefix stripped); empty when it has none."""
    import onnx

    proto = (onnx.load_from_string(model) if isinstance(model, bytes)
             else onnx.load(str(model), load_external_data=False))
    return {p.key[len(META_PREFIX):]: p.value for p in proto.metadata_props if p.key.startswith(META_PREFIX)}


# --------------------------------------------------------------------------- running
class OnnxClassifier:
    """An exported classifier in an ONNX Runtime CPU session.

    Parameters
    ----------
    model : bytes or path
        The ONNX graph (from :func:`export_onnx` or ``fetalscan export``).
    threads : int, optional
        Intra-op threads (default: physical cores).
    source : str
        What to call it in messages (a file name, "in memory").
    """

    def __init__(self, model: bytes | str | Path, threads: int | None = None, source: str = "") -> None:
        import onnxruntime as ort

        self.source = source or (str(model) if not isinstance(model, bytes) else "in memory")
        data = model if isinstance(model, bytes) else Path(model).read_bytes()
        self.session = ort.InferenceSession(data, session_options(threads), providers=["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        self.metadata = {k[len(META_PREFIX):]: v for k, v in meta.items() if k.startswith(META_PREFIX)}
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or inputs[0].name != INPUT_NAME:
            raise ModelError(f"{self.source}: not a fetalscan classifier graph (input {[i.name for i in inputs]}, "
                             f"expected one input {INPUT_NAME!r})")

    @property
    def classes(self) -> list[str]:
        return list(json.loads(self.metadata.get("classes", "[]")))

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing.from_dict(json.loads(self.metadata["preprocessing"]))

    @property
    def temperature(self) -> float:
        return float(self.metadata.get("temperature", "1.0"))

    def logits(self, batch: np.ndarray | torch.Tensor, batch_size: int = 32) -> np.ndarray:
        """Logits ``float32 (n, n_classes)`` of a prepared ``uint8`` batch ``(n, C, h, w)``."""
        x = batch.numpy() if isinstance(batch, torch.Tensor) else np.asarray(batch)
        if x.dtype != np.uint8:
            x = np.clip(np.rint(x), 0, 255).astype(np.uint8)
        x = np.ascontiguousarray(x)
        out = [self.session.run([OUTPUT_NAME], {INPUT_NAME: x[s:s + batch_size]})[0]
               for s in range(0, len(x), max(1, batch_size))]
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, len(self.classes)), np.float32)


# --------------------------------------------------------------------------- cache beside the checkpoint
def cache_path(checkpoint: str | Path, sha256: str) -> Path:
    """Where the ONNX graph of ``checkpoint`` is cached: ``<checkpoint>.<sha256[:16]>.onnx`` beside it."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(f"{checkpoint.name}.{sha256[:16]}.onnx")


def torch_logits(loaded, batch: np.ndarray, batch_size: int = 32) -> torch.Tensor:
    """PyTorch's logits (float32, evaluation mode, CPU) of a prepared ``uint8`` batch: the reference
    (as :func:`fetalscan.inference.predict.predict_logits` computes them; the model's state is restored)."""
    model = _cpu_copy(loaded.model)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch))
            out = [model(normalize(x[s:s + batch_size], loaded.preprocessing)).float()
                   for s in range(0, len(x), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def probabilities(logits: torch.Tensor | np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """``softmax(logits / temperature)`` in float64 (as the prediction path computes it)."""
    x = torch.as_tensor(logits).double() / float(temperature)
    return torch.softmax(x, dim=1).numpy()


def verify_against_torch(loaded, engine: OnnxClassifier, batch: np.ndarray) -> dict:
    """Largest absolute differences between ONNX Runtime and PyTorch (float32, eval mode) on ``batch``:
    ``{"max_abs_diff_probability", "max_abs_diff_logit", "n"}``."""
    ref = torch_logits(loaded, batch)
    got = torch.from_numpy(engine.logits(batch))
    p_ref = probabilities(ref, loaded.temperature)
    p_got = probabilities(got, loaded.temperature)
    return {"max_abs_diff_probability": float(np.max(np.abs(p_ref - p_got))) if len(batch) else 0.0,
            "max_abs_diff_logit": float((ref - got).abs().max()) if len(batch) else 0.0, "n": int(len(batch))}


def cached_onnx(loaded, checkpoint: str | Path | None = None, *, threads: int | None = None,
                verify: bool = True) -> OnnxClassifier:
    """The ONNX Runtime session of a loaded classifier, exported once and cached beside its checkpoint.

    With ``checkpoint`` (the file ``loaded`` came from) the graph is looked up at
    :func:`cache_path`; a cache file that cannot be opened, or that belongs to another
    checkpoint or format version, is exported again (logged at WARNING). A new export is
    checked against PyTorch on a seeded batch (refused above :data:`FLOAT32_TOLERANCE`) and
    written atomically (temporary file, then rename); a folder that cannot be written keeps
    the graph in memory only. Without ``checkpoint`` the graph lives in memory only.

    Raises :class:`~fetalscan.errors.ModelError` when the model cannot be exported or the
    export disagrees with PyTorch.
    """
    from fetalscan.fileio import sha256_file, write_bytes

    sha = sha256_file(checkpoint) if checkpoint is not None else ""
    target = cache_path(checkpoint, sha) if checkpoint is not None else None
    if target is not None and target.is_file():
        try:
            engine = OnnxClassifier(target, threads, source=str(target))
            meta = engine.metadata
            if meta.get("checkpoint_sha256") != sha or meta.get("format_version") != str(ONNX_FORMAT_VERSION) \
                    or meta.get("format") != ONNX_FORMAT:
                raise ModelError(f"it belongs to checkpoint {meta.get('checkpoint_sha256', '?')[:16]} / format "
                                 f"version {meta.get('format_version')}")
            return engine
        except Exception as exc:  # noqa: BLE001 - ORT raises its own types for a corrupt file
            log.warning("ONNX cache %s is unusable (%s); exporting the model again", target,
                        str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    data = export_onnx(loaded, checkpoint_sha256=sha)
    engine = OnnxClassifier(data, threads, source=str(target) if target else "in memory")
    if verify:
        check = verify_against_torch(loaded, engine, example_batch(loaded.preprocessing, 2))
        if check["max_abs_diff_probability"] > FLOAT32_TOLERANCE:
            raise ModelError(f"the ONNX export of {checkpoint or 'the model'} disagrees with PyTorch by "
                             f"{check['max_abs_diff_probability']:.2e} in probability (tolerance "
                             f"{FLOAT32_TOLERANCE:.0e})")
    if target is not None:
        try:
            write_bytes(target, data)
            log.info("exported %s to ONNX: %s", checkpoint, target)
        except OSError as exc:
            log.warning("cannot write the ONNX cache %s (%s); keeping it in memory", target, exc)
    return engine


# --------------------------------------------------------------------------- fetalscan export
@dataclass
class ExportConfig:
    """``fetalscan export``: how a checkpoint becomes an ONNX file.

    ``quantize``: ``none`` (float32), ``int8`` (dynamic: int8 weights, activations
    quantised at run time) or ``int8-static`` (QDQ, weights and activations int8, ranges
    calibrated on ``calibration`` images). ``check``: a labelled manifest on which the
    exported model's patient-level macro AUROC is measured (and the int8 model's, with the
    change). ``verify_batch``: images (from ``check`` when given, else seeded synthetic
    ones) on which ONNX Runtime is compared with PyTorch.
    """

    format: str = "onnx"
    quantize: str = "none"
    check: Path | None = None
    calibration: Path | None = None
    calibration_images: int = 64
    verify_batch: int = 8
    opset: int = OPSET
    aggregate: str = "mean"
    batch_size: int = 32

    def validate(self) -> None:
        if self.format != "onnx":
            raise FetalscanError(f"format must be 'onnx' (the only export format), got {self.format!r}")
        if self.quantize not in QUANTIZE:
            raise FetalscanError(f"quantize must be one of {', '.join(QUANTIZE)}, got {self.quantize!r}")
        if self.quantize == "int8-static" and self.calibration is None and self.check is None:
            raise FetalscanError("quantize int8-static needs images to calibrate the activation ranges: "
                                 "give calibration (a manifest or folder; default: the check set)")
        if self.verify_batch < 1 or self.calibration_images < 1 or self.batch_size < 1:
            raise FetalscanError("verify_batch, calibration_images and batch_size must be at least 1")


@dataclass
class ExportReport:
    """What :func:`export_model` did and measured (``fetalscan export`` prints it)."""

    out: Path
    size_bytes: int
    quantize: str
    checkpoint_sha256: str
    verify: dict
    quantized_verify: dict | None = None
    auroc: dict | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["out"] = str(self.out)
        return d


def export_model(checkpoint: str | Path, out: str | Path, config: ExportConfig | None = None, *,
                 overwrite: bool = False) -> ExportReport:
    """``fetalscan export``: the ONNX file of a classifier checkpoint, verified, optionally int8.

    1. Export (normalisation and metadata included, :func:`export_onnx`).
    2. Verify against PyTorch on a batch: the largest probability difference is reported
       and the float32 graph is refused above :data:`FLOAT32_TOLERANCE`.
    3. ``quantize``: quantise and report its difference to PyTorch on the same batch (no
       tolerance: int8 changes outputs); with ``check``, the patient-level macro AUROC of
       the float32 and the int8 graph on that labelled set and the change. Without
       ``check`` the report says that the change was not measured.
    4. Write ``out`` atomically (refused when it exists, unless ``overwrite``).
    """
    from fetalscan.fileio import sha256_file, write_bytes
    from fetalscan.models.checkpoint import load_checkpoint

    cfg = config or ExportConfig()
    cfg.validate()
    out = Path(out)
    if out.exists() and not overwrite:
        raise FetalscanError(f"--out {out} exists; choose another file or pass --overwrite")
    sha = sha256_file(checkpoint)
    loaded = load_checkpoint(checkpoint, "cpu")
    data = export_onnx(loaded, checkpoint_sha256=sha, opset=cfg.opset)
    engine = OnnxClassifier(data, source=str(out))
    check_set = _check_images(loaded, cfg.check) if cfg.check else None
    batch = check_set[0][: cfg.verify_batch] if check_set is not None else example_batch(
        loaded.preprocessing, cfg.verify_batch)
    verify = verify_against_torch(loaded, engine, batch)
    if verify["max_abs_diff_probability"] > FLOAT32_TOLERANCE:
        raise ModelError(f"{checkpoint}: the ONNX graph disagrees with PyTorch by "
                         f"{verify['max_abs_diff_probability']:.2e} "
                         f"in probability on {verify['n']} images (float32 tolerance {FLOAT32_TOLERANCE:.0e}); "
                         "not written")
    report = ExportReport(out, 0, cfg.quantize, sha, verify)
    if cfg.quantize != "none":
        calib = None
        if cfg.quantize == "int8-static":
            source = cfg.calibration or cfg.check
            calib = _prepared_images(loaded, source, cfg.calibration_images)
            if cfg.calibration is None:
                report.notes.append(f"int8-static ranges were calibrated on images of the check set {cfg.check} "
                                    "(no labels used); pass calibration with other images for an unbiased check")
        qdata = quantize_onnx(data, cfg.quantize, calib)
        qengine = OnnxClassifier(qdata, source=str(out))
        report.quantized_verify = verify_against_torch(loaded, qengine, batch)
        if check_set is not None:
            report.auroc = auroc_change(loaded, engine, qengine, check_set, cfg)
        else:
            report.notes.append("the change in AUROC caused by int8 quantisation was NOT measured: pass "
                                "--check MANIFEST (labelled images) to measure it before using this file")
        data = qdata
    elif check_set is not None:
        report.auroc = auroc_change(loaded, engine, None, check_set, cfg)
    write_bytes(out, data)
    report.size_bytes = len(data)
    return report


def quantize_onnx(data: bytes, mode: str, calibration: np.ndarray | None = None) -> bytes:
    """Quantise an exported graph to int8: ``int8`` (dynamic) or ``int8-static`` (QDQ, per-channel
    weights, activation ranges from ``calibration``, prepared ``uint8`` images)."""
    import onnx
    from onnxruntime import quantization as q

    meta = {p.key: p.value for p in onnx.load_from_string(data).metadata_props}
    with tempfile.TemporaryDirectory(prefix="fetalscan-quant-") as tmp:
        src, pre, dst = Path(tmp) / "float.onnx", Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(data)
        try:
            q.quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        except Exception as exc:  # noqa: BLE001 - optional optimisation step
            log.info("quantisation pre-processing skipped (%s)", exc)
            pre = src
        with warnings.catch_warnings(), _quiet_root_logger():
            warnings.simplefilter("ignore")
            if mode == "int8":
                q.quantize_dynamic(str(pre), str(dst), weight_type=q.QuantType.QInt8)
            elif mode == "int8-static":
                if calibration is None or not len(calibration):
                    raise FetalscanError("int8-static quantisation needs calibration images")
                q.quantize_static(str(pre), str(dst), _CalibrationReader(calibration),
                                  quant_format=q.QuantFormat.QDQ, per_channel=True,
                                  activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8,
                                  calibrate_method=q.CalibrationMethod.MinMax)
            else:
                raise FetalscanError(f"unknown quantisation {mode!r}; choose one of {', '.join(QUANTIZE[1:])}")
        proto = onnx.load(str(dst))
    set_metadata(proto, {k[len(META_PREFIX):]: v for k, v in meta.items() if k.startswith(META_PREFIX)})
    set_metadata(proto, {"quantization": "int8 dynamic (weights int8, activations at run time)" if mode == "int8"
                         else "int8 static QDQ (per-channel weights, MinMax-calibrated activations)"})
    return proto.SerializeToString()


@contextlib.contextmanager
def _quiet_root_logger():
    """ONNX Runtime's quantiser logs one root-logger warning per tensor it cannot quantise per channel
    (hundreds for DenseNet's batch norms); keep them out of the user's console while it runs."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)


class _CalibrationReader:
    """Feeds prepared images to ONNX Runtime's static-quantisation calibrator, 8 at a time."""

    def __init__(self, images: np.ndarray) -> None:
        self._batches = iter([images[s:s + 8] for s in range(0, len(images), 8)])

    def get_next(self):
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: np.ascontiguousarray(batch)}

    def rewind(self) -> None:  # pragma: no cover - used by some calibrators
        pass


def _prepared_images(loaded, source: str | Path, limit: int) -> np.ndarray:
    """Up to ``limit`` images of a manifest / folder, prepared for ``loaded`` (uint8 batch)."""
    from fetalscan.data.records import iter_record_images, load_dataset
    from fetalscan.data.transforms import prepare

    records = load_dataset(Path(source), require_labels=False).records[:limit]
    return np.stack([prepare(img, loaded.preprocessing).numpy() for _, img in iter_record_images(records)])


def _check_images(loaded, manifest: Path) -> tuple[np.ndarray, list]:
    """Every image of a labelled check set, prepared, with its records (labels mapped to the model's)."""
    from dataclasses import replace

    from fetalscan.data.records import iter_record_images, load_dataset
    from fetalscan.data.transforms import prepare

    records = []
    for r in load_dataset(Path(manifest), require_labels=True).records:  # labels in the model's classes
        label = loaded.class_map.get(r.label, r.label)
        records.append(replace(r, label=label if label in loaded.classes else None, label_original=r.label))
    images = np.stack([prepare(img, loaded.preprocessing).numpy() for _, img in iter_record_images(records)])
    return images, records


def auroc_change(loaded, engine: OnnxClassifier, quantized: OnnxClassifier | None,
                 check_set: tuple[np.ndarray, list], cfg: ExportConfig) -> dict:
    """Patient-level macro one-vs-rest AUROC on the check set: float32 graph, int8 graph, change."""
    from fetalscan.inference.tables import aggregate_groups, predictions_frame

    images, records = check_set

    def patient_auroc(eng: OnnxClassifier) -> float:
        probs = probabilities(eng.logits(images, cfg.batch_size), loaded.temperature)
        frame = predictions_frame(records, probs, loaded.classes)
        patients = aggregate_groups(frame, loaded.classes, cfg.aggregate)
        return macro_auroc(patients, loaded.classes)

    result = {"set": str(cfg.check), "n_images": int(len(images)),
              "n_patients": int(len({r.group for r in records})), "aggregate": cfg.aggregate,
              "float32": patient_auroc(engine)}
    if quantized is not None:
        result["int8"] = patient_auroc(quantized)
        result["change"] = result["int8"] - result["float32"]
    return result


def macro_auroc(patients, classes: Sequence[str]) -> float:
    """Macro one-vs-rest AUROC over the classes that have both positives and negatives (NaN if none)."""
    from sklearn.metrics import roc_auc_score

    labels = patients["label"].astype(str).to_numpy()
    scores = []
    for c in classes:
        y = labels == c
        known = labels != ""
        if y[known].all() or not y[known].any():
            continue
        scores.append(roc_auc_score(y[known], patients.loc[known, f"p_{c}"].to_numpy(dtype=float)))
    return float(np.mean(scores)) if scores else float("nan")
