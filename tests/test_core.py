"""bnnotes._core: the shared kernel, against PyTorch in float64; and the layering rules it exists for."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnnotes import _core as core

F64 = torch.float64
PACKAGE = Path(core.__file__).parent
#: The modules the shared core was made for (issue 14). The integrator may extend the layering test to the package.
CORE_CLIENTS = ["_core", "torch_bn", "renorm", "ghost", "lp_norm", "sync", "folding", "conventions", "numpy_bn",
                "numpy_norms", "convert"]


# --------------------------------------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("m", [2, 3, 17, np.int64(1000)])
def test_unbiased_variance_is_torch_unbiased_variance(m):
    x = torch.randn(int(m), 5, dtype=F64) * 3 + 1
    biased = x.var(dim=0, unbiased=False)
    torch.testing.assert_close(core.unbiased_variance(biased, m), x.var(dim=0, unbiased=True), rtol=1e-14, atol=0)
    assert core.bessel_factor(m) == int(m) / (int(m) - 1)


@pytest.mark.parametrize("m, error", [(1, ValueError), (0, ValueError), (2.0, TypeError), (True, TypeError)])
def test_bessel_factor_refuses_what_has_no_unbiased_variance(m, error):
    with pytest.raises(error, match="m \\(values per channel in a batch\\)"):
        core.bessel_factor(m)


@pytest.mark.parametrize("momentum", [0.0, 0.1, 0.5, 1.0])
def test_ema_is_the_running_update_of_torch_batchnorm(momentum):
    """One training step of torch's BatchNorm1d moves its running mean exactly as ema_ does (torch and NumPy)."""
    x = torch.randn(7, 4, dtype=F64) * 2 + 3
    layer = nn.BatchNorm1d(4, momentum=momentum).double()
    layer.running_mean.normal_()
    running = layer.running_mean.clone()
    layer.train()(x)
    returned = core.ema_(running, x.mean(0), momentum)
    assert returned is running, "ema_ works in place and returns its first argument"
    torch.testing.assert_close(running, layer.running_mean, rtol=1e-14, atol=1e-14)
    running_np = np.zeros(4)
    core.ema_(running_np, x.mean(0).numpy(), momentum)
    np.testing.assert_allclose(running_np, momentum * x.mean(0).numpy(), rtol=1e-14, atol=1e-15)
    low = torch.zeros(4, dtype=torch.float32)
    assert core.ema_(low, x.mean(0), momentum).dtype == torch.float32, "the batch is cast to running's dtype"


def test_step_momentum_is_torch_rule_for_momentum_none():
    """With momentum=None, torch's running mean is the plain average of the batch means: weight 1/t at step t."""
    layer = nn.BatchNorm1d(3, momentum=None).double().train()
    counter, running = torch.tensor(0), torch.zeros(3, dtype=F64)
    for step in range(4):
        x = torch.randn(5, 3, dtype=F64) + step
        layer(x)
        core.ema_(running, x.mean(0), core.step_momentum(None, counter, training=True))
    assert int(counter) == int(layer.num_batches_tracked) == 4
    torch.testing.assert_close(running, layer.running_mean, rtol=1e-14, atol=1e-14)
    assert core.step_momentum(None, counter, training=False) == 0.0 and int(counter) == 4, "eval counts nothing"
    assert core.step_momentum(0.3, None, training=True) == 0.3


# --------------------------------------------------------------------------------------------------------------------
# Shapes, dtypes, checks
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5), (2, 3, 4, 5), (2, 3, 2, 2, 2)])
def test_shapes_agree_with_torch_reductions(shape):
    x = torch.randn(shape, dtype=F64)
    dims = core.reduction_dims(x.dim())
    torch.testing.assert_close(x.mean(dim=dims), F.batch_norm(x, None, None, training=True, momentum=0.0).new_zeros(3)
                               + x.mean(dim=dims))
    assert core.values_per_channel(x) == x.numel() // 3
    assert core.per_channel(torch.arange(3.0), x.dim()).expand_as(x)[:, 2].eq(2).all()
    assert core.compute_dtype(x.half()) == torch.float32 and core.compute_dtype(x) == F64


@pytest.mark.parametrize("eps, batch_statistics", [(0.0, True), (-1.0, True), (-1.0, False)])
def test_check_eps_raises_where_torch_raises(eps, batch_statistics):
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="eps must be"):
        F.batch_norm(x, torch.zeros(3), torch.ones(3), training=batch_statistics, eps=eps)
    with pytest.raises(ValueError, match=f"got eps={eps}"):
        core.check_eps(eps, batch_statistics=batch_statistics)
    core.check_eps(0.0, batch_statistics=False)
    with pytest.raises(TypeError, match="eps must be a real number, got str"):
        core.check_eps("1e-5", batch_statistics=False)


def test_layer_checks_name_what_was_expected_and_what_arrived():
    assert core.check_layer_args(np.int64(3), 0.5) == 3
    for bad in (0, 2.0, True, "3"):
        with pytest.raises(ValueError, match="num_features must be a positive integer"):
            core.check_layer_args(bad, 0.1)
    for bad in (-0.1, 1.5, "0.1", True):
        with pytest.raises(ValueError, match=r"momentum must be a number in \[0, 1\] or None"):
            core.check_layer_args(3, bad)
    with pytest.raises(ValueError, match=r"BatchNorm1d expected 2-D or 3-D input \(N, C\) or \(N, C, L\), got 4-D "
                                         r"input of shape \(2, 3, 1, 1\)"):
        core.check_input_dim(nn.BatchNorm1d(3), torch.zeros(2, 3, 1, 1), (2, 3), "(N, C) or (N, C, L)")
    with pytest.raises(ValueError, match=r"SyncBatchNorm expected input \(N, C, \*spatial\), got 1-D"):
        core.check_input_dim(nn.SyncBatchNorm(3), torch.zeros(3), None, "(N, C, *spatial)")
    core.check_input_dim(nn.SyncBatchNorm(3), torch.zeros(2, 3, 4, 4, 4, 4), None, "(N, C, *spatial)")
    with pytest.raises(ValueError, match=r"BatchNorm2d\(3\) expected 3 channels, got input with 4 channels"):
        core.check_channels(nn.BatchNorm2d(3), torch.zeros(2, 4, 1, 1))
    with pytest.raises(core.DtypeMismatchError, match="weight has dtype torch.float32 but input has dtype"):
        core.check_input(torch.zeros(2, 3, dtype=F64), weight=torch.ones(3))
    core.check_input(torch.zeros(2, 3, dtype=torch.bfloat16), weight=torch.ones(3))  # mixed precision is allowed
    assert issubclass(core.DtypeMismatchError, RuntimeError), "torch raises RuntimeError in these cases"


def test_numpy_checks():
    assert core.check_nonnegative_eps(0) == 0.0
    for bad in (-1e-5, float("nan"), "1e-5", True):
        with pytest.raises(ValueError, match="eps must be a non-negative number"):
            core.check_nonnegative_eps(bad)
    assert core.check_dy(np.ones((2, 3), dtype=np.float32), (2, 3)).dtype == np.float64
    with pytest.raises(TypeError, match="dy must be a floating-point array, got dtype int64"):
        core.check_dy(np.ones((2, 3), dtype=np.int64), (2, 3))


# --------------------------------------------------------------------------------------------------------------------
# The computation
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(6, 3), (2, 3, 4, 5)])
def test_affine_inference_is_torch_eval_mode_batch_norm(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, dtype=F64, generator=g) * 4 + 2
    mean, var = torch.randn(3, dtype=F64, generator=g), torch.rand(3, dtype=F64, generator=g) + 0.5
    weight, bias = torch.randn(3, dtype=F64, generator=g), torch.randn(3, dtype=F64, generator=g)
    ours = core.affine_inference(x, mean, torch.rsqrt(var + 1e-5), weight, bias)
    torch.testing.assert_close(ours, F.batch_norm(x, mean, var, weight, bias, eps=1e-5), rtol=1e-13, atol=1e-13)
    half = core.affine_inference(x.half(), mean.float(), torch.rsqrt(var.float()), None, None)
    assert half.dtype == torch.float16


def test_is_plain_sees_autograd_and_vmap():
    x = torch.zeros(3)
    with torch.no_grad():
        assert core.is_plain(x)
        assert torch.func.vmap(lambda t: torch.tensor(core.is_plain(t)))(torch.zeros(2, 3)).eq(False).all()
    assert not core.is_plain(x), "autograd records outside no_grad: not plain"


def test_running_stats_norm_is_torch_batchnorm_state():
    """The base's state_dict and reset are those of torch's BatchNorm1d with the same arguments."""
    ours = core.RunningStatsNorm(4, momentum=None, affine=False)
    theirs = nn.BatchNorm1d(4, momentum=None, affine=False)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert repr(ours) == "RunningStatsNorm(4, eps=1e-05, momentum=None, affine=False, track_running_stats=True)"
    ours.running_var.fill_(3.0)
    ours.num_batches_tracked += 5
    ours.reset_running_stats()
    for name, value in ours.state_dict().items():
        assert torch.equal(value, theirs.state_dict()[name])
    with pytest.raises(ValueError, match=r"RunningStatsNorm\(4\) expected 4 channels, got input with 2 channels"):
        ours._check_forward_input(torch.zeros(3, 2))


# --------------------------------------------------------------------------------------------------------------------
# Layering: what may import what (ARCHITECTURE.md)
# --------------------------------------------------------------------------------------------------------------------


def _private_imports(path: Path) -> list[str]:
    """`from bnnotes.x import _name`, and `name._attr` for any name imported from bnnotes (a module, class or function
    of ANOTHER module): uses of another module's private names."""
    tree, me = ast.parse(path.read_text()), path.stem
    found = []
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("bnnotes"):
            source = node.module.split(".")[-1]
            for alias in node.names:
                aliases[alias.asname or alias.name] = alias.name  # a module or an object of another module
                if source != "bnnotes" and alias.name.startswith("_") and source != me:
                    found.append(f"from {node.module} import {alias.name}")
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            found.append(f"{node.value.id}.{node.attr}")
    return found


def test_no_module_imports_another_modules_private_names():
    """Every module of the package (issue 14's rule; it started with the core's clients)."""
    modules = sorted(PACKAGE.rglob("*.py"))
    assert {f"{name}.py" for name in CORE_CLIENTS} <= {path.name for path in modules}
    offences = {str(path.relative_to(PACKAGE)): _private_imports(path) for path in modules}
    offences = {name: found for name, found in offences.items() if found}
    # _core's public names are imported as such; importing a private name of _core counts as an offence too.
    assert not offences, f"private names imported across modules: {offences}"


def test_core_imports_nothing_of_bnnotes_and_torch_bn_no_variant():
    code = ("import sys, bnnotes._core; a = {m for m in sys.modules if m.startswith('bnnotes.')}; "
            "import bnnotes.torch_bn; b = {m for m in sys.modules if m.startswith('bnnotes.')}; "
            "print(sorted(a), sorted(b))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['bnnotes._core'] ['bnnotes._core', 'bnnotes.convert', 'bnnotes.torch_bn']", out


# --------------------------------------------------------------------------------------------------------------------
# The kernels of training-mode BN
# --------------------------------------------------------------------------------------------------------------------

KERNEL_SHAPES = [(16, 5), (8, 4, 7), (6, 3, 5, 4), (4, 3, 3, 2, 4)]


@pytest.mark.parametrize("shape", KERNEL_SHAPES)
@pytest.mark.parametrize("contiguous", [True, False])
def test_channel_sum_and_two_pass_statistics_are_torch_reductions(shape, contiguous):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, dtype=F64, generator=g) * 3 + 1e4  # far from zero: E[x^2] - E[x]^2 would cancel
    if not contiguous:
        x = x.transpose(0, -1).contiguous().transpose(0, -1)
    dims = core.reduction_dims(x.dim())
    torch.testing.assert_close(core.channel_sum(x, dims), x.sum(dim=dims), rtol=1e-13, atol=0)
    batch_mean, batch_var, scratch = core.batch_mean_var(x, dims, F64)
    var_ref, mean_ref = torch.var_mean(x, dim=dims, unbiased=False)
    torch.testing.assert_close(batch_mean, mean_ref, rtol=1e-14, atol=0)
    torch.testing.assert_close(batch_var, var_ref, rtol=1e-9, atol=0)
    assert scratch.shape == x.shape and scratch.dtype == F64
    half_mean, half_var, _ = core.batch_mean_var(x[:, :2].half() - 1e4, dims, torch.float32)
    assert half_mean.dtype == half_var.dtype == torch.float32


@pytest.mark.parametrize("rows", [256, 255])
def test_channel_sum_of_a_large_batch_goes_by_one_slab_per_thread(rows):
    """Large enough for torch's elementwise ops to use 2 threads: an even batch is summed in 2 slabs of rows (each
    thread the rows it writes elsewhere), an odd one by a single BLAS column sum; both agree with torch's sum."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = torch.randn(rows, 256, dtype=F64, generator=torch.Generator().manual_seed(3)) * 3 + 1e4
        assert core._slabs(rows, x.numel()) == (2 if rows % 2 == 0 else 1)
        assert core._slabs(rows, 1000) == 1  # too small to split: one thread
        torch.testing.assert_close(core.channel_sum(x, [0], 0.25), 0.25 * x.sum(dim=0), rtol=1e-13, atol=0)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("shape", KERNEL_SHAPES)
@pytest.mark.parametrize("recorded", [False, True])
def test_per_channel_affine_in_both_paths(shape, recorded):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(shape, dtype=F64, generator=g)
    scale, shift = torch.randn(shape[1], dtype=F64, generator=g), torch.randn(shape[1], dtype=F64, generator=g)
    expected = x * core.per_channel(scale, x.dim()) + core.per_channel(shift, x.dim())
    with torch.set_grad_enabled(recorded):  # recorded: autograd records, so out= is not used (is_plain is False)
        y = core.per_channel_affine(x, scale, shift, out=torch.empty_like(x))
    torch.testing.assert_close(y, expected, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("shape", KERNEL_SHAPES)
@pytest.mark.parametrize("recorded", [False, True])
@pytest.mark.parametrize("affine", [False, True])
def test_normalize_backward_is_autograd_through_torch_batch_norm(shape, recorded, affine):
    """The closed form (plain in-place path and recorded out-of-place path) against autograd through F.batch_norm."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(shape, dtype=F64, generator=g) * 2 + 5).requires_grad_()
    dy = torch.randn(shape, dtype=F64, generator=g)
    gain = (torch.rand(shape[1], dtype=F64, generator=g) + 0.5).requires_grad_() if affine else None
    bias = torch.zeros(shape[1], dtype=F64, requires_grad=True) if affine else None
    eps = 1e-5
    F.batch_norm(x, None, None, gain, bias, training=True, eps=eps).backward(dy)
    dims = core.reduction_dims(x.dim())
    var, mean = torch.var_mean(x.detach(), dim=dims, unbiased=False)
    with torch.set_grad_enabled(recorded):
        dx, sum_dy, sum_dy_x_hat = core.normalize_backward(
            dy, x.detach(), mean, torch.rsqrt(var + eps), None if gain is None else gain.detach(), eps, True)
    torch.testing.assert_close(dx, x.grad, rtol=1e-10, atol=1e-10)
    if affine:
        torch.testing.assert_close(sum_dy_x_hat, gain.grad, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(sum_dy, bias.grad, rtol=1e-10, atol=1e-10)
    with torch.no_grad():
        none, *_ = core.normalize_backward(dy, x.detach(), mean, torch.rsqrt(var + eps), None, eps, False)
    assert none is None
