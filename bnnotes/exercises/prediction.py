"""Grading "predict, then run" exercises: the learner writes a prediction down, the chapter's run measures it.

`check_prediction` serves every chapter: a choice among a few answers, or a number within a tolerance.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from bnnotes.exercises._harness import is_real_number

__all__ = ["check_prediction"]

_CHECKER = "check_prediction"


def _show(value: Any) -> str:
    """A value as a learner reads it: numbers with 4 significant digits, strings quoted."""
    if is_real_number(value):
        return f"{float(value):.4g}"
    return repr(value) if isinstance(value, str) else str(value)


def _equal(a: Any, b: Any) -> bool:
    """a == b as one truth value; False where == is not one (arrays, objects that refuse the comparison)."""
    try:
        return bool(a == b)
    except Exception:
        return False


def _among(value: Any, choices: tuple[Any, ...]) -> bool:
    return any(_equal(value, choice) for choice in choices)


def check_prediction(
    predicted: Any,
    measured: Any,
    *,
    name: str,
    choices: Sequence[Any] | None = None,
    rel_tol: float | None = None,
    factor: float | None = None,
    explanation: str = "",
    abs_tol: float | None = None,
) -> None:
    """Grade a prediction written down before a cell ran, against the value that the chapter's run measured.

    A choice (``choices`` given, a tuple of the allowed answers): an answer outside ``choices`` fails with the list
    of allowed ones; an allowed answer is right iff ``predicted == measured``. A number: right iff within ``rel_tol``
    of the measurement, ``|predicted - measured| <= rel_tol * |measured|``, or within a ``factor`` of it,
    ``measured / factor <= predicted <= measured * factor``, or within ``abs_tol`` of it (for a measurement that is
    0 up to rounding, such as a sum the theory says vanishes): give one or more, any of them suffices.
    A wrong prediction raises AssertionError "you predicted X for <name>; the run measured Y", then ``explanation``.
    ``predicted`` None (the Colab edition's stub) prints "not attempted yet" and returns. A right one prints one line.

    >>> check_prediction("diverges", "diverges", name="the plain network at lr=1", choices=("converges", "diverges"))
    check_prediction: right, the run measured 'diverges' for the plain network at lr=1.
    >>> check_prediction(300, 256.0, name="the stream's mean square", factor=2)
    check_prediction: right, the run measured 256 for the stream's mean square (you predicted 300).
    """
    _check_options(name, choices, rel_tol, factor, abs_tol)
    if predicted is None:
        print(f"{_CHECKER}: not attempted yet (your prediction for {name} is still None): write it down, then run "
              "this cell again.")
        return None
    suffix = f" {explanation}" if explanation else ""
    if choices is not None:
        _grade_choice(predicted, measured, name, tuple(choices), suffix)
    else:
        _grade_number(predicted, measured, name, {"rel_tol": rel_tol, "factor": factor, "abs_tol": abs_tol}, suffix)
    return None


def _check_options(name: Any, choices: Sequence[Any] | None, rel_tol: Any, factor: Any, abs_tol: Any) -> None:
    """The chapter's own arguments: a mistake there is the author's, so it is a ValueError, not a wrong answer."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{_CHECKER}: name must be a non-empty string naming the predicted quantity, got {name!r}")
    numeric = {"rel_tol": rel_tol, "factor": factor, "abs_tol": abs_tol}
    given = {key: value for key, value in numeric.items() if value is not None}
    if choices is None and not given:
        raise ValueError(f"{_CHECKER}({name}): give choices (a tuple of allowed answers), or rel_tol, factor or "
                         "abs_tol (the tolerance of a numeric prediction)")
    if choices is not None and given:
        raise ValueError(f"{_CHECKER}({name}): a choice is graded by equality; rel_tol, factor and abs_tol are for "
                         "numbers")
    for key, value in given.items():
        least = 1 if key == "factor" else 0
        if not (is_real_number(value) and value >= least):
            raise ValueError(f"{_CHECKER}({name}): {key} must be a number >= {least}, got {value!r}")


def _grade_choice(predicted: Any, measured: Any, name: str, choices: tuple[Any, ...], suffix: str) -> None:
    if not _among(measured, choices):
        raise ValueError(f"{_CHECKER}({name}): the measured {_show(measured)} is not one of the choices {choices}")
    if not _among(predicted, choices):
        allowed = ", ".join(_show(choice) for choice in choices)
        raise AssertionError(f"{_CHECKER}: {_show(predicted)} is not an allowed answer for {name}; "
                             f"answer one of {allowed}")
    if not _equal(predicted, measured):
        raise AssertionError(f"{_CHECKER}: you predicted {_show(predicted)} for {name}; the run measured "
                             f"{_show(measured)}.{suffix}")
    print(f"{_CHECKER}: right, the run measured {_show(measured)} for {name}.")


def _grade_number(predicted: Any, measured: Any, name: str, tolerances: dict[str, Any], suffix: str) -> None:
    if not is_real_number(measured) or not np.isfinite(float(measured)):
        raise ValueError(f"{_CHECKER}({name}): the measured value must be a finite number, got {measured!r}")
    if not is_real_number(predicted) or not np.isfinite(float(predicted)):
        raise AssertionError(f"{_CHECKER}: your prediction for {name} must be a finite number, got "
                             f"{type(predicted).__name__} {predicted!r:.60}")
    guess, value = float(predicted), float(measured)
    rel_tol, factor, abs_tol = tolerances["rel_tol"], tolerances["factor"], tolerances["abs_tol"]
    within = [
        rel_tol is not None and abs(guess - value) <= rel_tol * abs(value),
        abs_tol is not None and abs(guess - value) <= abs_tol,
        factor is not None and min(value / factor, value * factor) <= guess <= max(value / factor, value * factor),
    ]
    if not any(within):
        texts = {"rel_tol": f"within {100 * (rel_tol or 0):g}%", "factor": f"within a factor {factor or 0:g}",
                 "abs_tol": f"within {abs_tol or 0:g}"}
        allowed = " or ".join(texts[key] for key, value in tolerances.items() if value is not None)
        raise AssertionError(f"{_CHECKER}: you predicted {_show(guess)} for {name}; the run measured "
                             f"{_show(value)} (a prediction {allowed} counts as right).{suffix}")
    print(f"{_CHECKER}: right, the run measured {_show(value)} for {name} (you predicted {_show(guess)}).")
