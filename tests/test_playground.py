"""The playground page at / in a real headless browser (Debian's chromium + chromium-driver, driven by selenium):
generate an image on a tiny checkpoint and see its progress, previews and result; submit an image-to-video job
with an uploaded image and download the MP4. Without a browser the tests skip, except under CI=true."""

from __future__ import annotations

import os
import shutil

import httpx
import pytest
from PIL import Image
from server_utils import ServerProcess

from diffgen.testing import TINY_FAMILIES

KEY = "sk-playground"
WAIT_S = 120


def _browser_paths() -> tuple[str | None, str | None]:
    return (shutil.which("chromium") or shutil.which("chromium-browser"),
            shutil.which("chromedriver") or (os.path.exists("/usr/bin/chromedriver") and "/usr/bin/chromedriver"))


@pytest.fixture(scope="module")
def browser():
    chromium, driver_path = _browser_paths()
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        chromium = None
    if not chromium or not driver_path:
        reason = "needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver) and selenium"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but the browser is missing: {reason}")
        pytest.skip(reason)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1200,1600"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    driver.set_script_timeout(60)
    yield driver
    driver.quit()


def _wait(browser, condition, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, WAIT_S, poll_frequency=0.1).until(condition, message=f"waiting for {what}")


def _fill(browser, values: dict[str, str]) -> None:
    for field, value in values.items():
        element = browser.find_element("id", field)
        element.clear()
        element.send_keys(value)


def _record_progress(browser) -> None:
    """Keep every text the progress line shows (a run on a tiny model is over in a second)."""
    browser.execute_script("""
        window.progressTexts = [];
        new MutationObserver(() => window.progressTexts.push(document.getElementById('progress-text').textContent))
            .observe(document.getElementById('progress-text'), {childList: true, characterData: true, subtree: true});
    """)


@pytest.fixture(scope="module")
def image_server(tiny_flux, tmp_path_factory):
    process = ServerProcess(tiny_flux, tmp_path_factory.mktemp("playground-images") / "out",
                            env={"DIFFGEN_API_KEY": KEY}).start()
    yield process
    process.stop()


def test_generate_an_image_and_see_progress_previews_and_result(browser, image_server):
    browser.get(f"{image_server.url}/")
    assert "401" not in browser.page_source
    _wait(browser, lambda b: "API key" in b.find_element("id", "model-info").text, "the 401 shown")
    browser.find_element("css selector", "details summary").click()
    _fill(browser, {"api-key": KEY})
    browser.find_element("id", "prompt").click()  # leaving the field fires "change": the key is used from now on
    _wait(browser, lambda b: b.find_element("id", "generate").is_enabled(), "the model to be ready")
    assert "image model (T2I)" in browser.find_element("id", "model-info").text
    _fill(browser, {"prompt": "a lighthouse at dusk", "width": "64", "height": "48", "steps": "6", "seed": "5",
                    "preview-every": "2"})
    _record_progress(browser)
    browser.find_element("id", "generate").click()
    result = _wait(browser, lambda b: b.find_elements("css selector", "#result-media img.result-image"), "the image")
    _wait(browser, lambda b: b.execute_script("return arguments[0].complete && arguments[0].naturalWidth", result[0]),
          "the image to load")
    assert browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", result[0]) == \
        [64, 48]
    texts = browser.execute_script("return window.progressTexts")
    assert all(f"step {step}/6" in " ".join(texts) for step in range(1, 7)), texts
    assert texts[-1] == "done"
    previews = browser.find_elements("css selector", "#previews img")
    assert len(previews) == 1 and previews[0].get_attribute("src").startswith("data:image/png;base64,")
    assert browser.execute_script("return arguments[0].naturalWidth", previews[0]) == 8  # the latent grid
    params = browser.find_element("id", "result-params").text
    assert "a lighthouse at dusk" in params and "64x48" in params and "seed 5" in params.replace("\n", " ")
    assert "a lighthouse at dusk" in browser.find_element("id", "gallery").text
    assert not browser.find_element("id", "error").is_displayed()


def test_a_bad_request_shows_the_servers_message(browser, image_server):
    browser.get(f"{image_server.url}/")
    _wait(browser, lambda b: b.find_element("id", "generate").is_enabled(), "the model to be ready")  # key stored
    _fill(browser, {"prompt": "x", "width": "64", "height": "64", "steps": "2000"})
    browser.execute_script("document.getElementById('steps').removeAttribute('max')")  # past the browser's check
    browser.find_element("id", "generate").click()
    error = _wait(browser, lambda b: b.find_element("id", "error").is_displayed() and b.find_element("id", "error"),
                  "the error")
    assert "num_inference_steps" in error.text


@pytest.fixture(scope="module")
def video_server(tiny_checkpoint, tmp_path_factory):
    if "wan22-ti2v" not in TINY_FAMILIES:
        pytest.skip("needs the tiny Wan2.2 TI2V checkpoint")
    # The test-only slow marker (50 ms a step) keeps the job running while the page opens its event stream.
    process = ServerProcess(tiny_checkpoint("wan22-ti2v"), tmp_path_factory.mktemp("playground-videos") / "out",
                            env={"DIFFGEN_FAULT_INJECT": "1"}).start()
    yield process
    process.stop()


def test_image_to_video_with_an_upload_then_download(browser, video_server, tmp_path):
    picture = tmp_path / "start.png"
    Image.new("RGB", (64, 64), (200, 40, 40)).save(picture)
    browser.get(f"{video_server.url}/")
    _wait(browser, lambda b: b.find_element("id", "generate").is_enabled(), "the model to be ready")
    assert "video model (TI2V)" in browser.find_element("id", "model-info").text
    _fill(browser, {"prompt": "a red ball rolls [[fault:slow]]", "width": "64", "height": "64", "steps": "8",
                    "frames": "5",
                    "seed": "2", "preview-every": "1"})
    browser.find_element("id", "image").send_keys(str(picture))
    _record_progress(browser)
    browser.find_element("id", "generate").click()
    link = _wait(browser, lambda b: b.find_elements("id", "download"), "the download link")[0]
    head = browser.execute_async_script("""
        const done = arguments[arguments.length - 1];
        fetch(arguments[0]).then(r => r.arrayBuffer())
            .then(b => done({size: b.byteLength, tag: String.fromCharCode(...new Uint8Array(b.slice(4, 8)))}));
    """, link.get_attribute("href"))
    assert head["tag"] == "ftyp"
    video_id = link.get_attribute("download").removesuffix(".mp4")
    served = httpx.get(f"{video_server.url}/v1/videos/{video_id}/content", timeout=30).content
    assert head["size"] == len(served)
    texts = " ".join(browser.execute_script("return window.progressTexts"))
    assert "step 8/8" in texts, texts
    assert browser.find_elements("css selector", "#previews img")
    assert "a red ball rolls" in browser.find_element("id", "gallery").text
