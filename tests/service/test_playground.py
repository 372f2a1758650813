"""The playground at GET /: one self-contained page (checked as text), and driven in a real browser
(headless Chromium through selenium and chromedriver, all from Debian: `apt-get install chromium
chromium-driver`) against a live server: type a prompt, generate, and see exactly the images the
API returns for the same seed; with a pixel model, and with a tiny Stable Diffusion folder (its own
scheduler, a negative prompt, a size of one's own, an edit at the image's own size). The browser
tests skip where no browser is installed."""

from __future__ import annotations

import base64
import io
import re
import shutil
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from service.api import create_app
from service.settings import Settings
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
    status = driver.execute_script("return document.getElementById('status').textContent")
    raise AssertionError(f"never true: {script}\nstatus: {status}")


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

        image, out = (np.asarray(decode(u).convert("L")) for u in (sent["image"], shown[0]))
        painted = np.asarray(decode(sent["mask"]).convert("RGBA"))[..., 3] == 0  # transparent: repaint
        assert painted[:, :2].all() and not painted[:, 12:].any()  # the stroke covered the left columns only
        assert np.array_equal(out[~painted], image[~painted])
        assert not np.array_equal(out[painted], image[painted])


def decode(data_url: str):
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1])))


@pytest.fixture
def latent_dir(checkpoint_dir, tmp_path_factory):
    """The tiny pixel checkpoints beside a tiny random SD 1.x pipeline folder (tests/sd_models.py); built
    after the browser fixture, so not where that one skips."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from tests.sd_models import SD_SPECS, save

    d = tmp_path_factory.mktemp("playground")
    for p in checkpoint_dir.glob("*.safetensors"):
        shutil.copy(p, d / p.name)
    save(SD_SPECS["sd1"], d / "sd-tiny")
    return d


def test_the_playground_generates_and_edits_with_a_latent_model(browser, latent_dir, tmp_path):
    """A Stable Diffusion model: the page takes its scheduler and size, offers a negative prompt, a
    size and decoded previews (none of which a pixel model shows), and shows the API's images at the
    size asked for; an uploaded picture is edited at its own size, rounded down to multiples of 8."""
    import numpy as np
    from PIL import Image
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    def shown(selector="#grid img.result"):
        return [img.get_attribute("src") for img in browser.find_elements(By.CSS_SELECTOR, selector)]

    def sizes():
        return browser.execute_script("return [...document.querySelectorAll('#grid img.result')]"
                                      ".map(i => i.naturalWidth + 'x' + i.naturalHeight)")

    def api(sent):
        body = {k: v for k, v in sent.items() if k not in ("stream", "preview_at", "preview_decode")}
        return httpx.post(url + "/generate", json=body, timeout=60).json()

    settings = Settings(checkpoint_dir=latent_dir, device="cpu", default_model="tiny-digits", max_steps=50,
                        max_size=128, min_preview_every=2)
    with live_server(settings) as url:
        browser.get(url + "/")
        wait_for(browser, "return document.getElementById('model').options.length === 3")
        model = Select(browser.find_element(By.ID, "model"))
        scheduler = Select(browser.find_element(By.ID, "scheduler"))
        rows = ("negativerow", "sizerow", "decoderow", "scalehint")
        assert scheduler.first_selected_option.get_attribute("value") == "ddim"  # the pixel model's own
        assert not any(browser.find_element(By.ID, row).is_displayed() for row in rows)
        model.select_by_value("sd-tiny")
        assert scheduler.first_selected_option.get_attribute("value") == "dpmpp_2m"  # the SD model's own
        assert all(browser.find_element(By.ID, row).is_displayed() for row in rows)
        assert not browser.find_element(By.ID, "classrow").is_displayed()  # no classes
        assert browser.find_element(By.ID, "steps").get_attribute("placeholder") == "25"
        assert browser.find_element(By.ID, "guidance").get_attribute("placeholder") == "6.5"
        assert "guidance_scale 7.5" in browser.find_element(By.ID, "scalehint").text
        width, height = browser.find_element(By.ID, "width"), browser.find_element(By.ID, "height")
        assert (width.get_attribute("value"), height.get_attribute("value"), width.get_attribute("max")) == \
            ("64", "64", "128")  # the native size; the service's max_size
        for field, value in (("prompt", "a lighthouse at dusk"), ("negative", "blurry"), ("steps", "4"),
                             ("seed", "5")):
            browser.find_element(By.ID, field).send_keys(value)
        for field, value in ((width, "96"), (height, "64"), (browser.find_element(By.ID, "count"), "2")):
            field.clear()
            field.send_keys(value)
        browser.find_element(By.ID, "decode").click()
        browser.find_element(By.ID, "generate").click()
        wait_for(browser, "return document.body.dataset.state === 'done'")

        sent = browser.execute_script("return window.lastRequest")
        assert {k: sent[k] for k in ("model", "scheduler", "negative_prompt", "width", "height", "preview_decode")} \
            == {"model": "sd-tiny", "scheduler": "dpmpp_2m", "negative_prompt": "blurry", "width": 96, "height": 64,
                "preview_decode": True}
        assert shown() == ["data:image/png;base64," + b64 for b64 in api(sent)["images"]]
        assert sizes() == ["96x64"] * 2
        assert int(browser.execute_script("return document.body.dataset.previews")) >= 1
        assert "96x64" in browser.find_element(By.ID, "timings").text

        picture = tmp_path / "photo.png"  # 100x60: edited at 96x56
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 100, 3), dtype=np.uint8)).save(picture)
        browser.find_element(By.ID, "file").send_keys(str(picture))
        assert wait_for(browser, "return document.body.dataset.image") == "96x56"
        assert (width.get_attribute("value"), height.get_attribute("value")) == ("96", "56")
        browser.find_element(By.ID, "strength").send_keys("0.5")
        browser.find_element(By.ID, "generate").click()
        wait_for(browser, "return document.body.dataset.state === 'done' && window.lastRequest.image")

        sent = browser.execute_script("return window.lastRequest")
        assert decode(sent["image"]).size == (96, 56) and (sent["width"], sent["height"], sent["strength"]) == \
            (96, 56, 0.5)
        assert shown() == ["data:image/png;base64," + b64 for b64 in api(sent)["images"]]
        assert sizes() == ["96x56"] * 2
