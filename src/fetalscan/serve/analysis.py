"""One study: uploaded files -> checked records -> the one prediction path -> heatmaps, biometry.

:class:`Analyzer` holds the loaded models. :meth:`Analyzer.analyze` takes the uploaded
files of one study, copies them into a temporary folder (removed when it returns, also on
error), checks each file before decoding a pixel (size, kind, pixel count, frames), reads
them with :mod:`fetalscan.data.records` into one :class:`~fetalscan.data.records.Dataset`
whose records all carry the study's id as their group, and calls
:func:`fetalscan.inference.predict.predict` with the plane gate on: the image
probabilities and the study-level finding (the patient row) are that function's. The
heatmaps (:mod:`fetalscan.explain.cams`) and, when a head segmenter is loaded, the head
measurements (:mod:`fetalscan.biometry`) are made from the same files before the folder
goes.

Every rejection is an :class:`UploadRejected` with an HTTP status and the name of the
file at fault, as the client named it (never the server's temporary path). Nothing here
logs a file name or any DICOM field; the log says how many files and images a study had.
"""

from __future__ import annotations

import logging
import math
import re
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from fetalscan.errors import FetalscanError
from fetalscan.serve.settings import ServeSettings
from fetalscan.serve.store import CachedImage, CachedStudy, utc_now
from fetalscan.texts import BIOMETRY_DISCLAIMER, DISCLAIMER, HEATMAP_DISCLAIMER

log = logging.getLogger(__name__)

#: Longest file name kept, in UTF-8 bytes (longer ones are shortened, keeping the extension).
_MAX_NAME_BYTES = 200

#: Bytes copied per read while an upload is saved.
_CHUNK = 1 << 20

#: Loggers of third-party readers that may echo header values; the service keeps them quiet.
_QUIET_LOGGERS = ("pydicom",)


class UploadRejected(FetalscanError):
    """A request the service will not analyse: an HTTP status, a message and the file at fault."""

    def __init__(self, message: str, *, status: int = 422, file: str | None = None) -> None:
        super().__init__(message)
        self.status = int(status)
        self.file = file


@dataclass
class UploadedFile:
    """One file of a multipart upload: the client's name and an open binary stream."""

    name: str
    stream: BinaryIO


def quiet_dicom_logs() -> None:
    """Keep the DICOM reader from echoing header values into the logs.

    pydicom validates every element it reads and warns (and logs) about an invalid one
    quoting its value, which may be a patient's name or ID; the service turns that
    validation off (it uses only the image elements) and keeps pydicom's logger quiet.
    """
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from pydicom import config
    except ImportError:  # pragma: no cover - pydicom is a dependency
        return
    config.settings.reading_validation_mode = config.IGNORE


def display_name(raw: str | None, index: int) -> str:
    """The client's file name without folders or control characters (``upload-<i>`` if empty)."""
    name = re.split(r"[\\/]", raw or "")[-1]
    name = "".join(ch for ch in name if ch.isprintable()).strip()
    if len(name.encode("utf-8")) > _MAX_NAME_BYTES:  # file systems allow 255 bytes; keep the extension
        stem, dot, ext = name.rpartition(".")
        ext = dot + ext if stem and len(ext) <= 10 else ""
        stem = name[: len(name) - len(ext)]
        while len((stem + ext).encode("utf-8")) > _MAX_NAME_BYTES:
            stem = stem[:-1]
        name = stem + ext
    if name in ("", ".", ".."):
        name = f"upload-{index + 1}"
    return name


class Analyzer:
    """The loaded classifier (and head segmenter) and how a study is analysed with them."""

    def __init__(self, settings: ServeSettings) -> None:
        from fetalscan.fileio import sha256_file
        from fetalscan.models.checkpoint import load_checkpoint
        from fetalscan.runtime import resolve_device

        self.settings = settings
        self.device = resolve_device(settings.device)
        self.loaded = load_checkpoint(settings.model, self.device)
        from fetalscan.inference.predict import use_backend

        use_backend(self.loaded, settings.backend, self.device)  # every prediction of the service runs on it
        self.model_sha256 = sha256_file(settings.model)
        self.segmenter = None
        self.biometry_sha256 = None
        if settings.biometry_model is not None:
            from fetalscan.biometry.segmenter import HeadSegmenter

            self.segmenter = HeadSegmenter.load(settings.biometry_model, self.device)
            self.biometry_sha256 = sha256_file(settings.biometry_model)
        self._lock = threading.Lock()  # one study at a time through the models (CAM hooks are per model)
        if settings.warm_up:
            self.warm_up()

    def warm_up(self) -> None:
        """Load the plane gate and the heatmap library and run each model once on a blank image,
        so that the first upload takes as long as any other (about 8 s less on a 2-core CPU);
        this also exports the classifier to ONNX (or reads its cache) when its backend is ONNX Runtime."""
        from fetalscan.explain.cams import ExplainConfig, explain_arrays
        from fetalscan.inference.predict import probabilities_of_arrays
        from fetalscan.quality.planes import classify_planes

        blank = np.zeros((64, 64, 3), dtype=np.uint8)
        with self._lock:
            probabilities_of_arrays(self.loaded, [blank], self.device)
            classify_planes([blank], self.device)
            explain_arrays(self.loaded, [blank], ExplainConfig(method=self.settings.heatmap_method), self.device)
            if self.segmenter is not None:
                self.segmenter.measure(blank, 1.0, where="warm-up")

    # ------------------------------------------------------------------ description
    @property
    def classes(self) -> list[str]:
        return list(self.loaded.classes)

    def model_info(self) -> dict:
        """What the API says about the served model(s)."""
        from fetalscan import __version__

        meta = self.loaded.meta
        info = {
            "name": Path(self.settings.model).name,
            "sha256": self.model_sha256,
            "backbone": (self.loaded.architecture or {}).get("backbone"),
            "mode": (self.loaded.architecture or {}).get("mode"),
            "classes": self.classes,
            "temperature": self.loaded.temperature,
            "created": (meta.get("provenance") or {}).get("created"),
            "model_fetalscan_version": meta.get("fetalscan_version"),
            "fetalscan_version": __version__,
            "plane_gate": "SonoNet-16 (Baumgartner et al. 2017), bundled weights",
            "heatmap_method": self.settings.heatmap_method,
            "study_rule": self.settings.aggregate,
            "biometry": None,
        }
        if self.segmenter is not None:
            info["biometry"] = {"name": Path(self.settings.biometry_model).name, "sha256": self.biometry_sha256,
                                "encoder": self.segmenter.cfg.encoder}
        return info

    # ------------------------------------------------------------------ analysis
    def analyze(self, files: Sequence[UploadedFile], *, pixel_size_mm: float | None = None
                ) -> tuple[dict, CachedStudy]:
        """Analyse one study; returns the API's result and what the cache keeps for the page.

        Raises :class:`UploadRejected` for anything wrong with the upload (status 4xx,
        naming the file) and for a failure inside the models (status 500).
        """
        s = self.settings
        if not files:
            raise UploadRejected("no file uploaded: send one or more images, DICOM files, cine loops or a "
                                 "video in the multipart field 'files'")
        if len(files) > s.max_files:
            raise UploadRejected(f"{len(files)} files in one request; at most {s.max_files} are accepted",
                                 status=413)
        if pixel_size_mm is not None and not (math.isfinite(pixel_size_mm) and 0 < pixel_size_mm < 10):
            raise UploadRejected(f"pixel_size_mm must be a number of mm per pixel between 0 and 10, got "
                                 f"{pixel_size_mm}")
        study_id = uuid.uuid4().hex
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="fetalscan-upload-") as tmp:
            root = Path(tmp)
            saved = self._save(files, root)
            records, notes = self._records(saved, study_id, root)
            with self._lock:
                result, cached = self._run(study_id, records, saved, notes, root, pixel_size_mm)
        log.info("study %s: %d file(s), %d image(s) analysed in %.2f s", study_id, len(files), len(records),
                 time.perf_counter() - started)
        return result, cached

    def _save(self, files: Sequence[UploadedFile], root: Path) -> dict[Path, str]:
        """Copy every upload into its own folder under ``root``; returns {saved path: client name}."""
        saved: dict[Path, str] = {}
        for i, f in enumerate(files):
            name = display_name(f.name, i)
            folder = root / f"{i:03d}"
            folder.mkdir()
            path = folder / name
            size = 0
            with open(path, "wb") as out:
                while True:
                    chunk = f.stream.read(_CHUNK)
                    if not chunk:
                        break
                    size += len(chunk)
                    if size > self.settings.max_file_bytes:
                        raise UploadRejected(f"{name}: file larger than the limit of "
                                             f"{self.settings.max_file_mb:g} MiB", status=413, file=name)
                    out.write(chunk)
            if size == 0:
                raise UploadRejected(f"{name}: the file is empty", file=name)
            saved[path] = name
        return saved

    def _records(self, saved: dict[Path, str], study_id: str, root: Path) -> tuple[list, list[str]]:
        """Check each saved file (kind, pixel count, frames) and expand it into records."""
        from fetalscan.data.records import expand_file

        records: list = []
        notes: list[str] = []
        for original, name in list(saved.items()):
            path, _kind, n_frames, every = self._check_file(original, name)
            if path != original:  # renamed with the extension of its content
                del saved[original]
                saved[path] = name
            try:
                recs = expand_file(path, None, study_id, name, every)
            except FetalscanError as exc:
                raise UploadRejected(self._clean(str(exc), saved, root), file=name) from exc
            if every > 1:
                notes.append(f"{name}: {n_frames} frames; every {every}th frame analysed ({len(recs)} frames; "
                             f"the limit is {self.settings.max_frames} per file)")
            records.extend(recs)
            if len(records) > self.settings.max_images:
                raise UploadRejected(f"{name}: the study now has {len(records)} images (stills and frames); at most "
                                     f"{self.settings.max_images} are analysed per request", status=413, file=name)
        return records, notes

    def _check_file(self, path: Path, name: str) -> tuple[Path, str, int, int]:
        """Kind, frame count and frame step of one file, from its header only (no pixel decoded).

        A file whose extension says nothing but whose bytes are an image Pillow knows is
        renamed with that image's extension. Returns ``(path, kind, n_frames, every_nth)``.
        """
        from fetalscan.data.records import media_kind
        from fetalscan.errors import ImageReadError

        kind = media_kind(path)
        if kind == "unknown":
            fmt = _pillow_format(path)
            if fmt is None:
                raise UploadRejected(f"{name}: not an image, DICOM file or video that fetalscan can read "
                                     "(images: PNG, JPEG, BMP, TIFF, GIF, WebP; DICOM single- or multi-frame; "
                                     "video: a format OpenCV opens, e.g. MP4, AVI)", status=415, file=name)
            new = path.with_name(path.name + "." + fmt.lower().replace("jpeg", "jpg"))
            path.rename(new)
            path, kind = new, "image"
        try:
            if kind == "image":
                (width, height), n_frames = _image_size(path, name), 1
            elif kind == "dicom":
                from fetalscan.data.dicom import read_dicom_info

                info = read_dicom_info(path)
                width, height, n_frames = info.columns, info.rows, info.n_frames
            else:
                from fetalscan.data.video import read_video_info

                info = read_video_info(path)
                width, height, n_frames = info.width, info.height, info.n_frames
        except ImageReadError as exc:
            what = {"image": "image", "dicom": "DICOM file", "video": "video"}[kind]
            raise UploadRejected(f"{name}: unreadable or corrupt {what} "
                                 f"({_short(str(exc).replace(str(path), name))})", file=name) from exc
        pixels = int(width) * int(height)
        if pixels > self.settings.max_pixels:
            raise UploadRejected(f"{name}: {width} x {height} pixels ({pixels / 1e6:.1f} MP) exceeds the limit of "
                                 f"{self.settings.max_pixels / 1e6:.1f} MP per image", status=413, file=name)
        every = max(1, math.ceil(n_frames / self.settings.max_frames))
        return path, kind, n_frames, every

    @staticmethod
    def _clean(message: str, saved: dict[Path, str], root: Path) -> str:
        """A library message with the server's temporary paths replaced by the client's names."""
        for path, name in saved.items():
            message = message.replace(str(path), name)
        return message.replace(str(root) + "/", "").replace(str(root), "upload")

    def _run(self, study_id: str, records: list, saved: dict[Path, str], notes: list[str], root: Path,
             pixel_size_mm: float | None) -> tuple[dict, CachedStudy]:
        from fetalscan.data.records import Dataset
        from fetalscan.inference.predict import PredictConfig, predict

        s = self.settings
        cfg = PredictConfig(aggregate=s.aggregate, normal_class=s.normal_class, plane_check=True)
        try:
            prediction = predict(self.loaded, Dataset(records, self.classes, "upload"), cfg, self.device)
            extras = self._extras(records, prediction, pixel_size_mm)
        except UploadRejected:
            raise
        except FetalscanError as exc:  # an unreadable image, frame or video found while decoding
            raise UploadRejected(self._clean(str(exc), saved, root), file=_first_name(str(exc), saved)) from exc
        except Exception as exc:
            log.exception("study %s: analysis failed", study_id)
            raise UploadRejected(f"the analysis failed inside the model ({type(exc).__name__}); "
                                 "the files were not analysed", status=500) from exc
        return self._result(study_id, records, prediction, extras, notes, saved, root)

    def _extras(self, records: list, prediction, pixel_size_mm: float | None):
        """Per image: (RGB image, heatmap uint8, biometry dict or None, biometry overlay PNG or None)."""
        from fetalscan.data.records import iter_record_images
        from fetalscan.explain.cams import (
            ExplainConfig,
            explain_arrays,
            layer_for,
            png_bytes,
        )

        cfg = ExplainConfig(method=self.settings.heatmap_method)
        cfg.validate()
        layer = layer_for(self.loaded, cfg.layer)
        planes = prediction.images["plane"].tolist() if "plane" in prediction.images else [None] * len(records)
        # the quality score's plane signal comes from the gate's run in the prediction path (not a second run)
        brain = [r.brain_probability for r in prediction.planes] if prediction.planes else [None] * len(records)
        batch: list[tuple[int, np.ndarray]] = []

        def flush():
            exps = explain_arrays(self.loaded, [img for _, img in batch], cfg, self.device, layer)
            for (i, img), exp in zip(batch, exps):
                bio, bio_png = self._biometry(records[i], img, planes[i], pixel_size_mm, brain[i])
                heat = np.clip(exp.heatmap * 255.0 + 0.5, 0, 255).astype(np.uint8)
                yield i, png_bytes(img), heat, exp, bio, bio_png
            batch.clear()

        out = {}
        for i, img in iter_record_images(records):
            batch.append((i, img))
            if len(batch) >= cfg.batch_size:
                out.update((item[0], item[1:]) for item in flush())
        if batch:
            out.update((item[0], item[1:]) for item in flush())
        return [out[i] for i in range(len(records))]

    def _biometry(self, record, image: np.ndarray, plane: str | None, pixel_size_mm: float | None,
                  brain_probability: float | None = None):
        if self.segmenter is None:
            return None, None
        from fetalscan.biometry.geometry import draw_overlay
        from fetalscan.explain.cams import png_bytes
        from fetalscan.quality.planes import HEAD_PLANES

        ps = record.pixel_spacing_mm if record.pixel_spacing_mm is not None else pixel_size_mm
        source = "DICOM" if record.pixel_spacing_mm is not None else "request" if pixel_size_mm is not None else None
        regions = _calibrated_regions(record)
        region = None
        region_warn: list[str] = []
        if regions:  # PS3.3 C.8.5.5: the calibration is that of the region holding the head
            m, region, region_warn = self._measure_in_region(record, image, regions)
            ps = m.pixel_size_mm
            source = "DICOM" if ps is not None else None
        else:
            m = self.segmenter.measure(image, ps, where=record.image_id)
        e = m.ellipse
        warn = list(m.warnings) + region_warn
        on_head_plane = plane in HEAD_PLANES if plane is not None else None
        if on_head_plane is False:
            warn.append(f"{record.image_id}: the plane gate reads {plane}, not a head plane; HC and BPD are "
                        "measured on the transthalamic plane (ISUOG 2019): check the image before using them")
        bio = {
            "status": m.status,
            "unit": m.unit,
            "hc": _finite(m.hc), "bpd": _finite(m.bpd), "ofd": _finite(m.ofd),
            "pixel_size_mm": _finite(m.pixel_size_mm),
            "pixel_size_source": source if m.unit == "mm" else None,
            "pixel_size_region": None if region is None else region.index,
            "ga_weeks": _finite(m.ga.weeks), "ga_2sd_weeks": _finite(m.ga.two_sd_weeks), "ga_text": m.ga.text(),
            "ellipse": ({k: _finite(v) for k, v in e.to_dict().items()} if e is not None else None),
            "head_plane": on_head_plane,
            "summary": m.summary(),
            "warnings": warn,
            "disclaimer": BIOMETRY_DISCLAIMER,
        }
        bio["quality"] = None  # image quality score (docs/quality.md); "re-acquire" below its threshold
        from fetalscan.biometry.quality import quality_summary

        try:
            bio["quality"] = quality_summary(self.segmenter, image, ps, where=record.image_id,
                                             plane_brain_prob=brain_probability)
        except FetalscanError as exc:
            warn.append(f"{record.image_id}: no quality score ({exc})")
        if bio["quality"] is not None and bio["quality"]["reacquire"]:
            warn.append(f"{record.image_id}: image quality {bio['quality']['quality']:.2f} is below "
                        f"{bio['quality']['threshold']:.2f}: re-acquire the image if possible")
        return bio, png_bytes(draw_overlay(image, m))

    @staticmethod
    def _dicom_source(record, sources: dict):
        """The :class:`~fetalscan.data.dicom.DicomSource` of a record's DICOM file and frame, or None.

        Read from the header while the upload folder still exists; kept in memory only (the
        report routes refer back to the source study, series and instance with it)."""
        from dataclasses import replace

        from fetalscan.data.dicom import read_dicom_source
        from fetalscan.data.records import media_kind

        if record.path not in sources:
            try:
                sources[record.path] = read_dicom_source(record.path) if media_kind(record.path) == "dicom" else None
            except FetalscanError:  # decoded moments ago; if its header fails now, outputs just cannot refer to it
                sources[record.path] = None
        source = sources[record.path]
        if source is None or record.frame is None:
            return source
        return replace(source, frame_number=int(record.frame) + 1)

    def _measure_in_region(self, record, image: np.ndarray, regions: list):
        """Measure the head, then convert pixels to mm with the ultrasound region that holds the
        fitted ellipse's centre (DICOM PS3.3 C.8.5.5); no mm when the centre lies in no
        calibrated 2D region. Returns ``(measurement, region or None, warnings)``."""
        from fetalscan.data.dicom import region_at

        where = record.image_id
        logit = self.segmenter.logits(self.segmenter.prepare(image)[None])[0]
        probe = self.segmenter.measure_logits(logit, image.shape[:2], 1.0, where=where)  # geometry only
        if probe.ellipse is None:
            return self.segmenter.measure_logits(logit, image.shape[:2], None, where=where), None, []
        cx, cy = probe.ellipse.cx, probe.ellipse.cy
        region = region_at(regions, cx, cy)
        if region is None or not region.calibrated_mm:
            inside = "no ultrasound region" if region is None else region.describe()
            warn = [f"{where}: the head's centre (x {cx:.0f}, y {cy:.0f} px) lies in {inside}, not in a 2D region "
                    f"calibrated in cm (the file's calibrated regions: "
                    f"{'; '.join(r.describe() for r in regions if r.calibrated_mm)}); lengths are given in pixels"]
            return self.segmenter.measure_logits(logit, image.shape[:2], None, where=where), region, warn
        warn = []
        if region.anisotropic:
            warn.append(f"{where}: {region.describe()} has anisotropic pixels (Physical Delta Y "
                        f"{region.delta_y:.4g} cm); lengths use Physical Delta X")
        return self.segmenter.measure_logits(logit, image.shape[:2], region.spacing_mm, where=where), region, warn

    def _result(self, study_id: str, records: list, prediction, extras: list, notes: list[str],
                saved: dict[Path, str], root: Path) -> tuple[dict, CachedStudy]:
        classes = self.classes
        base = f"/api/v1/studies/{study_id}"
        images = []
        cached = []
        df = prediction.images
        has_plane = "plane" in df
        sources: dict = {}  # path -> DicomSource of frame 0 (or None), read once per file
        for k, (rec, (img_png, heat, exp, bio, bio_png)) in enumerate(zip(records, extras)):
            row = df.iloc[k]
            probs = {c: float(row[f"p_{c}"]) for c in classes}
            entry = {
                "index": k,
                "name": rec.name,
                "frame": None if rec.frame is None else int(rec.frame),
                "prediction": str(row["pred"]),
                "probabilities": probs,
                "plane": str(row["plane"]) if has_plane else None,
                "plane_confidence": float(row["plane_confidence"]) if has_plane else None,
                "brain_plane": bool(row["brain_plane"]) if has_plane else None,
                "image_url": f"{base}/images/{k}/image.png",
                "heatmap_url": f"{base}/images/{k}/heatmap.png",
                "heatmap": {"method": exp.method, "layer": exp.layer, "target": exp.target,
                            "disclaimer": HEATMAP_DISCLAIMER},
                "biometry": None,
            }
            if bio is not None:
                entry["biometry"] = {**bio, "overlay_url": f"{base}/images/{k}/biometry.png"}
            images.append(entry)
            cached.append(CachedImage(img_png, heat, bio_png, dicom=self._dicom_source(rec, sources)))
        patient = prediction.patients.iloc[0]
        study_probs = {c: float(patient[f"p_{c}"]) for c in classes}
        all_notes = notes + [self._clean(n, saved, root) for n in prediction.notes]
        created = utc_now()
        result = {
            "study": {
                "id": study_id,
                "created_utc": created,
                "prediction": str(patient["pred"]),
                "probabilities": study_probs,
                "n_images": len(records),
                "n_files": len(saved),
                "rule": self.settings.aggregate,
                "notes": all_notes,
                "review_url": f"{base}/review",
            },
            "images": images,
            "model": self.model_info(),
            "disclaimer": DISCLAIMER,
        }
        return result, CachedStudy(result, cached)


# ---------------------------------------------------------------------- helpers
def _pillow_format(path: Path) -> str | None:
    """Pillow's name for the image format of a file (header only), or None."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with Image.open(path) as im:
                return im.format
        except Exception:  # noqa: BLE001 - anything Pillow cannot identify is "not an image"
            return None


def _image_size(path: Path, name: str) -> tuple[int, int]:
    """(width, height) of an image from its header; Pillow's own bomb guard becomes a 413."""
    from PIL import Image, UnidentifiedImageError

    from fetalscan.errors import ImageReadError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DecompressionBombWarning: our own limit decides
        try:
            with Image.open(path) as im:
                return im.size
        except Image.DecompressionBombError as exc:
            raise UploadRejected(f"{name}: the image declares too many pixels ({exc})", status=413,
                                 file=name) from exc
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise ImageReadError(f"not an image Pillow can identify: {exc}") from exc


def _short(text: str, n: int = 300) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def _first_name(message: str, saved: dict[Path, str]) -> str | None:
    for path, name in saved.items():
        if str(path) in message:
            return name
    return None


def _calibrated_regions(record) -> list:
    """All ultrasound regions of a record's DICOM file when one of them is a 2D region calibrated
    in cm (PS3.3 C.8.5.5), else [] (other calibration sources then apply)."""
    from fetalscan.data.dicom import read_ultrasound_regions
    from fetalscan.data.records import media_kind

    if media_kind(record.path) != "dicom":
        return []
    regions = read_ultrasound_regions(record.path)
    return regions if any(r.calibrated_mm for r in regions) else []


def _finite(value) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None
