"""Synchronized batch normalization over ``torch.distributed``: the statistics of the union of all ranks' batches.

In data-parallel training every rank (process, usually one per device) holds a slice of the global batch. Plain BN
normalizes each slice with its own statistics; `SyncBatchNorm` normalizes every slice with the statistics of the whole
global batch, as a single process holding all of it would. It works with any backend that has ``all_reduce``: gloo
on the CPU, nccl on CUDA devices, and inside ``DistributedDataParallel``.

Communication, per layer and training step, three blocking all-reduces (sums, in float64):

====================  ===========================================  =========
pass                  what is summed over the ranks                floats
====================  ===========================================  =========
forward, pass 1       value count, sum of x (per channel)          C + 1
forward, pass 2       sum of (x - global mean)^2 (per channel)     C
backward              sum of dy, sum of dy * x_hat (per channel)   2 C
====================  ===========================================  =========

Why two passes in the forward. The variance is computed from values centred at the *global* mean, exactly as
`bnnotes.numpy_bn` and single-process BN compute it, so the result equals single-process BN on the concatenated batch
up to rounding for any data, never ``E[x^2] - E[x]^2``, which cancels catastrophically when the mean is large compared
with the spread. The one-round alternatives either have that cancellation (all-reducing count, sum and sum of squares)
or send ``world_size * (2C + 1)`` floats (all-gathering each rank's count, mean and variance and combining them with
Chan et al.'s formula, which is what ``torch.nn.SyncBatchNorm`` does). The price of the second pass is one more
message latency per layer; `bnnotes.experiments.distributed.measure_communication` measures it.

Why float64 on the wire. The count must be exact (float32 counts stop being integers above 2^24 values per channel),
and the per-channel sums are a few thousand numbers: their cost is latency, not bandwidth.

Everything else (no process group, a world of one, eval mode) is exactly `bnnotes.torch_bn`'s BatchNorm.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from bnnotes.torch_bn import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    _BatchNorm,
    _check_input,
    _compute_dtype,
    _per_channel,
    _reduction_dims,
    _step_momentum,
)

__all__ = ["SyncBatchNorm", "SyncBatchNormFunction", "convert_sync_batchnorm", "sync_world_size"]

# Statistics and gradient sums travel in float64 (see the module docstring).
_WIRE_DTYPE = torch.float64


def sync_world_size(process_group: Any = None) -> int:
    """The number of ranks `SyncBatchNorm` synchronizes over: 1 without an initialized default process group.

    process_group: a group from ``torch.distributed.new_group``, or None for the whole world.

    >>> sync_world_size()  # no process group in a doctest
    1
    """
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(process_group)


class SyncBatchNormFunction(torch.autograd.Function):
    """Training-mode BN over the union of all ranks' batches, with a closed-form backward.

    forward(x, weight, bias, eps, process_group): x is this rank's (N_r, C, *spatial), N_r may differ between ranks
    and may be 0; weight and bias are (C,) tensors or None. Every rank of the group must call it.
    Returns (y, batch_mean, batch_var, count): y has x's shape and dtype; batch_mean and batch_var are the global
    per-channel mean and *biased* variance (float64, no gradient), identical on every rank; count is the global number
    of values per channel, a float64 scalar tensor.

    Backward: with m the global count and the sums taken over every rank's values,
    dx = (weight / sigma) * (dy - sum(dy) / m - x_hat * sum(dy * x_hat) / m); only the two per-channel sums are
    all-reduced. dweight = sum(dy * x_hat) and dbias = sum(dy) are this rank's local sums: the data-parallel wrapper
    (DistributedDataParallel) reduces parameter gradients itself, so reducing them here would count them twice.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, process_group: Any):
        ndim = x.dim()
        dims = _reduction_dims(ndim)
        compute = _compute_dtype(x)
        xc = x.to(compute)
        local_count = xc.numel() // xc.shape[1]

        # Pass 1: the global count and per-channel sums give the global mean.
        count_and_sum = torch.cat(
            [torch.tensor([float(local_count)], dtype=_WIRE_DTYPE, device=x.device), xc.sum(dims, dtype=_WIRE_DTYPE)]
        )
        dist.all_reduce(count_and_sum, group=process_group)
        count = count_and_sum[0].clone()
        # Only a rank that holds at most one value per channel can be part of a global batch of one; in that case every
        # rank does, so all of them raise here and none is left waiting in a collective.
        if local_count <= 1 and count.item() <= 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got {int(count.item())} over all ranks "
                f"(this rank's input size {tuple(x.shape)})"
            )
        batch_mean = count_and_sum[1:] / count

        # Pass 2: squares centred at the global mean give the global biased variance, as in single-process BN.
        x_centered = xc - _per_channel(batch_mean.to(compute), ndim)
        sum_sq = x_centered.square().sum(dims, dtype=_WIRE_DTYPE)
        dist.all_reduce(sum_sq, group=process_group)
        batch_var = sum_sq / count

        inv_std = torch.rsqrt(batch_var + eps).to(compute)
        x_hat = x_centered * _per_channel(inv_std, ndim)
        y = x_hat
        if weight is not None:
            y = y * _per_channel(weight.to(compute), ndim)
        if bias is not None:
            y = y + _per_channel(bias.to(compute), ndim)
        ctx.save_for_backward(x_hat, inv_std, weight, count)
        ctx.has_bias = bias is not None
        ctx.input_dtype = x.dtype
        ctx.process_group = process_group
        ctx.mark_non_differentiable(batch_mean, batch_var, count)
        return y.to(x.dtype), batch_mean, batch_var, count

    @staticmethod
    @once_differentiable  # the all-reduce is not recorded by autograd: a double backward would be silently wrong
    def backward(ctx: Any, dy: Tensor, _dmean: Tensor, _dvar: Tensor, _dcount: Tensor):
        x_hat, inv_std, weight, count = ctx.saved_tensors
        ndim = x_hat.dim()
        dims = _reduction_dims(ndim)
        channels = x_hat.shape[1]
        dy = dy.to(x_hat.dtype)
        local_sums = torch.cat([dy.sum(dims, dtype=_WIRE_DTYPE), (dy * x_hat).sum(dims, dtype=_WIRE_DTYPE)])
        dbeta_local, dgamma_local = local_sums[:channels], local_sums[channels:]

        dx = None
        if ctx.needs_input_grad[0]:
            global_sums = local_sums.clone()
            dist.all_reduce(global_sums, group=ctx.process_group)
            mean_dy = (global_sums[:channels] / count).to(x_hat.dtype)
            mean_dy_x_hat = (global_sums[channels:] / count).to(x_hat.dtype)
            scale = inv_std if weight is None else inv_std * weight.to(x_hat.dtype)
            # The gradient of x_hat, projected off 1 and off x_hat over the global batch, then scaled by weight / sigma.
            dx = (dy - _per_channel(mean_dy, ndim) - x_hat * _per_channel(mean_dy_x_hat, ndim)) * _per_channel(
                scale, ndim
            )
            dx = dx.to(ctx.input_dtype)
        dweight = dgamma_local.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        dbias = dbeta_local.to(x_hat.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dweight, dbias, None, None


class SyncBatchNorm(_BatchNorm):
    """Batch normalization whose training statistics are those of all ranks' batches together.

    Input (N, C) or (N, C, *spatial), like ``torch.nn.SyncBatchNorm``; constructor arguments, parameters, buffers and
    ``state_dict`` keys are torch's. Under an initialized process group of more than one rank, in training mode, every
    rank normalizes with the global mean and biased variance of the union of the ranks' batches (which may differ in
    size), and updates its running statistics with the global mean and the unbiased variance over the total count, so
    they stay identical on every rank. In every other case (no process group, a world of one, eval mode) it is exactly
    bnnotes' BatchNorm. process_group: the group to synchronize over, None for the whole world.
    The gradients of weight and bias are this rank's share: use the layer inside DistributedDataParallel (or all-reduce
    the parameter gradients yourself), as with any data-parallel model.

    >>> bn = SyncBatchNorm(3)
    >>> bn(torch.randn(8, 3)).shape  # no process group here: plain BatchNorm
    torch.Size([8, 3])
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any = None,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(
                f"SyncBatchNorm expected input of shape (N, C) or (N, C, *spatial), got {input.dim()}-D input "
                f"of shape {tuple(input.shape)}"
            )

    def forward(self, input: Tensor) -> Tensor:
        _check_input(input)
        if not self.training or sync_world_size(self.process_group) < 2:
            return super().forward(input)
        self._check_input_dim(input)
        self._check_num_features(input)
        momentum = _step_momentum(
            self.momentum, self.num_batches_tracked if self.track_running_stats else None, self.training
        )
        y, batch_mean, batch_var, count = SyncBatchNormFunction.apply(
            input, self.weight, self.bias, self.eps, self.process_group
        )
        if self.track_running_stats:
            with torch.no_grad():
                unbiased_var = batch_var * (count / (count - 1))
                self.running_mean.mul_(1.0 - momentum).add_(batch_mean.to(self.running_mean.dtype), alpha=momentum)
                self.running_var.mul_(1.0 - momentum).add_(unbiased_var.to(self.running_var.dtype), alpha=momentum)
        return y


# The layers `convert_sync_batchnorm` replaces: exactly these types, so that layers which only look like BN (Batch
# Renorm, Ghost BN) are left alone.
_CONVERTIBLE = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    SyncBatchNorm,
)


def convert_sync_batchnorm(module: nn.Module, process_group: Any = None) -> nn.Module:
    """Replace every BatchNorm layer in `module` by a `SyncBatchNorm`, like ``nn.SyncBatchNorm.convert_sync_batchnorm``.

    Converts torch.nn's ``BatchNorm{1,2,3}d`` and ``SyncBatchNorm`` and bnnotes' ``BatchNorm{1,2,3}d``. The new layer
    takes over the old one's parameter and buffer *tensors* (so an optimizer built before the conversion still
    updates them), its hyper-parameters and its train/eval mode. process_group: see `SyncBatchNorm`.
    Returns the converted module: `module` itself, changed in place, unless `module` is a BN layer.

    >>> net = convert_sync_batchnorm(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)))
    >>> type(net[1]).__name__
    'SyncBatchNorm'
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    converted = module
    if type(module) in _CONVERTIBLE:
        converted = SyncBatchNorm(
            module.num_features,
            eps=module.eps,
            momentum=module.momentum,
            affine=module.affine,
            track_running_stats=module.track_running_stats,
            process_group=process_group,
        )
        if module.affine:
            converted.weight = module.weight
            converted.bias = module.bias
        converted.running_mean = module.running_mean
        converted.running_var = module.running_var
        converted.num_batches_tracked = module.num_batches_tracked
        converted.training = module.training
    for name, child in module.named_children():
        converted.add_module(name, convert_sync_batchnorm(child, process_group))
    return converted
