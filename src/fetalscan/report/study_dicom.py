"""DICOM outputs of one analysed study: a Comprehensive SR (TID 1500) and Secondary Captures.

What is written
---------------
**Comprehensive SR** (PS3.3 A.35.3, Comprehensive SR IOD) whose content tree is a
TID 1500 *Measurement Report* (PS3.16 A), built with highdicom:

* TID 1001 Observation Context with the device observer (fetalscan, the model) and
  TID 1006 Subject Context with subject class *Fetus* (DCM 121026) and TID 1008
  Subject Context, Fetus (Subject ID ``1``: the service does not tell fetuses apart).
* Procedure reported: SCT 268445003 *Ultrasound scan - obstetric*.
* One TID 1501 measurement group for the study: the model's study-level finding as a
  qualitative evaluation (concept ``STUDY-FINDING`` of ``99FETALSCAN``, *fetalscan
  study-level finding*: DCM 121071 *Finding* is TID 1501's finding-type row, which
  highdicom does not read as an evaluation; value see :func:`finding_code`),
  the class probabilities as numeric measurements (UCUM ``1``), the model as TID 4019
  Algorithm Identification (name, fetalscan version, ``sha256=...`` as a parameter), the
  source images (TID 1501 row "Source"), and DCM 121106 *Comment* items: the
  support-not-replace statement and, for a non-DICOM upload, that the source was not DICOM.
* One TID 1501 group per image with a head measurement in mm: HC (LN 11984-2), BPD
  (LN 11820-8), OFD (LN 11851-3) in ``mm`` and gestational age (LN 18185-9) in ``wk`` with
  measurement method LN 11932-1 *HC, Hadlock 1984* (PS3.16 CID 12005 Fetal Biometry
  Measurements, CID 12013 Gestational Age Equations and Tables, CID 12019 OB Summary);
  algorithm: the head-segmentation model.

**Secondary Capture** (PS3.3 A.8.1, SC Image IOD, built with ``highdicom.sc.SCImage``) of
an image with its heatmap layered over it, one per image asked for. Its Source Image
Sequence (0008,2112) names the source instance (and frame) when the image came from DICOM.

Identity
--------
Outputs from DICOM uploads carry the source's StudyInstanceUID and Patient / General Study
/ Patient Study module attributes (copied from the source header), so a PACS files them
with the patient and study; they form a new series (one for all of a study's outputs).
Outputs of a non-DICOM upload get a new Study UID and empty Type 2 patient attributes
(PS3.3 C.7.1.1: PatientName, PatientID, PatientBirthDate, PatientSex present, empty).
UIDs are derived from the service's study id (``generate_uid(entropy_srcs=...)``), so
asking twice gives the same instances, and the SR's references to the SCs hold.

Private coding scheme
---------------------
Classes without a standard code are coded in the scheme ``99FETALSCAN`` (PS3.16 8.2: a
private scheme designator starts with ``99``): ``STUDY-FINDING`` names the study-level
finding; a class's code value = the model's class name
(e.g. ``mild_ventriculomegaly``), meaning = the class name with spaces. Class probabilities
use code value ``P:<class>``. The SR names the scheme in its Coding Scheme Identification
Sequence (0008,0110). ``normal`` and ``abnormal`` use SCT 17621005 *Normal* and
SCT 263654008 *Abnormal*.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fetalscan.errors import FetalscanError
from fetalscan.texts import DISCLAIMER, HEATMAP_DISCLAIMER

#: Private coding scheme designator of the model's classes (PS3.16 8.2).
PRIVATE_SCHEME = "99FETALSCAN"

#: Series number of the outputs' series (one series per study for the SR and the SCs).
OUTPUT_SERIES_NUMBER = 9901

MANUFACTURER = "fetalscan (research software)"

#: Concept name of the study-level finding (a TID 1501 qualitative evaluation). DCM 121071
#: *Finding* is TID 1501's finding-type row, not an evaluation, so a private concept is used.
FINDING_CONCEPT = ("STUDY-FINDING", PRIVATE_SCHEME, "fetalscan study-level finding")

#: Standard codes for class names that have one (SNOMED CT).
_STANDARD_CLASS_CODES = {
    "normal": ("17621005", "SCT", "Normal"),
    "abnormal": ("263654008", "SCT", "Abnormal"),
}

#: Head biometry: key of the service's biometry dict -> (LOINC code, meaning), PS3.16 CID 12005.
BIOMETRY_CODES = {
    "hc": ("11984-2", "Head Circumference"),
    "bpd": ("11820-8", "Biparietal Diameter"),
    "ofd": ("11851-3", "Occipital-Frontal Diameter"),
}
#: Gestational age (LN 18185-9, CID 12019) and its equation (LN 11932-1, CID 12013).
GA_CODE = ("18185-9", "Gestational Age")
GA_METHOD = ("11932-1", "HC, Hadlock 1984")

#: Maximum length of a short string (SH) item such as Series Description / a Code Meaning (LO 64).
_LO = 64


@dataclass(frozen=True)
class OutputUIDs:
    """The UIDs of one study's outputs, derived from the service's study id (stable per study)."""

    study_id: str

    def uid(self, *parts: object) -> str:
        from pydicom.uid import generate_uid

        return str(generate_uid(entropy_srcs=["fetalscan", self.study_id, *map(str, parts)]))

    @property
    def new_study(self) -> str:
        """StudyInstanceUID for outputs of a non-DICOM upload."""
        return self.uid("study")

    @property
    def series(self) -> str:
        return self.uid("series")

    @property
    def sr(self) -> str:
        return self.uid("sr")

    def sc(self, index: int) -> str:
        return self.uid("sc", index)


@dataclass(frozen=True)
class StudyIdentity:
    """The study (and patient) the outputs are filed under."""

    study_uid: str
    header: Any  # pydicom Dataset with Patient / General Study / Patient Study attributes (may be empty)
    from_dicom: bool


def finding_code(class_name: str):
    """The coded concept of a model class: SCT for normal / abnormal, else ``99FETALSCAN``."""
    from highdicom.sr import CodedConcept

    value, scheme, meaning = _STANDARD_CLASS_CODES.get(
        class_name.strip().lower(), (class_name, PRIVATE_SCHEME, class_name.replace("_", " ")))
    return CodedConcept(value=value, scheme_designator=scheme, meaning=meaning[:_LO])


def study_identity(result: Mapping, sources: Sequence[Any]) -> StudyIdentity:
    """Patient and study of the outputs: the first DICOM source's, else a new study.

    Raises
    ------
    FetalscanError
        The DICOM sources name more than one patient (PatientID): outputs filed under one of
        them would put another patient's images in their record.
    """
    from pydicom.dataset import Dataset

    dicom = [s for s in sources if s is not None and s.study_uid]
    if not dicom:
        return StudyIdentity(OutputUIDs(result["study"]["id"]).new_study, Dataset(), False)
    patients = {str(s.header.get("PatientID", "") or "") for s in dicom}
    if len(patients) > 1:
        raise FetalscanError(f"study {result['study']['id']}: the uploaded DICOM files belong to {len(patients)} "
                             "patients (PatientID differs); DICOM outputs need the files of one patient")
    return StudyIdentity(dicom[0].study_uid, dicom[0].header, True)


# ---------------------------------------------------------------------- Secondary Capture
def secondary_capture(result: Mapping, index: int, overlay_rgb: np.ndarray, source: Any | None,
                      identity: StudyIdentity):
    """A Secondary Capture (PS3.3 A.8.1) of image ``index`` with its heatmap layered over it.

    Parameters
    ----------
    result : mapping
        The service's study result (``study``, ``images``, ``model``).
    index : int
        The image (0-based, as in ``result["images"]``).
    overlay_rgb : numpy.ndarray
        ``(H, W, 3)`` uint8 RGB: the image with the heatmap layered over it.
    source : DicomSource or None
        The DICOM instance (and frame) the image came from; put in Source Image Sequence.
    identity : StudyIdentity
        Patient and study to file it under (:func:`study_identity`).
    """
    import highdicom as hd
    from pydicom.dataset import Dataset

    from fetalscan import __version__

    pixels = np.ascontiguousarray(overlay_rgb, dtype=np.uint8)
    if pixels.ndim != 3 or pixels.shape[-1] != 3:
        raise FetalscanError(f"image {index}: the overlay must be (H, W, 3) RGB uint8, got {pixels.shape}")
    uids = OutputUIDs(result["study"]["id"])
    h = identity.header
    image = result["images"][index]
    sc = hd.sc.SCImage(
        pixel_array=pixels, photometric_interpretation="RGB", bits_allocated=8, coordinate_system="PATIENT",
        patient_orientation=("L", "F"),  # replaced by an empty value below: ultrasound has none
        study_instance_uid=identity.study_uid, series_instance_uid=uids.series,
        series_number=OUTPUT_SERIES_NUMBER, sop_instance_uid=uids.sc(index), instance_number=index + 2,
        manufacturer=MANUFACTURER,
        patient_id=_get(h, "PatientID"), patient_name=_get(h, "PatientName"),
        patient_birth_date=_get(h, "PatientBirthDate"), patient_sex=_get(h, "PatientSex"),
        accession_number=_get(h, "AccessionNumber"), study_id=_get(h, "StudyID"),
        study_date=_get(h, "StudyDate"), study_time=_get(h, "StudyTime"),
        referring_physician_name=_get(h, "ReferringPhysicianName"),
        series_description="fetalscan AI heatmaps and findings (research software)",
        manufacturer_model_name=_model_label(result)[:_LO], software_versions=f"fetalscan {__version__}",
    )
    sc.PatientOrientation = None  # Type 2C, empty: an ultrasound image has no patient orientation
    _copy_patient_study(sc, h)
    frame = "" if image.get("frame") is None else f", frame {image['frame']}"
    sc.ImageComments = (f"Heatmap ({image['heatmap']['method']}, target {image['heatmap']['target']}) over image "
                        f"{index}{frame}; the model reads {image['prediction']}. {HEATMAP_DISCLAIMER}")
    sc.DerivationDescription = "image with the model's heatmap layered over it (alpha 0.5), by fetalscan"
    sc.BurnedInAnnotation = "NO"
    if source is not None and source.referenceable:
        item = Dataset()
        item.ReferencedSOPClassUID = source.sop_class_uid
        item.ReferencedSOPInstanceUID = source.sop_instance_uid
        if source.frame_number is not None:
            item.ReferencedFrameNumber = int(source.frame_number)
        sc.SourceImageSequence = [item]
    return sc


# ---------------------------------------------------------------------- Structured Report
def study_sr(result: Mapping, sources: Sequence[Any | None], identity: StudyIdentity,
             secondary_captures: Sequence[Any] = ()):
    """The Comprehensive SR (TID 1500 Measurement Report) of one study; see the module docstring.

    Parameters
    ----------
    result : mapping
        The service's study result: ``study`` (``id``, ``prediction``, ``probabilities``),
        ``images`` (each with ``biometry`` or None), ``model`` (``name``, ``sha256``,
        ``fetalscan_version``, ``biometry``).
    sources : sequence of DicomSource or None
        Per image (same order as ``result["images"]``), the DICOM instance it came from.
    identity : StudyIdentity
        Patient and study to file the SR under (:func:`study_identity`).
    secondary_captures : sequence of Dataset
        SCs of this study's outputs; for a non-DICOM upload they are the images the SR
        refers to (there is no DICOM source to refer to).
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from fetalscan import __version__

    study = result["study"]
    uids = OutputUIDs(study["id"])
    model = result["model"]
    refs, evidence = _references(sources, secondary_captures, identity)
    algorithm = hd.sr.AlgorithmIdentification(
        name=f"fetalscan classifier {model.get('name', '')}"[:_LO], version=str(model.get("fetalscan_version")
                                                                            or __version__),
        parameters=[f"sha256={model.get('sha256', '')}", f"backbone={model.get('backbone')}",
                    f"study rule={study.get('rule')}"])
    probabilities = [
        hd.sr.Measurement(name=hd.sr.CodedConcept(f"P:{c}", PRIVATE_SCHEME, f"Probability of {c}"[:_LO]),
                          value=float(p), unit=hd.sr.CodedConcept("1", "UCUM", "no units"))
        for c, p in study["probabilities"].items()]
    finding = hd.sr.QualitativeEvaluation(name=hd.sr.CodedConcept(*FINDING_CONCEPT),
                                          value=finding_code(str(study["prediction"])))
    study_group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=uids.uid("tracking", "study"),
                                                     identifier="fetalscan study finding"),
        algorithm_id=algorithm, measurements=probabilities, qualitative_evaluations=[finding],
        source_images=[_source_item(r) for r in refs] or None)
    comments = [DISCLAIMER]
    if not identity.from_dicom:
        comments.append("The source images were not DICOM (still images or video); this study has a new Study "
                        "Instance UID and no patient identification; the referenced images are fetalscan's "
                        "secondary captures.")
    n_other = sum(1 for s in sources if s is None)
    if identity.from_dicom and n_other:
        comments.append(f"{n_other} of {len(sources)} analysed images were not DICOM; the SR refers to their "
                        "secondary captures where one was made, not to a source instance.")
    _add_comments(study_group, comments)
    groups = [study_group] + _biometry_groups(result, sources, secondary_captures, uids)
    content = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_device_context=hd.sr.ObserverContext(
                observer_type=codes.DCM.Device,
                observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                    uid=uids.uid("device", model.get("sha256", "")), name="fetalscan",
                    manufacturer_name=MANUFACTURER, model_name=_model_label(result)[:_LO])),
            subject_context=hd.sr.SubjectContext(subject_class=codes.DCM.Fetus,
                                                 subject_class_specific_context=hd.sr.SubjectContextFetus("1"))),
        procedure_reported=hd.sr.CodedConcept("268445003", "SCT", "Ultrasound scan - obstetric"),
        imaging_measurements=groups)
    sr = hd.sr.ComprehensiveSR(
        evidence=evidence, content=content[0], series_instance_uid=uids.series,
        series_number=OUTPUT_SERIES_NUMBER, sop_instance_uid=uids.sr, instance_number=1,
        manufacturer=MANUFACTURER, is_complete=True, is_final=False, is_verified=False,
        series_description="fetalscan AI findings (research software)",
        software_versions=f"fetalscan {__version__}", manufacturer_model_name=_model_label(result)[:_LO])
    _copy_patient_study(sr, identity.header)
    sr.CodingSchemeIdentificationSequence = [_private_scheme_item()]
    return sr


def study_outputs(result: Mapping, sources: Sequence[Any | None], overlays: Mapping[int, np.ndarray]) -> list:
    """The SR first, then one SC per entry of ``overlays`` (image index -> RGB overlay)."""
    if len(sources) != len(result["images"]):
        raise FetalscanError(f"study {result['study']['id']}: {len(sources)} DICOM sources for "
                             f"{len(result['images'])} images")
    identity = study_identity(result, sources)
    scs = [secondary_capture(result, k, overlays[k], sources[k], identity) for k in sorted(overlays)]
    return [study_sr(result, sources, identity, scs), *scs]


# ---------------------------------------------------------------------- helpers
@dataclass(frozen=True)
class _Ref:
    sop_class_uid: str
    sop_instance_uid: str
    frames: tuple[int, ...]


def _references(sources, secondary_captures, identity: StudyIdentity):
    """(image references of the study group, evidence datasets) -- DICOM sources, else the SCs."""
    from pydicom.dataset import Dataset

    refs: dict[str, _Ref] = {}
    evidence: list = []
    for s in sources:
        if s is None or not s.referenceable:
            continue
        old = refs.get(s.sop_instance_uid)
        frames = (old.frames if old else ()) + ((s.frame_number,) if s.frame_number is not None else ())
        refs[s.sop_instance_uid] = _Ref(s.sop_class_uid, s.sop_instance_uid, frames)
        if old is None:
            evidence.append(_evidence(s.header, s))
    if not refs:  # nothing from DICOM: the study group refers to the secondary captures
        for sc in secondary_captures:
            refs[sc.SOPInstanceUID] = _Ref(sc.SOPClassUID, sc.SOPInstanceUID, ())
    evidence += list(secondary_captures)  # biometry groups of non-DICOM images refer to their SC
    if not evidence:  # highdicom needs one instance to inherit patient and study from
        stub = Dataset()
        stub.SOPClassUID, stub.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.7", OutputUIDs("none").uid("stub")
        stub.StudyInstanceUID, stub.SeriesInstanceUID = identity.study_uid, OutputUIDs("none").uid("series")
        evidence = [_evidence(identity.header, None, stub)]
        return [], evidence
    return list(refs.values()), evidence


def _evidence(header, source, base=None):
    """A header with the Type 2 patient / study attributes highdicom reads (empty when absent)."""
    from pydicom.dataset import Dataset

    ds = Dataset() if base is None else base
    for elem in header:
        ds[elem.tag] = elem
    if source is not None:
        ds.StudyInstanceUID, ds.SeriesInstanceUID = source.study_uid, source.series_uid
        ds.SOPInstanceUID, ds.SOPClassUID = source.sop_instance_uid, source.sop_class_uid
    for keyword in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                    "StudyDate", "StudyTime", "ReferringPhysicianName"):
        if keyword not in ds:
            setattr(ds, keyword, None)
    return ds


def _source_item(ref: _Ref):
    import highdicom as hd

    return hd.sr.SourceImageForMeasurementGroup(
        referenced_sop_class_uid=ref.sop_class_uid, referenced_sop_instance_uid=ref.sop_instance_uid,
        referenced_frame_numbers=list(ref.frames) or None)


def _biometry_groups(result, sources, secondary_captures, uids: OutputUIDs) -> list:
    """One TID 1501 group per image with HC/BPD/OFD in mm (and GA when given)."""
    import highdicom as hd

    bio_model = (result["model"].get("biometry") or {})
    algorithm = hd.sr.AlgorithmIdentification(
        name=f"fetalscan head segmentation {bio_model.get('name', '')}"[:_LO],
        version=str(result["model"].get("fetalscan_version") or "unknown"),
        parameters=[f"sha256={bio_model.get('sha256', '')}", "ellipse fit; HC by Ramanujan's perimeter"])
    mm = hd.sr.CodedConcept("mm", "UCUM", "millimeter")
    week = hd.sr.CodedConcept("wk", "UCUM", "week")
    scs = {int(sc.InstanceNumber) - 2: sc for sc in secondary_captures}
    groups = []
    for k, image in enumerate(result["images"]):
        bio = image.get("biometry")
        if not bio or bio.get("unit") != "mm" or bio.get("status") not in ("ok", "check"):
            continue
        measurements = [hd.sr.Measurement(name=hd.sr.CodedConcept(code, "LN", meaning), value=float(bio[key]),
                                          unit=mm)
                        for key, (code, meaning) in BIOMETRY_CODES.items() if bio.get(key) is not None]
        if bio.get("ga_weeks") is not None:
            measurements.append(hd.sr.Measurement(
                name=hd.sr.CodedConcept(GA_CODE[0], "LN", GA_CODE[1]), value=round(float(bio["ga_weeks"]), 2),
                unit=week, method=hd.sr.CodedConcept(GA_METHOD[0], "LN", GA_METHOD[1])))
        if not measurements:
            continue
        source = sources[k]
        if source is not None and source.referenceable:
            frames = (source.frame_number,) if source.frame_number is not None else ()
            refs = [_Ref(source.sop_class_uid, source.sop_instance_uid, frames)]
        elif k in scs:
            refs = [_Ref(scs[k].SOPClassUID, scs[k].SOPInstanceUID, ())]
        else:
            refs = []
        frame = "" if image.get("frame") is None else f" frame {image['frame']}"
        group = hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=uids.uid("tracking", "biometry", k),
                                                         identifier=f"head biometry, image {k}{frame}"[:_LO]),
            algorithm_id=algorithm, measurements=measurements,
            source_images=[_source_item(r) for r in refs] or None)
        notes = [f"pixel size {bio.get('pixel_size_mm')} mm from {bio.get('pixel_size_source')}"]
        if bio.get("status") == "check":
            notes.append("CHECK: the head region is not elliptical; the measurement may be wrong")
        _add_comments(group, notes + list(bio.get("warnings") or []))
        groups.append(group)
    return groups


def _add_comments(group, texts: Sequence[str]) -> None:
    """DCM 121106 Comment TEXT items in a measurement group's container."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    for text in texts:
        group[0].ContentSequence.append(hd.sr.TextContentItem(
            name=codes.DCM.Comment, value=str(text), relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))


def _private_scheme_item():
    """Coding Scheme Identification Sequence item for ``99FETALSCAN`` (PS3.3 C.12.1.1.2)."""
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = "fetalscan model classes and class probabilities"
    item.CodingSchemeResponsibleOrganization = "fetalscan project"
    return item


def _copy_patient_study(ds, header) -> None:
    """Copy the source's Patient / General Study / Patient Study attributes into ``ds``."""
    from fetalscan.data.dicom import PATIENT_STUDY_KEYWORDS

    for keyword in PATIENT_STUDY_KEYWORDS:
        if keyword in header and keyword != "StudyInstanceUID":
            ds[keyword] = header[keyword]


def _get(header, keyword: str):
    value = header.get(keyword) if header is not None else None
    return None if value is None or str(value) == "" else value


def _model_label(result: Mapping) -> str:
    model = result.get("model") or {}
    return f"{model.get('backbone') or 'model'} {model.get('name', '')} sha256 {str(model.get('sha256', ''))[:12]}"
