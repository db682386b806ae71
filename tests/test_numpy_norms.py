"""Tests of bnnotes.numpy_norms: outputs and all gradients against PyTorch's functionals in float64, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from bnnotes import numpy_norms

TOL = {"rtol": 1e-10, "atol": 1e-10}


def make_case(shape: tuple[int, ...], affine_shape: tuple[int, ...], seed: int, dtype=np.float64):
    """x with a large offset and mixed scales along every axis, non-trivial gamma and beta, and a non-uniform dy."""
    rng = np.random.default_rng(seed)
    scales = np.exp(rng.uniform(np.log(0.1), np.log(10.0), size=shape[-1]))
    x = rng.uniform(-5.0, 5.0) + scales * rng.standard_normal(shape)
    gamma = rng.uniform(0.5, 2.0, size=affine_shape) * rng.choice([-1.0, 1.0], size=affine_shape)
    beta = rng.uniform(-1.0, 1.0, size=affine_shape)
    dy = rng.standard_normal(shape) * rng.uniform(0.5, 2.0, size=shape[-1]) + 0.3
    return x.astype(dtype), gamma.astype(dtype), beta.astype(dtype), dy.astype(dtype)


def torch_grads(fn, x, params, dy):
    """Run fn(x_t, *params_t) with autograd in float64: (y, dx, *dparams) as NumPy arrays."""
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    pts = [torch.tensor(p, dtype=torch.float64, requires_grad=True) for p in params]
    y = fn(xt, *pts)
    y.backward(torch.tensor(dy, dtype=torch.float64))
    return [y.detach().numpy(), xt.grad.numpy()] + [p.grad.numpy() for p in pts]


def assert_all_close(ours, reference):
    assert len(ours) == len(reference)
    for got, expected in zip(ours, reference):
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, **TOL)


# ---------------------------------------------------------------------------------------------------------------------
# Agreement with PyTorch in float64, over shapes


@settings(max_examples=40, deadline=None)
@given(
    leading=st.lists(st.integers(1, 4), min_size=0, max_size=2),
    normalized=st.lists(st.integers(1, 5), min_size=1, max_size=2),
    eps=st.sampled_from([1e-5, 0.3]),
    seed=st.integers(0, 10_000),
)
def test_layer_norm_matches_torch(leading, normalized, eps, seed):
    shape, normalized_shape = tuple(leading + normalized), tuple(normalized)
    x, gamma, beta, dy = make_case(shape, normalized_shape, seed)
    y, cache = numpy_norms.layer_norm(x, gamma, beta, eps)
    ours = [y, *numpy_norms.layer_norm_backward(dy, cache)]
    reference = torch_grads(lambda t, w, b: F.layer_norm(t, normalized_shape, w, b, eps), x, [gamma, beta], dy)
    assert_all_close(ours, reference)


@settings(max_examples=40, deadline=None)
@given(
    leading=st.lists(st.integers(1, 4), min_size=0, max_size=2),
    normalized=st.lists(st.integers(1, 5), min_size=1, max_size=2),
    eps=st.sampled_from([1e-5, 0.3]),
    seed=st.integers(0, 10_000),
)
def test_rms_norm_matches_torch(leading, normalized, eps, seed):
    shape, normalized_shape = tuple(leading + normalized), tuple(normalized)
    x, gamma, _, dy = make_case(shape, normalized_shape, seed)
    y, cache = numpy_norms.rms_norm(x, gamma, eps)
    ours = [y, *numpy_norms.rms_norm_backward(dy, cache)]
    reference = torch_grads(lambda t, w: F.rms_norm(t, normalized_shape, w, eps), x, [gamma], dy)
    assert_all_close(ours, reference)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 4),
    groups_and_size=st.tuples(st.integers(1, 4), st.integers(1, 3)),
    spatial=st.lists(st.integers(1, 4), min_size=0, max_size=3),
    eps=st.sampled_from([1e-5, 0.3]),
    seed=st.integers(0, 10_000),
)
def test_group_norm_matches_torch(n, groups_and_size, spatial, eps, seed):
    num_groups, group_size = groups_and_size
    channels = num_groups * group_size
    shape = (n, channels, *spatial)
    # F.group_norm refuses an input whose N * (C / G) * positions is 1 (it checks it as if it were a batch norm).
    assume(n * group_size * int(np.prod(shape[2:])) > 1)
    if np.prod(shape[2:]) * group_size == 1 and eps < 1e-3:
        eps = 0.3  # one value per group: its variance is 0 and only eps is left (fine, but keep it well conditioned)
    x, gamma, beta, dy = make_case(shape, (channels,), seed)
    y, cache = numpy_norms.group_norm(x, num_groups, gamma, beta, eps)
    ours = [y, *numpy_norms.group_norm_backward(dy, cache)]
    reference = torch_grads(lambda t, w, b: F.group_norm(t, num_groups, w, b, eps), x, [gamma, beta], dy)
    assert_all_close(ours, reference)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 4),
    channels=st.integers(1, 5),
    spatial=st.lists(st.integers(2, 4), min_size=1, max_size=3),
    eps=st.sampled_from([1e-5, 0.3]),
    seed=st.integers(0, 10_000),
)
def test_instance_norm_matches_torch(n, channels, spatial, eps, seed):
    shape = (n, channels, *spatial)
    x, gamma, beta, dy = make_case(shape, (channels,), seed)
    y, cache = numpy_norms.instance_norm(x, gamma, beta, eps)
    ours = [y, *numpy_norms.instance_norm_backward(dy, cache)]
    reference = torch_grads(
        lambda t, w, b: F.instance_norm(t, weight=w, bias=b, use_input_stats=True, eps=eps), x, [gamma, beta], dy
    )
    assert_all_close(ours, reference)


def test_torch_modules_agree_with_the_functionals():
    """The chapter uses torch's modules; they compute what the functionals (and so numpy_norms) compute."""
    x, gamma, beta, _ = make_case((3, 6, 4, 5), (6,), seed=1)
    xt = torch.tensor(x)
    modules = {
        "group": (torch.nn.GroupNorm(3, 6, eps=1e-5).double(), lambda: numpy_norms.group_norm(x, 3, gamma, beta)),
        "instance": (
            torch.nn.InstanceNorm2d(6, affine=True).double(),
            lambda: numpy_norms.instance_norm(x, gamma, beta),
        ),
    }
    for module, ours in modules.values():
        with torch.no_grad():
            module.weight.copy_(torch.tensor(gamma))
            module.bias.copy_(torch.tensor(beta))
        for training in (True, False):  # no running statistics: the same map in both modes
            np.testing.assert_allclose(module.train(training)(xt).detach().numpy(), ours()[0], **TOL)
    layer, rms = torch.nn.LayerNorm((4, 5)).double(), torch.nn.RMSNorm((4, 5), eps=1e-5).double()
    g2, b2 = gamma[:1] * np.ones((4, 5)), beta[:1] * np.ones((4, 5))
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(g2))
        layer.bias.copy_(torch.tensor(b2))
        rms.weight.copy_(torch.tensor(g2))
    np.testing.assert_allclose(layer(xt).detach().numpy(), numpy_norms.layer_norm(x, g2, b2)[0], **TOL)
    np.testing.assert_allclose(rms(xt).detach().numpy(), numpy_norms.rms_norm(x, g2, 1e-5)[0], **TOL)


# ---------------------------------------------------------------------------------------------------------------------
# Properties the chapter relies on


def test_each_output_depends_on_its_own_example_only():
    x, gamma, beta, _ = make_case((5, 4, 3), (4,), seed=2)
    other = x.copy()
    other[1:] = 100.0 + 7.0 * other[1:]  # change every other example of the batch
    for forward in (
        lambda v: numpy_norms.group_norm(v, 2, gamma, beta)[0],
        lambda v: numpy_norms.instance_norm(v, gamma, beta)[0],
        lambda v: numpy_norms.layer_norm(v, gamma[:3] * 0 + 1.5, beta[:3])[0],
        lambda v: numpy_norms.rms_norm(v, gamma[:3])[0],
    ):
        np.testing.assert_allclose(forward(x)[0], forward(other)[0], **TOL)
        np.testing.assert_allclose(forward(x[:1])[0], forward(x)[0], **TOL)  # batch size 1 gives the same output


def test_group_norm_extremes_are_layer_norm_and_instance_norm():
    x, gamma, beta, _ = make_case((3, 4, 5), (4,), seed=3)
    ones, zeros = np.ones((4, 5)), np.zeros((4, 5))
    np.testing.assert_allclose(
        numpy_norms.group_norm(x, 1, np.ones(4), np.zeros(4))[0], numpy_norms.layer_norm(x, ones, zeros)[0], **TOL
    )
    np.testing.assert_allclose(
        numpy_norms.group_norm(x, 4, gamma, beta)[0], numpy_norms.instance_norm(x, gamma, beta)[0], **TOL
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_is_kept_and_float32_is_accurate(dtype):
    x, gamma, beta, dy = make_case((4, 6, 3), (6,), seed=4, dtype=dtype)
    y, cache = numpy_norms.group_norm(x, 3, gamma, beta)
    grads = numpy_norms.group_norm_backward(dy, cache)
    assert y.dtype == dtype and all(g.dtype == dtype for g in grads)
    y64, _ = numpy_norms.group_norm(x.astype(np.float64), 3, gamma.astype(np.float64), beta.astype(np.float64))
    np.testing.assert_allclose(y, y64, rtol=1e-5, atol=1e-5)


def test_large_offset_does_not_cancel():
    """Two-pass variance: a mean of 1e8 with a spread of 1 still normalizes exactly (E[x^2] - E[x]^2 would not)."""
    rng = np.random.default_rng(5)
    x = 1e8 + rng.standard_normal((3, 50))
    y, _ = numpy_norms.layer_norm(x, np.ones(50), np.zeros(50), eps=0.0)
    np.testing.assert_allclose(y.std(axis=1), 1.0, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: clear errors, no silent broadcasting


def test_layer_norm_rejects_a_gamma_that_does_not_match_the_trailing_axes():
    x = np.zeros((4, 3, 5))
    with pytest.raises(ValueError, match=r"gamma.shape=\(3,\).*does not end in \(3,\)"):
        numpy_norms.layer_norm(x, np.ones(3), np.zeros(3))
    with pytest.raises(ValueError, match="at least 1 dimension"):
        numpy_norms.layer_norm(x, np.float64(1.0), np.float64(0.0))
    with pytest.raises(ValueError, match=r"beta has shape \(1,\).*expected beta.shape=\(5,\)"):
        numpy_norms.layer_norm(x, np.ones(5), np.zeros(1))  # a broadcastable beta is still refused
    with pytest.raises(ValueError, match="does not end in"):
        numpy_norms.rms_norm(x, np.ones((1, 5)))


def test_group_norm_rejects_wrong_group_counts_and_per_group_gammas():
    x = np.zeros((2, 6, 4))
    with pytest.raises(ValueError, match=r"num_groups=4 does not divide the 6 channels.*\[1, 2, 3, 6\]"):
        numpy_norms.group_norm(x, 4, np.ones(6), np.zeros(6))
    for bad in (0, -2, 2.0, True):
        with pytest.raises(ValueError, match="num_groups must be a positive integer"):
            numpy_norms.group_norm(x, bad, np.ones(6), np.zeros(6))
    with pytest.raises(ValueError, match=r"gamma has shape \(3,\).*per channel, not per group"):
        numpy_norms.group_norm(x, 3, np.ones(3), np.zeros(6))
    with pytest.raises(ValueError, match=r"expects x of shape \(N, C, \*spatial\)"):
        numpy_norms.group_norm(np.zeros(6), 2, np.ones(6), np.zeros(6))


def test_instance_norm_needs_a_spatial_axis_and_per_channel_parameters():
    with pytest.raises(ValueError, match=r"expects x of shape \(N, C, L\)"):
        numpy_norms.instance_norm(np.zeros((4, 3)), np.ones(3), np.zeros(3))
    with pytest.raises(ValueError, match=r"beta has shape \(4,\) but x has 3 channels"):
        numpy_norms.instance_norm(np.zeros((4, 3, 2)), np.ones(3), np.zeros(4))


def test_dtype_eps_and_dy_errors():
    with pytest.raises(TypeError, match="float32 or float64.*int64"):
        numpy_norms.layer_norm(np.zeros((2, 3), dtype=np.int64), np.ones(3), np.zeros(3))
    with pytest.raises(ValueError, match="eps must be a non-negative number"):
        numpy_norms.rms_norm(np.zeros((2, 3)), np.ones(3), eps=-1.0)
    _, cache = numpy_norms.layer_norm(np.ones((2, 3)), np.ones(3), np.zeros(3))
    with pytest.raises(ValueError, match=r"dy has shape \(3, 2\) but the forward input had shape \(2, 3\)"):
        numpy_norms.layer_norm_backward(np.ones((3, 2)), cache)
