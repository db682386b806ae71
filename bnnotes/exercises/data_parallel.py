"""Checkers for the chapter "Data-parallel BN: SyncBatchNorm and Ghost BN" (data_parallel.md): ghost batch norm,
and the merge of per-rank statistics that synchronized BN computes.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from bnnotes import numpy_bn, numpy_variants
from bnnotes.exercises._catalogue import (
    HINT_EPS_OUTSIDE,
    HINT_NO_AFFINE,
    HINT_UNBIASED,
    normalize,
    rng_affine,
    rng_features,
)
from bnnotes.exercises._harness import Case, Output, reports_not_attempted, run_cases

__all__ = ["check_ghost_batch_norm", "check_merge_statistics"]


def _ghost_case(shape: tuple[int, int], virtual_batch_size: int, seed: int, eps: float,
                dtype: type = np.float64) -> Case:
    rng = np.random.default_rng(seed)
    n, d = shape
    chunks = n // virtual_batch_size
    # Each chunk gets its own offset, so that per-chunk and whole-batch statistics differ clearly.
    chunk_offsets = np.repeat(rng.uniform(-4.0, 4.0, size=(chunks, d)), virtual_batch_size, axis=0)
    x = (rng_features(rng, n, d) + chunk_offsets).astype(dtype)
    gamma, beta = (v.astype(dtype) for v in rng_affine(rng, d))
    expected = numpy_variants.ghost_batch_norm(x, gamma, beta, virtual_batch_size, eps)

    def strided() -> np.ndarray:
        grouped = x.reshape(virtual_batch_size, chunks, d)  # every chunks-th row: not consecutive
        return gamma * normalize(grouped, eps, axis=0).reshape(n, d) + beta

    def per_chunk(size: int, ddof: int = 0) -> np.ndarray:
        grouped = x.reshape(n // size, size, d)
        return gamma * normalize(grouped, eps, axis=1, ddof=ddof).reshape(n, d) + beta

    grouped = x.reshape(chunks, virtual_batch_size, d)
    mistakes = [
        ("this matches BN over the WHOLE batch: ghost BN normalizes each chunk of virtual_batch_size rows "
         "with that chunk's own statistics", lambda: numpy_bn.forward(x, gamma, beta, eps)[0]),
        ("this matches chunks of every k-th row (x.reshape(virtual_batch_size, -1, D)): the chunks are "
         "CONSECUTIVE rows, x.reshape(-1, virtual_batch_size, D)", strided),
        ("this matches chunks of N / virtual_batch_size rows: virtual_batch_size is the number of rows per "
         "chunk, not the number of chunks", lambda: per_chunk(chunks)),
        (HINT_UNBIASED, lambda: per_chunk(virtual_batch_size, ddof=1)),
        (HINT_EPS_OUTSIDE, lambda: gamma * normalize(grouped, eps, axis=1, eps_outside=True).reshape(n, d) + beta),
        (HINT_NO_AFFINE, lambda: normalize(grouped, eps, axis=1).reshape(n, d)),
    ]
    dtype_note = "" if dtype == np.float64 else ", dtype=float32"
    return Case(f"x.shape={shape}, virtual_batch_size={virtual_batch_size}, seed={seed}, eps={eps}{dtype_note}",
                (x, gamma, beta, virtual_batch_size, eps), (Output("y", expected, mistakes),))


@reports_not_attempted
def check_ghost_batch_norm(fn: Callable[..., np.ndarray]) -> None:
    """Check ``fn(x, gamma, beta, virtual_batch_size, eps) -> y``: BN applied separately to consecutive chunks.

    x: (N, D) with N a multiple of virtual_batch_size; rows [0, v), [v, 2v), ... are normalized with their own
    statistics (Hoffer et al., 2017). y: (N, D) in x's dtype (one case is float32). Reference:
    `bnnotes.numpy_variants.ghost_batch_norm` (`numpy_bn.forward` on each chunk).

    >>> def my_ghost(x, gamma, beta, virtual_batch_size, eps):
    ...     chunks = x.reshape(-1, virtual_batch_size, x.shape[1])
    ...     x_hat = (chunks - chunks.mean(axis=1, keepdims=True)) / np.sqrt(chunks.var(axis=1, keepdims=True) + eps)
    ...     return gamma * x_hat.reshape(x.shape) + beta
    >>> check_ghost_batch_norm(my_ghost)
    check_ghost_batch_norm: all 4 cases match the reference. Well done.
    """
    specs = [((24, 5), 4, 0, 1e-5), ((12, 3), 3, 1, 0.1), ((20, 6), 10, 2, 1e-3), ((16, 4), 4, 3, 1e-5, np.float32)]
    run_cases(fn, "check_ghost_batch_norm", "fn(x, gamma, beta, virtual_batch_size, eps) -> y",
              [_ghost_case(*spec) for spec in specs])


# ----------------------------------------------------------------------------------------------------------------------
# Synchronized BN: the statistics of the union from per-rank statistics
# ----------------------------------------------------------------------------------------------------------------------


def _merge_case(counts: tuple[int, ...], channels: int, seed: int, dtype: type) -> Case:
    rng = np.random.default_rng(seed)
    # Each rank's values: its own offset per channel, so that the spread BETWEEN the ranks matters.
    per_rank = [rng_features(rng, count, channels) + rng.uniform(-3.0, 3.0, size=channels) for count in counts]
    means = np.stack([values.mean(axis=0) for values in per_rank]).astype(dtype)  # (R, C)
    variances = np.stack([values.var(axis=0) for values in per_rank]).astype(dtype)  # (R, C), biased
    weights = np.asarray(counts, dtype=dtype)
    mean_ref, var_ref = numpy_variants.merge_statistics(weights, means, variances)
    n = float(sum(counts))
    w = np.asarray(counts, dtype=np.float64)[:, None]  # (R, 1)
    means64, variances64, mean64 = means.astype(np.float64), variances.astype(np.float64), mean_ref.astype(np.float64)
    unweighted_mean = means64.mean(axis=0)
    mean_mistakes = [
        ("this matches the unweighted mean of the ranks' means: a rank with more values weighs more, "
         "mean = sum_k n_k mean_k / n", lambda: unweighted_mean),
    ]
    forgets_spread = ("this matches the average of the ranks' variances, which forgets the spread BETWEEN the ranks: "
                      "n var = sum_k n_k var_k + sum_k n_k (mean_k - mean)^2")
    var_mistakes = [
        (forgets_spread, lambda: (w * variances64).sum(axis=0) / n),
        (forgets_spread + " (and weight each rank by its count)", lambda: variances64.mean(axis=0)),
        ("this matches the UNBIASED variance of the union (divided by n - 1): BN normalizes with the biased one, "
         "n var = sum_k n_k var_k + sum_k n_k (mean_k - mean)^2", lambda: var_ref.astype(np.float64) * n / (n - 1)),
        ("this matches count weights in the mean only: the variance terms are weighted by the counts too, "
         "var = sum_k n_k (var_k + (mean_k - mean)^2) / n",
         lambda: (variances64 + (means64 - mean64) ** 2).mean(axis=0)),
        ("this matches no count weights at all: a rank with more values weighs more, in the mean and in the "
         "variance, var = sum_k n_k (var_k + (mean_k - mean)^2) / n",
         lambda: (variances64 + (means64 - unweighted_mean) ** 2).mean(axis=0)),
        ("this matches the spread between the ranks without count weights: each rank's (mean_k - mean)^2 counts "
         "n_k times", lambda: (w * variances64).sum(axis=0) / n + ((means64 - mean64) ** 2).mean(axis=0)),
    ]
    description = f"counts={list(counts)}, C={channels}, dtype={np.dtype(dtype).name}, seed={seed}"
    return Case(description, (weights, means, variances),
                (Output("mean", mean_ref, mean_mistakes), Output("var", var_ref, var_mistakes)),
                exception_hint="counts is (R,) and means, variances are (R, C): weight the rows with counts[:, None]")


@reports_not_attempted
def check_merge_statistics(fn: Callable[..., tuple[np.ndarray, np.ndarray]]) -> None:
    """Check ``fn(counts, means, variances) -> (mean, var)``: the statistics of the union of R ranks' batches.

    counts: (R,) values per channel on each rank (whole numbers, in the dtype of means); means, variances: (R, C),
    each rank's per-channel mean and BIASED variance. Returns the union's mean and biased variance, (C,) each, in
    means' dtype: mean = sum_k n_k mean_k / n and n var = sum_k n_k var_k + sum_k n_k (mean_k - mean)^2 with
    n = sum_k n_k. Reference: `bnnotes.numpy_variants.merge_statistics` (as `bnnotes.sync.combine_statistics`).

    >>> def my_merge(counts, means, variances):
    ...     n, weights = counts.sum(), counts[:, None]
    ...     mean = (weights * means).sum(axis=0) / n
    ...     return mean, (weights * (variances + (means - mean) ** 2)).sum(axis=0) / n
    >>> check_merge_statistics(my_merge)
    check_merge_statistics: all 4 cases match the reference. Well done.
    """
    specs = [((3, 7), 4, 40, np.float64), ((1, 5, 2), 3, 41, np.float64), ((8, 8, 8, 8), 5, 42, np.float64),
             ((6, 2, 9), 4, 43, np.float32)]
    run_cases(fn, "check_merge_statistics", "fn(counts, means, variances) -> (mean, var)",
              [_merge_case(*spec) for spec in specs])
