"""Batch normalization in NumPy: the reference implementation the course derives and tests.

The math is Algorithm 1 (training) and Algorithm 2 (inference) of Ioffe & Szegedy (2015). Inputs have shape (N, C) or
(N, C, *spatial); the statistics are per channel C, over the batch axis N and every spatial position. Everything here
is a pure function of its arguments except the small stateful layer `BatchNorm` at the bottom, a thin wrapper in the
style of CS231n's ``layers.py``.

Precision: float32 and float64 go in and the same dtype comes out. The statistics are always accumulated in float64 and
the variance is computed from centred values (two passes), never as E[x^2] - E[x]^2, which cancels catastrophically
when the mean is large compared with the spread.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bnnotes._core import (
    check_dy,
    check_layer_args,
    check_nonnegative_eps,
    ema_,
    per_channel,
    reduction_dims,
    unbiased_variance,
    values_per_channel,
)

__all__ = ["forward", "backward", "backward_staged", "inference", "BatchNorm", "reduction_axes"]

Cache = dict[str, Any]


def reduction_axes(ndim: int) -> tuple[int, ...]:
    """The axes the statistics are taken over: the batch axis 0 and every spatial axis 2, 3, ...

    >>> reduction_axes(2), reduction_axes(4)
    ((0,), (0, 2, 3))
    """
    return tuple(reduction_dims(ndim))


def _check_x(x: Any, name: str = "x") -> np.ndarray:
    x = np.asarray(x)
    if x.dtype.kind not in "f":
        raise TypeError(f"{name} must be a floating-point array (float32 or float64), got dtype {x.dtype}")
    if x.dtype not in (np.float32, np.float64):
        raise TypeError(f"{name} must be float32 or float64, got dtype {x.dtype}")
    if x.ndim < 2:
        raise ValueError(f"{name} must have shape (N, C) or (N, C, *spatial), got {x.ndim}-D {name}.shape={x.shape}")
    if x.shape[1] == 0:
        raise ValueError(f"{name} must have at least 1 channel, got {name}.shape={x.shape}")
    return x


def _check_channel_vector(v: Any, name: str, x: np.ndarray) -> np.ndarray:
    v = np.asarray(v)
    if v.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be a real numeric array, got dtype {v.dtype}")
    channels = x.shape[1]
    if v.shape != (channels,):
        raise ValueError(
            f"{name} has shape {v.shape} but x has {channels} channels (x.shape={x.shape}); expected ({channels},)"
        )
    return v


def forward(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float = 1e-5) -> tuple[np.ndarray, Cache]:
    """Training-mode batch normalization (Algorithm 1 of Ioffe & Szegedy, 2015).

    x: (N, C) or (N, C, *spatial), float32 or float64. Statistics are per channel, over N and every spatial position.
    gamma, beta: (C,).
    eps: added to the biased batch variance inside the square root.
    Returns y with x's shape and dtype, and the cache that `backward` needs.

    >>> x = np.array([[1.0, 10.0], [3.0, 30.0]])
    >>> y, _ = forward(x, np.ones(2), np.zeros(2), eps=0.0)
    >>> y
    array([[-1., -1.],
           [ 1.,  1.]])
    """
    x = _check_x(x)
    gamma = _check_channel_vector(gamma, "gamma", x)
    beta = _check_channel_vector(beta, "beta", x)
    eps = check_nonnegative_eps(eps)
    m = values_per_channel(x)
    if m < 2:
        raise ValueError(
            f"training-mode batch norm needs more than 1 value per channel, got input of shape {x.shape} "
            f"({m} value{'s' if m != 1 else ''} per channel): the batch variance would be 0"
        )
    axes = reduction_axes(x.ndim)
    x64 = x.astype(np.float64, copy=False)
    batch_mean = x64.mean(axis=axes)  # Algorithm 1, line 1
    x_centered = x64 - per_channel(batch_mean, x.ndim)
    batch_var = np.mean(x_centered**2, axis=axes)  # line 2: the biased variance, from centred values
    inv_std = 1.0 / np.sqrt(batch_var + eps)
    x_hat = x_centered * per_channel(inv_std, x.ndim)  # line 3
    y = per_channel(gamma, x.ndim) * x_hat + per_channel(beta, x.ndim)  # line 4
    cache = {
        "x": x64,
        "x_hat": x_hat,
        "x_centered": x_centered,
        "batch_mean": batch_mean,
        "batch_var": batch_var,
        "inv_std": inv_std,
        "gamma": gamma.astype(np.float64),
        "eps": eps,
        "m": m,
        "dtype": x.dtype,
    }
    return y.astype(x.dtype, copy=False), cache


def backward(dy: np.ndarray, cache: Cache) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of training-mode BN in the compact closed form.

    dy: upstream gradient, the shape of the forward's x.
    cache: from `forward`.
    Returns (dx, dgamma, dbeta): dx has x's shape; dgamma, dbeta are (C,); all three in x's dtype (computed in
    float64).

    With m values per channel, the gradient is the upstream gradient of x_hat, scaled by 1/sigma and projected off the
    constant direction 1 and off x_hat itself::

        dx = (gamma * inv_std / m) * (m * dy - sum(dy) - x_hat * sum(dy * x_hat))
    """
    x_hat = cache["x_hat"]
    dy = check_dy(dy, x_hat.shape)
    ndim = x_hat.ndim
    axes = reduction_axes(ndim)
    m = cache["m"]
    dbeta = dy.sum(axis=axes)
    dgamma = (dy * x_hat).sum(axis=axes)
    scale = cache["gamma"] * cache["inv_std"] / m
    dx = per_channel(scale, ndim) * (m * dy - per_channel(dbeta, ndim) - x_hat * per_channel(dgamma, ndim))
    dtype = cache["dtype"]
    return dx.astype(dtype, copy=False), dgamma.astype(dtype, copy=False), dbeta.astype(dtype, copy=False)


def backward_staged(dy: np.ndarray, cache: Cache) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of training-mode BN, one stage of the computational graph at a time.

    This follows the backpropagation equations of Ioffe & Szegedy (2015, Section 3) line by line; `backward` is the
    same result after simplification. Shapes as in `backward`.
    """
    x_hat = cache["x_hat"]
    dy = check_dy(dy, x_hat.shape)
    ndim = x_hat.ndim
    axes = reduction_axes(ndim)
    m = cache["m"]
    x_centered = cache["x_centered"]
    batch_var = cache["batch_var"]
    eps = cache["eps"]
    gamma = per_channel(cache["gamma"], ndim)

    dx_hat = dy * gamma  # dl/dx_hat = dl/dy * gamma
    # dl/dsigma^2 = sum dl/dx_hat * (x - mu) * (-1/2) (sigma^2 + eps)^(-3/2)
    dvar = np.sum(dx_hat * x_centered, axis=axes) * -0.5 * (batch_var + eps) ** -1.5
    # dl/dmu = sum dl/dx_hat * (-1/sqrt(sigma^2 + eps)) + dl/dsigma^2 * sum(-2 (x - mu)) / m
    dmean = np.sum(-dx_hat, axis=axes) / np.sqrt(batch_var + eps) + dvar * np.sum(-2.0 * x_centered, axis=axes) / m
    # dl/dx = dl/dx_hat / sqrt(sigma^2 + eps) + dl/dsigma^2 * 2 (x - mu) / m + dl/dmu / m
    dx = (
        dx_hat / np.sqrt(per_channel(batch_var, ndim) + eps)
        + per_channel(dvar, ndim) * 2.0 * x_centered / m
        + per_channel(dmean, ndim) / m
    )
    dgamma = np.sum(dy * x_hat, axis=axes)  # dl/dgamma = sum dl/dy * x_hat
    dbeta = np.sum(dy, axis=axes)  # dl/dbeta = sum dl/dy
    dtype = cache["dtype"]
    return dx.astype(dtype, copy=False), dgamma.astype(dtype, copy=False), dbeta.astype(dtype, copy=False)


def inference(
    x: np.ndarray,
    gamma: np.ndarray,
    beta: np.ndarray,
    running_mean: np.ndarray,
    running_var: np.ndarray,
    eps: float = 1e-5,
) -> np.ndarray:
    """Inference-mode BN with fixed population statistics (Algorithm 2 of Ioffe & Szegedy, 2015).

    x: (N, C) or (N, C, *spatial). gamma, beta, running_mean, running_var: (C,).
    Returns y = gamma * (x - running_mean) / sqrt(running_var + eps) + beta, with x's shape and dtype.
    Each output depends on its own input only, so any batch size works, including 1.

    >>> inference(np.array([[2.0]]), np.ones(1), np.zeros(1), np.array([1.0]), np.array([4.0]), eps=0.0)
    array([[0.5]])
    """
    x = _check_x(x)
    eps = check_nonnegative_eps(eps)
    gamma = _check_channel_vector(gamma, "gamma", x).astype(np.float64)
    beta = _check_channel_vector(beta, "beta", x).astype(np.float64)
    running_mean = _check_channel_vector(running_mean, "running_mean", x).astype(np.float64)
    running_var = _check_channel_vector(running_var, "running_var", x).astype(np.float64)
    # Algorithm 2, line 11: one affine map per channel.
    scale = gamma / np.sqrt(running_var + eps)
    shift = beta - scale * running_mean
    y = per_channel(scale, x.ndim) * x.astype(np.float64, copy=False) + per_channel(shift, x.ndim)
    return y.astype(x.dtype, copy=False)


class BatchNorm:
    """A stateful BN layer over (N, C) or (N, C, *spatial) inputs, with PyTorch's running-statistics rules.

    num_features: C. eps: added to the variance. momentum: weight of the new batch in the running averages,
    ``new = (1 - momentum) * old + momentum * batch``; ``None`` gives a cumulative average (momentum 1/t at step t).
    The running variance is the *unbiased* batch variance, scaled by m/(m-1) with m values per channel, as in PyTorch.

    Attributes mirror ``torch.nn.BatchNorm1d``: ``gamma`` (weight), ``beta`` (bias), ``running_mean``, ``running_var``,
    ``num_batches_tracked``, plus ``dgamma`` and ``dbeta`` after `backward`.

    >>> bn = BatchNorm(2)
    >>> y = bn.forward(np.array([[0.0, 1.0], [2.0, 3.0]]))
    >>> bn.running_mean, bn.running_var
    (array([0.1, 0.2]), array([1.1, 1.1]))
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1):
        self.num_features = check_layer_args(num_features, momentum)
        self.eps = check_nonnegative_eps(eps)
        self.momentum = momentum
        self.gamma = np.ones(num_features)
        self.beta = np.zeros(num_features)
        self.dgamma = np.zeros(num_features)
        self.dbeta = np.zeros(num_features)
        self.running_mean = np.zeros(num_features)
        self.running_var = np.ones(num_features)
        self.num_batches_tracked = 0
        self._cache: Cache | None = None

    def _check_channels(self, x: np.ndarray) -> None:
        if x.ndim >= 2 and x.shape[1] != self.num_features:
            raise ValueError(
                f"expected {self.num_features} channels (num_features), got input with {x.shape[1]} "
                f"channels (x.shape={x.shape})"
            )

    def forward(self, x: np.ndarray, training: bool = True) -> np.ndarray:
        """Normalize x with batch statistics (training) or the running statistics (training=False)."""
        x = _check_x(x)
        self._check_channels(x)
        if not training:
            self._cache = None  # the eval forward is a fixed affine map; `backward` is for the training forward
            return inference(x, self.gamma, self.beta, self.running_mean, self.running_var, self.eps)
        y, cache = forward(x, self.gamma, self.beta, self.eps)
        self._cache = cache
        self.num_batches_tracked += 1
        momentum = 1.0 / self.num_batches_tracked if self.momentum is None else self.momentum
        # new = (1 - momentum) * old + momentum * batch, the variance's with Bessel's correction m/(m-1)
        ema_(self.running_mean, cache["batch_mean"], momentum)
        ema_(self.running_var, unbiased_variance(cache["batch_var"], cache["m"]), momentum)
        return y

    def backward(self, dy: np.ndarray) -> np.ndarray:
        """Back-propagate through the last training-mode forward; stores dgamma, dbeta and returns dx."""
        if self._cache is None:
            raise RuntimeError(
                "backward() needs the cache of a training-mode forward(); there was none, or the last forward() "
                "was in eval mode (training=False)"
            )
        dx, self.dgamma, self.dbeta = backward(dy, self._cache)
        return dx

    def __repr__(self) -> str:
        return f"BatchNorm({self.num_features}, eps={self.eps}, momentum={self.momentum})"
