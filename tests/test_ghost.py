"""Ghost BN (bnnotes.ghost): BN per consecutive virtual batch, against NumPy BN, torch's BN and bnnotes' BatchNorm."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES
from torch import nn

from bnnotes import numpy_bn, torch_bn
from bnnotes.ghost import GhostBatchNorm1d, GhostBatchNorm2d

TOL = 1e-10


def _input(shape: tuple[int, ...], virtual_batch_size: int, seed: int = 0) -> torch.Tensor:
    """Channels with different scales and offsets, and a different offset per virtual batch, so that per-chunk and
    whole-batch statistics differ clearly."""
    generator = torch.Generator().manual_seed(seed)
    n, c = shape[0], shape[1]
    per_channel = (1, c) + (1,) * (len(shape) - 2)
    scale = torch.logspace(-1, 1, c, dtype=torch.float64).view(per_channel)
    offset = torch.linspace(-5, 50, c, dtype=torch.float64).view(per_channel)
    chunk_offset = torch.randn((n // virtual_batch_size,) + tuple(shape[1:]), generator=generator,
                               dtype=torch.float64).repeat_interleave(virtual_batch_size, dim=0)
    return offset + scale * (torch.randn(shape, generator=generator, dtype=torch.float64) + 3 * chunk_offset)


def _layer(cls: type, channels: int, virtual_batch_size: int, **kwargs) -> nn.Module:
    layer = cls(channels, virtual_batch_size, dtype=torch.float64, **kwargs)
    if layer.affine:
        with torch.no_grad():
            layer.weight.copy_(torch.linspace(0.5, 2.0, channels))
            layer.bias.copy_(torch.linspace(-1.0, 1.0, channels))
    return layer


CASES = [
    pytest.param(GhostBatchNorm1d, (24, 5), 4, id="1d-N,C"),
    pytest.param(GhostBatchNorm1d, (12, 3, 7), 3, id="1d-N,C,L"),
    pytest.param(GhostBatchNorm2d, (8, 3, 4, 5), 2, id="2d"),
    pytest.param(GhostBatchNorm1d, (10, 4), 10, id="one-chunk"),
]


@pytest.mark.parametrize("cls, shape, virtual_batch_size", CASES)
def test_forward_is_numpy_bn_per_chunk(cls, shape, virtual_batch_size):
    x = _input(shape, virtual_batch_size)
    layer = _layer(cls, shape[1], virtual_batch_size, eps=1e-3)
    y = layer(x).detach().numpy()
    gamma, beta = layer.weight.detach().numpy(), layer.bias.detach().numpy()
    expected = np.concatenate(
        [numpy_bn.forward(chunk, gamma, beta, eps=1e-3)[0]
         for chunk in np.split(x.numpy(), shape[0] // virtual_batch_size)]
    )
    np.testing.assert_allclose(y, expected, rtol=0, atol=TOL)
    # ... and it is not BN over the whole batch (unless there is one chunk).
    whole, _ = numpy_bn.forward(x.numpy(), gamma, beta, eps=1e-3)
    assert (np.abs(y - whole).max() > 0.1) == (shape[0] > virtual_batch_size)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cls, shape, virtual_batch_size", CASES)
def test_gradients_are_torch_bn_per_chunk(cls, shape, virtual_batch_size, device):
    x = _input(shape, virtual_batch_size).to(device).requires_grad_()
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device)
    layer = _layer(cls, shape[1], virtual_batch_size).to(device)
    (layer(x) * dy).sum().backward()

    x_ref = x.detach().clone().requires_grad_()
    weight = layer.weight.detach().clone().requires_grad_()
    bias = layer.bias.detach().clone().requires_grad_()
    chunks = x_ref.split(virtual_batch_size)
    y_ref = torch.cat([F.batch_norm(chunk, None, None, weight, bias, training=True) for chunk in chunks])
    (y_ref * dy).sum().backward()
    for got, expected in [(x.grad, x_ref.grad), (layer.weight.grad, weight.grad), (layer.bias.grad, bias.grad)]:
        torch.testing.assert_close(got, expected, rtol=0, atol=TOL)


def _fed_sequentially(x: torch.Tensor, virtual_batch_size: int, bn: nn.Module) -> None:
    for chunk in x.split(virtual_batch_size):
        bn(chunk)


@pytest.mark.parametrize("momentum", [0.1, 0.7, None])
@pytest.mark.parametrize("cls, shape, virtual_batch_size", CASES)
def test_running_statistics_are_bn_fed_the_chunks_one_after_another(cls, shape, virtual_batch_size, momentum):
    ghost = _layer(cls, shape[1], virtual_batch_size, momentum=momentum)
    torch_bn_cls = nn.BatchNorm1d if cls is GhostBatchNorm1d else nn.BatchNorm2d
    reference = torch_bn_cls(shape[1], momentum=momentum, dtype=torch.float64)
    for step in range(3):  # several calls, so that the cumulative average (momentum=None) spans calls
        x = _input(shape, virtual_batch_size, seed=step)
        ghost(x)
        _fed_sequentially(x, virtual_batch_size, reference)
    torch.testing.assert_close(ghost.running_mean, reference.running_mean, rtol=0, atol=TOL)
    torch.testing.assert_close(ghost.running_var, reference.running_var, rtol=0, atol=TOL)
    chunks_seen = 3 * shape[0] // virtual_batch_size
    assert ghost.num_batches_tracked.item() == reference.num_batches_tracked.item() == chunks_seen


def test_whole_batch_as_one_virtual_batch_is_batchnorm():
    x = _input((16, 4), 16).requires_grad_()
    ghost, bn = _layer(GhostBatchNorm1d, 4, 16), torch_bn.BatchNorm1d(4, dtype=torch.float64)
    bn.load_state_dict(ghost.state_dict())
    y_ghost, y_bn = ghost(x), bn(x)
    torch.testing.assert_close(y_ghost, y_bn, rtol=0, atol=TOL)
    dx_ghost, dx_bn = (torch.autograd.grad(y.square().sum(), x)[0] for y in (y_ghost, y_bn))
    torch.testing.assert_close(dx_ghost, dx_bn, rtol=0, atol=TOL)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ghost, name), getattr(bn, name), rtol=0, atol=TOL)


@pytest.mark.parametrize("track_running_stats", [True, False])
def test_eval_mode_is_batchnorm_eval(track_running_stats):
    ghost = _layer(GhostBatchNorm1d, 5, 4, track_running_stats=track_running_stats)
    bn = torch_bn.BatchNorm1d(5, track_running_stats=track_running_stats, dtype=torch.float64)
    ghost(_input((24, 5), 4))  # move the running statistics away from (0, 1)
    bn.load_state_dict(ghost.state_dict())
    ghost.eval(), bn.eval()
    x = _input((7, 5), 7, seed=3)  # any batch size works in eval mode, here not a multiple of 4
    before = {k: v.clone() for k, v in ghost.state_dict().items()}
    assert torch.equal(ghost(x), bn(x))
    assert all(torch.equal(before[k], v) for k, v in ghost.state_dict().items()), "eval must not touch the buffers"


def test_state_dict_keys_and_loading_are_torch_batchnorms():
    ghost, reference = GhostBatchNorm2d(3, 2), nn.BatchNorm2d(3)
    assert list(ghost.state_dict()) == list(reference.state_dict())
    reference.running_mean.fill_(0.5)
    ghost.load_state_dict(reference.state_dict())
    assert torch.equal(ghost.running_mean, reference.running_mean)
    assert "virtual_batch_size=2" in repr(ghost)


def test_half_precision_is_computed_in_float32():
    x = _input((16, 4), 4).float()
    ghost32, ghost16 = GhostBatchNorm1d(4, 4), GhostBatchNorm1d(4, 4)
    y16 = ghost16(x.half())
    assert y16.dtype == torch.float16
    torch.testing.assert_close(y16.float(), ghost32(x.half().float()), rtol=0, atol=2e-3)


def test_module_exports():
    from bnnotes import ghost

    assert ghost.__all__ == ["GhostBatchNorm1d", "GhostBatchNorm2d"]
    assert ghost.GhostBatchNorm1d is GhostBatchNorm1d and ghost.GhostBatchNorm2d is GhostBatchNorm2d


def test_batch_size_not_a_multiple_of_the_virtual_batch_size_is_an_error():
    with pytest.raises(ValueError, match=r"multiple of 4, got N=10"):
        GhostBatchNorm1d(3, 4)(torch.randn(10, 3))


@pytest.mark.parametrize("bad", [0, -2, 2.5, True, "4", None])
def test_invalid_virtual_batch_size(bad):
    with pytest.raises(ValueError, match="virtual_batch_size must be a positive integer"):
        GhostBatchNorm1d(3, bad)


def test_one_value_per_channel_per_virtual_batch_is_an_error():
    with pytest.raises(ValueError, match="more than 1 value per channel in each virtual batch"):
        GhostBatchNorm1d(3, 1)(torch.randn(4, 3))
    GhostBatchNorm1d(3, 1)(torch.randn(4, 3, 2))  # one row, but two values per channel: fine


@pytest.mark.parametrize(
    "layer, x, error, match",
    [
        (GhostBatchNorm1d(3, 2), torch.randn(4, 3, 2, 2), ValueError, "2-D or 3-D input"),
        (GhostBatchNorm2d(3, 2), torch.randn(4, 3), ValueError, "4-D input"),
        (GhostBatchNorm1d(3, 2), torch.randn(4, 5), ValueError, "expected 3 channels"),
        (GhostBatchNorm1d(3, 2), torch.ones(4, 3, dtype=torch.long), TypeError, "floating-point"),
        (GhostBatchNorm1d(3, 2), np.ones((4, 3)), TypeError, "torch.Tensor"),
    ],
)
def test_bad_input(layer, x, error, match):
    with pytest.raises(error, match=match):
        layer(x)


def test_the_variants_share_one_base_and_are_not_torch_bn_modules():
    """Batch Renorm, Ghost BN and lp BN take their state, reset, loading and input checks from RunningStatsNorm."""
    from bnnotes.lp_norm import LpBatchNorm1d
    from bnnotes.renorm import BatchRenorm1d, BatchRenorm2d
    from bnnotes._core import RunningStatsNorm

    shared = ("__init__", "reset_running_stats", "reset_parameters", "_load_from_state_dict", "_check_forward_input",
              "_momentum")
    for cls in (BatchRenorm1d, BatchRenorm2d, GhostBatchNorm1d, GhostBatchNorm2d, LpBatchNorm1d):
        assert issubclass(cls, RunningStatsNorm)
        # convert_sync_batchnorm and fusion would silently turn these into plain BN
        assert not issubclass(cls, nn.modules.batchnorm._BatchNorm)
        below_base = cls.__mro__[: cls.__mro__.index(RunningStatsNorm)]
        for name in shared[1:]:
            assert not any(name in vars(k) for k in below_base), f"{cls.__name__} redefines {name}"
    layer = BatchRenorm1d(3)
    state = layer.state_dict()
    del state["num_batches_tracked"]
    state._metadata[""]["version"] = 1  # a checkpoint from before num_batches_tracked existed
    layer.load_state_dict(state)
    assert int(layer.num_batches_tracked) == 0
    ghost = GhostBatchNorm1d(np.int64(3), virtual_batch_size=2, device="cpu", dtype=torch.float64)
    assert ghost.num_features == 3 and ghost.running_var.dtype == torch.float64
    ghost.running_var.fill_(4.0)
    ghost.reset_running_stats()
    assert torch.equal(ghost.running_var, torch.ones(3, dtype=torch.float64))
