"""What several checkers share: seeded test data, and the wrong variants of BN that learners really write.

The data are chosen so that the realistic mistakes give clearly different answers: means far from 0, features on
different scales, gamma != 1 with both signs. `normalize` and `backward_variant` compute BN with the knobs a mistake
turns (every knob's default is the right answer); the ``HINT_*`` texts name the mistakes that several checkers share.

>>> import numpy as np
>>> x = np.array([[0.0, 1.0], [2.0, 5.0]])
>>> normalize(x, eps=0.0).tolist()
[[-1.0, -1.0], [1.0, 1.0]]
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["rng_features", "rng_images", "rng_affine", "rng_upstream", "normalize", "backward_variant", "HINT_UNBIASED",
           "HINT_EPS_OUTSIDE", "HINT_NO_EPS", "HINT_NO_SQRT", "HINT_NOT_CENTERED", "HINT_ROWS",
           "HINT_GAMMA_BETA_SWAPPED", "HINT_NO_AFFINE", "HINT_GLOBAL"]

HINT_UNBIASED = (
    "this matches normalizing with the UNBIASED variance (dividing by N-1, np.var(..., ddof=1) or torch.var's "
    "default). Algorithm 1 normalizes with the BIASED batch variance (divide by N); the unbiased one is only used "
    "for the running estimate."
)
HINT_EPS_OUTSIDE = (
    "this matches (x - mean) / (sqrt(var) + eps): eps belongs INSIDE the square root, (x - mean) / sqrt(var + eps)."
)
HINT_NO_EPS = "this matches normalizing without eps: divide by sqrt(var + eps), not sqrt(var)."
HINT_NO_SQRT = "this matches dividing by the variance: divide by the standard deviation sqrt(var + eps)."
HINT_NOT_CENTERED = "this matches forgetting to subtract the batch mean before dividing by the standard deviation."
HINT_ROWS = (
    "this matches normalizing each ROW (example) over its features (axis=1): batch norm takes the statistics of "
    "each FEATURE (column) over the batch, axis=0."
)
HINT_GAMMA_BETA_SWAPPED = "this matches beta * x_hat + gamma: gamma scales, beta shifts (y = gamma * x_hat + beta)."
HINT_NO_AFFINE = "this matches x_hat without the scale and shift: return gamma * x_hat + beta."
HINT_GLOBAL = "this matches one mean and variance for the whole array: the statistics are per feature (column)."


def rng_features(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """(n, d) data with means far from 0 and features on different scales."""
    means = rng.uniform(-6.0, 6.0, size=d)
    scales = np.exp(rng.uniform(np.log(0.3), np.log(4.0), size=d))
    return means + scales * rng.standard_normal((n, d))


def rng_images(rng: np.random.Generator, shape: tuple[int, int, int, int]) -> np.ndarray:
    """(N, C, H, W) data with per-channel means far from 0 and channels on different scales."""
    channels = (1, shape[1], 1, 1)
    means = rng.uniform(-6.0, 6.0, size=channels)
    scales = np.exp(rng.uniform(np.log(0.3), np.log(4.0), size=channels))
    return means + scales * rng.standard_normal(shape)


def rng_affine(rng: np.random.Generator, d: int) -> tuple[np.ndarray, np.ndarray]:
    """gamma, beta (d,): |gamma| in [0.5, 2] with both signs, beta in [-2, 2]."""
    gamma = rng.uniform(0.5, 2.0, size=d) * rng.choice([-1.0, 1.0], size=d)
    beta = rng.uniform(-2.0, 2.0, size=d)
    return gamma, beta


def rng_upstream(rng: np.random.Generator, shape: tuple[int, ...], channel_axis: int = 1) -> np.ndarray:
    """A non-uniform upstream gradient dy of `shape`: a constant dy has a zero dx and would hide bugs.

    Each channel (axis `channel_axis`; the last axis of a 2-D shape) gets its own scale and offset.
    """
    channels = shape[-1] if len(shape) == 2 else shape[channel_axis]
    per_channel = [1] * len(shape)
    per_channel[-1 if len(shape) == 2 else channel_axis] = channels
    noise = rng.standard_normal(shape)  # drawn first: the order of the draws fixes every case's numbers
    scale = rng.uniform(0.5, 2.0, size=channels).reshape(per_channel)
    offset = rng.uniform(-1.0, 1.0, size=channels).reshape(per_channel)
    return noise * scale + offset


def normalize(x: np.ndarray, eps: float, axis: Any = 0, ddof: int = 0, eps_outside: bool = False,
              center: bool = True, sqrt: bool = True) -> np.ndarray:
    """Normalization over `axis` with the knobs that known mistakes turn (all of them wrong except the defaults)."""
    x = np.asarray(x, dtype=np.float64)
    mean, var = x.mean(axis=axis, keepdims=True), x.var(axis=axis, ddof=ddof, keepdims=True)
    numerator = x - mean if center else x
    if not sqrt:
        return numerator / (var + eps)
    return numerator / (np.sqrt(var) + eps) if eps_outside else numerator / np.sqrt(var + eps)


def backward_variant(dy: np.ndarray, x: np.ndarray, gamma: np.ndarray, eps: float, axes: tuple[int, ...] = (0,),
                     ddof: int = 0, mean_term: bool = True, var_term: bool = True, use_gamma: bool = True,
                     eps_outside: bool = False, sums_not_means: bool = False) -> np.ndarray:
    """dx of BN with statistics over `axes`, with the knobs that known mistakes turn (wrong except the defaults).

    gamma has one entry per channel (axis 1 of an (N, C, *spatial) x, the last axis of an (N, D) x).
    """
    x, dy = np.asarray(x, dtype=np.float64), np.asarray(dy, dtype=np.float64)
    gamma = np.asarray(gamma, dtype=np.float64)
    if x.ndim > 2:
        gamma = gamma.reshape((1, -1) + (1,) * (x.ndim - 2))
    m = int(np.prod([x.shape[axis] for axis in axes]))
    x_centered = x - x.mean(axis=axes, keepdims=True)
    var = (x_centered**2).sum(axis=axes, keepdims=True) / (m - ddof)
    std = np.sqrt(var) + eps if eps_outside else np.sqrt(var + eps)
    dx_hat = dy * gamma if use_gamma else dy
    # The chain rule through std(var): d std / d var = 1 / (2 sqrt(var)) outside, 1 / (2 std) inside.
    dstd_dvar = 1.0 / (2.0 * np.sqrt(var)) if eps_outside else 1.0 / (2.0 * std)
    dvar = np.sum(dx_hat * x_centered, axis=axes, keepdims=True) * (-1.0 / std**2) * dstd_dvar
    dmean = -np.sum(dx_hat, axis=axes, keepdims=True) / std
    dx = dx_hat / std
    if var_term:
        dx = dx + dvar * 2.0 * x_centered / (1.0 if sums_not_means else m - ddof)
    if mean_term:
        dx = dx + dmean / (1.0 if sums_not_means else m)
    return dx
