"""The listening page in a real browser: Debian's headless Chromium driven by Selenium (pointed at the system
chromedriver, so nothing is downloaded) clicks and presses keys with the audio elements loaded; the label store is
checked afterwards. Skipped, saying why, only where Chromium or its driver is not installed (scripts/setup.sh
installs both)."""

from __future__ import annotations

import os
import shutil
import sqlite3

import pytest

from label_fixtures import label_server, make_pairs_dir

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
selenium = pytest.importorskip("selenium", reason="selenium is in requirements-dev.txt: pip install -r requirements-dev.txt")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; scripts/setup.sh "
           "does it as root)",
)


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never fetch a browser or a driver
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--autoplay-policy=no-user-gesture-required"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    yield driver
    driver.quit()


def wait_for(driver, script: str, timeout: float = 30):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: d.execute_script(script))


AUDIO_LOADED = ("const a = [document.getElementById('first'), document.getElementById('second')];"
                "return a.every(x => x.readyState >= 1 && x.duration > 0) && a.map(x => x.duration);")


def test_a_rater_labels_pairs_in_chromium_with_clicks_and_keys(tmp_path, browser):
    from selenium.webdriver.common.by import By

    pairs = make_pairs_dir(tmp_path / "pairs", n=5)
    db = tmp_path / "labels.sqlite"
    with label_server(pairs, db, "--rater", "alice") as (url, tokens, _):
        browser.get(f"{url}/#token={tokens['alice']}")
        assert "#token" not in browser.current_url  # the page drops the token from the address bar
        actions = [("click", "choose-first"), ("key", "b"), ("key", "t"), ("click", "choose-both_bad"), ("key", "1")]
        for i, (kind, what) in enumerate(actions):
            wait_for(browser, f"return document.getElementById('progress').textContent.includes('{i} of 5')")
            durations = wait_for(browser, AUDIO_LOADED)  # both samples decoded by the browser
            assert all(d > 0.3 for d in durations)
            if kind == "click":
                browser.find_element(By.ID, what).click()
            else:
                browser.find_element(By.TAG_NAME, "body").send_keys(what)
        wait_for(browser, "return !document.getElementById('done').hidden")
        assert "5 of 5" in browser.find_element(By.ID, "progress").text
        rows = sqlite3.connect(db).execute(
            "SELECT pair_id, pressed, choice, shown FROM judgements WHERE rater = 'alice' ORDER BY created").fetchall()
    assert [r[0] for r in rows] == [f"{i:05d}-0" for i in range(5)]
    assert [r[1] for r in rows] == ["first", "second", "tie", "both_bad", "first"]
    for _, pressed, choice, shown in rows:  # the stored choice is the sample in the place the rater chose
        assert choice == {"first": shown[0], "second": shown[1]}.get(pressed, pressed)
