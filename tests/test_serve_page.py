"""The web page of ``vqgen serve`` in a real browser (headless Chromium through Selenium): the
image it draws is the API's, pixel for pixel; previews come before it; the gallery keeps it; a
422 shows the field's message; an API key is asked for; its SSE parser survives any chunking.

Needs Debian's ``chromium`` and ``chromium-driver`` (``apt-get install chromium chromium-driver``);
without them the tests skip, saying so.
"""

from __future__ import annotations

import base64
import io
import json
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from serving import live_server, load_pipeline

from vqgen.serve.service import ServeConfig

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
for binary, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
    if not binary.is_file():
        pytest.skip(f"{binary} is missing (apt-get install {package})", allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

WAIT_S = 60
PROMPT = "a tiny crimson disc at the bottom right"
SEED = 2**53 + 1  # past JavaScript's exact integers: the page must send it digit for digit
API_KEY = "page-test-key"


@pytest.fixture(scope="module")
def pipeline(micro_run):
    return load_pipeline(micro_run)


@pytest.fixture(scope="module")
def server(pipeline):
    with live_server(pipeline, ServeConfig(slots=4, max_queue=8)) as (url, service):
        # The micro model decodes an image in milliseconds, which can finish it before the event
        # loop sends a preview (the server skips previews of finished images): 20 ms a decode
        # step leaves time for them, as a real model's steps do.
        step = service.scheduler.step

        def paced() -> bool:
            decoded = step()
            if decoded:
                time.sleep(0.02)
            return decoded

        service.scheduler.step = paced
        yield url


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)  # with the driver's path too, Selenium Manager never runs
    with tempfile.TemporaryDirectory() as profile:
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--no-first-run", "--window-size=1200,800", f"--user-data-dir={profile}"):
            options.add_argument(arg)
        driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
        try:
            driver.set_script_timeout(WAIT_S)
            yield driver
        finally:
            driver.quit()


def wait_for(driver, condition, what: str):
    """``condition(driver)`` once it is truthy; after WAIT_S seconds, fail with the page's status and error."""
    try:
        return WebDriverWait(driver, WAIT_S, poll_frequency=0.05).until(condition)
    except Exception as e:
        page = {id_: driver.find_element(By.ID, id_).text for id_ in ("status", "error")}
        raise AssertionError(f"waiting for {what}: {type(e).__name__}; the page says {page}") from None


def open_page(driver, url: str) -> None:
    """Load the page and wait for the checkpoint's defaults to fill the settings."""
    driver.get(url + "/")
    wait_for(driver, lambda d: d.find_element(By.ID, "temperature").get_attribute("value"), "the settings from /v1/info")


def fill(driver, field: str, text: str) -> None:
    element = driver.find_element(By.ID, field)
    element.clear()
    element.send_keys(text)


def pixels(png_base64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(png_base64))).convert("RGB"))


def test_the_page_draws_the_apis_image_row_by_row(browser, server):
    open_page(browser, server)
    assert browser.find_element(By.ID, "key-row").get_attribute("hidden") is not None  # no key asked for
    browser.find_element(By.ID, "seed-random").click()  # a fixed seed
    fill(browser, "seed", str(SEED))
    fill(browser, "temperature", "0.8")
    fill(browser, "top_k", "20")
    fill(browser, "prompt", PROMPT)
    browser.find_element(By.ID, "generate").click()
    tile = wait_for(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#current .tile[data-state=done]"), "the final image")

    defaults = httpx.get(f"{server}/v1/info", timeout=WAIT_S).json()["settings"]
    settings = {**{k: defaults[k] for k in ("cfg_scale", "cfg_schedule", "top_p")}, "temperature": 0.8, "top_k": 20}
    api = httpx.post(f"{server}/v1/images", json={"prompt": PROMPT, "seed": SEED, **settings}, timeout=WAIT_S)
    assert api.status_code == 200, api.text
    expected = api.json()["images"][0]
    assert np.array_equal(pixels(tile.get_attribute("data-png")), pixels(expected["png"]))
    assert tile.get_attribute("data-seed") == str(expected["seed"])  # a 63-bit seed, exact through JavaScript
    assert int(tile.get_attribute("data-previews")) >= 1  # rows were shown before the image

    other = httpx.post(f"{server}/v1/images", json={"prompt": PROMPT, "seed": SEED - 1, **settings}, timeout=WAIT_S)
    # 2^53 + 1 rounded to a double is 2^53: a page that rounded it would have drawn another image
    assert not np.array_equal(pixels(other.json()["images"][0]["png"]), pixels(expected["png"]))

    entries = browser.find_elements(By.CSS_SELECTOR, "#gallery .entry")
    assert [(e.get_attribute("data-prompt"), e.get_attribute("data-seed")) for e in entries] == [(PROMPT, str(SEED))]
    assert entries[0].get_attribute("data-png") == tile.get_attribute("data-png")
    assert browser.find_element(By.ID, "status").text.startswith("1 of 1 image(s) in ")

    # a gallery entry puts its prompt, seed and settings back, random seed off
    fill(browser, "prompt", "something else")
    fill(browser, "temperature", "0.3")
    browser.find_element(By.ID, "seed-random").click()
    entries[0].click()
    values = {f: browser.find_element(By.ID, f).get_attribute("value") for f in ("prompt", "seed", "temperature", "top_k")}
    assert values == {"prompt": PROMPT, "seed": str(SEED), "temperature": "0.8", "top_k": "20"}
    assert not browser.find_element(By.ID, "seed-random").is_selected()


def test_a_422_shows_the_fields_message(browser, server):
    open_page(browser, server)
    fill(browser, "prompt", PROMPT)
    fill(browser, "temperature", "0")
    browser.find_element(By.ID, "prompt").send_keys("\n")  # Enter submits
    error = wait_for(browser, lambda d: d.find_element(By.ID, "error").text, "the error")
    assert error.startswith("temperature: must be a finite number > 0, got 0.0"), error
    assert "invalid" in browser.find_element(By.ID, "temperature").get_attribute("class")
    assert not browser.find_elements(By.CSS_SELECTOR, "#current .tile, #gallery .entry")
    assert browser.find_element(By.ID, "generate").is_enabled()


def test_the_page_asks_for_the_api_key(browser, pipeline):
    with live_server(pipeline, ServeConfig(slots=2, max_queue=2, max_images=2), api_key=API_KEY) as (url, _):
        browser.get(url + "/")
        browser.execute_script("localStorage.clear()")
        browser.refresh()
        wait_for(browser, lambda d: d.find_element(By.ID, "api-key").is_displayed(), "the API key field")
        assert "API key" in browser.find_element(By.ID, "error").text
        fill(browser, "api-key", API_KEY + "\n")  # Enter: the key is kept, and the page connects with it
        wait_for(browser, lambda d: d.find_element(By.ID, "temperature").get_attribute("value"), "the settings with the key")
        assert browser.execute_script("return localStorage.getItem('vqgen.apiKey')") == API_KEY
        fill(browser, "prompt", PROMPT + "\n")
        wait_for(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#current .tile[data-state=done]"), "an image with the key")
        browser.execute_script("localStorage.clear()")


STREAM = ('event: queued\r\ndata: {"images": 1}\r\n\r\n: a comment\n'
          'event: image\ndata: {"index": 0,\ndata:  "seed": 8742358232827391002}\n\n'
          'data: {"no": "name"}\r\r'
          'event: done\rdata: {}\r\r'
          'event: cut\ndata: {"unterminated": true}\n')
EVENTS = [["queued", '{"images": 1}'], ["image", '{"index": 0,\n "seed": 8742358232827391002}'],
          ["message", '{"no": "name"}'], ["done", "{}"]]


def test_the_sse_parser_takes_the_stream_cut_anywhere(browser, server):
    open_page(browser, server)
    results = browser.execute_script("""
        const [text] = arguments, runs = [];
        const parse = (chunks) => {
            const events = [], parser = sseParser((name, data) => events.push([name, data]));
            for (const chunk of chunks) parser.push(chunk);
            parser.end();
            return events;
        };
        for (let i = 0; i <= text.length; i++) runs.push(parse([text.slice(0, i), text.slice(i)]));
        runs.push(parse(Array.from(text)));  // one character at a time
        return {runs, seed: parseJSON('{"seed": 8742358232827391002, "n": 3}')};
    """, STREAM)
    assert len(results["runs"]) == len(STREAM) + 2
    for i, events in enumerate(results["runs"]):
        assert events == EVENTS, f"cut at {i}: {json.dumps(events)}"
    assert results["seed"] == {"seed": "8742358232827391002", "n": 3}
