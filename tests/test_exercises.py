"""Tests of bnnotes.exercises: every checker accepts a right answer and names the realistic wrong ones."""

from __future__ import annotations

import numpy as np
import pytest

from bnnotes import exercises, numpy_bn, numpy_variants
from conftest import fails_with, passes  # the checker-test helpers, shared


def garbage(*args):
    """Random numbers of the right shape: must fail every array checker."""
    shape = np.shape(args[0])
    return np.random.default_rng(0).standard_normal(shape)


# ---------------------------------------------------------------------------------------------------------------------
# Shared validation


# Every checker that takes the learner's function (the stub tests at the end use the same list).
ALL_CHECKERS = [
    exercises.check_whitening,
    exercises.check_forward,
    exercises.check_backward,
    exercises.check_conv_forward,
    exercises.check_running_stats,
    exercises.check_fold,
    exercises.check_renorm_forward,
    exercises.check_ghost_batch_norm,
    exercises.check_layer_norm,
    # New in issue 15 (their own tests: tests/test_exercises_derive.py and tests/test_exercises_implement.py).
    exercises.check_conv_backward,
    exercises.check_batch_of_two,
    exercises.check_bessel_factor,
    exercises.check_caffe_scale_factor,
    exercises.check_renorm_correction,
    exercises.check_merge_statistics,
    exercises.check_scale_invariance,
]


@pytest.mark.parametrize("checker", ALL_CHECKERS, ids=lambda checker: checker.__name__)
def test_a_non_callable_is_refused_with_a_type_error(checker):
    with pytest.raises(TypeError, match="expects your function"):
        checker(np.zeros(3))


def test_an_exception_in_the_learners_function_is_reported_with_the_case():
    def broken(x, gamma, beta, eps):
        raise ZeroDivisionError("oops")

    message = fails_with(exercises.check_forward, broken, "case 1 of 4", "x.shape=(4, 3)", "ZeroDivisionError: oops")
    assert "seed=0" in message


def test_missing_return_is_named():
    fails_with(exercises.check_forward, lambda x, gamma, beta, eps: None, "forget a `return`")


def test_returning_the_cache_as_well_is_named():
    def forward_with_cache(x, gamma, beta, eps):
        return numpy_bn.forward(x, gamma, beta, eps)

    fails_with(exercises.check_forward, forward_with_cache, "tuple (y, cache)")


def test_a_failure_shows_expected_and_got_numbers():
    message = fails_with(exercises.check_forward, lambda x, g, b, eps: x + 1.0, "expected y = [", "got      y = [")
    assert "max |got - expected|" in message


def test_the_learners_inputs_are_copies():
    """A function that changes x in place must not corrupt the reference it is compared with."""

    def in_place(x, gamma, beta, eps):
        mean, var = x.mean(axis=0), x.var(axis=0)
        x -= mean
        x /= np.sqrt(var + eps)
        return gamma * x + beta

    exercises.check_forward(in_place)


# ---------------------------------------------------------------------------------------------------------------------
# check_forward


def right_forward(x, gamma, beta, eps):
    return gamma * (x - x.mean(axis=0)) / np.sqrt(x.var(axis=0) + eps) + beta


def test_forward_accepts_right_answers(capsys):
    passes(exercises.check_forward, right_forward, capsys)
    passes(exercises.check_forward, lambda x, g, b, eps: numpy_bn.forward(x, g, b, eps)[0], capsys)

    def via_std(x, gamma, beta, eps):  # another correct formulation
        centred = x - x.mean(axis=0, keepdims=True)
        return gamma * centred / np.sqrt((centred**2).mean(axis=0) + eps) + beta

    passes(exercises.check_forward, via_std, capsys)


FORWARD_MISTAKES = [
    (lambda x, g, b, eps: g * (x - x.mean(0)) / np.sqrt(x.var(0, ddof=1) + eps) + b, "UNBIASED variance"),
    (lambda x, g, b, eps: g * (x - x.mean(0)) / (x.std(0) + eps) + b, "eps belongs INSIDE"),
    (lambda x, g, b, eps: g * (x - x.mean(0)) / x.std(0) + b, "without eps"),
    (lambda x, g, b, eps: g * (x - x.mean(0)) / (x.var(0) + eps) + b, "dividing by the variance"),
    (lambda x, g, b, eps: g * x / np.sqrt(x.var(0) + eps) + b, "subtract the batch mean"),
    (
        lambda x, g, b, eps: g * (x - x.mean(1, keepdims=True)) / np.sqrt(x.var(1, keepdims=True) + eps) + b,
        "normalizing each ROW",
    ),
    (lambda x, g, b, eps: g * (x - x.mean()) / np.sqrt(x.var() + eps) + b, "whole array"),
    (lambda x, g, b, eps: b * (x - x.mean(0)) / np.sqrt(x.var(0) + eps) + g, "gamma scales, beta shifts"),
    (lambda x, g, b, eps: (x - x.mean(0)) / np.sqrt(x.var(0) + eps), "without the scale and shift"),
]


@pytest.mark.parametrize("wrong, hint", FORWARD_MISTAKES)
def test_forward_names_each_mistake(wrong, hint):
    fails_with(exercises.check_forward, wrong, hint)


def test_forward_rejects_wrong_shapes_dtypes_and_garbage():
    fails_with(exercises.check_forward, lambda x, g, b, eps: right_forward(x, g, b, eps).T, "shape", "transposed")
    fails_with(exercises.check_forward, lambda x, g, b, eps: right_forward(x, g, b, eps)[:, 0], "shape")
    fails_with(
        exercises.check_forward, lambda x, g, b, eps: right_forward(x, g, b, eps).astype(np.float32), "precision"
    )
    fails_with(
        exercises.check_forward, lambda x, g, b, eps: right_forward(x, g, b, eps).astype(np.float64), "float32 too"
    )
    fails_with(exercises.check_forward, lambda x, g, b, eps: right_forward(x, g, b, eps) * np.nan, "non-finite")
    fails_with(exercises.check_forward, lambda x, g, b, eps: "y", "dtype")
    fails_with(exercises.check_forward, garbage)


# ---------------------------------------------------------------------------------------------------------------------
# check_backward


def right_backward(dy, x, gamma, beta, eps):
    n = x.shape[0]
    inv_std = 1.0 / np.sqrt(x.var(axis=0) + eps)
    x_hat = (x - x.mean(axis=0)) * inv_std
    dgamma, dbeta = (dy * x_hat).sum(axis=0), dy.sum(axis=0)
    return gamma * inv_std / n * (n * dy - dbeta - x_hat * dgamma), dgamma, dbeta


def backward_parts(dy, x, gamma, eps, ddof=0, eps_outside=False):
    n = x.shape[0]
    std = np.sqrt(x.var(axis=0, ddof=ddof)) + eps if eps_outside else np.sqrt(x.var(axis=0, ddof=ddof) + eps)
    x_hat = (x - x.mean(axis=0)) / std
    return n, std, x_hat


def staged_backward(dy, x, gamma, beta, eps, ddof=0):
    """The paper's staged equations, written by a learner (with a knob for the unbiased-variance mistake)."""
    n = x.shape[0]
    mu = x.mean(0)
    var = ((x - mu) ** 2).sum(0) / (n - ddof)
    dx_hat = dy * gamma
    dvar = (dx_hat * (x - mu)).sum(0) * -0.5 * (var + eps) ** -1.5
    dmu = -(dx_hat / np.sqrt(var + eps)).sum(0) + dvar * (-2 * (x - mu)).sum(0) / n
    dx = dx_hat / np.sqrt(var + eps) + dvar * 2 * (x - mu) / (n - ddof) + dmu / n
    x_hat = (x - mu) / np.sqrt(var + eps)
    return dx, (dy * x_hat).sum(0), dy.sum(0)


def without_mean_term(dy, x, gamma, beta, eps):
    n, std, x_hat = backward_parts(dy, x, gamma, eps)
    return gamma / std * (dy - x_hat * (dy * x_hat).mean(0)), (dy * x_hat).sum(0), dy.sum(0)


def without_var_term(dy, x, gamma, beta, eps):
    n, std, x_hat = backward_parts(dy, x, gamma, eps)
    return gamma / std * (dy - dy.mean(0)), (dy * x_hat).sum(0), dy.sum(0)


def constant_statistics(dy, x, gamma, beta, eps):
    n, std, x_hat = backward_parts(dy, x, gamma, eps)
    return gamma * dy / std, (dy * x_hat).sum(0), dy.sum(0)


def without_gamma(dy, x, gamma, beta, eps):
    dx, dgamma, dbeta = right_backward(dy, x, gamma, beta, eps)
    return dx / gamma, dgamma, dbeta


def sums_not_means(dy, x, gamma, beta, eps):
    n, std, x_hat = backward_parts(dy, x, gamma, eps)
    return gamma / std * (dy - dy.sum(0) - x_hat * (dy * x_hat).sum(0)), (dy * x_hat).sum(0), dy.sum(0)


def eps_outside_backward(dy, x, gamma, beta, eps):
    """The exact gradient of the eps-outside forward, (x - mu) / (sqrt(var) + eps)."""
    n = x.shape[0]
    mu, var = x.mean(0), x.var(0)
    sqrt_var = np.sqrt(var)
    std = sqrt_var + eps
    dx_hat = dy * gamma
    dstd = -(dx_hat * (x - mu)).sum(0) / std**2
    dvar = dstd / (2 * sqrt_var)
    dmu = -dx_hat.sum(0) / std
    dx = dx_hat / std + dvar * 2 * (x - mu) / n + dmu / n
    x_hat = (x - mu) / std
    return dx, (dy * x_hat).sum(0), dy.sum(0)


def swapped(dy, x, gamma, beta, eps):
    dx, dgamma, dbeta = right_backward(dy, x, gamma, beta, eps)
    return dx, dbeta, dgamma


def dgamma_from_x(dy, x, gamma, beta, eps):
    dx, dgamma, dbeta = right_backward(dy, x, gamma, beta, eps)
    return dx, (dy * x).sum(0), dbeta


def dgamma_from_y(dy, x, gamma, beta, eps):
    dx, dgamma, dbeta = right_backward(dy, x, gamma, beta, eps)
    y = numpy_bn.forward(x, gamma, beta, eps)[0]
    return dx, (dy * y).sum(0), dbeta


def dbeta_mean(dy, x, gamma, beta, eps):
    dx, dgamma, dbeta = right_backward(dy, x, gamma, beta, eps)
    return dx, dgamma, dy.mean(0)


def not_summed(dy, x, gamma, beta, eps):
    dx, dgamma, dbeta = right_backward(dy, x, gamma, beta, eps)
    n, std, x_hat = backward_parts(dy, x, gamma, eps)
    return dx, dy * x_hat, dbeta


def summed_over_rows(dy, x, gamma, beta, eps):
    dx, dgamma, dbeta = right_backward(dy, x, gamma, beta, eps)
    return dx, dgamma, dy.sum(1)


BACKWARD_MISTAKES = [
    (without_mean_term, "without the MEAN term"),
    (without_var_term, "without the VARIANCE term"),
    (constant_statistics, "as constants"),
    (without_gamma, "without the factor gamma"),
    (lambda dy, x, g, b, eps: staged_backward(dy, x, g, b, eps, ddof=1), "UNBIASED variance"),
    (eps_outside_backward, "eps belongs inside"),
    (sums_not_means, "missing 1/N"),
    (swapped, "swapped"),
    (dgamma_from_x, "NORMALIZED input x_hat"),
    (dgamma_from_y, "not by the output y"),
    (dbeta_mean, "SUM of dy"),
    (not_summed, "not summed over the batch"),
    (summed_over_rows, "wrong axis"),
]


def test_backward_accepts_right_answers(capsys):
    passes(exercises.check_backward, right_backward, capsys)
    passes(exercises.check_backward, staged_backward, capsys)

    def via_numpy_bn(dy, x, gamma, beta, eps):
        return numpy_bn.backward(dy, numpy_bn.forward(x, gamma, beta, eps)[1])

    passes(exercises.check_backward, via_numpy_bn, capsys)


@pytest.mark.parametrize("wrong, hint", BACKWARD_MISTAKES, ids=lambda v: getattr(v, "__name__", str(v)[:20]))
def test_backward_names_each_mistake(wrong, hint):
    fails_with(exercises.check_backward, wrong, hint)


def test_backward_cases_include_float32():
    def upcast(dy, x, gamma, beta, eps):
        return tuple(v.astype(np.float64) for v in right_backward(dy, x, gamma, beta, eps))

    fails_with(exercises.check_backward, upcast, "case 5 of 5", "float32 too")


def test_backward_rejects_wrong_tuples_and_garbage():
    fails_with(exercises.check_backward, lambda dy, x, g, b, eps: right_backward(dy, x, g, b, eps)[0], "tuple")
    fails_with(exercises.check_backward, lambda dy, x, g, b, eps: right_backward(dy, x, g, b, eps)[:2], "length 2")
    fails_with(exercises.check_backward, lambda dy, x, g, b, eps: (garbage(dy), g, b))


# ---------------------------------------------------------------------------------------------------------------------
# check_conv_forward


def right_conv(x, gamma, beta, eps):
    mean = x.mean(axis=(0, 2, 3), keepdims=True)
    var = x.var(axis=(0, 2, 3), keepdims=True)
    return gamma[:, None, None] * (x - mean) / np.sqrt(var + eps) + beta[:, None, None]


def conv_stats_over(axes, ddof=0):
    def fn(x, gamma, beta, eps):
        mean = x.mean(axis=axes, keepdims=True)
        var = x.var(axis=axes, ddof=ddof, keepdims=True)
        return gamma[:, None, None] * (x - mean) / np.sqrt(var + eps) + beta[:, None, None]

    return fn


def conv_reshape_bug(x, gamma, beta, eps):
    rows = x.reshape(-1, x.shape[1])
    return (gamma * (rows - rows.mean(0)) / np.sqrt(rows.var(0) + eps) + beta).reshape(x.shape)


def conv_gamma_last_axis(x, gamma, beta, eps):
    x_hat = (x - x.mean(axis=(0, 2, 3), keepdims=True)) / np.sqrt(x.var(axis=(0, 2, 3), keepdims=True) + eps)
    return gamma * x_hat + beta  # gamma (C,) meets the last axis W


def conv_eps_outside(x, gamma, beta, eps):
    std = x.std(axis=(0, 2, 3), keepdims=True)
    return gamma[:, None, None] * (x - x.mean(axis=(0, 2, 3), keepdims=True)) / (std + eps) + beta[:, None, None]


CONV_MISTAKES = [
    (conv_stats_over(0), "statistics over N only"),
    (conv_stats_over((2, 3)), "instance norm"),
    (conv_stats_over((1, 2, 3)), "layer norm"),
    (conv_stats_over(None), "whole array"),
    (conv_reshape_bug, "mixes channels"),
    (conv_stats_over((0, 2, 3), ddof=1), "UNBIASED variance"),
    (conv_eps_outside, "eps belongs INSIDE"),
    (conv_gamma_last_axis, "LAST axis"),
]


def test_conv_forward_accepts_right_answers(capsys):
    passes(exercises.check_conv_forward, right_conv, capsys)

    def via_transpose(x, gamma, beta, eps):
        n, c, h, w = x.shape
        rows = x.transpose(0, 2, 3, 1).reshape(-1, c)
        y = gamma * (rows - rows.mean(0)) / np.sqrt(rows.var(0) + eps) + beta
        return y.reshape(n, h, w, c).transpose(0, 3, 1, 2)

    passes(exercises.check_conv_forward, via_transpose, capsys)


@pytest.mark.parametrize("wrong, hint", CONV_MISTAKES)
def test_conv_forward_names_each_mistake(wrong, hint):
    fails_with(exercises.check_conv_forward, wrong, hint)


def test_conv_forward_rejects_garbage():
    fails_with(exercises.check_conv_forward, garbage)
    fails_with(exercises.check_conv_forward, lambda x, g, b, eps: right_conv(x, g, b, eps)[0], "shape")


# ---------------------------------------------------------------------------------------------------------------------
# check_running_stats


def right_running(running_mean, running_var, x, momentum):
    new_mean = (1 - momentum) * running_mean + momentum * x.mean(axis=0)
    new_var = (1 - momentum) * running_var + momentum * x.var(axis=0, ddof=1)
    return new_mean, new_var


def right_running_in_place(running_mean, running_var, x, momentum):
    running_mean *= 1 - momentum
    running_mean += momentum * x.mean(axis=0)
    running_var *= 1 - momentum
    running_var += momentum * x.var(axis=0, ddof=1)
    return running_mean, running_var


RUNNING_MISTAKES = [
    (lambda rm, rv, x, m: (m * rm + (1 - m) * x.mean(0), m * rv + (1 - m) * x.var(0, ddof=1)), "Keras/TensorFlow"),
    (
        lambda rm, rv, x, m: (m * rm + (1 - m) * x.mean(0), m * rv + (1 - m) * x.var(0)),
        "Keras's uses the biased",
    ),
    (lambda rm, rv, x, m: ((1 - m) * rm + m * x.mean(0), (1 - m) * rv + m * x.var(0)), "BIASED batch variance"),
    (lambda rm, rv, x, m: ((1 - m) * rm + m * x.mean(0), (1 - m) * rv + m * x.std(0, ddof=1)), "standard deviation"),
    (lambda rm, rv, x, m: (rm, rv), "returned the old value"),
    (lambda rm, rv, x, m: (x.mean(0), x.var(0, ddof=1)), "batch mean alone"),
    (lambda rm, rv, x, m: ((1 - m) * rm + m * x.mean(0), rv), "returned the old value"),
    (lambda rm, rv, x, m: (x.mean(1), rv), "one entry per example"),
    (lambda rm, rv, x, m: None, "in-place update must still return"),
]


def test_running_stats_accepts_right_answers(capsys):
    passes(exercises.check_running_stats, right_running, capsys)
    passes(exercises.check_running_stats, right_running_in_place, capsys)


@pytest.mark.parametrize("wrong, hint", RUNNING_MISTAKES)
def test_running_stats_names_each_mistake(wrong, hint):
    fails_with(exercises.check_running_stats, wrong, hint)


def test_running_stats_cases_include_float32():
    def upcast(*args):
        return tuple(np.asarray(v, dtype=np.float64) for v in right_running(*args))

    fails_with(exercises.check_running_stats, upcast, "case 4 of 4", "float32 too")


def test_running_stats_rejects_garbage():
    fails_with(exercises.check_running_stats, lambda rm, rv, x, m: (garbage(rm), garbage(rv)))


def test_running_stats_reference_is_pytorch():
    """The checker's reference is numpy_bn.BatchNorm; check that the convention really is torch's."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    x = rng.normal(3.0, 2.0, size=(4, 3))
    layer = torch.nn.BatchNorm1d(3, momentum=0.3).double()
    layer.running_mean.copy_(torch.tensor([1.0, -1.0, 2.0]))
    layer.running_var.copy_(torch.tensor([0.5, 2.0, 3.0]))
    mean, var = right_running(layer.running_mean.numpy().copy(), layer.running_var.numpy().copy(), x, 0.3)
    layer(torch.from_numpy(x))
    np.testing.assert_allclose(layer.running_mean.numpy(), mean, rtol=1e-12)
    np.testing.assert_allclose(layer.running_var.numpy(), var, rtol=1e-12)


# ---------------------------------------------------------------------------------------------------------------------
# check_fold


def right_fold(weight, bias, gamma, beta, running_mean, running_var, eps):
    scale = gamma / np.sqrt(running_var + eps)
    return weight * scale[:, None], (bias - running_mean) * scale + beta


def fold_with(weight_fn, bias_fn):
    def fn(weight, bias, gamma, beta, running_mean, running_var, eps):
        scale = gamma / np.sqrt(running_var + eps)
        return weight_fn(weight, scale, gamma, running_var, eps), bias_fn(bias, scale, beta, running_mean, gamma,
                                                                          running_var, eps)

    return fn


def good_w(w, s, g, rv, eps):
    return w * s[:, None]


def good_b(b, s, beta, rm, g, rv, eps):
    return (b - rm) * s + beta


FOLD_MISTAKES = [
    (fold_with(lambda w, s, g, rv, eps: w, good_b), "weight is unscaled"),
    (fold_with(lambda w, s, g, rv, eps: w * (g / (rv + eps))[:, None], good_b), "divide by the standard deviation"),
    (fold_with(lambda w, s, g, rv, eps: w / np.sqrt(rv + eps)[:, None], good_b), "without gamma"),
    (fold_with(lambda w, s, g, rv, eps: w * (g / (np.sqrt(rv) + eps))[:, None], good_b), "eps belongs INSIDE"),
    (fold_with(lambda w, s, g, rv, eps: w * s, good_b), "scale[:, None]"),
    (fold_with(good_w, lambda b, s, beta, rm, g, rv, eps: b * s + beta), "not shifted by the running mean"),
    (fold_with(good_w, lambda b, s, beta, rm, g, rv, eps: (b - rm) * s), "add BN's shift beta"),
    (fold_with(good_w, lambda b, s, beta, rm, g, rv, eps: b - rm * s + beta), "own bias is scaled too"),
    (fold_with(good_w, lambda b, s, beta, rm, g, rv, eps: b), "bias is unchanged"),
    (fold_with(lambda w, s, g, rv, eps: (w * s[:, None]).T, good_b), "keep that layout"),
]


def test_fold_accepts_right_answer(capsys):
    passes(exercises.check_fold, right_fold, capsys)


@pytest.mark.parametrize("wrong, hint", FOLD_MISTAKES)
def test_fold_names_each_mistake(wrong, hint):
    fails_with(exercises.check_fold, wrong, hint)


def test_fold_cases_include_float32():
    def upcast(*args):
        return tuple(v.astype(np.float64) for v in right_fold(*args))

    fails_with(exercises.check_fold, upcast, "case 4 of 4", "float32 too")


def test_fold_rejects_garbage():
    fails_with(exercises.check_fold, lambda w, b, g, be, rm, rv, eps: (garbage(w), garbage(b)))
    fails_with(exercises.check_fold, lambda w, b, g, be, rm, rv, eps: w, "tuple")


# ---------------------------------------------------------------------------------------------------------------------
# check_renorm_forward


def renorm_with(r_fn=None, d_fn=None, y_fn=None, ddof=0):
    """A learner's renorm forward with one piece replaced by a wrong one."""

    def fn(x, gamma, beta, running_mean, running_std, r_max, d_max, eps):
        mu = x.mean(0)
        sigma_b = np.sqrt(x.var(0, ddof=ddof) + eps)
        raw_r, raw_d = sigma_b / running_std, (mu - running_mean) / running_std
        r = np.clip(raw_r, 1 / r_max, r_max) if r_fn is None else r_fn(raw_r, r_max, sigma_b, running_std, x, eps)
        d = np.clip(raw_d, -d_max, d_max) if d_fn is None else d_fn(raw_d, d_max, r_max, mu, running_mean, sigma_b)
        x_hat_bn = (x - mu) / sigma_b
        y = gamma * (x_hat_bn * r + d) + beta if y_fn is None else y_fn(x_hat_bn, r, d, gamma, beta, x, running_mean,
                                                                        running_std)
        return y, r, d

    return fn


RENORM_MISTAKES = [
    (renorm_with(r_fn=lambda raw, r_max, *_: raw), "r is not clipped"),
    (renorm_with(r_fn=lambda raw, r_max, *_: np.clip(raw, 0.0, r_max)), "clipped to [0, r_max]"),
    (renorm_with(r_fn=lambda raw, r_max, *_: np.clip(raw, -r_max, r_max)), "clipped to [-r_max, r_max]"),
    (renorm_with(r_fn=lambda raw, r_max, *_: np.clip(1 / raw, 1 / r_max, r_max)), "upside down"),
    (
        renorm_with(r_fn=lambda raw, r_max, sb, rs, x, eps: np.clip(x.std(0) / rs, 1 / r_max, r_max)),
        "sigma_B without eps",
    ),
    (renorm_with(ddof=1), "UNBIASED variance"),
    (renorm_with(d_fn=lambda raw, d_max, *_: raw), "d is not clipped"),
    (renorm_with(d_fn=lambda raw, d_max, *_: np.clip(raw, 0.0, d_max)), "clipped to [0, d_max]"),
    (renorm_with(d_fn=lambda raw, d_max, *_: np.clip(-raw, -d_max, d_max)), "wrong sign"),
    (
        renorm_with(d_fn=lambda raw, d_max, r_max, mu, rm, sb: np.clip((mu - rm) / sb, -d_max, d_max)),
        "divided by the batch sigma_B",
    ),
    (renorm_with(d_fn=lambda raw, d_max, r_max, *_: np.clip(raw, -r_max, r_max)), "d's bound is d_max"),
    (renorm_with(y_fn=lambda xh, r, d, g, b, *_: g * xh + b), "plain batch norm"),
    (renorm_with(y_fn=lambda xh, r, d, g, b, *_: g * (xh + d) * r + b), "the order is x_hat * r + d"),
    (renorm_with(y_fn=lambda xh, r, d, g, b, x, rm, rs: g * (x - rm) / rs + b), "running statistics"),
    (renorm_with(y_fn=lambda xh, r, d, g, b, *_: g * (xh * r - d) + b), "d is added"),
    (renorm_with(y_fn=lambda xh, r, d, g, b, *_: g * (xh / r + d) + b), "multiply by r"),
]


def test_renorm_accepts_right_answer(capsys):
    passes(exercises.check_renorm_forward, renorm_with(), capsys)
    passes(exercises.check_renorm_forward, numpy_variants.renorm_forward, capsys)


@pytest.mark.parametrize("wrong, hint", RENORM_MISTAKES)
def test_renorm_names_each_mistake(wrong, hint):
    fails_with(exercises.check_renorm_forward, wrong, hint)


def test_renorm_cases_include_float32():
    def upcast(*args):
        return tuple(v.astype(np.float64) for v in renorm_with()(*args))

    fails_with(exercises.check_renorm_forward, upcast, "case 4 of 4", "float32 too")


def test_renorm_rejects_garbage():
    fails_with(exercises.check_renorm_forward, lambda x, g, b, rm, rs, r_max, d_max, eps: (garbage(x), g, b))
    fails_with(exercises.check_renorm_forward, lambda x, g, b, rm, rs, r_max, d_max, eps: garbage(x), "tuple (y, r, d)")


def test_renorm_reference_reduces_to_batch_norm_and_clips():
    rng = np.random.default_rng(1)
    x = rng.normal(2.0, 3.0, size=(7, 4))
    gamma, beta = rng.uniform(0.5, 2, 4), rng.uniform(-1, 1, 4)
    # r_max = 1 and d_max = 0 force r = 1 and d = 0: plain BN (Ioffe 2017, Section 3).
    running_mean, running_std = rng.normal(size=4), rng.uniform(1, 2, 4)
    y, r, d = numpy_variants.renorm_forward(x, gamma, beta, running_mean, running_std, 1.0, 0.0, 1e-5)
    np.testing.assert_allclose(y, numpy_bn.forward(x, gamma, beta, 1e-5)[0], rtol=1e-12, atol=1e-12)
    assert np.all(r == 1.0) and np.all(d == 0.0)
    # With the running statistics equal to the batch's, r = 1 and d = 0 without clipping.
    std = np.sqrt(x.var(0) + 1e-5)
    y, r, d = numpy_variants.renorm_forward(x, gamma, beta, x.mean(0), std, 3.0, 5.0, 1e-5)
    np.testing.assert_allclose(r, 1.0, rtol=1e-12)
    np.testing.assert_allclose(d, 0.0, atol=1e-12)


def test_renorm_cases_exercise_both_ends_of_both_clips():
    """The checker's cases must put features beyond each clipping bound, or a missing clip would go unnoticed."""
    no_upper = renorm_with(r_fn=lambda raw, r_max, *_: np.clip(raw, 1 / r_max, np.inf))
    assert "r differs" in fails_with(exercises.check_renorm_forward, no_upper)
    no_lower = renorm_with(r_fn=lambda raw, r_max, *_: np.clip(raw, 0, r_max))
    message = fails_with(exercises.check_renorm_forward, no_lower)
    assert "r differs" in message
    fails_with(exercises.check_renorm_forward, renorm_with(d_fn=lambda raw, d_max, *_: np.clip(raw, -d_max, np.inf)))
    fails_with(exercises.check_renorm_forward, renorm_with(d_fn=lambda raw, d_max, *_: np.clip(raw, -np.inf, d_max)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_renorm_reference_matches_bnnotes_batch_renorm(seed):
    """Cross-check the checker's NumPy reference against bnnotes.renorm.BatchRenorm1d (written independently)."""
    torch = pytest.importorskip("torch")
    renorm = pytest.importorskip("bnnotes.renorm")
    rng = np.random.default_rng(seed)
    x = rng.normal(3.0, 2.0, size=(6, 5))
    gamma, beta = rng.uniform(0.5, 2, 5), rng.uniform(-1, 1, 5)
    running_mean, running_std = rng.normal(3.0, 2.0, size=5), rng.uniform(0.3, 6.0, size=5)
    r_max, d_max, eps = 2.0, 0.5, 1e-3
    args = (x, gamma, beta, running_mean, running_std, r_max, d_max, eps)
    y_ref, r_ref, d_ref = numpy_variants.renorm_forward(*args)
    assert np.any(np.abs(r_ref - 1.0) > 1e-3) and np.any(np.abs(d_ref) == d_max)  # the clips are active
    layer = renorm.BatchRenorm1d(5, eps=eps, r_max=r_max, d_max=d_max).double()
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(gamma))
        layer.bias.copy_(torch.from_numpy(beta))
        layer.running_mean.copy_(torch.from_numpy(running_mean))
        layer.running_std.copy_(torch.from_numpy(running_std))
        y = layer(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------------
# check_ghost_batch_norm


def right_ghost(x, gamma, beta, virtual_batch_size, eps):
    chunks = x.reshape(-1, virtual_batch_size, x.shape[1])
    x_hat = (chunks - chunks.mean(axis=1, keepdims=True)) / np.sqrt(chunks.var(axis=1, keepdims=True) + eps)
    return gamma * x_hat.reshape(x.shape) + beta


def ghost_loop(x, gamma, beta, virtual_batch_size, eps):
    parts = [numpy_bn.forward(x[i : i + virtual_batch_size], gamma, beta, eps)[0]
             for i in range(0, len(x), virtual_batch_size)]
    return np.concatenate(parts)


def ghost_grouped(groups_of, ddof=0, eps_outside=False, affine=True):
    def fn(x, gamma, beta, virtual_batch_size, eps):
        n, d = x.shape
        if groups_of == "strided":
            grouped, axis = x.reshape(virtual_batch_size, -1, d), 0
        elif groups_of == "chunks_as_size":
            grouped, axis = x.reshape(virtual_batch_size, -1, d), 1
        else:
            grouped, axis = x.reshape(-1, virtual_batch_size, d), 1
        mean = grouped.mean(axis=axis, keepdims=True)
        var = grouped.var(axis=axis, ddof=ddof, keepdims=True)
        std = np.sqrt(var) + eps if eps_outside else np.sqrt(var + eps)
        x_hat = ((grouped - mean) / std).reshape(n, d)
        return gamma * x_hat + beta if affine else x_hat

    return fn


GHOST_MISTAKES = [
    (lambda x, g, b, v, eps: numpy_bn.forward(x, g, b, eps)[0], "WHOLE batch"),
    (ghost_grouped("strided"), "CONSECUTIVE rows"),
    (ghost_grouped("chunks_as_size"), "not the number of chunks"),
    (ghost_grouped("chunks", ddof=1), "UNBIASED variance"),
    (ghost_grouped("chunks", eps_outside=True), "eps belongs INSIDE"),
    (ghost_grouped("chunks", affine=False), "without the scale and shift"),
]


def test_ghost_accepts_right_answers(capsys):
    passes(exercises.check_ghost_batch_norm, right_ghost, capsys)
    passes(exercises.check_ghost_batch_norm, ghost_loop, capsys)


@pytest.mark.parametrize("wrong, hint", GHOST_MISTAKES)
def test_ghost_names_each_mistake(wrong, hint):
    fails_with(exercises.check_ghost_batch_norm, wrong, hint)


def test_ghost_cases_include_float32():
    fails_with(exercises.check_ghost_batch_norm, lambda *args: right_ghost(*args).astype(np.float64), "case 4 of 4",
               "float32 too")


def test_ghost_rejects_garbage():
    fails_with(exercises.check_ghost_batch_norm, lambda x, g, b, v, eps: garbage(x))


def test_ghost_reference_refuses_a_ragged_batch():
    with pytest.raises(ValueError, match="not a multiple"):
        numpy_variants.ghost_batch_norm(np.zeros((10, 2)), np.ones(2), np.zeros(2), 4, 1e-5)


@pytest.mark.parametrize("shape, virtual_batch_size", [((24, 5), 4), ((12, 3), 3), ((20, 6), 10)])
def test_ghost_reference_matches_bnnotes_ghost_batch_norm(shape, virtual_batch_size):
    """Cross-check the checker's NumPy reference against bnnotes.ghost.GhostBatchNorm1d (written independently)."""
    torch = pytest.importorskip("torch")
    ghost = pytest.importorskip("bnnotes.ghost")
    rng = np.random.default_rng(virtual_batch_size)
    x = rng.normal(size=shape) + np.repeat(rng.normal(0, 4, size=(shape[0] // virtual_batch_size, shape[1])),
                                           virtual_batch_size, axis=0)
    gamma, beta = rng.uniform(0.5, 2, shape[1]), rng.uniform(-1, 1, shape[1])
    layer = ghost.GhostBatchNorm1d(shape[1], virtual_batch_size, eps=1e-3).double()
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(gamma))
        layer.bias.copy_(torch.from_numpy(beta))
        y = layer(torch.from_numpy(x)).numpy()
    expected = numpy_variants.ghost_batch_norm(x, gamma, beta, virtual_batch_size, 1e-3)
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------------
# check_whitening


def right_zca(x, eps):
    x_centered = x - x.mean(axis=0)
    eigenvalues, u = np.linalg.eigh(x_centered.T @ x_centered / len(x))
    return x_centered @ u @ np.diag(1 / np.sqrt(eigenvalues + eps)) @ u.T


def zca_via_svd(x, eps):
    x_centered = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(x_centered, full_matrices=False)
    return x_centered @ vt.T @ np.diag(1 / np.sqrt(s**2 / len(x) + eps)) @ vt


def whitening_with(center="yes", cov="biased", eps_outside=False, rotate_back=True):
    def fn(x, eps):
        mean = x.mean(axis=0)
        data = x if center == "no" else x - mean
        if cov == "np.cov":
            covariance = np.cov(x, rowvar=False)
        else:
            divisor = len(x) - 1 if cov == "unbiased" else len(x)
            covariance = data.T @ data / divisor
        if center == "apply_to_x":
            data = x
        eigenvalues, u = np.linalg.eigh(covariance)
        std = np.sqrt(eigenvalues) + eps if eps_outside else np.sqrt(eigenvalues + eps)
        w = u @ np.diag(1 / std)
        return data @ (w @ u.T if rotate_back else w)

    return fn


def cholesky_whitening(x, eps):
    x_centered = x - x.mean(axis=0)
    lower = np.linalg.cholesky(x_centered.T @ x_centered / len(x) + eps * np.eye(x.shape[1]))
    return np.linalg.solve(lower, x_centered.T).T


def inverse_covariance(x, eps):
    x_centered = x - x.mean(axis=0)
    return x_centered @ np.linalg.inv(x_centered.T @ x_centered / len(x) + eps * np.eye(x.shape[1]))


def np_cov_rows(x, eps):
    covariance = np.cov(x)  # (N, N): rows treated as variables
    eigenvalues, u = np.linalg.eigh(covariance)
    return (x - x.mean(0)) @ u @ np.diag(1 / np.sqrt(np.abs(eigenvalues) + eps)) @ u.T


WHITENING_MISTAKES = [
    (whitening_with(center="no"), "without centring"),
    (whitening_with(center="apply_to_x"), "UNCENTRED x"),
    (whitening_with(cov="unbiased"), "UNBIASED covariance"),
    (whitening_with(cov="np.cov"), "UNBIASED covariance"),
    (whitening_with(eps_outside=True), "1 / (sqrt(lambda) + eps)"),
    (whitening_with(rotate_back=False), "PCA"),
    (cholesky_whitening, "Cholesky"),
    (inverse_covariance, "inverse covariance"),
    (lambda x, eps: (x - x.mean(0)) / np.sqrt(x.var(0) + eps), "standardizing each feature separately"),
    (np_cov_rows, "treats ROWS as variables"),
]


def test_whitening_accepts_right_answers(capsys):
    passes(exercises.check_whitening, right_zca, capsys)
    passes(exercises.check_whitening, zca_via_svd, capsys)
    passes(exercises.check_whitening, numpy_variants.zca_whitening, capsys)


@pytest.mark.parametrize("wrong, hint", WHITENING_MISTAKES)
def test_whitening_names_each_mistake(wrong, hint):
    fails_with(exercises.check_whitening, wrong, hint)


def test_whitening_cases_include_float32():
    fails_with(exercises.check_whitening, lambda x, eps: right_zca(x.astype(np.float64), eps), "case 4 of 4",
               "float32 too")


def test_whitening_rejects_garbage():
    fails_with(exercises.check_whitening, lambda x, eps: garbage(x))


def test_whitening_reference_output_is_white():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(200, 4)) @ rng.normal(size=(4, 4)) + 5.0
    white = numpy_variants.zca_whitening(x, eps=1e-12)
    np.testing.assert_allclose(white.T @ white / len(x), np.eye(4), atol=1e-8)
    np.testing.assert_allclose(white.mean(0), 0.0, atol=1e-10)


# ---------------------------------------------------------------------------------------------------------------------
# check_layer_norm


def right_layer_norm(x, gamma, beta, eps):
    mean = x.mean(axis=1, keepdims=True)
    var = x.var(axis=1, keepdims=True)
    return gamma * (x - mean) / np.sqrt(var + eps) + beta


def _ln(x, gamma, beta, eps, axis=1, ddof=0, eps_outside=False, center=True):
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=axis, keepdims=True)
    var = x64.var(axis=axis, ddof=ddof, keepdims=True)
    numerator = x64 - mean if center else x64
    x_hat = numerator / (np.sqrt(var) + eps) if eps_outside else numerator / np.sqrt(var + eps)
    return (gamma * x_hat + beta).astype(x.dtype)


LAYER_NORM_MISTAKES = [
    (lambda x, g, b, eps: _ln(x, g, b, eps, axis=0), "BATCH axis"),
    (lambda x, g, b, eps: _ln(x, g, b, eps, ddof=1), "UNBIASED variance"),
    (lambda x, g, b, eps: _ln(x, g, b, eps, eps_outside=True), "eps belongs INSIDE the square root"),
    (lambda x, g, b, eps: _ln(x, g, b, eps, center=False), "forgetting to centre"),
    (lambda x, g, b, eps: (g * x / np.sqrt((x.astype(np.float64) ** 2).mean(1, keepdims=True) + eps) + b)
     .astype(x.dtype), "RMSNorm"),
    (lambda x, g, b, eps: _ln(x, g, b, 0.0), "without eps"),
    (lambda x, g, b, eps: (b * (x - x.mean(1, keepdims=True)) / np.sqrt(x.var(1, keepdims=True) + eps) + g),
     "gamma scales, beta shifts"),
]


def test_layer_norm_accepts_right_answers(capsys):
    passes(exercises.check_layer_norm, right_layer_norm, capsys)

    def via_reference(x, gamma, beta, eps):
        from bnnotes import numpy_norms

        return numpy_norms.layer_norm(x, gamma, beta, eps)[0]

    passes(exercises.check_layer_norm, via_reference, capsys)


@pytest.mark.parametrize("wrong, hint", LAYER_NORM_MISTAKES)
def test_layer_norm_names_each_mistake(wrong, hint):
    fails_with(exercises.check_layer_norm, wrong, hint)


def test_layer_norm_rejects_garbage_and_wrong_shapes():
    fails_with(exercises.check_layer_norm, lambda x, g, b, eps: garbage(x))
    fails_with(exercises.check_layer_norm, lambda x, g, b, eps: right_layer_norm(x, g, b, eps)[:, :1], "shape")
    fails_with(exercises.check_layer_norm, lambda x, g, b, eps: right_layer_norm(x, g, b, eps).astype(np.float32))


def test_layer_norm_treats_a_stub_as_not_attempted(capsys):
    def stub(x, gamma, beta, eps):
        raise NotImplementedError("Hint: the statistics are per ROW")

    for fn in (stub, lambda x, gamma, beta, eps: None):
        exercises.check_layer_norm(fn)  # must not raise
        out = capsys.readouterr().out
        assert "not attempted yet" in out, out


def test_layer_norm_reports_an_exception_as_an_assertion():
    def broken(x, gamma, beta, eps):
        return x.mean(axis=1) + gamma  # (N,) + (D,): a broadcasting error

    fails_with(exercises.check_layer_norm, broken, "keepdims=True")


def test_layer_norm_refuses_a_non_callable():
    with pytest.raises(TypeError, match="expects your function"):
        exercises.check_layer_norm(np.zeros(3))


# ---------------------------------------------------------------------------------------------------------------------
# check_residual_variance


def test_residual_variance_accepts_the_right_prediction(capsys):
    exercises.check_residual_variance(256.0, 9.0, depth=8)
    exercises.check_residual_variance(2**4, 5, depth=4)
    out = capsys.readouterr().out
    assert out.count("both predictions are right") == 2, out


@pytest.mark.parametrize(
    "plain, bn, hint",
    [
        (9.0, 9.0, "that is the BN answer"),
        (3.0**8, 9.0, "preserve the mean square"),
        (256.0, 1.0, "BN normalizes the branch, not the stream"),
        (256.0, 256.0, "no longer follows the stream"),
        (256.0, 8.0, "the input's own mean square"),
        (100.0, 50.0, "predicted_plain"),
    ],
)
def test_residual_variance_names_each_mistake(plain, bn, hint):
    with pytest.raises(AssertionError, match="is off") as failure:
        exercises.check_residual_variance(plain, bn, depth=8)
    assert hint in str(failure.value), str(failure.value)


def test_residual_variance_stub_and_garbage(capsys):
    exercises.check_residual_variance(None, None)
    assert "not attempted yet" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="finite number"):
        exercises.check_residual_variance("256", 9.0)


def test_residual_variance_prediction_matches_the_measurement():
    """The checker's answers are what the experiment measures: BN's for every initialization, the plain network's on
    average over initializations (a product of 8 random factors fluctuates by up to 2x from one to the next)."""
    import torch

    from bnnotes.experiments import real_networks

    x = torch.randn(512, 256, generator=torch.Generator().manual_seed(2))

    def measured(norm, seed):
        model = real_networks.residual_mlp(width=256, depth=8, norm=norm, seed=seed)
        return float(real_networks.stream_mean_square(model.blocks, x)[-1])

    plain = [measured("none", seed) for seed in range(8)]
    for seed in range(3):
        exercises.check_residual_variance(256.0, measured("bn", seed), depth=8)
    assert abs(np.mean(plain) / 256.0 - 1) < 0.3, plain
    assert all(abs(np.log2(v) - 8) < 1.5 for v in plain), plain


# check_prediction: "predict, then run" exercises


def test_prediction_accepts_a_right_choice_and_a_close_number(capsys):
    exercises.check_prediction("diverges", "diverges", name="lr=1 without BN", choices=("converges", "diverges"))
    exercises.check_prediction(True, np.bool_(True), name="eval collapses", choices=(True, False))
    exercises.check_prediction(0.52, np.float64(0.5), name="the accuracy", rel_tol=0.05)
    exercises.check_prediction(150, 256.0, name="the mean square", factor=2)
    exercises.check_prediction(500, 256.0, name="the mean square", factor=2)  # the bounds are inclusive of x2
    exercises.check_prediction(-3.0, -2.0, name="a negative log", factor=2)
    exercises.check_prediction(1.3, 1.0, name="either tolerance", rel_tol=0.1, factor=1.5)
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 7 and all(line.startswith("check_prediction: right, the run measured") for line in out), out
    assert "'diverges' for lr=1 without BN" in out[0] and "(you predicted 150)" in out[3], out


@pytest.mark.parametrize(
    "predicted, measured, options, parts",
    [
        ("converges", "diverges", {"choices": ("converges", "diverges")},
         ["you predicted 'converges' for q; the run measured 'diverges'.", "Because of the step size."]),
        ("maybe", "diverges", {"choices": ("converges", "diverges")},
         ["'maybe' is not an allowed answer for q", "answer one of 'converges', 'diverges'"]),
        (0.4, 0.5, {"rel_tol": 0.1}, ["you predicted 0.4 for q; the run measured 0.5", "within 10% counts",
                                      "Because of the step size."]),
        (100, 256.0, {"factor": 2}, ["you predicted 100 for q; the run measured 256", "within a factor 2"]),
        (600, 256.0, {"factor": 2}, ["you predicted 600 for q"]),
        (2.0, -2.0, {"factor": 2}, ["you predicted 2 for q; the run measured -2"]),
        (0.3, 0.0, {"rel_tol": 0.5}, ["the run measured 0"]),
        ("256", 256.0, {"factor": 2}, ["must be a finite number", "str '256'"]),
        (True, 1.0, {"rel_tol": 0.1}, ["must be a finite number"]),
        (float("nan"), 1.0, {"rel_tol": 0.1}, ["must be a finite number"]),
    ],
)
def test_prediction_names_a_wrong_prediction(predicted, measured, options, parts):
    with pytest.raises(AssertionError) as failure:
        exercises.check_prediction(predicted, measured, name="q", explanation="Because of the step size.", **options)
    for part in parts:
        assert part in str(failure.value), str(failure.value)


def test_prediction_abs_tol_grades_a_vanishing_measurement(capsys):
    """A sum that theory says is 0 is measured as rounding noise: an absolute tolerance grades the prediction 0."""
    exercises.check_prediction(0, 3e-16, name="sum(dx)", abs_tol=1e-9)
    assert "check_prediction: right" in capsys.readouterr().out
    with pytest.raises(AssertionError, match=r"you predicted 1 for sum\(dx\); the run measured 3e-16 \(a prediction "
                                             r"within 1e-09 counts as right\)"):
        exercises.check_prediction(1, 3e-16, name="sum(dx)", abs_tol=1e-9)
    with pytest.raises(ValueError, match="abs_tol must be"):
        exercises.check_prediction(0, 0.0, name="q", abs_tol=-1)


@pytest.mark.parametrize("predicted", [np.array([1, 2]), ["a"], {"a": 1}, 3 + 1j, object()])
def test_prediction_refuses_odd_answers_with_an_assertion_only(predicted):
    with pytest.raises(AssertionError, match="not an allowed answer"):
        exercises.check_prediction(predicted, "a", name="q", choices=("a", "b"))
    with pytest.raises(AssertionError, match="must be a finite number"):
        exercises.check_prediction(predicted, 1.0, name="q", factor=2)


def test_prediction_none_is_not_attempted(capsys):
    assert exercises.check_prediction(None, 0.5, name="the accuracy", rel_tol=0.1) is None
    assert exercises.check_prediction(None, "a", name="the winner", choices=("a", "b")) is None
    out = capsys.readouterr().out
    assert out.count("check_prediction: not attempted yet (your prediction for the") == 2, out


@pytest.mark.parametrize(
    "options, message",
    [
        ({}, "give choices"),
        ({"name": ""}, "name must be"),
        ({"choices": ("a", "b"), "rel_tol": 0.1}, "graded by equality"),
        ({"rel_tol": -0.1}, "rel_tol must be"),
        ({"factor": 0.5}, "factor must be"),
        ({"choices": ("a", "b")}, "is not one of the choices"),
    ],
)
def test_prediction_refuses_a_chapters_bad_arguments(options, message):
    """The chapter's own mistakes are ValueErrors, not a wrong answer of the learner."""
    options = {"name": "q", **options}
    with pytest.raises(ValueError, match=message):
        exercises.check_prediction("a", 0.5, **options)


def test_prediction_refuses_a_non_numeric_measurement():
    with pytest.raises(ValueError, match="finite number"):
        exercises.check_prediction(1.0, float("inf"), name="q", rel_tol=0.1)


# The Colab edition's stubs: "not attempted yet", never a failure


def test_every_public_checker_reports_stubs():
    """A checker added to the module must be in ALL_CHECKERS (and so get the stub tests below)."""
    public = {name for name in exercises.__all__ if name.startswith("check_")}
    graded_values = {checker.__name__ for checker in VALUE_CHECKERS} | {"check_prediction"}
    assert public == {checker.__name__ for checker in ALL_CHECKERS} | graded_values


# Checkers that grade predicted numbers rather than a function: their stub is a None answer.
VALUE_CHECKERS = [exercises.check_residual_variance]


@pytest.mark.parametrize("checker", VALUE_CHECKERS, ids=lambda checker: checker.__name__)
def test_a_value_checker_reports_none_as_not_attempted(checker, capsys):
    assert checker(None, None) is None
    assert f"{checker.__name__}: not attempted yet (your answer is still None)" in capsys.readouterr().out


@pytest.mark.parametrize("checker", ALL_CHECKERS, ids=lambda checker: checker.__name__)
def test_a_stub_is_not_attempted_yet_not_a_failure(checker, capsys):
    def stub(*args):
        """The generator's stub. Hint: think first."""
        raise NotImplementedError("Hint: think first.")

    assert checker(stub) is None
    out = capsys.readouterr().out
    assert f"{checker.__name__}: not attempted yet" in out and "Hint: think first." in out, out


@pytest.mark.parametrize("checker", ALL_CHECKERS, ids=lambda checker: checker.__name__)
def test_none_is_not_attempted_yet(checker, capsys):
    assert checker(None) is None
    assert f"{checker.__name__}: not attempted yet (your answer is still None)" in capsys.readouterr().out


# Answers no checker foresaw: each must end in an AssertionError that names the case, never in another exception.
NONSENSE = [
    lambda *args: "nonsense",
    lambda *args: (1, 2, 3, 4, 5),
    lambda *args: args[0],
    lambda *args: [[1.0, 2.0]],
    lambda *args: np.full(np.shape(args[0]), np.nan),
    lambda *args: np.zeros(7, dtype=complex),
    lambda *args: {"y": 1},
    lambda *args: 1 / 0,
    lambda: 0,  # the wrong number of parameters
]


@pytest.mark.parametrize("wrong", NONSENSE, ids=range(len(NONSENSE)))
@pytest.mark.parametrize("checker", ALL_CHECKERS, ids=lambda checker: checker.__name__)
def test_a_wrong_answer_only_ever_raises_an_assertion_error(checker, wrong):
    with pytest.raises(AssertionError, match="failed on case"):
        checker(wrong)


@pytest.mark.parametrize("checker", ALL_CHECKERS, ids=lambda checker: checker.__name__)
def test_a_function_returning_none_is_reported_never_crashes(checker, capsys):
    """A body of `...` or `pass` returns None: "forget a `return`" (an AssertionError), or "not attempted yet"."""
    try:
        checker(lambda *args: None)
    except AssertionError as failure:
        assert "`return`" in str(failure), str(failure)
    else:
        assert "not attempted yet" in capsys.readouterr().out


def test_a_stub_does_not_hide_a_wrong_answer():
    """Only NotImplementedError means "not attempted": other errors and wrong numbers still fail."""
    def wrong_type(x, gamma, beta, eps):
        raise TypeError("unsupported operand")

    fails_with(exercises.check_forward, wrong_type, "TypeError: unsupported operand")
    fails_with(exercises.check_forward, lambda x, g, b, eps: g * (x - x.mean(0)) / x.std(0) + b, "without eps")


def test_the_checker_keeps_its_name_and_docstring():
    assert exercises.check_forward.__name__ == "check_forward"
    assert "training-mode BN" in exercises.check_forward.__doc__
