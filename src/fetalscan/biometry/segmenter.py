""":class:`HeadSegmenter`: a trained head segmenter ready to measure images, with an ONNX Runtime path.

It resizes an ultrasound image to the network's input, predicts the head mask, upsamples
the logits to the original size, fits the head ellipse and measures HC / BPD / OFD
(:mod:`fetalscan.biometry.geometry`). ``backend="onnx"`` exports the network once and runs
it with onnxruntime (faster on CPU; same outputs within float tolerance)."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np

from fetalscan.biometry.geometry import HeadMeasurement, measure_mask
from fetalscan.errors import CheckpointError, DataError, FetalscanError
from fetalscan.models.segmenters import (
    SegmenterConfig,
    build_segmenter,
    config_from_architecture,
    read_segmenter_checkpoint,
)

log = logging.getLogger(__name__)


class HeadSegmenter:
    """A trained head segmenter ready for inference, with its calibration.

    ``backend="torch"`` runs the network in PyTorch (``inference_mode``);
    ``backend="onnx"`` exports it once to ONNX in memory and runs it with
    onnxruntime on the CPU (the fast path, see ``benchmarks/biometry_speed.py``).
    ``auto`` picks onnx on a CPU device and torch on CUDA.

    ``tta=True`` averages the logits of the image and of its left-right mirror (mapped
    back); ``members`` (see :meth:`ensemble`) averages the logits of several networks of the
    same input size — e.g. the fold models of a cross-validation (Lakshminarayanan et al.,
    NeurIPS 2017, deep ensembles). Both are measured as levers in ``docs/biometry.md``.
    """

    def __init__(self, model, cfg: SegmenterConfig, calibration: dict | None = None, *,
                 device=None, backend: str = "auto", meta: dict | None = None, tta: bool = False) -> None:
        import torch

        self.cfg = cfg
        self.pre = cfg.preprocessing()
        self.calibration = dict(calibration or {})
        self.meta = dict(meta or {})
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.model = model.eval().to(self.device)
        if backend == "auto":
            backend = "onnx" if self.device.type == "cpu" else "torch"
        if backend not in ("torch", "onnx"):
            raise FetalscanError(f"backend must be 'torch', 'onnx' or 'auto', got {backend!r}")
        self.backend = backend
        self.tta = bool(tta)
        self.members: list[HeadSegmenter] = []
        self._session = None

    @classmethod
    def ensemble(cls, members: list[HeadSegmenter], *, tta: bool = False) -> HeadSegmenter:
        """One segmenter that averages the logits of ``members`` (same preprocessing and input size).

        Its ``axis_offset_px`` is the mean of the members' offsets (each chosen on its own
        inner-validation images, so no test data enters).
        """
        if not members:
            raise FetalscanError("an ensemble needs at least one segmenter")
        first = members[0]
        for m in members[1:]:
            if m.pre != first.pre:
                raise FetalscanError(f"ensemble members differ in preprocessing ({m.pre} vs {first.pre}); "
                                     "combine segmenters of the same input size and encoder family")
        offsets = [m.axis_offset_px for m in members]
        calibration = {**first.calibration, "axis_offset_px": float(np.mean(offsets)),
                       "source": f"mean of {len(members)} ensemble members' inner-validation offsets",
                       "member_axis_offsets_px": offsets}
        for key in ("mask_axis_offset_px",):
            vals = [m.calibration[key] for m in members if key in m.calibration]
            if vals:
                calibration[key] = float(np.mean(vals))
        seg = cls(first.model, first.cfg, calibration, device=first.device, backend=first.backend,
                  meta={**first.meta, "ensemble": [m.meta.get("path") for m in members]}, tta=tta)
        seg.members = list(members)
        return seg

    @property
    def axis_offset_px(self) -> float:
        """Calibrated offset added to both fitted semi-axes (pixels of the original image)."""
        return float(self.calibration.get("axis_offset_px", 0.0))

    @classmethod
    def load(cls, path: str | Path | list, device=None, backend: str = "auto", tta: bool = False) -> HeadSegmenter:
        """Load a checkpoint written by :func:`save_segmenter` (strict weights); a list of
        checkpoints gives their :meth:`ensemble`."""
        if isinstance(path, (list, tuple)):
            paths = list(path)
            if len(paths) == 1:
                return cls.load(paths[0], device, backend, tta)
            return cls.ensemble([cls.load(p, device, backend) for p in paths], tta=tta)
        blob = read_segmenter_checkpoint(path)
        cfg = config_from_architecture(blob["architecture"], str(path))
        model = build_segmenter(cfg)
        try:
            model.load_state_dict(blob["state_dict"], strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{path}: weights do not match the architecture "
                                  f"({str(exc).splitlines()[0]})") from exc
        meta = {k: v for k, v in blob.items() if k != "state_dict"} | {"path": str(path)}
        return cls(model, cfg, blob["calibration"], device=device, backend=backend, meta=meta, tta=tta)

    # ---- network

    def prepare(self, image: np.ndarray):
        """RGB uint8 (H, W, 3) -> prepared uint8 (1, h, w) tensor (see :func:`fetalscan.transforms.prepare`)."""
        from fetalscan.data.transforms import prepare

        return prepare(_as_rgb(image), self.pre)

    def logits(self, batch, tta: bool | None = None) -> np.ndarray:
        """Low-resolution logits ``(N, h, w)`` float32 of a prepared uint8 batch ``(N, 1, h, w)``:
        the mean over the ensemble members and, with TTA (``tta``, default: the segmenter's own
        setting), over the image and its mirror."""
        nets = self.members or [self]
        views = [False, True] if (self.tta if tta is None else tta) else [False]
        total = None
        for net in nets:
            for mirror in views:
                out = net._network_logits(batch.flip(-1) if mirror else batch)
                out = out[..., ::-1] if mirror else out
                total = out.astype(np.float32) if total is None else total + out
        return np.ascontiguousarray(total / (len(nets) * len(views)), dtype=np.float32)

    def _network_logits(self, batch) -> np.ndarray:
        """Logits of this one network (no averaging)."""
        import torch

        from fetalscan.data.transforms import normalize

        x = normalize(batch, self.pre)
        if self.backend == "onnx":
            session = self._onnx_session()
            return session.run(None, {"image": x.numpy()})[0][:, 0]
        with torch.inference_mode():
            return self.model(x.to(self.device)).float()[:, 0].cpu().numpy()

    def _onnx_session(self):
        if self._session is None:
            self._session = onnx_session(self.model, self.cfg)
        return self._session

    def probability_map(self, image: np.ndarray) -> np.ndarray:
        """Head probability at the original image size, float32 (H, W)."""
        logit = self.logits(self.prepare(image)[None])[0]
        return _sigmoid(upsample_logits(logit, image.shape[:2]))

    def measure(self, image: np.ndarray, pixel_size_mm: float | None = None, where: str = "image") -> HeadMeasurement:
        """Segment, fit and measure one image (RGB or grey uint8)."""
        logit = self.logits(self.prepare(image)[None])[0]
        return self.measure_logits(logit, image.shape[:2], pixel_size_mm, where)

    def measure_logits(self, logit: np.ndarray, shape: tuple[int, int], pixel_size_mm: float | None,
                       where: str = "image") -> HeadMeasurement:
        """Measure from low-resolution logits (upsampled to ``shape`` first)."""
        mask = upsample_logits(logit, shape) > 0.0
        return measure_mask(mask, pixel_size_mm, axis_offset_px=self.axis_offset_px, where=where)


def _as_rgb(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise DataError(f"expected an RGB or grey uint8 image, got {img.dtype} {img.shape}")
    return img


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-np.clip(x, -60, 60)))).astype(np.float32)


def upsample_logits(logit: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of a (h, w) logit map to ``shape`` (H, W), pixel-centre aligned."""
    import cv2

    h, w = int(shape[0]), int(shape[1])
    return cv2.resize(np.ascontiguousarray(logit, dtype=np.float32), (w, h), interpolation=cv2.INTER_LINEAR)


def onnx_session(model, cfg: SegmenterConfig, threads: int | None = None):
    """Export ``model`` to ONNX in memory and open an onnxruntime CPU session on it."""
    import onnxruntime as ort
    import torch

    buf = io.BytesIO()
    dummy = torch.zeros(1, 1, cfg.input_height, cfg.input_width)
    was_training = model.training
    model_cpu = model.eval().to("cpu")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model_cpu, dummy, buf, input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=17, dynamo=False)
    model.train(was_training)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads or torch.get_num_threads())
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])
