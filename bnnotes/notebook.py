"""Helpers for the chapters when they run as notebooks: the built book, Jupyter, or Google Colab.

- `glue(name, value)`: record a number for the prose of the book (MyST `{glue:text}` roles), so that a number in the
  text is the number the run produced.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["glue"]


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
