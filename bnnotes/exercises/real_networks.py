"""Checkers for the chapter "BN in real networks, and what replaced it" (real_networks.md): LayerNorm, and a
prediction about residual streams.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import numpy as np

from bnnotes import numpy_norms
from bnnotes.exercises._catalogue import (
    HINT_GAMMA_BETA_SWAPPED,
    HINT_NO_AFFINE,
    HINT_NO_EPS,
    HINT_NO_SQRT,
    normalize,
    rng_affine,
    rng_features,
)
from bnnotes.exercises._harness import Case, Output, reports_not_attempted, run_cases

__all__ = ["check_layer_norm", "check_residual_variance"]

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


def _layer_norm_case(shape: tuple[int, int], seed: int, eps: float, dtype: type) -> Case:
    rng = np.random.default_rng(seed)
    # Rows with their own offsets and scales: per-row and per-column statistics differ clearly.
    x = (rng_features(rng, *shape) + rng.uniform(-3.0, 3.0, size=(shape[0], 1))).astype(dtype)
    gamma, beta = (v.astype(dtype) for v in rng_affine(rng, shape[1]))
    expected = numpy_norms.layer_norm(x, gamma, beta, eps)[0]

    def affine(x_hat: np.ndarray) -> np.ndarray:
        return gamma * x_hat + beta

    x64 = x.astype(np.float64)
    mistakes = [
        (_HINT_LN_BATCH_AXIS, lambda: affine(normalize(x, eps, axis=0))),
        (_HINT_LN_UNBIASED, lambda: affine(normalize(x, eps, axis=1, ddof=1))),
        (_HINT_LN_EPS_OUTSIDE, lambda: affine(normalize(x, eps, axis=1, eps_outside=True))),
        (_HINT_LN_NOT_CENTERED, lambda: affine(normalize(x, eps, axis=1, center=False))),
        (_HINT_LN_RMS, lambda: affine(x64 / np.sqrt(np.mean(x64**2, axis=1, keepdims=True) + eps))),
        (HINT_NO_EPS, lambda: affine(normalize(x, 0.0, axis=1))),
        (HINT_NO_SQRT, lambda: affine(normalize(x, eps, axis=1, sqrt=False))),
        ("this matches one mean and variance for the whole array: the statistics are per row (example).",
         lambda: affine(normalize(x, eps, axis=None))),
        (HINT_GAMMA_BETA_SWAPPED, lambda: beta * normalize(x, eps, axis=1) + gamma),
        (HINT_NO_AFFINE, lambda: normalize(x, eps, axis=1)),
    ]
    return Case(f"x.shape={shape}, dtype={np.dtype(dtype).name}, seed={seed}, eps={eps}", (x, gamma, beta, eps),
                (Output("y", expected, mistakes),),
                exception_hint="the statistics are per row; keep their axis (keepdims=True) so that they broadcast "
                               "over D.", hint_when=("",))


@reports_not_attempted
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
    # N != D everywhere; a small D so that the biased and unbiased variances differ; one large eps.
    specs = [((5, 3), 0, 1e-5, np.float64), ((4, 7), 1, 0.5, np.float64), ((9, 4), 2, 1e-3, np.float64),
             ((16, 6), 3, 1e-5, np.float32)]
    run_cases(fn, "check_layer_norm", "fn(x, gamma, beta, eps) -> y", [_layer_norm_case(*spec) for spec in specs],
              none_is_stub=True)


@reports_not_attempted
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
