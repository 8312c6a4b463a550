"""Read ultrasound DICOM files (single-frame and cine) as RGB uint8 frames.

Every frame handed to the rest of the pipeline is a ``numpy.uint8`` array of
shape ``(H, W, 3)`` in RGB order; grayscale is replicated to three channels.

Supported: photometric interpretations MONOCHROME1 (inverted), MONOCHROME2, RGB,
YBR_FULL, YBR_FULL_422 and PALETTE COLOR; 8- and 16-bit pixels; planar
configuration 0 and 1; native and every compressed transfer syntax pydicom has a
decoding plugin for (JPEG baseline and JPEG 2000 through Pillow, RLE natively;
JPEG-LS and lossless JPEG need ``pylibjpeg`` or ``python-gdcm``). MPEG/H.264
encapsulated video is not supported.

pydicom is imported lazily so that importing this module is instant.

References
----------
DICOM PS3.3 C.7.6.3 (Image Pixel Module), C.8.5.5 (US Region Calibration Module),
C.11.2 (VOI LUT Module).
"""

from __future__ import annotations

import contextlib
import logging
import math
import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fetalscan.data.limits import check_size
from fetalscan.errors import FetalscanError, ImageReadError

if TYPE_CHECKING:
    from pydicom.dataset import Dataset


logger = logging.getLogger(__name__)


_MAGIC_OFFSET = 128


_MAGIC = b"DICM"


_UNITS_CM = 3  # PhysicalUnitsXDirection 0x0003 = cm (PS3.3 C.8.5.5.1.15)


_REGION_2D = 1  # RegionSpatialFormat 0x0001 = 2D tissue or flow (PS3.3 C.8.5.5.1.1)


_YBR = ("YBR_FULL", "YBR_FULL_422")


_MONO = ("MONOCHROME1", "MONOCHROME2")


_INSTALL_HINT = (
    "install a decoder, e.g. `pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg` "
    "or `pip install python-gdcm`"
)


@dataclass(frozen=True)
class DicomInfo:
    """What the header of one DICOM file says about its image(s).

    Attributes
    ----------
    path : Path
        The file.
    n_frames : int
        Number of frames (1 for a single-frame image, >1 for a cine loop).
    rows, columns : int
        Frame height and width in pixels.
    photometric : str
        (0028,0004) Photometric Interpretation as stored, e.g. ``"MONOCHROME2"``.
    study_uid : str or None
        (0020,000D) StudyInstanceUID; the natural group of every frame of the file.
    patient_id : str or None
        (0010,0020) PatientID.
    pixel_spacing_mm : float or None
        Horizontal size of one pixel in mm, see :func:`pixel_spacing_mm`.
    frame_time_ms : float or None
        (0018,1063) Frame Time, else 1000 / (0018,0040) Cine Rate; None if neither.
    transfer_syntax : str or None
        (0002,0010) Transfer Syntax UID.
    bits_allocated : int or None
        (0028,0100) Bits Allocated.
    """

    path: Path
    n_frames: int
    rows: int
    columns: int
    photometric: str
    study_uid: str | None
    patient_id: str | None
    pixel_spacing_mm: float | None
    frame_time_ms: float | None
    transfer_syntax: str | None = None
    bits_allocated: int | None = None


def is_dicom(path: str | Path) -> bool:
    """Whether ``path`` is a DICOM Part 10 file, by the ``DICM`` magic at byte 128.

    Reads 132 bytes only, so it works on files without an extension and is cheap
    on large cine loops. Unreadable paths (missing, folders) give ``False``.
    """
    try:
        with open(path, "rb") as fh:
            fh.seek(_MAGIC_OFFSET)
            return fh.read(len(_MAGIC)) == _MAGIC
    except OSError:
        return False


def frame_indices(n_frames: int, every_nth: int = 1) -> list[int]:
    """Indices ``0, N, 2N, ...`` below ``n_frames``.

    Parameters
    ----------
    n_frames : int
        Number of frames in the file (>= 0).
    every_nth : int, default 1
        Keep one frame in ``every_nth``; 1 keeps every frame.

    Returns
    -------
    list of int

    Examples
    --------
    >>> frame_indices(7, every_nth=3)
    [0, 3, 6]
    """
    if isinstance(every_nth, bool) or not isinstance(every_nth, (int, np.integer)):
        raise FetalscanError(f"every_nth must be an integer >= 1, got {every_nth!r}")
    if every_nth < 1:
        raise FetalscanError(f"every_nth must be >= 1 (1 keeps every frame), got {every_nth}")
    if n_frames < 0:
        raise FetalscanError(f"n_frames must be >= 0, got {n_frames}")
    return list(range(0, int(n_frames), int(every_nth)))


def read_dicom_info(path: str | Path) -> DicomInfo:
    """Read the header of a DICOM file (pixel data is not read).

    Raises
    ------
    ImageReadError
        The file is missing, not DICOM, corrupt, or holds no image
        (Rows, Columns or Photometric Interpretation missing).
    """
    path = Path(path)
    with _corrupt_input_named(path):
        return _dicom_info(path)


def _dicom_info(path: Path) -> DicomInfo:
    ds = _read_dataset(path, stop_before_pixels=True)
    rows, columns, photometric = _image_geometry(path, ds)
    file_meta = getattr(ds, "file_meta", None)
    tsyntax = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    bits = ds.get("BitsAllocated")
    return DicomInfo(
        path=path,
        n_frames=_n_frames(path, ds),
        rows=rows,
        columns=columns,
        photometric=photometric,
        study_uid=_text(ds.get("StudyInstanceUID")),
        patient_id=_text(ds.get("PatientID")),
        pixel_spacing_mm=pixel_spacing_mm(ds),
        frame_time_ms=_frame_time_ms(ds),
        transfer_syntax=str(tsyntax) if tsyntax else None,
        bits_allocated=int(bits) if bits is not None else None,
    )


def study_pseudonym(study_uid: str) -> str:
    """The pseudonymous group id fetalscan writes for a DICOM study: ``study-`` + 16 hex digits.

    A one-way hash (SHA-256) of the StudyInstanceUID, stable across runs and machines, so
    frames and files of one study stay one group and results can be joined back by whoever
    holds the original UIDs (a pseudonym, not anonymity: de-identify first with
    ``fetalscan deid`` for that). No output of fetalscan carries the UID itself, which PS3.15
    Annex E counts among the identifying attributes.
    """
    import hashlib

    return "study-" + hashlib.sha256(("fetalscan-study:" + study_uid).encode()).hexdigest()[:16]


def read_dicom_frames(
    path: str | Path, indices: Sequence[int] | None = None
) -> list[np.ndarray]:
    """Decode frames of a DICOM file as RGB ``uint8`` arrays of shape ``(H, W, 3)``.

    Parameters
    ----------
    path : str or Path
        A DICOM Part 10 file.
    indices : sequence of int, optional
        0-based frames to return, in the order given (duplicates allowed); each
        distinct frame is decoded once. ``None`` returns every frame.

    Returns
    -------
    list of numpy.ndarray
        One ``(rows, columns, 3)`` uint8 RGB array per requested index.

    Notes
    -----
    MONOCHROME1 is inverted. Pixels with more than 8 bits are rescaled to 0-255
    through the Modality LUT / rescale, then the VOI LUT or window (first one)
    when the file has one, else the frame's own min-max. 8-bit pixels are used
    as stored. YBR is converted to RGB once: pydicom 3 already converts it for
    most transfer syntaxes and reports so; only frames it left in YBR are
    converted here.

    Raises
    ------
    ImageReadError
        Unreadable, corrupt or truncated file, no pixel data, an index out of
        range, or a compressed transfer syntax without an installed decoder.
    """
    path = Path(path)
    if indices is not None and len(indices) == 0:
        return []
    with _corrupt_input_named(path):
        return _dicom_frames(path, indices)


@contextlib.contextmanager
def _corrupt_input_named(path: Path) -> Iterator[None]:
    """Any failure other than ours becomes :class:`ImageReadError` naming the file: pydicom parses
    elements lazily, so a corrupt element (wrong length, unknown VR, a list where a number belongs)
    fails on first access, long after ``dcmread`` returned (found by tests/test_fuzz_readers.py)."""
    try:
        yield
    except FetalscanError:
        raise
    except Exception as exc:  # noqa: BLE001 - pydicom and numpy raise many types on corrupt input
        raise ImageReadError(f"{path}: corrupt DICOM file, an element cannot be read "
                             f"({type(exc).__name__}: {exc})") from exc


def _dicom_frames(path: Path, indices: Sequence[int] | None) -> list[np.ndarray]:
    # the header only: pydicom reads the pixel data of just the frames asked for from the file
    # (pydicom.pixels.iter_pixels), so a cine of thousands of frames costs the frames returned
    ds = _read_dataset(path, stop_before_pixels=True)
    rows, cols, _ = _image_geometry(path, ds)
    check_size(path, cols, rows, what="each frame")  # before any pixel is decoded
    if not _has_pixel_data(path):
        raise ImageReadError(f"{path}: DICOM file has no pixel data (7FE0,0010)")
    n_frames = _n_frames(path, ds)
    wanted = _check_indices(path, indices, n_frames)
    decoded = dict(_decode_frames(path, ds, sorted(set(wanted))))
    return [decoded[i] for i in wanted]


def pixel_spacing_mm(ds: Dataset) -> float | None:
    """Horizontal pixel size in mm from a DICOM header, or None if not calibrated.

    Order of sources, the first usable one wins (a value is never invented):

    1. (0018,6011) Sequence of Ultrasound Regions, DICOM PS3.3 C.8.5.5
       (US Region Calibration Module): among the regions whose
       PhysicalUnitsXDirection is 3 (cm), the first with RegionSpatialFormat 1
       (2D), else the first; PhysicalDeltaX (cm per pixel) * 10. If its
       PhysicalDeltaY differs, X is returned and a warning is logged.
    2. (0028,0030) Pixel Spacing, first value (row spacing, mm).
    3. (0018,1164) Imager Pixel Spacing, first value (mm).

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        A header (pixel data not needed).

    Returns
    -------
    float or None
        Millimetres per pixel; None when no source gives a positive finite value.
    """
    spacing = _us_region_spacing_mm(ds)
    if spacing is not None:
        return spacing
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = _first_positive(ds.get(keyword))
        if value is not None:
            return value
    return None


def _read_dataset(path: Path, *, stop_before_pixels: bool) -> Dataset:
    """``dcmread`` with every failure turned into :class:`ImageReadError`."""
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise ImageReadError(f"{path}: DICOM file {what}")
    try:
        return dcmread(path, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError as exc:
        raise ImageReadError(f"{path}: not a DICOM file ({exc})") from exc
    except Exception as exc:  # pydicom raises many types on corrupt/truncated input
        raise ImageReadError(
            f"{path}: cannot read DICOM file, it may be corrupt or truncated "
            f"({type(exc).__name__}: {exc})"
        ) from exc


def _image_geometry(path: Path, ds: Dataset) -> tuple[int, int, str]:
    """Rows, columns and photometric interpretation; error if the file has no image."""
    missing = [k for k in ("Rows", "Columns", "PhotometricInterpretation") if not ds.get(k)]
    if missing:
        raise ImageReadError(
            f"{path}: DICOM header has no image description ({', '.join(missing)} "
            "missing); the file may be truncated, or be a non-image object such as a "
            "DICOMDIR or structured report"
        )
    return int(ds.Rows), int(ds.Columns), str(ds.PhotometricInterpretation).strip()


def _n_frames(path: Path, ds: Dataset) -> int:
    raw = ds.get("NumberOfFrames")
    if raw is None or str(raw).strip() == "":
        return 1
    try:
        n = int(raw)
    except (TypeError, ValueError) as exc:
        raise ImageReadError(f"{path}: NumberOfFrames is not a number: {raw!r}") from exc
    if n < 1:
        raise ImageReadError(f"{path}: NumberOfFrames is {n}; the file holds no frame")
    return n


def _text(value: Any) -> str | None:
    text = str(value).strip() if value is not None else ""
    return text or None


def _positive(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def _first_positive(value: Any) -> float | None:
    """First value of a (possibly multi-valued) element, if positive and finite."""
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        value = value[0] if len(value) else None
    return _positive(value)


def _us_region_spacing_mm(ds: Dataset) -> float | None:
    """mm per pixel from the US Region Calibration Module (PS3.3 C.8.5.5)."""
    regions = ds.get("SequenceOfUltrasoundRegions") or []
    in_cm = [
        r for r in regions
        if r.get("PhysicalUnitsXDirection") == _UNITS_CM
        and _positive(r.get("PhysicalDeltaX")) is not None
    ]
    if not in_cm:
        return None
    region = next((r for r in in_cm if r.get("RegionSpatialFormat") == _REGION_2D), in_cm[0])
    dx = float(region.PhysicalDeltaX)
    dy = _positive(region.get("PhysicalDeltaY"))
    if (
        region.get("PhysicalUnitsYDirection") == _UNITS_CM
        and dy is not None
        and not math.isclose(dx, dy, rel_tol=1e-3)
    ):
        logger.warning(
            "%s: ultrasound region has anisotropic pixels (PhysicalDeltaX %.6g cm, "
            "PhysicalDeltaY %.6g cm); using X", getattr(ds, "filename", None) or "DICOM",
            dx, dy,
        )
    return dx * 10.0


def _frame_time_ms(ds: Dataset) -> float | None:
    frame_time = _positive(ds.get("FrameTime"))
    if frame_time is not None:
        return frame_time
    cine_rate = _positive(ds.get("CineRate"))
    return 1000.0 / cine_rate if cine_rate is not None else None


def _check_indices(path: Path, indices: Sequence[int] | None, n_frames: int) -> list[int]:
    if indices is None:
        return list(range(n_frames))
    wanted = [operator.index(i) for i in indices]
    bad = [i for i in wanted if not 0 <= i < n_frames]
    if bad:
        raise ImageReadError(
            f"{path}: frame {bad[0]} is out of range; the file has {n_frames} "
            f"frame(s), valid indices are 0..{n_frames - 1}"
        )
    return wanted


def _decode_frames(path: Path, ds: Dataset, indices: list[int]) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(index, rgb_uint8)`` for each of the sorted distinct ``indices``."""
    from pydicom.pixels import get_decoder, iter_pixels

    tsyntax = getattr(ds, "file_meta", {}).get("TransferSyntaxUID")
    if not tsyntax:
        raise ImageReadError(f"{path}: file meta has no (0002,0010) Transfer Syntax UID")
    name = getattr(tsyntax, "name", str(tsyntax))
    try:
        decoder = get_decoder(tsyntax)
    except (NotImplementedError, ValueError) as exc:
        raise ImageReadError(
            f"{path}: transfer syntax {name} ({tsyntax}) cannot be decoded by pydicom "
            "(MPEG/H.264 video and unknown syntaxes are not supported)"
        ) from exc
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies)
        raise ImageReadError(
            f"{path}: no decoder installed for transfer syntax {name} ({tsyntax}); "
            f"{_INSTALL_HINT} (pydicom options: {missing})"
        )
    try:
        frames = iter_pixels(path, indices=indices, as_rgb=True)
    except Exception as exc:
        raise ImageReadError(f"{path}: cannot decode pixel data ({name}): {exc}") from exc
    # as_rgb=True: pydicom converts every YCbCr interpretation to RGB
    stored = str(ds.get("PhotometricInterpretation", "")).strip()
    photometric = "RGB" if stored.startswith("YBR") else stored
    for index in indices:
        try:
            with _pydicom_quiet():  # its decoders log each plugin's failure; our one error says it
                arr = next(frames)
            yield index, _to_rgb8(arr, photometric, ds)
        except FetalscanError as exc:
            raise ImageReadError(f"{path}: frame {index}: {exc}") from exc
        except Exception as exc:
            raise ImageReadError(
                f"{path}: cannot decode frame {index} ({name}); the pixel data may be "
                f"corrupt or truncated ({type(exc).__name__}: {_one_line(exc)})"
            ) from exc


@contextlib.contextmanager
def _pydicom_quiet() -> Iterator[None]:
    """pydicom's logger silenced for the block (its plugins log decode failures on their own)."""
    logger = logging.getLogger("pydicom")
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """A library's (possibly multi-line) error message as one short line."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _has_pixel_data(path: Path) -> bool:
    """Whether the file holds (7FE0,0010) Pixel Data; its value is not loaded."""
    from pydicom import dcmread

    ds = dcmread(path, defer_size=1024, specific_tags=["PixelData"])
    return "PixelData" in ds


def _to_rgb8(arr: np.ndarray, photometric: str, ds: Dataset) -> np.ndarray:
    """One decoded frame -> contiguous ``(H, W, 3)`` uint8 RGB."""
    from pydicom.pixels import apply_color_lut, convert_color_space

    photometric = (photometric or str(ds.PhotometricInterpretation)).strip()
    if photometric in _MONO:
        gray = _gray_to_uint8(arr[..., 0] if arr.ndim == 3 else arr, ds)
        if photometric == "MONOCHROME1":
            gray = 255 - gray
        rgb = np.repeat(gray[..., None], 3, axis=-1)
    elif photometric == "RGB":
        rgb = _color_to_uint8(arr, ds)
    elif photometric in _YBR:  # pydicom left it in YBR: convert here, once
        rgb = convert_color_space(_color_to_uint8(arr, ds), photometric, "RGB")
    elif photometric == "PALETTE COLOR":
        rgb = _lut_to_uint8(apply_color_lut(arr, ds))
    else:
        raise ImageReadError(f"unsupported photometric interpretation {photometric!r}")
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ImageReadError(f"decoded frame has shape {rgb.shape}, expected (H, W, 3)")
    return np.ascontiguousarray(rgb, dtype=np.uint8)


def _gray_to_uint8(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """Grayscale -> uint8: 8-bit as stored; else modality LUT, VOI/window or min-max."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    has_rescale = "RescaleSlope" in ds or "ModalityLUTSequence" in ds
    if arr.dtype == np.uint8 and not has_rescale:
        return arr
    values = apply_modality_lut(arr, ds)
    voi_range = _voi_output_range(ds)
    if voi_range is not None:
        return _scale(apply_voi_lut(values, ds, index=0), *voi_range)
    return _scale(values, float(np.min(values)), float(np.max(values)))


def _voi_output_range(ds: Dataset) -> tuple[float, float] | None:
    """Output range of the VOI transform ``apply_voi_lut`` would apply, or None.

    Mirrors pydicom: a VOI LUT Sequence wins over windowing; windowing maps onto
    the stored-value range after the Modality LUT / rescale (PS3.3 C.11.2.1.2).
    """
    lut_seq = ds.get("VOILUTSequence")
    if lut_seq and lut_seq[0].get("LUTDescriptor") and lut_seq[0].get("LUTData") is not None:
        return 0.0, float(2 ** int(lut_seq[0].LUTDescriptor[2]) - 1)
    if ds.get("WindowCenter") is None or ds.get("WindowWidth") is None:
        return None
    if ds.get("ModalityLUTSequence"):
        return 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    bits = int(ds.BitsStored)
    if int(ds.get("PixelRepresentation", 0)) == 0:
        lo, hi = 0.0, float(2**bits - 1)
    else:
        lo, hi = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        lo, hi = lo * float(slope) + float(intercept), hi * float(slope) + float(intercept)
    return lo, hi


def _scale(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map ``[lo, hi]`` linearly onto 0..255 (clipped); a flat range gives zeros."""
    if hi == lo:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (values.astype(np.float64) - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _color_to_uint8(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """Three-sample pixels -> uint8, rescaling from BitsStored when wider than 8."""
    if arr.dtype == np.uint8:
        return arr
    bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 16)
    return _scale(arr, 0.0, float(2**bits - 1))


def _lut_to_uint8(rgb: np.ndarray) -> np.ndarray:
    """Palette output (uint8 or uint16 entries) -> uint8."""
    if rgb.dtype == np.uint8:
        return rgb[..., :3]
    return _scale(rgb[..., :3], 0.0, float(np.iinfo(rgb.dtype).max))


# ---------------------------------------------------------------------------
# Ultrasound regions (PS3.3 C.8.5.5) and the source identifiers of an image
# ---------------------------------------------------------------------------

#: PhysicalUnits X/Y Direction (PS3.3 C.8.5.5.1.15) code -> name.
_UNIT_NAMES = {0: "none", 1: "percent", 2: "dB", 3: "cm", 4: "seconds", 5: "hertz", 6: "dB/seconds",
               7: "cm/sec", 8: "cm2", 9: "cm2/sec", 0xA: "cm3", 0xB: "cm3/sec", 0xC: "degrees"}

#: RegionSpatialFormat (PS3.3 C.8.5.5.1.1) code -> name.
_FORMAT_NAMES = {0: "none", 1: "2D", 2: "M-Mode", 3: "Spectral", 4: "Wave form", 5: "Graphics"}


@dataclass(frozen=True)
class UltrasoundRegion:
    """One item of (0018,6011) Sequence of Ultrasound Regions (PS3.3 C.8.5.5).

    Bounds are inclusive pixel coordinates of the frame (x = column, y = row, 0-based):
    (0018,6018) Region Location Min X0, (0018,601A) Min Y0, (0018,601C) Max X1,
    (0018,601E) Max Y1. ``delta_x`` / ``delta_y`` are (0018,602C/602E) Physical Delta X/Y
    in ``units_x`` / ``units_y`` per pixel (PS3.3 C.8.5.5.1.15 codes, 3 = cm).

    Attributes
    ----------
    index : int
        Position in the sequence (0-based).
    x0, y0, x1, y1 : int or None
        Inclusive bounds; None when the file omits them (the region then spans the frame).
    spatial_format : int or None
        (0018,6012) Region Spatial Format: 1 = 2D tissue or flow, 2 = M-mode, 3 = spectral ...
    data_type : int or None
        (0018,6014) Region Data Type: 1 = tissue, 2 = colour flow, 3 = PW spectral Doppler ...
    units_x, units_y : int or None
        (0018,6024/6026) Physical Units X/Y Direction.
    delta_x, delta_y : float or None
        Physical size of one pixel in those units (None if absent, zero or not finite).
    """

    index: int
    x0: int | None
    y0: int | None
    x1: int | None
    y1: int | None
    spatial_format: int | None
    data_type: int | None
    units_x: int | None
    units_y: int | None
    delta_x: float | None
    delta_y: float | None

    @property
    def is_2d(self) -> bool:
        """RegionSpatialFormat 1: a 2D (B-mode or colour-flow) image, where lengths are measured."""
        return self.spatial_format == _REGION_2D

    @property
    def calibrated_mm(self) -> bool:
        """A 2D region with a positive Physical Delta X in cm: lengths in it can be given in mm."""
        return self.is_2d and self.units_x == _UNITS_CM and self.delta_x is not None

    @property
    def spacing_mm(self) -> float | None:
        """mm per pixel along x (Physical Delta X in cm * 10), or None if not in cm."""
        return self.delta_x * 10.0 if self.units_x == _UNITS_CM and self.delta_x is not None else None

    @property
    def anisotropic(self) -> bool:
        """Both directions in cm and Physical Delta Y differs from X by more than 0.1 %."""
        return (self.units_x == _UNITS_CM and self.units_y == _UNITS_CM and self.delta_x is not None
                and self.delta_y is not None and not math.isclose(self.delta_x, self.delta_y, rel_tol=1e-3))

    def contains(self, x: float, y: float) -> bool:
        """Whether the point (x = column, y = row, pixel centres at integers) lies in the region."""
        lo_x = -0.5 if self.x0 is None else self.x0 - 0.5
        lo_y = -0.5 if self.y0 is None else self.y0 - 0.5
        hi_x = math.inf if self.x1 is None else self.x1 + 0.5
        hi_y = math.inf if self.y1 is None else self.y1 + 0.5
        return lo_x <= x < hi_x and lo_y <= y < hi_y

    def describe(self) -> str:
        """``region 1 (2D, x 336-639, y 24-415, 0.0383 cm/pixel)`` for messages."""
        fmt = _FORMAT_NAMES.get(self.spatial_format, str(self.spatial_format))
        unit = _UNIT_NAMES.get(self.units_x, str(self.units_x))
        delta = f"{self.delta_x:.4g} {unit}/pixel" if self.delta_x is not None else "no physical delta"
        return f"region {self.index} ({fmt}, x {self.x0}-{self.x1}, y {self.y0}-{self.y1}, {delta})"


def ultrasound_regions(ds: Dataset) -> list[UltrasoundRegion]:
    """Every region of (0018,6011) Sequence of Ultrasound Regions, in file order.

    The US Region Calibration Module (DICOM PS3.3 C.8.5.5) lets one frame hold several
    regions, e.g. a B-mode image beside a Doppler strip, two B-mode images side by side,
    or a colour bar; each has its own bounds and its own calibration. For US Image and US
    Multi-frame Image objects the sequence applies to every frame of the file.

    Returns
    -------
    list of UltrasoundRegion
        Empty when the file has no such sequence.
    """
    out = []
    for i, r in enumerate(ds.get("SequenceOfUltrasoundRegions") or []):
        out.append(UltrasoundRegion(
            index=i,
            x0=_int_or_none(r.get("RegionLocationMinX0")),
            y0=_int_or_none(r.get("RegionLocationMinY0")),
            x1=_int_or_none(r.get("RegionLocationMaxX1")),
            y1=_int_or_none(r.get("RegionLocationMaxY1")),
            spatial_format=_int_or_none(r.get("RegionSpatialFormat")),
            data_type=_int_or_none(r.get("RegionDataType")),
            units_x=_int_or_none(r.get("PhysicalUnitsXDirection")),
            units_y=_int_or_none(r.get("PhysicalUnitsYDirection")),
            delta_x=_positive(r.get("PhysicalDeltaX")),
            delta_y=_positive(r.get("PhysicalDeltaY")),
        ))
    return out


def region_at(regions: Sequence[UltrasoundRegion], x: float, y: float) -> UltrasoundRegion | None:
    """The region in which lengths at pixel (x, y) are calibrated, or None.

    Among the regions whose bounds contain the point, a 2D region calibrated in cm wins
    (a colour bar or annotation region drawn over a B-mode image does not hide it), then
    any 2D region, then the first one containing it (PS3.3 C.8.5.5: the calibration of a
    point is that of the region it lies in). None when no region contains the point.

    Examples
    --------
    >>> left = UltrasoundRegion(0, 0, 0, 99, 99, 1, 1, 3, 3, 0.01, 0.01)
    >>> right = UltrasoundRegion(1, 100, 0, 199, 99, 1, 1, 3, 3, 0.02, 0.02)
    >>> region_at([left, right], 150.0, 40.0).index
    1
    """
    inside = [r for r in regions if r.contains(x, y)]
    for rule in (lambda r: r.calibrated_mm, lambda r: r.is_2d, lambda r: True):
        hit = next((r for r in inside if rule(r)), None)
        if hit is not None:
            return hit
    return None


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value) if value is not None and str(value).strip() != "" else None
    except (TypeError, ValueError):
        return None


#: Patient (PS3.3 C.7.1.1), General Study (C.7.2.1) and Patient Study (C.7.2.2) attributes a
#: derived object copies from its source so that a PACS files it with the patient and study.
PATIENT_STUDY_KEYWORDS = (
    "SpecificCharacterSet",
    "PatientName", "PatientID", "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence",
    "PatientBirthDate", "PatientSex", "OtherPatientIDsSequence", "PatientComments",
    "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID",
    "AccessionNumber", "IssuerOfAccessionNumberSequence", "StudyDescription",
    "PatientAge", "PatientSize", "PatientWeight",
)

#: The identifiers of the source instance itself (PS3.3 C.12.1 SOP Common, C.7.3.1 General Series).
_INSTANCE_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "Modality", "NumberOfFrames",
                      "Rows", "Columns", "SequenceOfUltrasoundRegions", "PixelSpacing")


@dataclass(frozen=True)
class DicomSource:
    """Where one analysed image came from in DICOM terms, for outputs that refer back to it.

    Attributes
    ----------
    study_uid, series_uid, sop_instance_uid, sop_class_uid : str
        (0020,000D), (0020,000E), (0008,0018), (0008,0016) of the source instance.
    frame_number : int or None
        1-based frame of a multi-frame source (PS3.3 C.7.6.6, Referenced Frame Number);
        None for a single-frame instance.
    header : pydicom.dataset.Dataset
        A copy holding only the Patient, General Study and Patient Study module attributes
        (:data:`PATIENT_STUDY_KEYWORDS`) and the instance identifiers; no pixels. It lives in
        memory only; nothing logs it.
    """

    study_uid: str | None
    series_uid: str | None
    sop_instance_uid: str | None
    sop_class_uid: str | None
    frame_number: int | None
    header: Any

    @property
    def referenceable(self) -> bool:
        """All four UIDs present: another object can reference this instance."""
        return all((self.study_uid, self.series_uid, self.sop_instance_uid, self.sop_class_uid))


def read_dicom_source(path: str | Path, frame: int | None = None) -> DicomSource:
    """The identifiers and patient/study header of a DICOM file (pixel data is not read).

    Parameters
    ----------
    path : str or Path
        A DICOM Part 10 image file.
    frame : int or None
        0-based frame index of a multi-frame file (stored 1-based, as DICOM counts frames).

    A UID the file lacks is None (see :attr:`DicomSource.referenceable`).

    Raises
    ------
    ImageReadError
        The file is unreadable or not DICOM.
    """
    from pydicom.dataset import Dataset as _Dataset

    path = Path(path)
    ds = _read_dataset(path, stop_before_pixels=True)
    header = _Dataset()
    for keyword in PATIENT_STUDY_KEYWORDS + _INSTANCE_KEYWORDS:
        if keyword in ds:
            header[keyword] = ds[keyword]
    n_frames = _n_frames(path, ds)
    number = None if frame is None and n_frames <= 1 else int(frame or 0) + 1
    uids = (_text(ds.get(k)) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"))
    return DicomSource(*uids, frame_number=number, header=header)


def read_ultrasound_regions(path: str | Path) -> list[UltrasoundRegion]:
    """:func:`ultrasound_regions` of a DICOM file's header (pixel data is not read)."""
    return ultrasound_regions(_read_dataset(Path(path), stop_before_pixels=True))
