import os
import shutil

import pytest
from hypothesis import settings

# pytester is enabled in the root conftest.py: pytest_plugins is only allowed there

# Property tests check behaviour, not speed: hypothesis' default 200 ms per-example
# deadline is a timed assert, and on shared 2-core CI machines it fails at random.
settings.register_profile("lab", deadline=None)
settings.load_profile("lab")


def _chromium():
    """Headless Chromium and its driver, as install.sh --test installs them, or None."""
    for browser in ("chromium", "chromium-browser"):
        path = shutil.which(browser)
        if path and shutil.which("chromedriver"):
            return path
    return None


@pytest.fixture(scope="module")
def browser():
    path = _chromium()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install chromium and chromium-driver (see install.sh --test)")
        pytest.skip("headless Chromium not installed (bash install.sh --test installs it as root)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = path
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1280,1600",
    ):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    yield driver
    driver.quit()
