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


def _projection_case(shape: tuple[int, int], seed: int) -> Case:
    rng = np.random.default_rng(seed)
    x_hat = numpy_bn.forward(rng_features(rng, *shape), np.ones(shape[1]), np.zeros(shape[1]), eps=0.0)[0]
    g = rng.standard_normal(shape) * rng.uniform(0.5, 2.0, size=shape[1]) + rng.uniform(-2.0, 2.0, size=shape[1])
    expected = g - g.mean(axis=0) - x_hat * (g * x_hat).mean(axis=0)
    mistakes = [
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
    ]
    return Case(f"g.shape={shape}, seed={seed}", (g, x_hat), (Output("projected g", expected, mistakes),),
                exception_hint="the means are per column: take them over axis=0")


@reports_not_attempted
def check_gradient_projection(fn: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> None:
    """Check ``fn(g, x_hat) -> g - mean(g) - x_hat * mean(g * x_hat)``, per column.

    The projection of Santurkar et al. (2018), Theorem 4.1: the gradient through BN is g with its component along the
    constant direction 1 and along x_hat removed. g, x_hat: (N, D); x_hat has zero mean and unit biased variance per
    column. Returns (N, D).

    >>> check_gradient_projection(lambda g, x_hat: g - g.mean(0) - x_hat * (g * x_hat).mean(0))
    check_gradient_projection: all 3 cases match the reference. Well done.
    """
    specs = [((6, 4), 0), ((5, 9), 1), ((16, 3), 2)]
    run_cases(fn, "check_gradient_projection", "fn(g, x_hat) -> projected g",
              [_projection_case(*spec) for spec in specs])


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
