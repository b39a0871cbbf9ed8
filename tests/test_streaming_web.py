"""The web page (GET /, src/serve/static/index.html) end to end in headless Chromium, driven by Selenium,
against the tiny MAX server: the page fills its voice list from /v1/voices, streams POST /v1/audio/speech as
PCM, plays it with WebAudio and reports the time to first audio; it receives exactly the samples an HTTP
client gets for the same request (greedy decoding), shows the server's 400 message for an empty text, and
its Stop button aborts the stream and frees the request's KV slot.

The page's results are read from `window.voxlm`. Chromium and its driver come from Debian (/usr/bin); the
module is skipped where either is missing."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import RunningServer

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
    pytest.skip(f"needs Debian's chromium and chromedriver ({CHROMIUM}, {CHROMEDRIVER}): apt-get install "
                "chromium chromium-driver", allow_module_level=True)

TEXT = "The little boat drifted across the lake."


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)  # with the driver's path: Selenium Manager never goes online
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--autoplay-policy=no-user-gesture-required"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


def page_state(driver: Any) -> dict[str, Any]:
    return driver.execute_script("return window.voxlm")


def open_page(driver: Any, server: RunningServer) -> None:
    """Load the page and wait until its voice list is filled from /v1/voices."""
    driver.get(f"{server.url}/")
    WebDriverWait(driver, 20).until(lambda d: d.execute_script("return (window.voxlm || {}).voices || []"))
    options = Select(driver.find_element(By.ID, "voice")).options
    assert len(options) == len(httpx.get(f"{server.url}/v1/voices").json()["data"]) > 0


def speak(driver: Any, text: str) -> None:
    box = driver.find_element(By.ID, "text")
    box.clear()
    box.send_keys(text)
    driver.find_element(By.ID, "speak").click()


def wait_until_finished(driver: Any, seconds: float = 60) -> dict[str, Any]:
    WebDriverWait(driver, seconds).until(lambda d: page_state(d)["state"] not in ("idle", "streaming"))
    return page_state(driver)


def test_page_streams_and_plays_speech(max_server: RunningServer, browser: Any) -> None:
    open_page(browser, max_server)
    voice = Select(browser.find_element(By.ID, "voice")).first_selected_option.get_attribute("value")
    speak(browser, TEXT)
    state = wait_until_finished(browser)

    assert state["state"] == "done" and state["error"] is None, state
    assert state["audioError"] is None, f"WebAudio did not play: {state['audioError']}"
    assert state["firstAudioMs"] > 0 and state["samples"] > 0 and state["chunks"] >= 1, state
    assert state["totalMs"] >= state["firstAudioMs"]
    ttfa = browser.find_element(By.ID, "ttfa").text
    assert float(ttfa) == math.floor(state["firstAudioMs"] + 0.5), ttfa  # JS Math.round: halves go up
    assert float(browser.find_element(By.ID, "rtf").text) > 0
    assert "Done" in browser.find_element(By.ID, "status").text

    # Greedy decoding: an HTTP client asking the same gets the same audio, every sample of it (the page's
    # int16 decoding loses none, odd reads included).
    pcm = httpx.post(f"{max_server.url}/v1/audio/speech", timeout=120,
                     json={"input": TEXT, "voice": voice, "response_format": "pcm", "speed": 1}).content
    assert state["samples"] == len(pcm) // 2


def test_page_shows_the_servers_error(max_server: RunningServer, browser: Any) -> None:
    open_page(browser, max_server)
    speak(browser, "   ")
    state = wait_until_finished(browser, 20)

    assert state["state"] == "error" and state["samples"] == 0, state
    status = browser.find_element(By.ID, "status")
    assert "400" in status.text and "'input' must be a non-empty string" in status.text, status.text
    assert "error" in status.get_attribute("class")
    assert "'input' must be a non-empty string" in state["error"]


def test_stop_aborts_the_stream_and_frees_its_slot(max_server: RunningServer, browser: Any) -> None:
    open_page(browser, max_server)
    speak(browser, " ".join([TEXT] * 8))
    browser.find_element(By.ID, "stop").click()
    state = wait_until_finished(browser, 20)

    assert state["state"] == "stopped" and state["error"] is None, state
    assert "Stopped" in browser.find_element(By.ID, "status").text
    engine = max_server.server.engine
    deadline = time.monotonic() + 20
    while engine.pool_used or engine.waiting:
        assert time.monotonic() < deadline, f"the KV pool still holds {engine.pool_used} streams"
        time.sleep(0.05)
