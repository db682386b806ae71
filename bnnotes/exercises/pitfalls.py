"""Checkers for the chapter "Pitfalls: when BN breaks" (pitfalls.md): Batch Renormalization (Ioffe, 2017), its
correction r and d, and its training forward.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from bnnotes import numpy_variants
from bnnotes.exercises._catalogue import HINT_UNBIASED, rng_affine, rng_features
from bnnotes.exercises._harness import Case, Mistake, Output, reports_not_attempted, run_cases

__all__ = ["check_renorm_correction", "check_renorm_forward"]


def _running_statistics(rng: np.random.Generator, batch_mean: np.ndarray, batch_std: np.ndarray, r_max: float,
                        d_max: float) -> tuple[np.ndarray, np.ndarray]:
    """Running statistics that put some features inside the clipping ranges of r and d and some beyond each end."""
    features = batch_mean.shape[0]
    log_ratio = np.linspace(-1.6 * np.log(r_max), 1.6 * np.log(r_max), features)[rng.permutation(features)]
    running_std = batch_std / np.exp(log_ratio)
    mean_shift = np.linspace(-2.0 * d_max, 2.0 * d_max, features)[rng.permutation(features)]
    return batch_mean - running_std * mean_shift, running_std


def _correction_mistakes(batch_mean: np.ndarray, batch_std: np.ndarray, running_mean: np.ndarray,
                         running_std: np.ndarray, r_max: float, d_max: float) -> tuple[list[Mistake], list[Mistake]]:
    """The catalogues for r and for d."""
    raw_r, raw_d = batch_std / running_std, (batch_mean - running_mean) / running_std
    r_mistakes = [
        ("r is not clipped: r = clip(sigma_B / sigma, 1 / r_max, r_max)", lambda: raw_r),
        ("r is clipped to [0, r_max]: the lower bound is 1 / r_max", lambda: np.clip(raw_r, 0.0, r_max)),
        ("r is clipped to [-r_max, r_max]: the lower bound is 1 / r_max", lambda: np.clip(raw_r, -r_max, r_max)),
        ("r is upside down: r = sigma_B / sigma (batch over running), then clipped",
         lambda: np.clip(1.0 / raw_r, 1.0 / r_max, r_max)),
        ("r is clipped with d_max: r's bounds are 1 / r_max and r_max", lambda: np.clip(raw_r, 1.0 / d_max, d_max)),
    ]
    d_mistakes = [
        ("d is not clipped: d = clip((mu_B - mu) / sigma, -d_max, d_max)", lambda: raw_d),
        ("d is clipped to [0, d_max]: the range is [-d_max, d_max]", lambda: np.clip(raw_d, 0.0, d_max)),
        ("d is clipped to [1 / d_max, d_max], r's kind of range: d is a shift, clipped to [-d_max, d_max]",
         lambda: np.clip(raw_d, 1.0 / d_max, d_max)),
        ("d has the wrong sign: d = (mu_B - mu) / sigma, batch minus running",
         lambda: np.clip(-raw_d, -d_max, d_max)),
        ("d is divided by the batch sigma_B: it is measured in units of the running sigma, (mu_B - mu) / sigma",
         lambda: np.clip((batch_mean - running_mean) / batch_std, -d_max, d_max)),
        ("d is not divided by sigma: d = (mu_B - mu) / sigma, the shift in units of the running standard deviation",
         lambda: np.clip(batch_mean - running_mean, -d_max, d_max)),
        ("d is clipped with r_max: d's bound is d_max", lambda: np.clip(raw_d, -r_max, r_max)),
    ]
    return r_mistakes, d_mistakes


def _correction_case(features: int, seed: int, r_max: float, d_max: float, dtype: type) -> Case:
    rng = np.random.default_rng(seed)
    batch_mean = rng.uniform(-4.0, 4.0, size=features)
    batch_std = np.exp(rng.uniform(np.log(0.3), np.log(4.0), size=features))
    running_mean, running_std = _running_statistics(rng, batch_mean, batch_std, r_max, d_max)
    statistics = tuple(v.astype(dtype) for v in (batch_mean, batch_std, running_mean, running_std))
    r_ref, d_ref = numpy_variants.renorm_correction(*statistics, r_max, d_max)
    r_mistakes, d_mistakes = _correction_mistakes(*(v.astype(np.float64) for v in statistics), r_max, d_max)
    description = f"C={features}, dtype={np.dtype(dtype).name}, seed={seed}, r_max={r_max}, d_max={d_max}"
    outputs = (Output("r", r_ref, r_mistakes), Output("d", d_ref, d_mistakes))
    return Case(description, (*statistics, r_max, d_max), outputs)


@reports_not_attempted
def check_renorm_correction(fn: Callable[..., tuple[np.ndarray, np.ndarray]]) -> None:
    """Check ``fn(batch_mean, batch_std, running_mean, running_std, r_max, d_max) -> (r, d)``: Batch Renorm's
    correction (Ioffe, 2017, Algorithm 1).

    r = clip(sigma_B / sigma, 1/r_max, r_max) and d = clip((mu_B - mu) / sigma, -d_max, d_max). The four statistics
    and r, d are (C,) arrays (r and d in their dtype); r_max, d_max are floats. Reference:
    `bnnotes.numpy_variants.renorm_correction`.

    >>> def my_correction(batch_mean, batch_std, running_mean, running_std, r_max, d_max):
    ...     r = np.clip(batch_std / running_std, 1 / r_max, r_max)
    ...     d = np.clip((batch_mean - running_mean) / running_std, -d_max, d_max)
    ...     return r, d
    >>> check_renorm_correction(my_correction)
    check_renorm_correction: all 4 cases match the reference. Well done.
    """
    specs = [(6, 30, 2.0, 1.0, np.float64), (8, 31, 3.0, 2.0, np.float64), (7, 32, 1.5, 0.5, np.float64),
             (6, 33, 3.0, 5.0, np.float32)]
    run_cases(fn, "check_renorm_correction",
              "fn(batch_mean, batch_std, running_mean, running_std, r_max, d_max) -> (r, d)",
              [_correction_case(*spec) for spec in specs])


def _renorm_forward_case(shape: tuple[int, int], seed: int, r_max: float, d_max: float, eps: float,
                         dtype: type = np.float64) -> Case:
    rng = np.random.default_rng(seed)
    n, features = shape
    x = rng_features(rng, n, features).astype(dtype)
    gamma, beta = (v.astype(dtype) for v in rng_affine(rng, features))
    batch_mean, batch_std = x.mean(axis=0), np.sqrt(x.var(axis=0) + eps)
    running_mean, running_std = (v.astype(dtype) for v in _running_statistics(rng, batch_mean, batch_std, r_max,
                                                                              d_max))
    args = (x, gamma, beta, running_mean, running_std, r_max, d_max, eps)
    y_ref, r_ref, d_ref = numpy_variants.renorm_forward(*args)
    unbiased_std = np.sqrt(x.var(axis=0, ddof=1) + eps)
    r_mistakes, d_mistakes = _correction_mistakes(batch_mean, batch_std, running_mean, running_std, r_max, d_max)
    r_mistakes += [
        ("this matches sigma_B without eps: sigma_B = sqrt(var_B + eps)",
         lambda: np.clip(np.sqrt(x.var(axis=0)) / running_std, 1.0 / r_max, r_max)),
        (HINT_UNBIASED, lambda: np.clip(unbiased_std / running_std, 1.0 / r_max, r_max)),
    ]
    x_hat_bn = (x - batch_mean) / batch_std
    y_mistakes = [
        ("this is plain batch norm: renormalize with x_hat = (x - mu_B) / sigma_B * r + d",
         lambda: gamma * x_hat_bn + beta),
        ("this matches ((x - mu_B) / sigma_B + d) * r: the order is x_hat * r + d",
         lambda: gamma * (x_hat_bn + d_ref) * r_ref + beta),
        ("this matches normalizing with the running statistics: r and d correct the BATCH-normalized value, "
         "x_hat = (x - mu_B) / sigma_B * r + d", lambda: gamma * (x - running_mean) / running_std + beta),
        ("this matches x_hat * r - d: d is added", lambda: gamma * (x_hat_bn * r_ref - d_ref) + beta),
        ("this matches x_hat / r + d: multiply by r", lambda: gamma * (x_hat_bn / r_ref + d_ref) + beta),
        (HINT_UNBIASED, lambda: gamma * ((x - batch_mean) / unbiased_std * r_ref + d_ref) + beta),
    ]
    axis_hint = {(n,): "this has one entry per example: r and d are per feature, from statistics over axis=0"}
    dtype_note = "" if dtype == np.float64 else ", dtype=float32"
    return Case(f"x.shape={shape}, seed={seed}, r_max={r_max}, d_max={d_max}, eps={eps}{dtype_note}", args,
                (Output("y", y_ref, y_mistakes), Output("r", r_ref, r_mistakes, axis_hint),
                 Output("d", d_ref, d_mistakes, axis_hint)),
                report_order=(1, 2, 0))  # r and d first: a wrong y often follows from them


@reports_not_attempted
def check_renorm_forward(fn: Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray]]) -> None:
    """Check ``fn(x, gamma, beta, running_mean, running_std, r_max, d_max, eps) -> (y, r, d)``.

    Batch Renormalization's training forward (Ioffe, 2017, Algorithm 1) for x (N, D); r, d: (D,); all three in x's
    dtype (one case is float32). Reference:
    `bnnotes.numpy_variants.renorm_forward` (cross-checked in the tests against `bnnotes.renorm.BatchRenorm1d`).

    >>> def my_renorm(x, gamma, beta, running_mean, running_std, r_max, d_max, eps):
    ...     batch_mean, batch_std = x.mean(axis=0), np.sqrt(x.var(axis=0) + eps)
    ...     r = np.clip(batch_std / running_std, 1 / r_max, r_max)
    ...     d = np.clip((batch_mean - running_mean) / running_std, -d_max, d_max)
    ...     return gamma * ((x - batch_mean) / batch_std * r + d) + beta, r, d
    >>> check_renorm_forward(my_renorm)
    check_renorm_forward: all 4 cases match the reference. Well done.
    """
    specs = [((5, 6), 0, 2.0, 1.0, 1e-5), ((4, 8), 1, 3.0, 2.0, 0.1), ((12, 7), 2, 1.5, 0.5, 1e-3),
             ((10, 6), 3, 2.0, 1.0, 1e-5, np.float32)]
    signature = "fn(x, gamma, beta, running_mean, running_std, r_max, d_max, eps) -> (y, r, d)"
    run_cases(fn, "check_renorm_forward", signature, [_renorm_forward_case(*spec) for spec in specs])
