"""De-identify DICOM files: PS3.15 Annex E Basic Application Level Confidentiality Profile.

The element-level work is done by **dicognito** (a maintained implementation on pydicom):
every UI value except class and transfer-syntax UIDs is replaced by a keyed hash (so
one original UID maps to one new UID in every file of a run -- a study stays a study,
references between files still resolve), every PN by a made-up name, the patient, study,
accession and procedure IDs by keyed pseudonyms, addresses and institution names by
made-up ones, and dates are shifted. fetalscan adds what the profile asks for and
dicognito leaves to the caller:

- **Per-patient date shifting** (PS3.15 E.3.6, Retain Longitudinal Temporal Information
  with Modified Dates Option, ``keep_dates_shifted``): every DA/DT value of a patient (study,
  series, content and acquisition dates, the last menstrual date, ...) moves back by the
  same whole number of days, chosen per patient from a keyed hash; intervals, and so
  gestational age, stay computable. Without it, every DA, DT and TM value is emptied
  (action Z). The patient's birth date is always emptied (Table E.1-1: Z).
- Table E.1-1 actions dicognito does not apply: private attributes removed (no Retain
  Safe Private Option), curves and overlays (groups 50xx, 60xx) and the icon image
  removed, free text (LT, ST, UT) and descriptions / comments removed (no Clean
  Descriptors Option), patient characteristics (age, size, weight, ...) removed (no
  Retain Patient Characteristics Option).
- A final check: any remaining text element that contains one of the file's original
  identifiers (patient name parts, IDs, accession number, birth date, institution,
  referring physician, UIDs; 4 characters or more) is removed, and the header is
  scanned byte by byte for them before anything is written -- a hit refuses the file.
- **Burned-in text** (``mask_burned_in``, PS3.15 E.3.1 Clean Pixel Data Option): every
  pixel outside the scan sector (:mod:`fetalscan.data.sector`) is blanked; only then is
  (0028,0301) Burned In Annotation set to NO.
- (0012,0062) Patient Identity Removed is YES when the pixels are known to be clean
  (masked here, or Burned In Annotation was already NO) and NO otherwise -- the header
  is then clean but text burned into the pixels may remain. (0012,0063)
  De-identification Method and (0012,0064) its Code Sequence name what was applied with
  PS3.16 CID 7050 codes: 113100 Basic Application Confidentiality Profile, 113107 Retain
  Longitudinal Temporal Information Modified Dates Option, 113101 Clean Pixel Data Option.

Files: a file or a folder tree in, the same tree out (folder names kept, file names
replaced by the new SOP Instance UID), never over the input; each file is written whole
or not at all. A file that cannot be de-identified is reported by name and the rest go
on. The original -> pseudonym key goes to a separate CSV only when asked.

References
----------
DICOM PS3.15 Annex E (Attribute Confidentiality Profiles), Table E.1-1; PS3.16 CID 7050
(De-identification Method); PS3.3 C.7.6.3 (Image Pixel), C.8.5.5 (US Region Calibration).
"""

from __future__ import annotations

import hashlib
import hmac
import io
import logging
import os
import secrets
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fetalscan.data.sector import SectorConfig
from fetalscan.errors import DataError, FetalscanError, OutputError

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

log = logging.getLogger(__name__)


DICOM_SUFFIXES = (".dcm", ".dicom")


#: Text VRs searched for left-over identifiers.
_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UR", "UT"})


#: Free-text VRs: comments, histories, derivation descriptions (Table E.1-1: X).
_FREE_TEXT_VRS = frozenset({"LT", "ST", "UT"})


#: Table E.1-1 X actions on attributes dicognito keeps: patient characteristics (no Retain Patient
#: Characteristics Option) and device identity (no Retain Device Identity Option).
_NOT_RETAINED = frozenset({"PatientAge", "PatientSize", "PatientWeight", "EthnicGroup", "PatientSexNeutered",
                           "SmokingStatus", "MedicalAlerts", "Allergies", "PatientBirthTime", "DeviceSerialNumber",
                           "SoftwareVersions", "IconImageSequence"})


_MIN_IDENTIFIER = 4  # shorter identifiers are not searched for (they would match by chance)


@dataclass(frozen=True)
class DeidConfig:
    """Options of :func:`deidentify` (``fetalscan deid`` flags map onto them 1:1).

    Attributes
    ----------
    keep_dates_shifted : bool
        Keep dates, shifted per patient by the same number of days (PS3.15 E.3.6, modified
        dates); otherwise every date and time is emptied.
    mask_burned_in : bool
        Blank every pixel outside the scan sector (PS3.15 E.3.1) and set Burned In
        Annotation to NO.
    key_file : Path, optional
        Write the original -> pseudonym key (CSV) there; never inside the output folder.
    overwrite : bool
        Allow a non-empty output folder (files are replaced one by one).
    secret : str, optional
        Key of the pseudonyms, UID hashes and date offsets. None (default): a fresh random
        secret per run, so pseudonyms cannot be recomputed from the originals. A fixed
        secret makes runs repeatable -- keep it as confidential as the key file.
    min_shift_days, max_shift_days : int
        Dates move back by a per-patient number of days in this range.
    sector : SectorConfig
        How the scan sector is found for ``mask_burned_in``.
    """

    keep_dates_shifted: bool = False
    mask_burned_in: bool = False
    key_file: Path | None = None
    overwrite: bool = False
    secret: str | None = field(default=None, repr=False)
    min_shift_days: int = 62
    max_shift_days: int = 730
    sector: SectorConfig = SectorConfig()

    def __post_init__(self) -> None:
        if not 0 <= self.min_shift_days <= self.max_shift_days:
            raise FetalscanError(f"date shift range must satisfy 0 <= min <= max, got "
                                 f"{self.min_shift_days}..{self.max_shift_days} days")


@dataclass
class DeidResult:
    """What :func:`deidentify` did.

    Attributes
    ----------
    written : list of Path
        Output files, relative to the output folder.
    failed : list of (Path, str)
        Input files (relative to the input) that were not written, with the reason.
    skipped : list of Path
        Input files that are not DICOM (left alone).
    masked : int
        Files whose pixels outside the scan sector were blanked.
    pixels_unchecked : int
        Files written with Burned In Annotation not NO (text may remain in the pixels).
    key_file : Path or None
        The key file, when one was asked for.
    """

    written: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    masked: int = 0
    pixels_unchecked: int = 0
    key_file: Path | None = None

    @property
    def ok(self) -> bool:
        return not self.failed


@dataclass(frozen=True)
class _Original:
    """The identifiers of one file before de-identification (kept in memory only)."""

    patient_key: str
    patient_id: str
    patient_name: str
    study_uid: str
    sop_uid: str
    needles: tuple[str, ...]  # strings that must not survive, upper case


def deidentify(src: str | Path, out: str | Path, cfg: DeidConfig = DeidConfig()) -> DeidResult:
    """De-identify a DICOM file or every DICOM file of a folder tree into ``out``.

    Parameters
    ----------
    src : path
        A DICOM file, or a folder searched recursively (``.dcm`` / ``.dicom`` files and
        files with the DICM magic; other files are skipped and counted).
    out : path
        Output folder; it mirrors ``src``'s sub-folders, each file named by its new SOP
        Instance UID. It may not be ``src``, lie inside it, or contain it.
    cfg : DeidConfig

    Returns
    -------
    DeidResult
        ``failed`` names every file that was not written and why; the others are written.

    Raises
    ------
    FetalscanError
        Before any file is written: input missing, output overlapping the input, output
        not empty (without ``overwrite``), key file inside the output, dicognito missing.
    """
    from fetalscan.fileio import prepare_out_dir

    src, out = Path(src).resolve(), Path(out).resolve()
    _check_paths(src, out, cfg.key_file)
    _require_dicognito()
    files, skipped = _input_files(src)
    if not files:
        raise DataError(f"{src}: no DICOM file found (looked for .dcm / .dicom files and the DICM magic)")
    prepare_out_dir(out, overwrite=cfg.overwrite)
    run = _Run(cfg.secret or secrets.token_hex(32), cfg)
    result = DeidResult(skipped=skipped)
    key_rows: list[dict[str, Any]] = []
    used: dict[Path, Path] = {}
    for path, rel in files:
        try:
            row = _deidentify_file(path, rel, out, run, used)
        except Exception as exc:  # noqa: BLE001 - one bad file is reported by name, the rest go on
            reason = str(exc) if isinstance(exc, FetalscanError) else f"{type(exc).__name__}: {exc}"
            result.failed.append((rel, reason))
            log.info("not de-identified: %s", reason if str(path) in reason else f"{path}: {reason}")
            continue
        result.written.append(row["output"])
        result.masked += int(row["masked"])
        result.pixels_unchecked += int(not row["pixels_clean"])
        key_rows.append(row)
    if cfg.key_file is not None:
        result.key_file = _write_key(Path(cfg.key_file), key_rows, src)
    return result


class _Run:
    """Per-run state: the secret, one dicognito anonymizer per patient (cached)."""

    def __init__(self, secret: str, cfg: DeidConfig) -> None:
        self.secret = secret
        self.cfg = cfg
        self._anonymizers: dict[str, Any] = {}

    def offset_days(self, patient_key: str) -> int:
        """Days every date of this patient moves back (keyed hash, same for every file of the patient)."""
        span = self.cfg.max_shift_days - self.cfg.min_shift_days + 1
        digest = hmac.new(self.secret.encode(), f"date-offset\x00{patient_key}".encode(), hashlib.sha256).digest()
        return self.cfg.min_shift_days + int.from_bytes(digest[:8], "big") % span

    def token(self, text: str) -> str:
        return hmac.new(self.secret.encode(), text.encode(), hashlib.sha256).hexdigest()[:24]

    def anonymizer(self, patient_key: str):
        """dicognito's anonymizer, seeded with the run's secret (UIDs, IDs and names map alike in every
        file), with this patient's own date handling put first."""
        if patient_key not in self._anonymizers:
            from dicognito.anonymizer import Anonymizer
            from dicognito.datetimeanonymizer import DateTimeAnonymizer

            anonymizer = Anonymizer(seed=self.secret)
            if self.cfg.keep_dates_shifted:
                anonymizer.add_element_handler(DateTimeAnonymizer(-24 * self.offset_days(patient_key)))
            else:
                anonymizer.add_element_handler(_EmptyDatesAndTimes())
            self._anonymizers[patient_key] = anonymizer
        return self._anonymizers[patient_key]


class _EmptyDatesAndTimes:
    """dicognito element handler: every DA, DT and TM value emptied (PS3.15 Table E.1-1 action Z)."""

    def __call__(self, dataset: Dataset, element: Any) -> bool:  # noqa: ARG002 - dicognito's handler signature
        if element.VR not in ("DA", "DT", "TM"):
            return False
        element.value = ""
        return True

    def describe_actions(self) -> Iterator[str]:
        yield "Empty all DA, DT and TM elements"


def _require_dicognito() -> None:
    try:
        import dicognito  # noqa: F401
    except ImportError as exc:
        raise FetalscanError("de-identification needs dicognito: pip install 'fetalscan[privacy]' "
                             "(or pip install 'dicognito>=0.17,<1')") from exc


def _inside(a: Path, b: Path) -> bool:
    """Whether ``a`` is ``b`` or lies inside it."""
    return a == b or b in a.parents


def _check_paths(src: Path, out: Path, key_file: Path | None) -> None:
    if not src.exists():
        raise DataError(f"input not found: {src}")
    if out == src or (src.is_dir() and _inside(out, src)):
        raise OutputError(f"output folder {out} is the input or lies inside it; choose a folder outside {src}")
    if src.is_dir() and _inside(src, out):
        raise OutputError(f"input {src} lies inside the output folder {out}; choose another output folder")
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {out} exists and is not a folder")
    if key_file is not None:
        key = Path(key_file).resolve()
        if _inside(key, out) or (src.is_dir() and _inside(key, src)) or key == src:
            raise OutputError(f"key file {key} must lie outside the input and the output folder (it re-identifies "
                              "the patients; keep it apart from the de-identified files)")


def _input_files(src: Path) -> tuple[list[tuple[Path, Path]], list[Path]]:
    """``(path, path relative to src)`` of the DICOM files, and the other files (relative)."""
    from fetalscan.data.dicom import is_dicom

    if src.is_file():
        return [(src, Path(src.name))], []
    files, skipped = [], []
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        rel = path.relative_to(src)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if path.suffix.lower() in DICOM_SUFFIXES or is_dicom(path):
            files.append((path, rel))
        else:
            skipped.append(rel)
    return files, skipped


def _deidentify_file(path: Path, rel: Path, out: Path, run: _Run, used: dict[Path, Path]) -> dict[str, Any]:
    """De-identify one file and write it; returns its row of the key."""
    ds = _read(path)
    original = _original_identity(ds, path)
    try:
        return _deidentify_dataset(ds, original, path, rel, out, run, used)
    except Exception as exc:  # noqa: BLE001 - a library's message may quote a value: redact before it is shown
        reason = str(exc).removeprefix(f"{path}: ")
        reason = reason if isinstance(exc, FetalscanError) else f"{type(exc).__name__}: {reason}"
        raise DataError(f"{path}: {_redact(reason, original.needles)}") from exc


def _redact(text: str, needles: tuple[str, ...]) -> str:
    """``text`` with every original identifier replaced by ``<redacted>`` (case-insensitive)."""
    import re

    for needle in needles:
        text = re.sub(re.escape(needle), "<redacted>", text, flags=re.IGNORECASE)
    return text


def _deidentify_dataset(ds: Dataset, original: _Original, path: Path, rel: Path, out: Path, run: _Run,
                        used: dict[Path, Path]) -> dict[str, Any]:
    """De-identify one read file and write it; returns its row of the key."""
    from fetalscan.fileio import atomic_open

    cfg = run.cfg
    masked = False
    if cfg.mask_burned_in:
        _mask_outside_sector(ds, path, cfg.sector)
        masked = True
    _apply_profile_removals(ds)
    offset = run.offset_days(original.patient_key) if cfg.keep_dates_shifted else None
    with warnings.catch_warnings():  # dicognito probes e.g. 'LastMenstrualTime', which pydicom warns is no keyword
        warnings.filterwarnings("ignore", message="Invalid value .* used with the 'in' operator")
        run.anonymizer(original.patient_key).anonymize(ds)
    _remove_leftover_identifiers(ds, original.needles)
    _refuse_leftovers(ds, original.needles, path)  # before fetalscan's own attributes are added
    pixels_clean = masked or str(ds.get("BurnedInAnnotation", "")).upper() == "NO"
    _set_deidentification_attributes(ds, cfg, masked, pixels_clean)
    name = f"{ds.get('SOPInstanceUID') or run.token(str(rel))}.dcm"
    target = out / rel.parent / name
    if target in used:
        raise DataError(f"{path}: same SOP Instance UID as {used[target]}; a duplicate instance was not written")
    used[target] = path
    ds.preamble = b"\x00" * 128
    with atomic_open(target, "wb") as fh:
        ds.save_as(fh, enforce_file_format=True)
    return {"input": rel.as_posix(), "output": target.relative_to(out), "masked": masked,
            "pixels_clean": pixels_clean, "original_patient_id": original.patient_id,
            "original_patient_name": original.patient_name, "pseudonym_patient_id": str(ds.get("PatientID", "")),
            "pseudonym_patient_name": str(ds.get("PatientName", "")), "original_study_uid": original.study_uid,
            "pseudonym_study_uid": str(ds.get("StudyInstanceUID", "")), "original_sop_instance_uid": original.sop_uid,
            "pseudonym_sop_instance_uid": str(ds.get("SOPInstanceUID", "")),
            "date_shift_days": -offset if offset is not None else ""}


def _read(path: Path) -> Dataset:
    """The whole file, or :class:`DataError` naming it (pydicom raises many types on corrupt input)."""
    from pydicom import dcmread

    try:
        ds = dcmread(path)
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"{path}: cannot read as DICOM, it may be corrupt or truncated "
                        f"({type(exc).__name__}: {exc})") from exc
    if "SOPClassUID" not in ds and "PixelData" not in ds:
        raise DataError(f"{path}: not a DICOM instance (no SOP Class UID and no pixel data)")
    return ds


def _original_identity(ds: Dataset, path: Path) -> _Original:
    """The identifiers of a file, and the strings that must not survive de-identification."""
    from pydicom.multival import MultiValue

    def text(keyword: str) -> str:
        value = ds.get(keyword)
        return "" if value is None else str(value).strip()

    patient_id, name, birth = text("PatientID"), text("PatientName"), text("PatientBirthDate")
    study_uid = text("StudyInstanceUID")
    key = (f"id:{patient_id}" if patient_id else f"name:{name}|{birth}" if name
           else f"study:{study_uid}" if study_uid else f"file:{path}")
    needles: set[str] = {patient_id, name, birth, text("AccessionNumber"), text("InstitutionName"),
                         text("InstitutionAddress"), text("PatientAddress"), text("OtherPatientIDs"),
                         text("MedicalRecordLocator")}
    for keyword in ("PatientName", "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName",
                    "OtherPatientNames", "PatientMotherBirthName", "NameOfPhysiciansReadingStudy"):
        for part in text(keyword).replace("^", " ").replace("=", " ").split():
            needles.add(part)
    for element in ds.iterall():  # every instance UID (class and transfer-syntax UIDs are public)
        if element.VR == "UI" and element.value and not (element.keyword or "").endswith("ClassUID"):
            values = element.value if isinstance(element.value, MultiValue) else [element.value]
            needles.update(str(v) for v in values)
    needles.discard(str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "")))
    kept = tuple(sorted({n.upper() for n in needles if len(n) >= _MIN_IDENTIFIER}, key=len, reverse=True))
    return _Original(key, patient_id, name, study_uid, text("SOPInstanceUID"), kept)


def _apply_profile_removals(ds: Dataset) -> None:
    """The Table E.1-1 X / Z actions dicognito does not take (see the module docstring)."""
    ds.remove_private_tags()
    for element in list(ds):
        group = element.tag.group
        if 0x5000 <= group <= 0x50FF or 0x6000 <= group <= 0x60FF:  # curves, overlays
            del ds[element.tag]

    def strip(dataset: Dataset, element: Any) -> None:
        keyword = element.keyword or ""
        if (element.VR in _FREE_TEXT_VRS or keyword.endswith(("Description", "Comments", "Comment"))
                or keyword in _NOT_RETAINED):
            del dataset[element.tag]

    ds.walk(strip)
    if "PatientBirthDate" in ds:
        ds.PatientBirthDate = ""


def _remove_leftover_identifiers(ds: Dataset, needles: tuple[str, ...]) -> None:
    """Remove every text element that still holds one of the original identifiers."""
    def sweep(dataset: Dataset, element: Any) -> None:
        if element.VR in _TEXT_VRS and element.value not in (None, ""):
            value = str(element.value).upper()
            if any(n in value for n in needles):
                del dataset[element.tag]

    ds.walk(sweep)


def _refuse_leftovers(ds: Dataset, needles: tuple[str, ...], path: Path) -> None:
    """Scan the header's bytes (everything but the pixel data) for an original identifier."""
    pixels = ds.pop(0x7FE00010, None)
    try:
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
    finally:
        if pixels is not None:
            ds[0x7FE00010] = pixels
    header = buffer.getvalue().upper()
    for needle in needles:
        at = header.find(needle.encode("utf-8", "ignore"))
        if at >= 0:
            raise DataError(f"{path}: an original identifier is still in the de-identified header at byte {at} "
                            "(an element fetalscan and dicognito do not handle); the file was not written")


def _set_deidentification_attributes(ds: Dataset, cfg: DeidConfig, masked: bool, pixels_clean: bool) -> None:
    """(0012,0062/0063/0064), (0028,0301) and (0028,0303) as PS3.15 E.1.1 and E.3 ask."""
    from importlib import metadata

    from pydicom.dataset import Dataset as Item
    from pydicom.sr.codedict import codes

    from fetalscan import __version__

    options = [codes.DCM.BasicApplicationConfidentialityProfile]
    method = [f"fetalscan {__version__} dicognito {metadata.version('dicognito')}"[:64],
              "PS3.15 E Basic Application Level Confidentiality Profile"]
    if cfg.keep_dates_shifted:
        options.append(codes.DCM.RetainLongitudinalTemporalInformationModifiedDatesOption)
        method.append("dates shifted by a per-patient offset")
    if masked:
        options.append(codes.DCM.CleanPixelDataOption)
        method.append("pixels outside the scan sector blanked")
        ds.BurnedInAnnotation = "NO"
    ds.LongitudinalTemporalInformationModified = "MODIFIED" if cfg.keep_dates_shifted else "REMOVED"
    ds.PatientIdentityRemoved = "YES" if pixels_clean else "NO"
    ds.DeidentificationMethod = method
    items = []
    for code in options:
        item = Item()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code.value, code.scheme_designator, code.meaning
        items.append(item)
    ds.DeidentificationMethodCodeSequence = items


def _mask_outside_sector(ds: Dataset, path: Path, sector_cfg: SectorConfig) -> None:
    """Blank every pixel outside the scan sector, in every frame (one mask per file), stored uncompressed."""
    from fetalscan.data.dicom import read_dicom_frames, ultrasound_regions
    from fetalscan.data.sector import detect_sector

    if "PixelData" not in ds:
        raise DataError(f"{path}: no pixel data to mask (7FE0,0010)")
    n_frames = int(ds.get("NumberOfFrames") or 1)
    sample = sorted(set(np.linspace(0, n_frames - 1, min(n_frames, sector_cfg.max_frames)).round().astype(int)))
    frames = read_dicom_frames(path, [int(i) for i in sample])
    sector = detect_sector(frames, ultrasound_regions(ds), sector_cfg, where=str(path))
    arr, photometric = _native_pixels(ds, path)
    fill = _fill_value(ds, arr, photometric)
    outside = ~sector.mask
    clip = arr if n_frames > 1 else arr[None]
    for frame in clip:
        frame[outside] = fill
    bits = int(ds.get("BitsStored") or arr.dtype.itemsize * 8)
    ds.set_pixel_data(arr, photometric, min(bits, arr.dtype.itemsize * 8), generate_instance_uid=False)
    log.info("%s: blanked %.0f%% of the frame outside the scan sector (%s)", path.name,
             100 * (1 - sector.fraction), sector.source)


def _native_pixels(ds: Dataset, path: Path) -> tuple[np.ndarray, str]:
    """All frames as stored (YBR converted to RGB by pydicom where it does so), and their photometric."""
    from pydicom.pixels import as_pixel_options, get_decoder

    try:
        decoder = get_decoder(ds.file_meta.TransferSyntaxUID)
        arr, meta = decoder.as_array(ds, **as_pixel_options(ds, as_rgb=True))
    except Exception as exc:  # noqa: BLE001 - any decoder failure: the file is named, the rest go on
        raise DataError(f"{path}: cannot decode the pixel data to mask it ({type(exc).__name__}: {exc})") from exc
    photometric = str(meta.get("photometric_interpretation") or ds.PhotometricInterpretation).strip()
    if photometric.startswith("YBR"):
        photometric = "YBR_FULL"  # decoded arrays are full resolution
    return np.array(arr, copy=True), photometric


def _fill_value(ds: Dataset, arr: np.ndarray, photometric: str) -> Any:
    """The stored value that displays as black."""
    if photometric == "MONOCHROME1":
        return arr.max()
    if photometric == "MONOCHROME2":
        return arr.min()
    if photometric == "YBR_FULL":
        return (0, 128, 128)
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        descriptor = ds.RedPaletteColorLookupTableDescriptor
        n = int(descriptor[0]) or 65536
        first = int(descriptor[1])
        top = np.iinfo(arr.dtype).max
        index = np.arange(first, min(first + n, top + 1)).astype(arr.dtype)
        colours = apply_color_lut(index, ds).astype(np.float64).sum(axis=-1)
        return index[int(np.argmin(colours))]
    return 0


def _write_key(key_file: Path, rows: list[dict[str, Any]], src: Path) -> Path:
    """The original -> pseudonym key as CSV, readable by the owner only."""
    import csv

    from fetalscan.fileio import atomic_open

    columns = ["input", "output", "original_patient_id", "pseudonym_patient_id", "original_patient_name",
               "pseudonym_patient_name", "original_study_uid", "pseudonym_study_uid", "original_sop_instance_uid",
               "pseudonym_sop_instance_uid", "date_shift_days"]
    with atomic_open(key_file, "w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "output": Path(row["output"]).as_posix()})
    os.chmod(key_file, 0o600)
    log.info("key of %d file(s) from %s written to %s", len(rows), src.name, key_file)
    return key_file
