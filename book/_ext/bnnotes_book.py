"""The book's own Sphinx extension: offline MathJax, the generated API reference and the generated exercises page.

Loaded by ``_config.yml`` (``sphinx.local_extensions``), so ``jupyter-book build .`` alone does everything:

- **Offline math.** ``mathjax_path`` points at a MathJax 3 served from the book's ``_static/mathjax/``, copied at build time
  from the ``django-static-mathjax`` wheel (MathJax 3.2.2), never at Sphinx's default CDN URL.
- **API reference.** ``.. bnnotes-api::`` (inside an ``{eval-rst}`` block) documents every public module of the installed
  ``bnnotes`` package, found by walking the package, in a curated order. A new module appears without editing the page;
  a module that fails to import fails the build, as autodoc reports it.
  bnnotes' plain-text docstrings ("x: (N, C, *spatial)") are escaped so reST does not read them as markup.
- **Exercises page.** ``{bnnotes-exercises}`` is replaced, when the page is written, by a list of every ``ex-...``
  label in the chapters (sphinx-exercise's ``:label:``, titled by the exercise's title), grouped by chapter in the
  table-of-contents order, then by kind (the title's prefix: ``Predict:``, ``Derive:``, ``Implement:``, ``Explore:``),
  and linked. A title without a kind is a warning (an error under ``-W``). It is recomputed on every build, so it
  cannot go stale.
- **Chapter run times.** ``{bnnotes-chapter-times}`` is a table of the chapters (table-of-contents order) with the
  seconds the book build took to execute each, from ``book/_data/chapter-times.json`` (``.ci/chapter-times --write``),
  and a link that opens each chapter's Colab edition. The page is rebuilt when the file changes.
- **Colab.** A chapter page whose ``.md`` has no ``.ipynb`` twin beside it is a warning (so an error under ``-W``): the
  theme's Colab button opens the twin, and Colab cannot open Markdown.
- **No remote scripts.** sphinx-thebe's loader (thebe is off) is dropped from every page.
- **Bibliography.** ``bibtex_default_style: bnnotes`` is pybtex's "plain" with titles in the case references.bib gives.

Bump ``env_version`` in ``setup`` when a change here must invalidate Sphinx's cached environment.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import re
import shutil
from pathlib import Path
from typing import Any

from docutils import nodes
from docutils.parsers.rst import directives
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------------------
# Offline MathJax
# ----------------------------------------------------------------------------------------------------------------------

MATHJAX_PATH = "mathjax/tex-chtml.js"  # relative, so Sphinx serves it from the book's _static/
# What tex-chtml.js loads at run time, relative to its own folder: TeX packages loaded on demand (\boldsymbol, \cancel...),
# the CommonHTML fonts, and the menu's accessibility tools.
MATHJAX_FILES = ["tex-chtml.js", "input", "output/chtml/fonts/woff-v2", "ui", "a11y", "sre"]


def mathjax_source() -> Path:
    """The es5 folder of the MathJax that the django-static-mathjax wheel installs as the ``mathjax`` package."""
    spec = importlib.util.find_spec("mathjax")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the book serves MathJax locally from the 'django-static-mathjax' package, which is not installed: "
            "pip install -e '.[book]'"
        )
    es5 = Path(next(iter(spec.submodule_search_locations))) / "static" / "mathjax" / "es5"
    if not (es5 / "tex-chtml.js").is_file():
        raise RuntimeError(f"expected MathJax's tex-chtml.js under {es5}, found none")
    return es5


def set_mathjax_path(app: Sphinx, config: Any) -> None:
    config.mathjax_path = MATHJAX_PATH


def copy_mathjax(app: Sphinx) -> None:
    if app.builder.format != "html":
        return
    source = mathjax_source()
    target = Path(app.outdir) / "_static" / "mathjax"
    for relative in MATHJAX_FILES:
        src, dst = source / relative, target / relative
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True)
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)


def strip_thebe(app: Sphinx, pagename: str, templatename: str, context: dict[str, Any], doctree: Any) -> None:
    """Drop sphinx-thebe's scripts: thebe is off (``launch_buttons.thebe: false``), and its loader names a CDN URL."""

    def is_thebe(asset: Any) -> bool:
        text = f"{getattr(asset, 'filename', '') or ''} {(getattr(asset, 'attributes', {}) or {}).get('body', '')}"
        return "thebe" in text.lower()

    for key in ("script_files", "css_files"):
        if key in context:
            context[key] = [asset for asset in context[key] if not is_thebe(asset)]


# ----------------------------------------------------------------------------------------------------------------------
# Colab: the launch button opens the chapter's output-free .ipynb twin
# ----------------------------------------------------------------------------------------------------------------------


def depend_on_notebook_twin(app: Sphinx, doctree: nodes.document) -> None:
    """Make a Markdown notebook's page depend on its .ipynb twin, so the page (and its Colab link) is rebuilt when the
    twin appears or changes; a missing twin keeps the page outdated, and so keeps the warning below coming."""
    source = Path(app.env.doc2path(app.env.docname))
    if source.suffix == ".md" and re.search(r"^kernelspec:", source.read_text(encoding="utf-8"), re.M):
        app.env.note_dependency(str(source.with_suffix(".ipynb")))


def check_colab_notebook(app: Sphinx, pagename: str, templatename: str, context: dict[str, Any], doctree: Any) -> None:
    """sphinx-book-theme links Colab to ``<page>.ipynb`` when that file sits beside the ``.md`` source, else to the ``.md``,
    which Colab cannot open. Warn (an error under ``-W``) when a notebook page has no ``.ipynb`` twin."""
    if doctree is None or "kernelspec" not in app.env.metadata.get(pagename, {}):
        return
    source = Path(app.env.doc2path(pagename))
    if source.suffix != ".ipynb" and not source.with_suffix(".ipynb").is_file():
        logger.warning(
            f"{source.name} has no output-free {source.with_suffix('.ipynb').name} beside it, so its Colab button "
            "would open the .md, which Colab cannot read: run .ci/sync-notebooks",
            location=pagename,
        )
        return
    for group in context.get("header_buttons", []):
        for button in group.get("buttons", []) if isinstance(group, dict) else []:
            url = button.get("url", "") if isinstance(button, dict) else ""
            if "colab" in url and not url.endswith(".ipynb"):
                logger.warning(f"the Colab button of {pagename} points at {url}, not at an .ipynb", location=pagename)


# ----------------------------------------------------------------------------------------------------------------------
# API reference
# ----------------------------------------------------------------------------------------------------------------------

# The reading order of the reference: the math, then the experiments, then the book's helpers. Modules that do not exist
# (yet) are skipped; modules found in the package but not listed here are appended in alphabetical order.
API_ORDER = [
    "bnnotes",
    "bnnotes.numpy_bn",
    "bnnotes.torch_bn",
    "bnnotes.conventions",
    "bnnotes.folding",
    "bnnotes.renorm",
    "bnnotes.sync",
    "bnnotes.ghost",
    "bnnotes.lp_norm",
    "bnnotes.numpy_norms",
    "bnnotes.numpy_variants",
    "bnnotes.variants",
    "bnnotes.convert",
    "bnnotes.experiments",
    "bnnotes.experiments.data",
    "bnnotes.experiments.models",
    "bnnotes.experiments.training",
    "bnnotes.experiments.stats",
    "bnnotes.experiments.launch",
    "bnnotes.experiments.ablations",
    "bnnotes.experiments.motivation",
    "bnnotes.experiments.motivation.at_init",
    "bnnotes.experiments.motivation.figure1",
    "bnnotes.experiments.motivation.sweeps",
    "bnnotes.experiments.derivation",
    "bnnotes.experiments.inference",
    "bnnotes.experiments.pitfalls",
    "bnnotes.experiments.data_parallel",
    "bnnotes.experiments.landscape",
    "bnnotes.experiments.real_networks",
    "bnnotes.exercises",
    "bnnotes.notebook",
    "bnnotes.plotting",
    "bnnotes.timing",
    "bnnotes.bench",
]


def discover_modules(package: str) -> list[str]:
    """Every public module of ``package`` (not ``_private`` ones, not ``__main__``), in API_ORDER, then alphabetically."""
    root = importlib.import_module(package)
    found = {package}
    # A subpackage that fails to import is still listed (onerror swallows the error here); its automodule then reports
    # the import error as a warning, which fails the strict build.
    for info in pkgutil.walk_packages(root.__path__, prefix=f"{package}.", onerror=lambda name: None):
        if any(part.startswith("_") for part in info.name.split(".")):
            continue
        found.add(info.name)
    ordered = [name for name in API_ORDER if name in found]
    return ordered + sorted(found - set(ordered))


class ApiDirective(SphinxDirective):
    """``.. bnnotes-api::`` — one section per public bnnotes module, each an ``automodule`` with its members.

    Options: ``:package:`` (default ``bnnotes``), ``:exclude:`` (space-separated module names to leave out).
    """

    has_content = False
    option_spec = {"package": directives.unchanged, "exclude": directives.unchanged}

    def run(self) -> list[nodes.Node]:
        package = self.options.get("package", "bnnotes")
        excluded = set(self.options.get("exclude", "").split())
        sections: list[nodes.Node] = []
        try:
            module_names = discover_modules(package)
        except Exception as error:  # noqa: BLE001 (any import-time failure of the package is reported the same way)
            logger.warning(f"bnnotes-api: cannot import {package}: {error!r}", location=(self.env.docname, self.lineno))
            return []
        for module_name in module_names:
            if module_name in excluded:
                continue
            section = nodes.section(ids=[nodes.make_id(f"api-{module_name}")], names=[f"api-{module_name}"])
            section += nodes.title("", "", nodes.literal(module_name, module_name))
            self.state.document.note_implicit_target(section, section)
            rst = StringList()
            for line in (f".. automodule:: {module_name}", "   :members:", "   :show-inheritance:", ""):
                rst.append(line, "<bnnotes-api>")
            nested_parse_with_titles(self.state, rst, section)
            sections.append(section)
        return sections


# bnnotes' docstrings are plain text with a little markup (``literal``, `name`, ``::`` blocks, doctests), as STYLE.md
# shows: "x: (N, C) or (N, C, *spatial)". In reStructuredText a "*" or "|" that opens a word starts emphasis or a
# substitution, and "word_" is a link, so those characters are escaped before autodoc parses the docstring. Literal
# blocks, doctest blocks and inline literals are left alone; a balanced **strong** stays strong.
_INLINE_LITERAL = re.compile(r"(:[\w:.-]+:)?``.+?``|(:[\w:.-]+:)?`[^`]+`")
_STRONG = re.compile(r"\*\*(?=\S)[^*]*?(?<=\S)\*\*")
_OPENER = re.compile(r"(?<!\\)([*|])(?=\S)")
_LINK_UNDERSCORE = re.compile(r"(?<=[\w)])_(?=[\s.,;:)]|$)")


def _escape_text(text: str) -> str:
    strong_spans: list[str] = []

    def keep_strong(match: re.Match[str]) -> str:
        strong_spans.append(match.group(0))
        return f"\x00{len(strong_spans) - 1}\x00"

    text = _STRONG.sub(keep_strong, text)
    text = _OPENER.sub(r"\\\1", text)
    text = _LINK_UNDERSCORE.sub(r"\\_", text)
    return re.sub(r"\x00(\d+)\x00", lambda m: strong_spans[int(m.group(1))], text)


def _escape_line(line: str) -> str:
    pieces, last = [], 0
    for match in _INLINE_LITERAL.finditer(line):
        pieces.append(_escape_text(line[last : match.start()]))
        # reST needs a space or punctuation around inline markup: "`Result`s" becomes "`Result`\ s" (rendered "Results")
        before = "\\ " if match.start() > 0 and line[match.start() - 1].isalnum() else ""
        after = "\\ " if match.end() < len(line) and line[match.end()].isalnum() else ""
        pieces.append(before + match.group(0) + after)
        last = match.end()
    pieces.append(_escape_text(line[last:]))
    return "".join(pieces)


def escape_docstring(lines: list[str]) -> list[str]:
    """Escape reST inline markup in plain-text docstring lines, outside literal and doctest blocks."""
    escaped: list[str] = []
    literal_indent: int | None = None  # inside a ``::`` literal block: the indentation of the paragraph that opened it
    in_doctest = False
    for line in lines:
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if literal_indent is not None:
            if not stripped or indent > literal_indent:
                escaped.append(line)
                continue
            literal_indent = None
        if in_doctest:
            if stripped:
                escaped.append(line)
                continue
            in_doctest = False
        if stripped.startswith(">>>"):
            in_doctest = True
            escaped.append(line)
            continue
        if stripped.startswith(".. "):  # a directive or comment written on purpose
            escaped.append(line)
        else:
            escaped.append(_escape_line(line))
        if stripped.endswith("::"):
            literal_indent = indent
    return escaped


def process_docstring(app: Sphinx, what: str, name: str, obj: Any, options: Any, lines: list[str]) -> None:
    if name.startswith("bnnotes"):
        lines[:] = escape_docstring(lines)


# ----------------------------------------------------------------------------------------------------------------------
# Bibliography style
# ----------------------------------------------------------------------------------------------------------------------


def register_bibliography_style() -> None:
    """``bibtex_default_style: bnnotes``: pybtex's "plain" (sorted by author, year, title; numbered), except that titles
    keep the case references.bib gives them; "plain" lower-cases them ("Batch normalization: accelerating ...")."""
    from pybtex.plugin import register_plugin
    from pybtex.style.formatting.plain import Style as PlainStyle
    from pybtex.style.template import field, sentence

    class TitleCaseStyle(PlainStyle):
        def format_title(self, e: Any, which_field: str, as_sentence: bool = True) -> Any:
            title = field(which_field)
            return sentence[title] if as_sentence else title

    register_plugin("pybtex.style.formatting", "bnnotes", TitleCaseStyle)


# ----------------------------------------------------------------------------------------------------------------------
# Exercises page
# ----------------------------------------------------------------------------------------------------------------------

EXERCISE_LABEL = re.compile(r"^ex-[a-z0-9][a-z0-9_-]*$")
# The four kinds of exercise, in the order the page lists them (issue 15): a title starts with one, "Derive: m/(m-1)".
EXERCISE_KINDS = ("Predict", "Derive", "Implement", "Explore")
UNKINDED = "Other"  # the group of titles without a kind; the build warns about each
_KIND_PREFIX = re.compile(rf"^(?P<kind>{'|'.join(EXERCISE_KINDS)}):\s*(?P<rest>\S.*)$", re.S)


def split_kind(title: str) -> tuple[str | None, str]:
    """Split an exercise title into its kind and the rest; a title without a kind prefix gives (None, title).

    >>> split_kind("Derive: Bessel's correction")
    ('Derive', "Bessel's correction")
    >>> split_kind("Whiten a batch")
    (None, 'Whiten a batch')
    """
    match = _KIND_PREFIX.match(title.strip())
    return (match["kind"], match["rest"].strip()) if match else (None, title.strip())


def group_by_kind(items: list[tuple[str, str, str]]) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """Group one chapter's (label, anchor, title) items by kind: [(kind, [(label, anchor, title without kind), ...])].

    Kinds in the order of EXERCISE_KINDS, then UNKINDED; items keep their order (the page order) within a kind, and a
    kind without items is left out.

    >>> group_by_kind([("ex-a", "ex-a", "Implement: f"), ("ex-b", "ex-b", "Predict: g"), ("ex-c", "ex-c", "h")])
    [('Predict', [('ex-b', 'ex-b', 'g')]), ('Implement', [('ex-a', 'ex-a', 'f')]), ('Other', [('ex-c', 'ex-c', 'h')])]
    """
    groups: dict[str, list[tuple[str, str, str]]] = {kind: [] for kind in (*EXERCISE_KINDS, UNKINDED)}
    for label, anchor, title in items:
        kind, rest = split_kind(title)
        groups[kind or UNKINDED].append((label, anchor, rest))
    return [(kind, members) for kind, members in groups.items() if members]


class exercise_list(nodes.General, nodes.Element):  # noqa: N801 (docutils node naming)
    """Placeholder replaced by the list of exercises when the page is written."""


class ExercisesDirective(SphinxDirective):
    """``{bnnotes-exercises}`` — the list of every ``ex-...`` label of the book, by chapter, then by kind, with links."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        pages = getattr(self.env, "bnnotes_exercise_pages", set())
        pages.add(self.env.docname)
        self.env.bnnotes_exercise_pages = pages
        return [exercise_list("")]


def _toc_order(env: Any) -> list[str]:
    """Documents in table-of-contents order (depth first from the root document)."""
    order: list[str] = []

    def visit(docname: str) -> None:
        if docname in order:
            return
        order.append(docname)
        for child in env.toctree_includes.get(docname, []):
            visit(child)

    visit(env.config.root_doc)
    return order + sorted(set(env.found_docs) - set(order))


def _exercise_title(env: Any, docname: str, labelid: str, sectname: str) -> str:
    """The exercise's title (sphinx-exercise's argument), else the section title the label sits on, else the first
    sentence of the paragraph it marks."""
    registered = getattr(env, "sphinx_exercise_registry", {}).get(labelid)
    if registered is not None:
        from sphinx_exercise.nodes import exercise_subtitle

        subtitle = next(iter(registered["node"].findall(exercise_subtitle)), None)
        text = subtitle.astext().strip() if subtitle is not None else ""
        if text.startswith("(") and text.endswith(")"):  # some sphinx-exercise versions wrap the title in parentheses
            text = text[1:-1].strip()
        if text:
            return text
    if sectname:
        return sectname
    doctree = env.get_doctree(docname)
    for node in doctree.findall(nodes.Element):
        if labelid in node.get("ids", []):
            text = " ".join(node.astext().split())
            sentence = re.split(r"(?<=[.:?!])\s", text, maxsplit=1)[0]
            return sentence if len(sentence) <= 120 else sentence[:117].rstrip() + "..."
    return labelid


def collect_exercises(env: Any) -> dict[str, list[tuple[str, str, str]]]:
    """{docname: [(label, anchor, title), ...]} for every ex-* label, docs in toc order, labels in page order."""
    std = env.domaindata["std"]
    per_doc: dict[str, list[tuple[str, str, str]]] = {}
    for name, (docname, labelid) in std["anonlabels"].items():
        if not EXERCISE_LABEL.match(name):
            continue
        sectname = std["labels"].get(name, (None, None, ""))[2]
        per_doc.setdefault(docname, []).append((name, labelid, _exercise_title(env, docname, labelid, sectname)))
    ordered: dict[str, list[tuple[str, str, str]]] = {}
    for docname in _toc_order(env):
        if docname in per_doc:
            ordered[docname] = sorted(per_doc[docname], key=lambda item: _position(env, docname, item[1]))
    return ordered


def _position(env: Any, docname: str, labelid: str) -> int:
    for index, node in enumerate(env.get_doctree(docname).findall(nodes.Element)):
        if labelid in node.get("ids", []):
            return index
    return 0


def render_exercises(app: Sphinx, doctree: nodes.document, fromdocname: str) -> None:
    env = app.env
    for placeholder in list(doctree.findall(exercise_list)):
        exercises = collect_exercises(env)
        content: list[nodes.Node] = []
        if not exercises:
            content.append(nodes.paragraph("", "No exercises yet: the chapters have not defined any (ex-...) labels."))
        for docname, items in exercises.items():
            _warn_unkinded(docname, items)
            chapter_uri = app.builder.get_relative_uri(fromdocname, docname)
            chapter_title = env.titles[docname].astext() if docname in env.titles else docname
            chapter_ref = nodes.reference("", "", nodes.Text(chapter_title), internal=True, refuri=chapter_uri)
            heading = nodes.paragraph("", "", nodes.strong("", "", chapter_ref), nodes.Text(f" ({len(items)})"))
            heading["classes"].append("bnnotes-exercises-chapter")
            kinds = nodes.bullet_list(classes=["bnnotes-exercises-kinds"])
            for kind, members in group_by_kind(items):
                bullets = nodes.bullet_list()
                for name, anchor, title in members:
                    reference = nodes.reference("", title, internal=True, refuri=f"{chapter_uri}#{anchor}")
                    bullets += nodes.list_item(
                        "", nodes.paragraph("", "", reference, nodes.Text(" "), nodes.literal(name, name))
                    )
                kind_heading = nodes.paragraph("", "", nodes.emphasis("", kind), nodes.Text(f" ({len(members)})"))
                kind_heading["classes"].append(f"bnnotes-exercises-kind-{kind.lower()}")
                kinds += nodes.list_item("", kind_heading, bullets)
            content.extend([heading, kinds])
        placeholder.replace_self(content)


def _warn_unkinded(docname: str, items: list[tuple[str, str, str]]) -> None:
    for name, _anchor, title in items:
        if split_kind(title)[0] is None:
            prefixes = ", ".join(f"'{kind}:'" for kind in EXERCISE_KINDS)
            logger.warning(f"exercise {name} is titled {title!r}, which does not start with its kind ({prefixes}); "
                           f"the exercises page groups by it: write e.g. 'Implement: {title}'", location=docname)


def exercises_pages_outdated(app: Sphinx, env: Any) -> list[str]:
    """Re-read the exercises page on every build, so its list follows the chapters."""
    return sorted(getattr(env, "bnnotes_exercise_pages", set()) & set(env.found_docs))


def purge_exercise_pages(app: Sphinx, env: Any, docname: str) -> None:
    getattr(env, "bnnotes_exercise_pages", set()).discard(docname)


def merge_exercise_pages(app: Sphinx, env: Any, docnames: Any, other: Any) -> None:
    env.bnnotes_exercise_pages = getattr(env, "bnnotes_exercise_pages", set()) | getattr(
        other, "bnnotes_exercise_pages", set()
    )


# ----------------------------------------------------------------------------------------------------------------------
# Chapter run times
# ----------------------------------------------------------------------------------------------------------------------


class ChapterTimesDirective(SphinxDirective):
    """``{bnnotes-chapter-times}`` — chapter, CPU run time, Colab link; from ``book/_data/chapter-times.json``."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        from colab import TIMES_FILE, Book, rounded_seconds  # book/_ext, on sys.path as a local extension

        book = Book(Path(self.env.srcdir))
        self.env.note_dependency(str(book.root / TIMES_FILE))
        rows = ["| Chapter | Run time on CPU | Colab |", "| --- | --- | --- |"]
        for source in book.chapters():
            docname = source.relative_to(book.root).with_suffix("").as_posix()
            seconds = book.chapter_seconds(docname)
            shown = rounded_seconds(seconds) if seconds else "not measured yet"
            rows.append(f"| {{doc}}`/{docname}` | {shown} | [open in Colab]({book.colab_url(docname)}) |")
        machine = book.times.get("machine", "")
        when = book.times.get("date", "")
        note = (f"Measured when the book was built ({machine}, {when}): the seconds it took to execute each chapter, "
                "asserts and figures included." if machine else "Not measured yet: run `.ci/chapter-times --write`.")
        container = nodes.container(classes=["bnnotes-chapter-times"])
        lines = StringList()
        for line in [*rows, "", note]:
            lines.append(line, "<bnnotes-chapter-times>")
        self.state.nested_parse(lines, self.content_offset, container)
        return [container]


def setup(app: Sphinx) -> dict[str, Any]:
    register_bibliography_style()
    app.connect("config-inited", set_mathjax_path)
    app.connect("builder-inited", copy_mathjax)
    app.connect("html-page-context", strip_thebe)
    app.connect("doctree-read", depend_on_notebook_twin)
    app.connect("html-page-context", check_colab_notebook, priority=900)  # after sphinx-book-theme's launch buttons
    app.add_directive("bnnotes-api", ApiDirective)
    app.connect("autodoc-process-docstring", process_docstring)
    app.add_node(exercise_list)
    app.add_directive("bnnotes-exercises", ExercisesDirective)
    app.add_directive("bnnotes-chapter-times", ChapterTimesDirective)
    app.connect("doctree-resolved", render_exercises)
    app.connect("env-get-updated", exercises_pages_outdated)
    app.connect("env-purge-doc", purge_exercise_pages)
    app.connect("env-merge-info", merge_exercise_pages)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True, "env_version": 4}
