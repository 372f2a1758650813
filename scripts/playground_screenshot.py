"""The playground's pictures in the docs: serve checkpoints/ on a loopback port, open GET / in headless
Chromium (Debian's chromium + chromium-driver, through selenium), generate (or, with ``--edit``,
upload that image, paint over its left half and inpaint it), save a screenshot (quantised to 64
colours: about 25 kB).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/playground_screenshot.py docs/playground.png
    OMP_NUM_THREADS=1 .venv/bin/python scripts/playground_screenshot.py docs/playground-edit.png --edit digit.png
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

from service.settings import Settings
from tests.service.conftest import live_server
from tests.service.test_playground import BROWSER_FLAGS, CHROMEDRIVER, CHROMIUM


def main(out: str, edit: str | None = None) -> None:
    settings = Settings(checkpoint_dir=Path("checkpoints"), device="cpu")
    with live_server(settings) as url, tempfile.TemporaryDirectory() as profile:
        options = Options()
        options.binary_location = CHROMIUM
        for flag in (*BROWSER_FLAGS, f"--user-data-dir={profile}"):
            options.add_argument(flag.replace("1280,900", "1100,800"))
        driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
        try:
            driver.get(url + "/")
            while not driver.execute_script("return document.getElementById('model').options.length"):
                time.sleep(0.1)
            Select(driver.find_element(By.ID, "scheduler")).select_by_value("dpmpp_2m")
            for field, value in (("prompt", "nine"), ("steps", "20"), ("seed", "0")):
                driver.find_element(By.ID, field).send_keys(value)
            driver.find_element(By.ID, "count").clear()
            driver.find_element(By.ID, "count").send_keys("4" if edit else "6")
            if edit:
                from selenium.webdriver.common.action_chains import ActionChains

                driver.find_element(By.ID, "file").send_keys(str(Path(edit).resolve()))
                while not driver.execute_script("return document.body.dataset.image"):
                    time.sleep(0.1)
                driver.execute_script("document.getElementById('brush').value = 12")
                ActionChains(driver).move_to_element_with_offset(driver.find_element(By.ID, "mask"), -40, -58) \
                    .click_and_hold().move_by_offset(0, 58).move_by_offset(0, 58).move_by_offset(16, 0) \
                    .move_by_offset(0, -58).move_by_offset(0, -58).release().perform()
            driver.find_element(By.ID, "generate").click()
            while driver.execute_script("return document.body.dataset.state") == "running":
                time.sleep(0.1)
            driver.execute_script("window.scrollTo(0, 0)")
            driver.save_screenshot(out)
        finally:
            driver.quit()
    Image.open(out).convert("RGB").quantize(64).save(out, optimize=True)  # a small PNG for the docs


if __name__ == "__main__":
    args = sys.argv[1:]
    image = args[args.index("--edit") + 1] if "--edit" in args else None
    paths = [a for a in args if a not in ("--edit", image)]
    main(paths[0] if paths else "docs/playground.png", image)
