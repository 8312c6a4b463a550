"""No patient identifier leaves fetalscan: every byte of every output is scanned (issue 15 item 3).

DICOM files carry planted identifiers (name, ID, other IDs, birth date, institution,
accession number, referring physician, the study's UID). ``fetalscan predict``,
``fetalscan evaluate`` (with its report) and the service (analysis, review, PDF report,
review export, database, audit log, log records) run on them, and no planted value may
appear in any file they write or any line they log: groups are written as pseudonyms
(``study-`` + a hash of the StudyInstanceUID), never the UID.

Not scanned, by design: the DICOM SR and Secondary Capture the service makes for the PACS
(``sr.dcm``, ``sc.dcm``), which must carry the patient module so the PACS files them with
the patient's study (DICOM PS3.3 C.7.1.1).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from conftest import blob_image
from dicom_builders import write_dicom

from fetalscan.cli import main

PLANTED = {
    "PatientName": "Quixplant^Zebedee",
    "PatientID": "PID7731XQ",
    "PatientBirthDate": "19870312",
    "InstitutionName": "Plantwell General Hospital",
    "AccessionNumber": "ACC99123Q",
    "ReferringPhysicianName": "Drplantref^Ottoline",
    "OtherPatientIDs": "OTH55120Z",
}
STUDY_UID_ROOT = "1.2.826.0.1.3680043.9.7777."

#: Every text that must not appear: each planted value, and the parts of the names on their own.
NEEDLES = [v for v in PLANTED.values()] + ["Quixplant", "Zebedee", "Plantwell", "Drplantref", "Ottoline",
                                           "1987-03-12", STUDY_UID_ROOT]


def _dicom(path: Path, image: np.ndarray, k: int) -> Path:
    """An RGB ultrasound DICOM of patient ``k`` carrying every planted identifier."""
    path.parent.mkdir(parents=True, exist_ok=True)
    planted = {key: (f"{value}{k}" if key == "PatientID" else value) for key, value in PLANTED.items()}
    return write_dicom(path, image, "RGB", StudyInstanceUID=f"{STUDY_UID_ROOT}{k}", StudyDate="20260301", **planted)


@pytest.fixture(scope="module")
def planted_study(tmp_path_factory) -> Path:
    """Two classes × four patients, one DICOM file each, every file carrying the planted identifiers."""
    root = tmp_path_factory.mktemp("planted")
    k = 0
    for ci, cls in enumerate(("abnormal", "normal")):
        for i in range(4):
            _dicom(root / cls / f"scan_{k}.dcm", blob_image(100 + k, size=96, bright=ci == 0), k)
            k += 1
    return root


def _leaks(texts: dict[str, bytes]) -> list[str]:
    found = []
    for where, data in texts.items():
        low = data.lower()
        for needle in NEEDLES:
            if needle.lower().encode() in low:
                found.append(f"{needle!r} in {where}")
    return found


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()} | {
        f"file name {p}": str(p.relative_to(folder)).encode() for p in folder.rglob("*")}


def test_the_planted_identifiers_are_in_the_inputs(planted_study: Path) -> None:
    """The scan can fail: every needle is found in the input files it is planted in."""
    inputs = _files(planted_study)
    for needle in NEEDLES:
        if needle != "1987-03-12":  # the reformatted date is searched in outputs only
            assert any(needle.lower().encode() in data.lower() for data in inputs.values()), needle


@pytest.mark.slow
def test_predict_and_evaluate_write_no_identifier(planted_study: Path, tiny_classifier: Path, tmp_path: Path,
                                                  capsys, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    out_p, out_e = tmp_path / "pred", tmp_path / "eval"
    assert main(["predict", "--model", str(tiny_classifier), "--data", str(planted_study), "--out", str(out_p),
                 "--no-progress"]) == 0
    assert main(["evaluate", "--model", str(tiny_classifier), "--data", str(planted_study), "--out", str(out_e),
                 "--n-boot", "50", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert (out_p / "predictions.csv").is_file() and (out_e / "report.html").is_file()
    patients = (out_p / "patients.csv").read_text()
    assert patients.count("study-") == 8  # one pseudonymous group per study
    texts = _files(out_p) | _files(out_e) | {"stdout": captured.out.encode(), "stderr": captured.err.encode(),
                                             "log records": caplog.text.encode()}
    assert not _leaks(texts)


@pytest.mark.slow
def test_the_service_stores_logs_and_reports_no_identifier(planted_study: Path, tiny_classifier: Path,
                                                           tmp_path: Path, caplog) -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from fetalscan.serve import ServeSettings, create_app

    caplog.set_level(logging.DEBUG)
    token = "no-identifier-token-0123456789"
    headers = {"Authorization": f"Bearer {token}"}
    state = tmp_path / "state"
    state.mkdir()
    app = create_app(ServeSettings(model=tiny_classifier, token=token, db=state / "reviews.sqlite", device="cpu",
                                   warm_up=False))
    files = sorted(planted_study.rglob("*.dcm"))[:1]  # one patient's study (the SR refuses two patients)
    responses: dict[str, bytes] = {}
    with TestClient(app) as client:
        r = client.post("/api/v1/analyze", headers=headers,
                        files=[("files", (f.name, f.read_bytes(), "application/dicom")) for f in files])
        assert r.status_code == 200, r.text
        responses["analyze response"] = r.content
        sid = r.json()["study"]["id"]
        r = client.post(f"/api/v1/studies/{sid}/review", headers=headers,
                        json={"reader": "Dr Reader", "decision": "confirm", "comment": "fine"})
        assert r.status_code == 201, r.text
        for route in (f"/api/v1/studies/{sid}", f"/api/v1/studies/{sid}/report.pdf", "/api/v1/reviews.csv",
                      f"/api/v1/studies/{sid}/reviews"):
            r = client.get(route, headers=headers)
            assert r.status_code == 200, (route, r.text)
            responses[route] = r.content
        sr = client.get(f"/api/v1/studies/{sid}/sr.dcm", headers=headers)
        assert sr.status_code == 200 and PLANTED["PatientID"].encode() in sr.content  # the PACS copy keeps it
    texts = _files(state) | responses | {"log records": caplog.text.encode()}
    assert any(name.endswith("reviews.sqlite") for name in texts)
    assert not _leaks(texts)
