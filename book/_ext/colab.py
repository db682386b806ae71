"""The Colab edition: turn a chapter's MyST Markdown source (``book/<chapter>.md``) into the notebook Colab opens.

The ``.md`` is the single source; ``.ci/sync-notebooks`` calls `write_notebook` for each chapter and
``tests/test_colab.py`` checks that every committed ``book/<chapter>.ipynb`` is exactly what `generate` returns. What
the generator does to a chapter:

- **A header cell** (what the chapter is, its page in the published book, its CPU run time from
  ``book/_data/chapter-times.json``) and a **setup cell** in place of the chapter's first code cell (the Colab-only
  install): it pins ``repository.branch`` of ``_config.yml``, keeps Colab's torch (a pip constraint), fails with a
  readable message when the repository cannot be reached, and turns on the Colab edition's extras,
  ``BNNOTES_SHOW_GLUE`` (the numbers the prose refers to are printed) and ``BNNOTES_PROGRESS`` (long loops report
  as they go).
- **Markdown that renders in Jupyter and Colab:** citations become "Ioffe & Szegedy (2015)" linked to the bibliography
  page; ``{ref}``, ``{numref}``, ``{doc}``, ``{eq}`` and ``{py:*}`` become links to the published book, with the numbers
  the HTML book shows (equations get the same number with ``\\tag{}``); glue roles name the printed value;
  admonitions, dropdowns, figures, tables and code blocks become Markdown or HTML; ``(label)=`` lines and ``%`` comments
  go. A role or directive it does not know is an error (`ColabError`), never passed through.
- **Figure captions** (``mystnb.figure`` cell metadata) follow their figure cell as a Markdown cell, numbered as in the
  book.
- **literalinclude** becomes a code cell that shows the installed source (`bnnotes.notebook.show_source`).
- **Exercises** (sphinx-exercise's gated directives): the statement is kept, the solution's code cell becomes a stub
  (each top-level ``def`` keeps its signature and docstring and raises ``NotImplementedError(<the docstring's Hint>)``;
  each ``NAME = value`` becomes ``NAME = None``) and the solution's prose is dropped: solutions live only in the book.

The numbering follows Sphinx with ``numfig`` (figures, tables, exercises and labelled equations counted in
table-of-contents order, prefixed with the chapter number when ``_toc.yml`` numbers chapters); the URLs follow the
GitHub Pages address of ``repository.url``.
"""

from __future__ import annotations

import ast
import json
import re
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import nbformat
import yaml

ROOT = Path(__file__).resolve().parents[2]
TIMES_FILE = Path("book") / "_data" / "chapter-times.json"
COLAB_URL = "https://colab.research.google.com"


class ColabError(ValueError):
    """The chapter uses something the Colab edition cannot render, or breaks a convention the generator relies on."""


# ----------------------------------------------------------------------------------------------------------------------
# The book: its configuration, pages, labels and their numbers
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class Target:
    """What a label points to: the page (docname, e.g. ``book/derivation``), the HTML anchor, a title and a number."""

    docname: str
    anchor: str
    kind: str  # "section", "equation", "figure", "table", "exercise", "label"
    title: str = ""
    number: str = ""


def make_id(text: str) -> str:
    """The HTML id docutils (and so Sphinx) makes of a label: lower case, runs of other characters become '-'."""
    from docutils.nodes import make_id as docutils_make_id

    return docutils_make_id(text)


def toc_docnames(toc: dict[str, Any]) -> tuple[list[str], dict[str, tuple[int, ...]]]:
    """The documents of ``_toc.yml`` in reading order, and the section number of each numbered one.

    Jupyter Book numbers chapters only under ``numbered: true`` (per part, or at the top); with
    ``use_multitoc_numbering`` the numbers run on across parts. Sections (``sections:``) get ``chapter.k``.
    """
    order: list[str] = [toc["root"]]
    numbers: dict[str, tuple[int, ...]] = {}
    counter = [0]

    def walk(entries: list[dict[str, Any]], numbered: bool, prefix: tuple[int, ...]) -> None:
        local = 0
        for entry in entries:
            if "file" not in entry:
                continue
            order.append(entry["file"])
            if numbered:
                if prefix:
                    local += 1
                    number = prefix + (local,)
                else:
                    counter[0] += 1
                    number = (counter[0],)
                numbers[entry["file"]] = number
            else:
                number = ()
            for key in ("sections", "chapters"):
                walk(entry.get(key, []), numbered, number if numbered else ())

    top_numbered = bool(toc.get("numbered") or toc.get("defaults", {}).get("numbered"))
    for part in toc.get("parts", []):
        walk(part.get("chapters", []), top_numbered or bool(part.get("numbered")), ())
    walk(toc.get("chapters", []), top_numbered, ())
    return order, numbers


FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,}|:{3,})(?P<info>.*)$")
LABEL_LINE = re.compile(r"^\((?P<label>[^()\s]+)\)=\s*$")
HEADING = re.compile(r"^(?P<hashes>#{1,6})\s+(?P<text>.+?)\s*#*\s*$")
EQUATION_END = re.compile(r"^(?P<body>.*?)\$\$\s*\((?P<label>[^()\s]+)\)\s*$")
DIRECTIVE_INFO = re.compile(r"^\{(?P<name>[\w:.-]+)\}\s*(?P<argument>.*)$")


@dataclass
class Book:
    """Everything the generator needs to know about the book, read from the repository at ``root``."""

    root: Path = ROOT

    @cached_property
    def config(self) -> dict[str, Any]:
        return yaml.safe_load((self.root / "_config.yml").read_text(encoding="utf-8"))

    @cached_property
    def repository(self) -> tuple[str, str, str]:
        """(owner, name, branch) from ``repository.url`` and ``repository.branch``."""
        repo = self.config.get("repository", {})
        url = repo.get("url", "")
        match = re.fullmatch(r"https://github\.com/(?P<owner>[\w.-]+)/(?P<name>[\w.-]+?)(?:\.git)?/?", url)
        if not match:
            raise ColabError(f"_config.yml: repository.url should be https://github.com/<owner>/<repo>, got {url!r}")
        return match["owner"], match["name"], repo.get("branch", "main")

    @property
    def repository_url(self) -> str:
        owner, name, _ = self.repository
        return f"https://github.com/{owner}/{name}"

    @property
    def branch(self) -> str:
        return self.repository[2]

    @property
    def book_url(self) -> str:
        """Where GitHub Pages publishes the built book (``_build/html``): https://<owner>.github.io/<repo>/."""
        owner, name, _ = self.repository
        return f"https://{owner.lower()}.github.io/{name}/"

    def page_url(self, docname: str, anchor: str = "") -> str:
        return self.book_url + f"{docname}.html" + (f"#{anchor}" if anchor else "")

    def colab_url(self, docname: str) -> str:
        """The address sphinx-book-theme's Colab button opens: the committed ``.ipynb`` on the configured branch."""
        owner, name, branch = self.repository
        path = self.config.get("repository", {}).get("path_to_book", "") or ""
        prefix = f"{path.strip('/')}/" if path.strip("/") else ""
        return f"{COLAB_URL}/github/{owner}/{name}/blob/{branch}/{prefix}{docname}.ipynb"

    def raw_url(self, relative: str) -> str:
        owner, name, branch = self.repository
        return f"https://raw.githubusercontent.com/{owner}/{name}/{branch}/{relative}"

    @cached_property
    def toc(self) -> tuple[list[str], dict[str, tuple[int, ...]]]:
        return toc_docnames(yaml.safe_load((self.root / "_toc.yml").read_text(encoding="utf-8")))

    @property
    def docnames(self) -> list[str]:
        return self.toc[0]

    def chapters(self) -> list[Path]:
        """The chapter sources: the Markdown notebooks (a kernelspec in the front matter) of the table of contents."""
        paths = [self.root / f"{name}.md" for name in self.docnames]
        return [p for p in paths if p.is_file() and re.search(r"^kernelspec:", p.read_text(encoding="utf-8"), re.M)]

    def title(self, docname: str) -> str:
        for line in (self.root / f"{docname}.md").read_text(encoding="utf-8").splitlines():
            match = HEADING.match(line)
            if match and len(match["hashes"]) == 1:
                return match["text"]
        return docname

    @cached_property
    def numfig_format(self) -> dict[str, str]:
        formats = {"figure": "Fig. %s", "table": "Table %s", "code-block": "Listing %s", "section": "Section %s",
                   "exercise": "Exercise %s"}
        formats.update(self.config.get("sphinx", {}).get("config", {}).get("numfig_format", {}) or {})
        return formats

    @cached_property
    def targets(self) -> dict[str, Target]:
        """Every label of the book, with its page, anchor, title and number (Sphinx's numfig rules)."""
        import jupytext

        targets: dict[str, Target] = {}
        counters: dict[tuple[str, tuple[int, ...]], int] = {}
        secnum_depth = int(self.config.get("sphinx", {}).get("config", {}).get("numfig_secnum_depth", 1))

        def number(kind: str, docname: str) -> str:
            prefix = self.toc[1].get(docname, ())[:secnum_depth]
            counters[(kind, prefix)] = counters.get((kind, prefix), 0) + 1
            return ".".join(str(part) for part in prefix + (counters[(kind, prefix)],))

        def add(label: str, target: Target) -> None:
            if label in targets:
                raise ColabError(f"label {label!r} is defined twice ({targets[label].docname} and {target.docname})")
            targets[label] = target

        for docname in self.docnames:
            path = self.root / f"{docname}.md"
            if not path.is_file():
                continue
            text = path.read_text(encoding="utf-8")
            cells = jupytext.read(path).cells if re.search(r"^kernelspec:", text, re.M) else [
                nbformat.v4.new_markdown_cell(text)]
            for cell in cells:
                if cell.cell_type == "code":
                    figure = cell.metadata.get("mystnb", {}).get("figure", {})
                    if figure.get("caption"):
                        name = figure.get("name", "")
                        value = number("figure", docname)
                        if name:
                            add(name, Target(docname, make_id(name), "figure", figure["caption"].strip(), value))
                    continue
                self._collect_markdown(cell.source, docname, add, number)
        return targets

    def _collect_markdown(self, source: str, docname: str, add: Callable[[str, Target], None],
                          number: Callable[[str, str], str]) -> None:
        lines = source.splitlines()
        pending: str | None = None
        index = 0
        while index < len(lines):
            line = lines[index]
            fence = FENCE.match(line)
            if fence:
                end = _fence_end(lines, index, fence)
                info = fence["info"].strip()
                directive = DIRECTIVE_INFO.match(info)
                if directive:
                    options, content = _split_options(lines[index + 1 : end])
                    name = directive["name"]
                    label = options.get("label") or options.get("name")
                    kind = {"figure": "figure", "table": "table", "list-table": "table", "math": "equation",
                            "exercise": "exercise", "exercise-start": "exercise"}.get(name)
                    if kind == "figure" and not "\n".join(content).strip():
                        kind = None  # an uncaptioned figure is not numbered
                    if kind == "table" and not directive["argument"].strip():
                        kind = None
                    value = number(kind, docname) if kind and (kind != "equation" or label) else ""
                    if label:
                        anchor = make_id(f"equation-{label}") if kind == "equation" else make_id(label)
                        title = directive["argument"].strip()
                        add(label, Target(docname, anchor, kind or "label", title, value))
                    if name not in ("code-cell", "eval-rst") and not name.startswith("solution") and kind != "equation":
                        self._collect_markdown("\n".join(content), docname, add, number)
                if pending:
                    add(pending, Target(docname, make_id(pending), "label"))
                    pending = None
                index = end + 1
                continue
            label = LABEL_LINE.match(line)
            if label:
                pending = label["label"]
                index += 1
                continue
            if line.strip().startswith("$$"):
                end = index
                stripped = line.strip()
                while True:
                    candidate = lines[end].strip()
                    done = end > index and candidate.startswith("$$") or candidate.endswith("$$") and end > index
                    single = end == index and len(stripped) > 2 and ("$$" in stripped[2:])
                    if done or single or end == len(lines) - 1:
                        break
                    end += 1
                closing = EQUATION_END.match(lines[end].strip())
                if closing:
                    eq_label = closing["label"]
                    add(eq_label, Target(docname, make_id(f"equation-{eq_label}"), "equation", "",
                                         number("equation", docname)))
                if pending:
                    add(pending, Target(docname, make_id(pending), "label"))
                    pending = None
                index = end + 1
                continue
            heading = HEADING.match(line)
            if pending and line.strip():
                title = heading["text"] if heading else ""
                add(pending, Target(docname, make_id(pending), "section" if heading else "label", title))
                pending = None
            index += 1

    @cached_property
    def citations(self) -> dict[str, tuple[str, str]]:
        """{bibtex key: (authors as cited, year)}: "Ioffe & Szegedy", "Santurkar et al."."""
        from pybtex.database import parse_file

        cited: dict[str, tuple[str, str]] = {}
        for bibfile in self.config.get("bibtex_bibfiles", []):
            database = parse_file(str(self.root / bibfile), bib_format="bibtex")
            for key, entry in database.entries.items():
                people = entry.persons.get("author") or entry.persons.get("editor") or []
                surnames = [" ".join(person.prelast_names + person.last_names) for person in people]
                surnames = [_strip_latex(name) for name in surnames]
                if len(surnames) == 0:
                    authors = _strip_latex(entry.fields.get("organization", key))
                elif len(surnames) == 1:
                    authors = surnames[0]
                elif len(surnames) == 2:
                    authors = f"{surnames[0]} & {surnames[1]}"
                else:
                    authors = f"{surnames[0]} et al."
                cited[key] = (authors, entry.fields.get("year", "n.d."))
        return cited

    @cached_property
    def bibliography_docname(self) -> str:
        for docname in self.docnames:
            path = self.root / f"{docname}.md"
            if path.is_file() and re.search(r"^[`:]{3,}\{bibliography\}", path.read_text(encoding="utf-8"), re.M):
                return docname
        raise ColabError("no page of the book has a {bibliography} directive to link citations to")

    @cached_property
    def times(self) -> dict[str, Any]:
        """``book/_data/chapter-times.json`` (written by ``.ci/chapter-times --write``), or {} before it exists."""
        path = self.root / TIMES_FILE
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    def chapter_seconds(self, docname: str) -> float | None:
        """How long the book build took to execute the chapter, in seconds, if it was measured."""
        seconds = self.times.get("chapters", {}).get(docname, {}).get("seconds")
        return float(seconds) if seconds is not None else None


def rounded_seconds(seconds: float) -> str:
    """A run time as a reader wants it: "20 s", "1 min 40 s" (to 10 s, so small changes do not churn the notebooks)."""
    total = max(10, int(round(seconds / 10.0)) * 10)
    minutes, rest = divmod(total, 60)
    if not minutes:
        return f"{rest} s"
    return f"{minutes} min" + (f" {rest} s" if rest else "")


def _strip_latex(text: str) -> str:
    return re.sub(r"[{}]", "", text).replace("\\", "")


def _fence_end(lines: list[str], start: int, fence: re.Match[str]) -> int:
    """The index of the line that closes the fence opened at ``start`` (the last line if it never closes)."""
    marker = fence["fence"]
    closing = re.compile(rf"^ {{0,3}}{re.escape(marker[0])}{{{len(marker)},}}\s*$")
    for index in range(start + 1, len(lines)):
        if closing.match(lines[index]):
            return index
    raise ColabError(f"unclosed {marker} fence: {lines[start]!r}")


def _split_options(body: list[str]) -> tuple[dict[str, str], list[str]]:
    """A directive's ``:key: value`` lines (or a ``---`` YAML block) and the content after them."""
    options: dict[str, str] = {}
    index = 0
    if body and body[0].strip() == "---":
        end = next((i for i in range(1, len(body)) if body[i].strip() == "---"), None)
        if end is None:
            raise ColabError(f"a directive's options block has no closing ---: {body[:3]}")
        loaded = yaml.safe_load("\n".join(body[1:end])) or {}
        options = {str(key): "" if value is None else str(value) for key, value in loaded.items()}
        index = end + 1
    else:
        while index < len(body):
            match = re.match(r"^:(?P<key>[\w-]+):\s*(?P<value>.*)$", body[index])
            if not match:
                break
            options[match["key"]] = match["value"].strip()
            index += 1
    content = body[index:]
    while content and not content[0].strip():
        content = content[1:]
    return options, content


# ----------------------------------------------------------------------------------------------------------------------
# Markdown: MyST in, Markdown and HTML that Jupyter and Colab render out
# ----------------------------------------------------------------------------------------------------------------------

ROLE = re.compile(r"\{(?P<name>[\w:.-]+)\}`(?P<body>[^`]*)`")
CODE_SPAN = re.compile(r"(?P<ticks>`+)(?P<code>.+?)(?P=ticks)")
INLINE_TOKEN = re.compile(rf"{ROLE.pattern}|{CODE_SPAN.pattern}")
EXPLICIT_TITLE = re.compile(r"^(?P<title>.*?)\s*<(?P<target>[^<>]+)>$", re.S)

ADMONITIONS = {
    "note": "Note", "tip": "Tip", "hint": "Hint", "important": "Important", "warning": "Warning", "caution": "Caution",
    "attention": "Attention", "danger": "Danger", "error": "Error", "seealso": "See also", "admonition": "",
    "margin": "", "sidebar": "", "epigraph": "", "pull-quote": "",
}
PY_ROLES = {"py:mod", "py:func", "py:class", "py:meth", "py:attr", "py:data", "py:obj", "py:exc", "mod", "func",
            "class", "meth", "attr", "data", "obj", "exc"}
CODE_LANGUAGE_DIRECTIVES = {"code-block", "code", "sourcecode"}


def _escape_markdown_text(text: str) -> str:
    return text.replace("[", "\\[").replace("]", "\\]")


@dataclass
class Converter:
    """Converts the Markdown of one chapter (``docname``) of ``book``."""

    book: Book
    docname: str
    # Code cells the Markdown turns into (literalinclude), spliced in by `generate`: (markdown before, code) pairs.
    spliced: list[str] = field(default_factory=list)

    # -- inline ----------------------------------------------------------------------------------------------------

    def inline(self, text: str) -> str:
        def replace(match: re.Match[str]) -> str:
            if match["name"] is None:
                return match.group(0)  # a code span: literal
            return self.role(match["name"], match["body"])

        return INLINE_TOKEN.sub(replace, text)

    def role(self, name: str, body: str) -> str:
        title, target = self._explicit(body)
        if name in ("cite", "cite:p", "cite:t", "cite:ps", "cite:ts", "cite:alp", "cite:year", "cite:author",
                    "cite:cts", "cite:ct", "cite:cp", "cite:cps"):
            return self.cite(name, body)
        if name in ("ref", "numref", "eq", "doc", "any"):
            return self.reference(name, title, target)
        if name in PY_ROLES:
            shown = target.lstrip("~")
            text = title or (shown.rsplit(".", 1)[-1] if target.startswith("~") else shown)
            kind = name.split(":")[-1]
            anchor = f"module-{shown}" if kind == "mod" else shown
            return f"[`{text}`]({self.book.page_url(self._api_docname(), anchor)})"
        if name in ("math", "m"):
            return f"${body}$"
        if name in ("code", "literal", "samp", "file", "kbd", "command", "program", "envvar", "option"):
            return f"`{body}`"
        if name in ("sub", "subscript"):
            return f"<sub>{body}</sub>"
        if name in ("sup", "superscript"):
            return f"<sup>{body}</sup>"
        if name == "abbr":
            return title or body
        if name in ("glue", "glue:text", "glue:any", "glue:", "glue:md"):
            # The value is printed by the code cell that glues it (BNNOTES_SHOW_GLUE=1 in the setup cell).
            key = body.split(":", 1)[0].strip()
            return f"`{key}`"
        raise ColabError(f"{self.docname}.md: the Colab edition does not know the role {{{name}}}`{body}`")

    @staticmethod
    def _explicit(body: str) -> tuple[str, str]:
        match = EXPLICIT_TITLE.match(body.strip())
        if match and match["title"]:
            return match["title"], match["target"].strip()
        return "", body.strip()

    def _api_docname(self) -> str:
        for docname in self.book.docnames:
            if docname.endswith("/api") or docname == "api":
                return docname
        raise ColabError("a {py:...} role needs the API page (book/api.md) in _toc.yml")

    def cite(self, name: str, body: str) -> str:
        keys = [key.strip() for key in body.split(",") if key.strip()]
        unknown = [key for key in keys if key not in self.book.citations]
        if unknown:
            raise ColabError(f"{self.docname}.md: {{{name}}} cites {unknown}, which references.bib does not have")
        parts = []
        for key in keys:
            authors, year = self.book.citations[key]
            url = self.book.page_url(self.book.bibliography_docname, make_id(f"cite-{key}"))
            if name in ("cite:t", "cite:ts", "cite:ct", "cite:cts"):
                parts.append(f"[{authors} ({year})]({url})")
            elif name == "cite:year":
                parts.append(f"[{year}]({url})")
            elif name == "cite:author":
                parts.append(f"[{authors}]({url})")
            else:
                parts.append(f"[{authors}, {year}]({url})")
        if name in ("cite", "cite:p", "cite:ps", "cite:cp", "cite:cps"):
            return "(" + "; ".join(parts) + ")"
        return ", ".join(parts)

    def reference(self, name: str, title: str, label: str) -> str:
        if name == "doc":
            docname = _resolve_docname(self.docname, label)
            if docname not in self.book.docnames:
                raise ColabError(f"{self.docname}.md: {{doc}}`{label}` names no page of _toc.yml")
            return f"[{self.inline(title) if title else self.book.title(docname)}]({self.book.page_url(docname)})"
        target = self.book.targets.get(label)
        if target is None:
            raise ColabError(f"{self.docname}.md: {{{name}}} names the label {label!r}, which no page defines")
        url = self.book.page_url(target.docname, target.anchor)
        if name == "eq":
            if not target.number:
                raise ColabError(f"{self.docname}.md: {{eq}}`{label}` is not a numbered equation")
            return f"[({target.number})]({url})"
        if name == "numref":
            if not target.number:
                raise ColabError(f"{self.docname}.md: {{numref}}`{label}` points at something without a number")
            template = title or self.book.numfig_format.get(target.kind, "%s")
            text = template.replace("{number}", target.number).replace("%s", target.number)
            text = text.replace("{name}", target.title)
            return f"[{self.inline(text)}]({url})"
        if title:
            return f"[{self.inline(title)}]({url})"
        if target.kind == "section" or target.title:
            return f"[{self.plain_title(target.title)}]({url})"
        if target.kind == "label" and target.anchor == make_id(target.docname.rsplit("/", 1)[-1]):
            return f"[{self.book.title(target.docname)}]({url})"
        raise ColabError(
            f"{self.docname}.md: {{ref}}`{label}` points at a label without a title: write {{ref}}`text <{label}>`"
        )

    def plain_title(self, title: str) -> str:
        """A heading's text as link text: roles rendered, but links flattened (no link inside a link)."""
        rendered = self.inline(title)
        return re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", rendered)

    # -- blocks ----------------------------------------------------------------------------------------------------

    def markdown(self, source: str) -> str:
        """A Markdown cell of the chapter, converted."""
        lines = source.splitlines()
        out: list[str] = []
        index = 0
        while index < len(lines):
            line = lines[index]
            fence = FENCE.match(line)
            if fence:
                end = _fence_end(lines, index, fence)
                info = fence["info"].strip()
                directive = DIRECTIVE_INFO.match(info)
                if directive:
                    out.extend(self.directive(directive["name"], directive["argument"].strip(), lines[index + 1 : end]))
                elif fence["fence"].startswith(":"):
                    raise ColabError(f"{self.docname}.md: a ::: fence without a directive name: {line!r}")
                else:
                    out.extend(lines[index : end + 1])  # a plain code block: verbatim
                index = end + 1
                continue
            if LABEL_LINE.match(line):
                index += 1
                continue
            if re.match(r"^%", line):  # a MyST comment
                index += 1
                continue
            if line.strip() == "+++" or line.strip().startswith("+++ {"):
                raise ColabError(f"{self.docname}.md: a cell break +++ inside a Markdown cell: {line!r}")
            if line.strip().startswith("$$"):
                end = index
                while True:
                    candidate = lines[end].strip()
                    single = end == index and len(candidate) > 2 and "$$" in candidate[2:]
                    if (end > index and "$$" in candidate) or single or end == len(lines) - 1:
                        break
                    end += 1
                out.extend(self.display_math(lines[index : end + 1]))
                index = end + 1
                continue
            if re.match(r"^:\s", line) and index > 0 and lines[index - 1].strip():
                raise ColabError(f"{self.docname}.md: definition lists do not render in Colab: {line!r}")
            if re.search(r"\[\^[\w-]+\]", line):
                raise ColabError(f"{self.docname}.md: footnotes do not render in Colab: {line!r}")
            if re.search(r"\{\{\s*[\w.-]+\s*\}\}", line):
                raise ColabError(f"{self.docname}.md: MyST substitutions do not render in Colab: {line!r}")
            out.append(self.inline(line))
            index += 1
        text = "\n".join(out)
        return re.sub(r"\n{3,}", "\n\n", text).strip("\n")

    def display_math(self, block: list[str]) -> list[str]:
        last = block[-1].strip()
        closing = EQUATION_END.match(last)
        if not closing:
            return block
        label = closing["label"]
        target = self.book.targets.get(label)
        if target is None or not target.number:
            raise ColabError(f"{self.docname}.md: equation {label!r} has no number")
        body = block[:-1] + ([closing["body"]] if closing["body"].strip() else [])
        if len(block) == 1:  # $$ x $$ (label) on one line
            inner = re.match(r"^\s*\$\$(?P<math>.*)\$\$\s*\(", block[0])
            return [f"$$ {inner['math'].strip()} \\tag{{{target.number}}} $$"]
        return body + [f"\\tag{{{target.number}}}", "$$"]

    def directive(self, name: str, argument: str, body: list[str]) -> list[str]:
        options, content = _split_options(body)
        text = "\n".join(content)
        if name in ADMONITIONS:
            title = self.inline(argument) if argument else ADMONITIONS[name]
            inner = self.markdown(text)
            if "dropdown" in options.get("class", "").split():
                return self.details(title or "Details", inner)
            quoted = [f"> **{title}.**" if title else ">", ">"] if title else []
            quoted += [f"> {line}".rstrip() for line in inner.splitlines()]
            return ["", *quoted, ""]
        if name in ("dropdown", "toggle"):
            return self.details(self.inline(argument) or "Details", self.markdown(text))
        if name in ("figure", "image"):
            return self.figure(name, argument, options, text)
        if name in ("table", "list-table"):
            return self.table(name, argument, options, content)
        if name == "math":
            label = options.get("label") or options.get("name")
            tag = ""
            if label:
                target = self.book.targets[label]
                tag = f" \\tag{{{target.number}}}"
            return ["$$", text.strip() + tag, "$$"]
        if name in CODE_LANGUAGE_DIRECTIVES:
            caption = options.get("caption")
            fence = "````" if "```" in text else "```"
            lines = [f"*{self.inline(caption)}*", ""] if caption else []
            return [*lines, f"{fence}{argument}", *content, fence]
        if name == "literalinclude":
            return self.literalinclude(argument, options)
        if name == "epigraph":
            return [f"> {line}" for line in self.markdown(text).splitlines()]
        if name in ("exercise-start", "exercise-end", "solution-start", "solution-end", "exercise", "solution"):
            raise ColabError(f"{self.docname}.md: the {{{name}}} directive must open its own Markdown cell")
        raise ColabError(f"{self.docname}.md: the Colab edition does not know the directive {{{name}}}")

    @staticmethod
    def details(title: str, inner: str) -> list[str]:
        return ["", "<details>", f"<summary>{title}</summary>", "", inner, "", "</details>", ""]

    def figure(self, name: str, argument: str, options: dict[str, str], text: str) -> list[str]:
        if re.match(r"^https?://", argument):
            url = argument
        else:
            path = (self.book.root / self.docname).parent / argument
            url = self.book.raw_url(path.resolve().relative_to(self.book.root.resolve()).as_posix())
        alt = options.get("alt", "")
        width = options.get("width", "")
        image = f'<img src="{url}" alt="{alt}"' + (f' width="{width}"' if width else "") + ">"
        lines = ["", image, ""]
        if name == "figure" and text.strip():
            label = options.get("name")
            number = self.book.targets[label].number if label and label in self.book.targets else ""
            prefix = self.book.numfig_format["figure"].replace("%s", number) + ": " if number else ""
            lines += [f"*{prefix}{self.markdown(text)}*", ""]
        return lines

    def table(self, name: str, argument: str, options: dict[str, str], content: list[str]) -> list[str]:
        label = options.get("name")
        number = self.book.targets[label].number if label and label in self.book.targets else ""
        lines: list[str] = []
        if argument:
            prefix = self.book.numfig_format["table"].replace("%s", number) + ": " if number else ""
            lines += ["", f"**{prefix}{self.inline(argument)}**", ""]
        if name == "table":
            return lines + self.markdown("\n".join(content)).splitlines()
        rows: list[list[str]] = []
        for line in content:
            if re.match(r"^\*\s+-\s", line) or re.match(r"^\*\s+-$", line):
                rows.append([line.split("-", 1)[1].strip()])
            elif re.match(r"^\s+-\s", line) and rows:
                rows[-1].append(line.strip()[1:].strip())
            elif line.strip() and rows:
                rows[-1][-1] += " " + line.strip()
        if not rows:
            raise ColabError(f"{self.docname}.md: an empty list-table")
        header_rows = int(options.get("header-rows", "0") or 0)
        head = rows[0] if header_rows else [""] * len(rows[0])
        body = rows[1:] if header_rows else rows
        render = lambda row: "| " + " | ".join(self.inline(cell) for cell in row) + " |"  # noqa: E731
        return lines + [render(head), "| " + " | ".join("---" for _ in head) + " |", *map(render, body), ""]

    def literalinclude(self, argument: str, options: dict[str, str]) -> list[str]:
        path = ((self.book.root / self.docname).parent / argument).resolve()
        try:
            relative = path.relative_to(self.book.root.resolve())
        except ValueError as error:
            message = f"{self.docname}.md: literalinclude of a file outside the repository: {argument}"
            raise ColabError(message) from error
        unsupported = set(options) - {"pyobject", "language", "caption", "name", "dedent", "linenos"}
        if unsupported:
            raise ColabError(f"{self.docname}.md: literalinclude option(s) {sorted(unsupported)} are not supported")
        if relative.suffix != ".py" or relative.parts[0] != "bnnotes":
            raise ColabError(f"{self.docname}.md: literalinclude shows bnnotes' source; got {relative}")
        module = ".".join(relative.with_suffix("").parts)
        if module.endswith(".__init__"):
            module = module[: -len(".__init__")]
        pyobject = options.get("pyobject", "")
        call = f"show_source({module!r}, {pyobject!r})" if pyobject else f"show_source({module!r})"
        self.spliced.append(f"from bnnotes.notebook import show_source\n\n{call}")
        return [SPLICE_MARK]


SPLICE_MARK = "\x00splice\x00"


def _resolve_docname(current: str, target: str) -> str:
    target = target.removesuffix(".md").removesuffix(".ipynb")
    if target.startswith("/"):
        return target.lstrip("/")
    base = current.rsplit("/", 1)[0] if "/" in current else ""
    parts = (base.split("/") if base else []) + target.split("/")
    resolved: list[str] = []
    for part in parts:
        if part == "..":
            if resolved:
                resolved.pop()
        elif part not in ("", "."):
            resolved.append(part)
    return "/".join(resolved)


# ----------------------------------------------------------------------------------------------------------------------
# Exercises: solution cells become stubs
# ----------------------------------------------------------------------------------------------------------------------


def hint_of(docstring: str | None, name: str) -> str:
    """The "Hint: ..." text of a solution function's docstring (up to the end of its paragraph)."""
    match = re.search(r"Hint:\s*(?P<hint>.+?)(?:\n\s*\n|$)", docstring or "", re.S)
    if not match:
        raise ColabError(
            f"the solution function {name}() needs a docstring with a 'Hint:' sentence: the Colab stub raises "
            "NotImplementedError with it"
        )
    return " ".join(match["hint"].split())


def stub(source: str) -> str:
    """The learner's version of a solution cell: signatures, docstrings and hints; no solution.

    >>> print(stub('def f(x):\\n    \"\"\"Double x. Hint: add it to itself.\"\"\"\\n    return 2 * x\\n\\nk = 3'))
    def f(x):
        \"\"\"Double x. Hint: add it to itself.\"\"\"
        raise NotImplementedError('Hint: add it to itself.')
    <BLANKLINE>
    <BLANKLINE>
    k = None
    """
    tree = ast.parse(source)
    lines = source.splitlines()
    pieces: list[str] = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            docstring = ast.get_docstring(node, clean=False)
            hint = hint_of(ast.get_docstring(node), node.name)
            first_body = node.body[0]
            start = min([node.lineno] + [decorator.lineno for decorator in node.decorator_list]) - 1
            if docstring is None:
                raise ColabError(f"the solution function {node.name}() needs a docstring")
            header = lines[start : first_body.end_lineno]  # signature and docstring
            indent = re.match(r"^\s*", lines[first_body.lineno - 1])[0]
            pieces.append("\n".join(header + [f"{indent}raise NotImplementedError({('Hint: ' + hint)!r})"]))
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if not all(isinstance(target, ast.Name) for target in targets):
                raise ColabError(f"a solution cell may assign only plain names (line {node.lineno}): "
                                 f"{ast.get_source_segment(source, node)!r}")
            names = " = ".join(target.id for target in targets)  # type: ignore[attr-defined]
            pieces.append(f"{names} = None")
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            pieces.append(ast.get_source_segment(source, node) or "")
        else:
            raise ColabError(
                "a solution cell may hold only functions, NAME = value assignments and imports (the Colab stub keeps "
                f"their names); line {node.lineno} is {type(node).__name__}: "
                f"{ast.get_source_segment(source, node)!r:.80}"
            )
    return "\n\n\n".join(pieces)


STUB_HEADER = (
    "# Your turn: replace each `raise NotImplementedError(...)` (and each `None`) with your answer,\n"
    "# then run the checker cell below."
)


# ----------------------------------------------------------------------------------------------------------------------
# The notebook
# ----------------------------------------------------------------------------------------------------------------------

GATE = re.compile(
    r"^\s*(?P<fence>`{3,}|:{3,})\{(?P<name>exercise-start|exercise-end|solution-start|solution-end)\}(?P<argument>.*)$"
)


def setup_cell(book: Book) -> str:
    return f'''# Set-up of the Colab edition. On Colab: install bnnotes from the course repository
# (branch {book.branch}), keeping Colab's own torch. Everywhere: print the numbers the text refers to, and show
# progress in long cells.
import os
import subprocess
import sys

os.environ["BNNOTES_SHOW_GLUE"] = "1"
os.environ["BNNOTES_PROGRESS"] = "1"
if "google.colab" in sys.modules:
    from importlib import metadata

    REPOSITORY = "{book.repository_url}"
    BRANCH = "{book.branch}"
    with open("/tmp/bnnotes-keep-torch.txt", "w") as constraints:  # pip may not replace Colab's torch
        try:
            constraints.write(f"torch=={{metadata.version('torch')}}\\n")
        except metadata.PackageNotFoundError:  # no torch yet: pip installs one
            pass
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "-c", constraints.name,
         f"bnnotes @ git+{{REPOSITORY}}@{{BRANCH}}"],
        capture_output=True,
        text=True,
    )
    if install.returncode != 0:
        said = install.stderr.strip()
        reasons = [line.strip() for line in said.splitlines() if line.strip().startswith(("fatal:", "ERROR:"))]
        raise RuntimeError(
            f"Could not install bnnotes from {{REPOSITORY}} (branch {{BRANCH}}). Is the runtime online, and does the "
            f"repository exist? pip said:\\n" + ("\\n".join(reasons) or said[-1500:])
        )'''


def header_cell(book: Book, docname: str) -> str:
    seconds = book.chapter_seconds(docname)
    if seconds:
        run_time = (f"It runs in about {rounded_seconds(seconds)} on CPU ({book.times.get('machine', 'two cores')}, "
                    "measured when the book was built), and uses a GPU when the runtime has one.")
    else:
        run_time = "Its run time on CPU has not been measured yet (`.ci/chapter-times --write`)."
    title = Converter(book, docname).plain_title(book.title(docname))
    return (
        f"*Colab edition of the chapter **{title}** of the course "
        f"[{book.config.get('title', 'the book')}]({book.book_url}). "
        f"The [chapter's page in the book]({book.page_url(docname)}) has the same text, code and figures, with the "
        f"worked solutions of the exercises.* {run_time}\n\n"
        "Run the cells in order (*Runtime → Run all* works): the first one installs `bnnotes`. Numbers that the text "
        "names in `code font` are printed by the cell that computes them. In the exercises, write your answer in place "
        "of the `NotImplementedError`, then run the checker cell below it.\n\n"
        f"<small>Generated from `{docname}.md` by `book/_ext/colab.py`; do not edit this notebook, edit the chapter."
        "</small>"
    )


def _figure_caption(book: Book, converter: Converter, metadata: dict[str, Any]) -> str | None:
    figure = metadata.get("mystnb", {}).get("figure", {})
    caption = (figure.get("caption") or "").strip()
    if not caption:
        return None
    name = figure.get("name")
    number = book.targets[name].number if name and name in book.targets else ""
    prefix = book.numfig_format["figure"].replace("%s", number) if number else "Figure"
    anchor = f'<a id="{make_id(name)}"></a>' if name else ""
    return f"{anchor}**{prefix}.** {converter.markdown(caption)}"


def generate(source: Path, book: Book | None = None) -> nbformat.NotebookNode:
    """The Colab edition of the chapter ``source`` (a ``book/<chapter>.md``)."""
    import jupytext

    book = book or Book()
    source = Path(source)
    docname = source.resolve().relative_to(book.root.resolve()).with_suffix("").as_posix()
    chapter = jupytext.read(source)
    converter = Converter(book, docname)
    cells: list[nbformat.NotebookNode] = [nbformat.v4.new_markdown_cell(header_cell(book, docname))]

    code_cells = [cell for cell in chapter.cells if cell.cell_type == "code"]
    if not code_cells or "google.colab" not in code_cells[0].source:
        raise ColabError(f"{source.name}: the first code cell must be the Colab install (guarded on google.colab)")
    install = code_cells[0]

    state = "text"  # "exercise" (the statement), "solution", "text"
    title_markdown: list[str] = []
    for cell in chapter.cells:
        if cell is install:
            cells.append(nbformat.v4.new_code_cell(setup_cell(book)))
            continue
        if cell.cell_type == "code":
            if state == "solution":
                cells.append(nbformat.v4.new_code_cell(STUB_HEADER + "\n" + stub(cell.source)))
                continue
            tags = [tag for tag in cell.metadata.get("tags", []) if tag in ("hide-input", "hide-output", "hide-cell")]
            new = nbformat.v4.new_code_cell(cell.source)
            if tags:
                new.metadata["tags"] = tags
            cells.append(new)
            caption = _figure_caption(book, converter, cell.metadata)
            if caption:
                cells.append(nbformat.v4.new_markdown_cell(caption))
            continue
        # A Markdown cell: split it at the exercise and solution gates.
        text_lines: list[str] = []
        lines = cell.source.splitlines()
        index = 0

        def flush() -> None:
            if state == "solution":
                text_lines.clear()  # the solution's prose is for the book only
                return
            block = "\n".join(text_lines).strip()
            text_lines.clear()
            if not block:
                return
            converted = converter.markdown(block)
            pieces = converted.split(SPLICE_MARK)
            for number, piece in enumerate(pieces):
                if piece.strip():
                    cells.append(nbformat.v4.new_markdown_cell(piece.strip("\n")))
                if number < len(pieces) - 1:
                    cells.append(nbformat.v4.new_code_cell(converter.spliced.pop(0)))

        while index < len(lines):
            gate = GATE.match(lines[index])
            if not gate:
                text_lines.append(lines[index])
                index += 1
                continue
            end = _fence_end(lines, index, FENCE.match(lines[index].lstrip()))
            options, _ = _split_options(lines[index + 1 : end])
            flush()
            name = gate["name"]
            if name == "exercise-start":
                label = options.get("label", "")
                target = book.targets.get(label)
                if target is None:
                    raise ColabError(f"{source.name}: an exercise-start without a :label: (ex-<chapter>-<slug>)")
                heading = book.numfig_format["exercise"].replace("%s", target.number)
                argument = gate["argument"].strip()
                title_markdown = [f'<a id="{target.anchor}"></a>', f"#### {heading}" + (
                    f" ({converter.inline(argument)})" if argument else "")]
                cells.append(nbformat.v4.new_markdown_cell("\n".join(title_markdown)))
                state = "exercise"
            elif name == "exercise-end":
                state = "text"
            elif name == "solution-start":
                state = "solution"
            elif name == "solution-end":
                state = "text"
            index = end + 1
        flush()
    # Merge consecutive Markdown cells produced by the splitting (e.g. the exercise heading and its statement).
    merged: list[nbformat.NotebookNode] = []
    for new in cells:
        if merged and new.cell_type == "markdown" and merged[-1].cell_type == "markdown" and (
            merged[-1].source.startswith('<a id="') and merged[-1].source.count("\n") == 1
        ):
            merged[-1].source += "\n\n" + new.source
        else:
            merged.append(new)
    notebook = nbformat.v4.new_notebook(cells=merged)
    notebook.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
        "colab": {"provenance": [], "toc_visible": True},
    }
    for cell in notebook.cells:
        cell.pop("id", None)
    return notebook


def write_notebook(source: Path, book: Book | None = None) -> Path:
    """Generate the Colab edition of ``source`` and write it beside it as ``.ipynb``; returns that path."""
    notebook = generate(source, book)
    target = Path(source).with_suffix(".ipynb")
    target.write_text(dumps(notebook), encoding="utf-8")
    return target


def dumps(notebook: nbformat.NotebookNode) -> str:
    """The committed form: nbformat 4.5 without cell ids (stable diffs), one-space JSON indent, a final newline."""
    notebook = nbformat.from_dict(json.loads(json.dumps(notebook)))
    notebook.nbformat, notebook.nbformat_minor = 4, 4
    return json.dumps(notebook, indent=1, ensure_ascii=False, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Write the Colab edition (book/<chapter>.ipynb) of chapters.")
    parser.add_argument("sources", nargs="*", type=Path, help="chapter .md files (default: every chapter of _toc.yml)")
    args = parser.parse_args(argv)
    book = Book()
    sources = args.sources or book.chapters()
    for source in sources:
        if source.suffix != ".md":
            parser.error(f"expected a chapter's .md source, got {source}")
        target = write_notebook(source.resolve(), book)
        print(f"sync-notebooks: {target.relative_to(book.root)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
