"""Ghost Batch Normalization (Hoffer, Hubara & Soudry, 2017, Algorithm 1): BN over virtual sub-batches.

In training mode a batch of N = k * V rows is cut into k consecutive *virtual* (ghost) batches of V =
``virtual_batch_size`` rows, and each is normalized with its own statistics:

    rows [0, V), [V, 2V), ... ; chunk l: y = gamma * (x - mean_l) / sqrt(var_l + eps) + beta

so a large batch gets the normalization noise of a batch of V. This is exactly what data-parallel training does with
per-device BN: k devices holding V rows each (see the data-parallel chapter).

Definitions, stated once here and tested:

- Training output and gradients: those of `bnnotes.torch_bn`'s BatchNorm applied to each chunk separately (the
  backward is BN's closed form, per chunk). N must be a multiple of V, as in Keras's ``virtual_batch_size``: a
  smaller last chunk would be normalized with much noisier statistics than the others, silently; drop the last
  incomplete batch instead, or pick a V that divides N.
- Running statistics: those of BatchNorm fed the k chunks one after another (Algorithm 1 of the paper updates them
  once per ghost batch): with momentum m, ``running <- (1 - m)^k running + sum_l m (1 - m)^(k - 1 - l) stat_l``
  with the unbiased per-chunk variance; with momentum None the cumulative average over all chunks so far;
  ``num_batches_tracked`` grows by k. (Keras instead averages the k chunks' statistics and updates once.)
- Eval mode: identical to BatchNorm's (the running statistics; with ``track_running_stats=False``, the whole batch's
  statistics).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from bnnotes._core import RunningStatsNorm, unbiased_variance
from bnnotes.torch_bn import BatchNormFunction, batch_norm

__all__ = ["GhostBatchNorm1d", "GhostBatchNorm2d"]


def _running_update(running: Tensor, chunk_stats: Tensor, momentum: float | None, batches_before: int) -> None:
    """Update `running` (C,) in place as BN would after seeing the rows of `chunk_stats` (k, C) one at a time.

    batches_before: how many batches the running statistics already average (used only when momentum is None).
    """
    k = chunk_stats.shape[0]
    chunk_stats = chunk_stats.to(running.dtype)
    if momentum is None:
        # The cumulative average (torch's momentum 1/t at step t) over batches_before + k batches.
        running.mul_(batches_before).add_(chunk_stats.sum(0)).div_(batches_before + k)
        return
    # Unrolling k exponential-average steps: the l-th of k chunks keeps weight m (1 - m)^(k - 1 - l).
    ages = torch.arange(k - 1, -1, -1, dtype=running.dtype, device=running.device)
    weights = momentum * (1.0 - momentum) ** ages
    running.mul_((1.0 - momentum) ** k).add_(weights @ chunk_stats)


class _GhostBatchNorm(RunningStatsNorm):
    """Shared constructor and forward of `GhostBatchNorm1d/2d`: BN's state (`bnnotes._core.RunningStatsNorm`) plus
    ``virtual_batch_size``."""

    def __init__(
        self,
        num_features: int,
        virtual_batch_size: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        if isinstance(virtual_batch_size, bool) or not isinstance(virtual_batch_size, int) or virtual_batch_size < 1:
            raise ValueError(f"virtual_batch_size must be a positive integer, got {virtual_batch_size!r}")
        self.virtual_batch_size = virtual_batch_size

    def forward(self, input: Tensor) -> Tensor:
        self._check_forward_input(input)
        if not self.training:
            # Eval mode is BatchNorm's: the running statistics, or the whole batch's without them.
            use_batch_stats = self.running_mean is None
            return batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias, use_batch_stats,
                              0.0, self.eps)
        n, channels, spatial = input.shape[0], input.shape[1], tuple(input.shape[2:])
        v = self.virtual_batch_size
        if n % v != 0:
            raise ValueError(
                f"{type(self).__name__}(virtual_batch_size={v}) needs a training batch whose size is a multiple of "
                f"{v}, got N={n} (input.shape={tuple(input.shape)}); drop the last incomplete batch, or choose a "
                f"virtual_batch_size that divides the batch size"
            )
        values_per_chunk = input[:v].numel() // channels
        if values_per_chunk <= 1:
            raise ValueError(
                f"Expected more than 1 value per channel in each virtual batch, got virtual_batch_size={v} and "
                f"input size {tuple(input.shape)}"
            )
        k = n // v
        # Lay the k virtual batches side by side as k * C channels, (k*V, C, *s) -> (V, k*C, *s): one BN call then
        # normalizes each (chunk, channel) pair with its own statistics, with BN's closed-form backward.
        x_side_by_side = input.reshape((k, v, channels) + spatial).transpose(0, 1).reshape((v, k * channels) + spatial)
        weight = self.weight.repeat(k) if self.weight is not None else None
        bias = self.bias.repeat(k) if self.bias is not None else None
        y, chunk_mean, chunk_var = BatchNormFunction.apply(x_side_by_side, weight, bias, self.eps)
        y = y.reshape((v, k, channels) + spatial).transpose(0, 1).reshape(input.shape)
        if self.track_running_stats:
            with torch.no_grad():
                batches_before = int(self.num_batches_tracked) if self.momentum is None else 0
                self.num_batches_tracked.add_(k)
                unbiased_var = unbiased_variance(chunk_var, values_per_chunk)
                _running_update(self.running_mean, chunk_mean.view(k, channels), self.momentum, batches_before)
                _running_update(self.running_var, unbiased_var.view(k, channels), self.momentum, batches_before)
        return y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"


class GhostBatchNorm1d(_GhostBatchNorm):
    """Ghost BN over (N, C) or (N, C, L): BatchNorm1d on each consecutive virtual batch of `virtual_batch_size` rows.

    Arguments, parameters and buffers are ``torch.nn.BatchNorm1d``'s plus `virtual_batch_size` (the second argument);
    the ``state_dict`` keys are BatchNorm1d's. See the module docstring for the running statistics and eval mode.

    >>> gbn = GhostBatchNorm1d(1, virtual_batch_size=2, eps=0.0)
    >>> gbn(torch.tensor([[0.0], [2.0], [10.0], [30.0]])).flatten().tolist()
    [-1.0, 1.0, -1.0, 1.0]
    """

    input_ranks = (2, 3)
    input_layout = "(N, C) or (N, C, L)"


class GhostBatchNorm2d(_GhostBatchNorm):
    """Ghost BN over (N, C, H, W): BatchNorm2d on each consecutive virtual batch of `virtual_batch_size` images.

    Statistics of a virtual batch are per channel over its V images and all their positions. Arguments as
    `GhostBatchNorm1d`.
    """

    input_ranks = (4,)
    input_layout = "(N, C, H, W)"
