"""SyncBatchNorm (bnnotes.sync): real gloo process groups of 2 and 3 processes on this machine, over loopback.

Every distributed check of one world size runs in a single launch (process start-up dominates the cost); the parent
then compares each rank's outputs, input gradients, parameter gradients and running statistics with single-process
BN (torch's, the reference) on the concatenated batch, in float64.
"""

from __future__ import annotations

import multiprocessing

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from bnnotes import torch_bn
from bnnotes.experiments.distributed import launch, recorded_all_reduces
from bnnotes.ghost import GhostBatchNorm1d
from bnnotes.sync import SyncBatchNorm, convert_sync_batchnorm, sync_world_size

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
    if layer.affine:
        with torch.no_grad():
            layer.weight.copy_(torch.linspace(0.5, 2.0, layer.num_features))
            layer.bias.copy_(torch.linspace(-1.0, 1.0, layer.num_features))
    return layer


def _rows(sizes: tuple[int, ...], rank: int) -> slice:
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _ddp_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double()


# The cases: (name, shape of the whole batch without N, SyncBatchNorm keyword arguments, steps).
CASES = [
    ("2d", (5,), {"eps": 1e-3}, 2),
    ("4d-cumulative-no-affine", (3, 4, 2), {"momentum": None, "affine": False}, 2),
    ("untracked", (4,), {"track_running_stats": False}, 1),
]


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
            if layer.affine:
                grads.update(weight=layer.weight.grad.cpu(), bias=layer.bias.grad.cpu())
                layer.weight.grad, layer.bias.grad = None, None
            outputs.append({"y": y.detach().cpu(), **grads})
        buffers = {k: v.cpu() for k, v in layer.named_buffers()}
        report["cases"][name] = {"steps": outputs, "buffers": buffers}

    # Messages: two all-reduces in the forward (C + 1 and C floats), one in the backward (2C); none in eval mode.
    layer = SyncBatchNorm(7, dtype=F64).to(device)
    x = _data((sum(sizes), 7), seed=5)[0][rows].to(device).requires_grad_()
    with recorded_all_reduces() as forward_calls:
        y = layer(x)
    with recorded_all_reduces() as backward_calls:
        y.sum().backward()
    layer.eval()
    reference = torch_bn.BatchNorm1d(7, dtype=F64).to(device)
    reference.load_state_dict(layer.state_dict())
    reference.eval()
    with recorded_all_reduces() as eval_calls:
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

    # Inside DistributedDataParallel, converted from a torch.nn model.
    model = DistributedDataParallel(convert_sync_batchnorm(_ddp_model()).to(device))
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
    outputs = []
    for step in range(steps):
        x_all, dy_all = _data((sum(sizes),) + shape, seed=step)
        x = x_all.clone().requires_grad_()
        y = layer(x)
        (y * dy_all).sum().backward()
        grads = {"x": x.grad}
        if layer.affine:
            grads.update(weight=layer.weight.grad.clone(), bias=layer.bias.grad.clone())
            layer.weight.grad, layer.bias.grad = None, None
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
            for param in ("weight", "bias"):
                if param in ref:
                    _close(sum(g[param] for g in got), ref[param], f"{name} step {step} {param} gradient")
        for buffer, value in expected["buffers"].items():
            ranks = [r["cases"][name]["buffers"][buffer] for r in reports]
            assert all(torch.equal(ranks[0], other) for other in ranks[1:]), f"{name} {buffer} differs between ranks"
            if value is not None:
                _close(ranks[0].to(value.dtype), value, f"{name} {buffer}")

    for r in reports:
        assert r["messages"] == {"forward": [8, 7], "backward": [14], "eval": []}
        assert r["eval_equal"]
        assert "once_differentiable" in r["double_backward_error"]
        assert "Expected more than 1 value per channel when training, got 1 over all ranks" in r["one_value_error"]

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
        with recorded_all_reduces() as calls:
            y = sync(x)
        assert calls == [] and torch.equal(y, bn(x)) and torch.equal(sync.running_var, bn.running_var)
    finally:
        dist.destroy_process_group()


def test_state_dict_keys_and_arguments_are_torchs():
    ours, theirs = SyncBatchNorm(5, eps=1e-3, momentum=0.2), nn.SyncBatchNorm(5, eps=1e-3, momentum=0.2)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    assert ours.process_group is None and "momentum=0.2" in repr(ours)


def test_lazy_export_from_torch_bn():
    assert torch_bn.SyncBatchNorm is SyncBatchNorm and torch_bn.convert_sync_batchnorm is convert_sync_batchnorm


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
