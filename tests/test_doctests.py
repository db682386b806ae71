"""Every docstring example (``>>>``) of the package runs, as part of the test command (issue 14): the examples are
the documentation a learner copies, so they must stay true. One test per module."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import bnnotes

MODULES = sorted(
    info.name for info in pkgutil.walk_packages(bnnotes.__path__, prefix="bnnotes.") if not info.name.endswith("__main__")
)


@pytest.mark.parametrize("name", ["bnnotes", *MODULES])
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, report=True)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} docstring examples failed (see above)"
