"""The listening page, in a real headless Chromium (Debian's chromium and chromium-driver,
driven by selenium; nothing is downloaded): it loads, speaks through its AudioWorklet, shows
what happened, and says so when the token is wrong."""

import json
import math
import os
import shutil
import tempfile
import time

import pytest

from conftest import TOKEN, LiveServer

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and DRIVER):
        if os.environ.get("CI"):
            pytest.fail(
                "chromium and chromium-driver are missing: bash setup.sh --dev installs them"
            )
        pytest.skip("chromium / chromium-driver not installed (bash setup.sh --dev, as root)")
    os.environ["SE_OFFLINE"] = "true"  # selenium must not look for drivers online
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--autoplay-policy=no-user-gesture-required", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                f"--user-data-dir={tempfile.mkdtemp()}", "--window-size=900,700"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=Service(DRIVER))
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def live():
    s = LiveServer(max_streams=2)
    yield s
    s.close()


def wait_for(driver, done, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = driver.execute_script("return window.csmStats")
        if done(stats):
            return stats
        time.sleep(0.2)
    pytest.fail(f"the page did not get there: {json.dumps(stats)}")


def test_the_page_speaks_through_its_audio_worklet(browser, live, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(f"{live.url}/")
    assert browser.title == "CSM-1B streaming"
    assert "speaker 0" in browser.find_element(By.ID, "voice").text  # filled from /health
    assert not browser.find_element(By.ID, "chat-label").is_displayed()  # the server has no LLM
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.ID, "max-ms").send_keys("1200")
    browser.find_element(By.ID, "play").click()
    stats = wait_for(browser, lambda s: s.get("drained") or s.get("error"))
    assert stats["error"] is None
    assert stats["received"] == 15 * 1920  # 1.2 s of audio came over the socket
    assert stats["played"] == stats["received"]  # and the worklet played every sample, once
    assert stats["firstAudioMs"] > 0 and stats["rtf"] > 0
    readout = {k: browser.find_element(By.ID, k).text for k in ("first-audio", "rtf", "received",
                                                                  "underruns", "status")}
    # toFixed(0) rounds a half up (446.5 -> 447), Python's format to even (-> 446)
    assert readout["first-audio"] == f"{math.floor(stats['firstAudioMs'] + 0.5)} ms"
    assert readout["received"] == "1.20 s" and readout["status"] == "done"
    assert readout["underruns"] == str(stats["underruns"])
    shot = tmp_path / "page.png"
    assert browser.save_screenshot(str(shot)) and shot.read_bytes()[:4] == b"\x89PNG"
    print(f"screenshot: {shot}")
    assert browser.get_log("browser") == []  # no script errors, no failed loads


def test_a_wrong_token_is_shown_not_swallowed(browser, live):
    from selenium.webdriver.common.by import By

    browser.get(f"{live.url}/")
    browser.execute_script("localStorage.clear()")
    browser.find_element(By.ID, "token").clear()
    browser.find_element(By.ID, "token").send_keys("wrong")
    browser.find_element(By.ID, "play").click()
    stats = wait_for(browser, lambda s: s.get("error"), timeout=30)
    assert stats["error"].startswith("401") and stats["received"] == 0
    # said in words a user acts on, not as a status code
    assert "enter it in the Token field" in browser.find_element(By.ID, "status").text


def test_the_page_chats_on_one_socket(browser):
    """With an LLM on the server, the page offers a chat: the reply's text appears as it is
    written, its audio plays, and the next message goes on the same socket (same dialogue)."""
    from selenium.webdriver.common.by import By

    from llm_stubs import LLMStub

    stub = LLMStub("openai", ["Nice", " to meet", " you,", " really."], delay=0.05)
    live = LiveServer(max_streams=1, chat=stub.config())
    try:
        browser.get(f"{live.url}/")
        assert browser.find_element(By.ID, "chat-label").is_displayed()
        browser.find_element(By.ID, "token").clear()
        browser.find_element(By.ID, "token").send_keys(TOKEN)
        browser.find_element(By.ID, "max-ms").send_keys("800")
        browser.find_element(By.ID, "chat").click()
        for turn in range(2):
            browser.find_element(By.ID, "text").clear()
            browser.find_element(By.ID, "text").send_keys(f"Message {turn}?")
            browser.find_element(By.ID, "play").click()
            stats = wait_for(browser, lambda s: s.get("drained") or s.get("error"))
            assert stats["error"] is None and stats["played"] == stats["received"] == 10 * 1920
            assert browser.find_element(By.ID, "reply-text").text == "Nice to meet you, really."
        sent = [m["content"] for m in stub.requests[-1]["body"]["messages"] if m["role"] == "user"]
    finally:
        live.close()
        stub.close()
    assert sent == ["Message 0?", "Message 1?"]  # the second turn knew the first


def test_the_page_lists_voices_takes_sampling_shows_a_level_and_offers_what_it_played(browser,
                                                                                      live):
    import base64
    import io

    import soundfile as sf
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.get(f"{live.url}/")
    token = browser.find_element(By.ID, "token")
    token.clear()
    token.send_keys(TOKEN)
    browser.execute_script("arguments[0].dispatchEvent(new Event('change'))", token)
    voice = Select(browser.find_element(By.ID, "voice"))
    deadline = time.monotonic() + 60  # a bound on waiting for the list, not a measurement
    while "nova" not in [o.get_attribute("value") for o in voice.options]:
        assert time.monotonic() < deadline, "the OpenAI names never came from /v1/voices"
        time.sleep(0.2)
    voice.select_by_value("nova")
    for field, value in (("temperature", "0.5"), ("top-k", "7"), ("seed", "42"),
                         ("max-ms", "800")):
        browser.find_element(By.ID, field).clear()
        browser.find_element(By.ID, field).send_keys(value)
    browser.find_element(By.ID, "play").click()
    stats = wait_for(browser, lambda s: s.get("drained") or s.get("error"))
    assert stats["error"] is None and stats["received"] == 10 * 1920
    assert stats["request"] == {"type": "speech", "text": stats["request"]["text"],
                                "max_audio_length_ms": 800, "temperature": 0.5, "top_k": 7,
                                "seed": 42, "voice": "nova"}
    assert stats["peakLevel"] > 0.001  # the meter saw the audio play
    link = browser.find_element(By.ID, "download")
    assert link.is_displayed() and link.get_attribute("download") == "csm-speech.wav"
    data = browser.execute_async_script(
        "const done = arguments[arguments.length - 1]; fetch(arguments[0])"
        ".then((r) => r.arrayBuffer())"
        ".then((b) => { let s = ''; new Uint8Array(b).forEach((x) => s += String.fromCharCode(x));"
        " done(btoa(s)); });", link.get_attribute("href"))
    audio, rate = sf.read(io.BytesIO(base64.b64decode(data)), dtype="float32")  # independent
    assert rate == 24_000 and audio.shape == (10 * 1920,) and abs(audio).max() > 0.001
