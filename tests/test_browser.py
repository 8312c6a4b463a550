"""The page in a real browser: Debian's Chromium driven by Playwright against ``fetalscan serve``.

One reader's path through the page, as the issue states it: log in (a wrong token is
refused on the page), upload an image, see the study finding, the per-image probabilities
and the heatmap (its layer really loads, and the toggle and opacity slider act on it),
override the finding with a comment, and find the override stored by the service.

The screenshot of the result is what README.md shows: set ``FETALSCAN_SCREENSHOT=PATH``
(and optionally ``FETALSCAN_BROWSER_MODEL=CKPT`` to use e.g. the demo model) to write it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest
from conftest import blob_image, write_png
from live_service import running_service

playwright_api = pytest.importorskip("playwright.sync_api")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def service(tiny_classifier, tmp_path_factory):
    model = Path(os.environ.get("FETALSCAN_BROWSER_MODEL", tiny_classifier))
    with running_service(model, tmp_path_factory.mktemp("browser_service")) as svc:
        yield svc


@pytest.fixture
def page(chromium):
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            pg = context.new_page()
            errors: list[str] = []
            pg.on("pageerror", lambda exc: errors.append(str(exc)))
            pg.set_default_timeout(60_000)
            yield pg
            assert not errors, f"JavaScript errors on the page: {errors}"
        finally:
            browser.close()


def _upload_image(tmp_path: Path) -> Path:
    """A real fetal brain image when the shared data are beside the repository, else a made one."""
    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "fetal_brain" / "normal"
    real = sorted(shared.glob("*.jpg"))[:1] if shared.is_dir() else []
    if real:
        return Path(shutil.copy(real[0], tmp_path / "scan.jpg"))
    return write_png(tmp_path / "scan.png", blob_image(3, size=128))


def test_login_upload_heatmap_and_override(service, page, tmp_path):
    page.goto(service.url + "/")

    # a wrong token is refused on the page; the right one opens the upload card
    page.fill("#token", "not-the-token-at-all-0000")
    page.click("#login-form button[type=submit]")
    page.wait_for_function("() => document.getElementById('login-error').textContent.length > 0")
    assert page.is_hidden("#upload")
    page.fill("#token", service.token)
    page.click("#login-form button[type=submit]")
    page.wait_for_selector("#upload", state="visible")

    # upload one image and analyse it
    image = _upload_image(tmp_path)
    page.set_input_files("#files", str(image))
    page.click("#analyze")
    page.wait_for_selector("#result", state="visible", timeout=180_000)
    summary = page.inner_text("#study-summary")
    assert "Model's finding:" in summary
    health = httpx.get(service.url + "/api/v1/health").json()
    assert any(f"Model's finding: {c}" in summary for c in health["classes"])
    card = page.locator("#images .image-card").first
    assert image.name in card.inner_text()
    assert "never replaces" in card.inner_text()

    # the heatmap layer is a real, loaded image, and the controls act on it
    layer = card.locator("img.layer")
    page.wait_for_function("() => { const i = document.querySelector('#images img.layer');"
                           " return i && i.complete && i.naturalWidth > 0; }")
    assert layer.is_visible()
    page.fill("#heat-opacity", "20")
    page.dispatch_event("#heat-opacity", "input")
    assert layer.evaluate("el => el.style.opacity") == "0.2"
    page.uncheck("#heat-toggle")
    assert layer.is_hidden()
    page.check("#heat-toggle")
    assert layer.is_visible()

    # override the finding with a comment; the service stores it
    study_id = summary.rsplit("study ", 1)[1].split()[0]
    page.fill("#reader", "Dr Browser")
    page.check("input[name=decision][value=override]")
    final = page.eval_on_selector("#final-class", "el => el.value")
    page.fill("#comment", "checked on the live scan")
    page.click("#review-form button[type=submit]")
    page.wait_for_function("() => document.getElementById('review-status').textContent === 'Saved.'")
    # the history is re-read from the service after the save
    page.wait_for_function("() => document.getElementById('review-history').textContent.includes('(in force)')")
    assert "Dr Browser" in page.inner_text("#review-history")

    reviews = httpx.get(f"{service.url}/api/v1/studies/{study_id}/reviews", headers=service.headers()).json()
    assert [(r["reader"], r["decision"], r["final_class"], r["comment"]) for r in reviews] == [
        ("Dr Browser", "override", final, "checked on the live scan")]

    shot = tmp_path / "service.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    target = os.environ.get("FETALSCAN_SCREENSHOT")
    if target:
        shutil.copy(shot, target)


def _video(path: Path, n: int = 30) -> Path:
    """A short WebM (VP8) clip Chromium plays: a growing bright disc on speckle, 10 frames/s."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(0)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"VP80"), 10, (128, 128))
    assert writer.isOpened(), "OpenCV cannot write WebM here"
    for i in range(n):
        frame = rng.integers(0, 60, size=(128, 128, 3), dtype=np.uint8)
        cv2.circle(frame, (64, 64), 20 + i, (210, 210, 210), -1)
        writer.write(frame)
    writer.release()
    return path


def test_live_mode_plays_a_video_through_the_stream(service, page, tmp_path):
    page.goto(service.url + "/")
    page.fill("#token", service.token)
    page.click("#login-form button[type=submit]")
    page.wait_for_selector("#upload", state="visible")

    page.set_input_files("#live-file", str(_video(tmp_path / "cine.webm")))
    page.click("#live-start")
    # answers arrive while the video plays: the rolling finding is a class, the stats count frames
    page.wait_for_function("() => /analysed [1-9]/.test(document.getElementById('live-stats').textContent)",
                           timeout=120_000)
    health = httpx.get(service.url + "/api/v1/health").json()
    assert page.inner_text("#live-finding") in health["classes"]
    bars = page.inner_text("#live-bars")
    assert all(c in bars for c in health["classes"]) and "%" in bars
    assert "never replaces" in page.inner_text("#live-disclaimer")
    page.click("#live-stop")
