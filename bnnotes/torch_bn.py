"""Batch normalization in PyTorch with a hand-written backward, on any device.

`batch_norm` has the signature, semantics and argument checks (eps, dtypes) of ``torch.nn.functional.batch_norm``;
`BatchNorm1d`, `BatchNorm2d` and `BatchNorm3d` *are* torch.nn's classes (subclasses that replace only the computation),
so constructor, buffers, ``state_dict``, ``repr`` and ``isinstance`` are torch's, and torch's tools
(``convert_sync_batchnorm``, quantization fusion, "freeze BN" helpers) recognise them; `bnnotes.convert` swaps them
into and out of a model. The gradient is the closed form derived in the course (`BatchNormFunction`, an
``autograd.Function``; double backward, forward-mode AD, vmap and torch.func work too), not autograd over composed ops,
and PyTorch's own BN kernels are never called here: they are the reference in the tests (which include PyTorch's own
module and operator test data, ``tests/test_torch_upstream.py``) and the benchmark (``python -m bnnotes.bench``) only.
The statistics, the per-channel affine map, the closed-form backward and the checks are the shared core's
(`bnnotes._core`), which the variants use too: Batch Renormalization (`bnnotes.renorm`), synchronized BN
(`bnnotes.sync`), Ghost BN (`bnnotes.ghost`) and ℓp BN (`bnnotes.lp_norm`).

The same code runs on CPU, CUDA and MPS tensors. float16 and bfloat16 inputs are normalized with float32 statistics
and returned in their own dtype.
"""

from __future__ import annotations

import inspect
import numbers
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnnotes._core import (
    DtypeMismatchError,
    RunningStatsNorm,
    affine_inference,
    batch_mean_var,
    check_channels,
    check_eps,
    check_input,
    check_input_dim,
    check_layer_args,
    compute_dtype,
    ema_,
    normalize_backward,
    per_channel_affine,
    reduction_dims,
    step_momentum,
    unbiased_variance,
    values_per_channel,
)
from bnnotes.convert import convert_batchnorm, to_torch_batchnorm

__all__ = [
    "batch_norm",
    "BatchNormFunction",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormBase",
    "FrozenStatistics",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "RunningStatsNorm",
    "DtypeMismatchError",
    "convert_batchnorm",
    "to_torch_batchnorm",
]

#: torch's BN constructor takes ``bias=`` (False: no beta) since pytorch/pytorch#176573. Where it does not (older torch,
#: 2.4 included), `BatchNormBase` does it itself.
_TORCH_BN_TAKES_BIAS = "bias" in inspect.signature(nn.modules.batchnorm._BatchNorm.__init__).parameters

try:  # what torch's Function.apply does to arguments left over from an exited torch.func transform
    from torch._functorch.utils import unwrap_dead_wrappers as _unwrap_dead_wrappers
except ImportError:  # pragma: no cover - older torch
    def _unwrap_dead_wrappers(args: tuple) -> tuple:
        return args


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t in dtype, without a call when it already is (hot paths: even a no-op ``.to`` costs microseconds)."""
    return t if t.dtype == dtype else t.to(dtype)


class BatchNormFunction(torch.autograd.Function):
    """Training-mode BN, y = weight * (x - mean) / sqrt(var + eps) + bias, with the closed-form backward.

    forward(x, weight, bias, eps): x is (N, C, *spatial) with N * prod(spatial) >= 1; weight and bias are (C,)
    tensors or None. Returns (y, batch_mean, batch_var): y with x's shape and dtype; the biased batch statistics
    (C,) in the compute dtype (float32 for half-precision x), without gradient.
    Backward: see `bnnotes._core.normalize_backward`; dweight = sum(dy * x_hat), dbias = sum(dy). Double backward is
    supported, and so are torch.func (``setup_context``), forward-mode AD (`jvp`) and vmap (`vmap`: the batched
    samples are laid side by side as channels, one call for all of them).

    >>> x = torch.tensor([[1.0], [3.0]], requires_grad=True)
    >>> y, batch_mean, batch_var = BatchNormFunction.apply(x, None, None, 0.0)
    >>> y.flatten().tolist(), batch_mean.tolist(), batch_var.tolist()
    ([-1.0, 1.0], [2.0], [1.0])
    """

    @classmethod
    def apply(cls, *args: Any, **kwargs: Any) -> Any:
        """torch's ``Function.apply``, minus its per-call ``inspect.signature`` binding of default arguments (forward
        has none): in eager mode that binding alone cost about a third of the layer's fixed overhead. Under
        torch.func transforms and torch.compile, torch's own ``apply`` runs unchanged."""
        if kwargs or torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
            return super().apply(*args, **kwargs)
        return super(torch.autograd.Function, cls).apply(*_unwrap_dead_wrappers(args))

    @staticmethod
    def forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
        compute = compute_dtype(x)
        batch_mean, batch_var, scratch = batch_mean_var(x, reduction_dims(x.dim()), compute)
        inv_std = torch.add(batch_var, eps).rsqrt_()
        # y = x * scale + shift with scale = weight * inv_std and shift = bias - mean * scale (as torch's CPU kernel),
        # written over the scratch tensor.
        scale = inv_std if weight is None else inv_std * weight
        if bias is None:
            shift = torch.mul(batch_mean, scale).neg_()
        else:
            shift = torch.addcmul(bias if bias.dtype == compute else bias.to(compute), batch_mean, scale, value=-1)
        y = per_channel_affine(x, scale, shift, out=scratch)
        return (y if y.dtype == x.dtype else y.to(x.dtype)), batch_mean, batch_var

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        x, weight, bias, eps = inputs
        _, batch_mean, batch_var = output
        inv_std = torch.add(batch_var, eps).rsqrt()  # the forward's, recomputed bit for bit from (C,) values
        # x itself is saved (not x_hat): it costs no extra memory, and a recorded backward can recompute from it.
        ctx.save_for_backward(x, batch_mean, inv_std, weight)
        ctx.save_for_forward(x, batch_mean, inv_std, weight)
        ctx.eps = eps
        ctx.has_bias = bias is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(batch_mean, batch_var)
        # The statistics are non-differentiable: their gradients arrive as None instead of tensors of zeros that would
        # be allocated and filled on every backward, and ignored.
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx: Any, dy: Tensor | None, _dmean: Tensor | None, _dvar: Tensor | None):
        if dy is None:  # y did not reach the loss (only possible with materialize_grads off): no gradient at all
            return None, None, None, None
        x, batch_mean, inv_std, weight = ctx.saved_tensors
        need_dx, need_dweight, need_dbias = ctx.needs_input_grad[:3]
        dx, sum_dy, sum_dy_x_hat = normalize_backward(dy, x, batch_mean, inv_std, weight, ctx.eps, need_dx)
        if need_dx and dx.dtype != x.dtype:
            dx = dx.to(x.dtype)
        dweight = _cast(sum_dy_x_hat, weight.dtype) if weight is not None and need_dweight else None
        dbias = _cast(sum_dy, ctx.bias_dtype) if ctx.has_bias and need_dbias else None
        return dx, dweight, dbias, None

    @staticmethod
    def jvp(ctx: Any, x_dot: Tensor | None, weight_dot: Tensor | None, bias_dot: Tensor | None, _eps_dot: Any):
        """Forward mode: y_dot = weight * x_hat_dot + weight_dot * x_hat + bias_dot, with the tangent of x_hat
        x_hat_dot = inv_std * (x_dot - mean(x_dot) - x_hat * mean(x_dot * x_hat)) (the same projection as the
        backward's). The statistics are non-differentiable outputs: no tangent."""
        x, batch_mean, inv_std, weight = ctx.saved_tensors
        dims, shape = reduction_dims(x.dim()), (1, -1) + (1,) * (x.dim() - 2)
        compute = batch_mean.dtype
        x_hat = (x.to(compute) - batch_mean.view(shape)) * inv_std.view(shape)
        y_dot = torch.zeros_like(x_hat)
        if x_dot is not None:
            x_dot = x_dot.to(compute)
            x_hat_dot = inv_std.view(shape) * (
                x_dot - x_dot.mean(dim=dims, keepdim=True) - x_hat * (x_dot * x_hat).mean(dim=dims, keepdim=True)
            )
            y_dot = x_hat_dot if weight is None else x_hat_dot * weight.to(compute).view(shape)
        if weight_dot is not None:
            y_dot = y_dot + x_hat * weight_dot.to(compute).view(shape)
        if bias_dot is not None:
            y_dot = y_dot + bias_dot.to(compute).view(shape)
        return y_dot.to(x.dtype), None, None

    @staticmethod
    def vmap(info: Any, in_dims: tuple, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
        """B vmapped samples of x (N, C, *s) are laid side by side as B * C channels of one (N, B * C, *s) batch, so
        one call normalizes every (sample, channel) pair with its own statistics (as `bnnotes.ghost` does)."""
        x_bdim, weight_bdim, bias_bdim, _ = in_dims
        batch = info.batch_size
        if x_bdim is None:
            x = x.unsqueeze(1).expand(x.shape[0], batch, *x.shape[1:])
        else:
            x = x.movedim(x_bdim, 1)  # (N, B, C, *s)
        n, channels, spatial = x.shape[0], x.shape[2], tuple(x.shape[3:])

        def side_by_side(v: Tensor | None, bdim: int | None) -> Tensor | None:
            if v is None:
                return None
            return v.repeat(batch) if bdim is None else v.movedim(bdim, 0).reshape(batch * channels)

        y, batch_mean, batch_var = BatchNormFunction.apply(
            x.reshape((n, batch * channels) + spatial), side_by_side(weight, weight_bdim),
            side_by_side(bias, bias_bdim), eps,
        )
        outputs = (y.view((n, batch, channels) + spatial), batch_mean.view(batch, channels),
                   batch_var.view(batch, channels))
        return outputs, (1, 0, 0)


class _TracedBatchNormFunction(BatchNormFunction):
    """`BatchNormFunction` as torch.compile and torch.export see it: Dynamo cannot trace a custom ``jvp`` (it graph-
    breaks on one), so this variant has torch's default. Everything else, the backward included, is the same code."""

    jvp = staticmethod(torch.autograd.Function.jvp)
    apply = classmethod(torch.autograd.Function.apply.__func__)


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
    training=False normalizes with running_mean and running_var (Algorithm 2).
    Returns a tensor with input's shape and dtype (float16/bfloat16 are computed in float32).

    >>> x = torch.tensor([[1.0], [3.0]])
    >>> batch_norm(x, None, None, training=True, eps=1e-12).flatten().tolist()
    [-1.0, 1.0]
    """
    check_eps(eps, batch_statistics=training)  # first, as torch checks it before the kernel's dtype checks
    check_input(input, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias)
    if input.dim() < 2:  # an empty 1-D input (the only 1-D input accepted): an empty output, as torch's
        return input.clone()
    if not training:
        if running_mean is None or running_var is None:
            raise ValueError("running_mean and running_var are required when training=False, got None")
        return affine_inference(input, running_mean, torch.rsqrt(running_var + eps), weight, bias)

    m = values_per_channel(input)
    if m == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.shape}")
    if input.numel() == 0:
        # An empty batch has no statistics: like torch, return an empty output and leave the buffers alone.
        ones = torch.ones(input.shape[1], dtype=compute_dtype(input), device=input.device)
        return affine_inference(input, torch.zeros_like(ones), ones, weight, bias)
    if not isinstance(momentum, numbers.Real) or isinstance(momentum, bool):
        raise TypeError(
            f"momentum must be a float, got {type(momentum).__name__} (the modules turn momentum=None into the "
            f"cumulative weight 1/num_batches_tracked before calling batch_norm)"
        )
    function = _TracedBatchNormFunction if torch.compiler.is_compiling() else BatchNormFunction
    y, batch_mean, batch_var = function.apply(input, weight, bias, eps)
    with torch.no_grad():
        # running = (1 - momentum) * running + momentum * batch, the variance's with Bessel's correction m/(m-1).
        if running_mean is not None:
            ema_(running_mean, batch_mean, momentum)
        if running_var is not None:
            ema_(running_var, unbiased_variance(batch_var, m), momentum)
    return y


class BatchNormBase(nn.modules.batchnorm._BatchNorm):
    """bnnotes' computation on torch's BN state: the shared forward of `BatchNorm1d/2d/3d`.

    A subclass of ``torch.nn.modules.batchnorm._BatchNorm``, so the constructor (including ``bias=False``), the
    parameters ``weight`` (gamma) and ``bias`` (beta), the buffers ``running_mean``, ``running_var`` and
    ``num_batches_tracked``, ``state_dict`` loading, ``reset_*``, ``repr`` and ``isinstance`` are torch's own; only
    `forward` is replaced, by torch's rules line for line around bnnotes' `batch_norm`. (On older torch, 2.4 included,
    whose BN has no ``bias=`` argument, ``bias=False`` is provided here: beta is None, as in newer torch.)

    ``torch.jit.script`` is not supported (TorchScript cannot compile an ``autograd.Function``, and is deprecated
    upstream): use ``torch.jit.trace``, ``torch.export`` or ``torch.compile``.
    """

    # The input ranks the subclass accepts (`bnnotes._core.check_input_dim`; None: any rank >= 2) and their layout.
    input_ranks: tuple[int, ...] | None = None
    input_layout: str = "(N, C) or (N, C, *spatial)"

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
    ) -> None:
        num_features = check_layer_args(num_features, momentum)
        if _TORCH_BN_TAKES_BIAS:
            super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
            return
        # Older torch (no bias= argument): torch's layer with beta, then beta removed, as newer torch does it.
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        if not bias:
            self.register_parameter("bias", None)

    def reset_parameters(self) -> None:
        if _TORCH_BN_TAKES_BIAS or self.bias is not None or not self.affine:
            super().reset_parameters()
            return
        # Older torch's reset_parameters would zero the (absent) bias: the same reset without it.
        self.reset_running_stats()
        nn.init.ones_(self.weight)

    def _check_input_dim(self, input: Tensor) -> None:  # torch's rule (ValueError), with the shape in the message
        check_input_dim(self, input, self.input_ranks, self.input_layout)

    def _check_num_features(self, input: Tensor) -> None:
        check_channels(self, input)

    def forward(self, input: Tensor) -> Tensor:
        if not isinstance(input, Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
        self._check_input_dim(input)
        self._check_num_features(input)
        # torch's rules, line for line: momentum=None is a cumulative average (weight 1/t at step t) ...
        momentum = step_momentum(
            self.momentum, self.num_batches_tracked if self.track_running_stats else None, self.training
        )
        # ... batch statistics in training, and in eval only when there are no running buffers to use ...
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        # ... and the buffers are updated only while training with track_running_stats.
        update = not self.training or self.track_running_stats
        return batch_norm(
            input,
            self.running_mean if update else None,
            self.running_var if update else None,
            self.weight,
            self.bias,
            use_batch_stats,
            momentum,
            self.eps,
        )


class BatchNorm1d(BatchNormBase, nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` (a subclass of it) computing with bnnotes: input (N, C) or (N, C, L).

    >>> layer = BatchNorm1d(4)
    >>> isinstance(layer, nn.BatchNorm1d), layer(torch.randn(8, 4)).shape
    (True, torch.Size([8, 4]))
    """

    input_ranks = (2, 3)
    input_layout = "(N, C) or (N, C, L)"


class BatchNorm2d(BatchNormBase, nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` (a subclass of it) computing with bnnotes: input (N, C, H, W)."""

    input_ranks = (4,)
    input_layout = "(N, C, H, W)"


class BatchNorm3d(BatchNormBase, nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` (a subclass of it) computing with bnnotes: input (N, C, D, H, W)."""

    input_ranks = (5,)
    input_layout = "(N, C, D, H, W)"


class FrozenStatistics:
    """A mixin for BN layers: ``train()`` leaves the layer in eval mode, so it normalizes with its running statistics
    and never updates them, whatever ``model.train()`` says (the frozen BN of fine-tuning with small batches)."""

    def train(self, mode: bool = True):
        return super().train(False)


class FrozenBatchNorm1d(FrozenStatistics, BatchNorm1d):
    """`BatchNorm1d` pinned to eval mode, whatever ``model.train()`` says: the running statistics are used and never
    updated (weight and bias still train unless their requires_grad is off). `bnnotes.convert.freeze_batchnorm` makes
    these from a model's BN layers, and `bnnotes.convert.unfreeze_batchnorm` undoes it.

    >>> layer = FrozenBatchNorm1d(2).train()
    >>> _ = layer(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    >>> layer.training, layer.running_mean.tolist()
    (False, [0.0, 0.0])
    """


class FrozenBatchNorm2d(FrozenStatistics, BatchNorm2d):
    """`FrozenBatchNorm1d` for (N, C, H, W)."""


class FrozenBatchNorm3d(FrozenStatistics, BatchNorm3d):
    """`FrozenBatchNorm1d` for (N, C, D, H, W)."""


def _register_quantization_fusion() -> None:
    """Let ``torch.ao.quantization.fuse_modules`` fold bnnotes' BN into a preceding Conv/Linear as it does torch's.

    torch looks fusers up by exact module types, so each of its patterns with ``nn.BatchNormNd`` gets a twin with
    bnnotes' class (only added, nothing of torch's changed). Eval-mode (post-training) fusion then works; QAT fusion
    (``fuse_modules_qat``) builds torch's intrinsic ConvBn modules, which accept torch's exact BN types only: convert
    with `bnnotes.convert.to_torch_batchnorm` first.
    """
    from torch.ao.quantization import fuser_method_mappings

    ours = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d}
    table = fuser_method_mappings._DEFAULT_OP_LIST_TO_FUSER_METHOD
    for pattern, fuser in list(table.items()):
        if any(t in ours for t in pattern):
            table.setdefault(tuple(ours.get(t, t) for t in pattern), fuser)


_register_quantization_fusion()
