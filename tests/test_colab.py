"""The Colab edition (book/_ext/colab.py): the committed notebooks are the generator's output, they hold no MyST, and
each one runs top to bottom as a learner gets it (alone in an empty folder, bnnotes importable, exercises as stubs).

Regenerate the notebooks with `.ci/sync-notebooks` after changing a chapter.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path
from unittest import mock

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "book" / "_ext"))
import colab  # noqa: E402  (book/_ext is not a package)

BOOK = colab.Book(ROOT)
CHAPTERS = BOOK.chapters()
IDS = [path.stem for path in CHAPTERS]
SYNC = "run .ci/sync-notebooks to regenerate it"


# ----------------------------------------------------------------------------------------------------------------------
# The committed notebooks
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", CHAPTERS, ids=IDS)
def test_committed_notebook_is_the_generators_output(source: Path) -> None:
    notebook = source.with_suffix(".ipynb")
    assert notebook.is_file(), f"{notebook.relative_to(ROOT)} is missing: {SYNC}"
    expected = colab.dumps(colab.generate(source, BOOK))
    assert notebook.read_text(encoding="utf-8") == expected, f"{notebook.name} is not what {source.name} generates: {SYNC}"


@pytest.mark.parametrize("source", CHAPTERS, ids=IDS)
def test_committed_notebook_has_no_outputs(source: Path) -> None:
    notebook = nbformat.read(source.with_suffix(".ipynb"), as_version=4)
    nbformat.validate(notebook)
    with_outputs = [i for i, cell in enumerate(notebook.cells)
                    if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)]
    assert not with_outputs, f"cells {with_outputs} have outputs: {SYNC}"
    assert notebook.metadata.kernelspec.name == "python3"


MYST_LEFTOVERS = {
    "a role": re.compile(r"\{[\w:.-]+\}`"),
    "a directive fence": re.compile(r"^\s*(`{3,}|~{3,}|:{3,})\{", re.M),
    "a colon fence": re.compile(r"^\s*:{3,}", re.M),
    "a (label)= line": re.compile(r"^\([^()\s]+\)=\s*$", re.M),
    "a labelled $$ block": re.compile(r"\$\$\s*\([\w-]+\)"),
    "a MyST comment": re.compile(r"^%", re.M),
    "a substitution": re.compile(r"\{\{\s*[\w.-]+\s*\}\}"),
    "a directive option": re.compile(r"^:[\w-]+:\s", re.M),
}


@pytest.mark.parametrize("source", CHAPTERS, ids=IDS)
def test_no_myst_syntax_is_left_in_markdown_cells(source: Path) -> None:
    notebook = nbformat.read(source.with_suffix(".ipynb"), as_version=4)
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type != "markdown":
            continue
        text = re.sub(r"```.*?```", "", cell.source, flags=re.S)  # code blocks may show anything
        text = re.sub(r"`[^`\n]+`", "CODE", text)  # a placeholder: what follows a code span is not at a line's start
        for what, pattern in MYST_LEFTOVERS.items():
            match = pattern.search(text)
            assert not match, f"{source.stem}.ipynb cell {index} still has {what}: {match.group(0)!r} in\n{cell.source[:400]}"


@pytest.mark.parametrize("source", CHAPTERS, ids=IDS)
def test_solutions_are_stubs_and_checkers_follow(source: Path) -> None:
    """Every solution of the .md is a stub in the notebook (no solution code), followed by its checker cell."""
    text = source.read_text(encoding="utf-8")
    solutions = re.findall(r"```\{solution-start\}.*?```\{code-cell\}[^\n]*\n(.*?)\n```", text, re.S)
    assert solutions, f"{source.name} has no solution"
    notebook = nbformat.read(source.with_suffix(".ipynb"), as_version=4)
    code = [cell.source for cell in notebook.cells if cell.cell_type == "code"]
    for solution in solutions:
        functions = [node for node in ast.parse(solution).body if isinstance(node, ast.FunctionDef)]
        for function in functions:
            stubs = [i for i, cell in enumerate(code) if re.search(rf"^def {function.name}\(", cell, re.M)]
            assert len(stubs) == 1, f"{source.stem}.ipynb should define {function.name} once, in its stub"
            stub = ast.parse(code[stubs[0]])
            definition = next(node for node in stub.body if isinstance(node, ast.FunctionDef) and node.name == function.name)
            assert ast.get_docstring(definition) == ast.get_docstring(function), "the stub keeps the docstring"
            statements = definition.body[1:]
            assert len(statements) == 1 and isinstance(statements[0], ast.Raise), f"{function.name}: the body must go"
            assert "NotImplementedError" in ast.unparse(statements[0]) and "Hint:" in ast.unparse(statements[0])
            assert re.search(rf"check_\w+\({function.name}\)", code[stubs[0] + 1]), (
                f"{source.stem}.ipynb: the checker of {function.name} should follow its stub"
            )
        body_lines = [line.strip() for line in solution.splitlines() if line.strip().startswith(("return ", "x_hat"))]
        assert not any(line in cell for cell in code for line in body_lines), "a solution line leaked into the notebook"


@pytest.mark.parametrize("source", CHAPTERS, ids=IDS)
def test_header_links_the_book_page_and_colab_agrees(source: Path) -> None:
    notebook = nbformat.read(source.with_suffix(".ipynb"), as_version=4)
    docname = source.relative_to(ROOT).with_suffix("").as_posix()
    header = notebook.cells[0].source
    owner, repo, branch = BOOK.repository
    assert BOOK.book_url == f"https://{owner}.github.io/{repo}/"
    assert f"]({BOOK.book_url}{docname}.html)" in header, header
    assert BOOK.colab_url(docname) == (
        f"https://colab.research.google.com/github/{owner}/{repo}/blob/{branch}/{docname}.ipynb"
    )
    assert (ROOT / f"{docname}.ipynb").is_file()


def test_the_built_books_colab_buttons_open_the_generated_notebooks() -> None:
    """The theme's Colab button (built from the same _config.yml) and the generator's colab_url agree, in a real build."""
    built = [ROOT / "_build" / "html" / f"{source.relative_to(ROOT).with_suffix('').as_posix()}.html" for source in CHAPTERS]
    if not all(page.is_file() for page in built):
        pytest.skip("the book is not built (tests/test_book.py builds it first in a full run)")
    for source, page in zip(CHAPTERS, built):
        docname = source.relative_to(ROOT).with_suffix("").as_posix()
        html = page.read_text(encoding="utf-8")
        links = set(re.findall(r'href="(https://colab\.research\.google\.com/[^"]+)"', html))
        assert links == {BOOK.colab_url(docname)}, f"{page.name}: Colab buttons {links}, generator {BOOK.colab_url(docname)}"


# ----------------------------------------------------------------------------------------------------------------------
# The set-up cell
# ----------------------------------------------------------------------------------------------------------------------


def run_setup_cell(code: str, on_colab: bool, returncode: int = 0) -> tuple[list[list[str]], dict[str, str], str]:
    """Execute the set-up cell with subprocess.run recorded (nothing is installed): (calls, environment, constraints)."""
    calls: list[list[str]] = []
    constraints: dict[str, str] = {}

    def record(command, *args, **kwargs):
        calls.append([str(part) for part in command])
        if "-c" in command:
            constraints["text"] = Path(command[command.index("-c") + 1]).read_text()
        stderr = "  error: subprocess-exited-with-error\n  fatal: unable to access: Could not resolve host: github.com\n"
        return subprocess.CompletedProcess(command, returncode, stdout="", stderr=stderr)

    modules = dict(sys.modules)
    if on_colab:
        modules["google"] = types.ModuleType("google")
        modules["google.colab"] = types.ModuleType("google.colab")
    else:
        modules.pop("google.colab", None)
    with mock.patch.dict(sys.modules, modules, clear=True), mock.patch("subprocess.run", record), \
            mock.patch.dict(os.environ, {}, clear=False):
        exec(compile(code, "<set-up cell>", "exec"), {"__name__": "__main__"})
        environment = {key: os.environ[key] for key in ("BNNOTES_SHOW_GLUE", "BNNOTES_PROGRESS") if key in os.environ}
    return calls, environment, constraints.get("text", "")


SETUP = colab.setup_cell(BOOK)


def test_setup_cell_is_each_notebooks_first_code_cell() -> None:
    for source in CHAPTERS:
        notebook = nbformat.read(source.with_suffix(".ipynb"), as_version=4)
        first = next(cell for cell in notebook.cells if cell.cell_type == "code")
        assert first.source == SETUP, f"{source.stem}.ipynb: the first code cell is not the set-up cell"


def test_setup_cell_installs_nothing_off_colab_but_turns_on_the_extras() -> None:
    calls, environment, _ = run_setup_cell(SETUP, on_colab=False)
    assert calls == []
    assert environment == {"BNNOTES_SHOW_GLUE": "1", "BNNOTES_PROGRESS": "1"}


def test_setup_cell_on_colab_pins_the_branch_and_keeps_torch() -> None:
    from importlib import metadata

    calls, _, constraints = run_setup_cell(SETUP, on_colab=True)
    assert len(calls) == 1 and calls[0][1:4] == ["-m", "pip", "install"], calls
    requirement = calls[0][-1]
    assert requirement == f"bnnotes @ git+{BOOK.repository_url}@{BOOK.branch}", requirement
    assert BOOK.repository_url == colab.yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"]
    assert constraints.strip() == f"torch=={metadata.version('torch')}", "pip must not be allowed to replace Colab's torch"
    assert "-U" not in calls[0] and "--upgrade" not in calls[0]


def test_setup_cell_says_why_when_the_repository_cannot_be_reached() -> None:
    with pytest.raises(RuntimeError) as failure:
        run_setup_cell(SETUP, on_colab=True, returncode=1)
    message = str(failure.value)
    assert BOOK.repository_url in message and f"branch {BOOK.branch}" in message
    assert message.endswith("pip said:\nfatal: unable to access: Could not resolve host: github.com"), message


# ----------------------------------------------------------------------------------------------------------------------
# The generator on small inputs
# ----------------------------------------------------------------------------------------------------------------------

MINI_CONFIG = """
title: Mini book
bibtex_bibfiles: [references.bib]
repository: {url: "https://github.com/Owner/mini", branch: dev}
sphinx: {config: {numfig: true}}
"""
MINI_TOC = """
format: jb-book
root: book/intro
parts:
  - caption: C
    chapters:
      - file: book/first
      - file: book/second
      - file: book/api
      - file: book/bibliography
"""
MINI_BIB = """
@article{ioffe2015batch, author = {Ioffe, Sergey and Szegedy, Christian}, title = {BN}, journal = {J}, year = {2015}}
@article{santurkar2018how, author = {Santurkar, S. and Tsipras, D. and Ilyas, A. and Madry, A.}, title = {How},
  journal = {J}, year = {2018}}
"""
FRONT = "---\nkernelspec:\n  display_name: Python 3\n  language: python\n  name: python3\n---\n\n"
INSTALL = '```{code-cell} ipython3\n:tags: [remove-cell]\nimport sys\nif "google.colab" in sys.modules:\n    pass\n```\n\n'
FIRST = FRONT + """(first)=
# First chapter

""" + INSTALL + """Intro text.

$$
a = b
$$ (eq-first-a)

```{code-cell} ipython3
---
mystnb:
  figure:
    caption: A figure about {eq}`eq-first-a`.
    name: fig-first-one
---
print(1)
```

(first-section)=
## A section with $x$

```{figure} img/pic.png
:name: fig-first-static
:alt: picture

A static figure.
```

$$ c = d $$ (eq-first-c)
"""
SECOND = FRONT + "(second)=\n# Second chapter\n\n" + INSTALL + "Text.\n"


@pytest.fixture()
def mini(tmp_path: Path) -> colab.Book:
    (tmp_path / "book").mkdir()
    (tmp_path / "_config.yml").write_text(MINI_CONFIG)
    (tmp_path / "_toc.yml").write_text(MINI_TOC)
    (tmp_path / "references.bib").write_text(MINI_BIB)
    (tmp_path / "book" / "intro.md").write_text("(intro)=\n# Intro\n")
    (tmp_path / "book" / "first.md").write_text(FIRST)
    (tmp_path / "book" / "second.md").write_text(SECOND)
    (tmp_path / "book" / "api.md").write_text("(api)=\n# API\n")
    (tmp_path / "book" / "bibliography.md").write_text("(bibliography)=\n# Bibliography\n\n```{bibliography}\n```\n")
    return colab.Book(tmp_path)


def convert(book: colab.Book, text: str, docname: str = "book/second") -> str:
    return colab.Converter(book, docname).markdown(text)


BASE = "https://owner.github.io/mini/"


def test_urls_come_from_repository_url(mini: colab.Book) -> None:
    assert mini.book_url == BASE
    assert mini.page_url("book/first", "x") == BASE + "book/first.html#x"
    assert mini.colab_url("book/first") == "https://colab.research.google.com/github/Owner/mini/blob/dev/book/first.ipynb"


@pytest.mark.parametrize(
    "myst, markdown",
    [
        ("{cite}`ioffe2015batch`", f"([Ioffe & Szegedy, 2015]({BASE}book/bibliography.html#cite-ioffe2015batch))"),
        ("{cite:p}`ioffe2015batch`", f"([Ioffe & Szegedy, 2015]({BASE}book/bibliography.html#cite-ioffe2015batch))"),
        ("{cite:t}`santurkar2018how`", f"[Santurkar et al. (2018)]({BASE}book/bibliography.html#cite-santurkar2018how)"),
        ("{cite}`ioffe2015batch,santurkar2018how`", "([Ioffe & Szegedy, 2015]("),
        ("{ref}`first-section`", f"[A section with $x$]({BASE}book/first.html#first-section)"),
        ("{ref}`the text <first-section>`", f"[the text]({BASE}book/first.html#first-section)"),
        ("{ref}`first`", f"[First chapter]({BASE}book/first.html#first)"),
        ("{doc}`first`", f"[First chapter]({BASE}book/first.html)"),
        ("{eq}`eq-first-a`", f"[(1)]({BASE}book/first.html#equation-eq-first-a)"),
        ("{eq}`eq-first-c`", f"[(2)]({BASE}book/first.html#equation-eq-first-c)"),
        ("{numref}`fig-first-one`", f"[Fig. 1]({BASE}book/first.html#fig-first-one)"),
        ("{numref}`fig-first-static`", f"[Fig. 2]({BASE}book/first.html#fig-first-static)"),
        ("{numref}`Figure %s <fig-first-one>`", f"[Figure 1]({BASE}book/first.html#fig-first-one)"),
        ("{py:mod}`bnnotes.numpy_bn`", f"[`bnnotes.numpy_bn`]({BASE}book/api.html#module-bnnotes.numpy_bn)"),
        ("{py:func}`~bnnotes.numpy_bn.forward`", f"[`forward`]({BASE}book/api.html#bnnotes.numpy_bn.forward)"),
        ("{math}`x^2`", "$x^2$"),
        ("{glue:text}`first_ratio:.1f`", "`first_ratio`"),
        ("{glue}`first_ratio`", "`first_ratio`"),
        ("`{cite}` in code", "`{cite}` in code"),
    ],
)
def test_roles(mini: colab.Book, myst: str, markdown: str) -> None:
    assert markdown in convert(mini, myst)


def test_equations_get_the_books_numbers(mini: colab.Book) -> None:
    notebook = colab.generate(mini.root / "book" / "first.md", mini)
    text = "\n".join(cell.source for cell in notebook.cells if cell.cell_type == "markdown")
    assert "a = b\n\\tag{1}\n$$" in text and "$$ c = d \\tag{2} $$" in text
    assert "(eq-first" not in text and "(first-section)=" not in text


def test_figure_caption_follows_the_figure_cell(mini: colab.Book) -> None:
    notebook = colab.generate(mini.root / "book" / "first.md", mini)
    index = next(i for i, cell in enumerate(notebook.cells) if cell.source == "print(1)")
    caption = notebook.cells[index + 1]
    assert caption.cell_type == "markdown" and "**Fig. 1.** A figure about [(1)](" in caption.source
    static = next(cell.source for cell in notebook.cells if "pic.png" in cell.source)
    assert 'src="https://raw.githubusercontent.com/Owner/mini/dev/book/img/pic.png"' in static
    assert "*Fig. 2: A static figure.*" in static


def test_header_and_setup_cells(mini: colab.Book) -> None:
    notebook = colab.generate(mini.root / "book" / "first.md", mini)
    assert f"]({BASE}book/first.html)" in notebook.cells[0].source
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code[0].source == colab.setup_cell(mini) and "git+{REPOSITORY}@{BRANCH}" in code[0].source
    assert 'BRANCH = "dev"' in code[0].source


@pytest.mark.parametrize("name", ["note", "warning", "tip", "important", "seealso"])
def test_admonitions_become_block_quotes(mini: colab.Book, name: str) -> None:
    out = convert(mini, f"```{{{name}}}\nSee {{ref}}`first`.\n```")
    assert out.startswith("> **") and f"> See [First chapter]({BASE}book/first.html#first)." in out


def test_titled_admonition_colon_fence_and_dropdown(mini: colab.Book) -> None:
    assert convert(mini, ":::{admonition} Careful\nText $x$.\n:::").startswith("> **Careful.**")
    dropdown = convert(mini, "```{admonition} More\n:class: dropdown\nHidden {cite:t}`ioffe2015batch`.\n```")
    assert dropdown.startswith("<details>\n<summary>More</summary>") and "Ioffe & Szegedy (2015)" in dropdown
    assert "<details>" in convert(mini, "```{dropdown} Click\nBody.\n```")


def test_nested_directives(mini: colab.Book) -> None:
    out = convert(mini, "````{note}\nOuter.\n```{math}\nx = 1\n```\n````")
    assert "> $$" in out and "> x = 1" in out


def test_tables(mini: colab.Book) -> None:
    out = convert(mini, "```{list-table} Numbers\n:header-rows: 1\n:name: tab-x\n* - a\n  - b\n* - {math}`1`\n  - 2\n```")
    assert "**Numbers**" in out and "| a | b |" in out and "| $1$ | 2 |" in out
    assert "| x |" in convert(mini, "```{table} Plain\n| x |\n| --- |\n| 1 |\n```")


def test_code_blocks_are_kept_verbatim(mini: colab.Book) -> None:
    assert convert(mini, "```python\n{cite}`x` stays\n```") == "```python\n{cite}`x` stays\n```"
    assert convert(mini, "```{code-block} bash\necho {ref}`x`\n```") == "```bash\necho {ref}`x`\n```"


def test_labels_and_comments_are_dropped(mini: colab.Book) -> None:
    assert convert(mini, "(some-label)=\n## Title\n% a comment\nText") == "## Title\nText"


def test_literalinclude_becomes_a_code_cell_showing_the_source(mini: colab.Book) -> None:
    converter = colab.Converter(mini, "book/second")
    out = converter.markdown("Before.\n\n```{literalinclude} ../bnnotes/numpy_bn.py\n:pyobject: forward\n```\n\nAfter.")
    assert out.split(colab.SPLICE_MARK)[0].strip() == "Before."
    assert converter.spliced == ["from bnnotes.notebook import show_source\n\nshow_source('bnnotes.numpy_bn', 'forward')"]


def test_show_source_shows_the_installed_code() -> None:
    from bnnotes import numpy_bn
    from bnnotes.notebook import show_source

    shown = show_source("bnnotes.numpy_bn", "forward")
    assert shown.data.startswith("```python\ndef forward(") and "batch_mean" in shown.data
    import inspect

    assert inspect.getsource(numpy_bn.forward).strip() in shown.data
    with pytest.raises(AttributeError, match="has no 'nothing'"):
        show_source("bnnotes.numpy_bn", "nothing")


@pytest.mark.parametrize(
    "myst, complaint",
    [
        ("{unknownrole}`x`", "does not know the role"),
        ("```{unknown-directive}\nx\n```", "does not know the directive"),
        ("{ref}`no-such-label`", "which no page defines"),
        ("{cite}`nobody2020`", "references.bib does not have"),
        ("{eq}`first-section`", "not a numbered equation"),
        ("Term\n: definition", "definition lists"),
        ("A note[^1].", "footnotes"),
        ("{{ substitution }}", "substitutions"),
        ("```{note}\nunclosed", "unclosed"),
        ("```{literalinclude} ../bnnotes/numpy_bn.py\n:lines: 1-3\n```", "not supported"),
    ],
)
def test_unknown_or_unrenderable_myst_fails_loudly(mini: colab.Book, myst: str, complaint: str) -> None:
    with pytest.raises(colab.ColabError, match=complaint):
        convert(mini, myst)


def test_stub_keeps_signatures_docstrings_and_hints() -> None:
    solution = '''import math


def my_scale(x, factor=2):
    """Scale x.

    Hint: multiply.
    """
    return x * factor


predicted_ratio: float = 3.0
lower = upper = 1
'''
    stub = colab.stub(solution)
    namespace: dict = {}
    exec(stub, namespace)
    assert namespace["predicted_ratio"] is None and namespace["lower"] is None and namespace["upper"] is None
    with pytest.raises(NotImplementedError, match="^Hint: multiply.$"):
        namespace["my_scale"](1)
    assert namespace["my_scale"].__doc__ == "Scale x.\n\n    Hint: multiply.\n    "
    assert "x * factor" not in stub and "import math" in stub


@pytest.mark.parametrize(
    "solution, complaint",
    [
        ("def f(x):\n    return x\n", "needs a docstring with a 'Hint:'"),
        ('def f(x):\n    """No hint."""\n    return x\n', "needs a docstring with a 'Hint:'"),
        ("x = 1\nassert x == 1\n", "only functions"),
        ("for i in range(3):\n    pass\n", "only functions"),
        ("a[0] = 1\n", "only plain names"),
    ],
)
def test_stub_refuses_what_it_cannot_stub(solution: str, complaint: str) -> None:
    with pytest.raises(colab.ColabError, match=complaint):
        colab.stub(solution)


def test_exercise_gates(mini: colab.Book) -> None:
    chapter = mini.root / "book" / "second.md"
    chapter.write_text(SECOND + """
```{exercise-start} Double it
:label: ex-second-double
```

Write `double(x)`, see {eq}`eq-first-a`.

```{exercise-end}
```

```{solution-start} ex-second-double
:class: dropdown
```

```{code-cell} ipython3
def double(x):
    \"\"\"Return 2 x. Hint: add x to itself.\"\"\"
    return x + x
```

The solution's discussion, for the book only.

```{solution-end}
```

```{code-cell} ipython3
check(double)
```
""")
    book = colab.Book(mini.root)
    cells = colab.generate(chapter, book).cells
    text = "\n".join(cell.source for cell in cells)
    assert '<a id="ex-second-double"></a>\n#### Exercise 1 (Double it)\n\nWrite `double(x)`, see [(1)](' in text
    assert "discussion" not in text and "return x + x" not in text
    stub_index = next(i for i, cell in enumerate(cells) if "def double" in cell.source)
    assert 'raise NotImplementedError(\'Hint: add x to itself.\')' in cells[stub_index].source
    assert cells[stub_index + 1].source == "check(double)"


# ----------------------------------------------------------------------------------------------------------------------
# Every notebook, run as a learner gets it
# ----------------------------------------------------------------------------------------------------------------------


def cell_times(notebook: nbformat.NotebookNode, at_least: float) -> list[tuple[float, str, int]]:
    """(seconds, first line, progress lines printed) of the code cells that ran for at least `at_least` seconds
    (nbclient's timing metadata): a measurement of which long cells report progress in the Colab edition."""
    from datetime import datetime

    slow = []
    for cell in notebook.cells:
        timing = cell.get("metadata", {}).get("execution", {})
        if cell.cell_type != "code" or "shell.execute_reply" not in timing:
            continue
        started, ended = (datetime.fromisoformat(timing[key].replace("Z", "+00:00"))
                          for key in ("iopub.execute_input", "shell.execute_reply"))
        if (ended - started).total_seconds() >= at_least:
            text = "".join(output.get("text", "") for output in cell.outputs)
            reports = len(re.findall(r"\(\d+ s\)$", text, re.M))
            slow.append((round((ended - started).total_seconds(), 1), cell.source.splitlines()[0][:80], reports))
    return slow


@pytest.fixture(scope="module")
def learner_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding only the bnnotes package: what `pip install` gives a learner, without the repository."""
    site = tmp_path_factory.mktemp("site")
    shutil.copytree(ROOT / "bnnotes", site / "bnnotes", ignore=shutil.ignore_patterns("__pycache__"))
    return site


@pytest.mark.slow
@pytest.mark.parametrize("source", CHAPTERS, ids=IDS)
def test_notebook_runs_alone_as_a_learner_gets_it(source: Path, learner_site: Path, tmp_path: Path) -> None:
    from nbclient import NotebookClient

    folder = tmp_path / "learner"
    folder.mkdir()
    copy = folder / source.with_suffix(".ipynb").name
    shutil.copy(source.with_suffix(".ipynb"), copy)
    notebook = nbformat.read(copy, as_version=4)
    # One cell more, at the end, to check which bnnotes the kernel ran (the learner's, not the repository's).
    notebook.cells.append(nbformat.v4.new_code_cell('import bnnotes\nprint("bnnotes from", bnnotes.__file__)'))
    environment = {key: value for key, value in os.environ.items() if not key.startswith(("BNNOTES_", "JPY_"))}
    environment["PYTHONPATH"] = str(learner_site)  # bnnotes importable; no repository around
    environment["MPLBACKEND"] = "Agg"
    client = NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(folder)}})
    started = time.perf_counter()
    with mock.patch.dict(os.environ, environment, clear=True):
        client.execute(cwd=str(folder))
    seconds = time.perf_counter() - started

    outputs = "\n".join(
        output.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
    )
    imported_from = [line for line in outputs.splitlines() if line.startswith("bnnotes from ")]
    assert len(imported_from) == 1 and str(learner_site) in imported_from[0], imported_from
    checkers = [cell for cell in notebook.cells if cell.cell_type == "code" and re.search(r"exercises\.check_\w+\(", cell.source)]
    assert checkers, f"{copy.name} has no exercise checker"
    for cell in checkers:
        text = "".join(output.get("text", "") for output in cell.outputs)
        assert "not attempted yet" in text, f"{copy.name}: a checker did not report the stub:\n{cell.source}\n{text}"
    print(f"{copy.name}: ran alone in {seconds:.0f} s")
    (ROOT / "_build").mkdir(exist_ok=True)
    record = ROOT / "_build" / "colab-times.json"
    times = json.loads(record.read_text()) if record.is_file() else {}
    times[source.stem] = {"seconds": round(seconds, 1), "slow_cells": cell_times(notebook, at_least=5.0)}
    record.write_text(json.dumps(times, indent=1, sort_keys=True) + "\n")


# ----------------------------------------------------------------------------------------------------------------------
# Publishing: the book the notebooks link to is the one the Pages workflow builds
# ----------------------------------------------------------------------------------------------------------------------


def test_pages_workflow_runs_the_readmes_build_command_and_publishes_the_html() -> None:
    import yaml

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = re.findall(r"```bash\n\s*(python3 -m venv .*?)\n\s*```", readme)
    build = next(command for command in commands if "jupyter-book build" in command)
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "pages.yml").read_text(encoding="utf-8"))
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads the key `on` as True
    assert triggers["push"]["branches"] == [BOOK.branch], "publish the branch the Colab editions install from"
    steps = workflow["jobs"]["build"]["steps"]
    assert [step.get("run") for step in steps if "run" in step][0] == build, "the workflow must run the README's build"
    upload = next(step for step in steps if step.get("uses", "").startswith("actions/upload-pages-artifact"))
    assert upload["with"]["path"] == "_build/html"
    assert any(step.get("uses", "").startswith("actions/deploy-pages") for step in workflow["jobs"]["deploy"]["steps"])
