"""Batch normalization in PyTorch with a hand-written backward, on any device.

`batch_norm` has the signature, semantics and argument checks (eps, dtypes) of ``torch.nn.functional.batch_norm``;
`BatchNorm1d`, `BatchNorm2d` and `BatchNorm3d` *are* torch.nn's classes (subclasses that replace only the computation),
so constructor, buffers, ``state_dict``, ``repr`` and ``isinstance`` are torch's, and torch's tools
(``convert_sync_batchnorm``, quantization fusion, "freeze BN" helpers) recognise them; `convert_batchnorm` and
`to_torch_batchnorm` swap them in a model, both ways. The gradient is the closed form derived in the course
(`BatchNormFunction`, an ``autograd.Function``; double backward, forward-mode AD, vmap and torch.func work too), not
autograd over composed ops, and PyTorch's own BN kernels are never called here: they are the reference in the tests
(which include PyTorch's own module and operator test data, ``tests/test_torch_upstream.py``) and the benchmark
(``python -m bnnotes.bench``) only. `RunningStatsNorm` is the shared state of the variants below.

The same code runs on CPU, CUDA and MPS tensors. float16 and bfloat16 inputs are normalized with float32 statistics
and returned in their own dtype.

The variants that live in modules of their own are importable from here as well (loaded on first access):
`BatchRenorm1d`, `BatchRenorm2d` and `renorm_schedule` (`bnnotes.renorm`, Batch Renormalization),
`SyncBatchNorm` and `convert_sync_batchnorm` (`bnnotes.sync`, synchronized BN for data parallelism),
`GhostBatchNorm1d` and `GhostBatchNorm2d` (`bnnotes.ghost`, ghost batch normalization).
"""

from __future__ import annotations

import inspect
import numbers
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "batch_norm",
    "BatchNormFunction",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormBase",
    "RunningStatsNorm",
    "DtypeMismatchError",
    "convert_batchnorm",
    "to_torch_batchnorm",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)

try:  # what torch's Function.apply does to arguments left over from an exited torch.func transform
    from torch._functorch.utils import unwrap_dead_wrappers as _unwrap_dead_wrappers
except ImportError:  # pragma: no cover - older torch
    def _unwrap_dead_wrappers(args: tuple) -> tuple:
        return args


def _takes_bias(cls: type) -> bool:
    """Whether the layer class's constructor takes ``bias=`` (torch's BN layers do since pytorch/pytorch#176573; on
    older torch, 2.4 included, bnnotes' own layers still take it and emulate it)."""
    return "bias" in inspect.signature(cls.__init__).parameters


#: torch's BN constructor takes ``bias=`` (False: no beta). Where it does not, `BatchNormBase` does it itself.
_TORCH_BN_TAKES_BIAS = _takes_bias(nn.modules.batchnorm._BatchNorm)


def _reduction_dims(ndim: int) -> list[int]:
    """Statistics are per channel (dim 1), over the batch dim 0 and every spatial dim."""
    return [0] + list(range(2, ndim))


def _per_channel(v: Tensor, ndim: int) -> Tensor:
    """View a (C,) vector so that it broadcasts against (N, C, *spatial)."""
    return v.view((1, -1) + (1,) * (ndim - 2))


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t in dtype, without a call when it already is (hot paths: even a no-op ``.to`` costs microseconds)."""
    return t if t.dtype == dtype else t.to(dtype)


def _compute_dtype(x: Tensor) -> torch.dtype:
    """float16/bfloat16 are computed in float32; float32 and float64 in themselves."""
    return torch.float32 if x.dtype in _LOW_PRECISION else x.dtype


class DtypeMismatchError(TypeError, RuntimeError):
    """A tensor's dtype does not go with the input's. A RuntimeError as torch's own BN raises in the same cases, and a
    TypeError because that is what it is."""


def _check_input(input: Tensor, **vectors: Tensor | None) -> None:
    """Validate input (N, C, *spatial) and the per-channel (C,) vectors that go with it, naming what arrived.

    As torch: the vectors have input's dtype, except that float16/bfloat16 input may come with float32 vectors (mixed
    precision); a 1-D input is accepted only empty (its "channels" are then 0, as in ``F.batch_norm``).
    """
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if not input.is_floating_point():
        raise TypeError(f"input must be a floating-point tensor, got dtype {input.dtype}")
    if input.dim() < 2 and input.numel() > 0:
        raise ValueError(
            f"input must have shape (N, C) or (N, C, *spatial), got {input.dim()}-D input of shape {tuple(input.shape)}"
        )
    channels = input.shape[1] if input.dim() >= 2 else 0
    for name, v in vectors.items():
        if v is None:
            continue
        if not isinstance(v, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(v).__name__}")
        if v.shape != (channels,):
            raise ValueError(
                f"{name} has shape {tuple(v.shape)} but input has {channels} channels "
                f"(input.shape={tuple(input.shape)}); expected ({channels},)"
            )
        if not v.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {v.dtype}")
        if v.dtype != input.dtype and not (input.dtype in _LOW_PRECISION and v.dtype == torch.float32):
            raise DtypeMismatchError(
                f"{name} has dtype {v.dtype} but input has dtype {input.dtype}; expected {input.dtype}"
                + (" or torch.float32" if input.dtype in _LOW_PRECISION else "")
                + " (convert the module with .to(dtype), or the input)"
            )
        if v.device != input.device:
            raise ValueError(f"{name} is on {v.device} but input is on {input.device}; expected the same device")


def _check_eps(eps: Any, training: bool) -> None:
    """torch's rule: eps > 0 when normalizing with batch statistics, eps >= 0 with fixed ones."""
    if not isinstance(eps, numbers.Real) or isinstance(eps, bool):
        raise TypeError(f"eps must be a real number, got {type(eps).__name__}")
    if training and not eps > 0.0:
        raise ValueError(f"batch_norm eps must be positive during training (a batch may have zero variance), got {eps}")
    if not eps >= 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, got {eps}")


def _check_layer_args(num_features: Any, momentum: Any) -> int:
    """The constructor checks every normalization layer of bnnotes shares. Returns num_features as an int (numpy
    integers are accepted, as by torch)."""
    try:
        count = operator.index(num_features) if not isinstance(num_features, bool) else None
    except TypeError:
        count = None
    if count is None or count < 1:
        raise ValueError(f"num_features must be a positive integer, got {num_features!r}")
    if momentum is not None and not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1] or None, got {momentum!r}")
    return count


def _init_affine(module: nn.Module, num_features: int, affine: bool, device: Any = None, dtype: Any = None) -> None:
    """Register ``weight`` (gamma, ones) and ``bias`` (beta, zeros) as in torch's BN, or None when not affine."""
    if affine:
        module.weight = nn.Parameter(torch.ones(num_features, device=device, dtype=dtype))
        module.bias = nn.Parameter(torch.zeros(num_features, device=device, dtype=dtype))
    else:
        module.register_parameter("weight", None)
        module.register_parameter("bias", None)


def _check_channels(module: nn.Module, input: Tensor) -> None:
    """A clear error when input's channel count (dim 1) is not the layer's ``num_features``."""
    if input.shape[1] != module.num_features:
        raise ValueError(
            f"{type(module).__name__}({module.num_features}) expected {module.num_features} channels, got input with "
            f"{input.shape[1]} channels (input.shape={tuple(input.shape)})"
        )


def _step_momentum(momentum: float | None, num_batches_tracked: Tensor | None, training: bool) -> float:
    """torch's rule for the running averages' weight: counts the batch while training (when a counter is given), and
    turns momentum=None into a cumulative average, weight 1/t at the t-th counted batch."""
    if training and num_batches_tracked is not None:
        num_batches_tracked.add_(1)
        if momentum is None:
            return 1.0 / float(num_batches_tracked)
    return 0.0 if momentum is None else momentum


def _plain(*tensors: Tensor) -> bool:
    """True when in-place scratch arithmetic is safe: eager, autograd not recording, no vmap or torch.func wrapper.

    While autograd records (a ``create_graph=True`` backward, or the forward as torch.export traces it), ``out=`` and
    in-place writes would break the graph. Under vmap (``is_grads_batched``, ``torch.func.vmap``) an in-place op into a tensor computed from unbatched
    values only cannot take a batched operand; under torch.func the wrappers must see out-of-place ops. The checks
    are functorch internals, so they are not even evaluated while torch.compile traces.
    """
    if torch.compiler.is_compiling() or torch.is_grad_enabled():
        return False
    functorch = torch._C._functorch
    return not any(
        functorch.is_functorch_wrapped_tensor(t) or functorch.is_legacy_batchedtensor(t) for t in tensors
    )


_FILLED: dict[tuple[int, float, torch.dtype], Tensor] = {}


def _filled(n: int, value: float, dtype: torch.dtype) -> Tensor:
    """A CPU vector of n copies of value, made once per (n, value, dtype) and reused: allocating it on every call cost
    more than the matrix-vector product it feeds for (256, 1024). Read-only by convention; at most 32 are kept."""
    key = (n, value, dtype)
    vector = _FILLED.get(key)
    if vector is None:
        if len(_FILLED) >= 32:
            _FILLED.clear()
        with torch.inference_mode(False), torch.no_grad():
            vector = _FILLED[key] = torch.full((n,), value, dtype=dtype)
    return vector


def _channel_sum(t: Tensor, dims: list[int]) -> Tensor:
    """Per-channel sum of t (N, C, *spatial) over `dims`. Returns (C,).

    For a contiguous (N, C) CPU tensor the column sums are taken as a matrix-vector product with a vector of ones:
    BLAS does that about 2.5x faster than torch's strided reduction over dim 0. For a contiguous (N, C, *spatial) CPU
    tensor, each of the N * C rows is summed over its contiguous spatial positions first, then the N partial sums of
    each channel: measured 1.1x to 2x faster than one reduction over dims (0, 2, ...).
    """
    if t.is_cpu and t.is_contiguous():
        if t.dim() == 2:
            return torch.mv(t.t(), _filled(t.shape[0], 1.0, t.dtype))
        n, channels = t.shape[0], t.shape[1]
        return t.view(n * channels, -1).sum(dim=1).view(n, channels).sum(dim=0)
    return t.sum(dim=dims)


def _channel_mean(t: Tensor, dims: list[int]) -> Tensor:
    """Per-channel mean of t (N, C, *spatial) over `dims`, by `_channel_sum`'s route; (C,). For a contiguous (N, C) CPU
    tensor the division is folded into the matrix-vector product (a vector of 1/N), one small op fewer."""
    if t.is_cpu and t.is_contiguous() and t.dim() == 2:
        return torch.mv(t.t(), _filled(t.shape[0], 1.0 / t.shape[0], t.dtype))
    return _channel_sum(t, dims).div_(t.numel() // t.shape[1])


def _squared_deviations(x: Tensor, mean: Tensor) -> Tensor:
    """(x - mean)^2 elementwise in one pass, a fresh tensor: the unreduced squared error of mse_loss. (Its functional
    wrapper's shape checks cost more than the kernel on small inputs, so the kernel is called directly.)"""
    try:
        return torch._C._nn.mse_loss(x, mean, 0)  # 0: reduction="none"
    except (AttributeError, TypeError, RuntimeError):  # pragma: no cover - a torch without this binding
        return F.mse_loss(x, mean, reduction="none")


def _batch_mean_var(x: Tensor, dims: list[int], compute: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel mean and biased variance by two passes: the mean, then the mean squared deviation from it.

    x: (N, C, *spatial). Returns (batch_mean, batch_var, scratch): (C,) statistics in `compute` and a fresh tensor of
    x's shape in `compute` that the caller may overwrite (it holds the squared deviations).
    Two passes stay accurate far from zero, where E[x^2] - E[x]^2 cancels catastrophically. No other temporary as
    large as x is made: on the CPU, fresh memory is page-faulted in, which can cost more than the arithmetic.
    """
    shape = (1, -1) + (1,) * (x.dim() - 2)
    if x.dtype == compute:
        batch_mean = _channel_mean(x, dims)
        scratch = _squared_deviations(x, batch_mean.view(shape).expand_as(x))
    else:  # half precision: the deviations are formed in float32
        batch_mean = torch.mean(x, dim=dims, dtype=compute)
        scratch = torch.sub(x, batch_mean.view(shape)).square_()
    return batch_mean, _channel_mean(scratch, dims), scratch


def _per_channel_affine(x: Tensor, scale: Tensor, shift: Tensor, out: Tensor, plain: bool | None = None) -> Tensor:
    """out = x * scale + shift with (C,) scale and shift, written into `out` (x's shape, the compute dtype).

    Traced or transformed (see `_plain`), `out` is left alone and a new tensor returned: autograd tracing (torch.export)
    refuses ``out=``. `plain`: the caller's `_plain` verdict, when it has one (it is not free to recompute).
    """
    if not (_plain(x) if plain is None else plain):
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return torch.addcmul(shift.to(out.dtype).view(shape), x, scale.to(out.dtype).view(shape))
    if scale.dtype != out.dtype or shift.dtype != out.dtype:
        scale, shift = scale.to(out.dtype), shift.to(out.dtype)
    if x.dim() == 2:
        return torch.addcmul(shift, x, scale, out=out)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    # With spatial dims, two simple passes beat addcmul's doubly broadcast kernel several times on the CPU.
    return torch.mul(x, scale.view(shape), out=out).add_(shift.view(shape))


def _normalize_backward(
    dy: Tensor, x: Tensor, batch_mean: Tensor, inv_std: Tensor, gain: Tensor | None, eps: float, need_dx: bool
) -> tuple[Tensor | None, Tensor, Tensor]:
    """Backward of y = gain * x_hat + shift, x_hat = (x - batch_mean) * inv_std, for the batch statistics of x.

    dy, x: (N, C, *spatial); batch_mean, inv_std: (C,) in the compute dtype; gain: (C,) or None (meaning 1).
    Returns (dx, sum_dy, sum_dy_x_hat): dx in the compute dtype (None unless need_dx) and the per-channel sums
    sum(dy) and sum(dy * x_hat), from which the parameter gradients follow. With m values per channel,

        dx = gain * inv_std * (dy - sum_dy / m - x_hat * sum_dy_x_hat / m),

    the upstream gradient projected off 1 and off x_hat (Ioffe & Szegedy, 2015, Sec. 3). When autograd records this
    backward (``create_graph=True``), the statistics are recomputed from x with differentiable ops, so that the
    closed form itself is differentiated and second derivatives are exact. Only tensors made here are written in
    place, and only in eager mode with plain tensors (see `_plain`); otherwise every op is out-of-place, so batched
    gradients (``is_grads_batched``), torch.func and torch.compile see a pure function.
    """
    ndim = x.dim()
    dims = [0] + list(range(2, ndim))
    shape = (1, -1) + (1,) * (ndim - 2)
    compute = batch_mean.dtype
    m = x.numel() // x.shape[1]
    if not _plain(dy, x):
        # Recorded backward (double backward), or under vmap / torch.func / torch.compile: the same closed form, from
        # out-of-place differentiable ops only.
        dy = dy.to(compute)
        batch_mean = torch.mean(x.to(compute), dim=dims)
        x_centered = x - batch_mean.view(shape)
        inv_std = torch.rsqrt(torch.mean(x_centered * x_centered, dim=dims) + eps)
        sum_dy = dy.sum(dim=dims)
        sum_dy_x_hat = (dy * x_centered).sum(dim=dims) * inv_std
        if not need_dx:
            return None, sum_dy, sum_dy_x_hat
        a = inv_std if gain is None else gain.to(compute) * inv_std
        dx = a.view(shape) * (dy - (sum_dy / m).view(shape)
                              - x_centered * (inv_std * sum_dy_x_hat / m).view(shape))
        return dx, sum_dy, sum_dy_x_hat

    # One scratch tensor and no other large temporary: it holds (x - mean) * dy for the reduction, then becomes dx.
    sum_dy = _channel_sum(dy, dims) if dy.dtype == compute else dy.sum(dim=dims, dtype=compute)
    scratch = torch.sub(x, batch_mean.view(shape))
    sum_dy_x_hat = _channel_sum(scratch.mul_(dy), dims).mul_(inv_std)
    if not need_dx:
        return None, sum_dy, sum_dy_x_hat
    # dx = a * dy + b * (x - mean) + c with per-channel a, b, c, in two passes over the scratch tensor. (Centring x
    # first would cost a pass and, measured in float32 with mean/std = 1e4, gains no accuracy.)
    a = inv_std if gain is None else inv_std * gain
    b = torch.mul(a, inv_std).mul_(sum_dy_x_hat).div_(-m)
    c = torch.mul(a, sum_dy).div_(-m).addcmul_(b, batch_mean, value=-1)
    dx = _per_channel_affine(x, b, c, out=scratch, plain=True)
    return dx.addcmul_(dy, a.view(shape)), sum_dy, sum_dy_x_hat


class BatchNormFunction(torch.autograd.Function):
    """Training-mode BN, y = weight * (x - mean) / sqrt(var + eps) + bias, with the closed-form backward.

    forward(x, weight, bias, eps): x is (N, C, *spatial) with N * prod(spatial) >= 1; weight and bias are (C,)
    tensors or None. Returns (y, batch_mean, batch_var): y with x's shape and dtype; the biased batch statistics
    (C,) in the compute dtype (float32 for half-precision x), without gradient.
    Backward: see `_normalize_backward`; dweight = sum(dy * x_hat), dbias = sum(dy). Double backward is supported,
    and so are torch.func (``setup_context``), forward-mode AD (`jvp`) and vmap (`vmap`: the batched samples are laid
    side by side as channels, one call for all of them).

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
        compute = _compute_dtype(x)
        batch_mean, batch_var, scratch = _batch_mean_var(x, _reduction_dims(x.dim()), compute)
        inv_std = torch.add(batch_var, eps).rsqrt_()
        # y = x * scale + shift with scale = weight * inv_std and shift = bias - mean * scale (as torch's CPU kernel),
        # written over the scratch tensor.
        scale = inv_std if weight is None else inv_std * weight
        if bias is None:
            shift = torch.mul(batch_mean, scale).neg_()
        else:
            shift = torch.addcmul(bias if bias.dtype == compute else bias.to(compute), batch_mean, scale, value=-1)
        y = _per_channel_affine(x, scale, shift, out=scratch)
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

    @staticmethod
    def backward(ctx: Any, dy: Tensor, _dmean: Tensor | None, _dvar: Tensor | None):
        x, batch_mean, inv_std, weight = ctx.saved_tensors
        need_dx, need_dweight, need_dbias = ctx.needs_input_grad[:3]
        dx, sum_dy, sum_dy_x_hat = _normalize_backward(dy, x, batch_mean, inv_std, weight, ctx.eps, need_dx)
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
        dims, shape = _reduction_dims(x.dim()), (1, -1) + (1,) * (x.dim() - 2)
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


def _affine_inference(
    input: Tensor, mean: Tensor, inv_std: Tensor, weight: Tensor | None, bias: Tensor | None
) -> Tensor:
    """y = weight * (input - mean) * inv_std + bias with fixed statistics (Algorithm 2), folded into one per-channel
    scale and shift. input: (N, C, *spatial); the rest (C,). Returns input's shape and dtype.

    With the statistics fixed, BN is a per-channel affine map; autograd differentiates it exactly (dx = dy * scale,
    dweight = sum(dy * x_hat), dbias = sum(dy)), so no hand-written backward is needed here.
    """
    ndim = input.dim()
    compute = _compute_dtype(input)
    scale = inv_std.to(compute)
    if weight is not None:
        scale = scale * weight.to(compute)
    shift = -mean.to(compute) * scale
    if bias is not None:
        shift = shift + bias.to(compute)
    if ndim == 2:
        y = torch.addcmul(shift, input, scale)
    else:  # two simple passes beat addcmul's doubly broadcast kernel on the CPU
        y = input * _per_channel(scale, ndim) + _per_channel(shift, ndim)
    return y if y.dtype == input.dtype else y.to(input.dtype)


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
    _check_eps(eps, training)  # first, as torch checks it before the kernel's dtype checks
    _check_input(input, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias)
    if input.dim() < 2:  # an empty 1-D input (the only 1-D input accepted): an empty output, as torch's
        return input.clone()
    if not training:
        if running_mean is None or running_var is None:
            raise ValueError("running_mean and running_var are required when training=False, got None")
        return _affine_inference(input, running_mean, torch.rsqrt(running_var + eps), weight, bias)

    m = input.numel() // input.shape[1] if input.shape[1] else 0
    if m == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.shape}")
    if input.numel() == 0:
        # An empty batch has no statistics: like torch, return an empty output and leave the buffers alone.
        ones = torch.ones(input.shape[1], dtype=_compute_dtype(input), device=input.device)
        return _affine_inference(input, torch.zeros_like(ones), ones, weight, bias)
    if not isinstance(momentum, numbers.Real) or isinstance(momentum, bool):
        raise TypeError(
            f"momentum must be a float, got {type(momentum).__name__} (the modules turn momentum=None into the "
            f"cumulative weight 1/num_batches_tracked before calling batch_norm)"
        )
    function = _TracedBatchNormFunction if torch.compiler.is_compiling() else BatchNormFunction
    y, batch_mean, batch_var = function.apply(input, weight, bias, eps)
    with torch.no_grad():
        # running = (1 - momentum) * running + momentum * batch, i.e. a linear interpolation towards the batch.
        if running_mean is not None:
            running_mean.lerp_(_cast(batch_mean, running_mean.dtype), momentum)
        if running_var is not None:
            unbiased_var = batch_var * (m / (m - 1))
            running_var.lerp_(_cast(unbiased_var, running_var.dtype), momentum)
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
        num_features = _check_layer_args(num_features, momentum)
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

    def _check_num_features(self, input: Tensor) -> None:
        _check_channels(self, input)

    def forward(self, input: Tensor) -> Tensor:
        if not isinstance(input, Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
        self._check_input_dim(input)
        self._check_num_features(input)
        # torch's rules, line for line: momentum=None is a cumulative average (weight 1/t at step t) ...
        momentum = _step_momentum(
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


#: The name this class had before it subclassed torch's (``bnnotes.sync`` and older code import it).
_BatchNorm = BatchNormBase


class BatchNorm1d(BatchNormBase, nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` (a subclass of it) computing with bnnotes: input (N, C) or (N, C, L).

    >>> layer = BatchNorm1d(4)
    >>> isinstance(layer, nn.BatchNorm1d), layer(torch.randn(8, 4)).shape
    (True, torch.Size([8, 4]))
    """

    def _check_input_dim(self, input: Tensor) -> None:  # torch's rule (ValueError), with the shape in the message
        if input.dim() not in (2, 3):
            raise ValueError(f"BatchNorm1d expected 2-D or 3-D input (N, C) or (N, C, L), got {input.dim()}-D input "
                             f"of shape {tuple(input.shape)}")


class BatchNorm2d(BatchNormBase, nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` (a subclass of it) computing with bnnotes: input (N, C, H, W)."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"BatchNorm2d expected 4-D input (N, C, H, W), got {input.dim()}-D input "
                             f"of shape {tuple(input.shape)}")


class BatchNorm3d(BatchNormBase, nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` (a subclass of it) computing with bnnotes: input (N, C, D, H, W)."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 5:
            raise ValueError(f"BatchNorm3d expected 5-D input (N, C, D, H, W), got {input.dim()}-D input "
                             f"of shape {tuple(input.shape)}")


class RunningStatsNorm(nn.Module):
    """The state every BN variant of bnnotes shares (Batch Renorm, Ghost BN, the ℓp layers), once.

    Parameters ``weight`` (gamma, ones) and ``bias`` (beta, zeros) when affine; one (C,) buffer per entry of the class
    attribute `running_stats` (name -> initial value) plus ``num_batches_tracked``, all None without
    track_running_stats; ``reset_running_stats``/``reset_parameters``; the input checks (`input_ranks`, `input_layout`,
    the channel count); the momentum rule (`_momentum`); and torch's loading of pre-version-2 checkpoints. The
    arguments mean what they mean in ``torch.nn.BatchNorm1d``. A subclass adds its own computation in ``forward``.

    These variants deliberately are not ``torch.nn`` BN modules: torch's tools (``convert_sync_batchnorm``, fusion)
    would treat them as plain BN and silently change what they compute.
    """

    _version = 2
    running_stats: dict[str, float] = {"running_mean": 0.0, "running_var": 1.0}
    input_ranks: tuple[int, ...] = (2, 3)
    input_layout: str = "(N, C) or (N, C, L)"

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
        self.num_features = _check_layer_args(num_features, momentum)
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        _init_affine(self, self.num_features, affine, device, dtype)
        for name in self.running_stats:
            buffer = torch.empty(self.num_features, device=device, dtype=dtype) if track_running_stats else None
            self.register_buffer(name, buffer)
        counter = torch.tensor(0, dtype=torch.long, device=device) if track_running_stats else None
        self.register_buffer("num_batches_tracked", counter)
        self.reset_running_stats()

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            for name, initial in self.running_stats.items():
                getattr(self, name).fill_(initial)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in self.input_ranks:
            ranks = " or ".join(f"{r}-D" for r in self.input_ranks)
            raise ValueError(f"{type(self).__name__} expected {ranks} input {self.input_layout}, got {input.dim()}-D "
                             f"input of shape {tuple(input.shape)}")

    def _check_forward_input(self, input: Tensor) -> None:
        """Tensor, floating point, rank and channel count, each with its own message."""
        if not isinstance(input, Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
        if not input.is_floating_point():
            raise TypeError(f"input must be a floating-point tensor, got dtype {input.dtype}")
        self._check_input_dim(input)
        _check_channels(self, input)

    def _momentum(self) -> float:
        """This step's weight of the new batch in the running averages (counting the batch while training)."""
        return _step_momentum(self.momentum, self.num_batches_tracked, self.training)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # As torch: checkpoints written before version 2 have no num_batches_tracked; it then defaults to 0.
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}"
        )


_TO_BNNOTES = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d}
_TO_TORCH = {v: k for k, v in _TO_BNNOTES.items()}


_HOOK_DICTS = (
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks", "_is_full_backward_hook",
    "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)


def _swap(module: nn.Module, mapping: dict[type, type]) -> nn.Module:
    target = mapping.get(type(module))
    if target is not None:
        new = target(
            module.num_features,
            eps=module.eps,
            momentum=module.momentum,
            affine=module.affine,
            track_running_stats=module.track_running_stats,
            device="meta",
            # (a torch layer on older torch takes no bias= argument: the bias is set to None below)
            **({"bias": getattr(module, "bias", None) is not None or not module.affine} if _takes_bias(target) else {}),
        )
        # Share the very same parameters and buffers (as torch.nn.SyncBatchNorm.convert_sync_batchnorm does): values,
        # device, dtype and requires_grad carry over, and an optimizer built before the swap still updates them.
        for name in ("weight", "bias"):
            setattr(new, name, getattr(module, name))
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            setattr(new, name, getattr(module, name))
        new.train(module.training)
        if hasattr(module, "qconfig"):
            new.qconfig = module.qconfig
        # The very same hook dictionaries: every hook keeps firing, in order, and the handles that registered them
        # still remove them.
        for name in _HOOK_DICTS:
            if name in module.__dict__:
                setattr(new, name, module.__dict__[name])
        return new
    for name, child in module.named_children():
        new_child = _swap(child, mapping)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


def convert_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``torch.nn.BatchNorm{1,2,3}d`` in `module` by bnnotes' own, sharing parameters, buffers and mode.

    Works in place on containers and returns the (possibly new) root module. The new layers hold the same Parameter
    and buffer objects, so device, dtype, requires_grad and any optimizer's references are preserved; they share the
    old layers' hook dictionaries (forward, forward-pre, backward, state-dict hooks: handles still remove them), mode
    and ``qconfig``. Other attributes set on the old layer by hand are not carried over.

    >>> net = convert_batchnorm(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)))
    >>> type(net[1]).__module__
    'bnnotes.torch_bn'
    """
    return _swap(module, _TO_BNNOTES)


def to_torch_batchnorm(module: nn.Module) -> nn.Module:
    """The inverse of `convert_batchnorm`: bnnotes' BN layers back to ``torch.nn.BatchNorm{1,2,3}d``, sharing state.

    >>> net = to_torch_batchnorm(nn.Sequential(nn.Linear(3, 4), BatchNorm1d(4)))
    >>> type(net[1]) is nn.BatchNorm1d
    True
    """
    return _swap(module, _TO_TORCH)


def _register_quantization_fusion() -> None:
    """Let ``torch.ao.quantization.fuse_modules`` fold bnnotes' BN into a preceding Conv/Linear as it does torch's.

    torch looks fusers up by exact module types, so each of its patterns with ``nn.BatchNormNd`` gets a twin with
    bnnotes' class (only added, nothing of torch's changed). Eval-mode (post-training) fusion then works; QAT fusion
    (``fuse_modules_qat``) builds torch's intrinsic ConvBn modules, which accept torch's exact BN types only: convert
    with `to_torch_batchnorm` first.
    """
    from torch.ao.quantization import fuser_method_mappings

    table = fuser_method_mappings._DEFAULT_OP_LIST_TO_FUSER_METHOD
    for pattern, fuser in list(table.items()):
        if any(t in _TO_BNNOTES for t in pattern):
            table.setdefault(tuple(_TO_BNNOTES.get(t, t) for t in pattern), fuser)


_register_quantization_fusion()


# Layers that live in their own modules but are part of torch_bn's public face. Imported on first access, because
# those modules import torch_bn's helpers themselves.
_LAZY_EXPORTS = {
    "BatchRenorm1d": "bnnotes.renorm",
    "BatchRenorm2d": "bnnotes.renorm",
    "renorm_schedule": "bnnotes.renorm",
    "SyncBatchNorm": "bnnotes.sync",
    "convert_sync_batchnorm": "bnnotes.sync",
    "GhostBatchNorm1d": "bnnotes.ghost",
    "GhostBatchNorm2d": "bnnotes.ghost",
}


def __getattr__(name: str) -> Any:
    module_name = _LAZY_EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module_name), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_EXPORTS))
