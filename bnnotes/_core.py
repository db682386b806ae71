"""The shared core of bnnotes: the small operations every implementation uses, spelled once.

The NumPy and PyTorch implementations, the BN variants, the converters, the experiments and the checkers import these
public names instead of re-writing them. This module imports nothing of bnnotes. Sections, bottom-up:

- numbers: `bessel_factor`, `unbiased_variance`, `ema_` (the running-average update), `step_momentum` (its weight);
- shapes and dtypes: `reduction_dims`, `per_channel`, `compute_dtype`, `values_per_channel`, `is_plain`;
- argument checks, one rule each: `check_input`, `check_eps`, `check_layer_args`, `check_channels`,
  `check_input_dim`, `DtypeMismatchError`; for the NumPy references `check_nonnegative_eps` and `check_dy`;
- the computation of training-mode BN in PyTorch: `channel_sum`, `batch_mean_var` (two passes),
  `per_channel_affine`, `normalize_backward` (the closed form), and `affine_inference` (fixed statistics);
- `RunningStatsNorm`, the one base class for the state, reset, loading and repr of the layers with running statistics
  that are not torch BN modules (Batch Renorm, Ghost BN, the ℓp layers).

See ARCHITECTURE.md for the layers and what may import what.
"""

from __future__ import annotations

import numbers
import operator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "bessel_factor",
    "unbiased_variance",
    "ema_",
    "step_momentum",
    "LOW_PRECISION",
    "reduction_dims",
    "per_channel",
    "compute_dtype",
    "values_per_channel",
    "is_plain",
    "DtypeMismatchError",
    "check_input",
    "check_eps",
    "check_layer_args",
    "check_channels",
    "check_input_dim",
    "check_nonnegative_eps",
    "check_dy",
    "channel_sum",
    "batch_mean_var",
    "per_channel_affine",
    "normalize_backward",
    "affine_inference",
    "RunningStatsNorm",
]

# --------------------------------------------------------------------------------------------------------------------
# Numbers: Bessel's correction, the running-average update and its weight
# --------------------------------------------------------------------------------------------------------------------
def bessel_factor(m: Any) -> float:
    """Bessel's correction m / (m - 1) for m values per channel (N, or N * H * W for images).

    Raises TypeError for a non-integer m and ValueError for m < 2 (one value has no unbiased variance).

    >>> bessel_factor(4)
    1.3333333333333333
    """
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)):
        raise TypeError(f"m (values per channel in a batch) must be an integer, got {type(m).__name__} {m!r}")
    if m < 2:
        raise ValueError(f"m (values per channel in a batch) must be at least 2 for the m/(m-1) correction, got {m}")
    return int(m) / (int(m) - 1)


def unbiased_variance(biased_var: Any, m: Any) -> Any:
    """The unbiased variance from the biased one of m values: ``biased_var * m / (m - 1)``.

    biased_var: a float, NumPy array or torch tensor (any shape). m: values per channel.

    >>> unbiased_variance(3.0, 4)
    4.0
    """
    return biased_var * bessel_factor(m)


def ema_(running: Any, batch: Any, momentum: float) -> Any:
    """The running-average update of PyTorch's convention, in place: ``running = (1 - momentum) * running +
    momentum * batch`` (momentum is the weight of the NEW value; Keras's momentum is 1 - this one).

    running: a torch tensor or NumPy array, updated in place and returned; batch: the same shape (a tensor of another
    dtype is cast to running's). Written as a step towards the batch, ``running += momentum * (batch - running)``.

    >>> import numpy as np
    >>> ema_(np.array([0.0, 10.0]), np.array([1.0, 0.0]), 0.1).tolist()
    [0.1, 9.0]
    """
    if isinstance(running, np.ndarray):
        running += momentum * (np.asarray(batch, dtype=running.dtype) - running)
        return running
    # (no .to() when the dtypes agree: even a no-op cast costs microseconds on the hot path)
    return running.lerp_(batch if batch.dtype == running.dtype else batch.to(running.dtype), momentum)


def step_momentum(momentum: float | None, num_batches_tracked: Tensor | None, training: bool) -> float:
    """This step's weight of the new batch in the running averages, by torch's rule: the batch is counted while
    training (when a counter is given), and momentum=None means the cumulative average, weight 1/t at the t-th batch.

    num_batches_tracked: a 0-d integer tensor, incremented in place while training; None for layers without one.

    >>> counter = torch.tensor(2)
    >>> step_momentum(None, counter, training=True), int(counter), step_momentum(0.1, counter, training=False)
    (0.3333333333333333, 3, 0.1)
    """
    if training and num_batches_tracked is not None:
        num_batches_tracked.add_(1)
        if momentum is None:
            return 1.0 / float(num_batches_tracked)
    return 0.0 if momentum is None else momentum


# --------------------------------------------------------------------------------------------------------------------
# Shapes and dtypes
# --------------------------------------------------------------------------------------------------------------------

#: Input dtypes whose statistics are computed in float32.
LOW_PRECISION = (torch.float16, torch.bfloat16)


def reduction_dims(ndim: int) -> list[int]:
    """The dims BN's statistics are taken over, for an input (N, C, *spatial) of `ndim` dims: the batch dim 0 and
    every spatial dim (the channel dim 1 is kept).

    >>> reduction_dims(2), reduction_dims(4)
    ([0], [0, 2, 3])
    """
    return [0] + list(range(2, ndim))


def per_channel(v: Any, ndim: int) -> Any:
    """View a per-channel vector (C,) as (1, C, 1, ...) so that it broadcasts against (N, C, *spatial) of `ndim` dims.
    v: a torch tensor or a NumPy array (a view of it, not a copy). Against (N, C) a (C,) vector broadcasts as it is,
    so for ndim = 2 it is returned unchanged (no view op: the 2-D training path is dominated by small ops).

    >>> per_channel(torch.zeros(3), 4).shape, per_channel(np.zeros(3), 3).shape, per_channel(np.zeros(3), 2).shape
    (torch.Size([1, 3, 1, 1]), (1, 3, 1), (3,))
    """
    return v if ndim == 2 else v.reshape((1, -1) + (1,) * (ndim - 2))


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype BN computes x's statistics in: float32 for float16/bfloat16 x, x's own dtype otherwise.

    >>> compute_dtype(torch.zeros(1, dtype=torch.bfloat16)), compute_dtype(torch.zeros(1, dtype=torch.float64))
    (torch.float32, torch.float64)
    """
    return torch.float32 if x.dtype in LOW_PRECISION else x.dtype


def values_per_channel(x: Any) -> int:
    """m, the number of values each channel's statistics average over: N * prod(spatial) for x (N, C, *spatial), a
    torch tensor or a NumPy array (0 when x has no channel).

    >>> values_per_channel(torch.zeros(8, 3, 2, 2)), values_per_channel(np.zeros((5, 2)))
    (32, 5)
    """
    size = x.numel() if isinstance(x, Tensor) else x.size
    return size // x.shape[1] if x.shape[1] else 0


def is_plain(*tensors: Tensor) -> bool:
    """True when in-place scratch arithmetic is safe: eager, autograd not recording, no vmap or torch.func wrapper.

    While autograd records (a ``create_graph=True`` backward, or the forward as torch.export traces it), ``out=`` and
    in-place writes would break the graph. Under vmap (``is_grads_batched``, ``torch.func.vmap``) an in-place op into
    a tensor computed from unbatched values only cannot take a batched operand; under torch.func the wrappers must see
    out-of-place ops. The checks are functorch internals, so they are not even evaluated while torch.compile traces.

    >>> with torch.no_grad():
    ...     is_plain(torch.zeros(2))
    True
    """
    if torch.compiler.is_compiling() or torch.is_grad_enabled():
        return False
    functorch = torch._C._functorch
    return not any(
        functorch.is_functorch_wrapped_tensor(t) or functorch.is_legacy_batchedtensor(t) for t in tensors
    )


# --------------------------------------------------------------------------------------------------------------------
# Argument checks: one rule each, with messages that name what was expected and what arrived
# --------------------------------------------------------------------------------------------------------------------


class DtypeMismatchError(TypeError, RuntimeError):
    """A tensor's dtype does not go with the input's. A RuntimeError as torch's own BN raises in the same cases, and a
    TypeError because that is what it is."""


def check_input(input: Tensor, **vectors: Tensor | None) -> None:
    """Validate a functional BN's input (N, C, *spatial) and the per-channel (C,) vectors that go with it.

    As torch: the vectors have input's dtype, except that float16/bfloat16 input may come with float32 vectors (mixed
    precision); a 1-D input is accepted only empty (its "channels" are then 0, as in ``F.batch_norm``).

    >>> check_input(torch.zeros(4, 3), weight=torch.ones(2))
    Traceback (most recent call last):
    ValueError: weight has shape (2,) but input has 3 channels (input.shape=(4, 3)); expected (3,)
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
        if v.dtype != input.dtype and not (input.dtype in LOW_PRECISION and v.dtype == torch.float32):
            raise DtypeMismatchError(
                f"{name} has dtype {v.dtype} but input has dtype {input.dtype}; expected {input.dtype}"
                + (" or torch.float32" if input.dtype in LOW_PRECISION else "")
                + " (convert the module with .to(dtype), or the input)"
            )
        if v.device != input.device:
            raise ValueError(f"{name} is on {v.device} but input is on {input.device}; expected the same device")


def _torch_allows_zero_eps_with_fixed_statistics() -> bool:
    """Whether the installed torch's ``F.batch_norm`` accepts eps = 0 with fixed (running) statistics: 2.13 does,
    2.11 asks for eps > 0 in both modes. Asked once, at import, so that bnnotes raises where this torch raises."""
    try:
        F.batch_norm(torch.zeros(2, 1), torch.zeros(1), torch.ones(1), training=False, eps=0.0)
    except (ValueError, RuntimeError):
        return False
    return True


#: eps = 0 is allowed with fixed statistics when the installed torch allows it (see above).
ZERO_EPS_WITH_FIXED_STATISTICS = _torch_allows_zero_eps_with_fixed_statistics()


def check_eps(eps: Any, batch_statistics: bool) -> None:
    """torch's rule for eps: positive when normalizing with batch statistics (a batch may have zero variance),
    non-negative with fixed ones (positive there too where the installed torch says so: 2.11 does, 2.13 does not;
    `ZERO_EPS_WITH_FIXED_STATISTICS`). A TypeError for anything but a real number.

    >>> check_eps(1e-5, batch_statistics=False)
    >>> check_eps(0.0, batch_statistics=True)
    Traceback (most recent call last):
    ValueError: eps must be positive during training (with batch statistics), got eps=0.0
    """
    if not isinstance(eps, numbers.Real) or isinstance(eps, bool):
        raise TypeError(f"eps must be a real number, got {type(eps).__name__}")
    if batch_statistics and not eps > 0.0:
        raise ValueError(f"eps must be positive during training (with batch statistics), got eps={eps}")
    if not ZERO_EPS_WITH_FIXED_STATISTICS and not eps > 0.0:
        raise ValueError(f"eps must be positive (torch {torch.__version__} asks for eps > 0 with fixed statistics "
                         f"too), got eps={eps}")
    if not eps >= 0.0:
        raise ValueError(f"eps must be non-negative, got {eps} (eps must be positive with batch statistics "
                         f"and non-negative with fixed ones; got eps={eps})")


def check_layer_args(num_features: Any, momentum: Any) -> int:
    """The constructor checks every normalization layer of bnnotes shares: returns num_features as an int (NumPy
    integers are accepted, as by torch); momentum is a number in [0, 1] or None.

    >>> check_layer_args(np.int64(3), None)
    3
    """
    try:
        count = operator.index(num_features) if not isinstance(num_features, bool) else None
    except TypeError:
        count = None
    if count is None or count < 1:
        raise ValueError(f"num_features must be a positive integer, got {num_features!r}")
    is_number = isinstance(momentum, numbers.Real) and not isinstance(momentum, bool)
    if momentum is not None and not (is_number and 0.0 <= momentum <= 1.0):
        raise ValueError(f"momentum must be a number in [0, 1] or None, got {momentum!r}")
    return count


def check_channels(layer: nn.Module, input: Tensor) -> None:
    """A clear error when input's channel count (dim 1) is not the layer's ``num_features``.

    >>> check_channels(nn.BatchNorm1d(3), torch.zeros(4, 2))
    Traceback (most recent call last):
    ValueError: BatchNorm1d(3) expected 3 channels, got input with 2 channels (input.shape=(4, 2))
    """
    if input.shape[1] != layer.num_features:
        raise ValueError(
            f"{type(layer).__name__}({layer.num_features}) expected {layer.num_features} channels, got input with "
            f"{input.shape[1]} channels (input.shape={tuple(input.shape)})"
        )


def check_input_dim(layer: nn.Module, input: Tensor, ranks: tuple[int, ...] | None, layout: str) -> None:
    """The one input-rank rule of every layer: input.dim() must be one of `ranks` (None: any rank >= 2). A ValueError,
    as torch's, naming the layer, the expected layout and the shape that arrived.

    >>> check_input_dim(nn.BatchNorm2d(3), torch.zeros(4, 3), (4,), "(N, C, H, W)")
    Traceback (most recent call last):
    ValueError: BatchNorm2d expected 4-D input (N, C, H, W), got 2-D input of shape (4, 3)
    """
    if (input.dim() >= 2) if ranks is None else (input.dim() in ranks):
        return
    expected = " or ".join(f"{r}-D" for r in ranks) + " input" if ranks is not None else "input"
    raise ValueError(f"{type(layer).__name__} expected {expected} {layout}, got {input.dim()}-D input "
                     f"of shape {tuple(input.shape)}")


def check_nonnegative_eps(eps: Any) -> float:
    """The NumPy references' rule for eps (they allow eps = 0, to compare with exact results): a number >= 0.

    >>> check_nonnegative_eps(np.float32(0.5))
    0.5
    """
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.integer, np.floating)) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")
    return float(eps)


def check_dy(dy: Any, shape: tuple[int, ...]) -> np.ndarray:
    """A NumPy backward's upstream gradient: floating point, the forward input's `shape`; returned in float64.

    >>> check_dy(np.ones((2, 3)), (3, 2))
    Traceback (most recent call last):
    ValueError: dy has shape (2, 3) but the forward input had shape (3, 2)
    """
    dy = np.asarray(dy)
    if dy.dtype.kind != "f":
        raise TypeError(f"dy must be a floating-point array, got dtype {dy.dtype}")
    if dy.shape != shape:
        raise ValueError(f"dy has shape {dy.shape} but the forward input had shape {shape}")
    return dy.astype(np.float64, copy=False)


# --------------------------------------------------------------------------------------------------------------------
# The computation of BN in PyTorch: statistics, the per-channel affine map, the closed-form backward
# --------------------------------------------------------------------------------------------------------------------

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


def channel_sum(t: Tensor, dims: list[int], weight: float = 1.0) -> Tensor:
    """Per-channel sum of t (N, C, *spatial) over `dims`, times `weight` (1/m gives the mean). Returns (C,).

    On the CPU, for a contiguous tensor, each thread first sums its own share of the data, and the few partial sums
    are then combined as a matrix-vector product with a vector of `weight`s (so the weight costs no extra op):
    - with spatial dims, each of the N * C rows over its contiguous positions (measured 1.1x to 2x faster than one
      reduction over dims (0, 2, ...));
    - for (N, C), the batch in one slab of rows per thread (`_slabs`).
    A thread then reads the same part of t that it writes in torch's elementwise ops (which split the elements into
    one contiguous range per thread), so no cache line moves between cores. Summed on one core (a BLAS column sum),
    the lines that the next elementwise op writes from the other core have to be fetched back: on a 2-vCPU VM whose
    vCPUs sit on different dies, that doubled the training step at (256, 1024).

    >>> channel_sum(torch.ones(4, 3, 2), [0, 2]).tolist(), channel_sum(torch.ones(4, 3), [0], 0.25).tolist()
    ([8.0, 8.0, 8.0], [1.0, 1.0, 1.0])
    """
    if t.is_cpu and t.is_contiguous():
        n, channels = t.shape[0], t.shape[1]
        if t.dim() == 2:
            slabs = _slabs(n, t.numel())
            rows = t if slabs == 1 else t.view(slabs, n // slabs, channels).sum(dim=1)
        else:
            rows = t.view(n * channels, -1).sum(dim=1).view(n, channels)
        return torch.mv(rows.t(), _filled(rows.shape[0], weight, t.dtype))
    total = t.sum(dim=dims)
    return total if weight == 1.0 else total.mul_(weight)


def _slabs(n: int, numel: int) -> int:
    """The number of threads torch's CPU elementwise ops split `numel` elements among (one contiguous range each, of
    at least 32768 elements: ATen's grain size), when it divides the n rows; otherwise 1 (and always while
    torch.compile traces: the thread count is not a graph value, and the compiled kernels fuse the passes anyway)."""
    if torch.compiler.is_compiling():
        return 1
    threads = min(torch.get_num_threads(), -(-numel // 32768))
    return threads if threads > 1 and n % threads == 0 else 1


def _squared_deviations(x: Tensor, mean: Tensor) -> Tensor:
    """(x - mean)^2 elementwise in one pass, a fresh tensor: the unreduced squared error of mse_loss. (Its functional
    wrapper's shape checks cost more than the kernel on small inputs, so the kernel is called directly.)"""
    try:
        return torch._C._nn.mse_loss(x, mean, 0)  # 0: reduction="none"
    except (AttributeError, TypeError, RuntimeError):  # pragma: no cover - a torch without this binding
        return F.mse_loss(x, mean, reduction="none")


def _twice_centered_product(dy: Tensor, x: Tensor, mean: Tensor) -> Tensor:
    """2 (x - mean) dy elementwise in one pass, a fresh tensor laid out as x: the gradient of the squared error
    (x - mean)^2 for upstream dy. One pass instead of two (a subtraction, then a product), from one kernel call.
    dy, x and mean (broadcast as (1, C, 1, ...)) share one dtype. (0: reduction="none".)"""
    return torch.ops.aten.mse_loss_backward.grad_input(dy, x, mean, 0, grad_input=torch.empty_like(x))


def batch_mean_var(x: Tensor, dims: list[int], compute: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel mean and biased variance by two passes: the mean, then the mean squared deviation from it.

    x: (N, C, *spatial). Returns (batch_mean, batch_var, scratch): (C,) statistics in `compute` and a fresh tensor of
    x's shape in `compute` that the caller may overwrite (it holds the squared deviations).
    Two passes stay accurate far from zero, where E[x^2] - E[x]^2 cancels catastrophically. No other temporary as
    large as x is made: on the CPU, fresh memory is page-faulted in, which can cost more than the arithmetic.

    >>> batch_mean, batch_var, _ = batch_mean_var(torch.tensor([[1.0], [3.0]]), [0], torch.float32)
    >>> batch_mean.tolist(), batch_var.tolist()
    ([2.0], [1.0])
    """
    shape = (1, -1) + (1,) * (x.dim() - 2)
    m = values_per_channel(x)
    if x.dtype == compute:
        batch_mean = channel_sum(x, dims, 1.0 / m)
        scratch = _squared_deviations(x, per_channel(batch_mean, x.dim()))
    else:  # half precision: the deviations are formed in float32
        batch_mean = torch.mean(x, dim=dims, dtype=compute)
        scratch = torch.sub(x, batch_mean.view(shape)).square_()
    return batch_mean, channel_sum(scratch, dims, 1.0 / m), scratch


def per_channel_affine(x: Tensor, scale: Tensor, shift: Tensor, out: Tensor, plain: bool | None = None) -> Tensor:
    """out = x * scale + shift with (C,) scale and shift, written into `out` (x's shape, the compute dtype).

    Traced or transformed (see `is_plain`), `out` is left alone and a new tensor returned: autograd tracing
    (torch.export) refuses ``out=``. `plain`: the caller's `is_plain` verdict, when it has one (it is not free to
    recompute).

    >>> per_channel_affine(torch.ones(2, 3), torch.full((3,), 2.0), torch.ones(3), out=torch.empty(2, 3)).tolist()
    [[3.0, 3.0, 3.0], [3.0, 3.0, 3.0]]
    """
    if not (is_plain(x) if plain is None else plain):
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return torch.addcmul(shift.to(out.dtype).view(shape), x, scale.to(out.dtype).view(shape))
    if scale.dtype != out.dtype or shift.dtype != out.dtype:
        scale, shift = scale.to(out.dtype), shift.to(out.dtype)
    if x.dim() == 2:
        return torch.addcmul(shift, x, scale, out=out)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    # With spatial dims, two simple passes beat addcmul's doubly broadcast kernel several times on the CPU.
    return torch.mul(x, scale.view(shape), out=out).add_(shift.view(shape))


def normalize_backward(
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
    place, and only in eager mode with plain tensors (see `is_plain`); otherwise every op is out-of-place, so batched
    gradients (``is_grads_batched``), torch.func and torch.compile see a pure function.

    With two values per channel x_hat is always (-1, 1), whatever x: the gradient through it vanishes.

    >>> x, dy = torch.tensor([[1.0], [3.0]]), torch.tensor([[1.0], [0.0]])
    >>> dx, sum_dy, sum_dy_x_hat = normalize_backward(dy, x, torch.tensor([2.0]), torch.tensor([1.0]), None, 0.0, True)
    >>> dx.tolist(), sum_dy.tolist(), sum_dy_x_hat.tolist()
    ([[0.0], [0.0]], [1.0], [-1.0])
    """
    ndim = x.dim()
    dims = [0] + list(range(2, ndim))
    shape = (1, -1) + (1,) * (ndim - 2)
    compute = batch_mean.dtype
    m = x.numel() // x.shape[1]
    if not is_plain(dy, x):
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

    # One scratch tensor and no other large temporary: it holds 2 (x - mean) dy for the reduction, then becomes dx.
    sum_dy = channel_sum(dy, dims) if dy.dtype == compute else dy.sum(dim=dims, dtype=compute)
    if dy.dtype == x.dtype == compute:
        scratch = _twice_centered_product(dy, x, per_channel(batch_mean, ndim))  # 2 (x - mean) dy, halved in the sum
        sum_dy_x_hat = channel_sum(scratch, dims, 0.5).mul_(inv_std)
    else:  # half precision: the product is formed in float32
        scratch = torch.sub(x, per_channel(batch_mean, ndim))
        sum_dy_x_hat = channel_sum(scratch.mul_(dy), dims).mul_(inv_std)
    if not need_dx:
        return None, sum_dy, sum_dy_x_hat
    # dx = a * dy + b * x + c with per-channel a = gain * inv_std, b = -a * inv_std * sum_dy_x_hat / m and
    # c = -a * sum_dy / m - b * mean, in two passes over the scratch tensor. (Centring x first would cost a pass and,
    # measured in float32 with mean/std = 1e4, gains no accuracy.)
    a = inv_std if gain is None else inv_std * gain
    a_over_m = torch.mul(a, -1.0 / m)
    b = torch.mul(a_over_m, inv_std).mul_(sum_dy_x_hat)
    c = torch.mul(a_over_m, sum_dy).addcmul_(b, batch_mean, value=-1)
    dx = per_channel_affine(x, b, c, out=scratch, plain=True)
    return dx.addcmul_(dy, per_channel(a, ndim)), sum_dy, sum_dy_x_hat


def affine_inference(
    input: Tensor, mean: Tensor, inv_std: Tensor, weight: Tensor | None, bias: Tensor | None
) -> Tensor:
    """y = weight * (input - mean) * inv_std + bias with fixed statistics (Algorithm 2), folded into one per-channel
    scale and shift. input: (N, C, *spatial); the rest (C,). Returns input's shape and dtype.

    With the statistics fixed, BN is a per-channel affine map; autograd differentiates it exactly (dx = dy * scale,
    dweight = sum(dy * x_hat), dbias = sum(dy)), so no hand-written backward is needed here.

    >>> affine_inference(torch.tensor([[3.0]]), torch.tensor([1.0]), torch.tensor([0.5]), None, None).tolist()
    [[1.0]]
    """
    ndim = input.dim()
    compute = compute_dtype(input)
    scale = inv_std.to(compute)
    if weight is not None:
        scale = scale * weight.to(compute)
    shift = -mean.to(compute) * scale
    if bias is not None:
        shift = shift + bias.to(compute)
    if ndim == 2:
        y = torch.addcmul(shift, input, scale)
    else:  # two simple passes beat addcmul's doubly broadcast kernel on the CPU
        y = input * per_channel(scale, ndim) + per_channel(shift, ndim)
    return y if y.dtype == input.dtype else y.to(input.dtype)


# --------------------------------------------------------------------------------------------------------------------
# The one base class of the layers with running statistics that are not torch BN modules
# --------------------------------------------------------------------------------------------------------------------


class RunningStatsNorm(nn.Module):
    """The state every BN variant of bnnotes shares (Batch Renorm, Ghost BN, the ℓp layers), once.

    Parameters ``weight`` (gamma, ones) and ``bias`` (beta, zeros) when affine; one (C,) buffer per entry of the class
    attribute `running_stats` (name -> initial value) plus ``num_batches_tracked``, all None without
    track_running_stats; ``reset_running_stats``/``reset_parameters``; the input checks (`input_ranks`, `input_layout`,
    the channel count); the momentum rule (`_momentum`); and torch's loading of pre-version-2 checkpoints. The
    arguments mean what they mean in ``torch.nn.BatchNorm1d``. A subclass adds its own computation in ``forward``.

    These variants deliberately are not ``torch.nn`` BN modules: torch's tools (``convert_sync_batchnorm``, fusion)
    would treat them as plain BN and silently change what they compute.

    >>> class Centre(RunningStatsNorm):
    ...     running_stats = {"running_mean": 0.0}
    >>> Centre(2)
    Centre(2, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True)
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
        self.num_features = check_layer_args(num_features, momentum)
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        if affine:
            self.weight = nn.Parameter(torch.ones(self.num_features, device=device, dtype=dtype))
            self.bias = nn.Parameter(torch.zeros(self.num_features, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
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
        check_input_dim(self, input, self.input_ranks, self.input_layout)

    def _check_forward_input(self, input: Tensor) -> None:
        """Tensor, floating point, rank and channel count, each with its own message."""
        if not isinstance(input, Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
        if not input.is_floating_point():
            raise TypeError(f"input must be a floating-point tensor, got dtype {input.dtype}")
        self._check_input_dim(input)
        check_channels(self, input)

    def _momentum(self) -> float:
        """This step's weight of the new batch in the running averages (counting the batch while training)."""
        return step_momentum(self.momentum, self.num_batches_tracked, self.training)

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
