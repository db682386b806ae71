"""Batch normalization in PyTorch with a hand-written backward, on any device.

`batch_norm` has the signature and semantics of ``torch.nn.functional.batch_norm``; `BatchNorm1d`, `BatchNorm2d` and
`BatchNorm3d` are drop-in replacements for torch.nn's, with the same constructor arguments, buffers and ``state_dict``
keys. The gradient is the closed form derived in the course (an ``autograd.Function``), not autograd over composed ops,
and PyTorch's own BN kernels are never called here: they are the reference in the tests and the benchmark only.

float16 and bfloat16 inputs are normalized with float32 statistics and returned in their own dtype.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "batch_norm",
    "BatchNormFunction",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "convert_batchnorm",
    "to_torch_batchnorm",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _reduction_dims(ndim: int) -> list[int]:
    """Statistics are per channel (dim 1), over the batch dim 0 and every spatial dim."""
    return [0] + list(range(2, ndim))


def _per_channel(v: Tensor, ndim: int) -> Tensor:
    """View a (C,) vector so that it broadcasts against (N, C, *spatial)."""
    return v.view((1, -1) + (1,) * (ndim - 2))


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in _LOW_PRECISION else x.dtype


def _check_input(input: Tensor, **vectors: Tensor | None) -> None:
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if not input.is_floating_point():
        raise TypeError(f"input must be a floating-point tensor, got dtype {input.dtype}")
    if input.dim() < 2:
        raise ValueError(
            f"input must have shape (N, C) or (N, C, *spatial), got {input.dim()}-D input of shape {tuple(input.shape)}"
        )
    channels = input.shape[1]
    for name, v in vectors.items():
        if v is not None and v.shape != (channels,):
            raise ValueError(
                f"{name} has shape {tuple(v.shape)} but input has {channels} channels "
                f"(input.shape={tuple(input.shape)}); expected ({channels},)"
            )


class BatchNormFunction(torch.autograd.Function):
    """Training-mode BN, y = weight * (x - mean) / sqrt(var + eps) + bias, with the closed-form backward.

    forward(x, weight, bias, eps): x is (N, C, *spatial); weight and bias are (C,) tensors or None.
    Returns (y, batch_mean, batch_var), the last two in the compute dtype and without gradient.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
        dims = _reduction_dims(x.dim())
        compute = _compute_dtype(x)
        xc = x.to(compute)
        batch_var, batch_mean = torch.var_mean(xc, dim=dims, correction=0)
        inv_std = torch.rsqrt(batch_var + eps)
        x_hat = (xc - _per_channel(batch_mean, x.dim())) * _per_channel(inv_std, x.dim())
        y = x_hat
        if weight is not None:
            y = y * _per_channel(weight.to(compute), x.dim())
        if bias is not None:
            y = y + _per_channel(bias.to(compute), x.dim())
        ctx.save_for_backward(x_hat, inv_std, weight)
        ctx.has_bias = bias is not None
        ctx.input_dtype = x.dtype
        ctx.mark_non_differentiable(batch_mean, batch_var)
        return y.to(x.dtype), batch_mean, batch_var

    @staticmethod
    def backward(ctx: Any, dy: Tensor, _dmean: Tensor, _dvar: Tensor):
        x_hat, inv_std, weight = ctx.saved_tensors
        ndim = x_hat.dim()
        dims = _reduction_dims(ndim)
        m = x_hat.numel() // x_hat.shape[1]
        dy = dy.to(x_hat.dtype)
        dbeta = dy.sum(dim=dims)
        dgamma = (dy * x_hat).sum(dim=dims)
        scale = inv_std if weight is None else inv_std * weight.to(x_hat.dtype)
        # The gradient of x_hat, projected off 1 and off x_hat, then scaled by weight / sigma.
        dx = (dy - _per_channel(dbeta / m, ndim) - x_hat * _per_channel(dgamma / m, ndim)) * _per_channel(scale, ndim)
        dweight = dgamma.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        dbias = dbeta.to(x_hat.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx.to(ctx.input_dtype), dweight, dbias, None


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Batch normalization with the semantics of ``torch.nn.functional.batch_norm``.

    input: (N, C) or (N, C, *spatial). running_mean, running_var, weight, bias: (C,) or None.
    training=True normalizes with the batch statistics and, when running buffers are given, updates them in place:
    ``running = (1 - momentum) * running + momentum * batch``, with the unbiased batch variance (m/(m-1)).
    training=False normalizes with running_mean and running_var.
    Returns a tensor with input's shape and dtype.

    >>> x = torch.tensor([[1.0], [3.0]])
    >>> batch_norm(x, None, None, training=True, eps=0.0).flatten().tolist()
    [-1.0, 1.0]
    """
    _check_input(input, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias)
    ndim = input.dim()
    if not training:
        if running_mean is None or running_var is None:
            raise ValueError("running_mean and running_var are required when training=False")
        compute = _compute_dtype(input)
        # Algorithm 2: a per-channel affine map with fixed statistics; autograd handles this simple case.
        scale = torch.rsqrt(running_var.to(compute) + eps)
        if weight is not None:
            scale = scale * weight.to(compute)
        shift = -running_mean.to(compute) * scale
        if bias is not None:
            shift = shift + bias.to(compute)
        y = input.to(compute) * _per_channel(scale, ndim) + _per_channel(shift, ndim)
        return y.to(input.dtype)

    m = input.numel() // input.shape[1]
    if m <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {tuple(input.shape)}"
        )
    y, batch_mean, batch_var = BatchNormFunction.apply(input, weight, bias, eps)
    if running_mean is not None or running_var is not None:
        with torch.no_grad():
            if running_mean is not None:
                running_mean.mul_(1.0 - momentum).add_(batch_mean.to(running_mean.dtype), alpha=momentum)
            if running_var is not None:
                unbiased = batch_var * (m / (m - 1))
                running_var.mul_(1.0 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
    return y


class _BatchNorm(nn.Module):
    """Shared state and forward of `BatchNorm1d/2d/3d`; mirrors ``torch.nn.modules.batchnorm._BatchNorm``.

    Subclasses differ only in `_check_input_dim`. Parameters ``weight`` (gamma) and ``bias`` (beta); buffers
    ``running_mean``, ``running_var`` and ``num_batches_tracked``, so the ``state_dict`` keys are torch's.
    """

    _version = 2

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        if not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be a positive integer, got {num_features!r}")
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1] or None, got {momentum!r}")
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, **factory))
            self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer(
                "num_batches_tracked",
                torch.tensor(0, dtype=torch.long, **{k: v for k, v in factory.items() if k != "dtype"}),
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def _check_input_dim(self, input: Tensor) -> None:
        raise NotImplementedError

    def _check_num_features(self, input: Tensor) -> None:
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__}({self.num_features}) expected {self.num_features} channels, got input with "
                f"{input.shape[1]} channels (input.shape={tuple(input.shape)})"
            )

    def _momentum_for_step(self) -> float:
        """torch's rule: with momentum=None the running statistics are a cumulative average, weight 1/t at step t."""
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                return 1.0 / float(self.num_batches_tracked)
        return 0.0 if self.momentum is None else self.momentum

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        self._check_num_features(input)
        momentum = self._momentum_for_step()
        # Batch statistics in training, or whenever there are no running statistics to use.
        use_batch_stats = self.training or not self.track_running_stats
        update_buffers = self.training and self.track_running_stats
        return batch_norm(
            input,
            self.running_mean if update_buffers or not use_batch_stats else None,
            self.running_var if update_buffers or not use_batch_stats else None,
            self.weight,
            self.bias,
            use_batch_stats,
            momentum,
            self.eps,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}"
        )


class BatchNorm1d(_BatchNorm):
    """Drop-in for ``torch.nn.BatchNorm1d``: input (N, C) or (N, C, L)."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in (2, 3):
            raise ValueError(f"BatchNorm1d expected 2-D or 3-D input (N, C) or (N, C, L), got {input.dim()}-D input "
                             f"of shape {tuple(input.shape)}")


class BatchNorm2d(_BatchNorm):
    """Drop-in for ``torch.nn.BatchNorm2d``: input (N, C, H, W)."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"BatchNorm2d expected 4-D input (N, C, H, W), got {input.dim()}-D input "
                             f"of shape {tuple(input.shape)}")


class BatchNorm3d(_BatchNorm):
    """Drop-in for ``torch.nn.BatchNorm3d``: input (N, C, D, H, W)."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 5:
            raise ValueError(f"BatchNorm3d expected 5-D input (N, C, D, H, W), got {input.dim()}-D input "
                             f"of shape {tuple(input.shape)}")


_TO_BNNOTES = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d}
_TO_TORCH = {v: k for k, v in _TO_BNNOTES.items()}


def _swap(module: nn.Module, mapping: dict[type, type]) -> nn.Module:
    target = mapping.get(type(module))
    if target is not None:
        new = target(
            module.num_features,
            eps=module.eps,
            momentum=module.momentum,
            affine=module.affine,
            track_running_stats=module.track_running_stats,
        )
        new.load_state_dict(module.state_dict())
        ref = module.weight if module.weight is not None else module.running_mean
        if ref is not None:
            new = new.to(device=ref.device, dtype=ref.dtype)
        new.train(module.training)
        if module.weight is not None:
            new.weight.requires_grad_(module.weight.requires_grad)
            new.bias.requires_grad_(module.bias.requires_grad)
        return new
    for name, child in module.named_children():
        setattr(module, name, _swap(child, mapping))
    return module


def convert_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``torch.nn.BatchNorm{1,2,3}d`` in `module` by bnnotes' own, keeping parameters, buffers and mode.

    Works in place on containers and returns the (possibly new) root module.

    >>> net = convert_batchnorm(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)))
    >>> type(net[1]).__module__
    'bnnotes.torch_bn'
    """
    return _swap(module, _TO_BNNOTES)


def to_torch_batchnorm(module: nn.Module) -> nn.Module:
    """The inverse of `convert_batchnorm`: bnnotes' BN layers back to ``torch.nn.BatchNorm{1,2,3}d``."""
    return _swap(module, _TO_TORCH)
