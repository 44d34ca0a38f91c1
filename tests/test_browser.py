"""The web page in a real browser: Debian's Chromium driven by Playwright against the real server."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from catsdogs import checkpoint as ckpt
from catsdogs.checkpoint import load_checkpoint
from catsdogs.config import ServeConfig
from tests.fixtures import REAL_DATA, jpeg_bytes, synthetic_image
from tests.live import live_server as serve_live

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = pytest.mark.slow


@contextmanager
def page_on(url: str, height: int = 760) -> Iterator[Any]:
    """A Chromium page on ``url``'s web page, once its model line has loaded (always closed)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": height})
            page.goto(url + "/")
            page.wait_for_selector("#model-info:not(:text('Loading model'))")
            yield page
        finally:
            browser.close()


@pytest.fixture
def live_server(run_dir: Path) -> Iterator[str]:
    """The app serving an untrained run written in the pre-detector checkpoint format."""
    with serve_live(ServeConfig(run=str(run_dir))) as url:
        yield url


@pytest.fixture
def live_trained_server(tmp_path: Path, shards: Path) -> Iterator[str]:
    """The app serving a briefly trained seed model, which carries an out-of-distribution detector."""
    from catsdogs.cli import main as cli_main

    assert cli_main(["train", "--data", str(shards), "--output", str(tmp_path / "trained"), "--epochs", "2",
                     "--threads", "1"]) == 0
    with serve_live(ServeConfig(run=str(tmp_path / "trained"))) as url:
        yield url


def test_page_classifies_an_uploaded_photo(live_server: str, tmp_path: Path) -> None:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent: install Debian's chromium (make browser) to run the browser test")
    from playwright.sync_api import sync_playwright

    photo = tmp_path / "kitten.jpg"
    photo.write_bytes(jpeg_bytes(synthetic_image(0, 96, seed=5)))
    api = httpx.post(f"{live_server}/predict", files={"file": (photo.name, photo.read_bytes(), "image/jpeg")})
    assert api.status_code == 200
    expected = api.json()
    classes = list(expected["probabilities"])

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 760})
            page.goto(live_server + "/")
            page.wait_for_selector("#model-info:not(:text('Loading model'))")
            assert "No report yet" in page.inner_text("#report-link")
            page.set_input_files("#file-input", str(photo))
            page.wait_for_selector("#answer:not([hidden])", timeout=15_000)
            label = page.inner_text("#label")
            assert label in classes
            assert label == expected["label"]
            shown = page.inner_text("#probability")
            assert shown == f"{100 * expected['probability']:.1f}%"
            assert page.locator("#bars li").count() == len(classes)
            assert page.is_hidden("#error")
            assert page.evaluate("document.getElementById('preview').naturalWidth") == 96
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)

            # Drag and drop works too: drop another photo on the drop zone.
            dropped = jpeg_bytes(synthetic_image(1, 64, seed=9))
            served = httpx.get(f"{live_server}/stats").json()["items"]
            transfer = page.evaluate_handle(
                """(bytes) => { const dt = new DataTransfer();
                   dt.items.add(new File([new Uint8Array(bytes)], 'dropped.jpg', {type: 'image/jpeg'}));
                   return dt; }""", list(dropped))
            page.dispatch_event("#dropzone", "drop", {"dataTransfer": transfer})
            page.wait_for_selector("#file-name:has-text('dropped.jpg')")
            page.wait_for_function("document.getElementById('preview').naturalWidth === 64")
            deadline = time.monotonic() + 15
            while httpx.get(f"{live_server}/stats").json()["items"] < served + 1:  # the page posted it
                assert time.monotonic() < deadline, "the dropped file was never sent to /predict"
                time.sleep(0.05)
            want = httpx.post(f"{live_server}/predict",
                              files={"file": ("d.jpg", dropped, "image/jpeg")}).json()
            page.wait_for_function("(want) => document.getElementById('probability').textContent === want",
                                   arg=f"{100 * want['probability']:.1f}%")
            assert page.inner_text("#label") == want["label"]

            # A file that is not an image shows the server's error in the page, not a crash.
            bad = tmp_path / "notes.jpg"
            bad.write_bytes(b"this is not a photo")
            page.set_input_files("#file-input", str(bad))
            page.wait_for_selector("#error:not([hidden])", timeout=15_000)
            assert "not_an_image" in page.inner_text("#error")
            assert page.is_hidden("#answer")
            page.screenshot(path=str(tmp_path / "page-error.png"), full_page=True)
        finally:
            browser.close()
    assert (tmp_path / "page.png").stat().st_size > 10_000


def test_page_shows_the_heatmap_of_what_drove_the_answer(live_server: str, tmp_path: Path) -> None:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent: install Debian's chromium (make browser) to run the browser test")
    from playwright.sync_api import sync_playwright

    photo = tmp_path / "wide.jpg"
    photo.write_bytes(jpeg_bytes(np.concatenate([synthetic_image(1, 120, seed=6)] * 2, axis=1)))  # 240 x 120
    api = httpx.post(f"{live_server}/predict?explain=true",
                     files={"file": (photo.name, photo.read_bytes(), "image/jpeg")}).json()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(live_server + "/")
            assert page.is_checked("#explain-toggle")  # explanations are on by default
            page.set_input_files("#file-input", str(photo))
            page.wait_for_selector("#explanation-box:not([hidden])", timeout=15_000)
            page.wait_for_function("document.getElementById('explanation').naturalWidth > 0")
            size = page.evaluate("[document.getElementById('explanation').naturalWidth,"
                                 " document.getElementById('explanation').naturalHeight]")
            assert size == [api["explanation"]["width"], api["explanation"]["height"]] == [240, 120]
            assert api["label"] in page.inner_text("#explanation-label")
            page.screenshot(path=str(tmp_path / "page-heatmap.png"), full_page=True)

            # Unticked: the page asks for no explanation and shows none.
            page.uncheck("#explain-toggle")
            again = tmp_path / "again.jpg"  # another file: choosing the same one fires no change event
            again.write_bytes(photo.read_bytes())
            page.set_input_files("#file-input", str(again))
            page.wait_for_selector("#explanation-box", state="hidden", timeout=15_000)
            assert page.is_visible("#answer")
        finally:
            browser.close()
    assert (tmp_path / "page-heatmap.png").stat().st_size > 10_000


def test_page_says_the_photo_looks_like_neither_class(live_trained_server: str, tmp_path: Path) -> None:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent: install Debian's chromium (make browser) to run the browser test")

    from tests.ood_set import generated_images, png_bytes

    page_of_text = tmp_path / "notes.png"
    page_of_text.write_bytes(png_bytes(generated_images(1, 160, seed=3)[6][1]))
    pet = tmp_path / "pet.png"
    pet.write_bytes(png_bytes(synthetic_image(0, 32, seed=901)))
    api = httpx.post(f"{live_trained_server}/predict",
                     files={"file": (page_of_text.name, page_of_text.read_bytes(), "image/png")}).json()
    assert api["label"] == "unknown"

    with page_on(live_trained_server) as page:
        page.set_input_files("#file-input", str(page_of_text))
        page.wait_for_selector("#unknown-note:not([hidden])", timeout=15_000)
        assert page.inner_text("#label") == "Neither"
        note = page.inner_text("#unknown-note")
        assert "looks like neither a Cat nor a Dog" in note
        assert page.inner_text("#probability") == ""
        assert page.inner_text("#bars-title") == "If it had to choose"
        assert page.locator("#bars li").count() == 2  # the class probabilities are still shown
        assert page.is_hidden("#looks-like")  # a scratch-trained CNN knows no concepts: it names none
        page.screenshot(path=str(tmp_path / "page-unknown.png"), full_page=True)

        # A photo like the training ones gets its class again, and the note goes away.
        page.set_input_files("#file-input", str(pet))
        page.wait_for_selector("#unknown-note[hidden]", state="attached", timeout=15_000)
        assert page.inner_text("#label") in ("Cat", "Dog")
        page.screenshot(path=str(tmp_path / "page-known.png"), full_page=True)

    assert (tmp_path / "page-unknown.png").stat().st_size > 10_000


def test_page_asks_for_the_key_once_and_runs_under_its_csp(run_dir: Path, tmp_path: Path) -> None:
    """With an API key and the Content-Security-Policy on: the page asks for the key, keeps it for the
    tab, classifies a photo, and the browser reports no CSP violation."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent: install Debian's chromium (make browser) to run the browser test")
    from playwright.sync_api import sync_playwright

    from tests.live import live_server

    key = "browser-test-key-0123456789"
    key_file = tmp_path / "api.key"
    key_file.write_text(key)
    photo = tmp_path / "kitten.jpg"
    photo.write_bytes(jpeg_bytes(synthetic_image(0, 96, seed=5)))
    (run_dir / "eval").mkdir()
    (run_dir / "eval" / "report.html").write_text("<html><body>the keyed report</body></html>")
    violations: list[str] = []
    cfg = ServeConfig(run=str(run_dir), api_key_file=str(key_file))
    with live_server(cfg) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 760})
            page.on("console", lambda m: violations.append(m.text) if "Content Security Policy" in m.text
                    else None)
            page.goto(url + "/")
            assert "content-security-policy" in page.evaluate("fetch('/').then(r => [...r.headers.keys()])")
            page.wait_for_selector("#key-form:not([hidden])")
            page.fill("#key-input", "wrong-key-0123456789abcdef")
            page.click("#key-form button")
            page.wait_for_selector("#key-error:not([hidden])")  # refused: asked again
            page.screenshot(path=str(tmp_path / "page-key-refused.png"), full_page=True)
            page.fill("#key-input", key)
            page.click("#key-form button")
            page.wait_for_selector("#model-info:has-text('Model seed')")
            assert page.is_hidden("#key-form")
            assert page.evaluate("sessionStorage.getItem('catsdogs-api-key')") == key
            page.set_input_files("#file-input", str(photo))
            page.wait_for_selector("#answer:not([hidden])", timeout=15_000)
            assert page.inner_text("#label") in ("Cat", "Dog")
            assert page.evaluate("document.getElementById('preview').naturalWidth") == 96  # blob: preview
            page.screenshot(path=str(tmp_path / "page-keyed.png"), full_page=True)
            # A plain link would send no key: with one, the report link downloads the report.
            page.wait_for_selector("#report-link:has-text('Evaluation report')")
            with page.expect_download() as download:
                page.click("#report-link")
            assert "the keyed report" in Path(download.value.path()).read_text()
            page.reload()  # the key is kept for the tab: no second prompt
            page.wait_for_selector("#model-info:has-text('Model seed')")
            assert page.is_hidden("#key-form")
        finally:
            browser.close()
    assert not violations, violations
    assert (tmp_path / "page-keyed.png").stat().st_size > 10_000


RACCOONS = REAL_DATA.parent / "not-pets" / "raccoon"


def test_page_names_what_an_unknown_photo_looks_like(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """Under "Neither", the ImageNet concepts the photo looks like: a raccoon on a model of real pets (when
    the real data is here), else a rocket on the photo fixture's model."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent: install Debian's chromium (make browser) to run the browser test")

    from tests.ood_set import png_bytes, sample_photos

    if RACCOONS.is_dir() and REAL_DATA.is_dir():
        run, candidates = request.getfixturevalue("real_run"), sorted(RACCOONS.glob("*.jpg"))
    else:
        run, candidates = request.getfixturevalue("photo_run")[0], [tmp_path / "rocket.png"]
        candidates[0].write_bytes(png_bytes(dict(sample_photos())["rocket"]))
    engine = str(load_checkpoint(run / "best.pt")[ckpt.CKPT_ENGINE])  # the features its detector saw
    with serve_live(ServeConfig(run=str(run), backend=engine)) as url:
        answers: list[tuple[Path, dict]] = []
        for start in range(0, len(candidates), 25):  # until one is "unknown" (1 in 8 on this small run)
            chunk = candidates[start:start + 25]
            batch = httpx.post(f"{url}/predict/batch", timeout=120, files=[
                ("files", (p.name, p.read_bytes(), "image/jpeg")) for p in chunk]).json()
            answers += list(zip(chunk, batch, strict=True))
            if any(a["label"] == "unknown" for _, a in answers):
                break
        photo, api = next((p, a) for p, a in answers if a["label"] == "unknown")
        assert api["looks_like"], api
        want = "Looks like: " + ", ".join(f"{c['concept']} {round(100 * c['probability'])} %"
                                          for c in api["looks_like"])
        with page_on(url, height=820) as page:
            page.set_input_files("#file-input", str(photo))
            page.wait_for_selector("#looks-like:not([hidden])", timeout=30_000)
            assert page.inner_text("#label") == "Neither"
            assert page.inner_text("#looks-like") == want
            # The line sits right under "Neither", above the note and the class bars.
            label_box = page.locator("#label").bounding_box()
            line_box = page.locator("#looks-like").bounding_box()
            assert label_box and line_box and line_box["y"] > label_box["y"]
            assert line_box["y"] < (page.locator("#bars").bounding_box() or {"y": 1e9})["y"]
            page.screenshot(path=str(tmp_path / "page-looks-like.png"), full_page=True)
            known = next((q for q, a in answers if a["label"] != "unknown" and not a["looks_like"]), None)
            if known is not None:  # a photo given a class, with no strong other concept, shows no line
                page.set_input_files("#file-input", str(known))
                page.wait_for_selector("#looks-like", state="hidden", timeout=30_000)

    assert (tmp_path / "page-looks-like.png").stat().st_size > 10_000


def test_api_docs_load_offline_under_a_csp_that_names_no_other_origin(run_dir: Path, tmp_path: Path) -> None:
    """/docs (Swagger UI) and /redoc (ReDoc) with every request to another origin blocked: both list the
    operations, nothing outside the app is fetched, and the CSP refuses what would leave it."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent: install Debian's chromium (make browser) to run the browser test")
    from playwright.sync_api import Route, sync_playwright

    from tests.live import live_server

    key_file = tmp_path / "api.key"
    key_file.write_text("docs-test-key-0123456789abcdef")  # with a key: the docs must stay open
    outside: list[str] = []
    console: dict[str, list[str]] = {"docs": [], "redoc": []}
    with live_server(ServeConfig(run=str(run_dir), api_key_file=str(key_file))) as url, \
            sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1200, "height": 1000})

            def only_the_app(route: Route) -> None:
                if route.request.url.startswith(url + "/"):
                    route.continue_()
                else:
                    outside.append(route.request.url)
                    route.abort()

            context.route("**/*", only_the_app)
            page = context.new_page()
            page.on("console", lambda m: console["redoc" if "/redoc" in page.url else "docs"].append(m.text))
            page.goto(url + "/docs")
            page.wait_for_selector(".opblock-summary-path", timeout=20_000)
            paths = {p.replace("\u200b", "") for p in page.locator(".opblock-summary-path").all_inner_texts()}
            assert {"/predict", "/predict/batch", "/healthz", "/model", "/metrics", "/report"} <= paths, paths
            assert page.locator(".opblock-post").count() == 2 and page.is_visible("button.authorize")
            page.click(".opblock-post >> nth=1")  # /predict/batch opens: Swagger UI's scripts run
            page.wait_for_selector("text=Try it out")
            page.screenshot(path=str(tmp_path / "docs.png"))

            page.goto(url + "/redoc")
            page.wait_for_selector("text=Classify one image", timeout=20_000)
            menu = page.locator("[role=menuitem]").all_inner_texts()
            assert any("Prometheus Metrics" in m for m in menu) and any("Predict Batch" in m for m in menu)
            page.fill("input[placeholder='Search...']", "metrics")  # the search index runs in its worker
            page.wait_for_selector("[role=search] >> text=Prometheus Metrics", timeout=10_000)
            page.screenshot(path=str(tmp_path / "redoc.png"))
        finally:
            browser.close()
    assert not outside, outside  # not even asked for: the CSP refuses other origins first
    assert not [m for m in console["docs"] if "Content Security Policy" in m or "Refused" in m], console
    # ReDoc's two refusals are by design: the Redocly logo of its footer (another origin) and the
    # perfect-scrollbar style sheet its bundle injects (native scroll bars instead); nothing else.
    refused = [m for m in console["redoc"] if "Content Security Policy" in m]
    assert all("cdn.redoc.ly" in m or "inline style" in m for m in refused), refused
    assert (tmp_path / "docs.png").stat().st_size > 20_000
    assert (tmp_path / "redoc.png").stat().st_size > 20_000


EVERYDAY = REAL_DATA.parent / "not-pets" / "everyday"


@pytest.mark.skipif(not (EVERYDAY.is_dir() and REAL_DATA.is_dir()),
                    reason=f"check photos not found at {EVERYDAY} (the development data)")
def test_a_hamster_and_a_printer_are_neither_and_a_forced_cat_says_what_else_it_looks_like(
        request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """Screenshots of a hamster and a printer (answered "Neither"), and of the hamster answered anyway
    (--no-reject): the class, with "Also looks like: hamster" in the CSV, the JSON and the page."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent: install Debian's chromium (make browser) to run the browser test")
    import csv

    from catsdogs.cli import main as cli_main

    run = request.getfixturevalue("real_run")
    hamster, printer = sorted(EVERYDAY.glob("hamster_*.jpg"))[0], sorted(EVERYDAY.glob("printer_*.jpg"))[0]
    engine = str(load_checkpoint(run / "best.pt")[ckpt.CKPT_ENGINE])
    with serve_live(ServeConfig(run=str(run), backend=engine)) as url:
        for photo in (hamster, printer):
            api = httpx.post(f"{url}/predict", timeout=120,
                             files={"file": (photo.name, photo.read_bytes(), "image/jpeg")}).json()
            assert api["label"] == "unknown" and api["looks_like"], api
            with page_on(url, height=820) as page:
                page.set_input_files("#file-input", str(photo))
                page.wait_for_selector("#looks-like:not([hidden])", timeout=30_000)
                assert page.inner_text("#label") == "Neither"
                assert page.inner_text("#looks-like").startswith("Looks like: ")
                page.screenshot(path=str(tmp_path / f"page-{photo.stem}.png"), full_page=True)
    with serve_live(ServeConfig(run=str(run), backend=engine, reject=False)) as url:
        api = httpx.post(f"{url}/predict", timeout=120,
                         files={"file": (hamster.name, hamster.read_bytes(), "image/jpeg")}).json()
        assert api["label"] in ("Cat", "Dog") and api["looks_like"], api
        assert "hamster" in {c["concept"] for c in api["looks_like"]}
        with page_on(url, height=820) as page:
            page.set_input_files("#file-input", str(hamster))
            page.wait_for_selector("#looks-like:not([hidden])", timeout=30_000)
            assert page.inner_text("#label") == api["label"]
            assert page.inner_text("#looks-like").startswith("Also looks like: hamster ")
            page.screenshot(path=str(tmp_path / "page-hamster-answered.png"), full_page=True)
    for out in (tmp_path / "p.csv", tmp_path / "p.json"):
        assert cli_main(["predict", str(hamster), "--run", str(run), "--no-reject", "--backend", engine,
                         "--output", str(out)]) == 0
    (row,) = csv.DictReader((tmp_path / "p.csv").open())
    assert row["label"] == api["label"] and row["looks_like"].startswith("hamster ")
    import json

    (record,) = json.loads((tmp_path / "p.json").read_text())
    assert record["looks_like"][0]["concept"] == "hamster" and record["label"] == api["label"]
    for name in ("page-" + hamster.stem, "page-" + printer.stem, "page-hamster-answered"):
        assert (tmp_path / f"{name}.png").stat().st_size > 10_000
