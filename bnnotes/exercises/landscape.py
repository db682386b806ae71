"""Checkers for the chapter "How does BN really help? The loss-landscape critique" (landscape.md): the projection
of the gradient through BN (Santurkar et al., 2018, Theorem 4.1) and the scale invariance of a weight followed by BN.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from bnnotes import numpy_bn
from bnnotes.exercises._catalogue import rng_features
from bnnotes.exercises._harness import Case, Output, reports_not_attempted, run_cases

__all__ = ["check_gradient_projection", "check_scale_invariance"]


def _scale_invariance_case(shape: tuple[int, int], seed: int, c: float, dtype: type) -> Case:
    rng = np.random.default_rng(seed)
    grad_w = (rng.standard_normal(shape) * rng.uniform(0.5, 2.0, size=shape[1])).astype(dtype)
    expected = (grad_w.astype(np.float64) / c).astype(dtype)
    grad64 = grad_w.astype(np.float64)
    mistakes = [
        ("this matches c * grad_w: the loss does not change when W grows, L(c W) = L(W), so by the chain rule "
         "c * grad L(c W) = grad L(W): the gradient at c W is grad_w / c, it SHRINKS as the weights grow",
         lambda: c * grad64),
        ("this matches grad_w unchanged: the LOSS is the same at c W, but its gradient is not: differentiate "
         "L(c W) = L(W) with respect to W, the chain rule gives a factor c", lambda: grad64),
        ("this matches grad_w / c**2: differentiating L(c W) = L(W) gives c * grad L(c W) = grad L(W), one factor "
         "of c (1 / c**2 is the Hessian's factor, and the effective learning rate's)", lambda: grad64 / c**2),
    ]
    return Case(f"grad_w.shape={shape}, dtype={np.dtype(dtype).name}, seed={seed}, c={c}", (grad_w, c),
                (Output("grad_w_scaled", expected, mistakes),))


@reports_not_attempted
def check_scale_invariance(fn: Callable[[np.ndarray, float], np.ndarray]) -> None:
    """Check ``fn(grad_w, c) -> grad_w_scaled``: the gradient at W' = c W of a loss that is invariant to W's scale.

    A weight matrix W followed by BN gives a loss with L(c W) = L(W) for every c > 0: BN divides the scale out.
    Differentiating both sides in W gives c * grad L(c W) = grad L(W), so the gradient at c W is grad_w / c: the
    gradients shrink as the weights grow (the chapter's equation eq-landscape-scale). grad_w: an array (any shape);
    c: a positive float; returns an array like grad_w (same shape and dtype).

    >>> check_scale_invariance(lambda grad_w, c: grad_w / c)
    check_scale_invariance: all 4 cases match the reference. Well done.
    """
    specs = [((4, 3), 50, 2.0, np.float64), ((5, 6), 51, 0.5, np.float64), ((3, 8), 52, 10.0, np.float64),
             ((6, 4), 53, 3.0, np.float32)]
    run_cases(fn, "check_scale_invariance", "fn(grad_w, c) -> grad_w_scaled",
              [_scale_invariance_case(*spec) for spec in specs])
