"""SyncBatchNorm (bnnotes.sync): real gloo process groups of 2 and 3 processes on this machine, over loopback.

Every distributed check of one world size runs in a single launch (process start-up dominates the cost); the parent
then compares each rank's outputs, input gradients, parameter gradients and running statistics with single-process
BN (torch's, the reference) on the concatenated batch, in float64. `combine_statistics`, the one-round merge, is also
tested on its own, against the statistics of the concatenated groups.
"""

from __future__ import annotations

import inspect
import multiprocessing

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from bnnotes import torch_bn
from bnnotes import convert
from bnnotes._core import ZERO_EPS_WITH_FIXED_STATISTICS
from bnnotes.experiments.launch import launch, recorded_collectives
from bnnotes.ghost import GhostBatchNorm1d
from bnnotes.sync import (
    DistributedDataParallel,
    SyncBatchNorm,
    combine_statistics,
    convert_sync_batchnorm,
    sync_world_size,
)

TOL = 1e-10
F64 = torch.float64


def _data(shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x with channels of different scales and large offsets (mean >> spread for some), and a non-uniform dy."""
    generator = torch.Generator().manual_seed(seed)
    per_channel = (1, shape[1]) + (1,) * (len(shape) - 2)
    scale = torch.logspace(-2, 1, shape[1], dtype=F64).view(per_channel)
    offset = torch.linspace(-3, 300, shape[1], dtype=F64).view(per_channel)
    x = offset + scale * torch.randn(shape, generator=generator, dtype=F64)
    dy_scale = torch.linspace(0.5, 2, shape[1], dtype=F64).view(per_channel)
    dy = torch.randn(shape, generator=generator, dtype=F64) * dy_scale
    return x, dy


def _affine(layer: nn.Module) -> nn.Module:
    with torch.no_grad():
        if layer.weight is not None:
            layer.weight.copy_(torch.linspace(0.5, 2.0, layer.num_features))
        if layer.bias is not None:
            layer.bias.copy_(torch.linspace(-1.0, 1.0, layer.num_features))
    return layer


def _rows(sizes: tuple[int, ...], rank: int) -> slice:
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _ddp_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double()


#: torch's BN takes bias= (pytorch/pytorch#176573); older torch (2.4 included) has no such argument, so the reference
#: layers cannot be built with it there. bnnotes' SyncBatchNorm takes bias= on every torch.
TORCH_BN_TAKES_BIAS = "bias" in inspect.signature(nn.SyncBatchNorm.__init__).parameters
NO_TORCH_BN_BIAS = pytest.mark.skipif(not TORCH_BN_TAKES_BIAS,
                                      reason=f"torch {torch.__version__}'s BN layers have no bias= argument")


def _torch_validates_eps() -> bool:
    """Whether torch's BN refuses eps <= 0 in training (newer torch does; 2.4 normalizes with it)."""
    try:
        nn.BatchNorm1d(1, eps=0.0)(torch.ones(2, 1))
    except ValueError:
        return True
    return False


TORCH_VALIDATES_EPS = _torch_validates_eps()

# The cases: (name, shape of the whole batch without N, SyncBatchNorm keyword arguments, steps).
CASES = [
    ("2d", (5,), {"eps": 1e-3}, 2),
    ("4d-cumulative-no-affine", (3, 4, 2), {"momentum": None, "affine": False}, 2),
    ("untracked", (4,), {"track_running_stats": False}, 1),
] + ([("no-bias-3d", (2, 3), {"bias": False, "momentum": 0.5}, 2)] if TORCH_BN_TAKES_BIAS else [])

# Far from zero: mean 1e8, spread 1. The naive one round (count, sum of x, sum of x^2) loses the variance here.
FAR_MEAN, FAR_CHANNELS = 1e8, 3


class _OpLog(TorchDispatchMode):
    """Records the name of every ATen operator that runs, forward and backward."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.name())
        return func(*args, **(kwargs or {}))


def _sync_worker(rank: int, world_size: int, sizes: tuple[int, ...], device: str = "cpu") -> dict:
    """Everything one rank measures, on `device`; runs in a spawned process inside a gloo group. Returns CPU tensors."""
    report: dict = {"world_size": sync_world_size(), "cases": {}}
    rows = _rows(sizes, rank)
    for name, shape, kwargs, steps in CASES:
        layer = _affine(SyncBatchNorm(shape[0], dtype=F64, **kwargs)).to(device)
        outputs = []
        for step in range(steps):
            x_all, dy_all = _data((sum(sizes),) + shape, seed=step)
            x = x_all[rows].to(device).requires_grad_()
            y = layer(x)
            (y * dy_all[rows].to(device)).sum().backward()
            grads = {"x": x.grad.cpu()}
            for param, p in layer.named_parameters():
                grads[param] = p.grad.cpu()
                p.grad = None
            outputs.append({"y": y.detach().cpu(), **grads})
        buffers = {k: v.cpu() for k, v in layer.named_buffers()}
        report["cases"][name] = {"steps": outputs, "buffers": buffers}

    # Messages: one all-gather in the forward (2C + 1 floats per rank), one all-reduce in the backward (2C); none in
    # eval mode. And no ATen batch-norm operator runs, forward or backward.
    layer = SyncBatchNorm(7, dtype=F64).to(device)
    x = _data((sum(sizes), 7), seed=5)[0][rows].to(device).requires_grad_()
    with recorded_collectives() as forward_calls, _OpLog() as op_log:
        y = layer(x)
    with recorded_collectives() as backward_calls, op_log:
        y.sum().backward()
    report["operators"] = op_log.names
    layer.eval()
    reference = torch_bn.BatchNorm1d(7, dtype=F64).to(device)
    reference.load_state_dict(layer.state_dict())
    reference.eval()
    with recorded_collectives() as eval_calls:
        y_eval = layer(x.detach())
    report["messages"] = {"forward": forward_calls, "backward": backward_calls, "eval": eval_calls}
    report["eval_equal"] = torch.equal(y_eval, reference(x.detach()))

    # A second derivative would miss the all-reduce: it must raise, not be silently wrong.
    layer = SyncBatchNorm(3, dtype=F64).to(device)
    x = _data((sum(sizes), 3), seed=6)[0][rows].to(device).requires_grad_()
    (dx,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    try:
        dx.sum().backward()
        report["double_backward_error"] = None
    except RuntimeError as error:
        report["double_backward_error"] = str(error)

    # Far from zero: SyncBN's one round against the naive one round of (count, sum of x, sum of x^2).
    x_all = FAR_MEAN + torch.randn(sum(sizes), FAR_CHANNELS, generator=torch.Generator().manual_seed(9), dtype=F64)
    x = x_all[rows].to(device)
    layer = SyncBatchNorm(FAR_CHANNELS, momentum=1.0, dtype=F64).to(device)  # running stats := this batch's
    layer(x)
    naive = torch.cat([torch.tensor([float(x.shape[0])], dtype=F64, device=device), x.sum(0), x.square().sum(0)])
    dist.all_reduce(naive)
    naive_mean = naive[1 : FAR_CHANNELS + 1] / naive[0]
    naive_var = (naive[FAR_CHANNELS + 1 :] / naive[0] - naive_mean.square()) * (naive[0] / (naive[0] - 1))
    report["far"] = {"sync_mean": layer.running_mean.cpu(), "sync_var": layer.running_var.cpu(),
                     "naive_var": naive_var.cpu()}

    # Inside DistributedDataParallel (bnnotes', which admits SyncBatchNorm on the CPU), converted from a torch.nn model.
    model = DistributedDataParallel(convert_sync_batchnorm(_ddp_model()).to(device))
    report["ddp_has_sync"] = isinstance(model.module[1], nn.SyncBatchNorm)
    x_all, _ = _data((sum(sizes), 4), seed=7)
    weights = torch.randn(sum(sizes), 3, generator=torch.Generator().manual_seed(8), dtype=F64)
    out = model(x_all[rows].to(device))
    (out * weights[rows].to(device)).sum().backward()
    report["ddp"] = {
        "out": out.detach().cpu(),
        # DDP averages the ranks' gradients; the sum is the gradient of the sum of the ranks' losses.
        "grads": {name: world_size * p.grad.cpu() for name, p in model.module.named_parameters()},
        "buffers": {name: b.cpu() for name, b in model.module.named_buffers()},
    }

    # A global batch of one value per channel is an error on every rank (and none is left waiting).
    one_row = (1,) + (0,) * (world_size - 1)
    try:
        SyncBatchNorm(3, dtype=F64).to(device)(torch.ones(one_row[rank], 3, dtype=F64, device=device))
        report["one_value_error"] = None
    except ValueError as error:
        report["one_value_error"] = str(error)
    return report


def _reference(name: str, shape: tuple[int, ...], kwargs: dict, steps: int, sizes: tuple[int, ...]) -> dict:
    """torch's BN on the concatenated batch, with the same steps."""
    layer = _affine(nn.BatchNorm2d(shape[0], dtype=F64, **kwargs) if len(shape) == 3
                    else nn.BatchNorm1d(shape[0], dtype=F64, **kwargs))
    assert not (kwargs.get("bias") is False and layer.bias is not None)
    outputs = []
    for step in range(steps):
        x_all, dy_all = _data((sum(sizes),) + shape, seed=step)
        x = x_all.clone().requires_grad_()
        y = layer(x)
        (y * dy_all).sum().backward()
        grads = {"x": x.grad}
        for param, p in layer.named_parameters():
            grads[param] = p.grad.clone()
            p.grad = None
        outputs.append({"y": y.detach(), **grads})
    return {"steps": outputs, "buffers": {k: v.clone() for k, v in layer.named_buffers()}}


def _close(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(got, expected, rtol=0, atol=TOL, msg=lambda m: f"{what}: {m}")


def _check_world(sizes: tuple[int, ...], device: str = "cpu") -> None:
    world_size = len(sizes)
    reports = launch(_sync_worker, world_size, (sizes, device), timeout=90)
    assert multiprocessing.active_children() == [], "launch must join every process"
    assert all(r["world_size"] == world_size for r in reports)

    for name, shape, kwargs, steps in CASES:
        expected = _reference(name, shape, kwargs, steps, sizes)
        for step in range(steps):
            got = [r["cases"][name]["steps"][step] for r in reports]
            ref = expected["steps"][step]
            _close(torch.cat([g["y"] for g in got]), ref["y"], f"{name} step {step} output")
            _close(torch.cat([g["x"] for g in got]), ref["x"], f"{name} step {step} input gradient")
            assert set(ref) == set(got[0]), f"{name}: the same parameters as torch's layer"
            for param in set(ref) - {"x", "y"}:
                _close(sum(g[param] for g in got), ref[param], f"{name} step {step} {param} gradient")
        for buffer, value in expected["buffers"].items():
            ranks = [r["cases"][name]["buffers"][buffer] for r in reports]
            assert all(torch.equal(ranks[0], other) for other in ranks[1:]), f"{name} {buffer} differs between ranks"
            if value is not None:
                _close(ranks[0].to(value.dtype), value, f"{name} {buffer}")

    for r in reports:
        assert r["messages"] == {"forward": [("all_gather", 15)], "backward": [("all_reduce", 14)], "eval": []}
        assert not [name for name in r["operators"] if "batch_norm" in name], "no ATen batch-norm operator may run"
        assert any("rsqrt" in name for name in r["operators"]) and any("sum" in name for name in r["operators"]), \
            "the log must see SyncBN's own operators for the check above to mean anything"
        assert r["eval_equal"] and r["ddp_has_sync"]
        assert "once_differentiable" in r["double_backward_error"]
        assert "Expected more than 1 value per channel when training, got 1 over all ranks" in r["one_value_error"]

    # Far from zero: the one round is exact to rounding, the naive one loses the variance entirely. Both numbers shown
    # (pytest -s), relative to the variance of the concatenated batch.
    x_all = FAR_MEAN + torch.randn(sum(sizes), FAR_CHANNELS, generator=torch.Generator().manual_seed(9), dtype=F64)
    true_var, true_mean = torch.var_mean(x_all, dim=0)
    for r in reports:
        sync_error = ((r["far"]["sync_var"] - true_var).abs() / true_var).max().item()
        naive_error = ((r["far"]["naive_var"] - true_var).abs() / true_var).max().item()
        print(f"mean 1e8, world {world_size}: relative variance error, one round (Chan) {sync_error:.1e}, "
              f"naive one round {naive_error:.1e}")
        # The merge errs by the rounding of the ranks' means, about eps * mean / spread = 2e-8 relative.
        assert sync_error < 1e-7, "the one-round merge should keep the variance of data far from zero"
        assert naive_error > 0.1, "E[x^2] - E[x]^2 should lose the variance of data far from zero"
        torch.testing.assert_close(r["far"]["sync_mean"], true_mean, rtol=4 * torch.finfo(F64).eps, atol=0)

    # DDP: outputs, parameter gradients and BN buffers against one process with torch's own BN.
    model = _ddp_model()
    x_all, _ = _data((sum(sizes), 4), seed=7)
    weights = torch.randn(sum(sizes), 3, generator=torch.Generator().manual_seed(8), dtype=F64)
    out = model(x_all)
    (out * weights).sum().backward()
    _close(torch.cat([r["ddp"]["out"] for r in reports]), out.detach(), "DDP output")
    for name, p in model.named_parameters():
        for r in reports:
            _close(r["ddp"]["grads"][name], p.grad, f"DDP gradient of {name}")
    for name, b in model.named_buffers():
        for r in reports:
            _close(r["ddp"]["buffers"][name].to(b.dtype), b, f"DDP buffer {name}")


@pytest.mark.timeout(120)
def test_two_ranks_unequal_batches_one_row_on_a_rank():
    # Rank 0 holds a single row: alone it could not be batch-normalized, synchronized it can.
    _check_world((1, 8))


@pytest.mark.timeout(120)
def test_three_ranks_unequal_batches_one_rank_empty():
    _check_world((5, 0, 9))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.timeout(180)
def test_two_ranks_with_cuda_tensors_over_gloo():
    # One GPU cannot host two nccl ranks; gloo all-reduces CUDA tensors, which exercises the same code on the device.
    _check_world((3, 8), device="cuda")


# ----------------------------------------------------------------------------------------------------------------------
# Without a process group (these run in the test process).
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False])
def test_without_a_process_group_it_is_batchnorm(training):
    assert not dist.is_initialized() and sync_world_size() == 1
    sync, bn = _affine(SyncBatchNorm(4, dtype=F64)), _affine(torch_bn.BatchNorm1d(4, dtype=F64))
    sync.train(training), bn.train(training)
    x, dy = _data((10, 4), seed=0)
    xs, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ys, yb = sync(xs), bn(xb)
    (ys * dy).sum().backward()
    (yb * dy).sum().backward()
    assert torch.equal(ys, yb) and torch.equal(xs.grad, xb.grad) and torch.equal(sync.weight.grad, bn.weight.grad)
    for (name, a), (_, b) in zip(sync.named_buffers(), bn.named_buffers()):
        assert torch.equal(a, b), name


def test_in_a_world_of_one_it_is_batchnorm_and_sends_nothing():
    store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, wait_for_workers=False)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        sync, bn = SyncBatchNorm(3, dtype=F64), torch_bn.BatchNorm1d(3, dtype=F64)
        x = _data((6, 3), seed=1)[0]
        with recorded_collectives() as calls:
            y = sync(x)
        assert calls == [] and torch.equal(y, bn(x)) and torch.equal(sync.running_var, bn.running_var)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kwargs", [{}, {"eps": 1e-3, "momentum": 0.2},
                                    pytest.param({"bias": False}, marks=NO_TORCH_BN_BIAS), {"affine": False},
                                    {"track_running_stats": False, "momentum": None}])
def test_it_is_torchs_sync_batchnorm_constructor_state_and_repr(kwargs):
    ours, theirs = SyncBatchNorm(np.int64(5), **kwargs), nn.SyncBatchNorm(5, **kwargs)
    assert isinstance(ours, nn.SyncBatchNorm) and isinstance(ours, nn.modules.batchnorm._BatchNorm)
    assert repr(ours) == repr(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert [(n, p.shape) for n, p in ours.named_parameters()] == [(n, p.shape) for n, p in theirs.named_parameters()]
    ours.load_state_dict(theirs.state_dict())
    assert ours.process_group is None


def test_bias_false_on_every_torch():
    """bias=False on torch without that argument (2.4) as well: no beta, a weight-only state, torch's arithmetic."""
    x = torch.randn(6, 3, dtype=F64)
    for layer in (SyncBatchNorm(3, bias=False, dtype=F64), torch_bn.BatchNorm1d(3, bias=False, dtype=F64)):
        with torch.no_grad():
            layer.weight.fill_(2.0)
        layer.reset_parameters()  # beta is absent: the reset must not touch it
        assert layer.bias is None and [name for name, _ in layer.named_parameters()] == ["weight"]
        assert list(layer.state_dict()) == ["weight", "running_mean", "running_var", "num_batches_tracked"]
        assert torch.equal(layer.weight, torch.ones(3, dtype=F64))
        torch.testing.assert_close(layer(x), F.batch_norm(x, None, None, layer.weight, None, training=True))


def test_torchs_converter_classmethod_is_bnnotes_converter():
    net = SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)))
    assert type(net[1]) is SyncBatchNorm
    # torch's own converter sees a torch BN layer in ours, and turns it into torch's.
    assert type(nn.SyncBatchNorm.convert_sync_batchnorm(SyncBatchNorm(4))) is nn.SyncBatchNorm


def test_ddp_refuses_torchs_sync_layer_on_the_cpu_but_admits_ours():
    store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, wait_for_workers=False)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="only work with GPU modules"):
            DistributedDataParallel(nn.Sequential(nn.Linear(3, 4), nn.SyncBatchNorm(4)))
        with pytest.raises(ValueError, match="only work with GPU modules"):
            nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(3, 4), SyncBatchNorm(4)))
        model = DistributedDataParallel(nn.Sequential(nn.Linear(3, 4), SyncBatchNorm(4)))
        assert model(torch.randn(5, 3)).shape == (5, 4)
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------------------
# combine_statistics: the one-round merge, against the statistics of the concatenated groups.
# ----------------------------------------------------------------------------------------------------------------------


_SPREAD = torch.tensor([1e-3, 1.0, 50.0], dtype=F64)


def _groups(sizes: tuple[int, ...], offset: float, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [offset + _SPREAD * torch.randn(n, 3, generator=generator, dtype=F64) for n in sizes]


def _stats(groups: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    counts = torch.tensor([float(g.shape[0]) for g in groups], dtype=F64)
    # An empty group's mean and variance are NaN here: combine_statistics must ignore them.
    nan = torch.full((3,), float("nan"), dtype=F64)
    means = torch.stack([g.mean(0) if len(g) else nan for g in groups])
    variances = torch.stack([g.var(0, correction=0) if len(g) else nan for g in groups])
    return counts, means, variances


@pytest.mark.parametrize("sizes", [(7,), (3, 9), (5, 0, 9), (1, 1, 1, 1), (2, 40, 0, 13, 1)])
@pytest.mark.parametrize("offset", [0.0, -7.5, 1e8])
def test_combine_statistics_equals_the_concatenated_batch(sizes, offset):
    groups = _groups(sizes, offset)
    mean, var, count = combine_statistics(*_stats(groups))
    whole = torch.cat(groups)
    expected_var, expected_mean = torch.var_mean(whole, dim=0, correction=0)
    assert count.item() == whole.shape[0]
    torch.testing.assert_close(mean, expected_mean, rtol=1e-13, atol=1e-16)
    # The merge is exact up to the rounding of the groups' means, eps * |mean| each: the between-group term
    # n_k (mean_k - mean)^2 / n then errs by at most about 2 * spread * eps * |mean|.
    bound = 8 * torch.finfo(F64).eps * (abs(offset) + 1) * _SPREAD + 1e-13 * expected_var
    assert ((var - expected_var).abs() <= bound).all(), (var - expected_var).abs() / bound


def test_combine_statistics_keeps_the_variance_where_the_naive_one_round_loses_it():
    groups = _groups((500, 300, 700), offset=1e8)
    counts, means, variances = _stats(groups)
    _, var, _ = combine_statistics(counts, means, variances)
    count = counts.sum()
    # The naive one round: sums of x and of x^2 per group, added, then E[x^2] - E[x]^2.
    sum_x = torch.stack([g.sum(0) for g in groups]).sum(0)
    sum_x2 = torch.stack([g.square().sum(0) for g in groups]).sum(0)
    naive_var = sum_x2 / count - (sum_x / count).square()
    true_var = torch.cat(groups).var(0, correction=0)
    # Channel 1: spread 1 at mean 1e8. The merge's error is bounded by the rounding of the groups' means (about
    # eps * mean / spread = 2e-8 relative); the naive one loses every digit.
    chan_error = ((var - true_var).abs() / true_var)[1].item()
    naive_error = ((naive_var - true_var).abs() / true_var)[1].item()
    print(f"mean 1e8, spread 1: relative variance error, Chan {chan_error:.1e}, naive {naive_error:.1e}")
    assert chan_error < 1e-7 and naive_error > 0.5


def test_combine_statistics_of_nothing_is_nan_and_bad_shapes_are_named():
    mean, var, count = combine_statistics(torch.zeros(2), torch.zeros(2, 3), torch.zeros(2, 3))
    assert count.item() == 0 and mean.isnan().all() and var.isnan().all()
    with pytest.raises(ValueError, match=r"expected counts \(K,\), means \(K, C\).*\(2,\), \(3, 4\)"):
        combine_statistics(torch.ones(2), torch.zeros(3, 4), torch.zeros(3, 4))


def test_the_converter_lives_in_convert_and_keeps_its_names():
    assert convert_sync_batchnorm is convert.convert_sync_batchnorm
    net = SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)))
    assert type(net[1]) is SyncBatchNorm
    assert not hasattr(torch_bn, "SyncBatchNorm"), "torch_bn is no facade for bnnotes.sync"


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3, momentum=0.3), nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(12, 4), torch_bn.BatchNorm1d(4, eps=1e-3, affine=False))
        self.ghost = GhostBatchNorm1d(4, 2)  # looks like BN, is not: left alone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ghost(self.head(self.features(x)))


def test_convert_sync_batchnorm_keeps_state_and_shares_tensors():
    net = _Net().double()
    net(torch.randn(6, 2, 2, 2, dtype=F64))  # move the running statistics
    net.head[2].eval()
    old_conv_bn, old_head_bn = net.features[1], net.head[2]
    sentinel = object()
    converted = convert_sync_batchnorm(net, process_group=sentinel)
    assert converted is net
    new_conv_bn, new_head_bn = net.features[1], net.head[2]
    assert type(new_conv_bn) is SyncBatchNorm and type(new_head_bn) is SyncBatchNorm
    assert type(net.ghost) is GhostBatchNorm1d
    # The very same tensors, so an optimizer built before the conversion still updates them.
    assert new_conv_bn.weight is old_conv_bn.weight and new_conv_bn.bias is old_conv_bn.bias
    assert new_conv_bn.running_mean is old_conv_bn.running_mean
    assert new_conv_bn.num_batches_tracked is old_conv_bn.num_batches_tracked
    assert new_head_bn.running_var is old_head_bn.running_var
    assert (new_conv_bn.momentum, new_head_bn.eps, new_head_bn.affine) == (0.3, 1e-3, False)
    assert new_conv_bn.training and not new_head_bn.training
    assert new_conv_bn.process_group is sentinel and new_head_bn.process_group is sentinel


@pytest.mark.parametrize("cls", [nn.BatchNorm1d, nn.SyncBatchNorm, torch_bn.BatchNorm1d, SyncBatchNorm])
def test_convert_a_bare_layer_returns_a_new_layer_with_the_same_eval_output(cls):
    layer = cls(3, track_running_stats=True).double()
    with torch.no_grad():
        layer.running_mean.copy_(torch.tensor([1.0, -2.0, 0.5]))
        layer.running_var.copy_(torch.tensor([4.0, 0.25, 1.0]))
    layer.eval()
    converted = convert_sync_batchnorm(layer)
    assert type(converted) is SyncBatchNorm and not converted.training
    x = torch.randn(5, 3, dtype=F64)
    torch.testing.assert_close(converted(x), F.batch_norm(x, layer.running_mean, layer.running_var, layer.weight,
                                                          layer.bias, training=False), rtol=0, atol=TOL)


def test_convert_keeps_hooks_and_their_handles():
    net = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.ReLU()).double()
    seen: list[str] = []
    old = net[1]
    handles = [
        old.register_forward_pre_hook(lambda m, args: seen.append("pre")),
        old.register_forward_hook(lambda m, args, out: seen.append(f"forward {type(m).__name__}")),
        old.register_full_backward_hook(lambda m, grad_in, grad_out: seen.append("backward")),
    ]
    # (Module.register_state_dict_post_hook is newer than torch 2.4.)
    has_state_dict_hook = hasattr(old, "register_state_dict_post_hook")
    if has_state_dict_hook:
        old.register_state_dict_post_hook(lambda m, state, prefix, local: seen.append("state_dict"))
    convert_sync_batchnorm(net)
    assert type(net[1]) is SyncBatchNorm
    net(torch.randn(4, 2, dtype=F64)).sum().backward()
    net.state_dict()
    assert seen == ["pre", "forward SyncBatchNorm", "backward"] + (["state_dict"] if has_state_dict_hook else [])
    for handle in handles:  # obtained from the old layer, they remove the hooks from the new one
        handle.remove()
    seen.clear()
    net(torch.randn(4, 2, dtype=F64)).sum().backward()
    assert seen == []


@NO_TORCH_BN_BIAS
def test_convert_keeps_bias_false_and_qconfig():
    layer = nn.BatchNorm2d(3, bias=False)
    layer.qconfig = "a qconfig"
    converted = convert_sync_batchnorm(layer)
    assert converted.bias is None and converted.weight is layer.weight and converted.qconfig == "a qconfig"
    assert repr(converted) == repr(nn.SyncBatchNorm(3, bias=False))


def test_dtype_mismatch_is_refused_as_torch_refuses_it():
    with pytest.raises(RuntimeError):
        nn.BatchNorm1d(3)(torch.randn(4, 3, dtype=F64))
    with pytest.raises(TypeError, match="input is torch.float64 but the layer's weight is torch.float32"):
        SyncBatchNorm(3)(torch.randn(4, 3, dtype=F64))
    assert SyncBatchNorm(3)(torch.randn(4, 3, dtype=torch.bfloat16)).dtype == torch.bfloat16  # float32 parameters


@pytest.mark.parametrize("eps, training, raises", [(0.0, True, True), (-1e-5, True, True), (0.0, False, False),
                                                   (-1e-5, False, True), (1e-5, True, False)])
def test_eps_is_validated_as_torch_validates_it(eps, training, raises):
    x = torch.randn(4, 3)
    raises = raises or (eps == 0.0 and not ZERO_EPS_WITH_FIXED_STATISTICS)  # torch 2.11: eps > 0 in eval too
    torch_layer, ours = nn.BatchNorm1d(3, eps=eps).train(training), SyncBatchNorm(3, eps=eps).train(training)
    if raises:
        if TORCH_VALIDATES_EPS:  # 2.4's layer does not validate eps
            with pytest.raises(ValueError, match="eps"):
                torch_layer(x)
        with pytest.raises(ValueError, match=f"eps must be positive .*got eps={eps}"):
            ours(x)
    else:
        torch.testing.assert_close(ours(x), torch_layer(x))


def test_convert_rejects_a_non_module():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        convert_sync_batchnorm("not a module")


@pytest.mark.parametrize(
    "x, error, match",
    [
        (torch.randn(4), ValueError, "shape"),
        (torch.randn(4, 5), ValueError, "expected 3 channels"),
        (torch.ones(4, 3, dtype=torch.long), TypeError, "floating-point"),
        ([[1.0, 2.0, 3.0]], TypeError, "torch.Tensor"),
    ],
)
def test_bad_input(x, error, match):
    with pytest.raises(error, match=match):
        SyncBatchNorm(3)(x)
