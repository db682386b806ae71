"""The chapters as notebooks: each MyST Markdown chapter has an output-free .ipynb twin with the same cells (Colab opens
the twin), and starts with the Colab-only install of bnnotes from the repository set in `_config.yml`.

Executing the chapters is nbval's job (`.ci/test` runs `pytest --nbval-lax book/*.ipynb`) and the book build's.
`.ci/sync-notebooks` regenerates the twins after a chapter changes.
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
SYNC = "run .ci/sync-notebooks to regenerate it"


def toc_files() -> list[str]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]]

    def walk(entries: list[dict]) -> None:
        for entry in entries:
            if "file" in entry:
                files.append(entry["file"])
            for key in ("chapters", "sections"):
                walk(entry.get(key, []))

    for part in toc.get("parts", []):
        walk(part.get("chapters", []))
    walk(toc.get("chapters", []))
    return files


def chapters() -> list[Path]:
    """The chapter sources: the Markdown notebooks of the table of contents (front matter with a kernelspec)."""
    sources = [ROOT / f"{name}.md" for name in toc_files()]
    return [path for path in sources if re.search(r"^kernelspec:", path.read_text(encoding="utf-8"), re.M)]


CHAPTERS = chapters()
IDS = [path.stem for path in CHAPTERS]


def test_the_book_has_its_chapters() -> None:
    names = {path.stem for path in CHAPTERS}
    assert {"motivation", "derivation", "inference", "pitfalls", "landscape"} <= names, names


def cells(notebook: nbformat.NotebookNode) -> list[tuple[str, str, tuple[str, ...]]]:
    """What the reader sees and runs: each cell's type, source and tags."""
    return [
        (cell.cell_type, cell.source.strip(), tuple(cell.get("metadata", {}).get("tags", [])))
        for cell in notebook.cells
    ]


@pytest.mark.parametrize("source", CHAPTERS, ids=IDS)
def test_notebook_twin_has_the_same_cells(source: Path) -> None:
    twin = source.with_suffix(".ipynb")
    assert twin.is_file(), f"{twin.relative_to(ROOT)} is missing: {SYNC}"
    from_markdown = cells(jupytext.read(source))
    from_notebook = cells(nbformat.read(twin, as_version=4))
    for index, (md_cell, nb_cell) in enumerate(zip(from_markdown, from_notebook)):
        assert md_cell == nb_cell, (
            f"{twin.name} differs from {source.name} at cell {index}:\n  .md:    {md_cell!r:.300}\n"
            f"  .ipynb: {nb_cell!r:.300}\n{SYNC}"
        )
    assert len(from_markdown) == len(from_notebook), (
        f"{source.name} has {len(from_markdown)} cells, {twin.name} {len(from_notebook)}: {SYNC}"
    )


@pytest.mark.parametrize("source", CHAPTERS, ids=IDS)
def test_notebook_twin_is_output_free(source: Path) -> None:
    twin = source.with_suffix(".ipynb")
    notebook = nbformat.read(twin, as_version=4)
    with_outputs = [
        index
        for index, cell in enumerate(notebook.cells)
        if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count") is not None)
    ]
    assert not with_outputs, f"{twin.name} is committed with outputs in cells {with_outputs}: {SYNC}"
    nbformat.validate(notebook)
    assert notebook.metadata.get("kernelspec", {}).get("name") == "python3", f"{twin.name} needs the python3 kernel"


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


@pytest.mark.parametrize("source", CHAPTERS, ids=IDS)
def test_chapter_ends_with_labelled_exercises(source: Path) -> None:
    # A label is a MyST target line (ex-...)= or, in the sphinx-exercise convention, an exercise's :label: ex-...
    pattern = r"^(?:\((ex-[\w-]+)\)=|:label: (ex-[\w-]+))\s*$"

    def exercise_labels(text: str) -> list[str]:
        return [target or option for target, option in re.findall(pattern, text, re.M)]

    labels = exercise_labels(source.read_text(encoding="utf-8"))
    assert labels, f"{source.name} has no exercise: give each one a label (ex-<chapter>-<name>)= for the exercises page"
    everywhere = [label for other in CHAPTERS for label in exercise_labels(other.read_text())]
    duplicated = sorted({label for label in labels if everywhere.count(label) > 1})
    assert not duplicated, f"exercise labels used twice in the book: {duplicated}"


def test_sync_script_writes_an_output_free_twin(tmp_path: Path) -> None:
    """`.ci/sync-notebooks` turns a chapter into the twin these tests expect, replacing a twin that has outputs."""
    source = CHAPTERS[0]
    copy = tmp_path / source.name
    copy.write_text(source.read_text(encoding="utf-8"), encoding="utf-8")
    stale = jupytext.read(source)
    stale.cells = stale.cells[:1] + [nbformat.v4.new_code_cell("1 + 1", execution_count=1, outputs=[
        nbformat.v4.new_output("execute_result", {"text/plain": "2"}, execution_count=1)])]
    nbformat.write(stale, copy.with_suffix(".ipynb"))

    subprocess.run(["bash", str(ROOT / ".ci" / "sync-notebooks"), str(copy)], check=True, capture_output=True)

    twin = nbformat.read(copy.with_suffix(".ipynb"), as_version=4)
    assert cells(twin) == cells(jupytext.read(source))
    assert all(not cell.get("outputs") and cell.get("execution_count") is None for cell in twin.cells if cell.cell_type == "code")
