"""bnnotes.torch_bn against PyTorch's own batch normalization (the reference, used only here and in the benchmark)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from bnnotes import torch_bn
from bnnotes.torch_bn import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchNormFunction,
    batch_norm,
    convert_batchnorm,
    to_torch_batchnorm,
)
from conftest import DEVICES

TOL = 1e-10
SHAPES = [(16, 5), (8, 4, 7), (6, 3, 5, 4), (4, 3, 3, 2, 4)]  # 2-D, 3-D, 4-D and 5-D
TORCH_FOR = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
OURS_FOR = {2: BatchNorm1d, 3: BatchNorm1d, 4: BatchNorm2d, 5: BatchNorm3d}
UNIT_ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def make_case(shape, seed, dtype=torch.float64, device="cpu"):
    """Channels with different scales and offsets, non-trivial gamma and beta, and a non-uniform dy.

    Returns (x, gamma, beta, dy). A constant dy would give dx = 0 and hide bugs, so its rows are scaled differently.
    """
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    view = (1, -1) + (1,) * (len(shape) - 2)
    scales = torch.logspace(-1, 1, c, dtype=torch.float64).view(view)
    offsets = torch.linspace(-3, 3, c, dtype=torch.float64).view(view)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scales + offsets
    gamma = 1.0 + 0.5 * torch.randn(c, generator=g, dtype=torch.float64)
    beta = torch.randn(c, generator=g, dtype=torch.float64)
    row_weights = torch.linspace(0.5, 2.0, shape[0], dtype=torch.float64).view((-1,) + (1,) * (len(shape) - 1))
    dy = torch.randn(shape, generator=g, dtype=torch.float64) * row_weights
    return [t.to(device=device, dtype=dtype) for t in (x, gamma, beta, dy)]


def leaf(t):
    return t.detach().clone().requires_grad_(True)


def grads(outputs, inputs, dy):
    """Gradients of <outputs, dy> with respect to those inputs that are tensors (None elsewhere)."""
    present = [t for t in inputs if t is not None]
    found = iter(torch.autograd.grad(outputs, present, dy))
    return [next(found) if t is not None else None for t in inputs]


def assert_close(actual, expected, tol=TOL):
    if expected is None:
        assert actual is None
        return
    torch.testing.assert_close(actual, expected, rtol=0, atol=tol)


def torch_and_ours(ndim, num_features, **kwargs):
    """A torch.nn BN layer and a bnnotes one with the same arguments and state, in float64."""
    reference = TORCH_FOR[ndim](num_features, dtype=torch.float64, **kwargs)
    ours = OURS_FOR[ndim](num_features, dtype=torch.float64, **kwargs)
    ours.load_state_dict(reference.state_dict())
    return reference, ours


# --- exact agreement with torch in float64 -------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("affine", [True, False])
def test_functional_training_matches_torch(shape, affine):
    x, gamma, beta, dy = make_case(shape, seed=1)
    c = shape[1]
    params = (leaf(gamma), leaf(beta)) if affine else (None, None)
    params_ref = (leaf(gamma), leaf(beta)) if affine else (None, None)
    stats = [torch.randn(c, dtype=torch.float64), torch.rand(c, dtype=torch.float64) + 0.5]
    stats_ref = [s.clone() for s in stats]
    xt, x_ref = leaf(x), leaf(x)
    for step in range(3):  # the running statistics after several steps
        y = batch_norm(xt, *stats, *params, training=True, momentum=0.3, eps=1e-3)
        y_ref = F.batch_norm(x_ref, *stats_ref, *params_ref, training=True, momentum=0.3, eps=1e-3)
        assert_close(y, y_ref)
        for ours, theirs in zip(grads(y, (xt, *params), dy), grads(y_ref, (x_ref, *params_ref), dy)):
            assert_close(ours, theirs)
        assert_close(stats[0], stats_ref[0])
        assert_close(stats[1], stats_ref[1])


@pytest.mark.parametrize("shape", SHAPES)
def test_functional_eval_matches_torch_outputs_and_gradients(shape):
    x, gamma, beta, dy = make_case(shape, seed=2)
    c = shape[1]
    running_mean, running_var = torch.randn(c, dtype=torch.float64), torch.rand(c, dtype=torch.float64) + 0.5
    inputs, inputs_ref = [leaf(t) for t in (x, gamma, beta)], [leaf(t) for t in (x, gamma, beta)]
    y = batch_norm(inputs[0], running_mean, running_var, *inputs[1:], training=False, eps=1e-3)
    y_ref = F.batch_norm(inputs_ref[0], running_mean, running_var, *inputs_ref[1:], training=False, eps=1e-3)
    assert_close(y, y_ref)
    for ours, theirs in zip(grads(y, inputs, dy), grads(y_ref, inputs_ref, dy)):
        assert_close(ours, theirs)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("momentum", [0.1, 0.7, None])
@pytest.mark.parametrize("affine,track_running_stats", [(True, True), (False, True), (True, False)])
def test_module_matches_torch_over_training_steps_and_eval(shape, momentum, affine, track_running_stats):
    ndim, c = len(shape), shape[1]
    reference, ours = torch_and_ours(ndim, c, momentum=momentum, affine=affine,
                                     track_running_stats=track_running_stats)
    if affine:
        _, gamma, beta, _ = make_case(shape, seed=3)
        with torch.no_grad():
            for layer in (reference, ours):
                layer.weight.copy_(gamma)
                layer.bias.copy_(beta)
    assert list(ours.state_dict()) == list(reference.state_dict())
    for step in range(4):
        x, _, _, dy = make_case(shape, seed=10 + step)
        x_ours, x_ref = leaf(x), leaf(x)
        y, y_ref = ours(x_ours), reference(x_ref)
        assert_close(y, y_ref)
        y.backward(dy)
        y_ref.backward(dy)
        assert_close(x_ours.grad, x_ref.grad)
        if affine:
            assert_close(ours.weight.grad, reference.weight.grad)
            assert_close(ours.bias.grad, reference.bias.grad)
        for key, value in reference.state_dict().items():
            assert_close(ours.state_dict()[key], value)
    for layer in (ours, reference):
        layer.eval()
    x, _, _, dy = make_case(shape, seed=99)
    x_ours, x_ref = leaf(x), leaf(x)
    y, y_ref = ours(x_ours), reference(x_ref)
    assert_close(y, y_ref)
    y.backward(dy)
    y_ref.backward(dy)
    assert_close(x_ours.grad, x_ref.grad)
    for key, value in reference.state_dict().items():
        assert_close(ours.state_dict()[key], value)


def test_track_running_stats_switched_off_after_training_follows_torch():
    """torch keeps using the running buffers in eval once they exist, and stops updating them in training."""
    reference, ours = torch_and_ours(2, 3)
    x, _, _, _ = make_case((8, 3), seed=4)
    reference(x), ours(x)
    for layer in (reference, ours):
        layer.track_running_stats = False
    for mode in ("train", "eval"):
        for layer in (reference, ours):
            getattr(layer, mode)()
        assert_close(ours(x), reference(x))
        for key, value in reference.state_dict().items():
            assert_close(ours.state_dict()[key], value)


def test_empty_batch_follows_torch():
    reference, ours = torch_and_ours(4, 3)
    x = torch.empty(0, 3, 2, 2, dtype=torch.float64)
    x_ours, x_ref = leaf(x), leaf(x)
    y, y_ref = ours(x_ours), reference(x_ref)
    assert y.shape == y_ref.shape == (0, 3, 2, 2)
    (2 * y).sum().backward()
    (2 * y_ref).sum().backward()
    assert_close(ours.weight.grad, reference.weight.grad)
    for key, value in reference.state_dict().items():
        assert_close(ours.state_dict()[key], value)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 7),
    c=st.integers(1, 4),
    spatial=st.lists(st.integers(1, 3), max_size=3),
    eps=st.sampled_from([0.0, 1e-5, 1e-3, 0.5]),
    momentum=st.floats(0.0, 1.0),
    affine=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_functional_matches_torch(n, c, spatial, eps, momentum, affine, seed):
    shape = (n, c, *spatial)
    x, gamma, beta, dy = make_case(shape, seed=seed)
    if n * torch.Size(spatial).numel() == 1:
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            batch_norm(x, None, None, training=True)
        return
    eps = eps or 1e-12  # eps = 0 is fine unless a channel is constant; keep it positive
    params = [leaf(gamma), leaf(beta)] if affine else [None, None]
    params_ref = [leaf(gamma), leaf(beta)] if affine else [None, None]
    stats = [torch.randn(c, dtype=torch.float64), torch.rand(c, dtype=torch.float64) + 0.5]
    stats_ref = [s.clone() for s in stats]
    xt, x_ref = leaf(x), leaf(x)
    y = batch_norm(xt, *stats, *params, training=True, momentum=momentum, eps=eps)
    y_ref = F.batch_norm(x_ref, *stats_ref, *params_ref, training=True, momentum=momentum, eps=eps)
    # Relative to the output's scale: with a tiny eps, a near-constant channel is amplified in both.
    scale = max(1.0, float(y_ref.detach().abs().max()))
    assert_close(y, y_ref, TOL * scale)
    for ours, theirs in zip(grads(y, (xt, *params), dy), grads(y_ref, (x_ref, *params_ref), dy)):
        if ours is not None:
            assert_close(ours, theirs, TOL * max(1.0, float(theirs.abs().max())))
    for ours, theirs in zip(stats, stats_ref):
        assert_close(ours, theirs, TOL * max(1.0, float(theirs.abs().max())))
    y_eval = batch_norm(x, *stats, *[p if p is None else p.detach() for p in params], training=False, eps=eps)
    y_eval_ref = F.batch_norm(x, *stats_ref, *[p if p is None else p.detach() for p in params_ref], eps=eps)
    assert_close(y_eval, y_eval_ref, TOL * max(1.0, float(y_eval_ref.abs().max())))


@pytest.mark.parametrize("memory_format", ["channels_last", "transposed"])
def test_non_contiguous_inputs_match_torch(memory_format):
    x, gamma, beta, dy = make_case((6, 4, 5, 3), seed=5)
    if memory_format == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    else:
        x = x.transpose(2, 3).contiguous().transpose(2, 3)
    assert not x.is_contiguous()
    inputs, inputs_ref = [leaf(t) for t in (x, gamma, beta)], [leaf(t) for t in (x, gamma, beta)]
    y = batch_norm(inputs[0], None, None, *inputs[1:], training=True)
    y_ref = F.batch_norm(inputs_ref[0], None, None, *inputs_ref[1:], training=True)
    assert_close(y, y_ref)
    for ours, theirs in zip(grads(y, inputs, dy), grads(y_ref, inputs_ref, dy)):
        assert_close(ours, theirs)


# --- gradients ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5, 3), (4, 2, 3), (3, 2, 2, 3), (2, 2, 2, 1, 2)])
@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck_and_gradgradcheck(shape, affine):
    x, gamma, beta, _ = make_case(shape, seed=6)
    inputs = (leaf(x), leaf(gamma) if affine else None, leaf(beta) if affine else None)

    def f(x, weight, bias):
        return BatchNormFunction.apply(x, weight, bias, 1e-3)[0]

    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


@pytest.mark.parametrize("shape", [(9, 3), (5, 3, 4, 2)])
def test_second_derivatives_match_torch(shape):
    """A gradient penalty differentiates the backward itself; torch's BN supports that, and so does ours."""
    x, gamma, beta, dy = make_case(shape, seed=7)
    results = []
    for bn in (batch_norm, F.batch_norm):
        inputs = [leaf(t) for t in (x, gamma, beta)]
        y = bn(inputs[0], None, None, inputs[1], inputs[2], training=True, eps=1e-3)
        (grad_x,) = torch.autograd.grad((y * dy).sum() + (y**3).sum(), inputs[0], create_graph=True)
        results.append(torch.autograd.grad((grad_x**2).sum(), inputs))
    for ours, theirs in zip(*results):
        assert_close(ours, theirs, 1e-9)


@pytest.mark.parametrize("shape", SHAPES)
def test_gradient_is_orthogonal_to_one_and_to_x_hat(shape):
    """Per channel, sum(dx) = 0 and sum(dx * x_hat) = 0 (the latter is x_hat's scale invariance, exact for eps = 0)."""
    x, gamma, beta, dy = make_case(shape, seed=8)
    xt = leaf(x)
    y, batch_mean, batch_var = BatchNormFunction.apply(xt, gamma, beta, 0.0)
    y.backward(dy)
    dims = [0] + list(range(2, len(shape)))
    view = (1, -1) + (1,) * (len(shape) - 2)
    x_hat = (x - batch_mean.view(view)) / batch_var.sqrt().view(view)
    size = dy.abs().sum(dim=dims) * x_hat.abs().amax(dim=dims)
    assert torch.all(xt.grad.sum(dim=dims).abs() <= 1e-12 * size)
    assert torch.all((xt.grad * x_hat).sum(dim=dims).abs() <= 1e-12 * size)
    assert torch.all(xt.grad.abs().sum(dim=dims) > 1e-2 * size), "a zero gradient would pass the invariants"


def test_only_requested_gradients_are_computed():
    x, gamma, beta, dy = make_case((6, 3, 2), seed=9)
    weight = leaf(gamma)
    y, _, _ = BatchNormFunction.apply(x, weight, beta, 1e-5)  # x and bias do not require grad
    y.backward(dy)
    reference = leaf(gamma)
    F.batch_norm(x, None, None, reference, beta, training=True).backward(dy)
    assert_close(weight.grad, reference.grad)


# --- precision ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("params_dtype", ["input", "float32"])
def test_half_precision_is_computed_in_float32_and_returned_in_its_dtype(dtype, params_dtype):
    """Each output element is the float64 result rounded to the input's dtype (error <= one unit roundoff, plus
    float32 arithmetic noise): the statistics are not themselves computed in half precision."""
    shape = (64, 4, 3)
    x, gamma, beta, dy = make_case(shape, seed=10)
    x_low, dy_low = x.to(dtype), dy.to(dtype)
    layer = BatchNorm1d(4, momentum=0.5)
    if params_dtype == "input":
        layer = layer.to(dtype)
    with torch.no_grad():
        layer.weight.copy_(gamma)
        layer.bias.copy_(beta)
    xt = leaf(x_low)
    y = layer(xt)
    y.backward(dy_low)
    assert y.dtype == dtype and xt.grad.dtype == dtype
    assert layer.weight.grad.dtype == layer.weight.dtype

    # float64 reference on exactly the same (rounded) values and parameters
    x_ref, g_ref, b_ref = leaf(x_low.double()), leaf(layer.weight.detach().double()), leaf(layer.bias.detach().double())
    y_ref = F.batch_norm(x_ref, None, None, g_ref, b_ref, training=True)
    y_ref.backward(dy_low.double())
    u = UNIT_ROUNDOFF[dtype]
    for ours, theirs in ((y, y_ref), (xt.grad, x_ref.grad)):
        error = (ours.double() - theirs).abs()
        assert torch.all(error <= u * theirs.abs() + 1e-5 * theirs.abs().max()), float(error.max())
    # The parameter gradient is rounded to the parameters' dtype (float32 here, or the half dtype).
    u_params = UNIT_ROUNDOFF.get(layer.weight.dtype, 0.0)
    torch.testing.assert_close(layer.weight.grad.double(), g_ref.grad, rtol=u_params + 1e-5, atol=1e-5)
    running_mean_ref = 0.5 * x_low.double().mean(dim=(0, 2))
    assert (layer.running_mean.double() - running_mean_ref).abs().max() <= 2 * u * running_mean_ref.abs().max()


def test_float32_far_from_zero_is_accurate():
    """Mean 1e4, std 1: the normalized float32 output is within 5e-3 of float64 on the same values."""
    x64 = torch.randn(1024, 3, generator=torch.Generator().manual_seed(11), dtype=torch.float64) + 1e4
    x32 = x64.float()
    y = batch_norm(x32, None, None, training=True)
    y_ref = F.batch_norm(x32.double(), None, None, training=True)
    error = float((y.double() - y_ref).abs().max())
    assert error < 5e-3
    # The test can fail: the one-pass variance E[x^2] - E[x]^2 in float32 is far off on the same data.
    naive_var = (x32 * x32).mean(0) - x32.mean(0) ** 2
    naive = (x32 - x32.mean(0)) / torch.sqrt(naive_var.clamp_min(0) + 1e-5)
    assert float((naive.double() - y_ref).abs().max()) > 100 * error


# --- state_dict, conversion ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("ndim", [2, 4, 5])
@pytest.mark.parametrize("affine,track_running_stats", [(True, True), (False, True), (True, False), (False, False)])
def test_state_dict_round_trips_with_torch_both_ways(ndim, affine, track_running_stats):
    shape = {2: (8, 3), 4: (4, 3, 2, 2), 5: (2, 3, 2, 2, 2)}[ndim]
    kwargs = {"affine": affine, "track_running_stats": track_running_stats}
    trained = TORCH_FOR[ndim](3, momentum=0.3, dtype=torch.float64, **kwargs)
    if affine:
        with torch.no_grad():
            trained.weight.uniform_(0.5, 1.5)
            trained.bias.uniform_(-1, 1)
    for step in range(3):
        trained(make_case(shape, seed=step)[0])
    ours = OURS_FOR[ndim](3, momentum=0.3, dtype=torch.float64, **kwargs)
    ours.load_state_dict(trained.state_dict())  # strict: the same keys
    back = TORCH_FOR[ndim](3, momentum=0.3, dtype=torch.float64, **kwargs)
    back.load_state_dict(ours.state_dict())
    assert list(ours.state_dict()) == list(trained.state_dict()) == list(back.state_dict())
    x = make_case(shape, seed=20)[0]
    for mode in ("eval", "train"):
        for layer in (trained, ours, back):
            getattr(layer, mode)()
        assert_close(ours(x), trained(x))
        assert_close(back(x), trained(x))


def test_old_checkpoints_without_num_batches_tracked_load_like_torch():
    """torch fills in num_batches_tracked for checkpoints older than version 2, and only for those."""
    reference, ours = torch_and_ours(2, 3)
    for layer in (reference, ours):
        layer(make_case((8, 3), seed=0)[0])
    state = {k: v for k, v in reference.state_dict().items() if k != "num_batches_tracked"}  # no version metadata
    for layer in (reference, ours):
        layer.load_state_dict(state)
        assert int(layer.num_batches_tracked) == 1  # kept, as torch does
    fresh_reference, fresh_ours = torch_and_ours(2, 3)
    for layer in (fresh_reference, fresh_ours):
        layer.load_state_dict(state)
        assert int(layer.num_batches_tracked) == 0
        assert_close(layer.running_mean, reference.running_mean)
    versioned = reference.state_dict()
    del versioned["num_batches_tracked"]  # a version-2 checkpoint that lost the key: an error in both
    for layer in (reference, ours):
        with pytest.raises(RuntimeError, match="Missing key.*num_batches_tracked"):
            layer.load_state_dict(versioned)
    with pytest.raises(RuntimeError, match="Missing key.*num_batches_tracked"):
        BatchNorm1d(3).load_state_dict(versioned)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.norm = nn.BatchNorm2d(3)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5), nn.BatchNorm1d(5, momentum=None))


def _block_forward(block, x):
    return block.head(F.relu(block.norm(block.conv(x))))


def test_convert_batchnorm_both_ways_keeps_state_mode_dtype_and_requires_grad():
    torch.manual_seed(0)
    block = _Block().double()
    block.head[2].weight.requires_grad_(False)
    x = torch.randn(6, 2, 4, 4, dtype=torch.float64)
    _block_forward(block, x)  # some running statistics
    block.head[2].eval()
    reference = copy.deepcopy(block)
    weight_before = block.norm.weight
    optimizer = torch.optim.SGD(block.parameters(), lr=0.1)

    converted = convert_batchnorm(block)
    assert converted is block
    assert type(block.norm) is BatchNorm2d and type(block.head[2]) is BatchNorm1d
    assert block.norm.weight is weight_before, "the very same Parameter, so existing optimizers keep working"
    assert block.head[2].momentum is None and not block.head[2].training and block.norm.training
    assert not block.head[2].weight.requires_grad and block.norm.weight.requires_grad
    assert block.norm.running_mean.dtype == torch.float64
    for key, value in reference.state_dict().items():
        assert_close(block.state_dict()[key], value)
    y, y_ref = _block_forward(block, x), _block_forward(reference, x)
    assert_close(y, y_ref)
    y.sum().backward()
    optimizer.step()  # the optimizer built before the swap updates the converted layer's parameters
    assert not torch.equal(block.norm.weight, reference.norm.weight)

    back = to_torch_batchnorm(block)
    assert type(back.norm) is nn.BatchNorm2d and type(back.head[2]) is nn.BatchNorm1d
    assert back.norm.weight is weight_before and not back.head[2].training
    root = convert_batchnorm(nn.BatchNorm1d(4))
    assert type(root) is BatchNorm1d, "a root BN layer is replaced and returned"


@pytest.mark.parametrize("device", DEVICES)
def test_convert_batchnorm_keeps_device(device):
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, affine=False)).to(device)
    converted = convert_batchnorm(model)
    assert converted[1].running_var.device.type == torch.device(device).type
    x = torch.randn(5, 3, device=device)
    assert converted(x).device.type == torch.device(device).type


# --- bad input ------------------------------------------------------------------------------------------------------


def test_bad_input_gets_clear_errors():
    x = torch.randn(8, 3)
    with pytest.raises(ValueError, match=r"shape \(N, C\) or \(N, C, \*spatial\), got 1-D input of shape \(8,\)"):
        batch_norm(torch.randn(8), None, None, training=True)
    with pytest.raises(ValueError, match=r"0-D"):
        batch_norm(torch.tensor(1.0), None, None, training=True)
    for name, position in (("running_mean", 1), ("running_var", 2), ("weight", 3), ("bias", 4)):
        args = [x, torch.zeros(3), torch.ones(3), torch.ones(3), torch.zeros(3)]
        args[position] = torch.ones(4)
        with pytest.raises(ValueError, match=rf"{name} has shape \(4,\) but input has 3 channels.*expected \(3,\)"):
            batch_norm(*args, training=True)
    with pytest.raises(ValueError, match=r"running_mean has shape \(3, 1\)"):
        batch_norm(x, torch.zeros(3, 1), torch.ones(3), training=True)
    with pytest.raises(ValueError, match=r"Expected more than 1 value per channel when training.*\[1, 3\]"):
        batch_norm(torch.randn(1, 3), None, None, training=True)
    with pytest.raises(ValueError, match=r"Expected more than 1 value per channel when training.*\[1, 3, 1\]"):
        BatchNorm1d(3)(torch.randn(1, 3, 1))
    BatchNorm1d(3).eval()(torch.randn(1, 3))  # one example is fine at inference
    with pytest.raises(TypeError, match=r"floating-point tensor, got dtype torch.int64"):
        batch_norm(torch.ones(4, 3, dtype=torch.long), None, None, training=True)
    with pytest.raises(TypeError, match=r"floating-point tensor, got dtype torch.complex64"):
        BatchNorm1d(3)(torch.ones(4, 3, dtype=torch.complex64))
    with pytest.raises(TypeError, match=r"weight must be a torch.Tensor or None, got list"):
        batch_norm(x, None, None, [1.0, 1.0, 1.0], training=True)
    with pytest.raises(TypeError, match=r"input must be a torch.Tensor, got ndarray"):
        BatchNorm1d(3)(x.numpy())
    with pytest.raises(TypeError, match=r"momentum must be a float, got NoneType"):
        batch_norm(x, torch.zeros(3), torch.ones(3), training=True, momentum=None)
    with pytest.raises(ValueError, match=r"running_mean and running_var are required when training=False"):
        batch_norm(x, None, None, training=False)
    with pytest.raises(ValueError, match=r"BatchNorm1d\(3\) expected 3 channels, got input with 4 channels"):
        BatchNorm1d(3)(torch.randn(8, 4))
    with pytest.raises(ValueError, match=r"BatchNorm2d\(3\) expected 3 channels, got input with 2 channels"):
        BatchNorm2d(3)(torch.randn(8, 2, 4, 4))
    with pytest.raises(ValueError, match=r"BatchNorm1d expected 2-D or 3-D input.*got 4-D"):
        BatchNorm1d(3)(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"BatchNorm2d expected 4-D input \(N, C, H, W\), got 3-D"):
        BatchNorm2d(3)(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match=r"BatchNorm3d expected 5-D input \(N, C, D, H, W\), got 4-D"):
        BatchNorm3d(3)(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"num_features must be a positive integer, got 0"):
        BatchNorm1d(0)
    with pytest.raises(ValueError, match=r"momentum must be a number in \[0, 1\] or None, got -0.1"):
        BatchNorm2d(3, momentum=-0.1)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_vectors_on_another_device_are_refused():
    with pytest.raises(ValueError, match=r"weight is on cpu but input is on cuda:0"):
        batch_norm(torch.randn(4, 3, device="cuda"), None, None, torch.ones(3), training=True)


# --- devices --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(32, 6), (8, 6, 5, 4), (4, 6, 3, 4, 5)])
def test_matches_torch_on_device(device, shape):
    """float32 on the device against torch's own BN on the same device (cuDNN on CUDA), train then eval."""
    x, gamma, beta, dy = make_case(shape, seed=12, dtype=torch.float32, device=device)
    reference = TORCH_FOR[len(shape)](shape[1], momentum=0.2).to(device)
    ours = OURS_FOR[len(shape)](shape[1], momentum=0.2).to(device)
    with torch.no_grad():
        for layer in (reference, ours):
            layer.weight.copy_(gamma)
            layer.bias.copy_(beta)
    for mode in ("train", "eval"):
        for layer in (reference, ours):
            getattr(layer, mode)()
        x_ours, x_ref = leaf(x), leaf(x)
        y, y_ref = ours(x_ours), reference(x_ref)
        y.backward(dy)
        y_ref.backward(dy)
        assert y.device == x.device and x_ours.grad.device == x.device
        torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours.weight.grad, reference.weight.grad, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(ours.running_var, reference.running_var, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_on_device(device, dtype):
    x, gamma, beta, dy = make_case((16, 4, 6), seed=13, dtype=dtype, device=device)
    layer = BatchNorm1d(4).to(device)
    xt = leaf(x)
    y = layer(xt)
    y.backward(dy)
    assert y.dtype == dtype and xt.grad.dtype == dtype and y.device == x.device
    y_ref = F.batch_norm(x.double().cpu(), None, None, training=True)
    assert torch.all((y.double().cpu() - y_ref).abs() <= UNIT_ROUNDOFF[dtype] * y_ref.abs() + 1e-5)


# --- torch's BN kernels are never used ------------------------------------------------------------------------------


class _OpLog(TorchDispatchMode):
    """Records the name of every ATen operator that runs, forward and backward."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.name())
        return func(*args, **(kwargs or {}))


def _exercise_every_layer():
    from bnnotes.renorm import BatchRenorm1d, BatchRenorm2d

    layers = [
        (BatchNorm1d(3), (6, 3)), (BatchNorm1d(3), (6, 3, 4)), (BatchNorm2d(3), (4, 3, 2, 2)),
        (BatchNorm3d(3), (2, 3, 2, 2, 2)), (BatchNorm2d(3, track_running_stats=False), (4, 3, 2, 2)),
        (BatchRenorm1d(3, r_max=2.0, d_max=1.0), (6, 3)), (BatchRenorm2d(3), (4, 3, 2, 2)),
        (convert_batchnorm(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))), (6, 3)),
    ]
    for layer, shape in layers:
        for mode in ("train", "eval"):
            getattr(layer, mode)()
            x = torch.randn(shape, requires_grad=True)
            layer(x).pow(2).sum().backward()
    x = torch.randn(5, 3, requires_grad=True)
    (grad,) = torch.autograd.grad(batch_norm(x, None, None, training=True).pow(3).sum(), x, create_graph=True)
    grad.sum().backward()
    # The other variants, torch's bias=False, and the torch.func / batched-gradient paths.
    from bnnotes.ghost import GhostBatchNorm2d
    from bnnotes.lp_norm import LpBatchNorm1d

    for layer, shape in ((GhostBatchNorm2d(3, virtual_batch_size=2), (4, 3, 2, 2)), (LpBatchNorm1d(3, p=2), (6, 3)),
                         (BatchNorm2d(3, bias=False), (4, 3, 2, 2))):
        for mode in ("train", "eval"):
            getattr(layer, mode)()
            layer(torch.randn(shape, requires_grad=True)).pow(2).sum().backward()
    weight = torch.ones(3, requires_grad=True)
    y = batch_norm(x, None, None, weight, None, training=True)
    torch.autograd.grad(y, (x, weight), torch.randn(2, 5, 3), is_grads_batched=True)
    xs = torch.randn(2, 5, 3)
    torch.func.vmap(torch.func.grad(lambda x: batch_norm(x, None, None, weight, None, training=True).pow(3).sum()))(xs)
    torch.func.jvp(lambda x: batch_norm(x, None, None, weight, None, training=True), (xs[0],), (xs[1],))


def test_torch_batch_norm_kernels_are_never_called(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("bnnotes called one of torch's batch-norm kernels")

    for owner, name in ((F, "batch_norm"), (torch, "batch_norm"), (torch, "native_batch_norm"),
                        (torch, "_native_batch_norm_legit"), (torch, "cudnn_batch_norm")):
        if hasattr(owner, name):
            monkeypatch.setattr(owner, name, forbidden)
    _exercise_every_layer()


def test_no_batch_norm_operator_reaches_the_dispatcher():
    """Stronger than patching Python names: no ATen batch-norm operator runs at all, forward or backward."""
    with _OpLog() as log:
        _exercise_every_layer()
    assert not [name for name in log.names if "batch_norm" in name]
    assert any("mv" in name for name in log.names) and any("addcmul_" in name for name in log.names), (
        "the log must see the backward's operators for this test to mean anything"
    )


def test_exports_and_module_docs_without_a_facade():
    """torch_bn is one module, not a facade: the variants live in their own modules, which its docstring names."""
    for name in ("bnnotes.renorm", "bnnotes.sync", "bnnotes.ghost", "bnnotes.lp_norm", "bnnotes.convert",
                 "bnnotes._core"):
        assert name in torch_bn.__doc__
    assert not hasattr(torch_bn, "__getattr__"), "no lazy re-exports: they needed an import cycle"
    with pytest.raises(AttributeError, match="has no attribute 'BatchRenorm1d'"):
        torch_bn.BatchRenorm1d  # noqa: B018
    namespace: dict = {}
    exec("from bnnotes.torch_bn import *", namespace)
    assert set(torch_bn.__all__) <= set(namespace)
