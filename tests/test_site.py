"""The results site: pages generated from the store build with `mkdocs build --strict`,
and the built site renders in headless Chromium."""

import functools
import http.server
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

HYPOTHESIS = '''
import pytest
from lab.report import prediction, at_least

@pytest.mark.pretraining
@prediction("x grows", metric="x", expect=at_least(1.0))
@pytest.mark.parametrize("k", [1, 2])
def test_x(outcome, k):
    """X grows with k.

    Record three seeds and a curve."""
    for s in range(3):
        outcome.record("x", k + 0.5 + 0.01 * s, seed=s)
    outcome.plot_lines("curve", {"x": ([0, 1, 2], [1, 2, 3])}, xlabel="step", ylabel="x")
    outcome.table("numbers", [{"k": k, "x": k + 0.5}])
    outcome.note("a note with <html> & | pipes")

@pytest.mark.track_a
@prediction("fails", metric="x", expect=at_least(1.0))
def test_broken(outcome):
    raise RuntimeError("broken on purpose")
'''


def _mkdocs_build(docs_root: Path, site_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(docs_root / "mkdocs.yml"), "-d", str(site_dir)],
        capture_output=True,
        text=True,
        env=dict(os.environ, NO_MKDOCS_2_WARNING="1"),
    )


def _copy_site_sources(dest: Path) -> None:
    shutil.copy(ROOT / "mkdocs.yml", dest / "mkdocs.yml")
    (dest / "docs").mkdir(exist_ok=True)
    for sub in ("guide", "javascripts", "stylesheets", "assets"):
        shutil.copytree(ROOT / "docs" / sub, dest / "docs" / sub)


def test_generated_pages_build_strict(pytester, tmp_path):
    from lab.report.site import write_pages

    pytester.makeconftest('pytest_plugins = ["lab.report.plugin"]')
    pytester.makeini("[pytest]\nmarkers =\n    pretraining: p\n    track_a: a\n")
    pytester.makepyfile(test_h=HYPOTHESIS)
    store = pytester.path / "s.sqlite"
    pytester.runpytest_subprocess("--lab-profile", "smoke", "--lab-store", str(store)).assert_outcomes(
        passed=2, failed=1
    )
    _copy_site_sources(tmp_path)
    assert write_pages(store, tmp_path / "docs") == 2
    home = (tmp_path / "docs" / "index.md").read_text()
    assert 'data-track="pretraining"' in home and 'data-track="track_a"' in home
    assert "hypotheses/test_h/test_x.html" in home
    page = (tmp_path / "docs/hypotheses/test_h/test_x.md").read_text()
    assert "Record three seeds and a curve." in page  # the docstring is the method
    assert "95% Student-t" in page and "confirmed" in page
    assert "a note with &lt;html&gt; &amp; | pipes" in page
    assert len(list((tmp_path / "docs/hypotheses/test_h/test_x").glob("*.png"))) == 2
    broken = (tmp_path / "docs/hypotheses/test_h/test_broken.md").read_text()
    assert "broken on purpose" in broken
    res = _mkdocs_build(tmp_path, tmp_path / "site")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "site/hypotheses/test_h/test_x.html").exists()
    # regenerating replaces, never accumulates, generated pages
    write_pages(store, tmp_path / "docs")
    assert len(list((tmp_path / "docs/hypotheses/test_h/test_x").glob("*.png"))) == 2
    assert not list((tmp_path / "docs").glob(".lab-*"))


@pytest.fixture(scope="module")
def served_site(tmp_path_factory):
    """The committed reference site, built and served on localhost."""
    site = tmp_path_factory.mktemp("site")
    res = _mkdocs_build(ROOT, site)
    assert res.returncode == 0, res.stderr
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_reference_site_renders_in_chromium(served_site, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.get(served_site + "/index.html")
    rows = browser.find_elements(By.CSS_SELECTOR, "#lab-hypotheses tbody tr")
    assert rows, "the home table of hypotheses is empty"
    verdicts = browser.find_elements(By.CSS_SELECTOR, "#lab-hypotheses .lab-verdict")
    assert verdicts and all(v.is_displayed() for v in verdicts[:3])
    # the track filter hides rows of other tracks
    select = Select(browser.find_element(By.ID, "lab-track-filter"))
    tracks = [o.get_attribute("value") for o in select.options if o.get_attribute("value")]
    assert "pretraining" in tracks
    select.select_by_value("pretraining")
    for row in rows:
        assert row.is_displayed() == (row.get_attribute("data-track") == "pretraining")
    # a hypothesis page with its plot
    link = browser.find_element(By.CSS_SELECTOR, "#lab-hypotheses tbody tr a[href*='test_baby_gpt']")
    link.click()
    assert "Method" in browser.page_source
    images = [
        i for i in browser.find_elements(By.CSS_SELECTOR, "article img") if i.get_attribute("src").endswith(".png")
    ]
    assert images, "hypothesis page has no plot"
    loaded = browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 100", images[0])
    assert loaded, f"plot {images[0].get_attribute('src')} did not render"
