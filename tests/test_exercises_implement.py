"""Tests of the Implement checkers of issue 15: the convolutional backward, Batch Renorm's r and d, SyncBN's merge.

Each checker accepts right answers (its cases include float32 ones) and names each mistake of its catalogue.
"""

from __future__ import annotations

import numpy as np
import pytest

from bnnotes import exercises, numpy_bn, numpy_variants
from conftest import fails_with, passes  # the checker-test helpers, shared

AXES = (0, 2, 3)


def per_channel(v):
    return v.reshape(1, -1, 1, 1)


# ---------------------------------------------------------------------------------------------------------------------
# check_conv_backward


def conv_backward(dy, x, gamma, beta, eps, stats_axes=AXES, ddof=0, mean_term=True, var_term=True):
    """A learner's staged conv backward (Ioffe & Szegedy's equations with the sums over N, H, W), with knobs."""
    m = int(np.prod([x.shape[a] for a in stats_axes]))
    mu = x.mean(axis=stats_axes, keepdims=True)
    var = ((x - mu) ** 2).sum(axis=stats_axes, keepdims=True) / (m - ddof)
    x_hat = (x - mu) / np.sqrt(var + eps)
    dx_hat = dy * per_channel(gamma)
    dvar = (dx_hat * (x - mu)).sum(axis=stats_axes, keepdims=True) * -0.5 * (var + eps) ** -1.5
    dmu = -(dx_hat / np.sqrt(var + eps)).sum(axis=stats_axes, keepdims=True)
    dx = dx_hat / np.sqrt(var + eps)
    if var_term:
        dx = dx + dvar * 2 * (x - mu) / (m - ddof)
    if mean_term:
        dx = dx + dmu / m
    return dx, (dy * x_hat).sum(axis=AXES), dy.sum(axis=AXES)


def right_conv_backward(dy, x, gamma, beta, eps):
    m = x.shape[0] * x.shape[2] * x.shape[3]
    inv_std = 1.0 / np.sqrt(x.var(axis=AXES, keepdims=True) + eps)
    x_hat = (x - x.mean(axis=AXES, keepdims=True)) * inv_std
    dgamma, dbeta = (dy * x_hat).sum(axis=AXES), dy.sum(axis=AXES)
    dx = per_channel(gamma) * inv_std / m * (m * dy - per_channel(dbeta) - x_hat * per_channel(dgamma))
    return dx, dgamma, dbeta


def via_channels_last(dy, x, gamma, beta, eps):
    """Right: move the channels last, use the dense backward on (N*H*W, C), move them back."""
    n, c, h, w = x.shape
    rows = x.transpose(0, 2, 3, 1).reshape(-1, c)
    dy_rows = dy.transpose(0, 2, 3, 1).reshape(-1, c)
    dx, dgamma, dbeta = numpy_bn.backward(dy_rows, numpy_bn.forward(rows, gamma, beta, eps)[1])
    return dx.reshape(n, h, w, c).transpose(0, 3, 1, 2), dgamma, dbeta


def replace(index, value_fn):
    """The right conv backward with output `index` replaced by value_fn(dy, x, gamma, eps, right_outputs)."""

    def fn(dy, x, gamma, beta, eps):
        outputs = list(right_conv_backward(dy, x, gamma, beta, eps))
        outputs[index] = value_fn(dy, x, gamma, eps, outputs)
        return tuple(outputs)

    return fn


def x_hat_of(x, eps, axes=AXES, ddof=0):
    return (x - x.mean(axis=axes, keepdims=True)) / np.sqrt(x.var(axis=axes, ddof=ddof, keepdims=True) + eps)


def sums_over(axes, count_of):
    """The compact formula with sums over `axes` and m = count_of(x): a learner adapting the dense formula wrongly."""

    def fn(dy, x, gamma, beta, eps):
        m = count_of(x)
        inv_std = 1.0 / np.sqrt(x.var(axis=AXES, keepdims=True) + eps)
        x_hat = (x - x.mean(axis=AXES, keepdims=True)) * inv_std
        sum_dy, sum_dy_x_hat = dy.sum(axis=axes, keepdims=True), (dy * x_hat).sum(axis=axes, keepdims=True)
        dx = per_channel(gamma) * inv_std / m * (m * dy - sum_dy - x_hat * sum_dy_x_hat)
        return dx, (dy * x_hat).sum(axis=AXES), dy.sum(axis=AXES)

    return fn


def conv_reshape_bug(dy, x, gamma, beta, eps):
    c = x.shape[1]
    dx, dgamma, dbeta = numpy_bn.backward(dy.reshape(-1, c), numpy_bn.forward(x.reshape(-1, c), gamma, beta, eps)[1])
    return dx.reshape(x.shape), dgamma, dbeta


def conv_eps_outside(dy, x, gamma, beta, eps):
    """The exact gradient of the eps-outside forward, (x - mu) / (sqrt(var) + eps), per channel."""
    m = x.shape[0] * x.shape[2] * x.shape[3]
    mu, var = x.mean(axis=AXES, keepdims=True), x.var(axis=AXES, keepdims=True)
    std = np.sqrt(var) + eps
    dx_hat = dy * per_channel(gamma)
    dvar = -(dx_hat * (x - mu)).sum(axis=AXES, keepdims=True) / std**2 / (2 * np.sqrt(var))
    dx = dx_hat / std + dvar * 2 * (x - mu) / m - dx_hat.sum(axis=AXES, keepdims=True) / std / m
    x_hat = (x - mu) / std
    return dx, (dy * x_hat).sum(axis=AXES), dy.sum(axis=AXES)


CONV_BACKWARD_MISTAKES = [
    (lambda dy, x, g, b, eps: conv_backward(dy, x, g, b, eps, stats_axes=(0,)), "statistics over N only"),
    (lambda dy, x, g, b, eps: conv_backward(dy, x, g, b, eps, mean_term=False), "without the MEAN term"),
    (lambda dy, x, g, b, eps: conv_backward(dy, x, g, b, eps, var_term=False), "without the VARIANCE term"),
    (lambda dy, x, g, b, eps: conv_backward(dy, x, g, b, eps, mean_term=False, var_term=False), "as constants"),
    (lambda dy, x, g, b, eps: conv_backward(dy, x, g, b, eps, ddof=1), "UNBIASED variance"),
    (sums_over((0,), lambda x: x.shape[0]), "sums over N only, per position"),
    (sums_over(AXES, lambda x: x.shape[0]), "m = N in the formula"),
    (conv_reshape_bug, "mixes channels"),
    (conv_eps_outside, "eps belongs inside"),
    (replace(0, lambda dy, x, g, eps, out: out[0] / per_channel(g)), "without the factor gamma"),
    (replace(1, lambda dy, x, g, eps, out: out[2]), "swapped"),
    (replace(1, lambda dy, x, g, eps, out: (dy * x).sum(axis=AXES)), "NORMALIZED input x_hat"),
    (replace(2, lambda dy, x, g, eps, out: dy.mean(axis=AXES)), "SUM of dy over N, H and W"),
    (replace(1, lambda dy, x, g, eps, out: (dy * x_hat_of(x, eps)).sum(axis=0)), "not summed over space"),
    (replace(2, lambda dy, x, g, eps, out: dy.sum(axis=(2, 3))), "not summed over space"),
    (replace(1, lambda dy, x, g, eps, out: dy * x_hat_of(x, eps)), "not summed at all"),
    (replace(2, lambda dy, x, g, eps, out: dy.sum(axis=1)), "summed over the channels"),
]


def test_conv_backward_accepts_right_answers(capsys):
    passes(exercises.check_conv_backward, right_conv_backward, capsys)
    passes(exercises.check_conv_backward, conv_backward, capsys)
    passes(exercises.check_conv_backward, via_channels_last, capsys)
    passes(exercises.check_conv_backward, lambda dy, x, g, b, eps: numpy_bn.backward(
        dy, numpy_bn.forward(x, g, b, eps)[1]), capsys)


def test_conv_backward_cases_include_float32():
    """A right answer in float64 arithmetic on a float32 case is refused for its dtype: the case is float32."""

    def upcast(dy, x, gamma, beta, eps):
        return tuple(v.astype(np.float64) for v in right_conv_backward(dy, x, gamma, beta, eps))

    fails_with(exercises.check_conv_backward, upcast, "case 4 of 4", "float32")


@pytest.mark.parametrize("wrong, hint", CONV_BACKWARD_MISTAKES)
def test_conv_backward_names_each_mistake(wrong, hint):
    fails_with(exercises.check_conv_backward, wrong, hint)


def test_conv_backward_rejects_garbage_and_wrong_tuples():
    fails_with(exercises.check_conv_backward, lambda dy, x, g, b, eps: right_conv_backward(dy, x, g, b, eps)[0],
               "tuple (dx, dgamma, dbeta)")
    fails_with(exercises.check_conv_backward, lambda dy, x, g, b, eps: (np.random.default_rng(0).normal(
        size=x.shape), g, b))
    fails_with(exercises.check_conv_backward, lambda dy, x, g, b, eps: (dy * g + b, g, b), "broadcast",
               "reshape gamma to (1, C, 1, 1)")


def test_conv_backward_sums_vanish_over_each_channel():
    """The invariants the chapter asks about: per channel, the sum over (N, H, W) of dx is 0 for every eps, and the
    sum of dx * x_hat is 0 for eps = 0 only (it is gamma / sigma * sum(dy * x_hat) * eps / (var + eps))."""
    rng = np.random.default_rng(0)
    x, dy = rng.normal(2.0, 3.0, size=(3, 4, 5, 2)), rng.normal(size=(3, 4, 5, 2))
    gamma, beta = rng.uniform(0.5, 2.0, 4), rng.normal(size=4)
    for eps in (0.0, 1e-5, 0.5):
        dx, _, _ = right_conv_backward(dy, x, gamma, beta, eps)
        np.testing.assert_allclose(dx.sum(axis=AXES), 0.0, atol=1e-10)
        x_hat, var = x_hat_of(x, eps), x.var(axis=AXES)
        expected = gamma / np.sqrt(var + eps) * (dy * x_hat).sum(axis=AXES) * eps / (var + eps)
        np.testing.assert_allclose((dx * x_hat).sum(axis=AXES), expected, rtol=1e-6, atol=1e-10)


# ---------------------------------------------------------------------------------------------------------------------
# check_renorm_correction


def correction_with(r_fn=None, d_fn=None):
    """A learner's (r, d) with one of the two replaced by a wrong one."""

    def fn(batch_mean, batch_std, running_mean, running_std, r_max, d_max):
        raw_r, raw_d = batch_std / running_std, (batch_mean - running_mean) / running_std
        r = np.clip(raw_r, 1 / r_max, r_max) if r_fn is None else r_fn(raw_r, r_max, d_max)
        d = (np.clip(raw_d, -d_max, d_max) if d_fn is None
             else d_fn(raw_d, d_max, r_max, batch_mean - running_mean, batch_std))
        return r, d

    return fn


RENORM_CORRECTION_MISTAKES = [
    (correction_with(r_fn=lambda raw, r_max, d_max: raw), "r is not clipped"),
    (correction_with(r_fn=lambda raw, r_max, d_max: 1 / np.clip(raw, 1 / r_max, r_max)), "upside down"),
    (correction_with(r_fn=lambda raw, r_max, d_max: np.clip(raw, -r_max, r_max)), "clipped to [-r_max, r_max]"),
    (correction_with(r_fn=lambda raw, r_max, d_max: np.clip(raw, 0, r_max)), "clipped to [0, r_max]"),
    (correction_with(r_fn=lambda raw, r_max, d_max: np.clip(raw, 1 / d_max, d_max)), "r is clipped with d_max"),
    (correction_with(d_fn=lambda raw, d_max, *_: raw), "d is not clipped"),
    (correction_with(d_fn=lambda raw, d_max, r_max, shift, sb: np.clip(shift, -d_max, d_max)), "not divided by sigma"),
    (correction_with(d_fn=lambda raw, d_max, r_max, shift, sb: np.clip(shift / sb, -d_max, d_max)), "batch sigma_B"),
    (correction_with(d_fn=lambda raw, d_max, *_: np.clip(raw, 1 / d_max, d_max)), "clipped to [1 / d_max, d_max]"),
    (correction_with(d_fn=lambda raw, d_max, *_: np.clip(-raw, -d_max, d_max)), "wrong sign"),
    (correction_with(d_fn=lambda raw, d_max, r_max, *_: np.clip(raw, -r_max, r_max)), "d's bound is d_max"),
    (correction_with(d_fn=lambda raw, d_max, *_: np.clip(raw, 0, d_max)), "clipped to [0, d_max]"),
]


def test_renorm_correction_accepts_right_answers(capsys):
    passes(exercises.check_renorm_correction, correction_with(), capsys)
    passes(exercises.check_renorm_correction, numpy_variants.renorm_correction, capsys)


def test_renorm_correction_cases_include_float32():
    def upcast(*args):
        return tuple(v.astype(np.float64) for v in correction_with()(*args))

    fails_with(exercises.check_renorm_correction, upcast, "case 4 of 4", "float32")


@pytest.mark.parametrize("wrong, hint", RENORM_CORRECTION_MISTAKES)
def test_renorm_correction_names_each_mistake(wrong, hint):
    fails_with(exercises.check_renorm_correction, wrong, hint)


def test_renorm_correction_names_both_missing_clips():
    def unclipped(batch_mean, batch_std, running_mean, running_std, r_max, d_max):
        return batch_std / running_std, (batch_mean - running_mean) / running_std

    fails_with(exercises.check_renorm_correction, unclipped, "r is not clipped", "d is not clipped")


def test_renorm_correction_rejects_garbage():
    fails_with(exercises.check_renorm_correction, lambda bm, bs, rm, rs, r_max, d_max: (bs, bm))
    fails_with(exercises.check_renorm_correction, lambda bm, bs, rm, rs, r_max, d_max: bs / rs, "tuple (r, d)")


# ---------------------------------------------------------------------------------------------------------------------
# check_merge_statistics


def right_merge(counts, means, variances):
    n, weights = counts.sum(), counts[:, None]
    mean = (weights * means).sum(axis=0) / n
    return mean, (weights * (variances + (means - mean) ** 2)).sum(axis=0) / n


def merge_via_second_moments(counts, means, variances):
    """Right too: merge E[x] and E[x^2], then var = E[x^2] - E[x]^2 (less stable, but fine at this scale)."""
    n, weights = counts.sum(), counts[:, None]
    mean = (weights * means).sum(axis=0) / n
    second_moment = (weights * (variances + means**2)).sum(axis=0) / n
    return mean, second_moment - mean**2


def merge_loop(counts, means, variances):
    """Right too: Chan et al.'s pairwise update, one rank at a time."""
    n, mean, m2 = counts[0], means[0], variances[0] * counts[0]
    for count, rank_mean, rank_var in zip(counts[1:], means[1:], variances[1:]):
        delta, total = rank_mean - mean, n + count
        mean = mean + delta * count / total
        m2 = m2 + rank_var * count + delta**2 * n * count / total
        n = total
    return mean, m2 / n


def merge_with(mean_fn, var_fn):
    def fn(counts, means, variances):
        n, weights = counts.sum(), counts[:, None]
        mean = mean_fn(counts, means, n, weights)
        return mean, var_fn(counts, means, variances, mean, n, weights)

    return fn


def weighted_mean(counts, means, n, weights):
    return (weights * means).sum(axis=0) / n


MERGE_MISTAKES = [
    (merge_with(lambda c, mu, n, w: mu.mean(axis=0),
                lambda c, mu, v, mean, n, w: (w * (v + (mu - mean) ** 2)).sum(0) / n), "unweighted mean"),
    (merge_with(weighted_mean, lambda c, mu, v, mean, n, w: (w * v).sum(0) / n), "forgets the spread BETWEEN"),
    (merge_with(weighted_mean, lambda c, mu, v, mean, n, w: v.mean(0)), "forgets the spread BETWEEN"),
    (merge_with(weighted_mean, lambda c, mu, v, mean, n, w: (w * (v + (mu - mean) ** 2)).sum(0) / (n - 1)),
     "UNBIASED variance of the union"),
    (merge_with(weighted_mean, lambda c, mu, v, mean, n, w: (v + (mu - mean) ** 2).mean(0)), "in the mean only"),
    (merge_with(lambda c, mu, n, w: mu.mean(axis=0), lambda c, mu, v, mean, n, w: (v + (mu - mean) ** 2).mean(0)),
     "no count weights at all"),
    (merge_with(weighted_mean, lambda c, mu, v, mean, n, w: (w * v).sum(0) / n + ((mu - mean) ** 2).mean(0)),
     "counts n_k times"),
]


def test_merge_statistics_accepts_right_answers(capsys):
    for right in (right_merge, merge_via_second_moments, merge_loop, numpy_variants.merge_statistics):
        passes(exercises.check_merge_statistics, right, capsys)


def test_merge_statistics_cases_include_float32():
    def upcast(counts, means, variances):
        return tuple(v.astype(np.float64) for v in right_merge(counts, means, variances))

    fails_with(exercises.check_merge_statistics, upcast, "case 4 of 4", "float32")


@pytest.mark.parametrize("wrong, hint", MERGE_MISTAKES)
def test_merge_statistics_names_each_mistake(wrong, hint):
    fails_with(exercises.check_merge_statistics, wrong, hint)


def test_merge_statistics_rejects_garbage():
    fails_with(exercises.check_merge_statistics, lambda c, mu, v: (mu, v), "shape")
    fails_with(exercises.check_merge_statistics, lambda c, mu, v: right_merge(c, mu, v)[0], "tuple (mean, var)")
    fails_with(exercises.check_merge_statistics, lambda c, mu, v: (c * mu).sum(0), "broadcast",
               "weight the rows with counts[:, None]")
