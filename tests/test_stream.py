"""Live mode of the service: the ``/api/v1/stream`` WebSocket.

A wrong or missing token closes the connection with 1008 (the token comes as a subprotocol
or the first message, never the query string); every frame gets an answer whose
probabilities sum to 1 and equal ``predict`` on the same image; when frames come faster than
the model, stale ones are dropped and the next answer says how many (made deterministic with
a classifier that waits for an event); a bad frame gets an error naming it and the
connection keeps working; a heatmap comes on request; the page has its Live section.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import blob_image, write_png
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from fetalscan.serve import ServeSettings, create_app
from fetalscan.serve.stream import HEADER_MAGIC, STREAM_PATH, SUBPROTOCOL, TOKEN_PROTOCOL_PREFIX
from fetalscan.texts import DISCLAIMER

TOKEN = "stream-test-token-0123456789"


@pytest.fixture(scope="module")
def app(tiny_classifier, tmp_path_factory):
    db = tmp_path_factory.mktemp("stream_db") / "reviews.sqlite"
    return create_app(ServeSettings(model=tiny_classifier, token=TOKEN, db=db, device="cpu", warm_up=False))


@pytest.fixture
def client(app) -> TestClient:
    return TestClient(app)


def png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def framed(data: bytes, **header) -> bytes:
    head = json.dumps(header).encode()
    return HEADER_MAGIC + struct.pack(">I", len(head)) + head + data


def connect(client: TestClient, token: str = TOKEN):
    return client.websocket_connect(STREAM_PATH, subprotocols=[SUBPROTOCOL, TOKEN_PROTOCOL_PREFIX + token])


def closed_with(ws) -> int:
    with pytest.raises(WebSocketDisconnect) as info:
        ws.receive_json()
    return info.value.code


# --------------------------------------------------------------------------- authentication
def test_wrong_or_missing_token_closes_with_1008(client) -> None:
    with connect(client, "wrong-token-wrong-token") as ws:
        assert closed_with(ws) == 1008
    with client.websocket_connect(STREAM_PATH) as ws:  # token as the first message, but wrong
        ws.send_text(json.dumps({"type": "auth", "token": "not-the-token-at-all"}))
        assert closed_with(ws) == 1008
    with client.websocket_connect(STREAM_PATH) as ws:  # no token: a frame first
        ws.send_bytes(png(blob_image(1)))
        assert closed_with(ws) == 1008
    with client.websocket_connect(f"{STREAM_PATH}?token={TOKEN}") as ws:  # the query string is not read
        ws.send_bytes(png(blob_image(1)))
        assert closed_with(ws) == 1008


def test_token_as_subprotocol_or_first_message_is_accepted(client) -> None:
    with connect(client) as ws:
        assert ws.accepted_subprotocol == SUBPROTOCOL  # the token itself is never echoed
        ready = ws.receive_json()
        assert ready["type"] == "ready" and ready["classes"] == ["abnormal", "normal"]
        assert ready["disclaimer"] == DISCLAIMER and ready["backend"] in ("onnx", "torch")
    with client.websocket_connect(STREAM_PATH) as ws:
        ws.send_text(json.dumps({"type": "auth", "token": TOKEN}))
        assert ws.receive_json()["type"] == "ready"


# --------------------------------------------------------------------------- answers
def test_frames_get_probabilities_equal_to_predict(client, app, tmp_path: Path) -> None:
    from fetalscan.data.records import load_dataset
    from fetalscan.inference.predict import PredictConfig, predict

    images = [blob_image(40 + i, bright=i % 2 == 0) for i in range(3)]
    with connect(client) as ws:
        ws.receive_json()
        answers = []
        for i, img in enumerate(images):
            ws.send_bytes(png(img) if i != 1 else framed(png(img), id="cine-7#1", t=123.5))
            answers.append(ws.receive_json())
    assert [a["type"] for a in answers] == ["result"] * 3
    assert [a["frame"] for a in answers] == [0, "cine-7#1", 2]
    assert answers[1]["t"] == 123.5
    loaded = app.state.analyzer.loaded
    for i, (img, a) in enumerate(zip(images, answers)):
        assert sum(a["probabilities"].values()) == pytest.approx(1.0, abs=1e-9)
        assert a["prediction"] == max(a["probabilities"], key=a["probabilities"].get)
        assert a["dropped"] == 0 and a["latency_ms"] >= a["inference_ms"] >= 0
        data = load_dataset(write_png(tmp_path / f"f{i}.png", img), require_labels=False)
        for backend in (None, "torch"):  # the service's own backend, and PyTorch
            direct = predict(loaded, data, PredictConfig(backend=backend))
            np.testing.assert_allclose([a["probabilities"][c] for c in ("abnormal", "normal")],
                                       direct.probabilities[0], atol=1e-4)


def test_stale_frames_are_dropped_and_counted(client, app, monkeypatch) -> None:
    engine = app.state.stream
    real = engine.classify
    inside, release = threading.Event(), threading.Event()

    def slow(image):  # the model is "slower than the stream" until the test releases it
        inside.set()
        release.wait(30)
        return real(image)

    monkeypatch.setattr(engine, "classify", slow)
    frames = [png(blob_image(60 + i)) for i in range(5)]
    with connect(client) as ws:
        ws.receive_json()
        ws.send_bytes(frames[0])
        assert inside.wait(30)  # the worker is busy with frame 0
        for f in frames[1:4]:
            ws.send_bytes(f)
        ws.send_text(json.dumps({"type": "ping"}))
        pong = ws.receive_json()  # the receiver has put frames 1-3 into the mailbox
        assert pong == {"type": "pong", "received": 4, "dropped_total": 2}
        release.set()
        first, newest = ws.receive_json(), ws.receive_json()
        assert (first["frame"], first["dropped"]) == (0, 0)
        assert (newest["frame"], newest["dropped"], newest["dropped_total"]) == (3, 2, 2)  # 1 and 2 never analysed
        ws.send_bytes(frames[4])
        last = ws.receive_json()
        assert (last["frame"], last["dropped"], last["dropped_total"], last["analysed"]) == (4, 0, 2, 3)


def test_a_bad_frame_is_named_and_the_connection_keeps_working(client) -> None:
    good = png(blob_image(80))
    with connect(client) as ws:
        ws.receive_json()
        ws.send_bytes(b"this is not an image")
        err = ws.receive_json()
        assert err["type"] == "error" and err["frame"] == 0 and "frame 0" in err["detail"]
        ws.send_bytes(good[: len(good) // 2])  # a truncated PNG: found while decoding
        err = ws.receive_json()
        assert err["type"] == "error" and err["frame"] == 1 and "frame 1" in err["detail"]
        ws.send_bytes(framed(b"GIF89a....", id="x9"))
        err = ws.receive_json()
        assert err["frame"] == "x9" and "JPEG or PNG" in err["detail"]
        ws.send_text("{not json")
        assert ws.receive_json()["type"] == "error"
        ws.send_bytes(good)
        ok = ws.receive_json()
        assert ok["type"] == "result" and ok["frame"] == 3


def test_a_heatmap_comes_on_request(client) -> None:
    from PIL import Image

    with connect(client) as ws:
        ws.receive_json()
        ws.send_text(json.dumps({"type": "heatmap"}))
        assert "no frame analysed yet" in ws.receive_json()["detail"]
        ws.send_bytes(png(blob_image(90, size=72)))
        assert ws.receive_json()["type"] == "result"
        ws.send_text(json.dumps({"type": "heatmap"}))
        heat = ws.receive_json()
    assert heat["type"] == "heatmap" and heat["frame"] == 0 and "evidence" in heat["disclaimer"]
    with Image.open(io.BytesIO(base64.b64decode(heat["png_base64"]))) as im:
        assert im.size == (72, 72)


def test_the_page_has_a_live_section(client) -> None:
    page = client.get("/").text
    assert 'id="live"' in page and "/static/live.js" in page
    r = client.get("/static/live.js")
    assert r.status_code == 200 and STREAM_PATH in r.text and TOKEN_PROTOCOL_PREFIX in r.text
    assert "media-src 'self' blob:" in client.get("/").headers["content-security-policy"]  # the chosen video plays
