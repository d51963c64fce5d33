"""The LLM Lab pytest plugin (profiles, the `lab` and `outcome` fixtures, verdicts, the
results store and the terminal summary; code in lab/report/), and docs that run.

Docs that run: the ```python blocks of README.md and docs/guide/*.md are tests (testpaths
in pyproject.toml). Each page is one test that runs its blocks in order in one namespace
(parsed and evaluated by Sybil), so a block may use what an earlier block on the same page
defined, and pytest-xdist never splits a page between workers. The blocks run in a
temporary directory with LAB_PROFILE set to the run's profile (`--lab-profile smoke` in
CI), so whatever they train has that profile's sizes. `<!-- skip: next -->` before a
block skips it.
"""

import tempfile
from pathlib import Path

import pytest

pytest_plugins = ["lab.report.plugin", "pytester"]

ROOT = Path(__file__).resolve().parent
DOC_PAGES = {ROOT / "README.md", *(ROOT / "docs" / "guide").glob("*.md")}


def pytest_collect_file(file_path: Path, parent):
    if file_path.suffix == ".md" and file_path.resolve() in DOC_PAGES:
        return DocPage.from_parent(parent, path=file_path)
    return None


class DocPage(pytest.File):
    def collect(self):
        yield DocPageBlocks.from_parent(self, name="python blocks")


class DocPageBlocks(pytest.Item):
    def runtest(self):
        from sybil import Sybil
        from sybil.parsers.markdown import PythonCodeBlockParser, SkipParser

        from lab.profiles import default_profile_name

        document = Sybil([PythonCodeBlockParser(), SkipParser()]).parse(self.path)
        profile = self.config.getoption("--lab-profile", default=None) or default_profile_name()
        with pytest.MonkeyPatch.context() as mp, tempfile.TemporaryDirectory(prefix="doc-page-") as cwd:
            mp.setenv("LAB_PROFILE", profile)
            mp.chdir(cwd)
            for example in document.examples():
                example.evaluate()

    def repr_failure(self, excinfo):
        return super().repr_failure(excinfo, style="short")

    def reportinfo(self):
        return self.path, None, f"{self.path.name}: python blocks"
