"""Tests of the Derive checkers of issue 15: the batch-of-two gradient, Bessel's factor, Caffe's scale factor and the
scale invariance of the gradient. Each accepts right answers, names each mistake of its catalogue, and its reference
is checked against the fact it encodes (numpy_bn, a simulation, the recursion, autograd).
"""

from __future__ import annotations

import numpy as np
import pytest

from bnnotes import _core, exercises, numpy_bn
from conftest import fails_with, passes  # the checker-test helpers, shared


# ---------------------------------------------------------------------------------------------------------------------
# check_batch_of_two


def closed_form(x1, x2, dy1, dy2, gamma, eps):
    v = ((x1 - x2) / 2) ** 2
    dx1 = gamma * (dy1 - dy2) * eps / (2 * (v + eps) ** 1.5)
    return dx1, -dx1


def two(x1, x2, dy1, dy2, gamma, eps, ddof=0, mean_term=True, var_term=True, use_gamma=True, eps_outside=False):
    """A learner's general backward on the stacked batch, with the knobs of the mistakes."""
    x, dy = np.stack([x1, x2]), np.stack([dy1, dy2])
    mu = x.mean(0)
    var = ((x - mu) ** 2).sum(0) / (2 - ddof)
    std = np.sqrt(var) + eps if eps_outside else np.sqrt(var + eps)
    dx_hat = dy * gamma if use_gamma else dy
    dstd_dvar = 1 / (2 * np.sqrt(var)) if eps_outside else 1 / (2 * std)
    dvar = (dx_hat * (x - mu)).sum(0) * (-1 / std**2) * dstd_dvar
    dx = dx_hat / std
    if var_term:
        dx = dx + dvar * 2 * (x - mu) / (2 - ddof)
    if mean_term:
        dx = dx - dx_hat.sum(0) / std / 2
    return dx[0], dx[1]


BATCH_OF_TWO_MISTAKES = [
    (lambda x1, x2, dy1, dy2, g, eps: (np.zeros_like(x1), np.zeros_like(x2)), "the eps -> 0 limit"),
    (lambda x1, x2, dy1, dy2, g, eps: (g * dy1 / np.sqrt(((x1 - x2) / 2) ** 2 + eps),
                                       g * dy2 / np.sqrt(((x1 - x2) / 2) ** 2 + eps)), "held constant"),
    (lambda *args: two(*args, mean_term=False), "without the MEAN term"),
    (lambda *args: two(*args, var_term=False), "without the VARIANCE term"),
    (lambda *args: two(*args, ddof=1), "UNBIASED variance of the two"),
    (lambda *args: two(*args, use_gamma=False), "without the factor gamma"),
    (lambda *args: two(*args, eps_outside=True), "eps belongs INSIDE"),
]


def test_batch_of_two_accepts_right_answers(capsys):
    passes(exercises.check_batch_of_two, closed_form, capsys)
    passes(exercises.check_batch_of_two, two, capsys)

    def via_numpy_bn(x1, x2, dy1, dy2, gamma, eps):
        x = np.stack([x1, x2])
        dx = numpy_bn.backward(np.stack([dy1, dy2]), numpy_bn.forward(x, gamma, np.zeros_like(gamma), eps)[1])[0]
        return dx[0], dx[1]

    passes(exercises.check_batch_of_two, via_numpy_bn, capsys)


def test_batch_of_two_cases_include_float32():
    def upcast(*args):
        return tuple(v.astype(np.float64) for v in closed_form(*args))

    fails_with(exercises.check_batch_of_two, upcast, "case 4 of 4", "float32")


@pytest.mark.parametrize("wrong, hint", BATCH_OF_TWO_MISTAKES)
def test_batch_of_two_names_each_mistake(wrong, hint):
    fails_with(exercises.check_batch_of_two, wrong, hint)


def test_batch_of_two_rejects_garbage():
    fails_with(exercises.check_batch_of_two, lambda x1, x2, dy1, dy2, g, eps: np.stack(closed_form(
        x1, x2, dy1, dy2, g, eps)), "tuple (dx1, dx2)")
    fails_with(exercises.check_batch_of_two, lambda x1, x2, dy1, dy2, g, eps: (dy1, dy2))


def test_batch_of_two_closed_form_is_the_gradient_and_vanishes_with_eps():
    """The reference's closed form (the chapter's derivation) against numpy_bn, and its eps -> 0 limit."""
    rng = np.random.default_rng(0)
    x1, x2, dy1, dy2, gamma = rng.normal(size=(5, 6))
    for eps in (1.0, 1e-3):
        x = np.stack([x1, x2])
        dx = numpy_bn.backward(np.stack([dy1, dy2]), numpy_bn.forward(x, gamma, np.zeros(6), eps)[1])[0]
        np.testing.assert_allclose(np.stack(closed_form(x1, x2, dy1, dy2, gamma, eps)), dx, rtol=1e-10, atol=1e-14)
    assert np.max(np.abs(closed_form(x1, x2, dy1, dy2, gamma, 1e-12)[0])) < 1e-9


# ---------------------------------------------------------------------------------------------------------------------
# check_bessel_factor


def test_bessel_factor_accepts_right_answers(capsys):
    for right in (lambda m: m / (m - 1), _core.bessel_factor, lambda m: 1 + 1 / (m - 1),
                  lambda m: np.float32(m) / np.float32(m - 1), lambda m: np.array(m / (m - 1))):
        passes(exercises.check_bessel_factor, right, capsys)


@pytest.mark.parametrize(
    "wrong, hint",
    [
        (lambda m: (m - 1) / m, "this matches (m - 1) / m"),
        (lambda m: m / (m + 1), "this matches m / (m + 1)"),
        (lambda m: (m + 1) / m, "this matches (m + 1) / m"),
        (lambda m: 1, "this matches 1, no correction"),
        (lambda m: 1.0, "this matches 1, no correction"),
    ],
)
def test_bessel_factor_names_each_mistake(wrong, hint):
    fails_with(exercises.check_bessel_factor, wrong, hint)


@pytest.mark.parametrize("wrong, part", [(lambda m: "2", "expected a real number"), (lambda m: True, "real number"),
                                         (lambda m: [m / (m - 1)], "real number"), (lambda m: None, "`return`"),
                                         (lambda m: m / 0, "ZeroDivisionError")])
def test_bessel_factor_rejects_garbage(wrong, part):
    fails_with(exercises.check_bessel_factor, wrong, part)


def test_bessel_factor_makes_the_biased_variance_unbiased():
    """The reference's defining property, by simulation: E[c(m) * biased variance] = sigma^2 (here 4)."""
    rng = np.random.default_rng(0)
    for m in (2, 3, 8):
        samples = rng.normal(1.0, 2.0, size=(200_000, m))
        corrected = _core.bessel_factor(m) * samples.var(axis=1).mean()
        assert abs(corrected / 4.0 - 1) < 0.01, (m, corrected)


# ---------------------------------------------------------------------------------------------------------------------
# check_caffe_scale_factor


def caffe_recursion(momentum, t, steps_offset=0):
    s = 0.0
    for _ in range(t + steps_offset):
        s = momentum * s + 1
    return s


@pytest.mark.parametrize("right", [lambda momentum, t: (1 - momentum**t) / (1 - momentum), caffe_recursion,
                                   lambda momentum, t: sum(momentum**k for k in range(t))])
def test_caffe_scale_factor_accepts_right_answers(right, capsys):
    passes(exercises.check_caffe_scale_factor, right, capsys)


@pytest.mark.parametrize(
    "wrong, hint",
    [
        (lambda momentum, t: momentum**t, "this matches momentum**t"),
        (lambda momentum, t: 1 / (1 - momentum), "the limit as t -> infinity"),
        (lambda momentum, t: t, "this matches t, the sum of t ones"),
        (lambda momentum, t: caffe_recursion(momentum, t, steps_offset=1), "one step too far"),
        (lambda momentum, t: caffe_recursion(momentum, t, steps_offset=-1), "one step short"),
        (lambda momentum, t: (1 - momentum ** (t + 1)) / (1 - momentum), "one step too far"),
    ],
)
def test_caffe_scale_factor_names_each_mistake(wrong, hint):
    fails_with(exercises.check_caffe_scale_factor, wrong, hint)


def test_caffe_scale_factor_rejects_garbage():
    fails_with(exercises.check_caffe_scale_factor, lambda momentum, t: (momentum, t), "real number")
    fails_with(exercises.check_caffe_scale_factor, lambda momentum, t: 1 / momentum - 1)


def test_caffe_scale_factor_cases_cover_momentum_zero():
    message = fails_with(exercises.check_caffe_scale_factor,
                         lambda momentum, t: 0.0 if momentum == 0 else (1 - momentum**t) / (1 - momentum))
    assert "momentum=0.0, t=4" in message


# ---------------------------------------------------------------------------------------------------------------------
# check_scale_invariance


def test_scale_invariance_accepts_right_answers(capsys):
    passes(exercises.check_scale_invariance, lambda grad_w, c: grad_w / c, capsys)
    passes(exercises.check_scale_invariance, lambda grad_w, c: grad_w * (1 / c), capsys)


def test_scale_invariance_cases_include_float32():
    fails_with(exercises.check_scale_invariance, lambda grad_w, c: grad_w.astype(np.float64) / c, "case 4 of 4",
               "float32")


@pytest.mark.parametrize(
    "wrong, hint",
    [
        (lambda grad_w, c: c * grad_w, "this matches c * grad_w"),
        (lambda grad_w, c: grad_w, "this matches grad_w unchanged"),
        (lambda grad_w, c: grad_w / c**2, "this matches grad_w / c**2"),
    ],
)
def test_scale_invariance_names_each_mistake(wrong, hint):
    fails_with(exercises.check_scale_invariance, wrong, hint)


def test_scale_invariance_rejects_garbage():
    fails_with(exercises.check_scale_invariance, lambda grad_w, c: grad_w.T / c, "shape")
    fails_with(exercises.check_scale_invariance, lambda grad_w, c: -grad_w / c, "opposite sign")


def test_scale_invariance_is_what_autograd_measures():
    """The reference's claim on a real network: the gradient at c W through BN is the gradient at W divided by c."""
    torch = pytest.importorskip("torch")
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(16, 5, generator=generator, dtype=torch.float64)
    target = torch.randn(16, 3, generator=generator, dtype=torch.float64)
    weight = torch.randn(4, 5, generator=generator, dtype=torch.float64)
    head = torch.randn(3, 4, generator=generator, dtype=torch.float64)

    def gradient_at(w):
        w = w.clone().requires_grad_(True)
        pre = x @ w.T
        hidden = (pre - pre.mean(0)) / pre.std(0, unbiased=False)  # BN with eps = 0: exactly scale-invariant
        loss = ((torch.relu(hidden) @ head.T - target) ** 2).mean()
        (grad,) = torch.autograd.grad(loss, w)
        return grad.numpy()

    grad_w = gradient_at(weight)
    for c in (0.5, 2.0, 10.0):
        np.testing.assert_allclose(gradient_at(c * weight), grad_w / c, rtol=1e-9, atol=1e-12)
