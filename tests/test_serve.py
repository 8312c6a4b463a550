"""The web service (``fetalscan.serve``): API, reviews, page and guards, through FastAPI's test client.

One tiny classifier is trained for the module (``Classifier(head_epochs=20)`` on 24 made-up
images) and one app is built on it; tests that need other limits change that app's settings
object for their duration (the app reads it on every request).
"""

from __future__ import annotations

import io
import json
import logging
import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import blob_image, write_png
from dicom_builders import write_dicom

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient

from fetalscan.errors import FetalscanError
from fetalscan.serve import ServeSettings, create_app
from fetalscan.texts import DISCLAIMER

TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
API = "/api/v1"


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def app(tiny_classifier, tmp_path_factory):
    db = tmp_path_factory.mktemp("serve_db") / "reviews.sqlite"
    return create_app(ServeSettings(model=tiny_classifier, token=TOKEN, db=db, device="cpu", warm_up=False))


@pytest.fixture
def client(app) -> TestClient:
    return TestClient(app)


@pytest.fixture
def limits(app, monkeypatch):
    """Set limits of the module's app for one test: ``limits(max_file_mb=0.01)``."""
    def set_(**values):
        for k, v in values.items():
            monkeypatch.setattr(app.state.settings, k, v)
    return set_


def png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def analyze(client, files, headers=AUTH, **data):
    return client.post(f"{API}/analyze", files=[("files", f) for f in files], data=data, headers=headers)


def grey(seed: int, size: int = 64) -> np.ndarray:
    return blob_image(seed, size=size)[..., 0]


# --------------------------------------------------------------------------- health and model
def test_health_needs_no_token_and_names_the_model_classes_and_version(client, tiny_classifier):
    r = client.get(f"{API}/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["version"] == "0.1.0"
    assert body["model"] == tiny_classifier.name and body["classes"] == ["abnormal", "normal"]
    assert body["auth"] == "token" and body["biometry"] is False and body["disclaimer"] == DISCLAIMER


def test_model_route_needs_the_token_and_reports_limits(client):
    assert client.get(f"{API}/model").status_code == 401
    body = client.get(f"{API}/model", headers=AUTH).json()
    assert body["model"]["classes"] == ["abnormal", "normal"] and len(body["model"]["sha256"]) == 64
    assert body["limits"]["max_pixels"] == 40_000_000


# --------------------------------------------------------------------------- analysis
def test_analyze_images_returns_the_study_and_per_image_results(client):
    files = [("a.png", png_bytes(blob_image(1, bright=True)), "image/png"),
             ("b.png", png_bytes(blob_image(2)), "image/png")]
    r = analyze(client, files)
    assert r.status_code == 200, r.text
    body = r.json()
    study, images = body["study"], body["images"]
    assert study["n_images"] == 2 and len(study["id"]) == 32
    assert set(study["probabilities"]) == {"abnormal", "normal"}
    assert study["prediction"] == max(study["probabilities"], key=study["probabilities"].get)
    assert sum(study["probabilities"].values()) == pytest.approx(1.0, abs=1e-9)
    assert [im["name"] for im in images] == ["a.png", "b.png"]
    for im in images:
        assert im["frame"] is None
        assert sum(im["probabilities"].values()) == pytest.approx(1.0, abs=1e-9)
        assert im["prediction"] == max(im["probabilities"], key=im["probabilities"].get)
        assert isinstance(im["plane"], str) and 0.0 <= im["plane_confidence"] <= 1.0
        assert im["heatmap_url"].startswith(f"{API}/studies/{study['id']}/images/")
        assert im["biometry"] is None
    # mean rule: the study's probabilities are the mean of the images'
    mean = np.mean([im["probabilities"]["abnormal"] for im in images])
    assert study["probabilities"]["abnormal"] == pytest.approx(mean, abs=1e-12)
    assert body["model"]["classes"] == ["abnormal", "normal"] and body["disclaimer"] == DISCLAIMER


def test_analyze_goes_through_the_one_prediction_path_and_matches_it(client, app, monkeypatch, tmp_path):
    import fetalscan.inference.predict as mod
    from fetalscan.data.records import load_dataset

    calls = []
    real = mod.predict

    def spy(loaded, dataset, config=None, device="cpu"):
        calls.append(config)
        return real(loaded, dataset, config, device)

    monkeypatch.setattr(mod, "predict", spy)
    image = blob_image(5, bright=True)
    body = analyze(client, [("x.png", png_bytes(image), "image/png")]).json()
    assert len(calls) == 1 and calls[0].plane_check is True
    direct = real(app.state.analyzer.loaded, load_dataset(write_png(tmp_path / "x.png", image),
                                                            require_labels=False), mod.PredictConfig())
    assert body["images"][0]["probabilities"]["abnormal"] == pytest.approx(
        float(direct.images["p_abnormal"].iloc[0]), abs=1e-12)


def test_heatmap_image_and_layer_are_served_with_the_token_only(client):
    from PIL import Image

    body = analyze(client, [("h.png", png_bytes(blob_image(3, size=80)), "image/png")]).json()
    im = body["images"][0]
    assert client.get(im["heatmap_url"]).status_code == 401
    over = client.get(im["heatmap_url"], headers=AUTH)
    assert over.status_code == 200 and over.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(over.content)).size == (80, 80)
    layer = Image.open(io.BytesIO(client.get(im["heatmap_url"] + "?layer=true", headers=AUTH).content))
    assert layer.mode == "RGBA" and layer.size == (80, 80)
    plain = Image.open(io.BytesIO(client.get(im["image_url"], headers=AUTH).content))
    np.testing.assert_array_equal(np.asarray(plain.convert("RGB")), blob_image(3, size=80))
    # alpha 0 gives the image back
    zero = Image.open(io.BytesIO(client.get(im["heatmap_url"] + "?alpha=0", headers=AUTH).content))
    np.testing.assert_array_equal(np.asarray(zero), blob_image(3, size=80))
    assert client.get(im["heatmap_url"] + "?alpha=2", headers=AUTH).status_code == 422
    sid = body["study"]["id"]
    r = client.get(f"{API}/studies/{sid}/images/7/heatmap.png", headers=AUTH)
    assert r.status_code == 404 and "images 0-0" in r.json()["detail"]
    assert client.get(f"{API}/studies/nope/images/0/heatmap.png", headers=AUTH).status_code == 404
    assert client.get(f"{API}/studies/{sid}/images/0/biometry.png", headers=AUTH).status_code == 404
    again = client.get(f"{API}/studies/{sid}", headers=AUTH).json()
    assert again["study"]["id"] == sid and again["images_available"] is True


def test_dicom_single_and_cine_frames_and_their_sampling(client, limits, tmp_path):
    single = write_dicom(tmp_path / "one.dcm", grey(11))
    cine = write_dicom(tmp_path / "loop.dcm", np.stack([grey(20 + i) for i in range(5)]))
    files = [(p.name, p.read_bytes(), "application/dicom") for p in (single, cine)]
    body = analyze(client, files).json()
    assert [(im["name"], im["frame"]) for im in body["images"]] == [("one.dcm", None)] + [
        ("loop.dcm", i) for i in range(5)]
    assert body["study"]["n_images"] == 6
    limits(max_frames=2)
    body = analyze(client, files[1:]).json()
    assert [im["frame"] for im in body["images"]] == [0, 3]
    assert any("every 3th frame" in n for n in body["study"]["notes"])


def test_video_frames_are_analysed(client, tmp_path):
    import cv2

    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    if not writer.isOpened():
        pytest.skip("this OpenCV cannot write MJPG/AVI")
    for i in range(4):
        writer.write(blob_image(40 + i)[:48])
    writer.release()
    body = analyze(client, [("clip.avi", path.read_bytes(), "video/x-msvideo")]).json()
    assert [im["frame"] for im in body["images"]] == [0, 1, 2, 3]
    for im in body["images"]:
        assert sum(im["probabilities"].values()) == pytest.approx(1.0, abs=1e-9)


def test_an_image_without_extension_is_recognised_by_its_content(client):
    body = analyze(client, [("IM0001", png_bytes(blob_image(8)), "application/octet-stream")]).json()
    assert body["images"][0]["name"] == "IM0001"


# --------------------------------------------------------------------------- reviews
def test_reviews_confirm_override_append_only_and_export(client, app):
    sid = analyze(client, [("r.png", png_bytes(blob_image(9)), "image/png")]).json()["study"]["id"]
    found = client.get(f"{API}/studies/{sid}", headers=AUTH).json()["study"]["prediction"]
    other = "normal" if found == "abnormal" else "abnormal"
    url = f"{API}/studies/{sid}/review"
    r1 = client.post(url, json={"reader": "Dr Ada", "decision": "confirm", "comment": "agree"}, headers=AUTH)
    assert r1.status_code == 201, r1.text
    assert r1.json()["final_class"] == found and r1.json()["supersedes"] is None
    r2 = client.post(url, json={"reader": "Dr Bo", "decision": "override", "final_class": other,
                                "comment": "=HYPERLINK(\"x\")"}, headers=AUTH)
    assert r2.status_code == 201 and r2.json()["supersedes"] == r1.json()["id"]
    history = client.get(f"{API}/studies/{sid}/reviews", headers=AUTH).json()
    assert [(h["reader"], h["decision"], h["final_class"]) for h in history] == [
        ("Dr Ada", "confirm", found), ("Dr Bo", "override", other)]
    assert all(h["created_utc"].endswith("+00:00") and h["model_prediction"] == found for h in history)
    # clear 4xx for bad reviews
    bad = [({"reader": "x", "decision": "override"}, 422, "needs final_class"),
           ({"reader": "x", "decision": "override", "final_class": "cyst"}, 422, "not a class"),
           ({"reader": "x", "decision": "confirm", "final_class": other}, 422, "use decision 'override'"),
           ({"reader": "  ", "decision": "confirm"}, 422, "reader"),
           ({"reader": "x", "decision": "maybe"}, 422, "decision")]
    for payload, status, text in bad:
        r = client.post(url, json=payload, headers=AUTH)
        assert r.status_code == status and text in r.json()["detail"], (payload, r.text)
    assert client.post(f"{API}/studies/{'0' * 32}/review", json={"reader": "x", "decision": "confirm"},
                       headers=AUTH).status_code == 404
    assert client.post(url, json={"reader": "x", "decision": "confirm"}).status_code == 401
    # the export: both rows, the formula neutralised, joined with the study
    csv = client.get(f"{API}/reviews.csv", headers=AUTH)
    assert csv.status_code == 200 and csv.headers["content-type"].startswith("text/csv")
    rows = pd.read_csv(io.StringIO(csv.text))
    mine = rows[rows["study_id"] == sid]
    assert list(mine["decision"]) == ["confirm", "override"] and list(mine["images"]) == ["r.png", "r.png"]
    assert mine["comment"].iloc[1].startswith("'=") and len(mine["model_sha256"].iloc[0]) == 64
    assert client.get(f"{API}/reviews.csv").status_code == 401
    # the database refuses edits and deletions: an edit is a new record
    with sqlite3.connect(app.state.settings.db) as con:
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            con.execute("UPDATE reviews SET final_class = 'x' WHERE study_id = ?", (sid,))
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            con.execute("DELETE FROM reviews WHERE study_id = ?", (sid,))


# --------------------------------------------------------------------------- bad uploads
def _corrupt_dicom() -> bytes:
    return b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\xffgarbage" * 10


def _truncated_png() -> bytes:
    return png_bytes(blob_image(4, size=128))[:300]


BAD_UPLOADS = [
    ("notes.txt", b"patient notes", 415, "not an image, DICOM file or video"),
    ("fake.png", b"this is not a png at all", 422, "unreadable or corrupt image"),
    ("broken.dcm", _corrupt_dicom(), 422, "corrupt DICOM"),
    ("cut.png", _truncated_png(), 422, "cut.png"),
    ("empty.png", b"", 422, "empty"),
]


@pytest.mark.parametrize("name, data, status, text", BAD_UPLOADS, ids=[b[0] for b in BAD_UPLOADS])
def test_bad_uploads_are_a_clear_4xx_naming_the_file_and_the_server_keeps_serving(client, name, data, status,
                                                                                 text):
    good = ("good.png", png_bytes(blob_image(6)), "image/png")
    r = analyze(client, [good, (name, data, "application/octet-stream")])
    assert r.status_code == status, r.text
    body = r.json()
    assert body["file"] == name and name in body["detail"] and text in body["detail"]
    assert "/tmp" not in body["detail"] and "fetalscan-upload" not in body["detail"]
    assert client.get(f"{API}/health").status_code == 200
    assert analyze(client, [good]).status_code == 200


def test_too_large_file_pixels_images_and_files_are_413(client, limits):
    big = png_bytes(np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8))
    limits(max_file_mb=0.1)
    r = analyze(client, [("big.png", big, "image/png")])
    assert r.status_code == 413 and r.json()["file"] == "big.png" and "0.1 MiB" in r.json()["detail"]
    limits(max_file_mb=200.0, max_pixels=50_000)
    r = analyze(client, [("wide.png", big, "image/png")])
    assert r.status_code == 413 and "300 x 300 pixels" in r.json()["detail"]
    limits(max_pixels=40_000_000, max_files=2)
    small = ("s.png", png_bytes(blob_image(1)), "image/png")
    r = analyze(client, [small] * 3)
    assert r.status_code == 413 and "3 files" in r.json()["detail"]
    limits(max_files=64, max_images=2)
    assert analyze(client, [small] * 3).status_code == 413
    limits(max_images=256)
    assert analyze(client, [small]).status_code == 200


def bomb_png(width: int, height: int) -> bytes:
    """A 60-byte PNG whose header declares ``width x height`` grey pixels (its data is missing)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [20_000, 100_000])  # over our limit; over Pillow's own bomb guard too
def test_decompression_bomb_is_refused_before_decoding(client, side):
    r = analyze(client, [("bomb.png", bomb_png(side, side), "image/png")])
    assert r.status_code == 413 and r.json()["file"] == "bomb.png"
    assert client.get(f"{API}/health").status_code == 200


def test_request_over_the_size_limit_is_413_by_header_and_by_stream(client, limits):
    limits(max_request_mb=0.05)
    payload = png_bytes(np.random.default_rng(1).integers(0, 255, (200, 200, 3), dtype=np.uint8))
    r = analyze(client, [("p.png", payload, "image/png")])
    assert r.status_code == 413 and "limit" in r.json()["detail"]

    def chunks():  # no Content-Length: the streamed size is counted
        for _ in range(20):
            yield b"x" * 8192

    r = client.post(f"{API}/analyze", content=chunks(),
                    headers={**AUTH, "Content-Type": "multipart/form-data; boundary=zzz"})
    assert r.status_code == 413, r.text
    assert client.get(f"{API}/health").status_code == 200


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-token-wrong-token"},
                                     {"Authorization": f"Basic {TOKEN}"}, {"Authorization": TOKEN}],
                         ids=["missing", "wrong", "basic", "no-scheme"])
def test_missing_or_wrong_token_is_401_before_the_upload_is_read(client, headers, monkeypatch):
    from fetalscan.serve import analysis

    monkeypatch.setattr(analysis.Analyzer, "analyze", lambda *a, **k: pytest.fail("analysed without a token"))
    r = analyze(client, [("a.png", png_bytes(blob_image(1)), "image/png")], headers=headers)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert "token" in r.json()["detail"]


def test_missing_files_field_is_a_clear_422(client):
    r = client.post(f"{API}/analyze", data={"pixel_size_mm": "0.1"}, headers=AUTH)
    assert r.status_code == 422 and "files" in r.json()["detail"]
    r = analyze(client, [("a.png", png_bytes(blob_image(1)), "image/png")], pixel_size_mm="-1")
    assert r.status_code == 422 and "pixel_size_mm" in r.json()["detail"]


def test_upload_folder_is_removed_after_success_and_failure(client, monkeypatch):
    import tempfile

    made = []
    real = tempfile.TemporaryDirectory

    def recording(*args, **kwargs):
        tmp = real(*args, **kwargs)
        made.append(Path(tmp.name))
        return tmp

    monkeypatch.setattr(tempfile, "TemporaryDirectory", recording)
    assert analyze(client, [("a.png", png_bytes(blob_image(1)), "image/png")]).status_code == 200
    assert analyze(client, [("bad.png", b"nope", "image/png")]).status_code == 422
    assert len(made) == 2 and all(p.name.startswith("fetalscan-upload-") for p in made)
    assert not any(p.exists() for p in made)


def test_no_patient_identifying_dicom_fields_in_logs_warnings_or_response(client, tmp_path, caplog):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # a malformed UID: a validating reader quotes an invalid UI value in its warning and log
        path = write_dicom(tmp_path / "id.dcm", grey(30), PatientName="Doe^Jane", PatientID="PID-98765",
                           PatientBirthDate="19900101", InstitutionName="St Example Hospital",
                           StudyInstanceUID="1.2.840.Doe-Jane-PID-98765")
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        r = analyze(client, [("id.dcm", path.read_bytes(), "application/dicom")])
    assert r.status_code == 200
    said = caplog.text + "\n".join(str(w.message) for w in seen) + r.text
    for secret in ("Doe", "Jane", "PID-98765", "19900101", "St Example", "1.2.840."):
        assert secret not in said


def test_cors_is_closed_by_default(client):
    r = client.options(f"{API}/analyze", headers={"Origin": "https://evil.example",
                                                  "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in {k.lower() for k in r.headers}
    r = client.get(f"{API}/health", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in {k.lower() for k in r.headers}


# --------------------------------------------------------------------------- page and docs
def test_the_page_is_served_without_a_token_offline_and_states_the_disclaimer(client):
    r = client.get("/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert "supports, and never replaces" in r.text and "/static/app.js" in r.text
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert r.headers["x-content-type-options"] == "nosniff"
    js = client.get("/static/app.js")
    assert js.status_code == 200 and "Bearer" in js.text and "data-disclaimer" in client.get("/").text
    static = Path(__file__).resolve().parents[1] / "src" / "fetalscan" / "serve" / "static"
    for f in static.iterdir():  # no CDN, nothing fetched from elsewhere
        text = f.read_text(encoding="utf-8")
        assert "http://" not in text and "https://" not in text and "innerHTML" not in text, f.name


def test_openapi_documents_the_versioned_api_and_the_bearer_scheme(client):
    spec = client.get("/openapi.json").json()
    for path in ("/api/v1/health", "/api/v1/analyze", "/api/v1/studies/{study_id}/review", "/api/v1/reviews.csv"):
        assert path in spec["paths"], path
    assert any(s.get("scheme") == "bearer" for s in spec["components"]["securitySchemes"].values())


def test_api_responses_are_not_cached(client):
    r = client.get(f"{API}/model", headers=AUTH)
    assert r.headers["cache-control"] == "no-store"


# --------------------------------------------------------------------------- settings
def test_settings_refuse_insecure_local_off_loopback_and_weak_tokens(tiny_classifier, tmp_path):
    with pytest.raises(FetalscanError, match="loopback"):
        ServeSettings(model=tiny_classifier, insecure_local=True, host="0.0.0.0").validate()
    with pytest.raises(FetalscanError, match="no access token"):
        ServeSettings(model=tiny_classifier).validate()
    with pytest.raises(FetalscanError, match="at least 16"):
        ServeSettings(model=tiny_classifier, token="short").validate()
    with pytest.raises(FetalscanError, match="not allowed"):
        ServeSettings(model=tiny_classifier, token=TOKEN, cors_origins=["*"]).validate()
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        ServeSettings(model=tiny_classifier, insecure_local=True, host=host).validate()
    assert "test-token" not in json.dumps(ServeSettings(model=tiny_classifier, token=TOKEN).to_dict())


def test_token_comparison_is_constant_time_and_exact():
    from fetalscan.serve.settings import resolve_token, token_matches

    assert token_matches(TOKEN, TOKEN) and not token_matches(TOKEN[:-1], TOKEN)
    assert not token_matches("", TOKEN) and not token_matches(None, TOKEN)
    assert resolve_token({"FETALSCAN_TOKEN": "mine-0123456789abcdef"}) == ("mine-0123456789abcdef", False)
    token, generated = resolve_token({})
    assert generated and len(token) >= 32 and token != resolve_token({})[0]


def test_insecure_local_app_needs_no_token_and_says_so(tiny_classifier, tmp_path):
    app = create_app(ServeSettings(model=tiny_classifier, insecure_local=True, db=tmp_path / "db.sqlite",
                                   device="cpu", warm_up=False))
    c = TestClient(app)
    assert c.get(f"{API}/health").json()["auth"] == "off (--insecure-local)"
    assert c.get(f"{API}/model").status_code == 200
    assert analyze(c, [("a.png", png_bytes(blob_image(1)), "image/png")], headers={}).status_code == 200
    assert "insecure-local" in c.get("/").text


def test_cors_opens_only_for_named_origins(tiny_classifier, tmp_path):
    app = create_app(ServeSettings(model=tiny_classifier, token=TOKEN, db=tmp_path / "db.sqlite", device="cpu",
                                   warm_up=False, cors_origins=["https://viewer.example.org"]))
    c = TestClient(app)
    ok = c.options(f"{API}/analyze", headers={"Origin": "https://viewer.example.org",
                                              "Access-Control-Request-Method": "POST"})
    assert ok.headers.get("access-control-allow-origin") == "https://viewer.example.org"
    other = c.get(f"{API}/health", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in {k.lower() for k in other.headers}


def test_a_missing_or_foreign_model_file_is_a_clear_error(tmp_path, tiny_classifier):
    with pytest.raises(FetalscanError, match="not found"):
        create_app(ServeSettings(model=tmp_path / "none.pt", token=TOKEN, db=tmp_path / "db.sqlite"))
    with pytest.raises(FetalscanError, match="segmenter"):
        create_app(ServeSettings(model=tiny_classifier, biometry_model=tiny_classifier, token=TOKEN,
                                 db=tmp_path / "db.sqlite", device="cpu", warm_up=False))


# --------------------------------------------------------------------------- biometry
@pytest.fixture(scope="module")
def biometry_app(tiny_classifier, tmp_path_factory):
    """The app with a (tiny, untrained) head segmenter whose logits draw a known ellipse."""
    from fetalscan.models.segmenters import (
        SegmenterConfig,
        build_segmenter,
        save_segmenter,
    )

    root = tmp_path_factory.mktemp("serve_bio")
    cfg = SegmenterConfig(encoder="mobilenet_v2", decoder_channels="16,16,8,8,8", input_height=64, input_width=96)
    seg = save_segmenter(root / "seg.pt", build_segmenter(cfg), cfg, calibration={"axis_offset_px": 0.0})
    app = create_app(ServeSettings(model=tiny_classifier, biometry_model=seg, token=TOKEN, db=root / "db.sqlite",
                                   device="cpu", warm_up=False))
    segmenter = app.state.analyzer.segmenter
    h, w = cfg.input_height, cfg.input_width
    yy, xx = np.mgrid[:h, :w]
    inside = ((xx - w / 2) / (w * 0.3)) ** 2 + ((yy - h / 2) / (h * 0.3)) ** 2 < 1
    segmenter.logits = lambda batch, tta=None: np.where(inside, 8.0, -8.0).astype(np.float32)[None].repeat(len(batch), 0)
    return app


def test_biometry_gives_ellipse_hc_and_ga_when_a_segmenter_is_loaded(biometry_app):
    c = TestClient(biometry_app)
    assert c.get(f"{API}/health").json()["biometry"] is True
    image = png_bytes(blob_image(12, size=200))
    body = analyze(c, [("head.png", image, "image/png")], pixel_size_mm="0.9").json()
    bio = body["images"][0]["biometry"]
    assert bio["status"] == "ok" and bio["unit"] == "mm" and bio["pixel_size_source"] == "request"
    # ellipse semi-axes 0.3 * 200 = 60 px -> HC = 2*pi*60*0.9 mm (within the contour fit's tolerance)
    assert bio["hc"] == pytest.approx(2 * np.pi * 60 * 0.9, rel=0.03)
    assert bio["ga_weeks"] is not None and "w" in bio["ga_text"]
    assert bio["ellipse"]["cx"] == pytest.approx(100, abs=2)
    assert "sonographer" in bio["disclaimer"]
    plane = body["images"][0]["plane"]
    assert bio["head_plane"] is (plane in ("Brain (Tv.)", "Brain (Cb.)"))
    assert bio["head_plane"] or any("not a head plane" in w for w in bio["warnings"])
    png = c.get(bio["overlay_url"], headers=AUTH)
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    # without a pixel size: pixels, no GA, and a warning
    bio = analyze(c, [("head.png", image, "image/png")]).json()["images"][0]["biometry"]
    assert bio["unit"] == "px" and bio["ga_weeks"] is None and any("pixel size" in w for w in bio["warnings"])


def test_quality_score_reuses_the_plane_gate_of_the_prediction_path(biometry_app, monkeypatch):
    """The service's quality score equals quality_summary run on its own (which runs the plane gate itself),
    and the plane gate runs once per image: in the prediction path, not again for the score."""
    import fetalscan.biometry.quality as bq
    import fetalscan.quality.planes as planes
    c = TestClient(biometry_app)
    image = blob_image(12, size=200)
    calls = []
    real = planes.classify_planes
    monkeypatch.setattr(planes, "classify_planes",
                        lambda imgs, *a, **k: calls.append(len(imgs)) or real(imgs, *a, **k))
    body = analyze(c, [("head.png", png_bytes(image), "image/png")], pixel_size_mm="0.9").json()
    bio = body["images"][0]["biometry"]
    assert calls == [1]
    monkeypatch.setattr(planes, "classify_planes", real)
    segmenter = biometry_app.state.analyzer.segmenter
    alone = bq.quality_summary(segmenter, image, 0.9)
    assert bio["quality"]["quality"] == pytest.approx(alone["quality"], abs=1e-6)
    assert bio["quality"]["signals"]["plane_brain_prob"] == pytest.approx(alone["signals"]["plane_brain_prob"],
                                                                          abs=1e-6)


def test_dicom_calibration_is_used_for_biometry(biometry_app, tmp_path):
    c = TestClient(biometry_app)
    path = write_dicom(tmp_path / "head.dcm", grey(13, size=200), PixelSpacing=[0.5, 0.5])
    bio = analyze(c, [("head.dcm", path.read_bytes(), "application/dicom")]).json()["images"][0]["biometry"]
    assert bio["unit"] == "mm" and bio["pixel_size_mm"] == pytest.approx(0.5)
    assert bio["pixel_size_source"] == "DICOM"


# --------------------------------------------------------------------------- the real server
@pytest.mark.slow
def test_fetalscan_serve_starts_uvicorn_answers_and_stops(tiny_classifier, tmp_path):
    """``python -m fetalscan serve`` on a free loopback port: health, 401, analyze, review, CSV."""
    import os
    import socket
    import subprocess
    import sys
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "FETALSCAN_TOKEN": TOKEN}
    proc = subprocess.Popen([sys.executable, "-m", "fetalscan", "serve", "--model", str(tiny_classifier), "--port",
                             str(port), "--db", str(tmp_path / "db.sqlite"), "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                health = httpx.get(f"{base}{API}/health", timeout=2)
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.communicate()[1]
                assert time.monotonic() < deadline, "the server did not start within 120 s"
                time.sleep(0.5)
        assert health.json()["classes"] == ["abnormal", "normal"]
        files = [("files", ("a.png", png_bytes(blob_image(1)), "image/png"))]
        assert httpx.post(f"{base}{API}/analyze", files=files, timeout=60).status_code == 401
        r = httpx.post(f"{base}{API}/analyze", files=files, headers=AUTH, timeout=60)
        assert r.status_code == 200, r.text
        assert "server" not in {k.lower() for k in r.headers}  # uvicorn's banner header is off
        sid = r.json()["study"]["id"]
        assert httpx.post(f"{base}{API}/studies/{sid}/review", json={"reader": "R", "decision": "confirm"},
                          headers=AUTH, timeout=10).status_code == 201
        assert sid in httpx.get(f"{base}{API}/reviews.csv", headers=AUTH, timeout=10).text
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    assert TOKEN not in out + err  # a token from the environment is never printed


def test_client_file_names_lose_their_folders_and_are_shortened_safely(client):
    long = "超音波" * 60 + ".png"  # 724 bytes in UTF-8: longer than a file system allows
    files = [("../../etc/scan.png", png_bytes(blob_image(1)), "image/png"),
             (long, png_bytes(blob_image(2)), "image/png")]
    body = analyze(client, files).json()
    names = [im["name"] for im in body["images"]]
    assert names[0] == "scan.png"
    assert names[1].endswith(".png") and names[1].startswith("超音波") and len(names[1].encode()) <= 200
