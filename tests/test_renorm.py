"""Batch Renormalization (bnnotes.renorm) against a float64 transcription of Algorithm 1 of Ioffe (2017)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from bnnotes import renorm
from bnnotes.renorm import BatchRenorm1d, BatchRenorm2d, BatchRenormFunction, batch_renorm, renorm_schedule
from conftest import DEVICES

TOL = 1e-10


def algorithm1(x, gamma, beta, mu, sigma, r_max, d_max, eps):
    """Algorithm 1 of Ioffe (2017), line by line, with autograd over composed ops (the reference).

    x: (N, C, *spatial) float64; gamma, beta, mu, sigma: (C,). Returns (y, mu_B, sigma_B, r, d).
    """
    dims = [0] + list(range(2, x.dim()))
    shape = (1, -1) + (1,) * (x.dim() - 2)
    mu_b = x.mean(dim=dims)
    sigma_b = torch.sqrt(((x - mu_b.view(shape)) ** 2).mean(dim=dims) + eps)
    r = torch.clamp(sigma_b / sigma, 1.0 / r_max, r_max).detach()
    d = torch.clamp((mu_b - mu) / sigma, -d_max, d_max).detach()
    x_hat = (x - mu_b.view(shape)) / sigma_b.view(shape)
    y = gamma.view(shape) * (x_hat * r.view(shape) + d.view(shape)) + beta.view(shape)
    return y, mu_b.detach(), sigma_b.detach(), r, d


def make_case(shape, seed, dtype=torch.float64, device="cpu"):
    """Input with channels of different scales and offsets, non-trivial gamma/beta, a non-uniform dy."""
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    scales = torch.logspace(-1, 1, c, dtype=torch.float64)
    offsets = torch.linspace(-3, 3, c, dtype=torch.float64)
    view = (1, -1) + (1,) * (len(shape) - 2)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scales.view(view) + offsets.view(view)
    gamma = 1.0 + 0.5 * torch.randn(c, generator=g, dtype=torch.float64)
    beta = torch.randn(c, generator=g, dtype=torch.float64)
    dy = torch.randn(shape, generator=g, dtype=torch.float64) * torch.linspace(0.5, 2.0, shape[0],
                                                                               dtype=torch.float64).view(
        (-1,) + (1,) * (len(shape) - 1))
    # Moving statistics near the batch's, so that some channels are clipped and some are not.
    mu = offsets + 0.5 * torch.randn(c, generator=g, dtype=torch.float64) * scales
    sigma = scales * torch.exp(0.4 * torch.randn(c, generator=g, dtype=torch.float64))
    return [t.to(device=device, dtype=dtype) for t in (x, gamma, beta, dy, mu, sigma)]


def leaf(t):
    return t.detach().clone().requires_grad_(True)


SHAPES = [(16, 5), (8, 4, 7), (6, 3, 5, 4)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("r_max,d_max", [(1.0, 0.0), (1.5, 0.5), (3.0, 5.0), (100.0, 100.0)])
def test_training_matches_algorithm1_outputs_and_gradients(shape, r_max, d_max):
    x, gamma, beta, dy, mu, sigma = make_case(shape, seed=1)
    eps = 1e-3
    x_ref, g_ref, b_ref = leaf(x), leaf(gamma), leaf(beta)
    y_ref, mu_b, sigma_b, r_ref, d_ref = algorithm1(x_ref, g_ref, b_ref, mu, sigma, r_max, d_max, eps)
    y_ref.backward(dy)

    xt, gt, bt = leaf(x), leaf(gamma), leaf(beta)
    y, batch_mean, batch_std, r, d = BatchRenormFunction.apply(xt, gt, bt, mu, sigma, r_max, d_max, eps)
    y.backward(dy)

    torch.testing.assert_close(y, y_ref, rtol=0, atol=TOL)
    torch.testing.assert_close(batch_mean, mu_b, rtol=0, atol=TOL)
    torch.testing.assert_close(batch_std, sigma_b, rtol=0, atol=TOL)
    torch.testing.assert_close(r, r_ref, rtol=0, atol=TOL)
    torch.testing.assert_close(d, d_ref, rtol=0, atol=TOL)
    torch.testing.assert_close(xt.grad, x_ref.grad, rtol=0, atol=TOL)
    torch.testing.assert_close(gt.grad, g_ref.grad, rtol=0, atol=TOL)
    torch.testing.assert_close(bt.grad, b_ref.grad, rtol=0, atol=TOL)


def test_cases_exercise_both_clipped_and_unclipped_corrections():
    """The parametrized cases above are informative only if r and d are clipped in some channels and free in others."""
    x, gamma, beta, dy, mu, sigma = make_case((16, 5), seed=1)
    _, _, _, r, d = algorithm1(x, gamma, beta, mu, sigma, 1.5, 0.5, 1e-3)
    r_clipped = (r == 1.5) | (r == 1 / 1.5)
    d_clipped = d.abs() == 0.5
    assert r_clipped.any() and not r_clipped.all()
    assert d_clipped.any() and not d_clipped.all()


@pytest.mark.parametrize("module_cls,shape", [(BatchRenorm1d, (16, 5)), (BatchRenorm1d, (8, 5, 3)),
                                              (BatchRenorm2d, (6, 5, 3, 4))])
@pytest.mark.parametrize("momentum", [0.01, 0.3, None])
def test_module_steps_running_stats_and_eval_match_algorithm1(module_cls, shape, momentum):
    """Several steps with r_max/d_max changed between steps; then eval is gamma * (x - mu) / sigma + beta."""
    eps = 1e-5
    layer = module_cls(shape[1], eps=eps, momentum=momentum, dtype=torch.float64)
    _, gamma, beta, _, _, _ = make_case(shape, seed=0)
    with torch.no_grad():
        layer.weight.copy_(gamma)
        layer.bias.copy_(beta)
    mu = torch.zeros(shape[1], dtype=torch.float64)
    sigma = torch.ones(shape[1], dtype=torch.float64)
    limits = [(1.0, 0.0), (1.2, 0.1), (2.0, 1.0), (3.0, 5.0)]
    for step, (r_max, d_max) in enumerate(limits, start=1):
        x, _, _, dy, _, _ = make_case(shape, seed=10 + step)
        layer.r_max, layer.d_max = r_max, d_max
        x_ref, g_ref, b_ref = leaf(x), leaf(gamma), leaf(beta)
        y_ref, mu_b, sigma_b, _, _ = algorithm1(x_ref, g_ref, b_ref, mu, sigma, r_max, d_max, eps)
        y_ref.backward(dy)
        weight_of_batch = 1.0 / step if momentum is None else momentum
        mu = mu + weight_of_batch * (mu_b - mu)
        sigma = sigma + weight_of_batch * (sigma_b - sigma)

        xt = leaf(x)
        layer.zero_grad()
        y = layer(xt)
        y.backward(dy)
        torch.testing.assert_close(y, y_ref, rtol=0, atol=TOL)
        torch.testing.assert_close(xt.grad, x_ref.grad, rtol=0, atol=TOL)
        torch.testing.assert_close(layer.weight.grad, g_ref.grad, rtol=0, atol=TOL)
        torch.testing.assert_close(layer.bias.grad, b_ref.grad, rtol=0, atol=TOL)
        torch.testing.assert_close(layer.running_mean, mu, rtol=0, atol=TOL)
        torch.testing.assert_close(layer.running_std, sigma, rtol=0, atol=TOL)
        assert int(layer.num_batches_tracked) == step

    layer.eval()
    state_before_eval = {k: v.clone() for k, v in layer.state_dict().items()}
    x, _, _, dy, _, _ = make_case(shape, seed=99)
    view = (1, -1) + (1,) * (len(shape) - 2)
    xt = leaf(x)
    y = layer(xt)
    y_ref = gamma.view(view) * (x - mu.view(view)) / sigma.view(view) + beta.view(view)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=TOL)
    y.backward(dy)
    torch.testing.assert_close(xt.grad, dy * (gamma / sigma).view(view), rtol=0, atol=TOL)
    # Eval leaves the moving statistics and the step counter alone.
    for key, value in layer.state_dict().items():
        torch.testing.assert_close(value, state_before_eval[key], rtol=0, atol=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_unclipped_training_output_equals_inference_output(shape):
    """The point of Batch Renorm: when r and d are not clipped, the training output is the inference output."""
    x, gamma, beta, _, mu, sigma = make_case(shape, seed=3)
    y_train, _, _, r, d = BatchRenormFunction.apply(x, gamma, beta, mu, sigma, 1e6, 1e6, 1e-5)
    y_eval = batch_renorm(x, mu, sigma, gamma, beta, training=False)
    torch.testing.assert_close(y_train, y_eval, rtol=0, atol=TOL)
    # ... while with r_max = 1, d_max = 0 it is exactly BN in training mode, output and gradients.
    x_bn, g_bn, b_bn = leaf(x), leaf(gamma), leaf(beta)
    y_bn = F.batch_norm(x_bn, None, None, g_bn, b_bn, training=True, eps=1e-5)
    xt, gt, bt = leaf(x), leaf(gamma), leaf(beta)
    y = batch_renorm(xt, mu.clone(), sigma.clone(), gt, bt, training=True, r_max=1.0, d_max=0.0)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    y_bn.backward(dy)
    y.backward(dy)
    torch.testing.assert_close(y, y_bn, rtol=0, atol=TOL)
    for ours, theirs in ((xt, x_bn), (gt, g_bn), (bt, b_bn)):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=0, atol=TOL)


@pytest.mark.parametrize("shape", [(6, 3), (4, 2, 3), (3, 2, 2, 3)])
@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck_where_the_corrections_are_clipped(shape, affine):
    """gradcheck differentiates numerically *through* r and d, which the algorithm treats as constants. Where both are
    clipped they are locally constant, so there the analytic gradient must equal the numerical one exactly."""
    x, gamma, beta, _, _, _ = make_case(shape, seed=5)
    c = shape[1]
    weight = leaf(gamma) if affine else None
    bias = leaf(beta) if affine else None
    for r_max, d_max, mu, sigma in [
        (1.0, 0.0, torch.randn(c, dtype=torch.float64), torch.rand(c, dtype=torch.float64) + 0.5),  # plain BN
        (1.5, 0.5, x.mean() + 50.0 * torch.ones(c, dtype=torch.float64), torch.full((c,), 1e-3, dtype=torch.float64)),
    ]:
        _, _, _, r, d = BatchRenormFunction.apply(x, weight, bias, mu, sigma, r_max, d_max, 1e-3)
        assert torch.all((r == r_max) | (r == 1 / r_max)) and torch.all(d.abs() == d_max)
        inputs = (leaf(x), weight, bias)
        assert torch.autograd.gradcheck(
            lambda xi, w, b: BatchRenormFunction.apply(xi, w, b, mu, sigma, r_max, d_max, 1e-3)[0], inputs
        )


@pytest.mark.parametrize("shape", SHAPES)
def test_gradient_invariants_per_channel(shape):
    """dx is orthogonal to 1 and to x_hat in every channel, whatever r and d are. (Orthogonality to x_hat is the
    scale invariance of x_hat, exact only for eps = 0.)"""
    x, gamma, beta, dy, mu, sigma = make_case(shape, seed=6)
    xt = leaf(x)
    y, batch_mean, batch_std, _, _ = BatchRenormFunction.apply(xt, gamma, beta, mu, sigma, 2.0, 1.0, 0.0)
    y.backward(dy)
    dims = [0] + list(range(2, len(shape)))
    view = (1, -1) + (1,) * (len(shape) - 2)
    x_hat = (x - batch_mean.view(view)) / batch_std.view(view)
    scale = dy.abs().sum(dim=dims)
    assert torch.all(xt.grad.sum(dim=dims).abs() <= 1e-12 * scale)
    assert torch.all((xt.grad * x_hat).sum(dim=dims).abs() <= 1e-12 * scale)
    assert torch.all(xt.grad.abs().sum(dim=dims) > 1e-3 * scale), "a zero gradient would satisfy the invariants"


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 9),
    c=st.integers(1, 4),
    spatial=st.lists(st.integers(1, 3), max_size=2),
    eps=st.sampled_from([1e-5, 1e-3, 0.1]),
    momentum=st.floats(0.0, 1.0),
    r_max=st.floats(1.0, 4.0),
    d_max=st.floats(0.0, 6.0),
    seed=st.integers(0, 2**16),
)
def test_property_functional_matches_algorithm1(n, c, spatial, eps, momentum, r_max, d_max, seed):
    shape = (n, c, *spatial)
    x, gamma, beta, dy, mu, sigma = make_case(shape, seed=seed)
    x_ref, g_ref, b_ref = leaf(x), leaf(gamma), leaf(beta)
    y_ref, mu_b, sigma_b, _, _ = algorithm1(x_ref, g_ref, b_ref, mu, sigma, r_max, d_max, eps)
    y_ref.backward(dy)
    running_mean, running_std = mu.clone(), sigma.clone()
    xt, gt, bt = leaf(x), leaf(gamma), leaf(beta)
    y = batch_renorm(xt, running_mean, running_std, gt, bt, True, momentum, eps, r_max, d_max)
    y.backward(dy)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=TOL)
    for ours, theirs in ((xt, x_ref), (gt, g_ref), (bt, b_ref)):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-10, atol=TOL)
    torch.testing.assert_close(running_mean, mu + momentum * (mu_b - mu), rtol=0, atol=TOL)
    torch.testing.assert_close(running_std, sigma + momentum * (sigma_b - sigma), rtol=0, atol=TOL)


def test_affine_false_and_state_dict():
    layer = BatchRenorm2d(3, affine=False)
    assert layer.weight is None and layer.bias is None
    assert list(layer.state_dict()) == ["running_mean", "running_std", "num_batches_tracked"]
    affine = BatchRenorm1d(3)
    assert list(affine.state_dict()) == ["weight", "bias", "running_mean", "running_std", "num_batches_tracked"]
    torch.testing.assert_close(affine.running_mean, torch.zeros(3))
    torch.testing.assert_close(affine.running_std, torch.ones(3))
    x = torch.randn(8, 3, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    layer = layer.double()
    y = layer(x)
    torch.testing.assert_close(y, F.batch_norm(x, None, None, training=True, eps=layer.eps), rtol=0, atol=TOL)
    # The state round-trips into a fresh layer, which then infers identically.
    fresh = BatchRenorm2d(3, affine=False).double()
    fresh.load_state_dict(layer.state_dict())
    torch.testing.assert_close(fresh.eval()(x), layer.eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_half_precision_returns_input_dtype_with_float32_statistics(dtype, tol):
    x, gamma, beta, dy, mu, sigma = make_case((64, 4, 3), seed=7)
    x_low = x.to(dtype)
    y_ref, *_ = algorithm1(x_low.double(), gamma, beta, mu, sigma, 2.0, 1.0, 1e-5)
    xt = leaf(x_low)
    y, batch_mean, batch_std, r, d = BatchRenormFunction.apply(xt, gamma.float(), beta.float(), mu.float(),
                                                               sigma.float(), 2.0, 1.0, 1e-5)
    assert y.dtype == dtype and batch_mean.dtype == torch.float32 and r.dtype == torch.float32
    y.backward(dy.to(dtype))
    assert xt.grad.dtype == dtype
    # Relative to the output's scale, the error is the input dtype's rounding of y, not a statistics error.
    assert (y.double() - y_ref).abs().max() <= tol * y_ref.abs().max()
    layer = BatchRenorm1d(4, r_max=2.0, d_max=1.0)
    assert layer(x_low).dtype == dtype and layer.running_std.dtype == torch.float32


def test_float32_large_mean_is_accurate():
    x = torch.randn(512, 3, generator=torch.Generator().manual_seed(8), dtype=torch.float64) + 1e4
    x32 = x.float()
    mu, sigma = torch.full((3,), 1e4), torch.ones(3)
    y = batch_renorm(x32, mu.clone(), sigma.clone(), training=True, r_max=3.0, d_max=5.0)
    y_ref, *_ = algorithm1(x32.double(), torch.ones(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64),
                           mu.double(), sigma.double(), 3.0, 5.0, 1e-5)
    assert (y.double() - y_ref).abs().max() < 5e-3


def test_limits_are_plain_attributes_read_at_every_step():
    x, *_ = make_case((32, 3), seed=9, dtype=torch.float32)
    layer = BatchRenorm1d(3)
    layer.running_std.fill_(10.0)  # far from the batch's std, so r is clipped
    layer(x)
    layer.running_std.fill_(10.0)
    layer.r_max = 4.0
    snapshot = layer.running_mean.clone(), layer.running_std.clone()
    y_wide = layer(x)
    y_expected, *_ = BatchRenormFunction.apply(x, layer.weight, layer.bias, snapshot[0], snapshot[1], 4.0, 0.0, 1e-5)
    torch.testing.assert_close(y_wide, y_expected)
    assert not torch.allclose(y_wide, F.batch_norm(x, None, None, training=True))


@pytest.mark.parametrize("device", DEVICES)
def test_runs_on_device_and_matches_cpu(device):
    x, gamma, beta, dy, mu, sigma = make_case((32, 4, 3, 3), seed=10, dtype=torch.float32)
    results = {}
    for where in ("cpu", device):
        layer = BatchRenorm2d(4, momentum=0.1, r_max=2.0, d_max=1.0).to(where)
        with torch.no_grad():
            layer.weight.copy_(gamma)
            layer.bias.copy_(beta)
            layer.running_mean.copy_(mu)
            layer.running_std.copy_(sigma)
        xt = leaf(x.to(where))
        y = layer(xt)
        y.backward(dy.to(where))
        assert y.device.type == torch.device(where).type
        results[where] = [t.cpu() for t in (y, xt.grad, layer.weight.grad, layer.running_std, layer.eval()(xt))]
    for ours, theirs in zip(results[device], results["cpu"]):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_bad_input_is_refused_with_clear_messages():
    layer = BatchRenorm1d(3)
    with pytest.raises(ValueError, match=r"expected 3 channels, got input with 4 channels"):
        layer(torch.randn(5, 4))
    with pytest.raises(ValueError, match=r"2-D or 3-D input.*got 1-D"):
        layer(torch.randn(5))
    with pytest.raises(ValueError, match=r"4-D input.*got 2-D"):
        BatchRenorm2d(3)(torch.randn(5, 3))
    with pytest.raises(TypeError, match=r"floating-point.*torch.int64"):
        layer(torch.ones(5, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"more than 1 value per channel"):
        layer(torch.randn(1, 3))
    layer.eval()(torch.randn(1, 3))  # a single example is fine at inference
    layer.train()
    layer.r_max = 0.5
    with pytest.raises(ValueError, match=r"r_max must be a finite number >= 1.*0.5"):
        layer(torch.randn(5, 3))
    layer.r_max, layer.d_max = 2.0, -1.0
    with pytest.raises(ValueError, match=r"d_max must be a finite number >= 0.*-1.0"):
        layer(torch.randn(5, 3))
    with pytest.raises(ValueError, match=r"running_std has shape \(2,\).*3 channels"):
        batch_renorm(torch.randn(5, 3), torch.zeros(3), torch.ones(2), training=True)
    with pytest.raises(ValueError, match=r"weight has shape \(4,\).*3 channels"):
        batch_renorm(torch.randn(5, 3), torch.zeros(3), torch.ones(3), torch.ones(4), training=True)
    with pytest.raises(ValueError, match=r"needs running_mean and running_std"):
        batch_renorm(torch.randn(5, 3), None, None, training=True)
    with pytest.raises(ValueError, match=r"num_features must be a positive integer, got 0"):
        BatchRenorm1d(0)
    with pytest.raises(ValueError, match=r"momentum must be a number in \[0, 1\] or None, got 1.5"):
        BatchRenorm1d(3, momentum=1.5)


def test_renorm_schedule_follows_the_paper():
    assert renorm_schedule(0) == (1.0, 0.0)
    assert renorm_schedule(5000) == (1.0, 0.0)
    assert renorm_schedule(25000) == pytest.approx((1.0 + 2.0 * 20 / 35, 5.0))
    assert renorm_schedule(40000) == (3.0, 5.0)
    assert renorm_schedule(10**6) == (3.0, 5.0)
    values = [renorm_schedule(s, warmup_steps=10, rmax_steps=50, dmax_steps=30) for s in range(0, 60)]
    r_values, d_values = zip(*values)
    assert all(a <= b for a, b in zip(r_values, r_values[1:])) and all(a <= b for a, b in zip(d_values, d_values[1:]))
    assert values[30] == (2.0, 5.0)
    assert renorm_schedule(3, warmup_steps=2, rmax_steps=2, dmax_steps=2) == (3.0, 5.0)
    with pytest.raises(ValueError, match=r"rmax_steps and dmax_steps must be >= warmup_steps"):
        renorm_schedule(0, warmup_steps=10, rmax_steps=5)
    with pytest.raises(ValueError, match=r"step must be a non-negative integer, got -1"):
        renorm_schedule(-1)


def test_double_backward_matches_algorithm1():
    """Second derivatives (e.g. a gradient penalty) agree with autograd through Algorithm 1, r and d held constant."""
    x, gamma, beta, dy, mu, sigma = make_case((7, 3, 2), seed=11)
    results = []
    for forward in (lambda *a: algorithm1(*a)[0], lambda *a: BatchRenormFunction.apply(*a)[0]):
        xt, gt, bt = leaf(x), leaf(gamma), leaf(beta)
        y = forward(xt, gt, bt, mu, sigma, 2.0, 1.0, 1e-3)
        (grad_x,) = torch.autograd.grad((y * dy).sum() + (y ** 2).sum(), xt, create_graph=True)
        penalty = (grad_x ** 2).sum()
        results.append(torch.autograd.grad(penalty, (xt, gt, bt)))
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-9)


def test_gradgradcheck_where_the_corrections_are_clipped():
    x, gamma, beta, _, _, _ = make_case((5, 2, 2), seed=12)
    mu, sigma = torch.full((2,), 50.0, dtype=torch.float64), torch.full((2,), 1e-3, dtype=torch.float64)
    assert torch.autograd.gradgradcheck(
        lambda xi, w, b: BatchRenormFunction.apply(xi, w, b, mu, sigma, 1.5, 0.5, 1e-3)[0],
        (leaf(x), leaf(gamma), leaf(beta)),
    )


def test_module_exports():
    assert set(renorm.__all__) <= set(dir(renorm))
    assert renorm.BatchRenorm1d is BatchRenorm1d and renorm.renorm_schedule is renorm_schedule
