"""The search page at / in a real browser (Debian's chromium driven by Playwright),
asserting what a person sees. Screenshots are kept in $HEIMDEX_SCREENSHOT_DIR (default: a
temporary directory whose path the test prints)."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest

from heimdex_clip.db.store import SceneStore

from .serve_helpers import add_owner, distinct, patient_embedder, png, serve

sync_api = pytest.importorskip("playwright.sync_api")
pytestmark = [pytest.mark.db, pytest.mark.slow]


@pytest.fixture(scope="module")
def embedder(artifact_dir):
    return patient_embedder(artifact_dir)


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def site(module_pool, embedder, photos):
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"no chromium at {CHROMIUM}: apt-get install chromium (.ci/run does)")
    media = Path(tempfile.mkdtemp(prefix="heimdex-page-media-"))
    few = distinct(photos, 6)
    owner = add_owner(module_pool, embedder, few, media, uuid.uuid4())
    shots = Path(
        os.environ.get("HEIMDEX_SCREENSHOT_DIR") or tempfile.mkdtemp(prefix="heimdex-page-shots-")
    )
    shots.mkdir(parents=True, exist_ok=True)
    print(f"search page screenshots: {shots}")
    with serve(module_pool, embedder, media) as server, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield {
                "url": server.url,
                "owner": owner,
                "browser": browser,
                "shots": shots,
                "photos": few,
                "media": media,
                "store": SceneStore(module_pool),
                "embedder": embedder,
            }
        finally:
            browser.close()
    shutil.rmtree(media, ignore_errors=True)  # the screenshots are kept


def open_page(site, key: str):
    page = site["browser"].new_page(viewport={"width": 1200, "height": 900})
    page.goto(site["url"] + "/")
    page.fill("#api-key", key)
    page.dispatch_event("#api-key", "change")
    return page


def first_card_scene(page) -> str:
    page.wait_for_selector(".result")
    return page.locator(".result").first.get_attribute("data-scene-id")


def test_text_query_shows_the_expected_scene_first_with_its_frame(site):
    owner, store = site["owner"], site["store"]
    query = "a grey cat on a windowsill"
    expected = store.search_by_text(owner.id, site["embedder"], query, threshold=-1, count=24)
    page = open_page(site, owner.key)
    page.fill("#query", query)
    page.fill("#threshold", "-1")  # every scene, best first (a random-init model)
    page.click("#search")
    page.wait_for_selector(f"#status:has-text('{len(expected)} scenes for')")
    assert first_card_scene(page) == str(expected[0].id)
    first = page.locator(".result").first
    assert first.locator(".similarity").inner_text() == f"similarity {expected[0].similarity:.3f}"
    index = owner.scenes.index(expected[0].id)
    assert first.locator(".time").inner_text() == f"{index * 10.0:.1f}–{index * 10.0 + 7.5:.1f} s"
    # The frame is really shown: loaded through the authenticated frame route.
    page.wait_for_function("document.querySelector('.result img.frame').naturalWidth > 0")
    assert page.locator(".result").count() == len(expected)
    page.screenshot(path=str(site["shots"] / "text_query.png"), full_page=True)
    page.close()


def test_dropped_image_finds_its_scene_first_and_clicking_searches_similar(site, tmp_path):
    owner = site["owner"]
    image = tmp_path / "dropped.png"
    image.write_bytes(png(site["photos"][3][1]))
    page = open_page(site, owner.key)
    page.fill("#threshold", "-1")
    # Dropping a file: the same event a person's drag and drop fires, with a real File.
    data = image.read_bytes()
    handle = page.evaluate_handle(
        """(bytes) => { const dt = new DataTransfer();
               dt.items.add(new File([new Uint8Array(bytes)], 'dropped.png', {type: 'image/png'}));
               return dt; }""",
        list(data),
    )
    page.dispatch_event("#drop", "drop", {"dataTransfer": handle})
    page.wait_for_selector("#status:has-text('image dropped.png')")
    assert first_card_scene(page) == str(owner.scenes[3])
    assert page.locator(".result .similarity").first.inner_text() == "similarity 1.000"
    page.screenshot(path=str(site["shots"] / "dropped_image.png"), full_page=True)
    # Clicking a scene searches for scenes like it: it leaves the list, the others stay.
    page.locator(".result").first.click()
    page.wait_for_selector(f"#status:has-text('scenes like {str(owner.scenes[3])[:8]}')")
    shown = page.eval_on_selector_all(".result", "cards => cards.map(c => c.dataset.sceneId)")
    expected = site["store"].search_similar(
        owner.id, owner.scenes[3], count=24, threshold=-1, artifact=site["embedder"].artifact_id
    )
    assert shown == [str(h.id) for h in expected]
    page.close()


def test_a_wrong_key_shows_a_visible_error(site):
    page = open_page(site, "hck_this-key-does-not-exist")
    page.fill("#query", "anything")
    page.click("#search")
    error = page.locator("#error")
    error.wait_for(state="visible")
    assert error.inner_text() == "Error 401: unknown or revoked API key"
    assert page.locator(".result").count() == 0
    page.screenshot(path=str(site["shots"] / "wrong_key.png"), full_page=True)
    page.close()
