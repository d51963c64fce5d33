"""The retrospective (lab.report.retrospective): written from the store with the rest of the
site; from the committed store it builds under `mkdocs build --strict` and lists exactly the
store's refuted and inconclusive predictions."""

import html
import json
import shutil
import sqlite3
from pathlib import Path

import pytest
from test_site import _copy_site_sources, _mkdocs_build  # pytest puts tests/ on sys.path

from lab.report.site import retired_tests, write_pages

ROOT = Path(__file__).resolve().parents[1]
STORE = ROOT / "results" / "lab.sqlite"
RETIRED = retired_tests(ROOT / "hypotheses" / "registry.toml")  # they have no page and no place here


def _latest_predictions(store: Path, verdict: str) -> list[tuple[str, str]]:
    """(test id, prediction text) of every latest result's prediction with this verdict, read
    straight from the store (not through the site code), but for tests the registry retired."""
    con = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
    try:
        rows = con.execute(
            "SELECT r.nodeid, v.text FROM verdicts v JOIN results r ON v.result_id = r.result_id "
            "WHERE r.result_id IN (SELECT MAX(result_id) FROM results GROUP BY nodeid, profile) "
            "AND r.profile != 'smoke' AND v.verdict = ?",
            (verdict,),
        ).fetchall()
        return [(nodeid, text) for nodeid, text in rows if nodeid not in RETIRED]
    finally:
        con.close()


def _section(page: str, heading: str) -> str:
    start = page.index(f"## {heading}\n")
    end = page.find("\n## ", start + 1)
    return page[start : end if end != -1 else None]


@pytest.fixture(scope="module")
def committed_site(tmp_path_factory):
    """The site of a copy of the committed store, built strict in a temporary folder."""
    if not STORE.exists():
        pytest.skip("no committed store (results/lab.sqlite)")
    tmp = tmp_path_factory.mktemp("retro")
    store = tmp / "lab.sqlite"
    shutil.copy(STORE, store)  # the committed store is never opened for writing
    _copy_site_sources(tmp)
    write_pages(store, tmp / "docs", registry_path=ROOT / "hypotheses" / "registry.toml")
    res = _mkdocs_build(tmp, tmp / "site")
    assert res.returncode == 0, res.stderr[-3000:]
    return tmp, store


def test_the_committed_stores_retrospective_builds_strict(committed_site):
    tmp, store = committed_site
    retro = tmp / "docs" / "retrospective"
    con = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
    markers = {m for (ms,) in con.execute("SELECT DISTINCT markers FROM results") for m in json.loads(ms or "[]")}
    con.close()
    tracks = {"track_a", "track_b", "track_c", "track_d", "pretraining", "curriculum"} & markers
    assert tracks and {p.stem for p in retro.glob("*.md")} >= tracks | {"index"}
    for name in ("index", *sorted(tracks)):
        assert (tmp / "site" / "retrospective" / f"{name}.html").exists(), name
        page = (retro / f"{name}.md").read_text()
        for heading in ("Success criteria", "Surprises", "Open questions", "Hardware observations"):
            assert f"\n## {heading}\n" in page, (name, heading)
    assert "\n## Predictions vs results\n" in (retro / "track_b.md").read_text()
    assert "retrospective/index.md" in (tmp / "docs" / "index.md").read_text()


def test_surprises_and_open_questions_are_the_stores_refuted_and_inconclusive(committed_site):
    tmp, store = committed_site
    page = (tmp / "docs" / "retrospective" / "index.md").read_text()
    surprises, open_questions = _section(page, "Surprises"), _section(page, "Open questions")
    refuted, inconclusive = _latest_predictions(store, "refuted"), _latest_predictions(store, "inconclusive")
    assert refuted and inconclusive
    assert f"{len(refuted)} predictions were refuted" in surprises
    assert f"**Inconclusive ({len(inconclusive)}):**" in open_questions
    for _, text in refuted:
        assert html.escape(text).replace("|", "\\|") in surprises
    for _, text in inconclusive:
        assert html.escape(text).replace("|", "\\|") in open_questions
    # every row of the predictions table carries the verdict its section is about
    rows = [line for line in surprises.splitlines() if line.startswith("| [")]
    assert len(rows) == len(refuted) and all(line.endswith("| refuted |") for line in rows)


HYPOTHESES = """
import pytest
from lab.report import prediction, at_least, at_most

@pytest.mark.track_b
@prediction("x is large", metric="x", expect=at_least(10.0))
def test_refuted(outcome):
    for s in range(3):
        outcome.record("x", 1.0 + 0.01 * s, seed=s)

@pytest.mark.track_b
@prediction("y is near one", metric="y", expect=at_most(1.0))
def test_inconclusive(outcome):
    for s, y in enumerate([0.5, 1.5, 0.9]):
        outcome.record("y", y, seed=s)

@pytest.mark.track_b
@prediction("z holds", metric="z", expect=at_least(0.0))
def test_crashes(outcome):
    raise RuntimeError("z exploded")
"""


def test_a_smoke_store_says_it_is_not_evidence_and_lists_every_outcome(pytester, tmp_path):
    pytester.makeconftest('pytest_plugins = ["lab.report.plugin"]')
    pytester.makeini("[pytest]\nmarkers =\n    track_b: b\n")
    pytester.makepyfile(test_h=HYPOTHESES)
    store = pytester.path / "s.sqlite"
    pytester.runpytest_subprocess("--lab-profile", "smoke", "--lab-store", str(store)).assert_outcomes(
        passed=2, failed=1
    )
    _copy_site_sources(tmp_path)
    write_pages(store, tmp_path / "docs", registry_path=tmp_path / "none.toml")
    track = (tmp_path / "docs" / "retrospective" / "track_b.md").read_text()
    assert "Smoke results only" in track
    assert "x is large" in _section(track, "Surprises")
    open_questions = _section(track, "Open questions")
    assert "y is near one" in open_questions and "z exploded" in open_questions
    criteria = _section(track, "Success criteria")
    for name, outcome in (
        ("test_refuted", "refuted"),
        ("test_inconclusive", "inconclusive"),
        ("test_crashes", "failed"),
    ):
        assert any(name in line and line.endswith(f"| {outcome} |") for line in criteria.splitlines()), name
    assert "Track B: attention | smoke | 3 |" in _section(track, "Hardware observations")
    res = _mkdocs_build(tmp_path, tmp_path / "site")
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "site" / "retrospective" / "track_b.html").exists()
