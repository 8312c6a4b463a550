"""The reading app in a real browser (Debian's Chromium driven by Playwright) against ``fetalscan serve``.

The issue's "done" path: a three-reader demo study is created with the CLI, registered in the
running service, reader R1 reads every case of every arm in the browser (AI output only in the AI
arms, the second-read arm in two steps), readers R2 and R3 answer through the same API, and the
export is analysed into a report.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import httpx
import pytest
from conftest import blob_image, write_manifest, write_png
from live_service import running_service

playwright_api = pytest.importorskip("playwright.sync_api")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_study(tmp_path_factory) -> Path:
    from fetalscan.cli import main

    root = tmp_path_factory.mktemp("reading_browser")
    rows = []
    for g in range(6):
        label = "abnormal" if g % 2 else "normal"
        rel = f"{label}/{label}_{g}.png"
        write_png(root / rel, blob_image(200 + g, size=96, bright=label == "abnormal"))
        rows.append({"path": rel, "label": label, "group": f"{label}_{g}"})
    manifest = write_manifest(root / "manifest.csv", rows)
    assert main(["reader-study", "create", "--cases", str(manifest), "--readers", "3", "--washout-days", "0",
                 "--seed", "1", "--out", str(root / "study")]) == 0
    return root / "study"


def _codes(study: Path) -> dict[str, str]:
    with open(study / "logins.csv", newline="") as fh:
        return {r["reader"]: r["login_code"] for r in csv.DictReader(fh)}


def _read_by_api(url: str, code: str) -> int:
    with httpx.Client(base_url=url, timeout=120) as c:
        token = c.post("/api/v1/reading/login", json={"code": code}).json()["token"]
        hdr = {"Authorization": f"Bearer {token}"}
        n = 0
        while (item := c.get("/api/v1/reading/next", headers=hdr).json())["status"] == "reading":
            r = c.post("/api/v1/reading/answer", headers=hdr, json={
                "position": item["position"], "step": item["step"], "answer": "normal",
                "confidence": (37 * item["position"] + 11 * n) % 101})
            assert r.status_code == 201, r.text
            n += 1
        return n


def test_three_reader_study_created_read_in_the_browser_and_analysed(chromium, demo_study, tiny_classifier,
                                                                     tmp_path):
    from fetalscan.cli import main

    with running_service(tiny_classifier, tmp_path) as svc:
        reg = httpx.post(svc.url + "/api/v1/reading-admin/studies", json={"design_dir": str(demo_study)},
                         headers=svc.headers(), timeout=60)
        assert reg.status_code == 201, reg.text
        study_id = reg.json()["id"]
        codes = _codes(demo_study)
        with playwright_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                errors: list[str] = []
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                page.set_default_timeout(90_000)
                page.goto(svc.url + "/static/reading.html")
                page.fill("#code", "not-a-reader-code")
                page.click("#login-form button[type=submit]")
                page.wait_for_selector("#login-error", state="visible")
                page.fill("#code", codes["R1"])
                page.click("#login-form button[type=submit]")
                steps, ai_steps = 0, 0
                while True:
                    page.wait_for_selector("#reading:not([hidden]), #status:not([hidden])")
                    if page.is_visible("#status"):
                        assert "done" in page.text_content("#status-text")
                        break
                    page.wait_for_function("() => document.querySelectorAll('#images img').length > 0")
                    before = page.text_content("#progress") + page.text_content("#arm")
                    if page.is_visible("#ai"):
                        page.wait_for_function("() => document.querySelectorAll('#ai-heatmaps img').length > 0")
                        ai_steps += 1
                        if ai_steps == 1 and os.environ.get("FETALSCAN_READING_SCREENSHOT"):  # the docs' picture
                            page.screenshot(path=os.environ["FETALSCAN_READING_SCREENSHOT"], full_page=True)
                    body = page.text_content("body")
                    assert "normal_" not in body and "abnormal_" not in body  # case names never reach the page
                    page.select_option("#answer", "abnormal" if steps % 3 else "normal")
                    page.eval_on_selector("#confidence",
                                          "(e, v) => { e.value = v; e.dispatchEvent(new Event('input')); }",
                                          (29 * steps) % 101)
                    page.click("#submit")
                    page.wait_for_function(
                        "(b) => !document.getElementById('status').hidden || (document.getElementById('progress')"
                        ".textContent + document.getElementById('arm').textContent) !== b",
                        arg=before)
                    steps += 1
                assert not errors, f"JavaScript errors on the page: {errors}"
            finally:
                browser.close()
        assert steps == 6 * 3 + 6 and ai_steps == 6 + 6  # concurrent arm + second-read final steps
        assert _read_by_api(svc.url, codes["R2"]) == steps
        assert _read_by_api(svc.url, codes["R3"]) == steps
        export = httpx.get(f"{svc.url}/api/v1/reading-admin/studies/{study_id}/reads.csv", headers=svc.headers(),
                           timeout=60)
        assert export.status_code == 200
    reads = tmp_path / "reads.csv"
    reads.write_text(export.text)
    assert len(export.text.strip().splitlines()) == 1 + 3 * 3 * 6
    assert main(["reader-study", "analyze", str(reads), "--out", str(tmp_path / "analysis")]) == 0
    assert (tmp_path / "analysis" / "report.html").is_file()
