"""Head measurements of new images: segment, fit the ellipse, measure; overlays and ``measurements.csv``.

:func:`predict_to_folder` is ``fetalscan biometry predict``: it loads a trained
segmenter, reads the images (:func:`prediction_records`: an image, folder, DICOM,
video, fetalscan manifest or HC18-style manifest) and calls
:func:`measure_records`, which writes ``out/overlays/<n>_<name>.png`` per image and
``out/measurements.csv``, and returns the rows with the warnings. Nothing here
prints; images without a pixel size are measured in pixels (counted and warned),
never in guessed millimetres.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from fetalscan.errors import DataError, FetalscanError
from fetalscan.texts import BIOMETRY_PLANE

log = logging.getLogger(__name__)


@dataclass
class BiometryPredictConfig:
    """How images are measured; the CLI maps its flags 1:1 onto these fields.

    Attributes
    ----------
    pixel_size_mm : float or None
        Millimetres per pixel for images that carry none (a manifest's
        ``pixel_size_mm`` / ``pixel_spacing_mm`` or the DICOM calibration wins).
    backend : str
        ``auto`` (ONNX on CPU, PyTorch on CUDA), ``torch`` or ``onnx``.
    every_nth : int
        Keep every N-th frame of cine DICOM / video.
    plane_check : bool
        Also name the standard plane (SonoNet-16) and warn when it is not a brain
        plane; the measurement is still made and reported.
    quality_check : bool
        Also score the image's quality (``fetalscan.biometry.quality``, docs/quality.md):
        ``quality`` (0-1) and ``reacquire`` columns, and a "re-acquire" warning below the
        shipped model's threshold. Runs test-time augmentation and the plane gate.
    """

    pixel_size_mm: float | None = None
    backend: str = "auto"
    every_nth: int = 1
    plane_check: bool = False
    quality_check: bool = False

    def validate(self) -> None:
        if self.backend not in ("auto", "torch", "onnx"):
            raise FetalscanError(f"backend must be 'auto', 'torch' or 'onnx', got {self.backend!r}")
        if self.every_nth < 1:
            raise FetalscanError(f"every_nth must be >= 1, got {self.every_nth}")
        if self.pixel_size_mm is not None and not self.pixel_size_mm > 0:
            raise DataError(f"the pixel size must be a positive number of mm per pixel, got {self.pixel_size_mm}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class MeasuredImage:
    """One measured image: its name, the measurement, the plane check and its ``measurements.csv`` row."""

    image_id: str
    measurement: object  # fetalscan.biometry.geometry.HeadMeasurement
    plane: dict  # {} without the plane check, else plane, plane_confidence, brain_plane
    row: dict

    def summary(self) -> str:
        """One line: ``HC 175.2 mm, BPD ... [plane: Brain (Tv.) 0.98]``."""
        text = self.measurement.summary()  # type: ignore[attr-defined]
        if self.plane:
            text += f" [plane: {self.plane['plane']} {self.plane['plane_confidence']:.2f}]"
        if self.row.get("quality") is not None:
            text += f" [quality {self.row['quality']:.2f}{': RE-ACQUIRE' if self.row.get('reacquire') else ''}]"
        return text


@dataclass
class BiometryPrediction:
    """What :func:`measure_records` produced and wrote."""

    images: list[MeasuredImage]
    out: Path
    n_missing_pixel_size: int = 0
    n_off_plane: int = 0
    warnings: list[str] = field(default_factory=list)  # run-level warnings (per-image ones are in the rows)

    @property
    def rows(self) -> list[dict]:
        return [m.row for m in self.images]

    def console_lines(self) -> list[tuple[str, bool]]:
        """What the command line prints: ``(text, is_warning)``, one line per image, one per cine.

        A single image gets its measurement line (a ``check`` result is a warning and
        says why). The frames of one DICOM cine / video share one line: how many
        frames were measured, the HC range, and how many need checking or had no head.
        """
        by_file: dict[str, list[MeasuredImage]] = {}
        for m in self.images:
            by_file.setdefault(str(m.row.get("path", m.image_id)), []).append(m)
        lines: list[tuple[str, bool]] = []
        for items in by_file.values():
            if len(items) == 1 and items[0].row.get("frame") is None:
                m = items[0]
                lines.append((f"{m.image_id}: {m.summary()}",
                              m.measurement.status == "check" or m.row.get("reacquire") is True))  # type: ignore[attr-defined]
                continue
            name = items[0].image_id.split("#")[0]
            ms = [i.measurement for i in items]
            found = [m for m in ms if m.found]  # type: ignore[attr-defined]
            text = f"{name} ({len(items)} frames): "
            if found:
                hc = np.array([m.hc for m in found], dtype=float)  # type: ignore[attr-defined]
                unit = found[0].unit  # type: ignore[attr-defined]
                text += (f"head measured in {len(found)}, HC {hc.min():.1f}-{hc.max():.1f} {unit} "
                         f"(median {np.median(hc):.1f})")
            else:
                text += "no head found in any frame"
            n_check = sum(m.status == "check" for m in ms)  # type: ignore[attr-defined]
            n_none = sum(m.status == "no_head" for m in ms)  # type: ignore[attr-defined]
            if n_check:
                first = next(m for m in ms if m.status == "check")  # type: ignore[attr-defined]
                text += f"; CHECK {n_check} frame(s): {first.check_reason}"  # type: ignore[attr-defined]
            if n_none and found:
                text += f"; no head found in {n_none} frame(s)"
            if not found:
                first = next((m for m in ms if m.fit is not None and m.fit.reason), None)  # type: ignore[attr-defined]
                if first is not None:
                    text += f" ({first.fit.reason})"  # type: ignore[attr-defined]
            lines.append((text + "; each frame in measurements.csv", bool(n_check)))
        return lines


def record_pixel_size(record, default: float | None = None) -> float | None:
    """A record's pixel size (mm): its ``pixel_spacing_mm`` (manifest / DICOM), else a ``pixel_size_mm``
    manifest column, else ``default``."""
    value = record.pixel_spacing_mm
    if value is None:
        raw = (record.extra or {}).get("pixel_size_mm", "")
        if raw not in ("", None):
            try:
                value = float(raw)
            except ValueError:
                raise DataError(f"{record.where()}, field 'pixel_size_mm': not a number: {raw!r}; give mm per "
                                "pixel or leave it empty") from None
    return value if value is not None else default


def prediction_records(data: str | Path, every_nth: int = 1) -> list:
    """Records of an image / folder / DICOM / video / manifest.

    A manifest needs only an ``image`` (HC18 style) or ``path`` column; ``exam`` /
    ``group`` (default: each image its own), ``pixel_size_mm`` / ``pixel_spacing_mm``
    and a reference ``hc_mm`` are optional (the reference is kept, as ``hc_ref_mm``,
    beside the measurement in ``measurements.csv``).
    """
    import csv

    from fetalscan.data.hc18 import load_biometry_manifest
    from fetalscan.data.records import Record, load_dataset

    data = Path(data)
    if data.suffix.lower() == ".csv" and data.is_file():
        with open(data, newline="", encoding="utf-8-sig") as fh:
            header = [h.strip() for h in next(csv.reader(fh), [])]
        if "image" in header and "path" not in header:
            items = load_biometry_manifest(data, require_masks=False, require_exam=False)
            return [Record(it.image, None, it.exam, it.name, pixel_spacing_mm=it.pixel_size_mm,
                           source_row=it.line, extra={"hc_mm": repr(it.hc_mm)} if it.hc_mm is not None else {})
                    for it in items]
    return load_dataset(data, require_labels=False, every_nth=every_nth).records


def reference_hc_mm(record) -> float | None:
    """The reference head circumference (mm) a manifest gives for a record (``hc_mm`` column), if any."""
    from fetalscan.data.records import parse_float

    raw = (record.extra or {}).get("hc_mm", "")
    if raw in ("", None):
        return None
    try:
        value = parse_float(str(raw), "hc_mm", record.source_row or 0, record.path)
    except DataError:
        raise DataError(f"{record.where()}, field 'hc_mm': not a number: {raw!r}; give the reference head "
                        "circumference in mm or leave it empty") from None
    if value is None or not np.isfinite(value) or value <= 0:
        raise DataError(f"{record.where()}, field 'hc_mm': must be a positive number of mm, got {raw!r}")
    return float(value)


def measure_records(segmenter, records: Sequence, cfg: BiometryPredictConfig, out: Path,
                    device=None) -> BiometryPrediction:
    """Measure every record with ``segmenter``; write ``out/overlays/*.png`` and ``out/measurements.csv``.

    ``out`` must exist (see :func:`fetalscan.fileio.prepare_out_dir`). Rows hold the
    image id, path, frame, the measurement columns
    (:meth:`~fetalscan.biometry.geometry.HeadMeasurement.to_row`), the plane columns
    with ``cfg.plane_check`` and the overlay path relative to ``out``.
    """
    import pandas as pd

    from fetalscan.biometry.geometry import save_overlay
    from fetalscan.data.records import iter_record_images
    from fetalscan.fileio import write_csv
    from fetalscan.progress import track

    out = Path(out)
    images: list[MeasuredImage] = []
    missing_ps, off_plane = 0, 0
    refs = [reference_hc_mm(r) for r in records]
    has_ref = any(v is not None for v in refs)
    for i, image in track(iter_record_images(records), "measuring", total=len(records)):
        r = records[i]
        ps = record_pixel_size(r, cfg.pixel_size_mm)
        missing_ps += ps is None
        m = segmenter.measure(image, ps, where=r.image_id)
        plane = {}
        if cfg.plane_check:
            from fetalscan.quality.planes import classify_planes

            (pr,) = classify_planes([image], device)
            plane = {"plane": pr.plane, "plane_confidence": pr.confidence, "brain_plane": pr.is_brain}
            if not pr.is_brain:
                off_plane += 1
                m.warnings.append(f"{r.image_id}: SonoNet reads the plane as {pr.plane} ({pr.confidence:.2f}), "
                                  f"not a brain plane; {BIOMETRY_PLANE}")
        quality = {}
        if cfg.quality_check:
            from fetalscan.biometry.quality import quality_summary
            from fetalscan.quality.planes import BRAIN_PLANES

            brain = sum(pr.probabilities.get(p, 0.0) for p in BRAIN_PLANES) if cfg.plane_check else None
            qs = quality_summary(segmenter, image, ps, where=r.image_id, plane_brain_prob=brain, device=device)
            quality = {"quality": qs["quality"], "reacquire": qs["reacquire"]}
            if qs["reacquire"]:
                m.warnings.append(f"{r.image_id}: image quality {qs['quality']:.2f} is below {qs['threshold']:.2f}: "
                                  "re-acquire the image if possible (docs/quality.md)")
        stem = Path(r.name).stem + (f"_frame{r.frame}" if r.frame is not None else "")
        overlay = out / "overlays" / f"{i:05d}_{stem}.png"
        save_overlay(overlay, image, m)
        row = {"image": r.image_id, "path": str(r.path), "frame": r.frame}
        for key, value in m.to_row().items():
            row[key] = value
            if key == "hc_mm" and has_ref:  # the input's reference HC, beside (never over) the measurement
                ref = refs[i]
                row["hc_ref_mm"] = ref
                row["hc_diff_mm"] = (value - ref) if (value is not None and ref is not None) else None
        row.update({**plane, **quality, "overlay": str(overlay.relative_to(out))})
        images.append(MeasuredImage(r.image_id, m, plane, row))
    write_csv(out / "measurements.csv", pd.DataFrame([m.row for m in images]))
    warnings = []
    if off_plane:
        warnings.append(f"{off_plane} image(s) are not read as a brain plane by SonoNet-16; check their overlays "
                        "(see the 'plane' column)")
    if missing_ps:
        warnings.append(f"{missing_ps} image(s) without a pixel size: their HC/BPD/OFD are in pixels and no "
                        "gestational age is given (give mm per pixel in a pixel_size_mm manifest column or as the "
                        "pixel_size_mm setting, --pixel-size on the command line)")
    return BiometryPrediction(images, out, missing_ps, off_plane, warnings)


def predict_to_folder(model_path: str | Path, data: str | Path, out: str | Path,
                      cfg: BiometryPredictConfig | None = None, *, overwrite: bool = False,
                      device: str = "auto") -> BiometryPrediction:
    """Load the segmenter, read the images, and measure them into ``out`` (see :func:`measure_records`)."""
    from fetalscan.biometry.segmenter import HeadSegmenter
    from fetalscan.fileio import prepare_out_dir
    from fetalscan.runtime import resolve_device

    cfg = cfg or BiometryPredictConfig()
    cfg.validate()
    dev = resolve_device(device)
    seg = HeadSegmenter.load(model_path, dev, cfg.backend)
    records = prediction_records(data, cfg.every_nth)
    out = prepare_out_dir(out, overwrite)
    return measure_records(seg, records, cfg, out, dev)
