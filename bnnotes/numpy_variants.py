"""Variants of batch normalization in NumPy: the references the exercises are checked against.

`bnnotes.numpy_bn` is batch normalization itself; this module holds, in the same style, what the later chapters build
on it, each a pure function of its arguments:

- `zca_whitening`: full ZCA whitening, the decorrelation BN gives up (Ioffe & Szegedy, 2015, Section 2);
- `renorm_correction` and `renorm_forward`: Batch Renormalization's r and d and its training forward (Ioffe, 2017);
- `ghost_batch_norm`: BN on consecutive chunks of a batch (Hoffer et al., 2017);
- `merge_statistics`: the statistics of a union from per-rank statistics, what synchronized BN all-reduces;
- `fold_linear`: a Linear layer followed by eval-mode BN, as one Linear layer.

The PyTorch layers (`bnnotes.renorm`, `bnnotes.ghost`, `bnnotes.sync`, `bnnotes.folding`) are tested against these.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bnnotes import numpy_bn

__all__ = ["zca_whitening", "renorm_correction", "renorm_forward", "ghost_batch_norm", "merge_statistics",
           "fold_linear"]


def _as_matrix(x: Any, name: str = "x") -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2 or x.dtype.kind not in "fiu":
        raise ValueError(f"{name} must be a real (N, D) array, got shape {x.shape} and dtype {x.dtype}")
    return x


def zca_whitening(x: np.ndarray, eps: float) -> np.ndarray:
    """Full ZCA whitening of x (N, D): ``(x - mean) @ U diag(1/sqrt(lambda + eps)) U^T``, returned in float64.

    The covariance is the biased one, (x - mean)^T (x - mean) / N, with eigendecomposition U diag(lambda) U^T. The
    output's covariance is U diag(lambda / (lambda + eps)) U^T, the identity as eps -> 0. ZCA is the whitening matrix
    that is symmetric, the one that moves the data least.

    >>> x = np.random.default_rng(0).normal(size=(100, 3)) @ np.array([[2.0, 0, 0], [1, 1, 0], [0, 0, 3]])
    >>> xw = zca_whitening(x, eps=1e-12)
    >>> bool(np.allclose(np.cov(xw, rowvar=False, bias=True), np.eye(3)))
    True
    """
    x = np.asarray(_as_matrix(x), dtype=np.float64)  # no copy when x is float64 already
    x_centered = x - x.mean(axis=0)
    covariance = x_centered.T @ x_centered / x.shape[0]
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    whitening = eigenvectors @ np.diag(1.0 / np.sqrt(eigenvalues + eps)) @ eigenvectors.T
    return x_centered @ whitening


def renorm_correction(batch_mean: np.ndarray, batch_std: np.ndarray, running_mean: np.ndarray,
                      running_std: np.ndarray, r_max: float, d_max: float) -> tuple[np.ndarray, np.ndarray]:
    """Batch Renormalization's correction (Ioffe, 2017, Algorithm 1): r and d, each (C,).

    r = clip(sigma_B / sigma, 1/r_max, r_max) and d = clip((mu_B - mu) / sigma, -d_max, d_max), from the batch's
    mean mu_B and standard deviation sigma_B (with eps) and the running mu and sigma, all (C,). With r and d,
    ``x_hat * r + d`` is the input normalized with the running statistics, as far as the clipping allows.

    >>> r, d = renorm_correction(np.array([4.0]), np.array([3.0]), np.array([0.0]), np.array([1.0]), 2.0, 1.5)
    >>> r.tolist(), d.tolist()
    ([2.0], [1.5])
    """
    if r_max < 1 or d_max < 0:
        raise ValueError(f"expected r_max >= 1 and d_max >= 0, got r_max={r_max} and d_max={d_max}")
    r = np.clip(batch_std / running_std, 1.0 / r_max, r_max)
    d = np.clip((batch_mean - running_mean) / running_std, -d_max, d_max)
    return r, d


def renorm_forward(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, running_mean: np.ndarray,
                   running_std: np.ndarray, r_max: float, d_max: float,
                   eps: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Batch Renormalization's training forward (Ioffe, 2017, Algorithm 1), x of shape (N, D).

    sigma_B = sqrt(biased batch variance + eps); (r, d) = `renorm_correction`;
    y = gamma * ((x - mu_B) / sigma_B * r + d) + beta. Returns (y (N, D), r (D,), d (D,)), computed in float64 and
    returned in x's dtype, as `numpy_bn` does. In training r and d are constants for the gradient (stop_gradient).

    >>> x = np.array([[0.0], [2.0]])
    >>> y, r, d = renorm_forward(x, np.ones(1), np.zeros(1), np.zeros(1), np.ones(1), 3.0, 5.0, 0.0)
    >>> y.ravel().tolist(), r.tolist(), d.tolist()
    ([0.0, 2.0], [1.0], [1.0])
    """
    x = _as_matrix(x)
    dtype = x.dtype if x.dtype.kind == "f" else np.dtype(np.float64)
    x = np.asarray(x, dtype=np.float64)  # no copy when x is float64 already
    batch_mean = x.mean(axis=0)
    batch_std = np.sqrt(x.var(axis=0) + eps)
    r, d = renorm_correction(batch_mean, batch_std, running_mean, running_std, r_max, d_max)
    x_hat = (x - batch_mean) / batch_std * r + d
    return tuple(v.astype(dtype, copy=False) for v in (gamma * x_hat + beta, r, d))


def ghost_batch_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, virtual_batch_size: int,
                     eps: float) -> np.ndarray:
    """Ghost batch norm (Hoffer et al., 2017): `numpy_bn.forward` on consecutive chunks of `virtual_batch_size` rows.

    x: (N, D) with N a multiple of virtual_batch_size. Returns y (N, D).

    >>> x = np.array([[0.0], [2.0], [10.0], [30.0]])
    >>> ghost_batch_norm(x, np.ones(1), np.zeros(1), 2, 0.0).ravel().tolist()
    [-1.0, 1.0, -1.0, 1.0]
    """
    x = np.asarray(x)
    if x.shape[0] % virtual_batch_size:
        raise ValueError(f"N={x.shape[0]} is not a multiple of virtual_batch_size={virtual_batch_size}")
    chunks = [
        numpy_bn.forward(x[start : start + virtual_batch_size], gamma, beta, eps)[0]
        for start in range(0, x.shape[0], virtual_batch_size)
    ]
    return np.concatenate(chunks, axis=0)


def merge_statistics(counts: np.ndarray, means: np.ndarray, variances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The mean and biased variance (C,) of the union of R groups, from each group's count, mean and biased variance.

    counts: (R,) values per channel in each group (a group with count 0 is ignored). means, variances: (R, C).
    Returns (mean, var) in means' dtype, computed in float64. The sum of squared deviations from the overall mean
    splits into a within-group and a between-group part (Chan, Golub & LeVeque, 1983)::

        mean = sum_k n_k mean_k / n,        n var = sum_k n_k var_k + sum_k n_k (mean_k - mean)^2.

    `bnnotes.sync.combine_statistics` is the same in PyTorch.

    >>> mean, var = merge_statistics(np.array([2.0, 2.0]), np.array([[0.0], [2.0]]), np.array([[1.0], [1.0]]))
    >>> mean.tolist(), var.tolist()  # the union of {-1, 1} and {1, 3}
    ([1.0], [2.0])
    """
    counts, means, variances = np.asarray(counts), np.asarray(means), np.asarray(variances)
    if counts.ndim != 1 or means.ndim != 2 or means.shape != variances.shape or means.shape[0] != counts.shape[0]:
        raise ValueError(f"expected counts (R,), means (R, C) and variances (R, C), got shapes {counts.shape}, "
                         f"{means.shape} and {variances.shape}")
    if np.any(counts < 0) or counts.sum() <= 0:
        raise ValueError(f"counts must be >= 0 with a positive total, got {counts.tolist()}")
    present = (counts > 0)[:, None]  # (R, 1): an empty group's row holds no statistics
    weights = counts.astype(np.float64)[:, None]  # (R, 1)
    total = weights.sum()
    means64, variances64 = means.astype(np.float64), variances.astype(np.float64)
    mean = np.where(present, weights * means64, 0.0).sum(axis=0) / total  # (C,)
    within = np.where(present, weights * variances64, 0.0).sum(axis=0)
    between = np.where(present, weights * (means64 - mean) ** 2, 0.0).sum(axis=0)
    return mean.astype(means.dtype, copy=False), ((within + between) / total).astype(means.dtype, copy=False)


def fold_linear(weight: np.ndarray, bias: np.ndarray, gamma: np.ndarray, beta: np.ndarray, running_mean: np.ndarray,
                running_var: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """A Linear layer (weight (out, in), bias (out,)) followed by eval-mode BN over its `out` features, as one Linear.

    scale = gamma / sqrt(running_var + eps); folded_weight = weight * scale[:, None] (out, in);
    folded_bias = (bias - running_mean) * scale + beta (out,). `bnnotes.folding.fold_weights` is the same in PyTorch.

    >>> w, b = fold_linear(np.ones((1, 2)), np.zeros(1), np.array([2.0]), np.array([1.0]), np.array([3.0]),
    ...                    np.array([4.0]), eps=0.0)
    >>> w.tolist(), b.tolist()
    ([[1.0, 1.0]], [-2.0])
    """
    weight = _as_matrix(weight, "weight")
    scale = gamma / np.sqrt(running_var + eps)
    return weight * scale[:, None], (bias - running_mean) * scale + beta
