"""Helpers for the chapters when they run as notebooks: the built book, Jupyter, or Google Colab.

- `glue(name, value)`: record a number for the prose of the book (MyST `{glue:text}` roles), so that a number in the
  text is the number the run produced.
- `show_source(module, qualname)`: show the installed source of a bnnotes object, as the book's ``literalinclude`` does
  (the Colab edition's replacement for it).
- `progress(...)`: report the progress of a long loop when ``BNNOTES_PROGRESS`` is set (the Colab edition sets it), and
  stay quiet in the built book; `heartbeat`: the same for code that runs many short steps (the training loop), at most
  one line every few seconds per notebook cell.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
import textwrap
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

__all__ = ["glue", "show_source", "progress", "progress_enabled", "heartbeat", "Heartbeat"]


def glue(name: str, value: Any) -> Any:
    """Record `value` under `name` for the book's prose, and return `value`.

    In the book build, myst-nb stores it, and ``{glue:text}`name:.2f``` in a Markdown cell renders it. Outside a
    build (Colab, plain Jupyter) without myst-nb nothing is recorded; with ``BNNOTES_SHOW_GLUE=1`` the value is
    printed, so a reader of the Colab edition sees the number the text refers to.

    >>> glue("example_ratio", 2.5)
    2.5
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"glue needs a name that is a Python identifier, got {name!r}")
    # myst-nb applies a format spec (`{glue:text}`name:.2f``) to the stored text/plain repr; numpy 2 writes
    # `np.float64(0.5)` there, which it cannot parse back, so numpy and 0-d torch scalars are stored as Python numbers.
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        value = value.item()
    if os.environ.get("BNNOTES_SHOW_GLUE"):
        print(f"{name} = {value!r}")
    try:
        from myst_nb import glue as myst_glue
    except ImportError:
        return value
    myst_glue(name, value, display=False)
    return value


def show_source(module: str, qualname: str = "") -> Any:
    """Display the source of ``module.qualname`` (a function, class or method of bnnotes) as a Python code block.

    The Colab edition's form of the book's ``{literalinclude} ../bnnotes/<module>.py`` with ``:pyobject: qualname``:
    the listing is read from the installed package, so it is the code that runs. Returns the IPython Markdown object
    (displayed by a notebook as the cell's result), or prints the source when IPython is not available.

    >>> print(show_source("bnnotes.notebook", "progress_enabled").data.splitlines()[1])
    def progress_enabled() -> bool:
    """
    obj: Any = importlib.import_module(module)
    for part in filter(None, qualname.split(".")):
        if not hasattr(obj, part):
            raise AttributeError(f"show_source: {module} has no {qualname!r} ({part!r} is missing)")
        obj = getattr(obj, part)
    source = textwrap.dedent(inspect.getsource(obj)).rstrip()
    try:
        from IPython.display import Markdown
    except ImportError:
        print(source)
        return None
    return Markdown(f"```python\n{source}\n```")


def progress_enabled() -> bool:
    """Whether long loops report their progress: ``BNNOTES_PROGRESS`` is set to something other than ``""``/``"0"``."""
    return os.environ.get("BNNOTES_PROGRESS", "") not in ("", "0")


def progress(items: Iterable[Any], description: str, total: int | None = None) -> Iterator[Any]:
    """Yield from `items`, printing one line per item ("description: 3/9 (12 s)") when `progress_enabled()`.

    Silent otherwise, so the built book's outputs stay short; the Colab edition's set-up cell turns it on, so a
    learner sees that a cell of 20 s is working. Lines go to stdout and are flushed at once (Colab shows them live).

    >>> list(progress(range(3), "seeds"))  # quiet unless BNNOTES_PROGRESS is set
    [0, 1, 2]
    """
    if not progress_enabled():
        yield from items
        return
    if total is None:
        try:
            total = len(items)  # type: ignore[arg-type]
        except TypeError:
            total = None
    started = time.perf_counter()
    for index, item in enumerate(items, start=1):
        yield item
        of = f"/{total}" if total is not None else ""
        print(f"{description}: {index}{of} ({time.perf_counter() - started:.0f} s)", file=sys.stdout, flush=True)


def _cell_number() -> int | None:
    """IPython's execution count (one per cell run), or None outside IPython."""
    shell = sys.modules.get("IPython") and getattr(sys.modules["IPython"], "get_ipython", lambda: None)()
    return getattr(shell, "execution_count", None)


class Heartbeat:
    """At most one progress line every `every` seconds within a notebook cell, when `progress_enabled()`.

    Call it often (every evaluation of a training run, say) with a function that describes the state; the description
    is only computed when a line is due. ``new_run=True`` counts one more run (of a sweep) in this cell. The clock and
    the run count restart with each cell, so a line reads "... (run 14, 21 s into the cell)".

    >>> beat = Heartbeat(every=0.0)
    >>> beat(lambda runs: f"training, run {runs}", new_run=True)  # silent: BNNOTES_PROGRESS is not set
    """

    def __init__(self, every: float = 5.0) -> None:
        self.every = every
        self.cell: int | None = None
        self.started = self.last = time.perf_counter()
        self.runs = 0

    def __call__(self, describe: Callable[[int], str], new_run: bool = False) -> None:
        if not progress_enabled():
            return
        now = time.perf_counter()
        cell = _cell_number()
        if cell != self.cell or cell is None and now - self.last > 60 * self.every:
            self.cell, self.started, self.last, self.runs = cell, now, now, 0
        self.runs += int(new_run)
        if now - self.last >= self.every:
            self.last = now
            print(f"{describe(self.runs)} ({now - self.started:.0f} s)", flush=True)


#: The one `Heartbeat` of the session, called by `bnnotes.experiments.training.train` at each evaluation.
heartbeat = Heartbeat()
