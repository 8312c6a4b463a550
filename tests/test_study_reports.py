"""Reports per analysed study: PDF, DICOM SR (TID 1500) and Secondary Captures, and the
ultrasound-region calibration of head biometry (DICOM PS3.3 C.8.5.5).

One app on the session's tiny classifier (``tiny_classifier``) and one with a head segmenter
whose logits draw an ellipse where a test puts it (``biometry_app``); real DICOM from
pydicom-data (``gdcm-US-ALOKA-16.dcm``: two side-by-side B-mode regions and a colour bar).
"""

from __future__ import annotations

import io
import logging
import re
import sqlite3
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import blob_image

pytest.importorskip("fastapi")
pytest.importorskip("highdicom")
pytest.importorskip("reportlab")

import highdicom as hd
from fastapi.testclient import TestClient
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, UltrasoundImageStorage, UltrasoundMultiFrameImageStorage

from fetalscan.data.dicom import (
    read_dicom_source,
    read_ultrasound_regions,
    region_at,
    ultrasound_regions,
)
from fetalscan.texts import BIOMETRY_DISCLAIMER, DISCLAIMER, HEATMAP_DISCLAIMER

TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
API = "/api/v1"
ALOKA = Path(get_testdata_file("gdcm-US-ALOKA-16.dcm"))
ALOKA_DELTA_CM = 0.03826530650258064
SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"


# --------------------------------------------------------------------------- helpers
def png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def region(x0, y0, x1, y1, *, fmt=1, data_type=1, units_x=3, units_y=3, dx=0.01, dy=None) -> Dataset:
    r = Dataset()
    r.RegionSpatialFormat, r.RegionDataType = fmt, data_type
    r.RegionLocationMinX0, r.RegionLocationMinY0, r.RegionLocationMaxX1, r.RegionLocationMaxY1 = x0, y0, x1, y1
    r.PhysicalUnitsXDirection, r.PhysicalUnitsYDirection = units_x, units_y
    r.PhysicalDeltaX, r.PhysicalDeltaY = dx, dx if dy is None else dy
    return r


def write_us_dicom(path: Path, frames: np.ndarray, **elements) -> Path:
    """An uncompressed MONOCHROME2 US DICOM with patient, study and series identifiers."""
    cine = frames.ndim == 3
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UltrasoundMultiFrameImageStorage if cine else UltrasoundImageStorage
    meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.777." + ("2" if cine else "1")
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.555"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.556"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "Doe^Jane", "PID-98765", "19900101"
    ds.Modality = "US"
    ds.Rows, ds.Columns = frames.shape[-2:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    if cine:
        ds.NumberOfFrames = len(frames)
    ds.PixelData = frames.astype(np.uint8).tobytes()
    for key, value in elements.items():
        setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def pdf_text(pdf: bytes) -> str:
    """The text shown by a ReportLab PDF: every page stream (ASCII85 / Flate decoded), its strings joined."""
    import base64

    chunks = []
    pattern = rb"obj\s*<<((?:(?!endobj).)*?)>>\s*stream\r?\n(.*?)endstream"
    for m in re.finditer(pattern, pdf, re.S):
        head, data = m.group(1), m.group(2)
        if b"/Subtype /Image" in head:
            continue
        data = data.strip()
        if b"ASCII85Decode" in head:
            data = base64.a85decode(data.removesuffix(b"~>"))
        if b"FlateDecode" in head:
            data = zlib.decompress(data)
        chunks += re.findall(rb"\((.*?)(?<!\\)\) Tj", data, re.S)
    text = b" ".join(chunks).replace(b"\\(", b"(").replace(b"\\)", b")").replace(b"\\\\", b"\\")
    text = re.sub(rb"\\([0-7]{3})", lambda o: bytes([int(o.group(1), 8)]), text)  # octal escapes
    return re.sub(r"\s+", " ", text.decode("cp1252"))  # WinAnsiEncoding


def analyze(client, files, **data):
    return client.post(f"{API}/analyze", files=[("files", f) for f in files], data=data, headers=AUTH)


def dcm(client, url: str) -> Dataset:
    r = client.get(url, headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/dicom"
    return dcmread(io.BytesIO(r.content))


def groups_of(sr: Dataset) -> list:
    """The TID 1501 measurement groups of an SR, read back through highdicom's TID 1500 parser."""
    return hd.sr.MeasurementReport.from_sequence([sr]).get_image_measurement_groups()


def _bytes(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def referenced_instances(sr: Dataset) -> dict[str, list[int]]:
    """SOP Instance UID -> referenced frames, from every IMAGE item of the SR's content tree."""
    out: dict[str, list[int]] = {}

    def walk(items):
        for item in items:
            if item.get("ValueType") == "IMAGE":
                ref = item.ReferencedSOPSequence[0]
                frames = ref.get("ReferencedFrameNumber")
                frames = [] if frames is None else [int(f) for f in (frames if isinstance(frames, list | tuple)
                                                                     or hasattr(frames, "__len__") else [frames])]
                out.setdefault(ref.ReferencedSOPInstanceUID, []).extend(frames)
            walk(item.get("ContentSequence") or [])

    walk(sr.ContentSequence)
    return out


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def app(tiny_classifier, tmp_path_factory):
    from fetalscan.serve import ServeSettings, create_app

    db = tmp_path_factory.mktemp("reports_db") / "reviews.sqlite"
    return create_app(ServeSettings(model=tiny_classifier, token=TOKEN, db=db, device="cpu", warm_up=False))


@pytest.fixture
def client(app) -> TestClient:
    return TestClient(app)


@pytest.fixture(scope="module")
def biometry_app(tiny_classifier, tmp_path_factory):
    """The app with a tiny untrained head segmenter; ``app.state.ellipse_at(fx, fy)`` makes its logits
    an ellipse centred at fractions (fx, fy) of the image (semi-axes 0.12 W and 0.3 H)."""
    from fetalscan.models.segmenters import SegmenterConfig, build_segmenter, save_segmenter
    from fetalscan.serve import ServeSettings, create_app

    root = tmp_path_factory.mktemp("reports_bio")
    cfg = SegmenterConfig(encoder="mobilenet_v2", decoder_channels="16,16,8,8,8", input_height=64, input_width=96)
    seg = save_segmenter(root / "seg.pt", build_segmenter(cfg), cfg, calibration={"axis_offset_px": 0.0})
    app = create_app(ServeSettings(model=tiny_classifier, biometry_model=seg, token=TOKEN, db=root / "db.sqlite",
                                   device="cpu", warm_up=False))
    segmenter = app.state.analyzer.segmenter
    h, w = cfg.input_height, cfg.input_width
    yy, xx = np.mgrid[:h, :w] + 0.5

    def ellipse_at(fx: float, fy: float = 0.5) -> None:
        inside = ((xx - w * fx) / (w * 0.12)) ** 2 + ((yy - h * fy) / (h * 0.3)) ** 2 < 1
        logits = np.where(inside, 8.0, -8.0).astype(np.float32)
        segmenter.logits = lambda batch, tta=None: logits[None].repeat(len(batch), 0)

    ellipse_at(0.5)
    app.state.ellipse_at = ellipse_at
    return app


# --------------------------------------------------------------------------- US regions (PS3.3 C.8.5.5)
def test_aloka_file_has_two_bmode_regions_and_a_colour_bar_with_their_own_bounds_and_deltas():
    regions = read_ultrasound_regions(ALOKA)
    assert [(r.x0, r.y0, r.x1, r.y1) for r in regions] == [(32, 24, 335, 415), (336, 24, 639, 415),
                                                             (32, 40, 63, 103)]
    assert [r.spatial_format for r in regions] == [1, 1, 0]
    assert [r.calibrated_mm for r in regions] == [True, True, False]
    assert regions[0].delta_x == pytest.approx(ALOKA_DELTA_CM) and regions[1].delta_y == pytest.approx(ALOKA_DELTA_CM)
    assert regions[0].spacing_mm == pytest.approx(10 * ALOKA_DELTA_CM)
    assert regions[2].delta_x is None and regions[2].spacing_mm is None  # units "none", delta 0


def test_a_point_in_each_aloka_region_picks_its_own_region():
    regions = read_ultrasound_regions(ALOKA)
    assert region_at(regions, 150, 200).index == 0
    assert region_at(regions, 500, 200).index == 1
    assert region_at(regions, 335, 200).index == 0 and region_at(regions, 336, 200).index == 1  # the border
    assert region_at(regions, 40, 60).index == 0  # inside the colour bar too: the calibrated B-mode wins
    assert region_at(regions, 5, 5) is None and region_at(regions, 500, 450) is None  # outside every region


def test_synthetic_bmode_and_doppler_strip_each_keep_their_calibration(tmp_path):
    bmode = region(0, 0, 199, 99, dx=0.02)  # 0.2 mm per pixel
    wide = region(200, 0, 399, 99, dx=0.05, dy=0.04)  # a second B-mode, coarser, anisotropic
    doppler = region(0, 100, 399, 199, fmt=3, data_type=3, units_x=4, units_y=7, dx=0.01, dy=2.5)  # s, cm/s
    path = write_us_dicom(tmp_path / "multi.dcm", np.zeros((200, 400), np.uint8),
                          SequenceOfUltrasoundRegions=[doppler, bmode, wide])
    regions = read_ultrasound_regions(path)
    assert [r.index for r in regions] == [0, 1, 2]
    assert region_at(regions, 50, 50).spacing_mm == pytest.approx(0.2)
    assert region_at(regions, 300, 50).spacing_mm == pytest.approx(0.5) and region_at(regions, 300, 50).anisotropic
    hit = region_at(regions, 50, 150)
    assert hit.index == 0 and not hit.calibrated_mm and hit.spacing_mm is None  # Doppler: seconds, not cm
    assert ultrasound_regions(dcmread(path, stop_before_pixels=True)) == regions
    assert ultrasound_regions(Dataset()) == []


def test_classes_without_a_standard_code_use_the_private_scheme():
    from fetalscan.report.study_dicom import finding_code

    code = finding_code("moderate_ventriculomegaly")
    assert (code.value, code.scheme_designator, code.meaning) == ("moderate_ventriculomegaly", "99FETALSCAN",
                                                                  "moderate ventriculomegaly")
    assert "LongCodeValue" in code  # over 16 characters: (0008,0119) Long Code Value, PS3.3 8.1
    assert (finding_code("Normal").value, finding_code("abnormal").value) == ("17621005", "263654008")


def test_dicom_source_keeps_uids_frame_and_patient_header_without_pixels(tmp_path):
    path = write_us_dicom(tmp_path / "cine.dcm", np.zeros((3, 8, 8), np.uint8))
    src = read_dicom_source(path, frame=2)
    assert (src.study_uid, src.series_uid) == ("1.2.826.0.1.3680043.8.498.555", "1.2.826.0.1.3680043.8.498.556")
    assert src.sop_instance_uid == "1.2.826.0.1.3680043.8.498.777.2" and src.frame_number == 3
    assert src.header.PatientID == "PID-98765" and "PixelData" not in src.header and src.referenceable
    assert read_dicom_source(ALOKA).frame_number is None


# --------------------------------------------------------------------------- biometry calibrated by region
def test_biometry_uses_the_region_that_holds_the_head_centre(biometry_app, tmp_path):
    c = TestClient(biometry_app)
    left, right = region(0, 0, 199, 199, dx=0.05), region(200, 0, 399, 199, dx=0.1)  # 0.5 and 1.0 mm/pixel
    path = write_us_dicom(tmp_path / "two.dcm", blob_image(3, size=200)[..., 0].repeat(2, axis=1),
                          SequenceOfUltrasoundRegions=[left, right])
    got = {}
    for fx in (0.25, 0.75):
        biometry_app.state.ellipse_at(fx)
        bio = analyze(c, [("two.dcm", path.read_bytes(), "application/dicom")]).json()["images"][0]["biometry"]
        assert bio["status"] == "ok" and bio["unit"] == "mm" and bio["pixel_size_source"] == "DICOM"
        assert bio["ellipse"]["cx"] == pytest.approx(400 * fx, abs=3)
        got[fx] = bio
    assert got[0.25]["pixel_size_region"] == 0 and got[0.25]["pixel_size_mm"] == pytest.approx(0.5)
    assert got[0.75]["pixel_size_region"] == 1 and got[0.75]["pixel_size_mm"] == pytest.approx(1.0)
    # the same head in pixels: HC scales with the region's calibration (1.0 / 0.5 = 2)
    assert got[0.75]["hc"] / got[0.25]["hc"] == pytest.approx(2.0, rel=0.02)
    # semi-axes 0.12 * 400 = 48 px and 0.3 * 200 = 60 px at 1 mm per pixel (Ramanujan)
    a, b = 60.0, 48.0
    h = ((a - b) / (a + b)) ** 2
    assert got[0.75]["hc"] == pytest.approx(np.pi * (a + b) * (1 + 3 * h / (10 + np.sqrt(4 - 3 * h))), rel=0.03)


def test_head_centre_outside_every_calibrated_region_gives_pixels_and_says_so(biometry_app, tmp_path):
    c = TestClient(biometry_app)
    path = write_us_dicom(tmp_path / "half.dcm", blob_image(4, size=200)[..., 0].repeat(2, axis=1),
                          SequenceOfUltrasoundRegions=[region(0, 0, 199, 199, dx=0.05)])
    biometry_app.state.ellipse_at(0.75)
    bio = analyze(c, [("half.dcm", path.read_bytes(), "application/dicom")], pixel_size_mm="0.3").json()
    bio = bio["images"][0]["biometry"]
    assert bio["unit"] == "px" and bio["pixel_size_mm"] is None and bio["ga_weeks"] is None
    assert any("lies in no ultrasound region" in w and "calibrated in cm" in w for w in bio["warnings"])
    biometry_app.state.ellipse_at(0.5)


def test_real_aloka_file_head_in_each_bmode_region(biometry_app):
    c = TestClient(biometry_app)
    for fx, expected in ((0.25, 0), (0.75, 1)):
        biometry_app.state.ellipse_at(fx)
        bio = analyze(c, [("aloka.dcm", ALOKA.read_bytes(), "application/dicom")]).json()["images"][0]["biometry"]
        assert bio["pixel_size_region"] == expected
        assert bio["pixel_size_mm"] == pytest.approx(10 * ALOKA_DELTA_CM) and bio["unit"] == "mm"
    biometry_app.state.ellipse_at(0.5)


# --------------------------------------------------------------------------- DICOM outputs
def test_sr_of_a_dicom_upload_files_with_the_source_patient_and_study_and_holds_finding_and_biometry(biometry_app):
    c = TestClient(biometry_app)
    biometry_app.state.ellipse_at(0.25)
    body = analyze(c, [("aloka.dcm", ALOKA.read_bytes(), "application/dicom")]).json()
    sid, bio = body["study"]["id"], body["images"][0]["biometry"]
    source = dcmread(ALOKA, stop_before_pixels=True)
    sr = dcm(c, f"{API}/studies/{sid}/sr.dcm")
    assert sr.SOPClassUID == COMPREHENSIVE_SR and sr.Modality == "SR"
    assert sr.StudyInstanceUID == source.StudyInstanceUID and sr.PatientID == source.PatientID == "98279"
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.SeriesInstanceUID == source.SeriesInstanceUID
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert source.SOPInstanceUID in referenced_instances(sr)
    hd.sr.ComprehensiveSR.from_dataset(sr)  # highdicom reads it back as a Comprehensive SR
    study_group, bio_group = groups_of(sr)
    (finding,) = study_group.get_qualitative_evaluations()
    expected = {"normal": ("17621005", "SCT", "Normal"), "abnormal": ("263654008", "SCT", "Abnormal")}
    value = finding.value
    assert (value.value, value.scheme_designator, value.meaning) == expected[body["study"]["prediction"]]
    assert finding.name.value == "STUDY-FINDING" and finding.name.scheme_designator == "99FETALSCAN"
    probs = {m.name.meaning: m.value for m in study_group.get_measurements()}
    assert probs == {f"Probability of {k}": pytest.approx(v) for k, v in body["study"]["probabilities"].items()}
    texts = [(i.ConceptNameCodeSequence[0].CodeValue, i.TextValue) for i in study_group[0].ContentSequence
             if i.ValueType == "TEXT"]
    assert ("111001", f"fetalscan classifier {body['model']['name']}") in texts  # TID 4019 Algorithm Name
    assert ("111002", f"sha256={body['model']['sha256']}") in texts  # TID 4019 Algorithm Parameters
    measured = {m.name.value: (m.value, m.unit.value, m.unit.scheme_designator) for m in bio_group.get_measurements()}
    assert measured["11984-2"] == (pytest.approx(bio["hc"]), "mm", "UCUM")
    assert measured["11820-8"] == (pytest.approx(bio["bpd"]), "mm", "UCUM")
    assert measured["11851-3"] == (pytest.approx(bio["ofd"]), "mm", "UCUM")
    assert measured["18185-9"] == (pytest.approx(bio["ga_weeks"], abs=0.01), "wk", "UCUM")
    subject = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "121024"]
    assert subject and subject[0].ConceptCodeSequence[0].CodeMeaning == "Fetus"
    biometry_app.state.ellipse_at(0.5)


def test_mixed_dicom_and_png_upload_refers_to_the_dicom_source_and_the_png_images_secondary_capture(biometry_app):
    from fetalscan.serve.reports import dicom_outputs

    c = TestClient(biometry_app)
    files = [("aloka.dcm", ALOKA.read_bytes(), "application/dicom"),
             ("b.png", png_bytes(blob_image(5, size=128, bright=True)), "image/png")]
    sid = analyze(c, files, pixel_size_mm="1.0").json()["study"]["id"]
    sr, *scs = dicom_outputs(biometry_app.state.ctx, sid)
    assert len(groups_of(sr)) == 3  # the study, and head biometry on each image
    png_sc = next(d for d in scs if d.InstanceNumber == 3)  # image 1 -> instance number 3
    refs = referenced_instances(sr)
    assert dcmread(ALOKA, stop_before_pixels=True).SOPInstanceUID in refs and png_sc.SOPInstanceUID in refs
    evidence = {r.ReferencedSOPInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence
                for ser in s.ReferencedSeriesSequence for r in ser.ReferencedSOPSequence}
    assert set(refs) <= evidence
    texts = [i.TextValue for i in groups_of(sr)[0][0].ContentSequence if i.ValueType == "TEXT"]
    assert any(t.startswith("1 of 2 analysed images were not DICOM") for t in texts)


def test_sc_references_the_source_frame_and_shares_the_outputs_series(client, tmp_path):
    cine = np.stack([blob_image(k, size=48)[..., 0] for k in range(3)])
    path = write_us_dicom(tmp_path / "cine.dcm", cine)
    sid = analyze(client, [("cine.dcm", path.read_bytes(), "application/dicom")]).json()["study"]["id"]
    sc = dcm(client, f"{API}/studies/{sid}/images/2/sc.dcm")
    sr = dcm(client, f"{API}/studies/{sid}/sr.dcm")
    assert sc.SOPClassUID == SC_STORAGE and sc.StudyInstanceUID == "1.2.826.0.1.3680043.8.498.555"
    assert sc.PatientID == "PID-98765"
    assert sc.SeriesInstanceUID == sr.SeriesInstanceUID != "1.2.826.0.1.3680043.8.498.556"
    ref = sc.SourceImageSequence[0]
    assert ref.ReferencedSOPInstanceUID == "1.2.826.0.1.3680043.8.498.777.2" and ref.ReferencedFrameNumber == 3
    assert sc.pixel_array.shape == (48, 48, 3) and sc.PhotometricInterpretation == "RGB"
    assert HEATMAP_DISCLAIMER in sc.ImageComments
    assert sorted(referenced_instances(sr)["1.2.826.0.1.3680043.8.498.777.2"]) == [1, 2, 3]


def test_dicom_outputs_gives_the_sr_then_the_scs_with_stable_uids(app, client, tmp_path):
    from fetalscan.serve.reports import dicom_outputs

    images = [("a.png", png_bytes(blob_image(k, bright=k == 1)), "image/png") for k in range(3)]
    sid = analyze(client, images).json()["study"]["id"]
    outputs = dicom_outputs(app.state.ctx, sid)
    assert [type(d).__name__ for d in outputs] == ["ComprehensiveSR", "SCImage", "SCImage", "SCImage"]
    sr, scs = outputs[0], outputs[1:]
    again = dicom_outputs(app.state.ctx, sid)
    assert [d.SOPInstanceUID for d in again] == [d.SOPInstanceUID for d in outputs]
    # not DICOM: a new study, empty Type 2 patient attributes, the SR says so and refers to the SCs
    back = dcmread(io.BytesIO(_bytes(sr)))
    for keyword in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex"):  # Type 2: present, empty
        assert keyword in back and str(back[keyword].value or "") == "", keyword
    assert len({sr.StudyInstanceUID, *(d.StudyInstanceUID for d in scs)}) == 1
    texts = [i.TextValue for g in groups_of(sr) for i in g[0].ContentSequence if i.ValueType == "TEXT"]
    assert any("not DICOM" in t for t in texts) and DISCLAIMER in texts
    assert set(referenced_instances(sr)) == {d.SOPInstanceUID for d in scs}
    routed = dcm(client, f"{API}/studies/{sid}/images/{scs[0].InstanceNumber - 2}/sc.dcm")
    assert routed.SOPInstanceUID == scs[0].SOPInstanceUID
    for ds in outputs:  # every object survives a Part 10 round trip
        back = dcmread(io.BytesIO(_bytes(ds)))
        assert back.SOPInstanceUID == ds.SOPInstanceUID and back.SeriesInstanceUID == sr.SeriesInstanceUID


def test_dicom_files_of_two_patients_are_refused(client, tmp_path):
    a = write_us_dicom(tmp_path / "a.dcm", blob_image(1)[..., 0])
    b = write_us_dicom(tmp_path / "b.dcm", blob_image(2)[..., 0], PatientID="OTHER-1",
                       SOPInstanceUID="1.2.826.0.1.3680043.8.498.778")
    sid = analyze(client, [("a.dcm", a.read_bytes(), "application/dicom"),
                           ("b.dcm", b.read_bytes(), "application/dicom")]).json()["study"]["id"]
    r = client.get(f"{API}/studies/{sid}/sr.dcm", headers=AUTH)
    assert r.status_code == 422 and "2 patients" in r.json()["detail"] and "OTHER" not in r.text


# --------------------------------------------------------------------------- PDF
def test_pdf_holds_finding_disclaimer_model_and_the_review_in_force_but_no_patient_data(app, client, tmp_path):
    path = write_us_dicom(tmp_path / "Doe_Jane_scan.dcm", blob_image(7)[..., 0])
    body = analyze(client, [("Doe_Jane_scan.dcm", path.read_bytes(), "application/dicom"),
                            ("b.png", png_bytes(blob_image(8, bright=True)), "image/png")]).json()
    sid = body["study"]["id"]
    r = client.get(f"{API}/studies/{sid}/report.pdf", headers=AUTH)
    assert r.status_code == 200 and r.content.startswith(b"%PDF") and r.headers["content-type"] == "application/pdf"
    assert f'filename="{sid}.pdf"' in r.headers["content-disposition"]
    text = pdf_text(r.content)
    assert f"finding: {body['study']['prediction']}" in text
    assert DISCLAIMER in text and HEATMAP_DISCLAIMER in text
    assert body["model"]["sha256"] in text and sid in text
    assert "NOT REVIEWED" in text
    for k, p in body["study"]["probabilities"].items():
        assert f"{k} {100 * p:.1f} %" in text
    for secret in ("Doe", "Jane", "PID-98765", "19900101"):
        assert secret not in text and secret.encode() not in r.content
    other = [c for c in body["model"]["classes"] if c != body["study"]["prediction"]][0]
    review = {"reader": "Dr Reviewer", "decision": "override", "final_class": other, "comment": "artefact (probe)"}
    assert client.post(f"{API}/studies/{sid}/review", json=review, headers=AUTH).status_code == 201
    text = pdf_text(client.get(f"{API}/studies/{sid}/report.pdf", headers=AUTH).content)
    assert f"Dr Reviewer overrode the finding with {other}" in text and "artefact (probe)" in text
    assert "NOT REVIEWED" not in text


def test_pdf_shows_the_most_abnormal_images_and_biometry_with_its_disclaimer(biometry_app):
    from fetalscan.report.study_pdf import ReportImage, study_pdf
    from fetalscan.report.study_selection import select_images

    c = TestClient(biometry_app)
    files = [("s.png", png_bytes(blob_image(20 + k, size=96, bright=k % 2 == 0)), "image/png") for k in range(6)]
    body = analyze(c, files, pixel_size_mm="1.5").json()
    shown = select_images(body)
    abnormal = [1 - im["probabilities"]["normal"] for im in body["images"]]
    assert len(shown) == 4 and sorted(abnormal, reverse=True)[:4] == [abnormal[k] for k in shown]
    text = pdf_text(c.get(f"{API}/studies/{body['study']['id']}/report.pdf", headers=AUTH).content)
    assert "Shown: 4 of 6 image(s)" in text
    assert BIOMETRY_DISCLAIMER in text and "Head biometry" in text
    bio = body["images"][0]["biometry"]
    assert bio["ga_weeks"] is not None and f"{bio['hc']:.1f} mm" in text and bio["ga_text"] in text
    # the builder alone, uncompressed: text readable in the bytes
    pdf = study_pdf(body, [ReportImage(0, png_bytes(blob_image(1)))], [], compress=False)
    assert b"Heatmaps" in pdf and b"NOT REVIEWED" in pdf


# --------------------------------------------------------------------------- errors, auth, privacy
@pytest.mark.parametrize("path", ["report.pdf", "sr.dcm", "images/0/sc.dcm"])
def test_unknown_study_is_404_naming_it_and_no_token_is_401(client, path):
    sid = "0123456789abcdef0123456789abcdef"
    r = client.get(f"{API}/studies/{sid}/{path}", headers=AUTH)
    assert r.status_code == 404 and sid in r.json()["detail"]
    assert client.get(f"{API}/studies/{sid}/{path}").status_code == 401


def test_study_no_longer_in_memory_is_404_saying_so(app, client, monkeypatch):
    sid = analyze(client, [("a.png", png_bytes(blob_image(1)), "image/png")]).json()["study"]["id"]
    monkeypatch.setattr(app.state.cache, "get", lambda _sid: None)
    r = client.get(f"{API}/studies/{sid}/sr.dcm", headers=AUTH)
    assert r.status_code == 404 and "no longer held" in r.json()["detail"]


def test_image_index_out_of_range_is_404(client):
    sid = analyze(client, [("a.png", png_bytes(blob_image(1)), "image/png")]).json()["study"]["id"]
    r = client.get(f"{API}/studies/{sid}/images/5/sc.dcm", headers=AUTH)
    assert r.status_code == 404 and "not 5" in r.json()["detail"]


def test_dicom_identifiers_stay_out_of_the_database_and_the_log(app, client, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    secrets = {"PatientName": "Roe^Richard", "PatientID": "PID-31337", "PatientBirthDate": "19770707",
               "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.31337", "AccessionNumber": "ACC-4242"}
    path = write_us_dicom(tmp_path / "x.dcm", blob_image(9)[..., 0], **secrets)
    sid = analyze(client, [("x.dcm", path.read_bytes(), "application/dicom")]).json()["study"]["id"]
    sr = dcm(client, f"{API}/studies/{sid}/sr.dcm")
    assert (sr.PatientID, sr.AccessionNumber) == ("PID-31337", "ACC-4242")  # the SR carries them to the PACS
    assert app.state.cache.get(sid).images[0].dicom.header.PatientID == "PID-31337"  # held in memory only
    with sqlite3.connect(app.state.settings.db) as con:
        dump = "\n".join(con.iterdump())
    for secret in ("PID-31337", "Roe", "Richard", "19770707", "498.31337", "ACC-4242"):
        assert secret not in dump and secret not in caplog.text


def test_malformed_source_uid_and_patient_data_are_not_echoed_in_warnings_or_logs(app, client, tmp_path, caplog):
    import warnings

    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = write_us_dicom(tmp_path / "m.dcm", blob_image(11)[..., 0], PatientName="Poe^Edgar",
                              StudyInstanceUID="1.2.840.Poe-Edgar-PID-1849")
    sid = analyze(client, [("m.dcm", path.read_bytes(), "application/dicom")]).json()["study"]["id"]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for route in ("sr.dcm", "images/0/sc.dcm", "report.pdf"):
            assert client.get(f"{API}/studies/{sid}/{route}", headers=AUTH).status_code == 200
    said = caplog.text + "\n".join(str(w.message) for w in seen)
    assert "Poe" not in said and "1849" not in said
