"""``distrifusion demo``: the settings check, the proxy against the real tritonserver, and the page in a
real headless Chromium (Debian's chromium and chromium-driver, driven by selenium): submit, see the
progress bar advance and the final image drawn, Stop a long generation and see the server free."""

from __future__ import annotations

import json
import shutil
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from conftest import FAULTS_LONG, TINY_SIZE, rank_workers
from python_backend.client import generate
from python_backend.demo.app import start_demo, stop_demo
from python_backend.demo.jobs import Settings, SettingsError

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.mark.parametrize("body, message", [
    ([], "must be a JSON object"),
    ({}, "field 'prompt' must be a non-empty string"),
    ({"prompt": "  "}, "field 'prompt' must be a non-empty string"),
    ({"prompt": "x" * 2001}, "field 'prompt' has 2001 characters; allowed: at most 2000"),
    ({"prompt": "a", "steps": "many"}, "field 'steps' must be a whole number"),
    ({"prompt": "a", "seed": 1.5}, "field 'seed' must be a whole number"),
    ({"prompt": "a", "height": True}, "field 'height' must be a whole number"),
    ({"prompt": "a", "guidance_scale": "high"}, "field 'guidance_scale' must be a number"),
    ({"prompt": "a", "scheduler": "plms"}, "field 'scheduler' is 'plms'; allowed: ddim, euler, euler-a, dpmpp-2m"),
    ({"prompt": "a", "preview_every": -2}, "field 'preview_every' is -2; allowed: 0 (none) or more"),
    ({"prompt": "a", "sampler": "euler"}, "unknown field(s) ['sampler']"),
])
def test_settings_name_the_bad_field(body, message):
    with pytest.raises(SettingsError) as raised:
        Settings.from_json(body)
    assert message in str(raised.value)


def test_settings_pass_what_the_page_sends_and_leave_blanks_to_the_server():
    settings = Settings.from_json({"prompt": "a red circle", "negative_prompt": "", "steps": 6, "seed": 3.0,
                                   "guidance_scale": 4, "scheduler": "ddim", "preview_every": 2, "width": ""})
    assert settings.as_request() == dict(prompt="a red circle", preview_every=2, negative_prompt=None, height=None,
                                         width=None, steps=6, guidance_scale=4.0, seed=3, scheduler="ddim")


def _call(url, method="GET", body=None):
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, answer.headers, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


@pytest.fixture
def demo(faults_server):
    server, _ = start_demo(faults_server.urls["grpc"], "127.0.0.1", 0)
    yield server
    stop_demo(server)


def _wait_for(demo, job_id, states=("done", "stopped", "failed"), timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, _, body = _call(f"{demo.url}api/jobs/{job_id}")
        assert status == 200, body
        reply = json.loads(body)
        if reply["state"] in states:
            return reply
        time.sleep(0.1)
    raise AssertionError(f"generation {job_id} still {reply['state']} after {timeout} s")


@pytest.mark.slow
def test_the_proxy_streams_a_generation_and_relays_the_servers_refusals(demo, faults_server):
    assert demo.server_address[0] == "127.0.0.1"
    status, headers, page = _call(demo.url)
    assert status == 200 and b'id="generate"' in page and headers["Content-Type"].startswith("text/html")
    options = dict(prompt="a red circle at the top left", seed=4, steps=4, guidance_scale=4.0)
    status, _, body = _call(f"{demo.url}api/generate", "POST", {**options, "preview_every": 2})
    assert status == 200, body
    job_id = json.loads(body)["id"]
    reply = _wait_for(demo, job_id)
    assert reply["state"] == "done" and reply["step"] == reply["steps"] == 4 and reply["previews"] == 1, reply
    status, headers, png = _call(f"{demo.url}api/jobs/{job_id}/image.png?download=1")
    assert status == 200 and headers["Content-Type"] == "image/png" and "attachment" in headers["Content-Disposition"]
    from io import BytesIO

    from PIL import Image

    image = np.asarray(Image.open(BytesIO(png)))
    np.testing.assert_array_equal(image, generate(faults_server.urls["http"], **options))  # the ensemble's image
    status, _, preview = _call(f"{demo.url}api/jobs/{job_id}/preview.png")
    assert status == 200 and Image.open(BytesIO(preview)).size == (TINY_SIZE // 8, TINY_SIZE // 8)

    # the served models' own range checks reach the page word for word
    status, _, body = _call(f"{demo.url}api/generate", "POST", {"prompt": "a star", "steps": 0})
    refused = _wait_for(demo, json.loads(body)["id"])
    assert refused["state"] == "failed" and "input 'steps' is 0; allowed: 1 to" in refused["error"], refused
    # the proxy's own checks answer at once
    for bad, code, words in ((b"{not json", 400, "not JSON"), ({"prompt": "a", "steps": "x"}, 400, "'steps'"),
                             (b"x" * 20000, 413, "over 16384 bytes")):
        status, _, body = _call(f"{demo.url}api/generate", "POST", bad)
        assert status == code and words in json.loads(body)["error"], body
    assert _call(f"{demo.url}api/jobs/0123456789abcdef")[0] == 404
    assert _call(f"{demo.url}etc/passwd")[0] == 404


def _browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("no Chromium and chromedriver here: scripts/test.sh installs Debian's chromium and "
                    "chromium-driver where it runs as root; elsewhere install them to run this test")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1200,800"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


@pytest.mark.slow
def test_the_page_in_a_real_browser_draws_progress_and_the_image_and_stops_a_long_one(demo, faults_server,
                                                                                    tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = _browser()
    try:
        browser.get(demo.url)
        field = lambda name: browser.find_element(By.ID, name)  # noqa: E731
        progress = lambda: int(float(field("progress").get_attribute("value") or 0))  # noqa: E731
        wait = WebDriverWait(browser, 120, poll_frequency=0.05)

        # a whole generation: the bar moves step by step, previews appear, then the image with its settings
        for name, value in (("steps", "8"), ("seed", "2"), ("preview_every", "2")):
            field(name).clear()
            field(name).send_keys(value)
        field("generate").click()
        seen = set()
        wait.until(lambda _: seen.add(progress()) or field("result").is_displayed())
        assert len(seen - {0}) >= 2, f"the bar showed {sorted(seen)}: it did not advance step by step"
        assert field("preview").is_displayed()
        # the element shows before its PNG has arrived: wait for the browser to have decoded it
        loaded = "const image = document.getElementById('result'); return image.complete && image.naturalWidth"
        wait.until(lambda _: browser.execute_script(loaded))
        assert browser.execute_script(loaded) == TINY_SIZE
        assert "steps: 8" in field("settings").text and "seed: 2" in field("settings").text
        assert field("download").get_attribute("href").endswith("/image.png?download=1")
        assert "Done: 8 steps" in field("status").text
        browser.save_screenshot(str(tmp_path / "demo.png"))

        # a long one, stopped: the page says so and the server is free for the next request at once
        workers = rank_workers(faults_server)
        field("steps").clear()
        field("steps").send_keys(str(FAULTS_LONG))
        field("generate").click()
        wait.until(lambda _: progress() >= 2)
        field("stop").click()
        wait.until(lambda _: "Stopped after step" in field("status").text)
        assert field("generate").is_enabled() and not field("stop").is_enabled()
        started = time.monotonic()
        generate(faults_server.urls["http"], "a quiet harbour", seed=5, steps=3)
        freed_in = time.monotonic() - started
        print(f"\nthe request after Stop took {freed_in:.2f} s")
        assert freed_in < 30, freed_in  # a 3-step request, not the rest of a 10,000-step one
        assert rank_workers(faults_server) == workers  # stopping is not a failure: no restart
    finally:
        browser.quit()
