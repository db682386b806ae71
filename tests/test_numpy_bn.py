"""Tests of bnnotes.numpy_bn: exact against PyTorch in float64, gradient checks, dtypes, accuracy and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from bnnotes import numpy_bn

# One shape per input rank: (N, C), (N, C, L), (N, C, H, W), (N, C, D, H, W).
SHAPES = [(6, 3), (4, 3, 5), (3, 2, 4, 5), (2, 3, 2, 3, 4)]
TORCH_LAYERS = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}
TOL = {"rtol": 1e-10, "atol": 1e-10}


def make_case(shape: tuple[int, ...], seed: int, dtype=np.float64):
    """x whose channels have different means and scales, non-trivial gamma and beta, and a non-uniform dy."""
    rng = np.random.default_rng(seed)
    channels = shape[1]
    per_channel = (1, channels) + (1,) * (len(shape) - 2)
    means = rng.uniform(-5.0, 5.0, size=channels).reshape(per_channel)
    scales = np.exp(rng.uniform(np.log(0.05), np.log(20.0), size=channels)).reshape(per_channel)
    x = (means + scales * rng.standard_normal(shape)).astype(dtype)
    gamma = rng.uniform(0.5, 2.0, size=channels) * rng.choice([-1.0, 1.0], size=channels)
    beta = rng.uniform(-1.0, 1.0, size=channels)
    dy = rng.standard_normal(shape) * rng.uniform(0.5, 2.0, size=channels).reshape(per_channel) + 0.3
    return x, gamma.astype(dtype), beta.astype(dtype), dy.astype(dtype)


def torch_training(x, gamma, beta, dy, eps):
    """PyTorch's F.batch_norm in training mode, with autograd: (y, dx, dgamma, dbeta) as float64 NumPy arrays."""
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    wt = torch.tensor(gamma, dtype=torch.float64, requires_grad=True)
    bt = torch.tensor(beta, dtype=torch.float64, requires_grad=True)
    y = F.batch_norm(xt, None, None, wt, bt, training=True, eps=eps)
    y.backward(torch.tensor(dy, dtype=torch.float64))
    return y.detach().numpy(), xt.grad.numpy(), wt.grad.numpy(), bt.grad.numpy()


# ---------------------------------------------------------------------------------------------------------------------
# Agreement with PyTorch in float64


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{len(s)}d")
@pytest.mark.parametrize("eps", [1e-5, 0.3])
def test_forward_and_gradients_match_torch(shape, eps):
    x, gamma, beta, dy = make_case(shape, seed=len(shape))
    y, cache = numpy_bn.forward(x, gamma, beta, eps)
    dx, dgamma, dbeta = numpy_bn.backward(dy, cache)
    y_ref, dx_ref, dgamma_ref, dbeta_ref = torch_training(x, gamma, beta, dy, eps)
    np.testing.assert_allclose(y, y_ref, **TOL)
    np.testing.assert_allclose(dx, dx_ref, **TOL)
    np.testing.assert_allclose(dgamma, dgamma_ref, **TOL)
    np.testing.assert_allclose(dbeta, dbeta_ref, **TOL)


def run_layer_against_torch(shape, eps, momentum, steps, seed):
    """Several training steps of numpy_bn.BatchNorm and torch.nn.BatchNormNd on the same batches, then eval."""
    rng = np.random.default_rng(seed)
    channels = shape[1]
    layer = numpy_bn.BatchNorm(channels, eps=eps, momentum=momentum)
    reference = TORCH_LAYERS[len(shape)](channels, eps=eps, momentum=momentum).double()
    _, gamma, beta, _ = make_case(shape, seed)
    layer.gamma, layer.beta = gamma.copy(), beta.copy()
    with torch.no_grad():
        reference.weight.copy_(torch.from_numpy(gamma))
        reference.bias.copy_(torch.from_numpy(beta))
    for step in range(steps):
        x, _, _, dy = make_case(shape, seed=int(rng.integers(1 << 30)))
        x = x + step  # the batch statistics move from step to step
        xt = torch.tensor(x, requires_grad=True)
        y_ref = reference(xt)
        y_ref.backward(torch.from_numpy(dy))
        y = layer.forward(x)
        dx = layer.backward(dy)
        np.testing.assert_allclose(y, y_ref.detach().numpy(), **TOL)
        np.testing.assert_allclose(dx, xt.grad.numpy(), **TOL)
        np.testing.assert_allclose(layer.dgamma, reference.weight.grad.numpy(), **TOL)
        np.testing.assert_allclose(layer.dbeta, reference.bias.grad.numpy(), **TOL)
        reference.weight.grad = reference.bias.grad = None
        np.testing.assert_allclose(layer.running_mean, reference.running_mean.numpy(), **TOL)
        np.testing.assert_allclose(layer.running_var, reference.running_var.numpy(), **TOL)
        assert layer.num_batches_tracked == int(reference.num_batches_tracked) == step + 1
    x_eval = make_case(shape, seed + 1)[0]
    reference.eval()
    with torch.no_grad():
        y_eval_ref = reference(torch.from_numpy(x_eval)).numpy()
    np.testing.assert_allclose(layer.forward(x_eval, training=False), y_eval_ref, **TOL)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{len(s)}d")
@pytest.mark.parametrize("momentum", [0.1, 0.7, None])
def test_layer_matches_torch_over_several_steps_and_in_eval(shape, momentum):
    run_layer_against_torch(shape, eps=1e-5, momentum=momentum, steps=4, seed=3)


shapes = st.integers(2, 5).flatmap(
    lambda ndim: st.tuples(
        st.integers(1, 5), st.integers(1, 4), *[st.integers(1, 3) for _ in range(ndim - 2)]
    )
).filter(lambda shape: np.prod(shape) // shape[1] >= 2)


@settings(max_examples=30, deadline=None)
@given(
    shape=shapes,
    eps=st.sampled_from([1e-5, 1e-3, 0.1, 1.0]),
    momentum=st.one_of(st.none(), st.floats(0.0, 1.0)),
    seed=st.integers(0, 2**16),
)
def test_property_layer_matches_torch(shape, eps, momentum, seed):
    run_layer_against_torch(shape, eps=eps, momentum=momentum, steps=3, seed=seed)


def test_cumulative_average_with_momentum_none():
    """momentum=None: after k steps the running mean is the plain average of the k batch means (PyTorch's rule)."""
    layer = numpy_bn.BatchNorm(3, momentum=None)
    batches = [make_case((5, 3), seed)[0] for seed in range(4)]
    for x in batches:
        layer.forward(x)
    np.testing.assert_allclose(layer.running_mean, np.mean([x.mean(0) for x in batches], axis=0), rtol=1e-12)
    np.testing.assert_allclose(layer.running_var, np.mean([x.var(0, ddof=1) for x in batches], axis=0), rtol=1e-12)


def test_running_variance_is_unbiased():
    layer = numpy_bn.BatchNorm(2, momentum=1.0)
    x = np.array([[0.0, 1.0], [2.0, 5.0], [4.0, 3.0]])
    layer.forward(x)
    np.testing.assert_allclose(layer.running_var, x.var(axis=0, ddof=1), rtol=1e-14)
    np.testing.assert_allclose(layer.running_mean, x.mean(axis=0), rtol=1e-14)


# ---------------------------------------------------------------------------------------------------------------------
# Gradients: central differences, the staged form and the invariants


def numerical_gradients(x, gamma, beta, dy, eps, h=1e-6):
    """Central differences of the scalar loss sum(dy * y) with respect to x, gamma and beta."""

    def loss(x_, gamma_, beta_):
        return float(np.sum(dy * numpy_bn.forward(x_, gamma_, beta_, eps)[0]))

    grads = []
    for index, value in enumerate((x, gamma, beta)):
        grad = np.zeros_like(value)
        for position in np.ndindex(value.shape):
            args_plus = [x.copy(), gamma.copy(), beta.copy()]
            args_minus = [x.copy(), gamma.copy(), beta.copy()]
            args_plus[index][position] += h
            args_minus[index][position] -= h
            grad[position] = (loss(*args_plus) - loss(*args_minus)) / (2 * h)
        grads.append(grad)
    return grads


@pytest.mark.parametrize("shape", [(5, 3), (3, 2, 2, 3)], ids=["2d", "4d"])
@pytest.mark.parametrize("backward", [numpy_bn.backward, numpy_bn.backward_staged], ids=["compact", "staged"])
def test_backward_matches_central_differences(shape, backward):
    x, gamma, beta, dy = make_case(shape, seed=7)
    x = x / np.abs(x).max()  # O(1) values keep the finite-difference error small and uniform
    eps = 1e-3
    _, cache = numpy_bn.forward(x, gamma, beta, eps)
    analytic = backward(dy, cache)
    numeric = numerical_gradients(x, gamma, beta, dy, eps)
    for name, a, n in zip(("dx", "dgamma", "dbeta"), analytic, numeric):
        scale = np.abs(n).max()
        assert np.abs(a - n).max() <= 1e-7 * scale, f"{name}: max error {np.abs(a - n).max():.3g}, scale {scale:.3g}"


def test_gradient_check_can_fail():
    """The finite-difference check has teeth: dropping the mean term of dx is far outside its tolerance."""
    x, gamma, beta, dy = make_case((5, 3), seed=7)
    _, cache = numpy_bn.forward(x, gamma, beta, 1e-3)
    dx, _, _ = numpy_bn.backward(dy, cache)
    x_hat = cache["x_hat"]
    wrong = gamma * cache["inv_std"] * (dy - x_hat * (dy * x_hat).mean(0))
    assert np.abs(wrong - dx).max() > 1e-2 * np.abs(dx).max()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{len(s)}d")
@pytest.mark.parametrize("eps", [0.0, 1e-5, 0.5])
def test_staged_backward_agrees_with_compact(shape, eps):
    x, gamma, beta, dy = make_case(shape, seed=11)
    _, cache = numpy_bn.forward(x, gamma, beta, eps)
    for compact, staged in zip(numpy_bn.backward(dy, cache), numpy_bn.backward_staged(dy, cache)):
        np.testing.assert_allclose(staged, compact, rtol=1e-10, atol=1e-10 * np.abs(compact).max())


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{len(s)}d")
def test_dx_is_orthogonal_to_ones_and_x_hat_per_channel(shape):
    """Sum dx = 0 and sum dx * x_hat = 0 per channel (eps = 0): dx is projected off 1 and off x_hat."""
    x, gamma, beta, dy = make_case(shape, seed=13)
    _, cache = numpy_bn.forward(x, gamma, beta, eps=0.0)
    dx, _, _ = numpy_bn.backward(dy, cache)
    axes = numpy_bn.reduction_axes(x.ndim)
    magnitude = np.abs(dx).sum(axis=axes)  # what the sums are made of, so the bound is relative
    assert np.all(np.abs(dx.sum(axis=axes)) <= 1e-12 * magnitude)
    assert np.all(np.abs((dx * cache["x_hat"]).sum(axis=axes)) <= 1e-12 * magnitude * np.abs(cache["x_hat"]).max())
    # ... and they are not satisfied trivially: dy itself violates both.
    assert np.all(np.abs(dy.sum(axis=axes)) > 1e-3 * np.abs(dy).sum(axis=axes))
    assert np.all(np.abs((dy * cache["x_hat"]).sum(axis=axes)) > 1e-3 * np.abs(dy).sum(axis=axes))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{len(s)}d")
def test_with_eps_the_x_hat_invariant_holds_up_to_eps_over_var(shape):
    """With eps > 0, sum dx = 0 still holds exactly (a shift of x changes nothing), but a scaling of x now changes
    x_hat slightly, so sum dx * x_hat = gamma / sigma * sum(dy * x_hat) * eps / (var + eps) instead of 0."""
    x, gamma, beta, dy = make_case(shape, seed=13)
    eps = 0.1
    _, cache = numpy_bn.forward(x, gamma, beta, eps)
    dx, dgamma, _ = numpy_bn.backward(dy, cache)
    axes = numpy_bn.reduction_axes(x.ndim)
    magnitude = np.abs(dx).sum(axis=axes)
    assert np.all(np.abs(dx.sum(axis=axes)) <= 1e-12 * magnitude)
    predicted = gamma * cache["inv_std"] * dgamma * eps / (cache["batch_var"] + eps)
    np.testing.assert_allclose((dx * cache["x_hat"]).sum(axis=axes), predicted, rtol=1e-9, atol=1e-12 * magnitude.max())


def test_dx_vanishes_for_a_gradient_in_the_span_of_ones_and_x_hat():
    """The converse (eps = 0): a dy along 1 or along x_hat changes only beta and gamma, so dx = 0."""
    x, gamma, beta, _ = make_case((6, 3), seed=17)
    _, cache = numpy_bn.forward(x, gamma, beta, eps=0.0)
    dy = 2.0 + 3.0 * cache["x_hat"]
    dx, dgamma, dbeta = numpy_bn.backward(dy, cache)
    np.testing.assert_allclose(dx, 0.0, atol=1e-12 * np.abs(gamma * cache["inv_std"]).max())
    np.testing.assert_allclose(dbeta, 2.0 * 6)
    np.testing.assert_allclose(dgamma, 3.0 * 6, rtol=1e-12)  # the sum of x_hat^2 is N


def test_reduction_axes():
    assert numpy_bn.reduction_axes(2) == (0,)
    assert numpy_bn.reduction_axes(5) == (0, 2, 3, 4)


def test_conv_forward_equals_forward_on_the_channels_last_reshape():
    """For (N, C, H, W) the statistics are per channel over N*H*W: the same as 2-D BN on the (N*H*W, C) reshape."""
    x, gamma, beta, _ = make_case((3, 4, 5, 2), seed=19)
    y, _ = numpy_bn.forward(x, gamma, beta, 1e-5)
    rows = x.transpose(0, 2, 3, 1).reshape(-1, 4)
    y_rows, _ = numpy_bn.forward(rows, gamma, beta, 1e-5)
    np.testing.assert_allclose(y, y_rows.reshape(3, 5, 2, 4).transpose(0, 3, 1, 2), rtol=1e-13, atol=1e-13)


# ---------------------------------------------------------------------------------------------------------------------
# Dtypes and accuracy


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_in_is_dtype_out(dtype):
    x, gamma, beta, dy = make_case((4, 3, 2), seed=23, dtype=dtype)
    y, cache = numpy_bn.forward(x, gamma, beta)
    assert y.dtype == dtype
    for grad in numpy_bn.backward(dy, cache) + numpy_bn.backward_staged(dy, cache):
        assert grad.dtype == dtype
    assert numpy_bn.inference(x, gamma, beta, np.zeros(3), np.ones(3)).dtype == dtype
    layer = numpy_bn.BatchNorm(3)
    assert layer.forward(x).dtype == dtype
    assert layer.backward(dy).dtype == dtype
    assert layer.forward(x, training=False).dtype == dtype


def test_float32_matches_float64_on_the_same_values():
    x, gamma, beta, dy = make_case((8, 3, 4), seed=29, dtype=np.float32)
    y32, cache32 = numpy_bn.forward(x, gamma, beta)
    y64, cache64 = numpy_bn.forward(x.astype(np.float64), gamma.astype(np.float64), beta.astype(np.float64))
    np.testing.assert_allclose(y32, y64, rtol=1e-6, atol=1e-6)
    dx32, _, _ = numpy_bn.backward(dy, cache32)
    dx64, _, _ = numpy_bn.backward(dy.astype(np.float64), cache64)
    np.testing.assert_allclose(dx32, dx64, rtol=1e-5, atol=1e-6 * np.abs(dx64).max())


def large_mean_float32(seed: int = 0) -> np.ndarray:
    """float32 data with mean 1e4 and standard deviation 1: 4096 values per channel."""
    rng = np.random.default_rng(seed)
    return (1e4 + rng.standard_normal((4096, 4))).astype(np.float32)


def naive_moments_float32(x: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """Normalization with var = E[x^2] - E[x]^2, all in float32: catastrophic cancellation."""
    mean = x.mean(axis=0, dtype=np.float32)
    var = (x * x).mean(axis=0, dtype=np.float32) - mean * mean
    return (x - mean) / np.sqrt(np.maximum(var, 0) + np.float32(eps))


def float32_accumulated_mean(x: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """Two-pass normalization, but with the mean accumulated in float32, one value at a time."""
    mean = np.cumsum(x, axis=0, dtype=np.float32)[-1] / np.float32(len(x))
    centred = x - mean
    return centred / np.sqrt((centred * centred).mean(axis=0, dtype=np.float32) + np.float32(eps))


def test_float32_large_mean_is_accurate():
    """mean 1e4, std 1 in float32: within 5e-3 of a float64 computation on the same values (issue 2)."""
    x = large_mean_float32()
    ones, zeros = np.ones(4, np.float32), np.zeros(4, np.float32)
    y, _ = numpy_bn.forward(x, ones, zeros)
    y64, _ = numpy_bn.forward(x.astype(np.float64), ones, zeros)
    assert y.dtype == np.float32
    assert np.abs(y - y64).max() < 5e-3


def test_float32_large_mean_test_has_teeth():
    """The same bound rejects E[x^2] - E[x]^2 in float32 and a float32-accumulated mean."""
    x = large_mean_float32()
    y64, _ = numpy_bn.forward(x.astype(np.float64), np.ones(4), np.zeros(4))
    assert np.abs(naive_moments_float32(x) - y64).max() > 5e-3
    assert np.abs(float32_accumulated_mean(x) - y64).max() > 5e-3


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint8, np.complex128, np.bool_, np.float16])
def test_non_float_input_is_refused_with_a_type_error_naming_the_dtype(dtype):
    x = np.ones((4, 3), dtype=dtype)
    name = np.dtype(dtype).name
    with pytest.raises(TypeError, match=name):
        numpy_bn.forward(x, np.ones(3), np.zeros(3))
    with pytest.raises(TypeError, match=name):
        numpy_bn.inference(x, np.ones(3), np.zeros(3), np.zeros(3), np.ones(3))
    with pytest.raises(TypeError, match=name):
        numpy_bn.BatchNorm(3).forward(x)


def test_integer_or_complex_dy_and_parameters_are_refused():
    x, gamma, beta, dy = make_case((4, 3), seed=31)
    _, cache = numpy_bn.forward(x, gamma, beta)
    with pytest.raises(TypeError, match="int64"):
        numpy_bn.backward(dy.astype(np.int64), cache)
    with pytest.raises(TypeError, match="complex128"):
        numpy_bn.backward_staged(dy.astype(np.complex128), cache)
    with pytest.raises(TypeError, match="gamma.*complex128"):
        numpy_bn.forward(x, gamma.astype(np.complex128), beta)


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: a clear ValueError naming what was expected and what arrived


def test_fewer_than_two_dimensions():
    with pytest.raises(ValueError, match=r"\(N, C\).*got 1-D x.shape=\(5,\)"):
        numpy_bn.forward(np.ones(5), np.ones(5), np.zeros(5))
    with pytest.raises(ValueError, match=r"got 0-D"):
        numpy_bn.inference(np.float64(1.0), np.ones(1), np.zeros(1), np.zeros(1), np.ones(1))
    with pytest.raises(ValueError, match=r"got 1-D"):
        numpy_bn.BatchNorm(3).forward(np.ones(3))


def test_zero_channels():
    with pytest.raises(ValueError, match=r"at least 1 channel.*\(4, 0\)"):
        numpy_bn.forward(np.ones((4, 0)), np.ones(0), np.zeros(0))


@pytest.mark.parametrize("name", ["gamma", "beta"])
def test_wrong_length_gamma_or_beta(name):
    x = np.ones((4, 3, 2))
    args = {"gamma": np.ones(3), "beta": np.zeros(3)}
    args[name] = np.ones(4)
    with pytest.raises(ValueError, match=rf"{name} has shape \(4,\) but x has 3 channels.*expected \(3,\)"):
        numpy_bn.forward(x, args["gamma"], args["beta"])
    args[name] = np.ones((3, 1))
    with pytest.raises(ValueError, match=rf"{name} has shape \(3, 1\)"):
        numpy_bn.forward(x, args["gamma"], args["beta"])


@pytest.mark.parametrize("name", ["gamma", "beta", "running_mean", "running_var"])
def test_wrong_length_in_inference(name):
    args = {"gamma": np.ones(3), "beta": np.zeros(3), "running_mean": np.zeros(3), "running_var": np.ones(3)}
    args[name] = np.ones(2)
    with pytest.raises(ValueError, match=rf"{name} has shape \(2,\) but x has 3 channels"):
        numpy_bn.inference(np.ones((4, 3)), **args)


def test_channel_mismatch_with_num_features():
    layer = numpy_bn.BatchNorm(3)
    with pytest.raises(ValueError, match=r"expected 3 channels \(num_features\), got input with 4 channels"):
        layer.forward(np.ones((5, 4)))
    with pytest.raises(ValueError, match=r"expected 3 channels"):
        layer.forward(np.ones((5, 2, 2, 2)), training=False)


@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1), (1, 3, 1, 1), (0, 3)])
def test_one_value_per_channel_in_training(shape):
    x = np.ones(shape)
    with pytest.raises(ValueError, match=rf"more than 1 value per channel.*{shape[0]} values? per channel"):
        numpy_bn.forward(x, np.ones(3), np.zeros(3))
    layer = numpy_bn.BatchNorm(3)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer.forward(x)
    assert layer.num_batches_tracked == 0  # a refused batch leaves the running statistics alone
    if shape[0] == 1:
        assert layer.forward(x, training=False).shape == shape  # inference works for any batch size


def test_dy_of_the_wrong_shape():
    _, cache = numpy_bn.forward(np.arange(6.0).reshape(3, 2), np.ones(2), np.zeros(2))
    with pytest.raises(ValueError, match=r"dy has shape \(2, 3\) but the forward input had shape \(3, 2\)"):
        numpy_bn.backward(np.ones((2, 3)), cache)


@pytest.mark.parametrize("eps", [-1e-5, float("nan"), "1e-5", True])
def test_bad_eps(eps):
    with pytest.raises(ValueError, match="eps must be a non-negative number"):
        numpy_bn.forward(np.ones((3, 2)), np.ones(2), np.zeros(2), eps=eps)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_features": 0}, "num_features must be a positive integer"),
        ({"num_features": 2.0}, "num_features must be a positive integer"),
        ({"num_features": True}, "num_features must be a positive integer"),
        ({"num_features": 2, "momentum": 1.5}, "momentum must be a number in"),
        ({"num_features": 2, "momentum": "0.1"}, "momentum must be a number in"),
    ],
)
def test_bad_layer_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        numpy_bn.BatchNorm(**kwargs)


def test_layer_backward_needs_a_training_forward():
    layer = numpy_bn.BatchNorm(2)
    with pytest.raises(RuntimeError, match="training-mode forward"):
        layer.backward(np.ones((3, 2)))
    x = np.arange(6.0).reshape(3, 2)
    layer.forward(x)
    layer.backward(np.ones((3, 2)))
    layer.forward(x, training=False)
    with pytest.raises(RuntimeError, match="eval mode"):
        layer.backward(np.ones((3, 2)))


def test_inference_accepts_a_batch_of_one_and_matches_the_formula():
    x = np.array([[1.0, -2.0]])
    y = numpy_bn.inference(x, np.array([2.0, 1.0]), np.array([0.5, 0.0]), np.array([0.0, -1.0]), np.array([4.0, 1.0]),
                           eps=0.0)
    np.testing.assert_allclose(y, [[2.0 * 1.0 / 2.0 + 0.5, -1.0]])
