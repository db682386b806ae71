"""The one harness every checker runs on: cases, a reference, a catalogue of mistakes.

A checker is a list of `Case` objects. Each case holds the arguments the learner's function is called with and, for
each value the function returns, an `Output`: its name, the reference value, and a catalogue of known mistakes, each a
``(hint, wrong_answer)`` pair whose wrong answer is computed only when needed. `run_cases` runs the cases in order:

1. it calls the learner's function on copies of the arguments (a stub raising NotImplementedError is "not attempted
   yet"; any other exception becomes an AssertionError naming the case);
2. it checks each returned value: a tuple of the right length, real numbers, the reference's shape and dtype, finite;
3. it compares each value with the reference at a tolerance set by the dtype, and on a mismatch tries the catalogue:
   a wrong answer that agrees with a known mistake far better than with the reference gets that mistake's hint.

The first failing case raises one AssertionError with every output that differs; when all pass, one line is printed.
`reports_not_attempted` wraps every public checker so that ``None`` (the Colab edition's stub of a value) is reported
as not attempted yet. The catalogues of mistakes live in the chapter modules and in `_catalogue`; a new checker
is one more list of cases, not one more copy of this loop.

>>> import numpy as np
>>> x = np.array([1.0, 2.0])
>>> mistakes = [("this matches x + 2: double x, y = 2 * x", lambda: x + 2)]
>>> cases = [Case("x=[1, 2]", (x,), (Output("y", 2 * x, mistakes),))]
>>> run_cases(lambda x: 2 * x, "check_double", "fn(x) -> y", cases)
check_double: all 1 cases match the reference. Well done.
>>> try:
...     run_cases(lambda x: x + 2, "check_double", "fn(x) -> y", cases)
... except AssertionError as failure:
...     print(str(failure).splitlines()[-1])
  Hint: this matches x + 2: double x, y = 2 * x
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Mistake", "Output", "Case", "NotAttempted", "reports_not_attempted", "run_cases", "fmt", "close",
           "tolerances", "compare", "is_real_number"]

# A known mistake: the hint that names it, and a function computing the answer it produces for the current case.
Mistake = tuple[str, Callable[[], Any]]


@dataclass(frozen=True)
class Output:
    """One value the learner's function returns.

    name: how the messages call it ("dx"). expected: the reference, whose shape and dtype the answer must have.
    mistakes: the catalogue for this value. shape_hints: a hint for a known wrong shape. scalar: a real number is
    expected (any int or float type is accepted, compared in float64). generic: whether to try the generic hints
    (opposite sign, a constant factor) when no mistake matches. fallback_hint: called with the answer when no hint
    matched; returns a last hint or None.
    """

    name: str
    expected: np.ndarray
    mistakes: Sequence[Mistake] = ()
    shape_hints: Mapping[tuple[int, ...], str] = field(default_factory=dict)
    scalar: bool = False
    generic: bool = True
    fallback_hint: Callable[[np.ndarray], str | None] | None = None


@dataclass(frozen=True)
class Case:
    """One call of the learner's function.

    description: what the failure message says about the case ("x.shape=(4, 3), seed=0, eps=1e-05"). args: the
    arguments (NumPy arrays are passed as copies). outputs: what the function returns, in order; with one Output
    the function returns that value itself, with several a tuple. exception_hint: added to an exception's report when
    its message contains one of the words in `hint_when` ("" matches every message). report_order: the order of the
    outputs in a failure message, when it is not the return order (r and d before the y they produce).
    """

    description: str
    args: tuple[Any, ...]
    outputs: tuple[Output, ...]
    exception_hint: str | None = None
    hint_when: tuple[str, ...] = ("broadcast",)
    report_order: tuple[int, ...] | None = None


class NotAttempted(Exception):
    """The learner's function is still the stub: it raised NotImplementedError (message: its hint)."""


def reports_not_attempted(checker: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a checker so that a stub (None, or a function raising NotImplementedError) is reported, not failed."""

    @functools.wraps(checker)
    def wrapper(*answers: Any, **options: Any) -> Any:
        name = checker.__name__
        if any(answer is None for answer in (*answers, *options.values())):
            print(f"{name}: not attempted yet (your answer is still None): write it, then run this cell again.")
            return None
        try:
            return checker(*answers, **options)
        except NotAttempted as stub:
            hint = f" {stub}" if str(stub) else ""
            print(f"{name}: not attempted yet (your function raises NotImplementedError).{hint} "
                  "Write it, then run this cell again.")
            return None

    return wrapper


def run_cases(fn: Any, checker: str, signature: str, cases: Sequence[Case], none_is_stub: bool = False) -> None:
    """Run the learner's `fn` on every case; raise AssertionError at the first case that fails, else print success.

    signature: what the checker expects, for the TypeError a non-callable gets ("fn(x, eps) -> x_white").
    none_is_stub: a function returning None is "not attempted yet" rather than a missing `return`.
    """
    if not callable(fn):
        raise TypeError(f"{checker} expects your function {signature}, got {type(fn).__name__} {fn!r:.60}")
    for index, case in enumerate(cases):
        header = f"{checker} failed on case {index + 1} of {len(cases)} ({case.description})"
        answer = _call(fn, case, header)
        if answer is None and none_is_stub:
            raise NotAttempted("your function returns None")
        values = _unpack(answer, case.outputs, header)
        answers = [_as_checked_array(value, output, header) for value, output in zip(values, case.outputs)]
        differences = [compare(got, output.expected, output.name, output.mistakes, output.generic,
                               output.fallback_hint) for got, output in zip(answers, case.outputs)]
        order = case.report_order or range(len(differences))
        lines = [line for position in order for line in differences[position]]
        # A mistake that shows in several outputs is named once, at the first of them.
        lines = [line for at, line in enumerate(lines)
                 if not line.startswith("  Hint:") or line not in lines[:at]]
        if lines:
            raise AssertionError("\n".join([f"{header}:"] + lines))
    print(f"{checker}: all {len(cases)} cases match the reference. Well done.")


def _call(fn: Callable[..., Any], case: Case, header: str) -> Any:
    """Call the learner's function on copies of the inputs; an exception becomes an AssertionError naming the case."""
    # Copies: a function that changes its inputs in place must not change the reference's.
    copies = [np.array(a, copy=True) if isinstance(a, np.ndarray) else a for a in case.args]
    try:
        return fn(*copies)
    except NotImplementedError as error:  # the Colab edition's stub: not attempted yet, not wrong
        raise NotAttempted(str(error)) from error
    except Exception as error:  # the learner's bug, reported with the case that triggered it
        lines = [header + ":", f"  your function raised {type(error).__name__}: {error}"]
        if case.exception_hint and any(word in str(error) for word in case.hint_when):
            lines.append(f"  Hint: {case.exception_hint}")
        raise AssertionError("\n".join(lines)) from error


def _unpack(answer: Any, outputs: Sequence[Output], header: str) -> Sequence[Any]:
    """The returned values, one per Output: the answer itself for one, a tuple or list of the right length for more."""
    if len(outputs) == 1:
        return [answer]
    if isinstance(answer, (tuple, list)) and len(answer) == len(outputs):
        return answer
    what = type(answer).__name__
    if isinstance(answer, (tuple, list)):
        what = f"a {what} of length {len(answer)}"
    names = ", ".join(output.name for output in outputs)
    note = " (did you forget a `return`? An in-place update must still return the new values)" if answer is None else ""
    raise AssertionError(f"{header}:\n  expected a tuple ({names}), got {what}{note}")


def is_real_number(value: Any) -> bool:
    """A real number that is not a bool: int, float, NumPy scalar, or a 0-d array of one."""
    if isinstance(value, np.ndarray):
        return value.shape == () and value.dtype.kind in "fiu"
    return not isinstance(value, (bool, np.bool_)) and isinstance(value, (numbers.Real, np.floating, np.integer))


def _as_checked_array(value: Any, output: Output, header: str) -> np.ndarray:
    """The learner's value as an array of the expected shape and dtype, or an AssertionError that says why not."""
    name, expected = output.name, output.expected
    if value is None:
        raise AssertionError(f"{header}:\n  {name} is None: did you forget a `return`?")
    if output.scalar:
        if not is_real_number(value):
            raise AssertionError(f"{header}:\n  {name}: expected a real number, got {type(value).__name__} "
                                 f"{value!r:.60}")
        value = np.float64(value)
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], dict):
        raise AssertionError(f"{header}:\n  {name} is a tuple (y, cache); this exercise expects the array {name} only")
    try:
        got = np.asarray(value)
    except Exception as error:
        raise AssertionError(f"{header}:\n  {name} is not array-like ({type(value).__name__}): {error}") from error
    if got.dtype.kind not in "fiu":
        raise AssertionError(f"{header}:\n  {name} has dtype {got.dtype}; expected real floating-point numbers "
                             f"({expected.dtype})")
    if got.shape != expected.shape:
        lines = [f"{header}:", f"  {name} has shape {got.shape}, expected {expected.shape}"]
        hint = output.shape_hints.get(got.shape)
        if hint is None and got.shape == expected.shape[::-1] and got.ndim == 2:
            hint = "it looks transposed"
        if hint:
            lines.append(f"  Hint: {hint}")
        raise AssertionError("\n".join(lines))
    if got.dtype != expected.dtype:
        if expected.dtype == np.float32 and got.dtype == np.float64:
            detail = "the input was float32, so the output should be float32 too (BN keeps the input's dtype)"
        elif expected.dtype == np.float64 and got.dtype == np.float32:
            detail = "the input was float64: a float32 cast somewhere loses precision"
        else:
            detail = f"expected {expected.dtype}, the dtype of the input"
        raise AssertionError(f"{header}:\n  {name} has dtype {got.dtype}: {detail}")
    if not np.all(np.isfinite(got)):
        bad = int(np.sum(~np.isfinite(got)))
        raise AssertionError(
            f"{header}:\n  {name} has {bad} non-finite entries (nan or inf), for example {fmt(got)}\n"
            "  Hint: a division by zero? The variance can be 0; eps belongs under the square root."
        )
    return got


def fmt(values: Any, count: int = 4) -> str:
    """The first `count` numbers of an array (or the number itself), for a message."""
    if np.ndim(values) == 0:
        return f"{float(values):.6g}"
    flat = np.ravel(np.asarray(values, dtype=np.float64))
    shown = np.array2string(flat[:count], precision=5, separator=", ", suppress_small=False)
    return shown[:-1] + ", ...]" if flat.size > count else shown


def close(got: Any, expected: Any, rtol: float, atol_scale: float) -> bool:
    """Whether got matches expected: same shape, finite, within rtol and an atol scaled by the largest |expected|."""
    got = np.asarray(got, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if got.shape != expected.shape or not np.all(np.isfinite(got)):
        return False
    atol = atol_scale * max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    return bool(np.allclose(got, expected, rtol=rtol, atol=atol))


def tolerances(dtype: np.dtype) -> tuple[float, float]:
    """(rtol, atol scale) for a correct answer computed in `dtype`."""
    return (2e-4, 2e-4) if dtype == np.float32 else (1e-6, 1e-8)


def compare(got: np.ndarray, expected: np.ndarray, name: str, mistakes: Sequence[Mistake] = (), generic: bool = True,
            fallback_hint: Callable[[np.ndarray], str | None] | None = None) -> list[str]:
    """Lines that describe how `got` differs from `expected` (the numbers, and any known mistake it matches).

    Returns [] when `got` is right.
    """
    rtol, atol_scale = tolerances(expected.dtype)
    if close(got, expected, rtol, atol_scale):
        return []
    got64 = np.asarray(got, dtype=np.float64)
    expected64 = np.asarray(expected, dtype=np.float64)
    error = np.abs(got64 - expected64)
    where = np.unravel_index(int(np.argmax(error)), error.shape) if error.ndim else ()
    lines = [
        f"  {name} differs from the reference: max |got - expected| = {error.max():.3g}"
        + (f" at index {tuple(int(i) for i in where)}" if where else ""),
        f"  expected {name} = {fmt(expected64)}",
        f"  got      {name} = {fmt(got64)}",
    ]
    # A wrong answer "matches" a mistake when it agrees with it far better than with the right answer.
    match_rtol, match_atol = max(rtol, 1e-5) * 10, max(atol_scale, 1e-7) * 10
    hints = []
    for hint, compute in mistakes:
        try:
            wrong = compute()
        except Exception:  # a mistake that cannot even be computed for this case cannot be the learner's
            continue
        if close(got64, wrong, match_rtol, match_atol) and not close(wrong, expected64, rtol, atol_scale):
            hints.append(hint)
    if not hints and generic:
        hints.extend(_generic_hints(got64, expected64))
    if not hints and fallback_hint is not None:
        hints.extend(hint for hint in [fallback_hint(got)] if hint)
    lines.extend(f"  Hint: {hint}" for hint in dict.fromkeys(hints))
    return lines


def _generic_hints(got: np.ndarray, expected: np.ndarray) -> list[str]:
    if close(got, -expected, 1e-4, 1e-6):
        return ["your answer is the reference with the opposite sign"]
    denominator = float(np.sum(expected * expected))
    if denominator > 0:
        factor = float(np.sum(got * expected)) / denominator
        if abs(factor - 1.0) > 1e-3 and close(got, factor * expected, 1e-4, 1e-6):
            return [f"your answer is the reference times {factor:.5g}: a missing or extra constant factor"]
    return []
