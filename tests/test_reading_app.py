"""The reading app in the service: login per reader, blinding, AI only in AI arms, server time,
washout, resumable, append-only answers, export that `reader-study analyze` reads."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from conftest import blob_image, write_manifest, write_png
from fastapi.testclient import TestClient

from fetalscan.reader.design import DesignConfig, create_study
from fetalscan.reader.reads import reads_from_rows
from fetalscan.serve import ServeSettings, create_app

TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class Clock:
    def __init__(self) -> None:
        self.t = 1_700_000_000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("reading_cases")
    rows = []
    for g in range(6):
        label = "abnormal" if g % 2 else "normal"
        rel = f"{label}/{label}_case{g}.png"
        write_png(root / rel, blob_image(100 + g, bright=label == "abnormal"))
        rows.append({"path": rel, "label": label, "group": f"{label}_case{g}"})
    manifest = write_manifest(root / "manifest.csv", rows)
    out = root / "study"
    create_study(manifest, out, DesignConfig(readers=2, washout_days=1, seed=0))
    return out


@pytest.fixture(scope="module")
def client(tiny_classifier, tmp_path_factory):
    db = tmp_path_factory.mktemp("reading_db") / "reviews.sqlite"
    app = create_app(ServeSettings(model=tiny_classifier, token=TOKEN, db=db, device="cpu", warm_up=False))
    clock = Clock()
    app.state.reading_store.clock = clock
    c = TestClient(app)
    c.clock = clock
    return c


def _logins(study: Path) -> dict[str, str]:
    with open(study / "logins.csv", newline="") as fh:
        return {r["reader"]: r["login_code"] for r in csv.DictReader(fh)}


def _login(client, code: str) -> dict:
    res = client.post("/api/v1/reading/login", json={"code": code})
    assert res.status_code == 200, res.text
    return {"Authorization": f"Bearer {res.json()['token']}"}


@pytest.mark.slow
def test_a_reader_reads_blinded_and_timed_and_the_export_analyses(client, study):
    res = client.post("/api/v1/reading-admin/studies", json={"design_dir": str(study)}, headers=AUTH)
    assert res.status_code == 201, res.text
    sid = res.json()["id"]
    assert client.post("/api/v1/reading-admin/studies", json={"design_dir": str(study)}).status_code == 401
    logins = _logins(study)
    assert client.post("/api/v1/reading/login", json={"code": "wrong-code"}).status_code == 401
    assert client.get("/api/v1/reading/next", headers=AUTH).status_code == 401  # the service token is not a reader

    for reader, code in logins.items():
        hdr = _login(client, code)
        steps = 0
        while True:
            nxt = client.get("/api/v1/reading/next", headers=hdr)
            assert nxt.status_code == 200, nxt.text
            data = nxt.json()
            text = json.dumps(data)
            assert "case" not in text.replace("cases", "") and "truth" not in text and "_case" not in text
            if data["status"] == "locked":  # the next session: after the washout
                assert steps > 0
                client.clock.t += 86400 + 1
                continue
            if data["status"] == "done":
                break
            pos = data["position"]
            ai = client.get(f"/api/v1/reading/items/{pos}/ai", headers=hdr)
            expected_ai = data["arm"] == "concurrent" or (data["arm"] == "second-read" and data["step"] == "final")
            assert data["ai"] == expected_ai
            assert ai.status_code == (200 if expected_ai else 403), (data, ai.text)
            if expected_ai:
                assert set(ai.json()["probabilities"]) == {"abnormal", "normal"}
                heat = client.get(ai.json()["heatmaps"][0], headers=hdr)
                assert heat.status_code == 200 and heat.content[:4] == b"\x89PNG"
            img = client.get(data["images"][0], headers=hdr)
            assert img.status_code == 200 and img.content[:4] == b"\x89PNG"
            assert client.get(f"/api/v1/reading/items/{pos + 1}/images/0.png", headers=hdr).status_code == 404
            client.clock.t += 7.5  # the server measures 7.5 s
            ans = client.post("/api/v1/reading/answer", headers=hdr,
                              json={"position": pos, "step": data["step"], "answer": "abnormal",
                                    "confidence": 20 + 10 * (pos % 7)})
            assert ans.status_code == 201, ans.text
            assert ans.json()["seconds"] == pytest.approx(7.5)
            steps += 1
        assert steps == 6 * 3 + 6  # 6 cases x 3 arms, plus the second-read arm's first answers

    assert client.get(f"/api/v1/reading-admin/studies/{sid}/reads.csv").status_code == 401
    export = client.get(f"/api/v1/reading-admin/studies/{sid}/reads.csv", headers=AUTH)
    assert export.status_code == 200
    rows = list(csv.DictReader(io.StringIO(export.text)))
    assert len(rows) == 2 * 3 * 6
    second = [r for r in rows if r["treatment"] == "second-read"]
    assert {float(r["seconds"]) for r in second} == {15.0}  # first + final step
    reads = reads_from_rows(list(enumerate(rows, start=2)), source="export")
    assert reads.treatments == ["concurrent", "second-read", "unaided"] and reads.shape == (3, 2, 6)


def test_answers_are_appended_and_the_reading_resumes(client, study, tmp_path):
    """A second login of the same reader resumes where the first stopped; a wrong step, an unknown class and
    a change of a submitted reading are refused; the store holds one answer record."""
    out = tmp_path / "study2"
    manifest = Path(json.loads((study / "design.json").read_text())["manifest"])
    create_study(manifest, out, DesignConfig(readers=2, arms=("unaided", "second-read"), washout_days=0, seed=4))
    client.post("/api/v1/reading-admin/studies", json={"design_dir": str(out)}, headers=AUTH)
    code = _logins(out)["R1"]
    hdr = _login(client, code)
    first = client.get("/api/v1/reading/next", headers=hdr).json()
    wrong = "final" if first["step"] != "final" else "single"
    pos, step = first["position"], first["step"]

    def post(**body):
        return client.post("/api/v1/reading/answer", headers=hdr, json={"position": pos, **body})

    assert post(step=wrong, answer="normal", confidence=5).status_code == 409
    assert post(step=step, answer="maybe", confidence=5).status_code == 422
    assert post(step=step, answer="normal", confidence=5).status_code == 201
    hdr2 = _login(client, code)  # a new login (another browser): resumes
    again = client.get("/api/v1/reading/next", headers=hdr2).json()
    assert (again["position"], again["step"]) != (first["position"], first["step"])
    # submitted readings are final: 409 when the same reading waits for its next step, else 404
    assert post(step=step, answer="abnormal", confidence=90).status_code in (404, 409)
    if first["step"] == "first":
        assert again["first_answer"] == {"answer": "normal", "confidence": 5.0}
    store = client.app.state.reading_store
    events = [e for e in store.events(store.reader_of(hdr2["Authorization"][7:])[0], "R1") if e["kind"] == "answer"]
    assert len(events) == 1


def test_the_reading_page_is_served_without_external_resources(client):
    page = client.get("/static/reading.html")
    assert page.status_code == 200
    assert "http://" not in page.text and "https://" not in page.text
    js = client.get("/static/reading.js").text
    assert "/api/v1/reading" in js and "http" not in js.replace("/api/v1", "")
