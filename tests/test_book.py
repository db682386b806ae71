"""The built book, as a reader gets it: it builds strictly, reads offline, and renders in a real browser.

`build` runs `jupyter-book build . --all -W -n --keep-going` (cheap when no chapter's code changed: the execution cache
re-runs only chapters whose code changed), `test_book_builds_strictly` fails on any warning, then the tests

- check the HTML statically: no script, stylesheet or font from the network, Colab buttons that open `.ipynb` files;
- open every page in headless Chromium (Debian's `chromium`), served from 127.0.0.1, driven over the DevTools protocol,
  and check that math is typeset by the local MathJax, that every image loads, that the console shows no error and
  that no request fails or leaves the machine.

Without chromium the browser tests skip locally, but fail in CI (CI=true): `.ci/run` installs it.
"""

from __future__ import annotations

import functools
import http.server
import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
HTML = ROOT / "_build" / "html"
CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())
BUILD_TIMEOUT_S = 2400  # a first build executes every chapter (about 10 minutes on 2 busy cores); later ones use the cache

# pytest-timeout counts the session fixture's build in the first test that needs it.
pytestmark = [pytest.mark.browser, pytest.mark.timeout(BUILD_TIMEOUT_S + 600)]


def _book_extension(name: str = "bnnotes_book"):
    """A module of book/_ext (not a package): bnnotes_book (the Sphinx extension) or colab (the Colab generator)."""
    sys.path.insert(0, str(ROOT / "book" / "_ext"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def toc_pages() -> list[str]:
    """Every page of the table of contents, as docnames like ``book/motivation``, in reading order (the one walker
    of ``_toc.yml``: ``book/_ext/colab.py``'s, which the Colab generator, the tests and .ci share)."""
    return _book_extension("colab").Book(ROOT).docnames


def chapter_pages() -> list[str]:
    """The executable pages: Markdown notebooks, i.e. whose front matter has a kernelspec."""
    return [page for page in toc_pages() if re.search(r"^kernelspec:", (ROOT / f"{page}.md").read_text(), re.M)]


@pytest.fixture(scope="session")
def build() -> subprocess.CompletedProcess:
    """`jupyter-book build . --all -W -n --keep-going`: warnings are errors, but every page is still written.

    --all re-reads every page (Sphinx re-reads only changed pages otherwise, and would not repeat an old page's
    warnings); the execution cache still runs only the chapters whose code changed.
    """
    jupyter_book = [sys.executable, "-c", "from jupyter_book.cli.main import main; main()"]
    command = [*jupyter_book, "build", ".", "--all", "-W", "-n", "--keep-going"]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)


def test_book_builds_strictly(build: subprocess.CompletedProcess) -> None:
    """No Sphinx warning (-W) and no broken cross-reference (-n); a chapter cell that raises is such a warning."""
    if build.returncode != 0:
        log = re.sub(r"\x1b\[[0-9;]*m", "", build.stdout + build.stderr)
        problems = [line for line in log.splitlines() if re.search(r"WARNING|ERROR|Traceback", line)]
        problems = [line for line in problems if "Kernel is running over TCP" not in line]
        pytest.fail(
            f"`jupyter-book build . --all -W -n --keep-going` failed (exit {build.returncode}):\n"
            + "\n".join(problems[-40:] or log.splitlines()[-40:])
        )


@pytest.fixture(scope="session")
def built_book(build: subprocess.CompletedProcess) -> Path:
    """The HTML book in _build/html, as the build above left it (with --keep-going, also when it warned)."""
    if not (HTML / "book" / "intro.html").is_file():
        pytest.fail(f"the build wrote no HTML (exit {build.returncode}):\n{(build.stdout + build.stderr)[-3000:]}")
    return HTML


# ----------------------------------------------------------------------------------------------------------------------
# Static checks of the HTML
# ----------------------------------------------------------------------------------------------------------------------


class _Assets(HTMLParser):
    """Collects what a page loads (scripts, stylesheets, images, preloads) and its links."""

    def __init__(self) -> None:
        super().__init__()
        self.loaded: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {name: value or "" for name, value in attrs}
        if tag in {"script", "img", "iframe", "source", "video", "audio", "embed"} and attributes.get("src"):
            self.loaded.append(attributes["src"])
        elif tag == "link":
            rel = attributes.get("rel", "").lower()
            if rel in {"stylesheet", "preload", "modulepreload", "icon", "shortcut icon", "manifest"}:
                self.loaded.append(attributes.get("href", ""))
        elif tag == "a" and attributes.get("href"):
            self.links.append(attributes["href"])


def _parse(page: Path) -> _Assets:
    parser = _Assets()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser


def test_no_page_loads_anything_from_the_network(built_book: Path) -> None:
    pages = sorted(built_book.rglob("*.html"))
    assert len(pages) >= len(toc_pages())
    remote = {
        f"{page.relative_to(built_book)}: {url}"
        for page in pages
        for url in _parse(page).loaded
        if re.match(r"^(https?:)?//", url)
    }
    assert not remote, "pages load scripts/styles/images from the network:\n" + "\n".join(sorted(remote))
    # Nor does a stylesheet pull a font or image from a CDN, nor any of our scripts name a CDN to load later.
    cdn = re.compile(r"(cdn\.jsdelivr\.net|cdnjs\.cloudflare\.com|unpkg\.com|fonts\.googleapis\.com|fonts\.gstatic\.com)")
    offenders = [
        str(path.relative_to(built_book))
        for pattern in ("*.css", "*.html")
        for path in built_book.rglob(pattern)
        if cdn.search(path.read_text(encoding="utf-8", errors="replace"))
    ]
    assert not offenders, f"files that name a CDN: {offenders}"


def test_math_is_served_by_the_local_mathjax(built_book: Path) -> None:
    page = built_book / "book" / "intro.html"
    scripts = [url for url in _parse(page).loaded if "mathjax" in url.lower()]
    assert scripts, "the intro page (which has math) loads no MathJax"
    for url in scripts:
        local = (page.parent / url.split("?")[0]).resolve()
        assert local.is_file(), f"{url} is not a file of the built book"
    fonts = list((built_book / "_static" / "mathjax" / "output" / "chtml" / "fonts" / "woff-v2").glob("*.woff"))
    assert len(fonts) > 10, "MathJax's CommonHTML fonts were not copied"


@pytest.mark.parametrize("page", chapter_pages())
def test_colab_button_opens_the_chapter_notebook(built_book: Path, page: str) -> None:
    repo = CONFIG["repository"]["url"].removeprefix("https://github.com/").strip("/")
    branch = CONFIG["repository"]["branch"]
    expected = f"https://colab.research.google.com/github/{repo}/blob/{branch}/{page}.ipynb"
    colab = [url for url in _parse(built_book / f"{page}.html").links if "colab.research.google.com" in url]
    assert colab == [expected], f"{page}: the Colab button should open {expected}, found {colab}"
    assert (ROOT / f"{page}.ipynb").is_file(), f"{page}.ipynb, which the Colab button opens, is not in the repository"


def test_ci_runs_the_readme_commands_verbatim() -> None:
    """The README gives two set-up commands; CI (.ci/run) runs the test one exactly as written."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = re.findall(r"```bash\n[ \t]*(python3 -m venv .venv && [^\n]+)\n[ \t]*```", readme)
    assert len(commands) == 2, f"the README should give exactly two set-up commands, found {commands}"
    build, test = commands
    assert "jupyter-book build . -W -n --keep-going" in build and "_build/html/index.html" in readme
    ci_lines = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert any(line == test or line.startswith(f"{test} ||") for line in ci_lines), f".ci/run does not run: {test}"


def test_api_reference_documents_every_public_name(built_book: Path) -> None:
    import importlib

    html = (built_book / "book" / "api.html").read_text(encoding="utf-8")
    missing = []
    for module_name in _book_extension().discover_modules("bnnotes"):
        if f'id="module-{module_name}"' not in html:
            missing.append(module_name)
            continue
        module = importlib.import_module(module_name)
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name, None)
            if getattr(obj, "__module__", None) == module_name and f'id="{module_name}.{name}"' not in html:
                missing.append(f"{module_name}.{name}")
    assert not missing, f"the API reference lacks: {missing}"


def test_docstring_escaping_keeps_markup_and_neutralizes_plain_text() -> None:
    escape = _book_extension().escape_docstring
    lines = [
        "x: (N, C) or (N, C, *spatial); s = (mean_i |v_i|^p)^(1/p); **kwargs go to ``f(*args)``; see `Result`s.",
        "**Returns** y_ and the cache::",
        "",
        "    y = gamma * x_hat + beta  |x|*",
        "",
        ">>> a = 2*x",
    ]
    assert escape(lines) == [
        r"x: (N, C) or (N, C, \*spatial); s = (mean_i \|v_i\|^p)^(1/p); \*\*kwargs go to ``f(*args)``; see `Result`\ s.",
        r"**Returns** y\_ and the cache::",
        "",
        "    y = gamma * x_hat + beta  |x|*",
        "",
        ">>> a = 2*x",
    ]


def _build_exercises_page(tmp_path: Path, chapter: str) -> tuple[subprocess.CompletedProcess, str]:
    """Build a two-page book (one chapter, the exercises page) with the book's extension, as the book loads it."""
    (tmp_path / "conf.py").write_text(
        f"import sys\nsys.path.insert(0, {str(ROOT / 'book' / '_ext')!r})\n"
        'extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx_exercise", "bnnotes_book"]\n'
    )
    (tmp_path / "index.md").write_text("# Book\n\n```{toctree}\nchapter\nexercises\n```\n")
    (tmp_path / "chapter.md").write_text(chapter)
    (tmp_path / "exercises.md").write_text("# Exercises\n\n```{bnnotes-exercises}\n```\n")
    build = subprocess.run([sys.executable, "-m", "sphinx", "-b", "html", "-q", ".", "_build"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    page = tmp_path / "_build" / "exercises.html"
    return build, page.read_text(encoding="utf-8") if page.exists() else ""


def _exercise(label: str, title: str) -> str:
    return f"```{{exercise-start}} {title}\n:label: {label}\n```\nThe task.\n```{{exercise-end}}\n```\n\n"


def test_exercises_page_groups_each_chapter_by_kind(tmp_path: Path) -> None:
    """Kinds in the order Predict, Derive, Implement, Explore, whatever the page order; the kind leaves the title."""
    chapter = "# A chapter\n\n" + "".join([
        _exercise("ex-chapter-forward", "Implement: the forward pass"),
        _exercise("ex-chapter-ablation", "Explore: mean-only BN"),
        _exercise("ex-chapter-stream", "Predict: the stream at depth 8"),
        _exercise("ex-chapter-bessel", "Derive: Bessel's factor m/(m-1)"),
        _exercise("ex-chapter-backward", "Implement: the backward pass"),
    ])
    build, html = _build_exercises_page(tmp_path, chapter)
    assert build.returncode == 0 and not build.stderr.strip(), f"the small book should build cleanly: {build.stderr}"
    text = re.sub(r"<[^>]+>", "", html)
    expected = ["A chapter (5)", "Predict (1)", "the stream at depth 8", "Derive (1)", "Bessel's factor m/(m-1)",
                "Implement (2)", "the forward pass", "the backward pass", "Explore (1)", "mean-only BN"]
    positions = [text.find(part) for part in expected]
    assert -1 not in positions, f"the exercises page lacks {expected[positions.index(-1)]!r}: {text[:2000]}"
    assert positions == sorted(positions), f"expected {expected} in this order on the exercises page"
    assert "Implement: the forward pass" not in text, "under its kind's heading the title should drop the prefix"
    links = set(_parse(tmp_path / "_build" / "exercises.html").links)
    for label in ("forward", "ablation", "stream", "bessel", "backward"):
        assert f"chapter.html#ex-chapter-{label}" in links, f"no link to ex-chapter-{label}: {sorted(links)}"


def test_exercises_page_warns_about_a_title_without_its_kind(tmp_path: Path) -> None:
    build, html = _build_exercises_page(tmp_path, "# A chapter\n\n" + _exercise("ex-chapter-whiten", "Whiten a batch"))
    assert "ex-chapter-whiten is titled 'Whiten a batch', which does not start with its kind" in build.stderr, (
        f"a title without 'Predict:', 'Derive:', 'Implement:' or 'Explore:' should be a warning: {build.stderr!r}"
    )
    assert "Other (1)" in re.sub(r"<[^>]+>", "", html), "the exercise is still listed, under Other"


def test_exercises_page_links_every_exercise(built_book: Path) -> None:
    labels = {
        (page, label)
        for page in chapter_pages()
        for label in re.findall(r"^:label: (ex-[\w-]+)\s*$", (ROOT / f"{page}.md").read_text(), re.M)  # exercise-start
    }
    assert labels, "no exercise label (:label: ex-...) found in the chapters"
    links = set(_parse(built_book / "book" / "exercises.html").links)
    for page, label in sorted(labels):
        anchor = f"{Path(page).name}.html#{label.replace('_', '-')}"  # Sphinx ids use "-" for "_"
        assert anchor in links, (
            f"the exercises page has no link to {page}#{label}; it links {sorted(links)}"
        )


# ----------------------------------------------------------------------------------------------------------------------
# The browser
# ----------------------------------------------------------------------------------------------------------------------


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if path := shutil.which(name):
            return path
    return None


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base class's name)
        pass


@pytest.fixture(scope="session")
def served_book(built_book: Path) -> Iterator[str]:
    """The built book over http://127.0.0.1:<port>, from a thread of this process."""
    handler = functools.partial(_QuietHandler, directory=str(built_book))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class DevTools:
    """A minimal Chrome DevTools Protocol client over one websocket, on one page (a flattened target session)."""

    def __init__(self, ws_url: str) -> None:
        import websocket  # websocket-client

        self.ws = websocket.create_connection(ws_url, timeout=60, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict] = []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def call(self, method: str, session: bool = False, **params: object) -> dict:
        self.next_id += 1
        message: dict = {"id": self.next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        self.ws.send(json.dumps(message))
        while True:
            reply = json.loads(self.ws.recv())
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)

    def wait_for(self, method: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        self.ws.settimeout(1)
        import websocket

        try:
            while time.monotonic() < deadline:
                if any(event["method"] == method for event in self.events):
                    return
                try:
                    event = json.loads(self.ws.recv())
                except websocket.WebSocketTimeoutException:
                    continue
                if "method" in event:
                    self.events.append(event)
            raise TimeoutError(f"no {method} within {timeout_s} s")
        finally:
            self.ws.settimeout(60)

    def close(self) -> None:
        self.ws.close()


def _stop(process: subprocess.Popen) -> None:
    """End the chromium we started and its helpers (its process group, by the id we got from Popen)."""
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait_s)
            time.sleep(0.2)  # the helpers leave just after the browser process
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="session")
def browser() -> Iterator[DevTools]:
    executable = _chromium()
    if executable is None:
        if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
            pytest.fail("chromium is not installed; in CI it is required (.ci/run installs Debian's chromium)")
        pytest.skip("chromium is not installed (Debian: apt-get install chromium); the browser tests need it")
    # ignore_cleanup_errors: chromium's helper processes may still be writing the profile while it is removed.
    with tempfile.TemporaryDirectory(prefix="bnnotes-chromium-", ignore_cleanup_errors=True) as profile:
        process = subprocess.Popen(
            [
                executable,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-quic",
                "--no-first-run",
                "--no-default-browser-check",
                f"--user-data-dir={profile}",
                "--remote-debugging-port=0",
                "--window-size=1280,900",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its own process group, so its helper processes end with it
        )
        try:
            port_file = Path(profile) / "DevToolsActivePort"
            deadline = time.monotonic() + 60
            while not (port_file.is_file() and len(port_file.read_text().splitlines()) >= 2):
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"chromium did not start its DevTools endpoint (exit code {process.poll()})")
                time.sleep(0.1)
            port, path = port_file.read_text().splitlines()[:2]
            client = DevTools(f"ws://127.0.0.1:{port}{path}")
            try:
                yield client
            finally:
                client.close()
        finally:
            _stop(process)


# Run in the page once it has loaded: wait for MathJax and for every image, then report what a reader would see.
_INSPECT = r"""
(async () => {
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
  for (let i = 0; i < 100 && document.readyState !== "complete"; i++) await sleep(100);
  const hasMath = document.querySelector(".math") !== null;
  if (hasMath) {
    for (let i = 0; i < 200 && !(window.MathJax && MathJax.startup && MathJax.startup.promise); i++) await sleep(50);
    if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
      const timedOut = await Promise.race([MathJax.startup.promise.then(() => false), sleep(30000).then(() => true)]);
      if (timedOut) return {timedOut: "MathJax did not finish typesetting within 30 s"};
    }
  }
  const images = [...document.images];
  images.forEach((img) => { img.loading = "eager"; });
  await Promise.all(images.map((img) => img.complete ? null :
    new Promise((resolve) => { img.addEventListener("load", resolve); img.addEventListener("error", resolve); })));
  const raw = [];
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    if (node.parentElement.closest("pre, code, script, style, textarea, mjx-container, .highlight")) continue;
    const match = node.textContent.match(/\$\$|\\\(|\\\)|\\\[|\\\]|\\begin\{/);
    if (match) raw.push(node.textContent.trim().slice(0, 80));
  }
  return {
    title: document.title,
    hasMath,
    mathjaxVersion: window.MathJax && MathJax.version || null,
    typeset: document.querySelectorAll("mjx-container").length,
    mathErrors: document.querySelectorAll("mjx-merror, [data-mjx-error]").length,
    rawMath: raw,
    images: images.length,
    brokenImages: images.filter((img) => !(img.complete && img.naturalWidth > 0)).map((img) => img.src),
    figures: document.querySelectorAll("figure img, .cell_output img").length,
  };
})()
"""


def inspect_page(browser: DevTools, url: str, origin: str) -> tuple[dict, list[str]]:
    """Load url in the page, and return what _INSPECT saw plus every console error or failed/external request."""
    browser.events.clear()
    for domain in ("Page", "Runtime", "Log", "Network"):
        browser.call(f"{domain}.enable", session=True)
    browser.call("Page.navigate", session=True, url=url)
    browser.wait_for("Page.loadEventFired", timeout_s=60)
    browser.ws.settimeout(90)
    try:
        seen = browser.call("Runtime.evaluate", session=True, expression=_INSPECT, awaitPromise=True, returnByValue=True)
    finally:
        browser.ws.settimeout(60)
    if "exceptionDetails" in seen:
        raise RuntimeError(f"the inspection script failed on {url}: {seen['exceptionDetails']}")
    time.sleep(0.2)  # let late console messages and network events arrive
    browser.call("Runtime.evaluate", session=True, expression="1")  # drains the socket into browser.events
    problems = []
    for event in browser.events:
        method, params = event["method"], event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in {"error", "assert"}:
            text = " ".join(str(arg.get("value", arg.get("description", ""))) for arg in params.get("args", []))
            problems.append(f"console.{params['type']}: {text}")
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            problems.append(f"uncaught exception: {details.get('exception', {}).get('description', details.get('text'))}")
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            problems.append(f"console error ({entry.get('source')}): {entry.get('text')} {entry.get('url', '')}")
        elif method == "Network.requestWillBeSent":
            request_url = params.get("request", {}).get("url", "")
            if not request_url.startswith((origin, "data:", "blob:", "about:")):
                problems.append(f"request leaves the machine: {request_url}")
        elif method == "Network.loadingFailed" and not params.get("canceled"):
            problems.append(f"request failed: {params.get('errorText')} ({params.get('type')})")
        elif method == "Network.responseReceived" and params.get("response", {}).get("status", 200) >= 400:
            problems.append(f"HTTP {params['response']['status']}: {params['response'].get('url')}")
    value = seen["result"]["value"]
    if "timedOut" in value:
        problems.append(value["timedOut"])
        value = {"hasMath": True, "mathjaxVersion": None, "typeset": 0, "mathErrors": 0, "rawMath": ["(not checked)"],
                 "images": 0, "brokenImages": [], "figures": 0}
    return value, problems


@pytest.fixture(scope="session")
def rendered(browser: DevTools, served_book: str) -> dict[str, tuple[dict, list[str]]]:
    """Every page of the table of contents, as the browser rendered it."""
    return {page: inspect_page(browser, f"{served_book}/{page}.html", served_book) for page in toc_pages()}


@pytest.mark.parametrize("page", toc_pages())
def test_page_renders_cleanly_in_chromium(rendered: dict, page: str) -> None:
    seen, problems = rendered[page]
    assert not problems, f"{page}: the browser reported problems:\n" + "\n".join(problems)
    assert not seen["brokenImages"], f"{page}: images that did not load: {seen['brokenImages']}"
    if seen["hasMath"]:
        assert seen["mathjaxVersion"], f"{page}: has math but MathJax did not start"
        assert seen["typeset"] > 0, f"{page}: has math but MathJax typeset none of it"
        assert seen["mathErrors"] == 0, f"{page}: MathJax reported {seen['mathErrors']} TeX errors"
    assert not seen["rawMath"], f"{page}: untypeset TeX left in the text: {seen['rawMath'][:5]}"


def test_intro_math_is_typeset(rendered: dict) -> None:
    seen, _ = rendered[toc_pages()[0]]
    assert seen["hasMath"] and seen["typeset"] >= 10, f"the intro's notation table should be typeset: {seen}"


def test_math_accessibility_explorer_works_offline(browser: DevTools, served_book: str, rendered: dict) -> None:
    """A reader who turns on MathJax's explorer (its menu, Accessibility) makes MathJax load MathML input, the speech
    rule engine and its JSON maps on demand: they must come from the book too."""
    intro = f"{served_book}/{toc_pages()[0]}.html"
    settings = json.dumps({"explorer": True, "assistiveMml": True})
    browser.call("Runtime.evaluate", session=True, expression=f"localStorage.setItem('MathJax-Menu-Settings', {settings!r})")
    try:
        seen, problems = inspect_page(browser, intro, served_book)
    finally:
        browser.call("Runtime.evaluate", session=True, expression="localStorage.removeItem('MathJax-Menu-Settings')")
    assert not problems, "with the explorer on, the browser reported:\n" + "\n".join(problems)
    assert seen["typeset"] > 0 and not seen["rawMath"], f"with the explorer on, math was not typeset: {seen}"


def test_a_chapter_shows_figures_and_math(rendered: dict) -> None:
    counts = {page: (rendered[page][0]["figures"], rendered[page][0]["typeset"]) for page in chapter_pages()}
    assert any(figures > 0 and typeset > 0 for figures, typeset in counts.values()), (
        f"no chapter shows both a loaded figure and typeset math: (figures, formulas) per chapter = {counts}"
    )


def test_bibliography_lists_the_core_papers(rendered: dict, built_book: Path) -> None:
    page = next(page for page in toc_pages() if page.endswith("bibliography"))
    text = (built_book / f"{page}.html").read_text(encoding="utf-8")
    for title in (
        "Batch Normalization: Accelerating Deep Network Training",
        "Batch Renormalization",
        "How Does Batch Normalization Help Optimization",
    ):
        assert title in text, f"the bibliography lacks {title!r}"
    assert not rendered[page][1]
