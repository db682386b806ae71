"""Checkers for the course's exercises: they say what is wrong, not only that something is.

Each ``check_*`` function takes the learner's function, runs it on a few seeded random cases and compares the answer
with bnnotes' reference (`bnnotes.numpy_bn`, or a small NumPy reference defined here where bnnotes has none). The
cases are chosen so that the mistakes people really make give clearly different answers: a small batch, so that the
biased and unbiased variances differ; one case with a large eps, so that eps inside and outside the square root
differ; a non-uniform upstream gradient; gamma != 1; means far from 0; and N != D, so that the axes cannot be confused.

On success a checker prints one line. On failure it raises ``AssertionError`` with the case that failed, expected
against got (a few numbers), and, when the wrong answer equals a known mistake (computed here and compared), a hint
that names the mistake.

An exercise that is not attempted yet is not a failure: in the Colab edition each solution is a stub whose body raises
``NotImplementedError("Hint: ...")``, and a predicted value is ``None``. A checker given ``None``, or a function that
raises ``NotImplementedError``, prints that the exercise is not attempted yet and returns ``None`` without raising, so
that "Run all" runs through a notebook whose exercises are still open. (Every public checker is wrapped in
`_reports_not_attempted`, and calls the learner's function through `_call`.)

>>> import numpy as np
>>> def my_projection(g, x_hat):
...     return g - g.mean(axis=0) - x_hat * (g * x_hat).mean(axis=0)
>>> check_gradient_projection(my_projection)
check_gradient_projection: all 3 cases match the reference. Well done.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bnnotes import numpy_bn

__all__ = [
    "check_whitening",
    "check_forward",
    "check_backward",
    "check_conv_forward",
    "check_running_stats",
    "check_fold",
    "check_momentum_conversion",
    "check_renorm_forward",
    "check_ghost_batch_norm",
    "check_gradient_projection",
    "renorm_forward_reference",
    "ghost_batch_norm_reference",
    "zca_whitening_reference",
]

# A known mistake: the hint that names it, and the (lazily computed) answer it produces.
Mistake = tuple[str, Callable[[], Any]]


# ----------------------------------------------------------------------------------------------------------------------
# NumPy references for the exercises bnnotes.numpy_bn does not cover.
# ----------------------------------------------------------------------------------------------------------------------


def zca_whitening_reference(x: np.ndarray, eps: float) -> np.ndarray:
    """Full ZCA whitening of x (N, D): ``(x - mean) @ U diag(1/sqrt(lambda + eps)) U^T``.

    The covariance is the biased one, (x - mean)^T (x - mean) / N, with eigendecomposition U diag(lambda) U^T. The
    output's covariance is U diag(lambda / (lambda + eps)) U^T, the identity as eps -> 0. ZCA is the whitening matrix
    that is symmetric, the one that moves the data least.

    >>> x = np.random.default_rng(0).normal(size=(100, 3)) @ np.array([[2.0, 0, 0], [1, 1, 0], [0, 0, 3]])
    >>> xw = zca_whitening_reference(x, eps=1e-12)
    >>> bool(np.allclose(np.cov(xw, rowvar=False, bias=True), np.eye(3)))
    True
    """
    x = np.asarray(x, dtype=np.float64)
    x_centered = x - x.mean(axis=0)
    covariance = x_centered.T @ x_centered / x.shape[0]
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    whitening = eigenvectors @ np.diag(1.0 / np.sqrt(eigenvalues + eps)) @ eigenvectors.T
    return x_centered @ whitening


def renorm_forward_reference(
    x: np.ndarray,
    gamma: np.ndarray,
    beta: np.ndarray,
    running_mean: np.ndarray,
    running_std: np.ndarray,
    r_max: float,
    d_max: float,
    eps: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Batch Renormalization's training forward (Ioffe, 2017, Algorithm 1), x of shape (N, D).

    sigma_B = sqrt(biased batch variance + eps); r = clip(sigma_B / running_std, 1/r_max, r_max);
    d = clip((mu_B - running_mean) / running_std, -d_max, d_max); y = gamma * ((x - mu_B) / sigma_B * r + d) + beta.
    Returns (y (N, D), r (D,), d (D,)). In training r and d are constants for the gradient (stop_gradient).

    >>> x = np.array([[0.0], [2.0]])
    >>> y, r, d = renorm_forward_reference(x, np.ones(1), np.zeros(1), np.zeros(1), np.ones(1), 3.0, 5.0, 0.0)
    >>> y.ravel().tolist(), r.tolist(), d.tolist()
    ([0.0, 2.0], [1.0], [1.0])
    """
    x = np.asarray(x, dtype=np.float64)
    batch_mean = x.mean(axis=0)
    batch_std = np.sqrt(x.var(axis=0) + eps)
    r = np.clip(batch_std / running_std, 1.0 / r_max, r_max)
    d = np.clip((batch_mean - running_mean) / running_std, -d_max, d_max)
    x_hat = (x - batch_mean) / batch_std * r + d
    return gamma * x_hat + beta, r, d


def ghost_batch_norm_reference(
    x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, virtual_batch_size: int, eps: float
) -> np.ndarray:
    """Ghost batch norm (Hoffer et al., 2017): `numpy_bn.forward` on consecutive chunks of `virtual_batch_size` rows.

    x: (N, D) with N a multiple of virtual_batch_size. Returns y (N, D).

    >>> x = np.array([[0.0], [2.0], [10.0], [30.0]])
    >>> ghost_batch_norm_reference(x, np.ones(1), np.zeros(1), 2, 0.0).ravel().tolist()
    [-1.0, 1.0, -1.0, 1.0]
    """
    x = np.asarray(x)
    if x.shape[0] % virtual_batch_size:
        raise ValueError(f"N={x.shape[0]} is not a multiple of virtual_batch_size={virtual_batch_size}")
    chunks = [
        numpy_bn.forward(x[start : start + virtual_batch_size], gamma, beta, eps)[0]
        for start in range(0, x.shape[0], virtual_batch_size)
    ]
    return np.concatenate(chunks, axis=0)


# ----------------------------------------------------------------------------------------------------------------------
# The machinery shared by the checkers.
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Case:
    checker: str
    index: int
    total: int
    description: str

    def header(self) -> str:
        return f"{self.checker} failed on case {self.index + 1} of {self.total} ({self.description})"


class _NotAttempted(Exception):
    """The learner's function is still the stub: it raised NotImplementedError (message: its hint)."""


def _reports_not_attempted(checker: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a checker so that a stub (None, or a function raising NotImplementedError) is reported, not failed."""

    @functools.wraps(checker)
    def wrapper(*answers: Any, **options: Any) -> Any:
        name = checker.__name__
        if any(answer is None for answer in (*answers, *options.values())):
            print(f"{name}: not attempted yet (your answer is still None): write it, then run this cell again.")
            return None
        try:
            return checker(*answers, **options)
        except _NotAttempted as stub:
            hint = f" {stub}" if str(stub) else ""
            print(f"{name}: not attempted yet (your function raises NotImplementedError).{hint} "
                  "Write it, then run this cell again.")
            return None

    return wrapper


def _check_callable(fn: Any, checker: str, signature: str) -> None:
    if not callable(fn):
        raise TypeError(f"{checker} expects your function {signature}, got {type(fn).__name__} {fn!r:.60}")


def _fmt(values: Any, count: int = 4) -> str:
    flat = np.ravel(np.asarray(values, dtype=np.float64))
    shown = np.array2string(flat[:count], precision=5, separator=", ", suppress_small=False)
    return shown[:-1] + ", ...]" if flat.size > count else shown


def _call(fn: Callable, args: Sequence[Any], case: _Case, exception_hint: str | None = None,
          hint_when: Sequence[str] = ("broadcast",)) -> Any:
    """Call the learner's function on copies of the inputs; an exception becomes an AssertionError naming the case.

    exception_hint is added when the exception's message contains one of the words in `hint_when`.
    """
    # Copies: a function that changes its inputs in place must not change the reference's.
    copies = [np.array(a, copy=True) if isinstance(a, np.ndarray) else a for a in args]
    try:
        return fn(*copies)
    except NotImplementedError as error:  # the Colab edition's stub: not attempted yet, not wrong
        raise _NotAttempted(str(error)) from error
    except Exception as error:  # the learner's bug, reported with the case that triggered it
        lines = [case.header() + ":", f"  your function raised {type(error).__name__}: {error}"]
        if exception_hint and any(word in str(error) for word in hint_when):
            lines.append(f"  Hint: {exception_hint}")
        raise AssertionError("\n".join(lines)) from error


def _as_float_array(value: Any, name: str, expected: np.ndarray, case: _Case, shape_hints: dict | None = None):
    """The learner's output as an array of the expected shape and dtype, or an AssertionError that says why not."""
    if value is None:
        raise AssertionError(f"{case.header()}:\n  {name} is None: did you forget a `return`?")
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], dict):
        raise AssertionError(
            f"{case.header()}:\n  {name} is a tuple (y, cache); this exercise expects the array {name} only"
        )
    try:
        got = np.asarray(value)
    except Exception as error:
        message = f"{case.header()}:\n  {name} is not array-like ({type(value).__name__}): {error}"
        raise AssertionError(message) from error
    if got.dtype.kind not in "fiu":
        raise AssertionError(
            f"{case.header()}:\n  {name} has dtype {got.dtype}; expected real floating-point numbers ({expected.dtype})"
        )
    if got.shape != expected.shape:
        lines = [f"{case.header()}:", f"  {name} has shape {got.shape}, expected {expected.shape}"]
        hint = (shape_hints or {}).get(got.shape)
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
        raise AssertionError(f"{case.header()}:\n  {name} has dtype {got.dtype}: {detail}")
    if not np.all(np.isfinite(got)):
        bad = int(np.sum(~np.isfinite(got)))
        raise AssertionError(
            f"{case.header()}:\n  {name} has {bad} non-finite entries (nan or inf), for example {_fmt(got)}\n"
            "  Hint: a division by zero? The variance can be 0; eps belongs under the square root."
        )
    return got


def _close(got: Any, expected: Any, rtol: float, atol_scale: float) -> bool:
    got = np.asarray(got, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if got.shape != expected.shape or not np.all(np.isfinite(got)):
        return False
    atol = atol_scale * max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    return bool(np.allclose(got, expected, rtol=rtol, atol=atol))


def _tolerances(dtype: np.dtype) -> tuple[float, float]:
    """(rtol, atol scale) for a correct answer computed in `dtype`."""
    return (2e-4, 2e-4) if dtype == np.float32 else (1e-6, 1e-8)


def _compare(
    got: np.ndarray,
    expected: np.ndarray,
    name: str,
    mistakes: Sequence[Mistake] = (),
    generic: bool = True,
) -> list[str]:
    """Lines that describe how `got` differs from `expected` (the numbers, and any known mistake it matches).

    Returns [] when `got` is right. `_raise_on` turns the lines of one case into an AssertionError.
    """
    rtol, atol_scale = _tolerances(expected.dtype)
    if _close(got, expected, rtol, atol_scale):
        return []
    got64 = np.asarray(got, dtype=np.float64)
    expected64 = np.asarray(expected, dtype=np.float64)
    error = np.abs(got64 - expected64)
    where = np.unravel_index(int(np.argmax(error)), error.shape) if error.ndim else ()
    lines = [
        f"  {name} differs from the reference: max |got - expected| = {error.max():.3g}"
        + (f" at index {tuple(int(i) for i in where)}" if where else ""),
        f"  expected {name} = {_fmt(expected64)}",
        f"  got      {name} = {_fmt(got64)}",
    ]
    # A wrong answer "matches" a mistake when it agrees with it far better than with the right answer.
    match_rtol, match_atol = max(rtol, 1e-5) * 10, max(atol_scale, 1e-7) * 10
    hints = []
    for hint, compute in mistakes:
        try:
            wrong = compute()
        except Exception:  # a mistake that cannot even be computed for this case cannot be the learner's
            continue
        if _close(got64, wrong, match_rtol, match_atol) and not _close(wrong, expected64, rtol, atol_scale):
            hints.append(hint)
    if not hints and generic:
        hints.extend(_generic_hints(got64, expected64))
    for hint in dict.fromkeys(hints):
        lines.append(f"  Hint: {hint}")
    return lines


def _raise_on(case: _Case, *differences: list[str]) -> None:
    """Raise one AssertionError listing every output of the case that differs (the lines from `_compare`)."""
    lines = [line for difference in differences for line in difference]
    if lines:
        raise AssertionError("\n".join([f"{case.header()}:"] + lines))


def _generic_hints(got: np.ndarray, expected: np.ndarray) -> list[str]:
    if _close(got, -expected, 1e-4, 1e-6):
        return ["your answer is the reference with the opposite sign"]
    denominator = float(np.sum(expected * expected))
    if denominator > 0:
        factor = float(np.sum(got * expected)) / denominator
        if abs(factor - 1.0) > 1e-3 and _close(got, factor * expected, 1e-4, 1e-6):
            return [f"your answer is the reference times {factor:.5g}: a missing or extra constant factor"]
    return []


def _success(checker: str, total: int) -> None:
    print(f"{checker}: all {total} cases match the reference. Well done.")


def _per_feature_stats(x: np.ndarray, axis: Any = 0, ddof: int = 0) -> tuple[np.ndarray, np.ndarray]:
    return x.mean(axis=axis, keepdims=True), x.var(axis=axis, ddof=ddof, keepdims=True)


def _normalize(x: np.ndarray, eps: float, axis: Any = 0, ddof: int = 0, eps_outside: bool = False,
               center: bool = True, sqrt: bool = True) -> np.ndarray:
    """Per-feature normalization with the knobs that known mistakes turn (all of them wrong except the defaults)."""
    x = np.asarray(x, dtype=np.float64)
    mean, var = _per_feature_stats(x, axis, ddof)
    numerator = x - mean if center else x
    if not sqrt:
        return numerator / (var + eps)
    return numerator / (np.sqrt(var) + eps) if eps_outside else numerator / np.sqrt(var + eps)


# Hints shared by the forward-type checkers.
_HINT_UNBIASED = (
    "this matches normalizing with the UNBIASED variance (dividing by N-1, np.var(..., ddof=1) or torch.var's "
    "default). Algorithm 1 normalizes with the BIASED batch variance (divide by N); the unbiased one is only used "
    "for the running estimate."
)
_HINT_EPS_OUTSIDE = (
    "this matches (x - mean) / (sqrt(var) + eps): eps belongs INSIDE the square root, (x - mean) / sqrt(var + eps)."
)
_HINT_NO_EPS = "this matches normalizing without eps: divide by sqrt(var + eps), not sqrt(var)."
_HINT_NO_SQRT = "this matches dividing by the variance: divide by the standard deviation sqrt(var + eps)."
_HINT_NOT_CENTERED = "this matches forgetting to subtract the batch mean before dividing by the standard deviation."
_HINT_ROWS = (
    "this matches normalizing each ROW (example) over its features (axis=1): batch norm takes the statistics of "
    "each FEATURE (column) over the batch, axis=0."
)
_HINT_GAMMA_BETA_SWAPPED = "this matches beta * x_hat + gamma: gamma scales, beta shifts (y = gamma * x_hat + beta)."
_HINT_NO_AFFINE = "this matches x_hat without the scale and shift: return gamma * x_hat + beta."
_HINT_GLOBAL = "this matches one mean and variance for the whole array: the statistics are per feature (column)."


def _rng_features(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """(n, d) data with means far from 0 and features on different scales."""
    means = rng.uniform(-6.0, 6.0, size=d)
    scales = np.exp(rng.uniform(np.log(0.3), np.log(4.0), size=d))
    return means + scales * rng.standard_normal((n, d))


def _rng_affine(rng: np.random.Generator, d: int) -> tuple[np.ndarray, np.ndarray]:
    gamma = rng.uniform(0.5, 2.0, size=d) * rng.choice([-1.0, 1.0], size=d)
    beta = rng.uniform(-2.0, 2.0, size=d)
    return gamma, beta


# ----------------------------------------------------------------------------------------------------------------------
# The checkers.
# ----------------------------------------------------------------------------------------------------------------------


@_reports_not_attempted
def check_forward(fn: Callable[..., np.ndarray]) -> None:
    """Check ``fn(x, gamma, beta, eps) -> y``: training-mode BN (Ioffe & Szegedy, 2015, Algorithm 1).

    x: (N, D); gamma, beta: (D,); statistics per feature over the batch, with the biased variance. y: (N, D) in x's
    dtype. Reference: `bnnotes.numpy_bn.forward`.

    >>> def my_forward(x, gamma, beta, eps):
    ...     return gamma * (x - x.mean(axis=0)) / np.sqrt(x.var(axis=0) + eps) + beta
    >>> check_forward(my_forward)
    check_forward: all 4 cases match the reference. Well done.
    """
    checker = "check_forward"
    _check_callable(fn, checker, "fn(x, gamma, beta, eps) -> y")
    specs = [((4, 3), 0, 1e-5, np.float64), ((6, 5), 1, 0.5, np.float64), ((3, 7), 2, 1e-3, np.float64),
             ((16, 5), 3, 1e-5, np.float32)]
    for index, (shape, seed, eps, dtype) in enumerate(specs):
        rng = np.random.default_rng(seed)
        x = _rng_features(rng, *shape).astype(dtype)
        gamma, beta = (v.astype(dtype) for v in _rng_affine(rng, shape[1]))
        description = f"x.shape={shape}, dtype={np.dtype(dtype).name}, seed={seed}, eps={eps}"
        case = _Case(checker, index, len(specs), description)
        expected = numpy_bn.forward(x, gamma, beta, eps)[0]
        out = _call(fn, (x, gamma, beta, eps), case, "gamma and beta have shape (D,) and broadcast over the rows")
        got = _as_float_array(out, "y", expected, case)

        def affine(x_hat: np.ndarray) -> np.ndarray:
            return gamma * x_hat + beta

        mistakes = [
            (_HINT_UNBIASED, lambda: affine(_normalize(x, eps, ddof=1))),
            (_HINT_EPS_OUTSIDE, lambda: affine(_normalize(x, eps, eps_outside=True))),
            (_HINT_NO_EPS, lambda: affine(_normalize(x, 0.0))),
            (_HINT_NO_SQRT, lambda: affine(_normalize(x, eps, sqrt=False))),
            (_HINT_NOT_CENTERED, lambda: affine(_normalize(x, eps, center=False))),
            (_HINT_ROWS, lambda: affine(_normalize(x, eps, axis=1))),
            (_HINT_GLOBAL, lambda: affine(_normalize(x, eps, axis=None))),
            (_HINT_GAMMA_BETA_SWAPPED, lambda: beta * _normalize(x, eps) + gamma),
            (_HINT_NO_AFFINE, lambda: _normalize(x, eps)),
        ]
        _raise_on(case, _compare(got, expected, "y", mistakes))
    _success(checker, len(specs))


def _backward_variant(dy: np.ndarray, x: np.ndarray, gamma: np.ndarray, eps: float, ddof: int = 0,
                      mean_term: bool = True, var_term: bool = True, use_gamma: bool = True,
                      eps_outside: bool = False, sums_not_means: bool = False) -> np.ndarray:
    """dx of per-feature BN with the knobs that known mistakes turn (all of them wrong except the defaults)."""
    n = x.shape[0]
    x_centered = x - x.mean(axis=0)
    var = (x_centered**2).sum(axis=0) / (n - ddof)
    std = np.sqrt(var) + eps if eps_outside else np.sqrt(var + eps)
    dx_hat = dy * gamma if use_gamma else dy
    # The chain rule through std(var): d std / d var = 1 / (2 sqrt(var)) outside, 1 / (2 std) inside.
    dstd_dvar = 1.0 / (2.0 * np.sqrt(var)) if eps_outside else 1.0 / (2.0 * std)
    dvar = np.sum(dx_hat * x_centered, axis=0) * (-1.0 / std**2) * dstd_dvar
    dmean = -np.sum(dx_hat, axis=0) / std
    divisor = 1.0 if sums_not_means else n
    dx = dx_hat / std
    if var_term:
        dx = dx + dvar * 2.0 * x_centered / (1.0 if sums_not_means else n - ddof)
    if mean_term:
        dx = dx + dmean / divisor
    return dx


@_reports_not_attempted
def check_backward(fn: Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray]]) -> None:
    """Check ``fn(dy, x, gamma, beta, eps) -> (dx, dgamma, dbeta)``: the gradients of training-mode BN.

    dy, x: (N, D); gamma, beta: (D,). dx: (N, D); dgamma, dbeta: (D,). Reference: `bnnotes.numpy_bn.backward`.

    >>> def my_backward(dy, x, gamma, beta, eps):
    ...     n = x.shape[0]
    ...     inv_std = 1.0 / np.sqrt(x.var(axis=0) + eps)
    ...     x_hat = (x - x.mean(axis=0)) * inv_std
    ...     dgamma, dbeta = (dy * x_hat).sum(axis=0), dy.sum(axis=0)
    ...     dx = gamma * inv_std / n * (n * dy - dbeta - x_hat * dgamma)
    ...     return dx, dgamma, dbeta
    >>> check_backward(my_backward)
    check_backward: all 4 cases match the reference. Well done.
    """
    checker = "check_backward"
    _check_callable(fn, checker, "fn(dy, x, gamma, beta, eps) -> (dx, dgamma, dbeta)")
    specs = [((4, 3), 0, 1e-5), ((6, 5), 1, 0.5), ((3, 7), 2, 1e-3), ((10, 4), 3, 1e-5)]
    for index, (shape, seed, eps) in enumerate(specs):
        rng = np.random.default_rng(seed)
        x = _rng_features(rng, *shape)
        gamma, beta = _rng_affine(rng, shape[1])
        # A non-uniform upstream gradient: a constant dy has a zero dx and hides bugs.
        dy = rng.standard_normal(shape) * rng.uniform(0.5, 2.0, size=shape[1]) + rng.uniform(-1, 1, size=shape[1])
        case = _Case(checker, index, len(specs), f"x.shape={shape}, seed={seed}, eps={eps}")
        y, cache = numpy_bn.forward(x, gamma, beta, eps)
        dx_ref, dgamma_ref, dbeta_ref = numpy_bn.backward(dy, cache)
        out = _call(fn, (dy, x, gamma, beta, eps), case)
        if not isinstance(out, (tuple, list)) or len(out) != 3:
            what = type(out).__name__
            if isinstance(out, (tuple, list)):
                what = f"a {what} of length {len(out)}"
            raise AssertionError(f"{case.header()}:\n  expected a tuple (dx, dgamma, dbeta), got {what}")
        n, d = shape
        sum_hint = {(n, d): "it was not summed over the batch: dgamma and dbeta sum over the N examples (axis=0)",
                    (n,): "it was summed over the wrong axis: sum over the batch, axis=0, to get one entry per feature"}
        dx = _as_float_array(out[0], "dx", dx_ref, case)
        dgamma = _as_float_array(out[1], "dgamma", dgamma_ref, case, sum_hint)
        dbeta = _as_float_array(out[2], "dbeta", dbeta_ref, case, sum_hint)
        x_hat = cache["x_hat"]
        dbeta_differences = _compare(dbeta, dbeta_ref, "dbeta", [
            ("dgamma and dbeta are swapped: dbeta = sum(dy), dgamma = sum(dy * x_hat)", lambda: dgamma_ref),
            ("this matches mean(dy): dbeta is the SUM of dy over the batch", lambda: dy.mean(axis=0)),
        ])
        dgamma_differences = _compare(dgamma, dgamma_ref, "dgamma", [
            ("dgamma and dbeta are swapped: dbeta = sum(dy), dgamma = sum(dy * x_hat)", lambda: dbeta_ref),
            ("this matches sum(dy * x): dgamma multiplies dy by the NORMALIZED input x_hat", lambda: (dy * x).sum(0)),
            ("this matches sum(dy * y): dgamma multiplies dy by x_hat, not by the output y", lambda: (dy * y).sum(0)),
            ("this matches mean(dy * x_hat): dgamma is the SUM over the batch", lambda: (dy * x_hat).mean(axis=0)),
            (_HINT_UNBIASED, lambda: (dy * _normalize(x, eps, ddof=1)).sum(axis=0)),
            (_HINT_EPS_OUTSIDE, lambda: (dy * _normalize(x, eps, eps_outside=True)).sum(axis=0)),
            (_HINT_NO_EPS, lambda: (dy * _normalize(x, 0.0)).sum(axis=0)),
        ])
        dx_differences = _compare(dx, dx_ref, "dx", [
            ("this matches dx without the MEAN term: the gradient also flows through the batch mean mu_B, "
             "contributing -mean(dy) (times gamma / sigma)",
             lambda: _backward_variant(dy, x, gamma, eps, mean_term=False)),
            ("this matches dx without the VARIANCE term: the gradient also flows through the batch variance "
             "sigma_B^2, contributing -x_hat * mean(dy * x_hat) (times gamma / sigma)",
             lambda: _backward_variant(dy, x, gamma, eps, var_term=False)),
            ("this matches dx = gamma * dy / sigma, treating the batch mean and variance as constants: the gradient "
             "must flow through mu_B and sigma_B^2 (Ioffe & Szegedy, Section 2)",
             lambda: _backward_variant(dy, x, gamma, eps, mean_term=False, var_term=False)),
            ("this matches dx without the factor gamma: dl/dx_hat = dl/dy * gamma",
             lambda: _backward_variant(dy, x, gamma, eps, use_gamma=False)),
            (_HINT_UNBIASED, lambda: _backward_variant(dy, x, gamma, eps, ddof=1)),
            ("this matches the gradient of (x - mean) / (sqrt(var) + eps): eps belongs inside the square root",
             lambda: _backward_variant(dy, x, gamma, eps, eps_outside=True)),
            ("this matches sums where the means belong (a missing 1/N): dx = gamma / sigma * (dy - mean(dy) - "
             "x_hat * mean(dy * x_hat))", lambda: _backward_variant(dy, x, gamma, eps, sums_not_means=True)),
            (_HINT_NO_EPS, lambda: _backward_variant(dy, x, gamma, 0.0)),
        ])
        _raise_on(case, dx_differences, dgamma_differences, dbeta_differences)
    _success(checker, len(specs))


@_reports_not_attempted
def check_conv_forward(fn: Callable[..., np.ndarray]) -> None:
    """Check ``fn(x, gamma, beta, eps) -> y`` for a convolutional input x (N, C, H, W).

    The statistics are per channel over N, H and W; gamma, beta: (C,). y: (N, C, H, W) in x's dtype.
    Reference: `bnnotes.numpy_bn.forward`.

    >>> def my_conv_forward(x, gamma, beta, eps):
    ...     mean = x.mean(axis=(0, 2, 3), keepdims=True)
    ...     var = x.var(axis=(0, 2, 3), keepdims=True)
    ...     return gamma[:, None, None] * (x - mean) / np.sqrt(var + eps) + beta[:, None, None]
    >>> check_conv_forward(my_conv_forward)
    check_conv_forward: all 4 cases match the reference. Well done.
    """
    checker = "check_conv_forward"
    _check_callable(fn, checker, "fn(x, gamma, beta, eps) -> y")
    specs = [((2, 3, 4, 5), 0, 1e-5, np.float64), ((3, 4, 2, 3), 1, 0.5, np.float64),
             ((2, 2, 3, 5), 2, 1e-3, np.float64), ((4, 3, 5, 2), 3, 1e-5, np.float32)]
    for index, (shape, seed, eps, dtype) in enumerate(specs):
        rng = np.random.default_rng(seed)
        n, c, h, w = shape
        means = rng.uniform(-6.0, 6.0, size=(1, c, 1, 1))
        scales = np.exp(rng.uniform(np.log(0.3), np.log(4.0), size=(1, c, 1, 1)))
        x = (means + scales * rng.standard_normal(shape)).astype(dtype)
        gamma, beta = (v.astype(dtype) for v in _rng_affine(rng, c))
        description = f"x.shape={shape}, dtype={np.dtype(dtype).name}, seed={seed}, eps={eps}"
        case = _Case(checker, index, len(specs), description)
        expected = numpy_bn.forward(x, gamma, beta, eps)[0]
        out = _call(fn, (x, gamma, beta, eps), case,
                       "a (C,) vector broadcasts against the LAST axis; reshape gamma and beta to (1, C, 1, 1)")
        got = _as_float_array(out, "y", expected, case)
        g4, b4 = gamma.reshape(1, c, 1, 1), beta.reshape(1, c, 1, 1)
        x64 = x.astype(np.float64)

        def channels_last_reshape_bug() -> np.ndarray:
            rows = x64.reshape(-1, c)  # mixes channels: the channel axis was not moved last first
            return (gamma * _normalize(rows, eps) + beta).reshape(shape)

        mistakes = [
            ("this matches statistics over N only, one mean and variance per (channel, position): in a conv layer "
             "each channel's statistics are taken over N, H and W (axis=(0, 2, 3))",
             lambda: g4 * _normalize(x64, eps, axis=0) + b4),
            ("this matches per-example statistics over (H, W) (instance norm): batch norm also averages over the "
             "batch, axis=(0, 2, 3)", lambda: g4 * _normalize(x64, eps, axis=(2, 3)) + b4),
            ("this matches per-example statistics over (C, H, W) (layer norm): batch norm takes them per channel "
             "over axis=(0, 2, 3)", lambda: g4 * _normalize(x64, eps, axis=(1, 2, 3)) + b4),
            (_HINT_GLOBAL.replace("feature (column)", "channel"), lambda: g4 * _normalize(x64, eps, axis=None) + b4),
            ("this matches x.reshape(-1, C), which mixes channels: move the channel axis last first, "
             "x.transpose(0, 2, 3, 1).reshape(-1, C), or reduce over axis=(0, 2, 3) directly",
             channels_last_reshape_bug),
            (_HINT_UNBIASED, lambda: g4 * _normalize(x64, eps, axis=(0, 2, 3), ddof=1) + b4),
            (_HINT_EPS_OUTSIDE, lambda: g4 * _normalize(x64, eps, axis=(0, 2, 3), eps_outside=True) + b4),
            (_HINT_NO_EPS, lambda: g4 * _normalize(x64, 0.0, axis=(0, 2, 3)) + b4),
            (_HINT_GAMMA_BETA_SWAPPED, lambda: b4 * _normalize(x64, eps, axis=(0, 2, 3)) + g4),
            (_HINT_NO_AFFINE, lambda: _normalize(x64, eps, axis=(0, 2, 3))),
        ]
        _raise_on(case, _compare(got, expected, "y", mistakes))
    _success(checker, len(specs))


@_reports_not_attempted
def check_running_stats(fn: Callable[..., tuple[np.ndarray, np.ndarray]]) -> None:
    """Check ``fn(running_mean, running_var, x, momentum) -> (new_mean, new_var)`` in PyTorch's convention.

    new = (1 - momentum) * old + momentum * batch, where the batch variance is the UNBIASED one (divide by N - 1).
    running_mean, running_var: (D,); x: (N, D). Reference: `bnnotes.numpy_bn.BatchNorm`.

    >>> def my_update(running_mean, running_var, x, momentum):
    ...     new_mean = (1 - momentum) * running_mean + momentum * x.mean(axis=0)
    ...     new_var = (1 - momentum) * running_var + momentum * x.var(axis=0, ddof=1)
    ...     return new_mean, new_var
    >>> check_running_stats(my_update)
    check_running_stats: all 3 cases match the reference. Well done.
    """
    checker = "check_running_stats"
    _check_callable(fn, checker, "fn(running_mean, running_var, x, momentum) -> (new_mean, new_var)")
    specs = [((4, 3), 0, 0.1), ((3, 5), 1, 0.3), ((8, 2), 2, 0.05)]
    for index, (shape, seed, momentum) in enumerate(specs):
        rng = np.random.default_rng(seed)
        x = _rng_features(rng, *shape)
        running_mean = rng.uniform(-3.0, 3.0, size=shape[1])
        running_var = rng.uniform(0.5, 5.0, size=shape[1])
        case = _Case(checker, index, len(specs), f"x.shape={shape}, seed={seed}, momentum={momentum}")
        layer = numpy_bn.BatchNorm(shape[1], momentum=momentum)
        layer.running_mean, layer.running_var = running_mean.copy(), running_var.copy()
        layer.forward(x)
        mean_ref, var_ref = layer.running_mean, layer.running_var
        out = _call(fn, (running_mean, running_var, x, momentum), case)
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise AssertionError(f"{case.header()}:\n  expected a tuple (new_mean, new_var), got {type(out).__name__}"
                                 + (" (an in-place update must still return the new values)" if out is None else ""))
        axis_hint = {(shape[0],): "this has one entry per example: average over the batch, axis=0"}
        new_mean = _as_float_array(out[0], "new_mean", mean_ref, case, axis_hint)
        new_var = _as_float_array(out[1], "new_var", var_ref, case, axis_hint)
        batch_mean, unbiased, biased = x.mean(0), x.var(0, ddof=1), x.var(0)
        keras = ("this matches the Keras/TensorFlow convention new = momentum * old + (1 - momentum) * batch: in "
                 "PyTorch, momentum is the weight of the NEW batch, new = (1 - momentum) * old + momentum * batch")
        mean_differences = _compare(new_mean, mean_ref, "new_mean", [
            (keras, lambda: momentum * running_mean + (1 - momentum) * batch_mean),
            ("the running mean was not updated: you returned the old value", lambda: running_mean),
            ("this is the batch mean alone: blend it into the running mean with the momentum", lambda: batch_mean),
        ])
        var_differences = _compare(new_var, var_ref, "new_var", [
            (keras, lambda: momentum * running_var + (1 - momentum) * unbiased),
            (keras + "; also, PyTorch's running variance uses the UNBIASED batch variance (Keras's uses the biased)",
             lambda: momentum * running_var + (1 - momentum) * biased),
            ("this matches a running variance fed with the BIASED batch variance: PyTorch feeds it the UNBIASED one, "
             "x.var(axis=0, ddof=1) = biased * N / (N - 1)", lambda: (1 - momentum) * running_var + momentum * biased),
            ("this matches a running average of the standard deviation: it averages the variance",
             lambda: (1 - momentum) * running_var + momentum * np.sqrt(unbiased)),
            ("the running variance was not updated: you returned the old value", lambda: running_var),
            ("this is the batch variance alone: blend it into the running variance with the momentum",
             lambda: unbiased),
        ])
        _raise_on(case, mean_differences, var_differences)
    _success(checker, len(specs))


@_reports_not_attempted
def check_fold(fn: Callable[..., tuple[np.ndarray, np.ndarray]]) -> None:
    """Check ``fn(weight, bias, gamma, beta, running_mean, running_var, eps) -> (folded_weight, folded_bias)``.

    The model is a Linear layer, y = x @ weight.T + bias with weight (out, in), followed by BN in eval mode over its
    `out` features; the folded Linear computes the same function in one layer:
    scale = gamma / sqrt(running_var + eps), folded_weight = weight * scale[:, None],
    folded_bias = (bias - running_mean) * scale + beta. Reference: `bnnotes.numpy_bn.inference` composed with the
    Linear layer.

    >>> def my_fold(weight, bias, gamma, beta, running_mean, running_var, eps):
    ...     scale = gamma / np.sqrt(running_var + eps)
    ...     return weight * scale[:, None], (bias - running_mean) * scale + beta
    >>> check_fold(my_fold)
    check_fold: all 3 cases match the reference. Well done.
    """
    checker = "check_fold"
    _check_callable(
        fn, checker, "fn(weight, bias, gamma, beta, running_mean, running_var, eps) -> (folded_weight, folded_bias)"
    )
    specs = [((5, 3), 0, 1e-5), ((2, 6), 1, 0.1), ((4, 7), 2, 1e-3)]
    for index, (shape, seed, eps) in enumerate(specs):
        rng = np.random.default_rng(seed)
        out_features, in_features = shape
        weight = rng.standard_normal(shape)
        bias = rng.uniform(-2.0, 2.0, size=out_features)
        gamma, beta = _rng_affine(rng, out_features)
        running_mean = rng.uniform(-4.0, 4.0, size=out_features)
        running_var = np.exp(rng.uniform(np.log(0.05), np.log(5.0), size=out_features))
        case = _Case(checker, index, len(specs), f"weight.shape={shape}, seed={seed}, eps={eps}")
        scale = gamma / np.sqrt(running_var + eps)
        weight_ref = weight * scale[:, None]
        bias_ref = (bias - running_mean) * scale + beta
        # The definition, not the formula: the folded layer must equal Linear followed by eval-mode BN.
        probe = rng.standard_normal((9, in_features))
        composed = numpy_bn.inference(probe @ weight.T + bias, gamma, beta, running_mean, running_var, eps)
        assert np.allclose(probe @ weight_ref.T + bias_ref, composed, rtol=1e-10, atol=1e-10)
        out = _call(fn, (weight, bias, gamma, beta, running_mean, running_var, eps), case,
                       "weight is (out, in) and the BN scale has one entry per OUTPUT feature: weight * scale[:, None]")
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise AssertionError(
                f"{case.header()}:\n  expected a tuple (folded_weight, folded_bias), got {type(out).__name__}"
            )
        folded_weight = _as_float_array(out[0], "folded_weight", weight_ref, case,
                                        {shape[::-1]: "weight is (out, in), like nn.Linear's: keep that layout"})
        folded_bias = _as_float_array(out[1], "folded_bias", bias_ref, case)
        std_outside = gamma / (np.sqrt(running_var) + eps)
        weight_differences = _compare(folded_weight, weight_ref, "folded_weight", [
            ("the weight is unscaled: BN multiplies each output feature by gamma / sqrt(running_var + eps), so "
             "folded_weight = weight * scale[:, None]", lambda: weight),
            ("this matches scaling by gamma / (running_var + eps): divide by the standard deviation sqrt(running_var "
             "+ eps)", lambda: weight * (gamma / (running_var + eps))[:, None]),
            ("this matches scaling by 1 / sqrt(running_var + eps) without gamma",
             lambda: weight * (scale / gamma)[:, None]),
            (_HINT_EPS_OUTSIDE, lambda: weight * std_outside[:, None]),
        ])
        bias_differences = _compare(folded_bias, bias_ref, "folded_bias", [
            ("the bias is not shifted by the running mean: folded_bias = (bias - running_mean) * scale + beta",
             lambda: bias * scale + beta),
            ("this matches (bias - running_mean) * scale without beta: add BN's shift beta",
             lambda: (bias - running_mean) * scale),
            ("this matches bias - running_mean * scale + beta: the layer's own bias is scaled too, "
             "(bias - running_mean) * scale + beta", lambda: bias - running_mean * scale + beta),
            ("the bias is unchanged: it must go through BN too, (bias - running_mean) * scale + beta", lambda: bias),
            (_HINT_EPS_OUTSIDE, lambda: (bias - running_mean) * std_outside + beta),
        ])
        _raise_on(case, weight_differences, bias_differences)
    _success(checker, len(specs))


@_reports_not_attempted
def check_momentum_conversion(fn: Callable[[float], float]) -> None:
    """Check ``fn(keras_momentum) -> torch_momentum``.

    Keras's momentum is the weight of the OLD running value, PyTorch's the weight of the NEW batch: they sum to 1.

    >>> check_momentum_conversion(lambda keras_momentum: 1.0 - keras_momentum)
    check_momentum_conversion: all 4 cases match the reference. Well done.
    """
    checker = "check_momentum_conversion"
    _check_callable(fn, checker, "fn(keras_momentum) -> torch_momentum")
    values = [0.99, 0.9, 0.999, 0.75]
    for index, keras_momentum in enumerate(values):
        case = _Case(checker, index, len(values), f"keras_momentum={keras_momentum}")
        out = _call(fn, (keras_momentum,), case)
        is_scalar_array = isinstance(out, np.ndarray) and out.shape == () and out.dtype.kind in "fiu"
        is_number = isinstance(out, numbers.Real) or is_scalar_array
        if isinstance(out, (bool, np.bool_)) or not is_number:
            raise AssertionError(f"{case.header()}:\n  expected a real number, got {type(out).__name__} {out!r:.60}")
        expected = 1.0 - keras_momentum
        got = float(out)
        if not np.isclose(got, expected, rtol=1e-9, atol=1e-12):
            lines = [f"{case.header()}:", f"  expected torch momentum {expected:.6g}, got {got:.6g}"]
            if np.isclose(got, keras_momentum):
                lines.append("  Hint: the conventions differ: Keras's momentum weights the OLD running value "
                             "(new = m * old + (1 - m) * batch), PyTorch's the NEW batch "
                             "(new = (1 - m) * old + m * batch)")
            elif got < 0 or got > 1:
                lines.append("  Hint: a momentum is a weight between 0 and 1")
            raise AssertionError("\n".join(lines))
    _success(checker, len(values))


@_reports_not_attempted
def check_renorm_forward(fn: Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray]]) -> None:
    """Check ``fn(x, gamma, beta, running_mean, running_std, r_max, d_max, eps) -> (y, r, d)``.

    Batch Renormalization's training forward (Ioffe, 2017, Algorithm 1) for x (N, D); r, d: (D,). Reference:
    `renorm_forward_reference` (cross-checked in the tests against `bnnotes.renorm.BatchRenorm1d`).

    >>> def my_renorm(x, gamma, beta, running_mean, running_std, r_max, d_max, eps):
    ...     batch_mean, batch_std = x.mean(axis=0), np.sqrt(x.var(axis=0) + eps)
    ...     r = np.clip(batch_std / running_std, 1 / r_max, r_max)
    ...     d = np.clip((batch_mean - running_mean) / running_std, -d_max, d_max)
    ...     return gamma * ((x - batch_mean) / batch_std * r + d) + beta, r, d
    >>> check_renorm_forward(my_renorm)
    check_renorm_forward: all 3 cases match the reference. Well done.
    """
    checker = "check_renorm_forward"
    _check_callable(fn, checker, "fn(x, gamma, beta, running_mean, running_std, r_max, d_max, eps) -> (y, r, d)")
    specs = [((5, 6), 0, 2.0, 1.0, 1e-5), ((4, 8), 1, 3.0, 2.0, 0.1), ((12, 7), 2, 1.5, 0.5, 1e-3)]
    for index, (shape, seed, r_max, d_max, eps) in enumerate(specs):
        rng = np.random.default_rng(seed)
        n, d_features = shape
        x = _rng_features(rng, n, d_features)
        gamma, beta = _rng_affine(rng, d_features)
        batch_mean, batch_std = x.mean(axis=0), np.sqrt(x.var(axis=0) + eps)
        # Running statistics that put some features inside the clipping ranges and some beyond each end.
        log_ratio = np.linspace(-1.6 * np.log(r_max), 1.6 * np.log(r_max), d_features)[rng.permutation(d_features)]
        running_std = batch_std / np.exp(log_ratio)
        mean_shift = np.linspace(-2.0 * d_max, 2.0 * d_max, d_features)[rng.permutation(d_features)]
        running_mean = batch_mean - running_std * mean_shift
        args = (x, gamma, beta, running_mean, running_std, r_max, d_max, eps)
        y_ref, r_ref, d_ref = renorm_forward_reference(*args)
        description = f"x.shape={shape}, seed={seed}, r_max={r_max}, d_max={d_max}, eps={eps}"
        case = _Case(checker, index, len(specs), description)
        out = _call(fn, args, case)
        if not isinstance(out, (tuple, list)) or len(out) != 3:
            raise AssertionError(f"{case.header()}:\n  expected a tuple (y, r, d), got {type(out).__name__}")
        axis_hint = {(n,): "this has one entry per example: r and d are per feature, from statistics over axis=0"}
        y = _as_float_array(out[0], "y", y_ref, case)
        r = _as_float_array(out[1], "r", r_ref, case, axis_hint)
        d = _as_float_array(out[2], "d", d_ref, case, axis_hint)
        raw_r, raw_d = batch_std / running_std, (batch_mean - running_mean) / running_std
        unbiased_std = np.sqrt(x.var(axis=0, ddof=1) + eps)
        r_differences = _compare(r, r_ref, "r", [
            ("r is not clipped: r = clip(sigma_B / sigma, 1 / r_max, r_max)", lambda: raw_r),
            ("r is clipped to [0, r_max]: the lower bound is 1 / r_max", lambda: np.clip(raw_r, 0.0, r_max)),
            ("r is clipped to [-r_max, r_max]: the lower bound is 1 / r_max", lambda: np.clip(raw_r, -r_max, r_max)),
            ("r is upside down: r = sigma_B / sigma (batch over running), then clipped",
             lambda: np.clip(1.0 / raw_r, 1.0 / r_max, r_max)),
            ("this matches sigma_B without eps: sigma_B = sqrt(var_B + eps)",
             lambda: np.clip(np.sqrt(x.var(axis=0)) / running_std, 1.0 / r_max, r_max)),
            (_HINT_UNBIASED, lambda: np.clip(unbiased_std / running_std, 1.0 / r_max, r_max)),
        ])
        d_differences = _compare(d, d_ref, "d", [
            ("d is not clipped: d = clip((mu_B - mu) / sigma, -d_max, d_max)", lambda: raw_d),
            ("d is clipped to [0, d_max]: the range is [-d_max, d_max]", lambda: np.clip(raw_d, 0.0, d_max)),
            ("d has the wrong sign: d = (mu_B - mu) / sigma, batch minus running",
             lambda: np.clip(-raw_d, -d_max, d_max)),
            ("d is divided by the batch sigma_B: it is measured in units of the running sigma, (mu_B - mu) / sigma",
             lambda: np.clip((batch_mean - running_mean) / batch_std, -d_max, d_max)),
            ("d is clipped with r_max: d's bound is d_max", lambda: np.clip(raw_d, -r_max, r_max)),
        ])
        x_hat_bn = (x - batch_mean) / batch_std
        y_differences = _compare(y, y_ref, "y", [
            ("this is plain batch norm: renormalize with x_hat = (x - mu_B) / sigma_B * r + d",
             lambda: gamma * x_hat_bn + beta),
            ("this matches ((x - mu_B) / sigma_B + d) * r: the order is x_hat * r + d",
             lambda: gamma * (x_hat_bn + d_ref) * r_ref + beta),
            ("this matches normalizing with the running statistics: r and d correct the BATCH-normalized value, "
             "x_hat = (x - mu_B) / sigma_B * r + d", lambda: gamma * (x - running_mean) / running_std + beta),
            ("this matches x_hat * r - d: d is added", lambda: gamma * (x_hat_bn * r_ref - d_ref) + beta),
            ("this matches x_hat / r + d: multiply by r", lambda: gamma * (x_hat_bn / r_ref + d_ref) + beta),
            (_HINT_UNBIASED, lambda: gamma * ((x - batch_mean) / unbiased_std * r_ref + d_ref) + beta),
        ])
        _raise_on(case, r_differences, d_differences, y_differences)
    _success(checker, len(specs))


@_reports_not_attempted
def check_ghost_batch_norm(fn: Callable[..., np.ndarray]) -> None:
    """Check ``fn(x, gamma, beta, virtual_batch_size, eps) -> y``: BN applied separately to consecutive chunks.

    x: (N, D) with N a multiple of virtual_batch_size; rows [0, v), [v, 2v), ... are normalized with their own
    statistics (Hoffer et al., 2017). Reference: `ghost_batch_norm_reference` (`numpy_bn.forward` on each chunk).

    >>> def my_ghost(x, gamma, beta, virtual_batch_size, eps):
    ...     chunks = x.reshape(-1, virtual_batch_size, x.shape[1])
    ...     x_hat = (chunks - chunks.mean(axis=1, keepdims=True)) / np.sqrt(chunks.var(axis=1, keepdims=True) + eps)
    ...     return gamma * x_hat.reshape(x.shape) + beta
    >>> check_ghost_batch_norm(my_ghost)
    check_ghost_batch_norm: all 3 cases match the reference. Well done.
    """
    checker = "check_ghost_batch_norm"
    _check_callable(fn, checker, "fn(x, gamma, beta, virtual_batch_size, eps) -> y")
    specs = [((24, 5), 4, 0, 1e-5), ((12, 3), 3, 1, 0.1), ((20, 6), 10, 2, 1e-3)]
    for index, (shape, virtual_batch_size, seed, eps) in enumerate(specs):
        rng = np.random.default_rng(seed)
        n, d = shape
        # Each chunk gets its own offset, so that per-chunk and whole-batch statistics differ clearly.
        chunk_offsets = np.repeat(rng.uniform(-4.0, 4.0, size=(n // virtual_batch_size, d)), virtual_batch_size, axis=0)
        x = _rng_features(rng, n, d) + chunk_offsets
        gamma, beta = _rng_affine(rng, d)
        expected = ghost_batch_norm_reference(x, gamma, beta, virtual_batch_size, eps)
        case = _Case(checker, index, len(specs), f"x.shape={shape}, virtual_batch_size={virtual_batch_size}, "
                                                 f"seed={seed}, eps={eps}")
        out = _call(fn, (x, gamma, beta, virtual_batch_size, eps), case)
        got = _as_float_array(out, "y", expected, case)
        chunks = n // virtual_batch_size

        def strided() -> np.ndarray:
            grouped = x.reshape(virtual_batch_size, chunks, d)  # every chunks-th row: not consecutive
            return gamma * _normalize(grouped, eps, axis=0).reshape(n, d) + beta

        def per_chunk(size: int, ddof: int = 0) -> np.ndarray:
            grouped = x.reshape(n // size, size, d)
            return gamma * _normalize(grouped, eps, axis=1, ddof=ddof).reshape(n, d) + beta

        _raise_on(case, _compare(got, expected, "y", [
            ("this matches BN over the WHOLE batch: ghost BN normalizes each chunk of virtual_batch_size rows "
             "with that chunk's own statistics", lambda: numpy_bn.forward(x, gamma, beta, eps)[0]),
            ("this matches chunks of every k-th row (x.reshape(virtual_batch_size, -1, D)): the chunks are "
             "CONSECUTIVE rows, x.reshape(-1, virtual_batch_size, D)", strided),
            ("this matches chunks of N / virtual_batch_size rows: virtual_batch_size is the number of rows per "
             "chunk, not the number of chunks", lambda: per_chunk(chunks)),
            (_HINT_UNBIASED, lambda: per_chunk(virtual_batch_size, ddof=1)),
            (_HINT_EPS_OUTSIDE, lambda: gamma * _normalize(x.reshape(chunks, virtual_batch_size, d), eps, axis=1,
                                                           eps_outside=True).reshape(n, d) + beta),
            (_HINT_NO_AFFINE, lambda: _normalize(x.reshape(chunks, virtual_batch_size, d), eps, axis=1).reshape(n, d)),
        ]))
    _success(checker, len(specs))


@_reports_not_attempted
def check_whitening(fn: Callable[[np.ndarray, float], np.ndarray]) -> None:
    """Check ``fn(x, eps) -> x_white``: full ZCA whitening of x (N, D).

    The output is (x - mean) @ W with W = Sigma^(-1/2) computed as U diag(1/sqrt(lambda + eps)) U^T from the biased
    covariance Sigma = U diag(lambda) U^T; its covariance is the identity up to eps. Reference:
    `zca_whitening_reference`.

    >>> def my_whitening(x, eps):
    ...     x_centered = x - x.mean(axis=0)
    ...     eigenvalues, u = np.linalg.eigh(x_centered.T @ x_centered / len(x))
    ...     return x_centered @ u @ np.diag(1 / np.sqrt(eigenvalues + eps)) @ u.T
    >>> check_whitening(my_whitening)
    check_whitening: all 3 cases match the reference. Well done.
    """
    checker = "check_whitening"
    _check_callable(fn, checker, "fn(x, eps) -> x_white")
    specs = [((12, 3), 0, 1e-5), ((40, 5), 1, 0.1), ((9, 4), 2, 1e-3)]
    for index, (shape, seed, eps) in enumerate(specs):
        rng = np.random.default_rng(seed)
        n, d = shape
        mixing = rng.standard_normal((d, d)) + 2.0 * np.eye(d)  # correlated features
        x = rng.uniform(-5.0, 5.0, size=d) + rng.standard_normal((n, d)) @ mixing
        expected = zca_whitening_reference(x, eps)
        case = _Case(checker, index, len(specs), f"x.shape={shape}, seed={seed}, eps={eps}")
        out = _call(fn, (x, eps), case, "np.cov(x) treats ROWS as variables: use np.cov(x, rowvar=False, bias=True)",
                    hint_when=("broadcast", "mismatch", "shape"))
        got = _as_float_array(out, "x_white", expected, case)
        x_centered = x - x.mean(axis=0)

        def whiten_with(covariance: np.ndarray, data: np.ndarray, eps_outside: bool = False) -> np.ndarray:
            eigenvalues, u = np.linalg.eigh(covariance)
            std = np.sqrt(eigenvalues) + eps if eps_outside else np.sqrt(eigenvalues + eps)
            return data @ u @ np.diag(1.0 / std) @ u.T

        covariance = x_centered.T @ x_centered / n
        mistakes = [
            ("this matches whitening without centring: subtract the mean of each feature first, and use the "
             "covariance of the centred data", lambda: whiten_with(x.T @ x / n, x)),
            ("this matches a whitening matrix from the centred data applied to the UNCENTRED x: apply it to x - mean",
             lambda: whiten_with(covariance, x)),
            ("this matches the UNBIASED covariance (np.cov's default divides by N-1): the reference uses the biased "
             "covariance, divided by N (np.cov(x, rowvar=False, bias=True))",
             lambda: whiten_with(x_centered.T @ x_centered / (n - 1), x_centered)),
            ("this matches 1 / (sqrt(lambda) + eps): eps is added to the eigenvalues, 1 / sqrt(lambda + eps)",
             lambda: whiten_with(covariance, x_centered, eps_outside=True)),
            ("this matches multiplying by the inverse covariance Sigma^-1: whitening uses Sigma^(-1/2)",
             lambda: x_centered @ np.linalg.inv(covariance + eps * np.eye(d))),
            ("this matches standardizing each feature separately (that is batch norm): whitening also removes the "
             "correlations between features", lambda: _normalize(x, eps)),
        ]
        differences = _compare(got, expected, "x_white", mistakes)
        if differences and not any("Hint:" in line for line in differences) and _white_but_rotated(got, expected):
            differences.append(
                "  Hint: your output has the right covariance spectrum but is rotated: that is PCA (or Cholesky) "
                "whitening. ZCA rotates back, W = U diag(1/sqrt(lambda + eps)) U^T, the one symmetric whitening matrix"
            )
        _raise_on(case, differences)
    _success(checker, len(specs))


def _white_but_rotated(got: np.ndarray, expected: np.ndarray) -> bool:
    """Whether `got` whitens as well as ZCA (same covariance spectrum) while differing from it: PCA/Cholesky."""
    def spectrum(values: np.ndarray) -> np.ndarray:
        centred = values - values.mean(axis=0)
        return np.linalg.eigvalsh(centred.T @ centred / len(values))

    return bool(np.allclose(spectrum(got), spectrum(expected), rtol=1e-4, atol=1e-6))


@_reports_not_attempted
def check_gradient_projection(fn: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> None:
    """Check ``fn(g, x_hat) -> g - mean(g) - x_hat * mean(g * x_hat)``, per column.

    The projection of Santurkar et al. (2018), Theorem 4.1: the gradient through BN is g with its component along the
    constant direction 1 and along x_hat removed. g, x_hat: (N, D); x_hat has zero mean and unit biased variance per
    column. Returns (N, D).

    >>> check_gradient_projection(lambda g, x_hat: g - g.mean(0) - x_hat * (g * x_hat).mean(0))
    check_gradient_projection: all 3 cases match the reference. Well done.
    """
    checker = "check_gradient_projection"
    _check_callable(fn, checker, "fn(g, x_hat) -> projected g")
    specs = [((6, 4), 0), ((5, 9), 1), ((16, 3), 2)]
    for index, (shape, seed) in enumerate(specs):
        rng = np.random.default_rng(seed)
        x_hat = numpy_bn.forward(_rng_features(rng, *shape), np.ones(shape[1]), np.zeros(shape[1]), eps=0.0)[0]
        g = rng.standard_normal(shape) * rng.uniform(0.5, 2.0, size=shape[1]) + rng.uniform(-2.0, 2.0, size=shape[1])
        expected = g - g.mean(axis=0) - x_hat * (g * x_hat).mean(axis=0)
        case = _Case(checker, index, len(specs), f"g.shape={shape}, seed={seed}")
        out = _call(fn, (g, x_hat), case, "the means are per column: take them over axis=0")
        got = _as_float_array(out, "projected g", expected, case)
        _raise_on(case, _compare(got, expected, "projected g", [
            ("this matches g - mean(g) alone: also remove the component along x_hat, - x_hat * mean(g * x_hat)",
             lambda: g - g.mean(axis=0)),
            ("this matches g - x_hat * mean(g * x_hat) alone: also remove the mean, - mean(g)",
             lambda: g - x_hat * (g * x_hat).mean(axis=0)),
            ("this matches sums where the means belong: g - mean(g) - x_hat * mean(g * x_hat)",
             lambda: g - g.sum(axis=0) - x_hat * (g * x_hat).sum(axis=0)),
            ("this matches means over each ROW (axis=1): the projection is per column, means over axis=0",
             lambda: g - g.mean(axis=1, keepdims=True) - x_hat * (g * x_hat).mean(axis=1, keepdims=True)),
            ("this matches + x_hat * mean(g * x_hat): the component along x_hat is subtracted",
             lambda: g - g.mean(axis=0) + x_hat * (g * x_hat).mean(axis=0)),
        ]))
    _success(checker, len(specs))


# ----------------------------------------------------------------------------------------------------------------------
# Chapter "BN in real networks": LayerNorm, and a prediction about residual streams.
# ----------------------------------------------------------------------------------------------------------------------

_HINT_LN_BATCH_AXIS = (
    "this matches normalizing over the BATCH axis (axis=0), which is batch norm: LayerNorm takes the statistics of "
    "each EXAMPLE (row) over its D features, axis=1 (or axis=-1, keepdims=True)."
)
_HINT_LN_UNBIASED = (
    "this matches normalizing with the UNBIASED variance (dividing by D-1, np.var(..., ddof=1) or torch.var's "
    "default): LayerNorm divides by D, the biased variance, as F.layer_norm does."
)
_HINT_LN_EPS_OUTSIDE = (
    "this matches (x - mean) / (sqrt(var) + eps): eps belongs INSIDE the square root, (x - mean) / sqrt(var + eps)."
)
_HINT_LN_NOT_CENTERED = (
    "this matches forgetting to centre: subtract each row's mean before dividing, (x - mean) / sqrt(var + eps)."
)
_HINT_LN_RMS = (
    "this matches x / sqrt(mean(x**2) + eps), which is RMSNorm: LayerNorm also centres each row, "
    "(x - mean) / sqrt(var + eps)."
)


@_reports_not_attempted
def check_layer_norm(fn: Callable[..., np.ndarray]) -> None:
    """Check ``fn(x, gamma, beta, eps) -> y``: LayerNorm (Ba et al., 2016) of x (N, D) over its D features.

    Each row (example) is standardized with its own mean and biased variance over the D features, eps inside the
    square root, then scaled and shifted per feature: gamma, beta (D,). Reference: `bnnotes.numpy_norms.layer_norm`,
    which matches ``torch.nn.functional.layer_norm``. A stub (raising NotImplementedError, or returning None) is
    reported as not attempted yet, without an error.

    >>> def my_layer_norm(x, gamma, beta, eps):
    ...     mean = x.mean(axis=1, keepdims=True)
    ...     var = x.var(axis=1, keepdims=True)
    ...     return gamma * (x - mean) / np.sqrt(var + eps) + beta
    >>> check_layer_norm(my_layer_norm)
    check_layer_norm: all 4 cases match the reference. Well done.
    """
    from bnnotes import numpy_norms

    checker = "check_layer_norm"
    _check_callable(fn, checker, "fn(x, gamma, beta, eps) -> y")
    # N != D everywhere; a small D so that the biased and unbiased variances differ; one large eps.
    specs = [((5, 3), 0, 1e-5, np.float64), ((4, 7), 1, 0.5, np.float64), ((9, 4), 2, 1e-3, np.float64),
             ((16, 6), 3, 1e-5, np.float32)]
    for index, (shape, seed, eps, dtype) in enumerate(specs):
        rng = np.random.default_rng(seed)
        # Rows with their own offsets and scales: per-row and per-column statistics differ clearly.
        x = (_rng_features(rng, *shape) + rng.uniform(-3.0, 3.0, size=(shape[0], 1))).astype(dtype)
        gamma, beta = (v.astype(dtype) for v in _rng_affine(rng, shape[1]))
        description = f"x.shape={shape}, dtype={np.dtype(dtype).name}, seed={seed}, eps={eps}"
        case = _Case(checker, index, len(specs), description)
        expected = numpy_norms.layer_norm(x, gamma, beta, eps)[0]
        out = _call(fn, (x, gamma, beta, eps), case,
                    "the statistics are per row; keep their axis (keepdims=True) so that they broadcast over D.",
                    hint_when=("",))
        if out is None:
            raise _NotAttempted("your function returns None")
        got = _as_float_array(out, "y", expected, case)

        def affine(x_hat: np.ndarray) -> np.ndarray:
            return gamma * x_hat + beta

        x64 = x.astype(np.float64)
        mistakes = [
            (_HINT_LN_BATCH_AXIS, lambda: affine(_normalize(x, eps, axis=0))),
            (_HINT_LN_UNBIASED, lambda: affine(_normalize(x, eps, axis=1, ddof=1))),
            (_HINT_LN_EPS_OUTSIDE, lambda: affine(_normalize(x, eps, axis=1, eps_outside=True))),
            (_HINT_LN_NOT_CENTERED, lambda: affine(_normalize(x, eps, axis=1, center=False))),
            (_HINT_LN_RMS, lambda: affine(x64 / np.sqrt(np.mean(x64**2, axis=1, keepdims=True) + eps))),
            (_HINT_NO_EPS, lambda: affine(_normalize(x, 0.0, axis=1))),
            (_HINT_NO_SQRT, lambda: affine(_normalize(x, eps, axis=1, sqrt=False))),
            ("this matches one mean and variance for the whole array: the statistics are per row (example).",
             lambda: affine(_normalize(x, eps, axis=None))),
            (_HINT_GAMMA_BETA_SWAPPED, lambda: beta * _normalize(x, eps, axis=1) + gamma),
            (_HINT_NO_AFFINE, lambda: _normalize(x, eps, axis=1)),
        ]
        _raise_on(case, _compare(got, expected, "y", mistakes))
    _success(checker, len(specs))


@_reports_not_attempted
def check_residual_variance(predicted_plain: Any, predicted_bn: Any, depth: int = 8) -> None:
    """Grade a prediction: the mean square of the residual stream after `depth` pre-activation blocks, at init.

    The blocks are `bnnotes.experiments.real_networks.PreActBlock` (x + W2 relu(norm(W1 relu(norm(x)))), He-normal
    weights), the input has mean square 1. Without normalization each branch returns the mean square of its input,
    so the stream doubles per block: 2**depth. With BN each branch returns mean square 1 (BN's output has unit
    variance, ReLU keeps half of it, He's factor 2 restores it), so the stream grows by 1 per block: 1 + depth.
    A prediction within 10% is right. A stub (None) is reported as not attempted yet.

    >>> check_residual_variance(2.0**8, 9.0)
    check_residual_variance: both predictions are right (plain 256, with BN 9).
    """
    checker = "check_residual_variance"
    for name, value in (("predicted_plain", predicted_plain), ("predicted_bn", predicted_bn)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(float(value)):
            raise AssertionError(f"{checker}: {name} must be a finite number, got {value!r}")
    plain, bn = 2.0**depth, 1.0 + depth
    problems = []
    if abs(predicted_plain - plain) > 0.1 * plain:
        hint = {
            1.0 + depth: "that is the BN answer: without normalization nothing resets the branch's scale, and each "
            "block adds a branch as large as the stream itself",
            float(depth): "the branch is as large as the stream at its input, not of size 1: the variance doubles",
            3.0**depth: "He's initialization makes each Linear after a ReLU preserve the mean square: the branch "
            "adds 1x the stream, not 2x",
        }.get(float(predicted_plain), "each block adds a branch with the mean square of its input: x -> 2x")
        problems.append(f"  predicted_plain = {predicted_plain!r}, expected {plain:g} (= 2**{depth}). Hint: {hint}")
    if abs(predicted_bn - bn) > 0.1 * bn:
        hint = {
            plain: "with BN on the branch, the branch's scale no longer follows the stream's",
            1.0: "BN normalizes the branch, not the stream: the skip connection carries the stream unnormalized, "
            "and each block adds a branch of mean square 1",
            float(depth): "do not forget the input's own mean square of 1",
        }.get(float(predicted_bn), "each branch has mean square 1; the stream adds them up")
        problems.append(f"  predicted_bn = {predicted_bn!r}, expected {bn:g} (= 1 + {depth}). Hint: {hint}")
    if problems:
        raise AssertionError("\n".join([f"{checker}: the prediction for depth {depth} is off:"] + problems))
    print(f"{checker}: both predictions are right (plain {plain:g}, with BN {bn:g}).")


__all__ += ["check_layer_norm", "check_residual_variance"]


# ----------------------------------------------------------------------------------------------------------------------
# Predictions: "predict, then run" exercises, graded against what the chapter's run measured.
# ----------------------------------------------------------------------------------------------------------------------


def _is_real_number(value: Any) -> bool:
    return not isinstance(value, (bool, np.bool_)) and isinstance(value, (numbers.Real, np.floating, np.integer))


def _show(value: Any) -> str:
    """A value as a learner reads it: numbers with 4 significant digits, strings quoted."""
    if _is_real_number(value):
        return f"{float(value):.4g}"
    return repr(value) if isinstance(value, str) else str(value)


def check_prediction(
    predicted: Any,
    measured: Any,
    *,
    name: str,
    choices: Sequence[Any] | None = None,
    rel_tol: float | None = None,
    factor: float | None = None,
    explanation: str = "",
) -> None:
    """Grade a prediction written down before a cell ran, against the value that the chapter's run measured.

    A choice (``choices`` given, a tuple of the allowed answers): an answer outside ``choices`` fails with the list
    of allowed ones; an allowed answer is right iff ``predicted == measured``. A number: right iff within ``rel_tol``
    of the measurement, ``|predicted - measured| <= rel_tol * |measured|``, or within a ``factor`` of it,
    ``measured / factor <= predicted <= measured * factor`` (give one of the two, or both: either suffices).
    A wrong prediction raises AssertionError "you predicted X for <name>; the run measured Y", then ``explanation``.
    ``predicted`` None (the Colab edition's stub) prints "not attempted yet" and returns. A right one prints one line.

    >>> check_prediction("diverges", "diverges", name="the plain network at lr=1", choices=("converges", "diverges"))
    check_prediction: right, the run measured 'diverges' for the plain network at lr=1.
    >>> check_prediction(300, 256.0, name="the stream's mean square", factor=2)
    check_prediction: right, the run measured 256 for the stream's mean square (you predicted 300).
    """
    checker = "check_prediction"
    # The chapter's own arguments: a mistake there is the author's, so it is a ValueError, not a wrong answer.
    if not isinstance(name, str) or not name:
        raise ValueError(f"{checker}: name must be a non-empty string naming the predicted quantity, got {name!r}")
    if choices is None and rel_tol is None and factor is None:
        raise ValueError(f"{checker}({name}): give choices (a tuple of allowed answers), or rel_tol or factor "
                         "(the tolerance of a numeric prediction)")
    if choices is not None and (rel_tol is not None or factor is not None):
        raise ValueError(f"{checker}({name}): a choice is graded by equality; rel_tol and factor are for numbers")
    if rel_tol is not None and not (_is_real_number(rel_tol) and rel_tol >= 0):
        raise ValueError(f"{checker}({name}): rel_tol must be a number >= 0, got {rel_tol!r}")
    if factor is not None and not (_is_real_number(factor) and factor >= 1):
        raise ValueError(f"{checker}({name}): factor must be a number >= 1, got {factor!r}")
    if predicted is None:
        print(f"{checker}: not attempted yet (your prediction for {name} is still None): write it down, then run "
              "this cell again.")
        return None
    suffix = f" {explanation}" if explanation else ""
    if choices is not None:
        choices = tuple(choices)
        if measured not in choices:
            raise ValueError(f"{checker}({name}): the measured {_show(measured)} is not one of the choices {choices}")
        if predicted not in choices:
            allowed = ", ".join(_show(choice) for choice in choices)
            raise AssertionError(f"{checker}: {_show(predicted)} is not an allowed answer for {name}; "
                                 f"answer one of {allowed}")
        if predicted != measured:
            raise AssertionError(f"{checker}: you predicted {_show(predicted)} for {name}; the run measured "
                                 f"{_show(measured)}.{suffix}")
        print(f"{checker}: right, the run measured {_show(measured)} for {name}.")
        return None
    if not _is_real_number(measured) or not np.isfinite(float(measured)):
        raise ValueError(f"{checker}({name}): the measured value must be a finite number, got {measured!r}")
    if not _is_real_number(predicted) or not np.isfinite(float(predicted)):
        raise AssertionError(f"{checker}: your prediction for {name} must be a finite number, got "
                             f"{type(predicted).__name__} {predicted!r:.60}")
    guess, value = float(predicted), float(measured)
    within_rel = rel_tol is not None and abs(guess - value) <= rel_tol * abs(value)
    low, high = sorted((value / factor, value * factor)) if factor is not None else (np.inf, -np.inf)
    if not (within_rel or low <= guess <= high):
        tolerances = ([f"within {rel_tol:.0%}"] if rel_tol is not None else []) + (
            [f"within a factor {factor:g}"] if factor is not None else [])
        raise AssertionError(f"{checker}: you predicted {_show(guess)} for {name}; the run measured "
                             f"{_show(value)} (a prediction {' or '.join(tolerances)} counts as right).{suffix}")
    print(f"{checker}: right, the run measured {_show(value)} for {name} (you predicted {_show(guess)}).")
    return None


__all__ += ["check_prediction"]
