"""Synchronized batch normalization over ``torch.distributed``: the statistics of the union of all ranks' batches.

In data-parallel training every rank (process, usually one per device) holds a slice of the global batch. Plain BN
normalizes each slice with its own statistics; `SyncBatchNorm` normalizes every slice with the statistics of the whole
global batch, as a single process holding all of it would. It is a ``torch.nn.SyncBatchNorm`` (constructor,
parameters, buffers, ``state_dict``, ``repr`` and ``isinstance`` are torch's) whose computation is bnnotes' own, in
plain tensor ops, so it runs with any backend: gloo on the CPU, nccl on CUDA devices. (torch's kernels are GPU-only.)

Communication, per layer and training step: one round in the forward pass and one in the backward pass.

====================  ===============================================================  ==================
pass                  collective                                                       floats per rank
====================  ===============================================================  ==================
forward               all-gather of this rank's (count, mean, biased variance)         2C + 1
backward              all-reduce (sum) of sum(dy), sum(dy * x_hat), per channel         2C
====================  ===============================================================  ==================

The forward merges the K gathered triples with `combine_statistics` (Chan, Golub & LeVeque's parallel formula): the
result is the mean and variance of the concatenated batch, computed from centred quantities only, so it is as
accurate as single-process BN for any data. One all-reduce of (count, sum of x, sum of x^2) would be one round too,
but ``E[x^2] - E[x]^2`` cancels catastrophically when the mean is large compared with the spread. This is also
PyTorch's algorithm: ``torch.nn.SyncBatchNorm`` all-gathers each rank's (mean, invstd, count) and merges them with
``torch.batch_norm_gather_stats_with_counts`` (a loop of Chan's pairwise update over the ranks); it sends invstd where
we send the variance, from which invstd is recovered exactly.

Statistics and gradient sums travel in float64: the count must be exact (float32 counts stop being integers above
2^24 values per channel), and the messages are a few thousand numbers, whose cost is latency, not bandwidth.

Everything else (no process group, a world of one, eval mode) is `bnnotes.torch_bn.batch_norm`, with torch's rules
for the running statistics. On the CPU, torch's ``DistributedDataParallel`` refuses every ``nn.SyncBatchNorm`` layer
(torch's own could not run there); `DistributedDataParallel` here is torch's with that check limited to torch's layers.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from bnnotes._core import (
    LOW_PRECISION,
    check_channels,
    check_eps,
    check_input_dim,
    compute_dtype,
    ema_,
    per_channel,
    reduction_dims,
    step_momentum,
    unbiased_variance,
)
from bnnotes.convert import convert_sync_batchnorm
from bnnotes.torch_bn import batch_norm

__all__ = [
    "combine_statistics",
    "SyncBatchNorm",
    "SyncBatchNormFunction",
    "convert_sync_batchnorm",
    "DistributedDataParallel",
    "sync_world_size",
]

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


def combine_statistics(counts: Tensor, means: Tensor, variances: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The mean and biased variance of the union of K groups, from each group's count, mean and biased variance.

    counts: (K,) values per channel in each group (may be 0). means, variances: (K, C), the groups' per-channel means
    and biased variances; rows of empty groups are ignored, whatever they hold. Returns (mean, var, count): the
    union's (C,) mean and biased variance and its total count (a 0-d tensor); mean and var are NaN if count is 0.

    With n = sum_k n_k, the sum of squared deviations from the overall mean splits into a within-group and a
    between-group part (Chan, Golub & LeVeque, 1983; for K = 2 the between part is n_1 n_2 (mean_2 - mean_1)^2 / n):

        mean = sum_k n_k mean_k / n,        n var = sum_k n_k var_k + sum_k n_k (mean_k - mean)^2.

    Every term is a non-negative number on the scale of the data's spread: nothing cancels, unlike
    sum(x^2) / n - mean^2.

    >>> counts, means, variances = torch.tensor([2.0, 2.0]), torch.tensor([[0.0], [2.0]]), torch.tensor([[1.0], [1.0]])
    >>> [t.tolist() for t in combine_statistics(counts, means, variances)]  # {-1, 1} and {1, 3}
    [[1.0], [2.0], 4.0]
    """
    if counts.dim() != 1 or means.dim() != 2 or means.shape != variances.shape or means.shape[0] != counts.shape[0]:
        raise ValueError(
            f"expected counts (K,), means (K, C) and variances (K, C), got shapes {tuple(counts.shape)}, "
            f"{tuple(means.shape)} and {tuple(variances.shape)}"
        )
    present = (counts > 0).unsqueeze(1)  # (K, 1): an empty group's row holds no statistics (maybe NaN)
    weights = counts.unsqueeze(1).to(means.dtype)  # (K, 1)
    count = counts.sum()
    mean = torch.where(present, weights * means, 0).sum(0) / count  # (C,)
    within = torch.where(present, weights * variances, 0).sum(0)
    between = torch.where(present, weights * (means - mean).square(), 0).sum(0)
    return mean, (within + between) / count, count


class SyncBatchNormFunction(torch.autograd.Function):
    """Training-mode BN over the union of all ranks' batches, with a closed-form backward.

    forward(x, weight, bias, eps, process_group): x is this rank's (N_r, C, *spatial), N_r may differ between ranks
    and may be 0; weight and bias are (C,) tensors or None. Every rank of the group must call it.
    Returns (y, batch_mean, batch_var, count): y has x's shape and dtype; batch_mean and batch_var are the global
    per-channel mean and *biased* variance (float64, no gradient), identical on every rank; count is the global number
    of values per channel, a float64 scalar tensor.

    Forward: one all-gather of every rank's (count, mean, variance), merged by `combine_statistics`.
    Backward: with m the global count and the sums taken over every rank's values,
    dx = (weight / sigma) * (dy - sum(dy) / m - x_hat * sum(dy * x_hat) / m); only the two per-channel sums are
    all-reduced. dweight = sum(dy * x_hat) and dbias = sum(dy) are this rank's local sums: the data-parallel wrapper
    (DistributedDataParallel) reduces parameter gradients itself, so reducing them here would count them twice.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, process_group: Any):
        ndim, channels = x.dim(), x.shape[1]
        dims = reduction_dims(ndim)
        compute = compute_dtype(x)
        xc = x.to(compute)
        local_count = x.numel() // channels

        # This rank's statistics by two passes (the mean, then squared deviations from it), sent in float64.
        local_mean = xc.sum(dims, dtype=_WIRE_DTYPE) / max(local_count, 1)
        local_var = (xc - per_channel(local_mean.to(compute), ndim)).square().sum(dims, dtype=_WIRE_DTYPE)
        local_var = local_var / max(local_count, 1)
        count_tensor = torch.tensor([float(local_count)], dtype=_WIRE_DTYPE, device=x.device)

        # The one round: every rank receives every rank's (count, mean, variance) ...
        packed = torch.cat([count_tensor, local_mean, local_var])  # (2C + 1,)
        gathered = [torch.empty_like(packed) for _ in range(dist.get_world_size(process_group))]
        dist.all_gather(gathered, packed, group=process_group)
        table = torch.stack(gathered)  # (K, 2C + 1)
        # ... and merges them identically, so every rank holds the same global statistics.
        batch_mean, batch_var, count = combine_statistics(
            table[:, 0], table[:, 1 : channels + 1], table[:, channels + 1 :]
        )
        # Every rank sees the same global count, so all of them raise here and none is left waiting in a collective.
        if count.item() <= 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got {int(count.item())} over all ranks "
                f"(this rank's input size {tuple(x.shape)})"
            )

        inv_std = torch.rsqrt(batch_var + eps).to(compute)
        x_hat = (xc - per_channel(batch_mean.to(compute), ndim)) * per_channel(inv_std, ndim)
        y = x_hat
        if weight is not None:
            y = y * per_channel(weight.to(compute), ndim)
        if bias is not None:
            y = y + per_channel(bias.to(compute), ndim)
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
        dims = reduction_dims(ndim)
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
            dx = (dy - per_channel(mean_dy, ndim) - x_hat * per_channel(mean_dy_x_hat, ndim)) * per_channel(
                scale, ndim
            )
            dx = dx.to(ctx.input_dtype)
        dweight = dgamma_local.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        dbias = dbeta_local.to(weight.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dweight, dbias, None, None


class SyncBatchNorm(nn.SyncBatchNorm):
    """``torch.nn.SyncBatchNorm`` with bnnotes' computation, on any device and backend (gloo on the CPU, nccl).

    Input (N, C) or (N, C, *spatial). Constructor, parameters, buffers, ``state_dict``, ``repr`` and loading are
    torch's (the class *is* a ``torch.nn.SyncBatchNorm``). Under an initialized process group of more than one rank,
    in training mode, every rank normalizes with the global mean and biased variance of the union of the ranks'
    batches (which may differ in size, and may be empty), computed in one round (`SyncBatchNormFunction`), and
    updates its running statistics with the global mean and the unbiased variance over the total count, so they stay
    identical on every rank. In every other case (no process group, a world of one, eval mode) it is
    `bnnotes.torch_bn.batch_norm` with torch's rules. process_group: the group to synchronize over, None for the world.
    The gradients of weight and bias are this rank's share: use the layer inside a data-parallel wrapper (on the CPU,
    `DistributedDataParallel` from this module), or all-reduce the parameter gradients yourself.

    >>> bn = SyncBatchNorm(3)
    >>> bn(torch.randn(8, 3)).shape  # no process group here: plain BatchNorm
    torch.Size([8, 3])
    >>> isinstance(bn, nn.SyncBatchNorm)
    True
    """

    if "bias" not in inspect.signature(nn.SyncBatchNorm.__init__).parameters:
        # Older torch (2.4 included) has no bias= argument: torch's layer with beta, then beta removed, as newer
        # torch does it (pytorch/pytorch#176573), so that the constructor is the same on every supported torch.
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
            *,
            bias: bool = True,
        ) -> None:
            super().__init__(num_features, eps, momentum, affine, track_running_stats, process_group, device, dtype)
            if not bias:
                self.register_parameter("bias", None)

        def reset_parameters(self) -> None:
            if self.bias is not None or not self.affine:
                super().reset_parameters()
                return
            self.reset_running_stats()  # older torch's reset would zero the absent bias
            nn.init.ones_(self.weight)

    def _check_input(self, input: Tensor) -> None:
        """Clear errors for what torch's layer would refuse: a non-tensor, integers, < 2 dims, channels, dtypes."""
        if not isinstance(input, Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
        if not input.is_floating_point():
            raise TypeError(f"input must be a floating-point tensor, got dtype {input.dtype}")
        check_input_dim(self, input, None, "(N, C) or (N, C, *spatial)")
        check_channels(self, input)
        # As torch: parameters in the input's dtype, or float32 parameters for float16/bfloat16 input.
        for name, t in (("weight", self.weight), ("running_mean", self.running_mean)):
            mixed_precision = input.dtype in LOW_PRECISION and t is not None and t.dtype == torch.float32
            if t is not None and t.dtype != input.dtype and not mixed_precision:
                raise TypeError(
                    f"input is {input.dtype} but the layer's {name} is {t.dtype}; expected the same dtype (or float32 "
                    f"parameters for float16/bfloat16 input): convert the layer with .to({input.dtype})"
                )

    def forward(self, input: Tensor) -> Tensor:
        self._check_input(input)
        # torch's rules (nn.SyncBatchNorm.forward), line for line: the newest batch's weight in the running averages,
        # momentum=None being the cumulative average 1/t at the t-th counted batch ...
        momentum = step_momentum(
            self.momentum, self.num_batches_tracked if self.track_running_stats else None, self.training
        )
        # ... batch statistics in training, and in eval only when there are no running buffers ...
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        # ... buffers updated only while training with track_running_stats ...
        update = not self.training or self.track_running_stats
        # ... eps > 0 with batch statistics, eps >= 0 with running ones (torch's rules, so as not to return NaN) ...
        check_eps(self.eps, batch_statistics=use_batch_stats)
        running_mean = self.running_mean if update else None
        running_var = self.running_var if update else None
        # ... and synchronization only while training, over more than one rank.
        if not (self.training and sync_world_size(self.process_group) > 1):
            return batch_norm(
                input, running_mean, running_var, self.weight, self.bias, use_batch_stats, momentum, self.eps
            )
        y, batch_mean, batch_var, count = SyncBatchNormFunction.apply(
            input, self.weight, self.bias, self.eps, self.process_group
        )
        if running_mean is not None:
            with torch.no_grad():
                ema_(running_mean, batch_mean, momentum)
                ema_(running_var, unbiased_variance(batch_var, int(count)), momentum)
        return y

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group: Any = None) -> nn.Module:
        """`bnnotes.convert.convert_sync_batchnorm` under torch's spelling (torch's, inherited, would build torch's
        layers)."""
        return convert_sync_batchnorm(module, process_group)


class DistributedDataParallel(nn.parallel.DistributedDataParallel):
    """torch's ``DistributedDataParallel``, which also accepts bnnotes' `SyncBatchNorm` in a CPU module.

    torch's wrapper raises "SyncBatchNorm layers only work with GPU modules" for any ``nn.SyncBatchNorm`` in a CPU
    module, because torch's own layer has GPU kernels only. bnnotes' layer runs on the CPU, so this wrapper keeps the
    check for torch's layers alone; everything else is torch's. Arguments: those of torch's class.
    """

    def _passing_sync_batchnorm_handle(self, module: nn.Module) -> None:
        modules = module.modules()
        torch_layers = [m for m in modules if isinstance(m, nn.SyncBatchNorm) and not isinstance(m, SyncBatchNorm)]
        if self.device_type != "cpu" or torch_layers:
            super()._passing_sync_batchnorm_handle(module)
