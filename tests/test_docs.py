"""The guides' examples: the hypothesis in "How to add a hypothesis" gets a verdict when
copied into a hypotheses directory and run on the smoke profile. (Every python block of
README.md and docs/guide/ also runs as a test of its own: see conftest.py.)"""

import re
import sqlite3
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "guide" / "adding-hypotheses.md"


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", page.read_text(), flags=re.S | re.M)


def test_the_guide_hypothesis_gets_a_verdict_when_copied_into_hypotheses(tmp_path):
    example = python_blocks(GUIDE)[0]
    name = re.search(r"^def (test_\w+)\(", example, flags=re.M).group(1)
    hypotheses = tmp_path / "hypotheses"
    hypotheses.mkdir()
    (hypotheses / "test_from_the_guide.py").write_text(example)
    store = tmp_path / "store.sqlite"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            str(hypotheses),
            "-c",
            str(ROOT / "pyproject.toml"),  # the project's markers and options
            "--rootdir",
            str(tmp_path),
            "-p",
            "lab.report.plugin",
            "-p",
            "no:cacheprovider",
            "--lab-profile",
            "smoke",
            "--lab-store",
            str(store),
            "-q",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    with sqlite3.connect(store) as db:
        rows = db.execute("SELECT status, verdict FROM results WHERE nodeid LIKE ?", (f"%::{name}",)).fetchall()
    assert rows, f"no result recorded for {name}: {run.stdout[-2000:]}"
    status, verdict = rows[-1]
    assert status == "passed" and verdict in {"confirmed", "refuted", "inconclusive", "invalid"}, rows


def test_the_library_guides_side_by_side_table_names_what_exists():
    """Every test the "Written out, and the library that does the same" table cites exists,
    and every lab name in it imports: a renamed test or function fails here, not on the site."""
    import importlib

    page = (ROOT / "docs" / "guide" / "library.md").read_text()
    section = page.split("## Written out, and the library that does the same", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    assert len(rows) >= 9, rows
    cited = re.findall(r"`((?:tests|hypotheses)/[\w/]+\.py)::(\w+)`", section)
    assert len(cited) >= 12
    for path, name in cited:
        assert re.search(rf"^def {name}\(", (ROOT / path).read_text(), flags=re.M), f"{path}::{name} does not exist"
    for dotted in re.findall(r"`(lab(?:\.\w+)+)`", section):
        parts = dotted.split(".")
        for cut in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
                break
            except ModuleNotFoundError:
                continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)  # AttributeError names the missing piece
