"""The playground at GET /: one self-contained page (checked as text), and driven in a real browser
(headless Chromium through selenium and chromedriver, all from Debian: `apt-get install chromium
chromium-driver`) against a live server: type a prompt, generate, and see exactly the images the
API returns for the same seed. The browser test skips where no browser is installed."""

from __future__ import annotations

import re
import shutil
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from service.api import create_app
from tests.service.conftest import live_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
# Headless, and nothing that reaches out of the machine (updates, sync, QUIC, first-run pages).
BROWSER_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,900")


def test_the_page_is_self_contained_and_locked_to_the_service(make_settings):
    with TestClient(create_app(make_settings())) as client:
        r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "img-src data:" in csp
    page = r.text
    assert "<script>" in page and "<style>" in page
    assert not re.search(r"""(src|href)\s*=\s*["'](https?:)?//""", page), "loads something from outside"
    assert not re.search(r"""<(script|link)[^>]+(src|href)=""", page), "external script or stylesheet"
    assert "fetch(\"/generate\"" in page and "fetch(\"/models\"" in page  # the public API only


@pytest.fixture
def browser(tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (a dev dependency) is needed")
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("no chromium / chromedriver on PATH (apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM  # never let selenium look for (or download) a browser
    for flag in (*BROWSER_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver, script: str, timeout: float = 90.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = driver.execute_script(script)
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"never true: {script}\nstatus: {driver.execute_script('return status.textContent')}")


def test_the_playground_shows_the_images_the_api_returns(browser, make_settings):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    with live_server(make_settings(max_steps=50, min_preview_every=2)) as url:
        browser.get(url + "/")
        wait_for(browser, "return document.getElementById('model').options.length === 2")
        Select(browser.find_element(By.ID, "model")).select_by_value("tiny-digits")
        Select(browser.find_element(By.ID, "scheduler")).select_by_value("dpmpp_2m")
        for field, value in (("prompt", "nine"), ("steps", "6"), ("guidance", "1.5"), ("seed", "11")):
            browser.find_element(By.ID, field).send_keys(value)
        count = browser.find_element(By.ID, "count")
        count.clear()
        count.send_keys("3")
        browser.find_element(By.ID, "generate").click()
        wait_for(browser, "return document.body.dataset.state === 'done'")

        shown = [img.get_attribute("src") for img in browser.find_elements(By.CSS_SELECTOR, "#grid img.result")]
        captions = [c.text for c in browser.find_elements(By.CSS_SELECTOR, "#grid figcaption")]
        body = {"prompt": "nine", "model": "tiny-digits", "scheduler": "dpmpp_2m", "steps": 6, "guidance": 1.5,
                "seed": 11, "num_images": 3}
        api = httpx.post(url + "/generate", json=body, timeout=60).json()
        assert shown == ["data:image/png;base64," + b64 for b64 in api["images"]]
        assert captions == ["seed 11", "seed 12", "seed 13"]
        # the pixels as the browser decoded them: a 16x16 image, drawn at 128x128
        assert browser.execute_script("return [...document.querySelectorAll('#grid img.result')]"
                                      ".map(i => i.naturalWidth + 'x' + i.naturalHeight)") == ["16x16"] * 3
        assert int(browser.execute_script("return document.body.dataset.previews")) == 2  # at 2 and 4 of 6
        assert browser.execute_script("return document.querySelector('#bar div').style.width") == "100%"
        assert "generating" in browser.find_element(By.ID, "timings").text
        curl = browser.find_element(By.ID, "curl").text
        assert curl.startswith(f"curl -N -X POST {url}/generate") and '"seed":11' in curl and '"stream":true' in curl


def test_the_playground_edits_an_uploaded_image_with_a_painted_mask(browser, make_settings, tmp_path):
    """Upload a picture, paint over its left part, generate: the result is the API's for the same
    request (image, mask and seed as the page sent them), beside the input, and the unpainted pixels
    come back as they were."""
    import base64
    import io

    import numpy as np
    from PIL import Image
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from tests.service.test_edits import digit

    picture = tmp_path / "digit.png"
    digit().resize((48, 48), Image.Resampling.NEAREST).save(picture)  # another size: drawn at the model's
    with live_server(make_settings(max_steps=50, min_preview_every=2)) as url:
        browser.get(url + "/")
        wait_for(browser, "return document.getElementById('model').options.length === 2")
        Select(browser.find_element(By.ID, "model")).select_by_value("tiny-digits")
        Select(browser.find_element(By.ID, "scheduler")).select_by_value("ddpm")
        for field, value in (("prompt", "three"), ("steps", "6"), ("seed", "21")):
            browser.find_element(By.ID, field).send_keys(value)
        count = browser.find_element(By.ID, "count")
        count.clear()
        count.send_keys("1")
        browser.find_element(By.ID, "file").send_keys(str(picture))
        assert wait_for(browser, "return document.body.dataset.image") == "16x16"
        browser.execute_script("document.getElementById('brush').value = 6")
        canvas = browser.find_element(By.ID, "mask")  # 128×128 on screen: 8 screen pixels per model pixel
        ActionChains(browser).move_to_element_with_offset(canvas, -44, -60).click_and_hold() \
            .move_by_offset(0, 60).move_by_offset(0, 58).release().perform()
        browser.find_element(By.ID, "generate").click()
        wait_for(browser, "return document.body.dataset.state === 'done'")
        assert browser.find_element(By.ID, "input").is_displayed()

        sent = browser.execute_script("return window.lastRequest")
        assert sent["image"].startswith("data:image/png;base64,") and "mask" in sent and sent["seed"] == 21
        body = {k: v for k, v in sent.items() if k not in ("stream", "preview_at")}
        api = httpx.post(url + "/generate", json=body, timeout=60).json()
        shown = [img.get_attribute("src") for img in browser.find_elements(By.CSS_SELECTOR, "#grid img.result")]
        assert shown == ["data:image/png;base64," + b64 for b64 in api["images"]]

        def decode(data_url):
            return Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1])))
        image, out = (np.asarray(decode(u).convert("L")) for u in (sent["image"], shown[0]))
        painted = np.asarray(decode(sent["mask"]).convert("RGBA"))[..., 3] == 0  # transparent: repaint
        assert painted[:, :2].all() and not painted[:, 12:].any()  # the stroke covered the left columns only
        assert np.array_equal(out[~painted], image[~painted])
        assert not np.array_equal(out[painted], image[painted])
