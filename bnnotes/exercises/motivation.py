"""Checkers for the chapter "Why normalize: internal covariate shift and what BN promises" (motivation.md): full
ZCA whitening, the transform BN simplifies.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from bnnotes import numpy_variants
from bnnotes.exercises._catalogue import normalize
from bnnotes.exercises._harness import Case, Output, reports_not_attempted, run_cases

__all__ = ["check_whitening"]


def _whiten_with(covariance: np.ndarray, data: np.ndarray, eps: float, eps_outside: bool = False) -> np.ndarray:
    """Whitening of `data` with U diag(1/sqrt(lambda + eps)) U^T from `covariance` (knobs for the mistakes)."""
    eigenvalues, u = np.linalg.eigh(covariance)
    std = np.sqrt(eigenvalues) + eps if eps_outside else np.sqrt(eigenvalues + eps)
    return data @ u @ np.diag(1.0 / std) @ u.T


def _rotated_hint(expected: np.ndarray) -> Callable[[np.ndarray], str | None]:
    """The last hint: an output that whitens as well as ZCA (same covariance spectrum) but differs is PCA/Cholesky."""

    def spectrum(values: np.ndarray) -> np.ndarray:
        centred = values - values.mean(axis=0)
        return np.linalg.eigvalsh(centred.T @ centred / len(values))

    def hint(got: np.ndarray) -> str | None:
        if not np.allclose(spectrum(got), spectrum(expected), rtol=1e-4, atol=1e-6):
            return None
        return ("your output has the right covariance spectrum but is rotated: that is PCA (or Cholesky) whitening. "
                "ZCA rotates back, W = U diag(1/sqrt(lambda + eps)) U^T, the one symmetric whitening matrix")

    return hint


def _whitening_case(shape: tuple[int, int], seed: int, eps: float) -> Case:
    rng = np.random.default_rng(seed)
    n, d = shape
    mixing = rng.standard_normal((d, d)) + 2.0 * np.eye(d)  # correlated features
    x = rng.uniform(-5.0, 5.0, size=d) + rng.standard_normal((n, d)) @ mixing
    expected = numpy_variants.zca_whitening(x, eps)
    x_centered = x - x.mean(axis=0)
    covariance = x_centered.T @ x_centered / n
    mistakes = [
        ("this matches whitening without centring: subtract the mean of each feature first, and use the "
         "covariance of the centred data", lambda: _whiten_with(x.T @ x / n, x, eps)),
        ("this matches a whitening matrix from the centred data applied to the UNCENTRED x: apply it to x - mean",
         lambda: _whiten_with(covariance, x, eps)),
        ("this matches the UNBIASED covariance (np.cov's default divides by N-1): the reference uses the biased "
         "covariance, divided by N (np.cov(x, rowvar=False, bias=True))",
         lambda: _whiten_with(x_centered.T @ x_centered / (n - 1), x_centered, eps)),
        ("this matches 1 / (sqrt(lambda) + eps): eps is added to the eigenvalues, 1 / sqrt(lambda + eps)",
         lambda: _whiten_with(covariance, x_centered, eps, eps_outside=True)),
        ("this matches multiplying by the inverse covariance Sigma^-1: whitening uses Sigma^(-1/2)",
         lambda: x_centered @ np.linalg.inv(covariance + eps * np.eye(d))),
        ("this matches standardizing each feature separately (that is batch norm): whitening also removes the "
         "correlations between features", lambda: normalize(x, eps)),
    ]
    return Case(f"x.shape={shape}, seed={seed}, eps={eps}", (x, eps),
                (Output("x_white", expected, mistakes, fallback_hint=_rotated_hint(expected)),),
                exception_hint="np.cov(x) treats ROWS as variables: use np.cov(x, rowvar=False, bias=True)",
                hint_when=("broadcast", "mismatch", "shape"))


@reports_not_attempted
def check_whitening(fn: Callable[[np.ndarray, float], np.ndarray]) -> None:
    """Check ``fn(x, eps) -> x_white``: full ZCA whitening of x (N, D).

    The output is (x - mean) @ W with W = Sigma^(-1/2) computed as U diag(1/sqrt(lambda + eps)) U^T from the biased
    covariance Sigma = U diag(lambda) U^T; its covariance is the identity up to eps. Reference:
    `bnnotes.numpy_variants.zca_whitening`.

    >>> def my_whitening(x, eps):
    ...     x_centered = x - x.mean(axis=0)
    ...     eigenvalues, u = np.linalg.eigh(x_centered.T @ x_centered / len(x))
    ...     return x_centered @ u @ np.diag(1 / np.sqrt(eigenvalues + eps)) @ u.T
    >>> check_whitening(my_whitening)
    check_whitening: all 3 cases match the reference. Well done.
    """
    specs = [((12, 3), 0, 1e-5), ((40, 5), 1, 0.1), ((9, 4), 2, 1e-3)]
    run_cases(fn, "check_whitening", "fn(x, eps) -> x_white", [_whitening_case(*spec) for spec in specs])
