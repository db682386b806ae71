"""Checkers for the chapter "The transform and its gradient" (derivation.md): the forward and backward passes,
dense and convolutional, and the gradient of a batch of two.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from bnnotes import numpy_bn
from bnnotes.exercises._catalogue import (
    HINT_EPS_OUTSIDE,
    HINT_GAMMA_BETA_SWAPPED,
    HINT_GLOBAL,
    HINT_NO_AFFINE,
    HINT_NO_EPS,
    HINT_NO_SQRT,
    HINT_NOT_CENTERED,
    HINT_ROWS,
    HINT_UNBIASED,
    backward_variant,
    normalize,
    rng_affine,
    rng_features,
    rng_images,
    rng_upstream,
)
from bnnotes.exercises._harness import Case, Mistake, Output, reports_not_attempted, run_cases

__all__ = ["check_forward", "check_backward", "check_conv_forward", "check_conv_backward", "check_batch_of_two"]

Grads = tuple[np.ndarray, np.ndarray, np.ndarray]


# ----------------------------------------------------------------------------------------------------------------------
# The forward pass, x (N, D)
# ----------------------------------------------------------------------------------------------------------------------


def _forward_case(shape: tuple[int, int], seed: int, eps: float, dtype: type) -> Case:
    rng = np.random.default_rng(seed)
    x = rng_features(rng, *shape).astype(dtype)
    gamma, beta = (v.astype(dtype) for v in rng_affine(rng, shape[1]))
    expected = numpy_bn.forward(x, gamma, beta, eps)[0]

    def affine(x_hat: np.ndarray) -> np.ndarray:
        return gamma * x_hat + beta

    mistakes = [
        (HINT_UNBIASED, lambda: affine(normalize(x, eps, ddof=1))),
        (HINT_EPS_OUTSIDE, lambda: affine(normalize(x, eps, eps_outside=True))),
        (HINT_NO_EPS, lambda: affine(normalize(x, 0.0))),
        (HINT_NO_SQRT, lambda: affine(normalize(x, eps, sqrt=False))),
        (HINT_NOT_CENTERED, lambda: affine(normalize(x, eps, center=False))),
        (HINT_ROWS, lambda: affine(normalize(x, eps, axis=1))),
        (HINT_GLOBAL, lambda: affine(normalize(x, eps, axis=None))),
        (HINT_GAMMA_BETA_SWAPPED, lambda: beta * normalize(x, eps) + gamma),
        (HINT_NO_AFFINE, lambda: normalize(x, eps)),
    ]
    return Case(f"x.shape={shape}, dtype={np.dtype(dtype).name}, seed={seed}, eps={eps}", (x, gamma, beta, eps),
                (Output("y", expected, mistakes),),
                exception_hint="gamma and beta have shape (D,) and broadcast over the rows")


@reports_not_attempted
def check_forward(fn: Callable[..., np.ndarray]) -> None:
    """Check ``fn(x, gamma, beta, eps) -> y``: training-mode BN (Ioffe & Szegedy, 2015, Algorithm 1).

    x: (N, D); gamma, beta: (D,); statistics per feature over the batch, with the biased variance. y: (N, D) in x's
    dtype. Reference: `bnnotes.numpy_bn.forward`.

    >>> def my_forward(x, gamma, beta, eps):
    ...     return gamma * (x - x.mean(axis=0)) / np.sqrt(x.var(axis=0) + eps) + beta
    >>> check_forward(my_forward)
    check_forward: all 4 cases match the reference. Well done.
    """
    specs = [((4, 3), 0, 1e-5, np.float64), ((6, 5), 1, 0.5, np.float64), ((3, 7), 2, 1e-3, np.float64),
             ((16, 5), 3, 1e-5, np.float32)]
    run_cases(fn, "check_forward", "fn(x, gamma, beta, eps) -> y", [_forward_case(*spec) for spec in specs])


# ----------------------------------------------------------------------------------------------------------------------
# The backward pass, x (N, D)
# ----------------------------------------------------------------------------------------------------------------------


def _backward_case(shape: tuple[int, int], seed: int, eps: float, dtype: type = np.float64) -> Case:
    rng = np.random.default_rng(seed)
    x = rng_features(rng, *shape).astype(dtype)
    gamma, beta = (v.astype(dtype) for v in rng_affine(rng, shape[1]))
    dy = rng_upstream(rng, shape).astype(dtype)
    y, cache = numpy_bn.forward(x, gamma, beta, eps)
    dx_ref, dgamma_ref, dbeta_ref = numpy_bn.backward(dy, cache)
    x_hat = cache["x_hat"]
    n, d = shape
    sum_hint = {(n, d): "it was not summed over the batch: dgamma and dbeta sum over the N examples (axis=0)",
                (n,): "it was summed over the wrong axis: sum over the batch, axis=0, to get one entry per feature"}
    swapped = "dgamma and dbeta are swapped: dbeta = sum(dy), dgamma = sum(dy * x_hat)"
    dx_mistakes = [
        ("this matches dx without the MEAN term: the gradient also flows through the batch mean mu_B, "
         "contributing -mean(dy) (times gamma / sigma)", lambda: backward_variant(dy, x, gamma, eps, mean_term=False)),
        ("this matches dx without the VARIANCE term: the gradient also flows through the batch variance "
         "sigma_B^2, contributing -x_hat * mean(dy * x_hat) (times gamma / sigma)",
         lambda: backward_variant(dy, x, gamma, eps, var_term=False)),
        ("this matches dx = gamma * dy / sigma, treating the batch mean and variance as constants: the gradient "
         "must flow through mu_B and sigma_B^2 (Ioffe & Szegedy, Section 2)",
         lambda: backward_variant(dy, x, gamma, eps, mean_term=False, var_term=False)),
        ("this matches dx without the factor gamma: dl/dx_hat = dl/dy * gamma",
         lambda: backward_variant(dy, x, gamma, eps, use_gamma=False)),
        (HINT_UNBIASED, lambda: backward_variant(dy, x, gamma, eps, ddof=1)),
        ("this matches the gradient of (x - mean) / (sqrt(var) + eps): eps belongs inside the square root",
         lambda: backward_variant(dy, x, gamma, eps, eps_outside=True)),
        ("this matches sums where the means belong (a missing 1/N): dx = gamma / sigma * (dy - mean(dy) - "
         "x_hat * mean(dy * x_hat))", lambda: backward_variant(dy, x, gamma, eps, sums_not_means=True)),
        (HINT_NO_EPS, lambda: backward_variant(dy, x, gamma, 0.0)),
    ]
    dgamma_mistakes = [
        (swapped, lambda: dbeta_ref),
        ("this matches sum(dy * x): dgamma multiplies dy by the NORMALIZED input x_hat", lambda: (dy * x).sum(0)),
        ("this matches sum(dy * y): dgamma multiplies dy by x_hat, not by the output y", lambda: (dy * y).sum(0)),
        ("this matches mean(dy * x_hat): dgamma is the SUM over the batch", lambda: (dy * x_hat).mean(axis=0)),
        (HINT_UNBIASED, lambda: (dy * normalize(x, eps, ddof=1)).sum(axis=0)),
        (HINT_EPS_OUTSIDE, lambda: (dy * normalize(x, eps, eps_outside=True)).sum(axis=0)),
        (HINT_NO_EPS, lambda: (dy * normalize(x, 0.0)).sum(axis=0)),
    ]
    dbeta_mistakes = [
        (swapped, lambda: dgamma_ref),
        ("this matches mean(dy): dbeta is the SUM of dy over the batch", lambda: dy.mean(axis=0)),
    ]
    description = f"x.shape={shape}, seed={seed}, eps={eps}" + ("" if dtype == np.float64 else ", dtype=float32")
    return Case(description, (dy, x, gamma, beta, eps),
                (Output("dx", dx_ref, dx_mistakes), Output("dgamma", dgamma_ref, dgamma_mistakes, sum_hint),
                 Output("dbeta", dbeta_ref, dbeta_mistakes, sum_hint)))


@reports_not_attempted
def check_backward(fn: Callable[..., Grads]) -> None:
    """Check ``fn(dy, x, gamma, beta, eps) -> (dx, dgamma, dbeta)``: the gradients of training-mode BN.

    dy, x: (N, D); gamma, beta: (D,). dx: (N, D); dgamma, dbeta: (D,), in x's dtype (one case is float32).
    Reference: `bnnotes.numpy_bn.backward`.

    >>> def my_backward(dy, x, gamma, beta, eps):
    ...     n = x.shape[0]
    ...     inv_std = 1.0 / np.sqrt(x.var(axis=0) + eps)
    ...     x_hat = (x - x.mean(axis=0)) * inv_std
    ...     dgamma, dbeta = (dy * x_hat).sum(axis=0), dy.sum(axis=0)
    ...     dx = gamma * inv_std / n * (n * dy - dbeta - x_hat * dgamma)
    ...     return dx, dgamma, dbeta
    >>> check_backward(my_backward)
    check_backward: all 5 cases match the reference. Well done.
    """
    specs = [((4, 3), 0, 1e-5), ((6, 5), 1, 0.5), ((3, 7), 2, 1e-3), ((10, 4), 3, 1e-5), ((12, 6), 4, 1e-5, np.float32)]
    run_cases(fn, "check_backward", "fn(dy, x, gamma, beta, eps) -> (dx, dgamma, dbeta)",
              [_backward_case(*spec) for spec in specs])


# ----------------------------------------------------------------------------------------------------------------------
# The convolutional forward and backward, x (N, C, H, W)
# ----------------------------------------------------------------------------------------------------------------------

_CONV_AXES = (0, 2, 3)
_HINT_CONV_N_ONLY = (
    "this matches statistics over N only, one mean and variance per (channel, position): in a conv layer each "
    "channel's statistics are taken over N, H and W (axis=(0, 2, 3))"
)
_HINT_CONV_RESHAPE = (
    "this matches x.reshape(-1, C), which mixes channels: move the channel axis last first, "
    "x.transpose(0, 2, 3, 1).reshape(-1, C), or reduce over axis=(0, 2, 3) directly"
)


def _conv_forward_case(shape: tuple[int, int, int, int], seed: int, eps: float, dtype: type) -> Case:
    rng = np.random.default_rng(seed)
    n, c, h, w = shape
    x = rng_images(rng, shape).astype(dtype)
    gamma, beta = (v.astype(dtype) for v in rng_affine(rng, c))
    expected = numpy_bn.forward(x, gamma, beta, eps)[0]
    g4, b4 = gamma.reshape(1, c, 1, 1), beta.reshape(1, c, 1, 1)
    x64 = x.astype(np.float64)

    def channels_last_reshape_bug() -> np.ndarray:
        rows = x64.reshape(-1, c)  # mixes channels: the channel axis was not moved last first
        return (gamma * normalize(rows, eps) + beta).reshape(shape)

    mistakes = [
        (_HINT_CONV_N_ONLY, lambda: g4 * normalize(x64, eps, axis=0) + b4),
        ("this matches per-example statistics over (H, W) (instance norm): batch norm also averages over the "
         "batch, axis=(0, 2, 3)", lambda: g4 * normalize(x64, eps, axis=(2, 3)) + b4),
        ("this matches per-example statistics over (C, H, W) (layer norm): batch norm takes them per channel "
         "over axis=(0, 2, 3)", lambda: g4 * normalize(x64, eps, axis=(1, 2, 3)) + b4),
        (HINT_GLOBAL.replace("feature (column)", "channel"), lambda: g4 * normalize(x64, eps, axis=None) + b4),
        (_HINT_CONV_RESHAPE, channels_last_reshape_bug),
        (HINT_UNBIASED, lambda: g4 * normalize(x64, eps, axis=_CONV_AXES, ddof=1) + b4),
        (HINT_EPS_OUTSIDE, lambda: g4 * normalize(x64, eps, axis=_CONV_AXES, eps_outside=True) + b4),
        (HINT_NO_EPS, lambda: g4 * normalize(x64, 0.0, axis=_CONV_AXES) + b4),
        (HINT_GAMMA_BETA_SWAPPED, lambda: b4 * normalize(x64, eps, axis=_CONV_AXES) + g4),
        (HINT_NO_AFFINE, lambda: normalize(x64, eps, axis=_CONV_AXES)),
    ]
    return Case(f"x.shape={shape}, dtype={np.dtype(dtype).name}, seed={seed}, eps={eps}", (x, gamma, beta, eps),
                (Output("y", expected, mistakes),),
                exception_hint="a (C,) vector broadcasts against the LAST axis; reshape gamma and beta to (1, C, 1, 1)")


@reports_not_attempted
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
    specs = [((2, 3, 4, 5), 0, 1e-5, np.float64), ((3, 4, 2, 3), 1, 0.5, np.float64),
             ((2, 2, 3, 5), 2, 1e-3, np.float64), ((4, 3, 5, 2), 3, 1e-5, np.float32)]
    run_cases(fn, "check_conv_forward", "fn(x, gamma, beta, eps) -> y", [_conv_forward_case(*spec) for spec in specs])


def _conv_dx_mistakes(dy: np.ndarray, x: np.ndarray, gamma: np.ndarray, eps: float) -> list[Mistake]:
    """The catalogue for the convolutional dx; dy, x: (N, C, H, W) in float64."""
    n, c = x.shape[:2]
    x_hat = normalize(x, eps, axis=_CONV_AXES)
    inv_std = 1.0 / np.sqrt(x.var(axis=_CONV_AXES, keepdims=True) + eps)

    def variant(**knobs: object) -> np.ndarray:
        return backward_variant(dy, x, gamma, eps, axes=knobs.pop("axes", _CONV_AXES), **knobs)

    def sums_over(axes: tuple[int, ...], count: int) -> np.ndarray:
        """The compact formula with the sums over `axes` and `count` values: right only for (0, 2, 3) and N*H*W."""
        dbeta = dy.sum(axis=axes, keepdims=True)
        dgamma = (dy * x_hat).sum(axis=axes, keepdims=True)
        return gamma.reshape(1, c, 1, 1) * inv_std / count * (count * dy - dbeta - x_hat * dgamma)

    return [
        (_HINT_CONV_N_ONLY, lambda: variant(axes=(0,))),
        ("this matches dx without the MEAN term: the gradient also flows through the channel mean, contributing "
         "-mean(dy) over (N, H, W) (times gamma / sigma)", lambda: variant(mean_term=False)),
        ("this matches dx without the VARIANCE term: the gradient also flows through the channel variance, "
         "contributing -x_hat * mean(dy * x_hat) over (N, H, W) (times gamma / sigma)",
         lambda: variant(var_term=False)),
        ("this matches dx = gamma * dy / sigma, treating the batch statistics as constants",
         lambda: variant(mean_term=False, var_term=False)),
        ("this matches dx with sums over N only, per position: the statistics of a channel come from all "
         "m = N*H*W values, so the sums in dx run over axis=(0, 2, 3) too", lambda: sums_over((0,), n)),
        ("this matches m = N in the formula: a channel has m = N*H*W values, dx = gamma / sigma / m * (m * dy - "
         "sum(dy) - x_hat * sum(dy * x_hat))", lambda: sums_over(_CONV_AXES, n)),
        (_HINT_CONV_RESHAPE,
         lambda: backward_variant(dy.reshape(-1, c), x.reshape(-1, c), gamma, eps).reshape(x.shape)),
        (HINT_UNBIASED, lambda: variant(ddof=1)),
        ("this matches dx without the factor gamma: dl/dx_hat = dl/dy * gamma", lambda: variant(use_gamma=False)),
        ("this matches the gradient of (x - mean) / (sqrt(var) + eps): eps belongs inside the square root",
         lambda: variant(eps_outside=True)),
    ]


def _conv_backward_case(shape: tuple[int, int, int, int], seed: int, eps: float, dtype: type) -> Case:
    rng = np.random.default_rng(seed)
    n, c, h, w = shape
    x = rng_images(rng, shape).astype(dtype)
    gamma, beta = (v.astype(dtype) for v in rng_affine(rng, c))
    dy = rng_upstream(rng, shape).astype(dtype)
    _, cache = numpy_bn.forward(x, gamma, beta, eps)
    dx_ref, dgamma_ref, dbeta_ref = numpy_bn.backward(dy, cache)
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    dx_mistakes = _conv_dx_mistakes(dy64, x64, gamma.astype(np.float64), eps)

    def reshaped(values: np.ndarray) -> np.ndarray:
        return values.reshape(-1, c)  # the bug: rows that mix channels

    swapped = "dgamma and dbeta are swapped: dbeta = sum(dy), dgamma = sum(dy * x_hat)"
    dgamma_mistakes = [
        (swapped, lambda: dbeta_ref),
        (_HINT_CONV_N_ONLY, lambda: (dy64 * normalize(x64, eps, axis=0)).sum(axis=_CONV_AXES)),
        (_HINT_CONV_RESHAPE, lambda: (reshaped(dy64) * normalize(reshaped(x64), eps)).sum(axis=0)),
        ("this matches sum(dy * x): dgamma multiplies dy by the NORMALIZED input x_hat",
         lambda: (dy64 * x64).sum(axis=_CONV_AXES)),
        (HINT_UNBIASED, lambda: (dy64 * normalize(x64, eps, axis=_CONV_AXES, ddof=1)).sum(axis=_CONV_AXES)),
        (HINT_EPS_OUTSIDE, lambda: (dy64 * normalize(x64, eps, axis=_CONV_AXES, eps_outside=True)).sum(_CONV_AXES)),
    ]
    dbeta_mistakes = [
        (swapped, lambda: dgamma_ref),
        ("this matches mean(dy): dbeta is the SUM of dy over N, H and W", lambda: dy64.mean(axis=_CONV_AXES)),
    ]
    per_position = ("it was not summed over space: gamma and beta are shared by every position of a channel, so "
                    "dgamma and dbeta sum over N, H and W, axis=(0, 2, 3)")
    sum_hint = {(c, h, w): per_position, (n, c): per_position, (c, h): per_position,
                (n, c, h, w): "it was not summed at all: sum over axis=(0, 2, 3), one entry per channel",
                (n, h, w): "it was summed over the channels: sum over axis=(0, 2, 3), one entry per channel"}
    return Case(f"x.shape={shape}, dtype={np.dtype(dtype).name}, seed={seed}, eps={eps}", (dy, x, gamma, beta, eps),
                (Output("dx", dx_ref, dx_mistakes), Output("dgamma", dgamma_ref, dgamma_mistakes, sum_hint),
                 Output("dbeta", dbeta_ref, dbeta_mistakes, sum_hint)),
                exception_hint="a (C,) vector broadcasts against the LAST axis; reshape gamma to (1, C, 1, 1)")


@reports_not_attempted
def check_conv_backward(fn: Callable[..., Grads]) -> None:
    """Check ``fn(dy, x, gamma, beta, eps) -> (dx, dgamma, dbeta)`` for a convolutional input x (N, C, H, W).

    dy, x: (N, C, H, W); gamma, beta: (C,). Each channel has m = N*H*W values, and the dense formula holds with every
    sum over axis=(0, 2, 3): dx (N, C, H, W), dgamma and dbeta (C,), in x's dtype. Reference:
    `bnnotes.numpy_bn.backward`.

    >>> def my_conv_backward(dy, x, gamma, beta, eps):
    ...     axes, m = (0, 2, 3), x.shape[0] * x.shape[2] * x.shape[3]
    ...     inv_std = 1.0 / np.sqrt(x.var(axis=axes, keepdims=True) + eps)
    ...     x_hat = (x - x.mean(axis=axes, keepdims=True)) * inv_std
    ...     dgamma, dbeta = (dy * x_hat).sum(axis=axes), dy.sum(axis=axes)
    ...     per_channel = lambda v: v.reshape(1, -1, 1, 1)
    ...     dx = per_channel(gamma) * inv_std / m * (m * dy - per_channel(dbeta) - x_hat * per_channel(dgamma))
    ...     return dx, dgamma, dbeta
    >>> check_conv_backward(my_conv_backward)
    check_conv_backward: all 4 cases match the reference. Well done.
    """
    specs = [((2, 3, 4, 5), 10, 1e-5, np.float64), ((3, 4, 2, 3), 11, 0.5, np.float64),
             ((2, 2, 3, 5), 12, 1e-3, np.float64), ((4, 3, 5, 2), 13, 1e-5, np.float32)]
    run_cases(fn, "check_conv_backward", "fn(dy, x, gamma, beta, eps) -> (dx, dgamma, dbeta)",
              [_conv_backward_case(*spec) for spec in specs])


# ----------------------------------------------------------------------------------------------------------------------
# A batch of two
# ----------------------------------------------------------------------------------------------------------------------


def _batch_of_two_case(features: int, seed: int, eps: float, dtype: type) -> Case:
    rng = np.random.default_rng(seed)
    x = rng_features(rng, 2, features).astype(dtype)  # (2, D): the two examples
    gamma, _ = rng_affine(rng, features)
    gamma = gamma.astype(dtype)
    dy = rng_upstream(rng, (2, features)).astype(dtype)
    dx_ref = numpy_bn.backward(dy, numpy_bn.forward(x, gamma, np.zeros_like(gamma), eps)[1])[0]
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)

    def variant(**knobs: object) -> np.ndarray:
        return backward_variant(dy64, x64, gamma, eps, **knobs)

    catalogue = [
        ("this matches dx = 0, the eps -> 0 limit: without eps both x_hat are +-1 whatever x, so nothing flows "
         "back; with eps > 0, x_hat = +-a with a^2 = v / (v + eps) < 1, v = ((x1 - x2) / 2)^2, and "
         "dx1 = -dx2 = gamma * (dy1 - dy2) * eps / (2 (v + eps)^(3/2))", lambda: np.zeros_like(x64)),
        ("this matches gamma * dy / sqrt(v + eps), the gradient with the batch statistics held constant (as if "
         "each example were normalized alone): the gradient must flow through the mean and the variance of the two",
         lambda: variant(mean_term=False, var_term=False)),
        ("this matches dx without the MEAN term: the mean (x1 + x2) / 2 depends on both inputs",
         lambda: variant(mean_term=False)),
        ("this matches dx without the VARIANCE term: the variance ((x1 - x2) / 2)^2 depends on both inputs",
         lambda: variant(var_term=False)),
        ("this matches the UNBIASED variance of the two, (x1 - x2)^2 / 2: BN divides by m = 2, "
         "v = ((x1 - x2) / 2)^2", lambda: variant(ddof=1)),
        ("this matches dx without the factor gamma: dl/dx_hat = dl/dy * gamma", lambda: variant(use_gamma=False)),
        (HINT_EPS_OUTSIDE, lambda: variant(eps_outside=True)),
    ]

    def row(index: int) -> list[Mistake]:
        return [(hint, lambda wrong=wrong: wrong()[index]) for hint, wrong in catalogue]

    description = f"D={features}, dtype={np.dtype(dtype).name}, seed={seed}, eps={eps}"
    return Case(description, (x[0], x[1], dy[0], dy[1], gamma, eps),
                (Output("dx1", dx_ref[0], row(0)), Output("dx2", dx_ref[1], row(1))),
                exception_hint="x1, x2, dy1, dy2 and gamma are (D,) each: the batch is np.stack([x1, x2]), (2, D)")


@reports_not_attempted
def check_batch_of_two(fn: Callable[..., tuple[np.ndarray, np.ndarray]]) -> None:
    """Check ``fn(x1, x2, dy1, dy2, gamma, eps) -> (dx1, dx2)``: the BN gradient of a batch of two examples.

    x1, x2, dy1, dy2, gamma: (D,) each; dx1, dx2: (D,), in x1's dtype. With v = ((x1 - x2) / 2)^2 per feature,
    x_hat = +-(x1 - x2) / 2 / sqrt(v + eps) and dx1 = -dx2 = gamma * (dy1 - dy2) * eps / (2 (v + eps)^(3/2)): as
    eps -> 0, x_hat -> +-1 whatever x, and dx -> 0. Reference: `bnnotes.numpy_bn.backward` on the stacked (2, D) batch.

    >>> def my_batch_of_two(x1, x2, dy1, dy2, gamma, eps):
    ...     v = ((x1 - x2) / 2) ** 2
    ...     dx1 = gamma * (dy1 - dy2) * eps / (2 * (v + eps) ** 1.5)
    ...     return dx1, -dx1
    >>> check_batch_of_two(my_batch_of_two)
    check_batch_of_two: all 4 cases match the reference. Well done.
    """
    specs = [(5, 20, 1e-3, np.float64), (3, 21, 1.0, np.float64), (6, 22, 1e-5, np.float64),
             (4, 23, 0.5, np.float32)]
    run_cases(fn, "check_batch_of_two", "fn(x1, x2, dy1, dy2, gamma, eps) -> (dx1, dx2)",
              [_batch_of_two_case(*spec) for spec in specs])
