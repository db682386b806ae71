"""Teaching variants of batch normalization: BN with one ingredient changed, to show what that ingredient does.

Each variant is a small subclass of `bnnotes.torch_bn.BatchNorm1d` (input (N, C) or (N, C, L)) that keeps BN's
parameters, buffers and running-average rule, and changes one thing:

- `MovingAverageBatchNorm1d` (pitfalls): normalizes with the moving averages during training too.
- `DetachedStatsBatchNorm1d` (derivation): BN's output, but the backward treats the batch statistics as constants.
- `EvalModeBatchNorm1d` (pitfalls): frozen statistics; it stays in eval mode, and `freeze_bn_statistics` swaps it in.
- `MeanOnlyBatchNorm1d` and `VarianceOnlyBatchNorm1d` (the ablation exercises): only one of BN's two steps, centring
  or division by the batch standard deviation.

`ActivationNoise` (landscape) is not a normalizer but the noise that Santurkar et al. (2018) inject after BN to make
its output distribution unstable on purpose; ``landscape.with_noise`` builds the "noisy BN" from it.

Every BN-like layer is registered by name in `bnnotes.experiments.models.NORMS` ("bn-moving", "bn-detached",
"bn-frozen", "bn-mean-only", "bn-var-only", ...), so that an experiment can name it: a new variant is its class here
plus one line there.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from bnnotes.torch_bn import BatchNorm1d, batch_norm

__all__ = [
    "MovingAverageBatchNorm1d",
    "DetachedStatsBatchNorm1d",
    "EvalModeBatchNorm1d",
    "freeze_bn_statistics",
    "MeanOnlyBatchNorm1d",
    "VarianceOnlyBatchNorm1d",
    "ActivationNoise",
]


def _per_channel(v: Tensor, ndim: int) -> Tensor:
    """A (C,) vector viewed as (1, C) or (1, C, 1), to broadcast against an (N, C) or (N, C, L) input."""
    return v.view((1, -1) + (1,) * (ndim - 2))


def _batch_mean_var(input: Tensor) -> tuple[Tensor, Tensor]:
    """The per-channel mean and biased variance of input over N (and L): two (C,) tensors, in autograd's graph."""
    batch_var, batch_mean = torch.var_mean(input, dim=[0, *range(2, input.dim())], correction=0)
    return batch_mean, batch_var


def _affine(layer: BatchNorm1d, x_hat: Tensor) -> Tensor:
    """gamma * x_hat + beta, per channel, for whichever of gamma and beta the layer has."""
    if layer.weight is not None:
        x_hat = x_hat * _per_channel(layer.weight, x_hat.dim())
    if layer.bias is not None:
        x_hat = x_hat + _per_channel(layer.bias, x_hat.dim())
    return x_hat


def _bn_bookkeeping(layer: BatchNorm1d, input: Tensor) -> None:
    """BN's own input checks and, in training, its own running-average update (the output is discarded).

    A variant that calls this first validates its input and keeps ``running_mean``, ``running_var`` and
    ``num_batches_tracked`` exactly as `BatchNorm1d` would (momentum rule, unbiased variance): eval mode and the
    statistics tools then read the same buffers for every variant.
    """
    with torch.no_grad():
        BatchNorm1d.forward(layer, input)


def _normalizing_statistics(layer: BatchNorm1d, input: Tensor) -> tuple[Tensor, Tensor]:
    """The (mean, biased variance) a variant normalizes with: the batch's in training, the running ones in eval.

    Like BN, eval mode without running buffers (``track_running_stats=False``) uses the batch's too.
    """
    _bn_bookkeeping(layer, input)
    if layer.training or layer.running_mean is None:
        return _batch_mean_var(input)
    return layer.running_mean, layer.running_var


# --------------------------------------------------------------------------------------------------------------------
# Statistics outside the gradient (derivation, pitfalls)
# --------------------------------------------------------------------------------------------------------------------


class MovingAverageBatchNorm1d(BatchNorm1d):
    """BN that normalizes with its moving averages in training too: the variant Ioffe (2017, Sec. 2) warns against.

    Used by the pitfalls chapter. In training mode every batch first updates ``running_mean`` and ``running_var``
    exactly as `BatchNorm1d` does (same momentum, unbiased variance), and the output is then Algorithm 2's affine map
    with those statistics, ``y = weight * (x - running_mean) / sqrt(running_var + eps) + bias``. The statistics are
    buffers, so the gradient treats them as constants: backpropagation sees a fixed per-feature affine map, not the
    normalization. In eval mode the layer is `BatchNorm1d`. input: (N, C) or (N, C, L); returns the same shape.

    >>> layer = MovingAverageBatchNorm1d(3, momentum=1.0)
    >>> y = layer(torch.tensor([[0.0, 1.0, 2.0], [2.0, 3.0, 6.0]]))
    >>> layer.running_mean.tolist(), layer.running_var.tolist()
    ([1.0, 2.0, 4.0], [2.0, 2.0, 8.0])
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 device: Any = None, dtype: Any = None) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine, track_running_stats=True,
                         device=device, dtype=dtype)

    def forward(self, input: Tensor) -> Tensor:
        if not self.training:
            return super().forward(input)
        with torch.no_grad():
            super().forward(input)  # BN's own update of the running statistics; its output is not used
        return batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias, training=False,
                          eps=self.eps)


class DetachedStatsBatchNorm1d(BatchNorm1d):
    """BatchNorm1d whose training backward treats the batch mean and variance as constants (a wrong gradient).

    Used by the derivation chapter. The forward output is exactly BN's; only the gradient differs: it flows through
    ``(x - mean) / std`` as if mean and std were fixed numbers, the "normalization outside the gradient step" of
    Ioffe & Szegedy (2015, Section 2). Running statistics follow PyTorch's rule, and eval mode is `BatchNorm1d`'s.
    input: (N, C) or (N, C, L); returns the same shape.

    >>> x = torch.tensor([[0.0], [2.0]], requires_grad=True)
    >>> DetachedStatsBatchNorm1d(1)(x).sum().backward()  # BN's true gradient of a sum is 0; here it is 1 / std
    >>> [round(g, 4) for g in x.grad.flatten().tolist()]
    [1.0, 1.0]
    """

    def forward(self, input: Tensor) -> Tensor:
        if not self.training:
            return super().forward(input)
        _bn_bookkeeping(self, input)
        with torch.no_grad():  # the statistics are computed, and then cut out of the graph
            batch_mean, batch_var = _batch_mean_var(input)
        ndim = input.dim()
        x_hat = (input - _per_channel(batch_mean, ndim)) * _per_channel(torch.rsqrt(batch_var + self.eps), ndim)
        return _affine(self, x_hat)


class EvalModeBatchNorm1d(BatchNorm1d):
    """A `BatchNorm1d` that stays in eval mode: it normalizes with its running statistics and never updates them.

    Used by the pitfalls chapter (fine-tuning with tiny batches). ``model.train()`` does not switch it to batch
    statistics; weight and bias are still trained, through the fixed affine map. This is "BN layers in eval mode"
    during fine-tuning, made robust to training loops that call ``model.train()`` before every step.

    >>> layer = EvalModeBatchNorm1d(2).train()
    >>> layer.training
    False
    """

    def train(self, mode: bool = True) -> "EvalModeBatchNorm1d":
        return super().train(False)


def freeze_bn_statistics(model: nn.Module) -> nn.Module:
    """Replace every `BatchNorm1d` of `model` by an `EvalModeBatchNorm1d` sharing its parameters and buffers.

    Works in place on containers and returns the (possibly new) root module. Only exact `BatchNorm1d` layers are
    replaced (not the other variants). Parameters and buffers are the same objects, so an optimizer built before the
    swap still trains weight and bias.

    >>> from bnnotes.experiments.models import mlp
    >>> model = freeze_bn_statistics(mlp(4, hidden=(3,), norm="bn"))
    >>> _ = model.train(); type(model[1]).__name__, model[1].training
    ('EvalModeBatchNorm1d', False)
    """
    if type(model) is BatchNorm1d:
        frozen = EvalModeBatchNorm1d(model.num_features, eps=model.eps, momentum=model.momentum,
                                     affine=model.affine, track_running_stats=model.track_running_stats,
                                     device="meta")
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            setattr(frozen, name, getattr(model, name))
        return frozen
    for name, child in model.named_children():
        new_child = freeze_bn_statistics(child)
        if new_child is not child:
            setattr(model, name, new_child)
    return model


# --------------------------------------------------------------------------------------------------------------------
# Half of BN (the ablation exercises)
# --------------------------------------------------------------------------------------------------------------------


class MeanOnlyBatchNorm1d(BatchNorm1d):
    """BN's first step only: centre each feature by its batch mean, no division, ``y = weight * (x - mean) + bias``.

    For the ablation exercises (``models.NORMS["bn-mean-only"]``): what does centring alone buy? The gradient flows
    through the batch mean, so it is projected off the all-ones direction as in BN, but the scale of x is not
    controlled. Training mode uses the batch mean, eval mode ``running_mean``. The running buffers (``running_var``
    included) are updated exactly as `BatchNorm1d` updates them, so the statistics tools treat every variant alike.
    input: (N, C) or (N, C, L); returns the same shape.

    >>> layer = MeanOnlyBatchNorm1d(1)
    >>> layer(torch.tensor([[1.0], [5.0]])).flatten().tolist()
    [-2.0, 2.0]
    """

    def forward(self, input: Tensor) -> Tensor:
        mean, _ = _normalizing_statistics(self, input)
        return _affine(self, input - _per_channel(mean, input.dim()))


class VarianceOnlyBatchNorm1d(BatchNorm1d):
    """BN's second step only: divide each feature by its batch standard deviation, no centring,
    ``y = weight * x / sqrt(var + eps) + bias`` (var is the biased batch variance, taken around the batch mean).

    For the ablation exercises (``models.NORMS["bn-var-only"]``): what does scale control alone buy? The gradient
    flows through the variance (and through the mean inside it). Training mode uses the batch variance, eval mode
    ``running_var``. The running buffers are updated exactly as `BatchNorm1d` updates them.
    input: (N, C) or (N, C, L); returns the same shape.

    >>> layer = VarianceOnlyBatchNorm1d(1)
    >>> [round(y, 4) for y in layer(torch.tensor([[1.0], [5.0]])).flatten().tolist()]
    [0.5, 2.5]
    """

    def forward(self, input: Tensor) -> Tensor:
        _, var = _normalizing_statistics(self, input)
        return _affine(self, input * _per_channel(torch.rsqrt(var + self.eps), input.dim()))


# --------------------------------------------------------------------------------------------------------------------
# Noise injection (landscape)
# --------------------------------------------------------------------------------------------------------------------


class ActivationNoise(nn.Module):
    """Additive noise whose distribution is redrawn at every training step (train mode only; eval mode is the identity).

    Used by the landscape chapter, after BN, as Santurkar et al.'s (2018) "noisy BatchNorm". At every call in train
    mode, for each of the `width` units j, the step's noise distribution is drawn: mean mu_j ~ U(-mean_range,
    mean_range) and standard deviation s_j ~ U(std_range[0], std_range[1]). Then every activation of every example gets
    its own i.i.d. draw: out_ij = x_ij + eps_ij with eps_ij ~ N(mu_j, s_j^2). The generator is the module's own, seeded
    by `seed`, so runs are reproducible and the global RNG is untouched. input: (N, width); returns the same shape.

    >>> noise = ActivationNoise(3, seed=0).eval()
    >>> bool((noise(torch.ones(2, 3)) == 1).all())
    True
    """

    def __init__(
        self, width: int, mean_range: float = 0.5, std_range: tuple[float, float] = (1.0, 1.5), seed: int = 0
    ) -> None:
        super().__init__()
        if not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be a positive integer, got {width!r}")
        if mean_range < 0:
            raise ValueError(f"mean_range must be non-negative, got {mean_range!r}")
        low, high = std_range
        if not 0 <= low <= high:
            raise ValueError(f"std_range must be (low, high) with 0 <= low <= high, got {std_range!r}")
        self.width = width
        self.mean_range = float(mean_range)
        self.std_range = (float(low), float(high))
        self.enabled = True
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or not self.enabled:
            return x
        g = self.generator
        mean = (2.0 * torch.rand(self.width, generator=g) - 1.0) * self.mean_range
        low, high = self.std_range
        std = low + (high - low) * torch.rand(self.width, generator=g)
        eps = torch.randn(x.shape, generator=g) * std + mean
        return x + eps.to(device=x.device, dtype=x.dtype)

    def extra_repr(self) -> str:
        return f"{self.width}, mean_range={self.mean_range}, std_range={self.std_range}"
