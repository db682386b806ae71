"""The chapters' MyST Markdown sources: each starts with the Colab-only install of bnnotes from the repository set in
`_config.yml` (in the book it installs nothing), and ends with exercises in sphinx-exercise's gated directives.

The Colab edition generated from them (book/<chapter>.ipynb) is tested in tests/test_colab.py; the book build executes
the .md files themselves, solutions and asserts included.
"""

from __future__ import annotations

import re
import subprocess
import sys
import types
from pathlib import Path
from unittest import mock

import jupytext
import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())
REPOSITORY_URL = CONFIG["repository"]["url"]


sys.path.insert(0, str(ROOT / "book" / "_ext"))
import colab  # noqa: E402  (book/_ext is not a package; its _toc.yml walker is the one the generator and .ci use)

#: The chapter sources: the Markdown notebooks (front matter with a kernelspec) of the table of contents.
CHAPTERS = colab.Book(ROOT).chapters()
IDS = [path.stem for path in CHAPTERS]


def test_the_book_has_its_chapters() -> None:
    names = {path.stem for path in CHAPTERS}
    assert {"motivation", "derivation", "inference", "pitfalls", "landscape"} <= names, names


def _first_code_cell(source: Path) -> nbformat.NotebookNode:
    notebook = jupytext.read(source)
    return next(cell for cell in notebook.cells if cell.cell_type == "code")


def _run_install_cell(code: str, on_colab: bool) -> list[list[str]]:
    """Execute the install cell with subprocess.run recorded (nothing is installed), on Colab or not."""
    calls: list[list[str]] = []

    def record(command, *args, **kwargs):
        calls.append([str(part) for part in command])
        return subprocess.CompletedProcess(command, 0)

    fake_modules = dict(sys.modules)
    if on_colab:
        fake_modules["google"] = types.ModuleType("google")
        fake_modules["google.colab"] = types.ModuleType("google.colab")
    else:
        fake_modules.pop("google.colab", None)
    with mock.patch.dict(sys.modules, fake_modules, clear=True), mock.patch("subprocess.run", record), mock.patch(
        "subprocess.check_call", record
    ), mock.patch("os.system", lambda command: calls.append(command.split()) or 0):
        exec(compile(code, "<install cell>", "exec"), {"__name__": "__main__"})
    return calls


@pytest.mark.parametrize("source", CHAPTERS, ids=IDS)
def test_first_code_cell_installs_bnnotes_on_colab_only(source: Path) -> None:
    cell = _first_code_cell(source)
    assert "remove-cell" in cell.metadata.get("tags", []), (
        f"{source.name}: the first code cell must be the Colab install, tagged remove-cell; it is:\n{cell.source}"
    )
    assert not re.search(r"^\s*[%!]", cell.source, re.M), f"{source.name}: use subprocess, not shell magics"
    assert "google.colab" in cell.source, f"{source.name}: the install must be guarded on google.colab"

    assert _run_install_cell(cell.source, on_colab=False) == [], f"{source.name}: off Colab, the cell must not install"
    calls = _run_install_cell(cell.source, on_colab=True)
    installs = [call for call in calls if "pip" in call and "install" in call]
    assert len(installs) == 1, f"{source.name}: on Colab the cell should run one pip install, ran {calls}"
    requirements = [part for part in installs[0] if "git+" in part]
    assert requirements, f"{source.name}: the pip install does not install from git: {installs[0]}"
    match = re.fullmatch(r"bnnotes\s*@\s*git\+(?P<url>[^@\s]+?)(?:\.git)?(?:@(?P<ref>[\w./-]+))?", requirements[0])
    assert match, f"{source.name}: expected 'bnnotes @ git+{REPOSITORY_URL}', found {requirements[0]!r}"
    assert match["url"] == REPOSITORY_URL, (
        f"{source.name} installs from {match['url']}, but _config.yml's repository.url is {REPOSITORY_URL}"
    )
    assert match["ref"] in (None, CONFIG["repository"]["branch"]), f"{source.name} installs ref {match['ref']}"


EXERCISE_START = re.compile(r"^```\{exercise-start\}.*\n:label: (?P<label>\S+)\s*$", re.M)
EXERCISE_TITLE = re.compile(r"^```\{exercise-start\}(?P<title>.*)\n:label: (?P<label>\S+)\s*$", re.M)
EXERCISE_KINDS = ("Predict", "Derive", "Implement", "Explore")  # issue 15; the exercises page groups by them


@pytest.mark.parametrize("source", CHAPTERS, ids=IDS)
def test_chapter_ends_with_labelled_exercises(source: Path) -> None:
    """Exercises are sphinx-exercise's gated directives, labelled ex-<chapter>-<slug>, each followed by its solution."""
    text = source.read_text(encoding="utf-8")
    labels = EXERCISE_START.findall(text)
    assert labels, f"{source.name} has no exercise: write them with {{exercise-start}} and a :label: ex-<chapter>-<slug>"
    chapter = source.stem.replace("_", "-")
    assert all(label.startswith(f"ex-{chapter}-") for label in labels), f"{source.name}: labels {labels}"
    assert not re.findall(r"^\((ex-[\w-]+)\)=\s*$", text, re.M), f"{source.name}: an (ex-...)= line duplicates a label"
    for label in labels:
        assert re.search(rf"^```\{{solution-start\}} {re.escape(label)}\n:class: dropdown$", text, re.M), (
            f"{source.name}: exercise {label} has no collapsed solution (solution-start {label}, :class: dropdown)"
        )
    everywhere = [label for other in CHAPTERS for label in EXERCISE_START.findall(other.read_text(encoding="utf-8"))]
    duplicated = sorted({label for label in labels if everywhere.count(label) > 1})
    assert not duplicated, f"exercise labels used twice in the book: {duplicated}"


@pytest.mark.parametrize("source", CHAPTERS, ids=IDS)
def test_exercise_titles_start_with_their_kind(source: Path) -> None:
    """'Predict: ...', 'Derive: ...', 'Implement: ...' or 'Explore: ...': the exercises page groups by the prefix."""
    titles = {match["label"]: match["title"].strip() for match in EXERCISE_TITLE.finditer(source.read_text("utf-8"))}
    unkinded = {label: title for label, title in titles.items()
                if not re.match(rf"^({'|'.join(EXERCISE_KINDS)}): \S", title)}
    assert not unkinded, (
        f"{source.name}: exercise titles without their kind ({', '.join(k + ':' for k in EXERCISE_KINDS)}): {unkinded}"
    )


@pytest.mark.parametrize("source", CHAPTERS, ids=IDS)
def test_each_chapter_has_three_exercises_and_one_that_predicts_derives_or_implements(source: Path) -> None:
    """Issue 15: at least 3 exercises per chapter, at least one of them Predict, Derive or Implement."""
    titles = re.findall(r"^```\{exercise-start\}\s*(.+)$", source.read_text(encoding="utf-8"), re.M)
    kinds = [title.split(":", 1)[0] for title in titles]
    assert len(titles) >= 3, f"{source.name}: {len(titles)} exercises ({titles}); expected at least 3"
    assert {"Predict", "Derive", "Implement"} & set(kinds), f"{source.name}: only {kinds}"
