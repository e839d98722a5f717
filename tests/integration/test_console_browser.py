"""The web console in a real headless Chromium (Debian's package, driven by Playwright).

Uploads a real face photo, checks the drawn boxes and the match list, creates a gallery,
enrolls the face, searches again and browses the identities. Screenshots of each step land in
tests/artifacts/console/ (gitignored) for people to look at when the test fails.
"""

from __future__ import annotations

import base64
import shutil
from pathlib import Path

import pytest

from .http_support import astronaut_jpeg, base_url, start_http_server

CHROMIUM = Path("/usr/bin/chromium")
#: Headless as root on a machine without a screen, GPU or outside network.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "console"


@pytest.fixture(scope="module")
def console_url(ir18_repository):
    repository, name = ir18_repository
    server = start_http_server(repository, name)
    yield base_url(server) + "/"
    server.stop()


@pytest.fixture
def page(tmp_path):
    # `make test` installs Debian's chromium first; a missing browser is a failure, not a skip.
    assert CHROMIUM.exists(), "no /usr/bin/chromium: run `make browser` (apt-get install chromium)"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=FLAGS, timeout=60_000
        )
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 800})
            page = context.new_page()
            page.set_default_timeout(60_000)
            yield page
        finally:
            browser.close()


def _shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_console_detects_enrolls_and_matches(page, console_url, tmp_path):
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    photo = tmp_path / "astronaut.jpg"
    photo.write_bytes(astronaut_jpeg())
    page.goto(console_url)
    page.wait_for_function("document.getElementById('model').textContent.includes('adaface')")

    page.set_input_files("#photo", str(photo))
    page.wait_for_selector("#faces .face")
    boxes = page.locator("#stage .face-box")
    assert boxes.count() == 1
    box = boxes.first.bounding_box()
    photo_box = page.locator("#photo-img").bounding_box()
    assert box is not None and photo_box is not None
    # The astronaut's face is in the upper middle of the photo, a small part of it.
    assert photo_box["x"] < box["x"] < photo_box["x"] + photo_box["width"] / 2
    assert box["width"] < photo_box["width"] / 2
    score = float(page.locator("#faces .face .score").first.inner_text())
    assert 0.9 < score <= 1.0
    crop = page.locator("#faces .face img.crop").first
    assert crop.evaluate("img => img.naturalWidth") == 112
    _shot(page, "1-detected")

    page.fill("#new-gallery-name", "crew")
    page.click("#new-gallery button")
    page.wait_for_function("document.getElementById('gallery').value === 'crew'")
    page.wait_for_selector("#faces .matches .none")
    assert page.locator("#faces .matches .match").count() == 0
    assert page.locator("#faces .matches").first.inner_text() == "no matches"

    page.fill("#faces .enroll-name", "eileen")
    page.click("#faces .enroll button")
    page.wait_for_selector("#faces .matches .match")
    name = page.locator("#faces .match-name").first.inner_text()
    match = float(page.locator("#faces .match-score").first.inner_text())
    assert name == "eileen" and match > 0.99
    page.wait_for_selector("#identities .identity")
    assert page.locator("#identities .identity").all_inner_texts() == ["eileen · 1 sample(s)"]
    assert "enrolled eileen" in page.inner_text("#status")
    _shot(page, "2-enrolled-and-matched")

    # A fresh page load finds the gallery again and searches a dropped photo against it.
    page.reload()
    page.wait_for_function("document.getElementById('gallery').options.length > 1")
    page.select_option("#gallery", "crew")
    # This time the photo is dropped on the drop zone, as a person would.
    dropped = page.evaluate_handle(
        """(b64) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const data = new DataTransfer();
            data.items.add(new File([bytes], "dropped.jpg", { type: "image/jpeg" }));
            return data;
        }""",
        base64.b64encode(photo.read_bytes()).decode(),
    )
    page.dispatch_event("#drop", "drop", {"dataTransfer": dropped})
    page.wait_for_selector("#faces .matches .match")
    assert page.locator("#faces .match-name").first.inner_text() == "eileen"
    assert page.locator("#identities .identity").count() == 1
    _shot(page, "3-searched-again")


def test_console_sends_the_typed_bearer_token(page, ir18_repository, tmp_path):
    repository, name = ir18_repository
    (tmp_path / "admins").write_text("console-admin-token-0123\n")
    server = start_http_server(repository, name, admin_tokens_file=str(tmp_path / "admins"))
    try:
        page.goto(base_url(server) + "/")
        page.wait_for_function("document.getElementById('model').textContent.includes('UNAUTH')")
        assert "missing credentials" in page.inner_text("#model")
        page.fill("#token", "console-admin-token-0123")
        page.dispatch_event("#token", "change")
        page.wait_for_function("document.getElementById('model').textContent.includes('adaface')")
        page.fill("#new-gallery-name", "locked")
        page.click("#new-gallery button")
        page.wait_for_function(
            "document.getElementById('status').textContent.startsWith('created')"
        )
        assert page.inner_text("#status") == "created gallery locked"
        assert page.input_value("#gallery") == "locked"
        _shot(page, "4-with-token")
    finally:
        server.stop()
