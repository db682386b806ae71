"""BN's successors in NumPy: LayerNorm, RMSNorm, GroupNorm and InstanceNorm, in the style of `bnnotes.numpy_bn`.

Every normalizer here computes ``x_hat = (x - mean) / sqrt(var + eps)`` (RMSNorm: ``x / sqrt(mean(x^2) + eps)``) and
differs from batch normalization only in the set of values the statistics are taken over:

- `layer_norm` (Ba et al., 2016): the trailing ``gamma.ndim`` axes of each example, as
  ``torch.nn.functional.layer_norm`` with ``normalized_shape = gamma.shape``;
- `rms_norm` (Zhang & Sennrich, 2019): the same axes, without centring, as ``torch.nn.functional.rms_norm``;
- `group_norm` (Wu & He, 2018): for x of shape (N, C, *spatial), each example's channels split into `num_groups`
  groups of C / num_groups consecutive channels, each group over all its channels and positions;
- `instance_norm` (Ulyanov et al., 2016): each example's channel over its spatial positions (GroupNorm with one
  channel per group).

None of them looks at the other examples of the batch: each output depends on its own example only, so batch size 1
works and the training and inference computations are the same (no running statistics).

Each forward returns ``(y, cache)``; the matching backward takes ``(dy, cache)`` and returns ``(dx, dgamma, dbeta)``
(``(dx, dgamma)`` for RMSNorm). As in `numpy_bn`: float32 and float64 in, the same dtype out; statistics accumulated in
float64 from centred values; inputs validated once at the public edge, with no silent broadcasting of a wrong gamma.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bnnotes._core import check_dy, check_nonnegative_eps, per_channel, reduction_dims

__all__ = [
    "layer_norm",
    "layer_norm_backward",
    "rms_norm",
    "rms_norm_backward",
    "group_norm",
    "group_norm_backward",
    "instance_norm",
    "instance_norm_backward",
]

Cache = dict[str, Any]


# --------------------------------------------------------------------------------------------------------------------
# Validation at the public edge
# --------------------------------------------------------------------------------------------------------------------


def _check_float(x: Any, name: str = "x") -> np.ndarray:
    x = np.asarray(x)
    if x.dtype not in (np.float32, np.float64):
        raise TypeError(f"{name} must be a float32 or float64 array, got dtype {x.dtype}")
    return x


def _check_vector(v: Any, name: str, expected: tuple[int, ...], what: str, x: np.ndarray) -> np.ndarray:
    v = np.asarray(v)
    if v.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be a real numeric array, got dtype {v.dtype}")
    if v.shape != expected:
        raise ValueError(f"{name} has shape {v.shape} but {what} (x.shape={x.shape}); expected {name}.shape={expected}")
    return v.astype(np.float64)


def _check_channels_first(x: np.ndarray, layer: str, min_ndim: int = 2) -> None:
    if x.ndim < min_ndim:
        layout = "(N, C, *spatial)" if min_ndim == 2 else "(N, C, L), (N, C, H, W) or (N, C, D, H, W)"
        raise ValueError(f"{layer} expects x of shape {layout}, got {x.ndim}-D x.shape={x.shape}")
    if x.shape[1] == 0:
        raise ValueError(f"{layer} needs at least 1 channel, got x.shape={x.shape}")


# --------------------------------------------------------------------------------------------------------------------
# The one computation: normalize each row of a 2-D array (rows = the groups of values that share statistics)
# --------------------------------------------------------------------------------------------------------------------


def _standardize_rows(rows: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """(x_hat, inv_std) for rows (R, M) in float64: each row centred and divided by sqrt(its biased variance + eps)."""
    mean = rows.mean(axis=1, keepdims=True)
    x_centered = rows - mean
    var = np.mean(x_centered**2, axis=1, keepdims=True)  # biased, from centred values (two passes)
    inv_std = 1.0 / np.sqrt(var + eps)
    return x_centered * inv_std, inv_std


def _standardize_rows_backward(dx_hat: np.ndarray, x_hat: np.ndarray, inv_std: np.ndarray) -> np.ndarray:
    """d loss / d rows from d loss / d x_hat, both (R, M): BN's projection (numpy_bn.backward), along each row.

    dx = (inv_std / M) * (M * dx_hat - sum(dx_hat) - x_hat * sum(dx_hat * x_hat)), the sums over the row.
    """
    m = x_hat.shape[1]
    return (inv_std / m) * (
        m * dx_hat - dx_hat.sum(axis=1, keepdims=True) - x_hat * (dx_hat * x_hat).sum(axis=1, keepdims=True)
    )


# --------------------------------------------------------------------------------------------------------------------
# LayerNorm and RMSNorm: statistics over the trailing normalized_shape = gamma.shape axes
# --------------------------------------------------------------------------------------------------------------------


def _check_normalized_shape(x: np.ndarray, gamma: Any, layer: str) -> tuple[int, ...]:
    normalized_shape = np.shape(gamma)
    k = len(normalized_shape)
    if k == 0:
        raise ValueError(
            f"{layer}: gamma must have at least 1 dimension (normalized_shape = gamma.shape), got a 0-d gamma"
        )
    if x.ndim < k or x.shape[x.ndim - k :] != normalized_shape:
        raise ValueError(
            f"{layer} normalizes over the trailing gamma.shape={normalized_shape} axes of x, but x.shape={x.shape} "
            f"does not end in {normalized_shape}"
        )
    if int(np.prod(normalized_shape)) == 0:
        raise ValueError(f"{layer}: normalized_shape={normalized_shape} has no elements")
    return normalized_shape


def layer_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float = 1e-5) -> tuple[np.ndarray, Cache]:
    """Layer normalization (Ba et al., 2016): each example standardized over its trailing ``gamma.ndim`` axes.

    x: (*, *normalized_shape), float32 or float64; for a transformer's activations (N, T, D) with gamma (D,), each
    token is normalized over its D features.
    gamma, beta: normalized_shape, the elementwise scale and shift (torch's ``weight`` and ``bias``).
    eps: added to the biased variance inside the square root.
    Returns y with x's shape and dtype, and the cache that `layer_norm_backward` needs.

    >>> y, _ = layer_norm(np.array([[1.0, 3.0], [10.0, 30.0]]), np.ones(2), np.zeros(2), eps=0.0)
    >>> y
    array([[-1.,  1.],
           [-1.,  1.]])
    """
    x = _check_float(x)
    normalized_shape = _check_normalized_shape(x, gamma, "layer_norm")
    gamma = _check_vector(gamma, "gamma", normalized_shape, f"the normalized shape is {normalized_shape}", x)
    beta = _check_vector(beta, "beta", normalized_shape, f"gamma.shape={normalized_shape}", x)
    eps = check_nonnegative_eps(eps)
    rows = x.astype(np.float64).reshape(-1, int(np.prod(normalized_shape)))  # one row per normalized instance
    x_hat_rows, inv_std = _standardize_rows(rows, eps)
    x_hat = x_hat_rows.reshape(x.shape)
    y = gamma * x_hat + beta  # gamma (normalized_shape) broadcasts over the leading axes
    cache = {"x_hat": x_hat, "inv_std": inv_std, "gamma": gamma, "normalized_shape": normalized_shape, "dtype": x.dtype}
    return y.astype(x.dtype, copy=False), cache


def layer_norm_backward(dy: np.ndarray, cache: Cache) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of `layer_norm`: (dx, dgamma, dbeta), dx of x's shape, dgamma and dbeta of gamma's shape.

    The same projection as BN's backward, taken along each example's normalized axes instead of along the batch;
    dgamma and dbeta sum over every leading axis.
    """
    x_hat = cache["x_hat"]
    dy = check_dy(dy, x_hat.shape)
    normalized_shape = cache["normalized_shape"]
    leading = tuple(range(x_hat.ndim - len(normalized_shape)))
    dgamma = (dy * x_hat).sum(axis=leading)
    dbeta = dy.sum(axis=leading)
    width = int(np.prod(normalized_shape))
    dx_hat = (dy * cache["gamma"]).reshape(-1, width)
    dx = _standardize_rows_backward(dx_hat, x_hat.reshape(-1, width), cache["inv_std"]).reshape(x_hat.shape)
    dtype = cache["dtype"]
    return dx.astype(dtype, copy=False), dgamma.astype(dtype, copy=False), dbeta.astype(dtype, copy=False)


def rms_norm(x: np.ndarray, gamma: np.ndarray, eps: float = 1e-5) -> tuple[np.ndarray, Cache]:
    """Root-mean-square normalization (Zhang & Sennrich, 2019): LayerNorm without centring and without a shift.

    x: (*, *normalized_shape), float32 or float64. gamma: normalized_shape.
    y = gamma * x / sqrt(mean(x^2) + eps), the mean over each example's trailing ``gamma.ndim`` axes.
    Returns y with x's shape and dtype, and the cache that `rms_norm_backward` needs.
    (Pass eps explicitly when comparing with ``F.rms_norm``, whose default is the dtype's machine epsilon.)

    >>> y, _ = rms_norm(np.array([[3.0, -4.0]]), np.ones(2), eps=0.0)  # rms = sqrt((9 + 16) / 2)
    >>> np.round(y * np.sqrt(12.5), 12)
    array([[ 3., -4.]])
    """
    x = _check_float(x)
    normalized_shape = _check_normalized_shape(x, gamma, "rms_norm")
    gamma = _check_vector(gamma, "gamma", normalized_shape, f"the normalized shape is {normalized_shape}", x)
    eps = check_nonnegative_eps(eps)
    rows = x.astype(np.float64).reshape(-1, int(np.prod(normalized_shape)))
    inv_rms = 1.0 / np.sqrt(np.mean(rows**2, axis=1, keepdims=True) + eps)
    x_hat = (rows * inv_rms).reshape(x.shape)
    y = gamma * x_hat
    cache = {"x_hat": x_hat, "inv_rms": inv_rms, "gamma": gamma, "normalized_shape": normalized_shape, "dtype": x.dtype}
    return y.astype(x.dtype, copy=False), cache


def rms_norm_backward(dy: np.ndarray, cache: Cache) -> tuple[np.ndarray, np.ndarray]:
    """Gradients of `rms_norm`: (dx, dgamma).

    Without centring the projection loses its mean term: dx = inv_rms * (g - x_hat * mean(g * x_hat)), g = dy * gamma,
    the mean along each example's normalized axes.
    """
    x_hat = cache["x_hat"]
    dy = check_dy(dy, x_hat.shape)
    normalized_shape = cache["normalized_shape"]
    leading = tuple(range(x_hat.ndim - len(normalized_shape)))
    dgamma = (dy * x_hat).sum(axis=leading)
    width = int(np.prod(normalized_shape))
    g = (dy * cache["gamma"]).reshape(-1, width)
    x_hat_rows = x_hat.reshape(-1, width)
    dx = cache["inv_rms"] * (g - x_hat_rows * (g * x_hat_rows).mean(axis=1, keepdims=True))
    dtype = cache["dtype"]
    return dx.reshape(x_hat.shape).astype(dtype, copy=False), dgamma.astype(dtype, copy=False)


# --------------------------------------------------------------------------------------------------------------------
# GroupNorm and InstanceNorm: x is (N, C, *spatial), gamma and beta are per channel (C,)
# --------------------------------------------------------------------------------------------------------------------


def _check_num_groups(num_groups: Any, channels: int) -> int:
    if isinstance(num_groups, bool) or not isinstance(num_groups, (int, np.integer)) or num_groups < 1:
        raise ValueError(f"num_groups must be a positive integer, got {num_groups!r}")
    if channels % num_groups:
        raise ValueError(
            f"num_groups={num_groups} does not divide the {channels} channels of x; GroupNorm needs C divisible by "
            f"num_groups (for example one of {[g for g in range(1, channels + 1) if channels % g == 0]})"
        )
    return int(num_groups)


def _group_norm(
    x: np.ndarray, num_groups: int, gamma: np.ndarray, beta: np.ndarray, eps: float
) -> tuple[np.ndarray, Cache]:
    n = x.shape[0]
    rows = x.astype(np.float64).reshape(n * num_groups, -1)  # one row per (example, group): C/G channels x positions
    x_hat_rows, inv_std = _standardize_rows(rows, eps)
    x_hat = x_hat_rows.reshape(x.shape)
    y = per_channel(gamma, x.ndim) * x_hat + per_channel(beta, x.ndim)  # the affine map stays per CHANNEL
    cache = {"x_hat": x_hat, "inv_std": inv_std, "gamma": gamma, "num_groups": num_groups, "dtype": x.dtype}
    return y.astype(x.dtype, copy=False), cache


def group_norm(
    x: np.ndarray, num_groups: int, gamma: np.ndarray, beta: np.ndarray, eps: float = 1e-5
) -> tuple[np.ndarray, Cache]:
    """Group normalization (Wu & He, 2018): each example's channels in `num_groups` groups, each group standardized.

    x: (N, C, *spatial) (or (N, C)), float32 or float64; C must be divisible by num_groups, and group g holds the
    consecutive channels g * C/G, ..., (g + 1) * C/G - 1, as in ``torch.nn.GroupNorm``.
    gamma, beta: (C,), per channel (not per group).
    num_groups=1 is LayerNorm over (C, *spatial); num_groups=C is `instance_norm`.
    Returns y with x's shape and dtype, and the cache that `group_norm_backward` needs.

    >>> x = np.array([[[1.0], [3.0], [10.0], [30.0]]])  # (N, C, L) = (1, 4, 1)
    >>> y, _ = group_norm(x, 2, np.ones(4), np.zeros(4), eps=0.0)
    >>> y.ravel()
    array([-1.,  1., -1.,  1.])
    """
    x = _check_float(x)
    _check_channels_first(x, "group_norm")
    channels = x.shape[1]
    num_groups = _check_num_groups(num_groups, channels)
    what = f"x has {channels} channels (gamma is per channel, not per group)"
    gamma = _check_vector(gamma, "gamma", (channels,), what, x)
    beta = _check_vector(beta, "beta", (channels,), what, x)
    return _group_norm(x, num_groups, gamma, beta, check_nonnegative_eps(eps))


def group_norm_backward(dy: np.ndarray, cache: Cache) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of `group_norm` (or `instance_norm`): (dx, dgamma, dbeta); dgamma, dbeta are (C,).

    dx is BN's projection along each (example, group) row; dgamma and dbeta sum over the batch and every position.
    """
    x_hat = cache["x_hat"]
    dy = check_dy(dy, x_hat.shape)
    ndim = x_hat.ndim
    per_channel_axes = tuple(reduction_dims(ndim))
    dgamma = (dy * x_hat).sum(axis=per_channel_axes)
    dbeta = dy.sum(axis=per_channel_axes)
    rows = x_hat.shape[0] * cache["num_groups"]
    dx_hat = (dy * per_channel(cache["gamma"], ndim)).reshape(rows, -1)
    dx = _standardize_rows_backward(dx_hat, x_hat.reshape(rows, -1), cache["inv_std"]).reshape(x_hat.shape)
    dtype = cache["dtype"]
    return dx.astype(dtype, copy=False), dgamma.astype(dtype, copy=False), dbeta.astype(dtype, copy=False)


def instance_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float = 1e-5) -> tuple[np.ndarray, Cache]:
    """Instance normalization (Ulyanov et al., 2016): each channel of each example standardized over its positions.

    x: (N, C, *spatial) with at least one spatial axis, float32 or float64. gamma, beta: (C,).
    The training-mode computation of ``torch.nn.functional.instance_norm`` (``use_input_stats=True``), which is also
    ``nn.InstanceNorm2d``'s default in both modes (``track_running_stats=False``).
    Returns y with x's shape and dtype, and the cache that `instance_norm_backward` needs.

    >>> y, _ = instance_norm(np.array([[[1.0, 3.0], [10.0, 30.0]]]), np.ones(2), np.zeros(2), eps=0.0)
    >>> y
    array([[[-1.,  1.],
            [-1.,  1.]]])
    """
    x = _check_float(x)
    _check_channels_first(x, "instance_norm", min_ndim=3)
    channels = x.shape[1]
    gamma = _check_vector(gamma, "gamma", (channels,), f"x has {channels} channels", x)
    beta = _check_vector(beta, "beta", (channels,), f"x has {channels} channels", x)
    return _group_norm(x, channels, gamma, beta, check_nonnegative_eps(eps))


def instance_norm_backward(dy: np.ndarray, cache: Cache) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of `instance_norm`: (dx, dgamma, dbeta), as `group_norm_backward` with one channel per group."""
    return group_norm_backward(dy, cache)
