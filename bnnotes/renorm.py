"""Batch Renormalization (Ioffe, 2017) in PyTorch, with a hand-written backward.

Batch Renormalization keeps BN's per-batch normalization but corrects it towards the moving averages, so that the
training output is the inference output whenever the correction is not clipped (Algorithm 1 of the paper):

    sigma_B = sqrt(var_B + eps)                      (biased batch variance)
    r = clip(sigma_B / sigma, 1/r_max, r_max)        (no gradient)
    d = clip((mu_B - mu) / sigma, -d_max, d_max)     (no gradient)
    y = gamma * (((x - mu_B) / sigma_B) * r + d) + beta
    mu <- mu + momentum * (mu_B - mu),   sigma <- sigma + momentum * (sigma_B - sigma)

and at inference ``y = gamma * (x - mu) / sigma + beta``. The moving averages are of the mean and of the *standard
deviation* (buffers ``running_mean`` and ``running_std``, starting from 0 and 1), not of the variance as in BN.
With ``r_max = 1`` and ``d_max = 0`` (the defaults, and the paper's warm-up) the layer is exactly BN in training.
`renorm_schedule` gives the paper's relaxation of r_max and d_max; they are plain attributes, so a training loop may
set them before every step.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from bnnotes._core import (
    RunningStatsNorm,
    affine_inference,
    batch_mean_var,
    check_eps,
    check_input,
    compute_dtype,
    ema_,
    normalize_backward,
    per_channel_affine,
    reduction_dims,
    values_per_channel,
)

__all__ = [
    "batch_renorm",
    "BatchRenormFunction",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "renorm_schedule",
]


def _check_clip_limits(r_max: float, d_max: float) -> None:
    if not (isinstance(r_max, (int, float)) and math.isfinite(r_max) and r_max >= 1.0):
        raise ValueError(f"r_max must be a finite number >= 1 (r is clipped to [1/r_max, r_max]), got {r_max!r}")
    if not (isinstance(d_max, (int, float)) and math.isfinite(d_max) and d_max >= 0.0):
        raise ValueError(f"d_max must be a finite number >= 0 (d is clipped to [-d_max, d_max]), got {d_max!r}")


class BatchRenormFunction(torch.autograd.Function):
    """Training-mode Batch Renormalization with the closed-form backward (r and d are constants, Ioffe 2017, Alg. 1).

    forward(x, weight, bias, running_mean, running_std, r_max, d_max, eps): x is (N, C, *spatial); weight and bias
    are (C,) tensors or None; running_mean and running_std are (C,) and only read.
    Returns (y, batch_mean, batch_std, r, d): y has x's shape and dtype; the other four are (C,) in the compute dtype
    (float32 for half-precision input) and carry no gradient.

    Backward: up to the constant shift gamma * d + beta, the output is BN of x with gain gamma * r, so
    dx = (gamma * r / sigma_B) * (dy - mean(dy) - x_hat * mean(dy * x_hat)),
    dgamma = sum(dy * (x_hat * r + d)) and dbeta = sum(dy), sums and means per channel over N and space
    (`bnnotes._core.normalize_backward`). Double backward is supported, with r and d held constant.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor,
        running_std: Tensor,
        r_max: float,
        d_max: float,
        eps: float,
    ):
        compute = compute_dtype(x)
        batch_mean, batch_var, scratch = batch_mean_var(x, reduction_dims(x.dim()), compute)
        batch_std = torch.sqrt(batch_var + eps)
        inv_std = batch_std.reciprocal()
        moving_std = running_std.to(compute)
        r = (batch_std / moving_std).clamp(1.0 / r_max, r_max)
        d = ((batch_mean - running_mean.to(compute)) / moving_std).clamp(-d_max, d_max)
        # y = gain * x_hat + shift with gain = gamma * r and shift = gamma * d + beta, written over the scratch tensor.
        gain = r if weight is None else weight.to(compute) * r
        shift = d if weight is None else weight.to(compute) * d
        if bias is not None:
            shift = shift + bias.to(compute)
        scale = gain * inv_std
        y = per_channel_affine(x, scale, shift - batch_mean * scale, out=scratch)
        ctx.save_for_backward(x, batch_mean, inv_std, weight, r, d)
        ctx.eps = eps
        ctx.has_bias = bias is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(batch_mean, batch_std, r, d)
        return (y if y.dtype == x.dtype else y.to(x.dtype)), batch_mean, batch_std, r, d

    @staticmethod
    def backward(ctx: Any, dy: Tensor, *_unused: Tensor | None):
        x, batch_mean, inv_std, weight, r, d = ctx.saved_tensors
        need_dx, need_dweight, need_dbias = ctx.needs_input_grad[:3]
        gain = r if weight is None else weight.to(r.dtype) * r
        dx, sum_dy, sum_dy_x_hat = normalize_backward(dy, x, batch_mean, inv_std, gain, ctx.eps, need_dx)
        if need_dx and dx.dtype != x.dtype:
            dx = dx.to(x.dtype)
        dweight = (r * sum_dy_x_hat + d * sum_dy).to(weight.dtype) if weight is not None and need_dweight else None
        dbias = sum_dy.to(ctx.bias_dtype) if ctx.has_bias and need_dbias else None
        return dx, dweight, dbias, None, None, None, None, None


def batch_renorm(
    input: Tensor,
    running_mean: Tensor,
    running_std: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.01,
    eps: float = 1e-5,
    r_max: float = 1.0,
    d_max: float = 0.0,
) -> Tensor:
    """Batch Renormalization, functional form (Ioffe, 2017, Algorithm 1), in the style of ``F.batch_norm``.

    input: (N, C) or (N, C, *spatial). running_mean, running_std: (C,), the moving mean and moving standard deviation;
    required in both modes, updated in place when training (``mu += momentum * (mu_B - mu)``, likewise sigma).
    weight, bias: (C,) or None. r_max >= 1 and d_max >= 0 bound the corrections r and d.
    Returns a tensor with input's shape and dtype.

    >>> x = torch.tensor([[1.0], [3.0]])
    >>> mu, sigma = torch.zeros(1), torch.ones(1)
    >>> batch_renorm(x, mu, sigma, training=True, momentum=0.5, eps=0.0).flatten().tolist()
    [-1.0, 1.0]
    >>> mu.tolist(), sigma.tolist()
    ([1.0], [1.0])
    """
    check_input(input, running_mean=running_mean, running_std=running_std, weight=weight, bias=bias)
    if running_mean is None or running_std is None:
        raise ValueError("batch_renorm needs running_mean and running_std (C,) tensors in training and in eval")
    if not training:
        # Inference: y = gamma * (x - mu) / sigma + beta, a per-channel affine map; autograd handles it.
        return affine_inference(input, running_mean, running_std.reciprocal(), weight, bias)

    _check_clip_limits(r_max, d_max)
    if values_per_channel(input) <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.shape}")
    y, batch_mean, batch_std, _r, _d = BatchRenormFunction.apply(
        input, weight, bias, running_mean, running_std, float(r_max), float(d_max), eps
    )
    with torch.no_grad():
        # mu <- mu + momentum * (mu_B - mu) and sigma <- sigma + momentum * (sigma_B - sigma): linear interpolations.
        ema_(running_mean, batch_mean, momentum)
        ema_(running_std, batch_std, momentum)
    return y


class _BatchRenorm(RunningStatsNorm):
    """Shared constructor and forward of `BatchRenorm1d/2d` (state and checks: `bnnotes._core.RunningStatsNorm`).

    Parameters ``weight`` (gamma) and ``bias`` (beta) as in torch's BN; buffers ``running_mean`` (0),
    ``running_std`` (1) and ``num_batches_tracked``. ``r_max`` and ``d_max`` are plain attributes: set them between
    steps, e.g. from `renorm_schedule`. momentum=None makes the moving averages cumulative (weight 1/t at step t).
    """

    running_stats = {"running_mean": 0.0, "running_std": 1.0}

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.01,
        r_max: float = 1.0,
        d_max: float = 0.0,
        affine: bool = True,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats=True, device=device, dtype=dtype)
        check_eps(eps, batch_statistics=True)  # training normalizes with batch statistics
        _check_clip_limits(r_max, d_max)
        self.r_max = r_max
        self.d_max = d_max

    def forward(self, input: Tensor) -> Tensor:
        self._check_forward_input(input)
        return batch_renorm(
            input,
            self.running_mean,
            self.running_std,
            self.weight,
            self.bias,
            self.training,
            self._momentum(),
            self.eps,
            self.r_max,
            self.d_max,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, r_max={self.r_max}, "
            f"d_max={self.d_max}, affine={self.affine}"
        )


class BatchRenorm1d(_BatchRenorm):
    """Batch Renormalization for input (N, C) or (N, C, L); the counterpart of ``BatchNorm1d``.

    >>> layer = BatchRenorm1d(4, r_max=3.0, d_max=5.0)
    >>> layer(torch.randn(8, 4)).shape
    torch.Size([8, 4])
    """

    input_ranks = (2, 3)
    input_layout = "(N, C) or (N, C, L)"


class BatchRenorm2d(_BatchRenorm):
    """Batch Renormalization for input (N, C, H, W); the counterpart of ``BatchNorm2d``."""

    input_ranks = (4,)
    input_layout = "(N, C, H, W)"


def renorm_schedule(
    step: int,
    warmup_steps: int = 5000,
    rmax_steps: int = 40000,
    dmax_steps: int = 25000,
    r_max_final: float = 3.0,
    d_max_final: float = 5.0,
) -> tuple[float, float]:
    """The paper's relaxation of the clipping limits: (r_max, d_max) to use at training step `step` (0-based).

    Ioffe (2017, Sec. 4.1) keeps r_max = 1 and d_max = 0 (plain BN) for the first 5000 steps, then relaxes them
    "gradually" to reach r_max = 3 at 40k steps and d_max = 5 at 25k steps. The paper does not give the shape of the
    ramp; this helper ramps linearly from `warmup_steps` to `rmax_steps` (resp. `dmax_steps`) and holds the final
    values afterwards. Scale the step counts down for short runs.

    >>> renorm_schedule(0), renorm_schedule(5000), renorm_schedule(25000), renorm_schedule(40000)
    ((1.0, 0.0), (1.0, 0.0), (2.142857142857143, 5.0), (3.0, 5.0))
    >>> renorm_schedule(30, warmup_steps=10, rmax_steps=50, dmax_steps=30)
    (2.0, 5.0)
    """
    for name, value in {"step": step, "warmup_steps": warmup_steps, "rmax_steps": rmax_steps,
                        "dmax_steps": dmax_steps}.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    if rmax_steps < warmup_steps or dmax_steps < warmup_steps:
        raise ValueError(
            f"rmax_steps and dmax_steps must be >= warmup_steps, got warmup_steps={warmup_steps}, "
            f"rmax_steps={rmax_steps}, dmax_steps={dmax_steps}"
        )
    _check_clip_limits(r_max_final, d_max_final)

    def progress(end: int) -> float:
        if step <= warmup_steps:
            return 0.0
        if step >= end:
            return 1.0
        return (step - warmup_steps) / (end - warmup_steps)

    r_max = 1.0 + (r_max_final - 1.0) * progress(rmax_steps)
    d_max = d_max_final * progress(dmax_steps)
    return float(r_max), float(d_max)
