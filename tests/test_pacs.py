"""DICOMweb against a real Orthanc: ``fetalscan.pacs``, ``fetalscan pacs ...`` and the service's PACS route.

One Orthanc (Debian's binary with its DICOMweb plugin, ``tests/orthanc_server.py``) runs for
the module on free loopback ports with a temporary storage folder and basic authentication;
it is stopped after the last test, also when one fails. Without the binary the tests that
need it are skipped and say why (``make system`` installs it). The images are a real
fetal-brain ultrasound picture of the shared data, wrapped in an Ultrasound Image Storage
file with a made-up patient (the ``shared_data`` fixture skips without ../shared).

What is checked: STOW-RS -> QIDO-RS -> WADO-RS gives the file back byte for byte, named by
its SOP Instance UID; the CLI's exit codes and one-line errors; the service route analyses
the study and Orthanc then holds the SR (with the finding) and the Secondary Capture in the
same study; unknown study -> 404 naming the UID; Orthanc down or silent -> a clear error
within the timeout; wrong credentials -> a message; a STOW partial failure names the
refused SOP Instance UID; no patient name or ID reaches the logs.
"""

from __future__ import annotations

import csv
import logging
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("dicomweb_client")
pytest.importorskip("fastapi")

from orthanc_server import free_port, missing_reason, start_orthanc

from fetalscan.cli import main
from fetalscan.pacs import (
    PASSWORD_ENV,
    TOKEN_ENV,
    USER_ENV,
    PacsAuthError,
    PacsClient,
    PacsConfig,
    PacsConnectionError,
    PacsError,
    PacsNotFound,
    PacsStoreError,
    PacsTimeoutError,
)
from fetalscan.pacs.multipart import MultipartError, split_parts

TOKEN = "pacs-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PATIENT_NAME = "Synthetic^Fetalscan^Pacstest"
PATIENT_ID = "FS-PACS-0001"
STUDY_DATE = "20260115"


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """A running Orthanc for the module (skipped without the binary); always stopped afterwards."""
    reason = missing_reason()
    if reason:
        pytest.skip(reason)
    server = start_orthanc(tmp_path_factory.mktemp("orthanc"))
    try:
        yield server
    finally:
        server.stop()
        assert server.process.returncode is not None


@pytest.fixture
def pacs(orthanc):
    with PacsClient(PacsConfig(orthanc.dicomweb, username=orthanc.user, password=orthanc.password,
                               read_timeout_s=30)) as client:
        yield client


@pytest.fixture
def pacs_env(orthanc, monkeypatch):
    """The CLI's credentials in the environment."""
    monkeypatch.setenv(USER_ENV, orthanc.user)
    monkeypatch.setenv(PASSWORD_ENV, orthanc.password)
    monkeypatch.delenv(TOKEN_ENV, raising=False)


@pytest.fixture(scope="module")
def brain_image(shared_data) -> np.ndarray:
    """One real fetal-brain ultrasound picture (640 x 640 RGB) of the shared data."""
    from PIL import Image

    manifest = shared_data / "fetal_brain" / "manifest.csv"
    with open(manifest, newline="") as fh:
        row = next(r for r in csv.DictReader(fh) if r["label"] == "normal")
    with Image.open(shared_data / "fetal_brain" / row["path"]) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def ultrasound_dicom(path: Path, rgb: np.ndarray, *, study_uid: str | None = None, seed: int = 0) -> Path:
    """An Ultrasound Image Storage file (PS3.3 A.6) of ``rgb`` with a made-up patient; UIDs from ``seed``."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, UltrasoundImageStorage, generate_uid

    uid = lambda what: generate_uid(entropy_srcs=["fetalscan-test-pacs", str(seed), what])  # noqa: E731
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UltrasoundImageStorage
    meta.MediaStorageSOPInstanceUID = uid("sop")
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = UltrasoundImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid or uid("study")
    ds.SeriesInstanceUID = uid("series")
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = PATIENT_NAME, PATIENT_ID, "19900101", "F"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = STUDY_DATE, "101500", "ACC0001", "1"
    ds.ReferringPhysicianName = ""
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "US", 1, 1
    ds.Manufacturer = "test"
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.Rows, ds.Columns = rgb.shape[:2]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.ascontiguousarray(rgb, dtype=np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def pacs_app(tiny_classifier, orthanc, tmp_path_factory):
    from fetalscan.serve import ServeSettings, create_app

    db = tmp_path_factory.mktemp("pacs_db") / "reviews.sqlite"
    return create_app(ServeSettings(model=tiny_classifier, token=TOKEN, db=db, device="cpu", warm_up=False,
                                    pacs_url=orthanc.dicomweb, pacs_user=orthanc.user,
                                    pacs_password=orthanc.password, pacs_timeout_s=30))


@pytest.fixture
def client(pacs_app):
    from fastapi.testclient import TestClient

    return TestClient(pacs_app)


@pytest.fixture
def settings(pacs_app, monkeypatch):
    """Change the module app's settings for one test: ``settings(pacs_password="wrong")``."""
    def set_(**values):
        for k, v in values.items():
            monkeypatch.setattr(pacs_app.state.settings, k, v)
    return set_


def silent_server():
    """A loopback socket that accepts connections (the kernel's backlog) but never answers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    return sock


# --------------------------------------------------------------------------- the client
def test_stow_qido_wado_round_trip_gives_the_file_back_byte_for_byte(pacs, brain_image, tmp_path):
    src = ultrasound_dicom(tmp_path / "in" / "scan.dcm", brain_image, seed=1)
    import pydicom

    ds = pydicom.dcmread(src)
    result = pacs.store([src])
    assert result.stored == [ds.SOPInstanceUID] and not result.failed

    by_uid = pacs.search_studies(study_uid=ds.StudyInstanceUID)
    assert [s.study_uid for s in by_uid] == [ds.StudyInstanceUID]
    assert by_uid[0].n_instances == 1 and by_uid[0].modalities == ["US"] and by_uid[0].date == STUDY_DATE
    assert ds.StudyInstanceUID in [s.study_uid for s in pacs.search_studies(patient_id=PATIENT_ID)]
    assert ds.StudyInstanceUID in [s.study_uid for s in pacs.search_studies(date="20260101-20260131")]
    assert ds.StudyInstanceUID not in [s.study_uid for s in pacs.search_studies(date="20250101")]
    assert [s.series_uid for s in pacs.search_series(ds.StudyInstanceUID)] == [ds.SeriesInstanceUID]
    assert [i.sop_uid for i in pacs.search_instances(ds.StudyInstanceUID)] == [ds.SOPInstanceUID]

    out = tmp_path / "out"
    files = pacs.retrieve(ds.StudyInstanceUID, out)
    assert files == [out / f"{ds.SOPInstanceUID}.dcm"]
    assert files[0].read_bytes() == src.read_bytes()
    assert sorted(p.name for p in out.iterdir()) == [f"{ds.SOPInstanceUID}.dcm"]  # no temporary part left
    back = pydicom.dcmread(files[0])
    np.testing.assert_array_equal(back.pixel_array, brain_image)
    assert pacs.retrieve(ds.StudyInstanceUID, tmp_path / "s", series_uid=ds.SeriesInstanceUID)[0].name == files[0].name


def test_a_study_the_pacs_does_not_have_is_not_found_by_uid(pacs, tmp_path):
    missing = "1.2.826.0.1.3680043.8.498.999999999"
    with pytest.raises(PacsNotFound, match=missing):
        pacs.require_study(missing)
    with pytest.raises(PacsNotFound, match=f"study {missing} not found"):
        pacs.retrieve(missing, tmp_path / "out")
    assert not list((tmp_path / "out").iterdir())
    with pytest.raises(PacsError, match="not a DICOM UID"):
        pacs.retrieve("../../etc", tmp_path / "out")


def test_a_stow_partial_failure_names_the_refused_instance(pacs, brain_image, tmp_path):
    import pydicom

    small = brain_image[:64, :64]
    ours = pydicom.dcmread(ultrasound_dicom(tmp_path / "a.dcm", small, seed=2))
    other = pydicom.dcmread(ultrasound_dicom(tmp_path / "b.dcm", small, seed=3))  # another study
    with pytest.raises(PacsStoreError) as info:
        pacs.store([ours, other], study_uid=ours.StudyInstanceUID)
    err = info.value
    assert err.stored == [ours.SOPInstanceUID] and list(err.failed) == [other.SOPInstanceUID]
    assert other.SOPInstanceUID in str(err) and "refused 1 of 2" in str(err) and pacs.url in str(err)
    result = pacs.store([other], raise_on_failure=True)  # the same instance, to the right place
    assert result.stored == [other.SOPInstanceUID]


def test_wrong_or_missing_credentials_are_named(orthanc):
    for cfg, hint in ((PacsConfig(orthanc.dicomweb, username=orthanc.user, password="wrong"), PASSWORD_ENV),
                      (PacsConfig(orthanc.dicomweb, token="not-a-token"), TOKEN_ENV),
                      (PacsConfig(orthanc.dicomweb), "needs credentials")):
        with PacsClient(cfg) as bad, pytest.raises(PacsAuthError) as info:
            bad.search_studies()
        assert "HTTP 401" in str(info.value) and hint in str(info.value) and orthanc.dicomweb in str(info.value)
        assert "wrong" not in str(info.value) and "not-a-token" not in str(info.value)  # no secret echoed


def test_a_pacs_that_is_down_or_silent_fails_fast_with_the_url():
    down = f"http://127.0.0.1:{free_port()}/dicom-web"
    started = time.monotonic()
    with PacsClient(PacsConfig(down, connect_timeout_s=2, read_timeout_s=2)) as pacs, \
            pytest.raises(PacsConnectionError, match="cannot connect to the PACS at " + down):
        pacs.search_studies()
    with silent_server() as sock:
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/dicom-web"
        with PacsClient(PacsConfig(url, connect_timeout_s=1, read_timeout_s=1)) as pacs:
            with pytest.raises(PacsTimeoutError, match="did not answer within 1 s"):
                pacs.search_studies()
            with pytest.raises(PacsTimeoutError):
                pacs.retrieve("1.2.3", Path(tempfile.mkdtemp()))
    assert time.monotonic() - started < 20


def test_no_patient_name_or_id_reaches_the_logs(pacs, brain_image, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)  # also urllib3's request lines, which carry the query string
    src = ultrasound_dicom(tmp_path / "scan.dcm", brain_image[:32, :32], seed=4)
    pacs.store([src])
    found = pacs.search_studies(patient_id=PATIENT_ID)
    pacs.retrieve(found[0].study_uid, tmp_path / "out")
    assert caplog.records, "expected some log lines"
    text = caplog.text
    assert PATIENT_ID not in text and "Synthetic" not in text and "19900101" not in text


@pytest.mark.parametrize("url, message", [
    ("ftp://host/dicom-web", "http(s)://"),
    ("http://user:secret@host/dicom-web", "no user name or password in the URL"),
    ("http://host/dicom-web?x=1", "without ?query"),
])
def test_unusable_pacs_urls_are_refused_with_the_fix(url, message):
    with pytest.raises(PacsError, match=message.replace("?", r"\?").replace("(", r"\(").replace(")", r"\)")):
        PacsConfig(url).validate()


@pytest.mark.parametrize("date, ok", [("20260101", True), ("20260101-", True), ("-20260131", True),
                                      ("20260101-20260131", True), ("2026010120260131", False), ("-", False),
                                      ("2026", False), ("2026-01-01", False)])
def test_qido_dates_are_a_date_or_a_range(date, ok):
    from fetalscan.pacs.client import check_date

    if ok:
        assert check_date(date) == date
    else:
        with pytest.raises(PacsError, match="YYYYMMDD"):
            check_date(date)


@pytest.mark.parametrize("uid", ["1.2.3", "1.2.840.10008.5.1.4.1.1.6.1", "0.1"])
def test_valid_uids_pass_and_others_never_reach_a_url(uid):
    from fetalscan.pacs import check_uid

    assert check_uid(uid) == uid
    for bad in ("1..2", "1.02", "../1.2", "1.2/3", "1.2?x=1", "1." + "1" * 64, ""):
        with pytest.raises(PacsError, match="not a DICOM UID"):
            check_uid(bad)


# --------------------------------------------------------------------------- multipart
def _body(parts: list[bytes], boundary: str = "b0und") -> bytes:
    out = b"preamble\r\n"
    for p in parts:
        out += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p + b"\r\n"
    return out + f"--{boundary}--\r\nepilogue".encode()


@pytest.mark.parametrize("chunk", [1, 3, 7, 64, 10_000])
def test_multipart_parts_survive_any_chunking(tmp_path, chunk):
    rng = np.random.default_rng(chunk)
    parts = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() + b"\r\n--b0un" for n in (0, 1, 500, 4096)]
    body = _body(parts)
    chunks = (body[i:i + chunk] for i in range(0, len(body), chunk))
    got = [path.read_bytes() for _h, path in split_parts(chunks, "b0und", tmp_path)]
    assert got == parts


def test_a_cut_multipart_body_is_an_error_and_leaves_no_file(tmp_path):
    body = _body([b"x" * 1000, b"y" * 1000])
    with pytest.raises(MultipartError, match="cut short"):
        list(split_parts([body[:1500]], "b0und", tmp_path))
    left = list(tmp_path.iterdir())
    assert len(left) == 1 and left[0].read_bytes() == b"x" * 1000  # the complete part; the cut one is removed


# --------------------------------------------------------------------------- the CLI
def test_cli_push_find_pull(pacs_env, orthanc, brain_image, tmp_path, capsys):
    import pydicom

    folder = tmp_path / "study"
    src = ultrasound_dicom(folder / "a" / "scan.dcm", brain_image, seed=5)
    (folder / "notes.txt").write_text("not DICOM; skipped in a folder")
    ds = pydicom.dcmread(src)
    url = orthanc.dicomweb
    assert main(["pacs", "push", "--url", url, str(folder)]) == 0
    assert "1 instance(s) stored" in capsys.readouterr().out

    assert main(["pacs", "find", "--url", url, "--patient-id", PATIENT_ID, "--date", STUDY_DATE]) == 0
    assert ds.StudyInstanceUID in capsys.readouterr().out
    assert main(["pacs", "find", "--url", url, "--study", ds.StudyInstanceUID]) == 0
    assert ds.SeriesInstanceUID in capsys.readouterr().out

    out = tmp_path / "pulled"
    assert main(["pacs", "pull", "--url", url, "--study", ds.StudyInstanceUID, "--out", str(out)]) == 0
    assert (out / f"{ds.SOPInstanceUID}.dcm").read_bytes() == src.read_bytes()
    assert sorted(p.name for p in out.iterdir()) == [f"{ds.SOPInstanceUID}.dcm"]  # no marker, no part left
    capsys.readouterr()


def test_cli_errors_are_one_line_and_exit_2(pacs_env, orthanc, tmp_path, capsys, monkeypatch):
    url = orthanc.dicomweb
    missing = "1.2.826.0.1.3680043.8.498.424242"
    assert main(["pacs", "pull", "--url", url, "--study", missing, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert missing in err and "not found" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()

    (tmp_path / "x.txt").write_text("hello")
    assert main(["pacs", "push", "--url", url, str(tmp_path / "x.txt")]) == 2
    assert "not a DICOM file" in capsys.readouterr().err

    monkeypatch.setenv(PASSWORD_ENV, "wrong")
    assert main(["pacs", "find", "--url", url]) == 2
    err = capsys.readouterr().err
    assert "HTTP 401" in err and PASSWORD_ENV in err and "wrong" not in err

    down = f"http://127.0.0.1:{free_port()}/dicom-web"
    assert main(["pacs", "find", "--url", down]) == 2
    err = capsys.readouterr().err
    assert "cannot connect" in err and down in err and len(err.strip().splitlines()) <= 3


# --------------------------------------------------------------------------- the service route
def test_the_route_analyses_a_pacs_study_and_stores_sr_and_sc_in_it(client, pacs, brain_image, tmp_path,
                                                                     caplog, monkeypatch):
    import pydicom

    src = ultrasound_dicom(tmp_path / "scan.dcm", brain_image, seed=6)
    ds = pydicom.dcmread(src)
    uid = ds.StudyInstanceUID
    pacs.store([src])
    spool = tmp_path / "spool"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))  # to see the retrieval folder go
    caplog.set_level(logging.INFO)

    r = client.post(f"/api/v1/pacs/studies/{uid}/analyze", headers=AUTH)
    assert r.status_code == 200, r.text
    body = r.json()
    info = body["pacs"]
    assert info["study_uid"] == uid and info["retrieved"] == 1 and info["analysed"] == 1
    assert len(info["stored"]) >= 2  # the SR and at least one Secondary Capture
    assert [im["name"] for im in body["images"]] == [f"{ds.SOPInstanceUID}.dcm"]
    assert body["study"]["prediction"] in body["study"]["probabilities"]
    assert not list(spool.iterdir())  # the retrieved files are gone

    # Orthanc now holds the source, the SR and the SC(s) in the same study, in a new series
    instances = pacs.search_instances(uid)
    by_uid = {i.sop_uid: i for i in instances}
    assert set(info["stored"]) <= set(by_uid) and ds.SOPInstanceUID in by_uid
    sr_class, sc_prefix = "1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.7"
    classes = [by_uid[u].sop_class_uid for u in info["stored"]]
    assert classes[0] == sr_class and all(c.startswith(sc_prefix) for c in classes[1:])
    assert {by_uid[u].series_uid for u in info["stored"]} != {ds.SeriesInstanceUID}
    files = pacs.retrieve(uid, tmp_path / "back")
    sr = pydicom.dcmread(next(f for f in files if f.stem == info["stored"][0]))
    assert sr.StudyInstanceUID == uid and sr.PatientID == PATIENT_ID
    finding = body["study"]["prediction"]
    assert finding in str(sr.ContentSequence) or finding.replace("_", " ") in str(sr.ContentSequence)

    text = caplog.text  # UIDs and counts only
    assert PATIENT_ID not in text and "Synthetic" not in text

    # analysing again leaves fetalscan's own outputs (the SR and the SCs) out
    again = client.post(f"/api/v1/pacs/studies/{uid}/analyze", headers=AUTH)
    assert again.status_code == 200, again.text
    assert again.json()["pacs"]["analysed"] == 1 and again.json()["pacs"]["skipped"] == len(info["stored"])
    assert client.get(f"/api/v1/studies/{body['study']['id']}", headers=AUTH).status_code == 200


def test_the_route_answers_404_for_an_unknown_study_and_422_for_a_malformed_uid(client):
    missing = "1.2.826.0.1.3680043.8.498.777"
    r = client.post(f"/api/v1/pacs/studies/{missing}/analyze", headers=AUTH)
    assert r.status_code == 404 and missing in r.json()["detail"]
    r = client.post("/api/v1/pacs/studies/1.2.x/analyze", headers=AUTH)
    assert r.status_code == 422 and "not a DICOM UID" in r.json()["detail"]
    assert client.post(f"/api/v1/pacs/studies/{missing}/analyze").status_code == 401  # the service's own token


def test_the_route_without_a_pacs_says_how_to_configure_one(client, settings):
    settings(pacs_url=None)
    r = client.post("/api/v1/pacs/studies/1.2.3/analyze", headers=AUTH)
    assert r.status_code == 409 and "--pacs-url" in r.json()["detail"]


def test_the_route_reports_wrong_credentials_and_a_pacs_that_is_down(client, settings):
    settings(pacs_password="wrong")
    r = client.post("/api/v1/pacs/studies/1.2.3/analyze", headers=AUTH)
    assert r.status_code == 502 and "refused the credentials" in r.json()["detail"]
    assert "wrong" not in r.json()["detail"]

    down = f"http://127.0.0.1:{free_port()}/dicom-web"
    settings(pacs_url=down)
    r = client.post("/api/v1/pacs/studies/1.2.3/analyze", headers=AUTH)
    assert r.status_code == 502 and "cannot connect" in r.json()["detail"] and down in r.json()["detail"]

    with silent_server() as sock:
        settings(pacs_url=f"http://127.0.0.1:{sock.getsockname()[1]}/dicom-web", pacs_timeout_s=1)
        started = time.monotonic()
        r = client.post("/api/v1/pacs/studies/1.2.3/analyze", headers=AUTH)
        assert r.status_code == 504 and "did not answer" in r.json()["detail"]
        assert time.monotonic() - started < 15


# --------------------------------------------------------------------------- settings
def test_settings_validate_the_pacs_url_and_never_show_its_secrets(tiny_classifier, tmp_path, monkeypatch):
    from fetalscan.cli.serve import _pacs_settings
    from fetalscan.errors import FetalscanError
    from fetalscan.serve import ServeSettings

    s = ServeSettings(model=tiny_classifier, token=TOKEN, pacs_url="http://127.0.0.1:8042/dicom-web/",
                      pacs_user="u", pacs_password="secret-password")
    s.validate()
    shown = s.to_dict()
    assert shown["pacs_password"] == "(set)" and "secret-password" not in str(shown)
    assert s.pacs_config().url == "http://127.0.0.1:8042/dicom-web"
    with pytest.raises(FetalscanError, match="no user name or password in the URL"):
        ServeSettings(model=tiny_classifier, token=TOKEN, pacs_url="http://u:p@host/dicom-web").validate()
    monkeypatch.setenv(USER_ENV, "reader")
    monkeypatch.setenv(PASSWORD_ENV, "pw")
    assert _pacs_settings("http://h/dicom-web") == {"pacs_url": "http://h/dicom-web", "pacs_user": "reader",
                                                     "pacs_password": "pw", "pacs_token": None}
    assert _pacs_settings(None) == {}
