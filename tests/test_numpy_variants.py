"""Tests of bnnotes.numpy_variants against the definitions and against bnnotes' PyTorch layers, in float64.

(zca_whitening, renorm_forward and ghost_batch_norm are also cross-checked in tests/test_exercises.py, next to their
checkers.)
"""

from __future__ import annotations

import numpy as np
import pytest

from bnnotes import exercises, numpy_bn, numpy_variants


def test_merge_statistics_is_the_statistics_of_the_union():
    rng = np.random.default_rng(0)
    counts = [3, 1, 7, 5]
    groups = [rng.normal(rng.uniform(-5, 5), rng.uniform(0.5, 3), size=(count, 4)) for count in counts]
    means = np.stack([g.mean(0) for g in groups])
    variances = np.stack([g.var(0) for g in groups])
    mean, var = numpy_variants.merge_statistics(np.array(counts), means, variances)
    union = np.concatenate(groups)
    np.testing.assert_allclose(mean, union.mean(0), rtol=1e-12)
    np.testing.assert_allclose(var, union.var(0), rtol=1e-12)


def test_merge_statistics_ignores_empty_groups_and_keeps_the_dtype():
    means = np.array([[1.0, 2.0], [np.nan, np.nan], [3.0, 4.0]], dtype=np.float32)
    variances = np.array([[1.0, 1.0], [np.nan, np.nan], [1.0, 1.0]], dtype=np.float32)
    mean, var = numpy_variants.merge_statistics(np.array([2, 0, 2], dtype=np.float32), means, variances)
    assert mean.dtype == var.dtype == np.float32
    np.testing.assert_allclose(mean, [2.0, 3.0])
    np.testing.assert_allclose(var, [2.0, 2.0])


def test_merge_statistics_matches_sync_combine_statistics():
    torch = pytest.importorskip("torch")
    sync = pytest.importorskip("bnnotes.sync")
    rng = np.random.default_rng(1)
    counts, means, variances = np.array([4.0, 9.0, 2.0]), rng.normal(size=(3, 5)), rng.uniform(0.1, 3, size=(3, 5))
    mean, var = numpy_variants.merge_statistics(counts, means, variances)
    mean_t, var_t, _ = sync.combine_statistics(*(torch.from_numpy(v) for v in (counts, means, variances)))
    np.testing.assert_allclose(mean, mean_t.numpy(), rtol=1e-12)
    np.testing.assert_allclose(var, var_t.numpy(), rtol=1e-12)


@pytest.mark.parametrize(
    "counts, means, variances, message",
    [
        (np.ones((2, 1)), np.zeros((2, 3)), np.zeros((2, 3)), "counts \\(R,\\)"),
        (np.ones(2), np.zeros((2, 3)), np.zeros((2, 4)), "got shapes"),
        (np.ones(3), np.zeros((2, 3)), np.zeros((2, 3)), "got shapes"),
        (np.array([1.0, -1.0]), np.zeros((2, 3)), np.zeros((2, 3)), "counts must be >= 0"),
        (np.zeros(2), np.zeros((2, 3)), np.zeros((2, 3)), "positive total"),
    ],
)
def test_merge_statistics_refuses_bad_input(counts, means, variances, message):
    with pytest.raises(ValueError, match=message):
        numpy_variants.merge_statistics(counts, means, variances)


def test_fold_linear_is_linear_then_eval_batch_norm():
    """The fold checker's reference: the folded layer computes Linear followed by eval-mode BN."""
    rng = np.random.default_rng(2)
    weight, bias = rng.normal(size=(5, 3)), rng.normal(size=5)
    gamma, beta = rng.uniform(-2, 2, 5), rng.normal(size=5)
    running_mean, running_var = rng.normal(size=5), rng.uniform(0.05, 5, 5)
    folded_weight, folded_bias = numpy_variants.fold_linear(weight, bias, gamma, beta, running_mean, running_var, 1e-3)
    probe = rng.normal(size=(9, 3))
    composed = numpy_bn.inference(probe @ weight.T + bias, gamma, beta, running_mean, running_var, 1e-3)
    np.testing.assert_allclose(probe @ folded_weight.T + folded_bias, composed, rtol=1e-12, atol=1e-12)


def test_fold_linear_matches_folding_fold_weights():
    torch = pytest.importorskip("torch")
    folding = pytest.importorskip("bnnotes.folding")
    rng = np.random.default_rng(3)
    args = (rng.normal(size=(4, 6)), rng.normal(size=4), rng.uniform(-2, 2, 4), rng.normal(size=4),
            rng.normal(size=4), rng.uniform(0.1, 3, 4))
    expected = folding.fold_weights(*(torch.from_numpy(a) for a in args), eps=1e-5)
    for got, want in zip(numpy_variants.fold_linear(*args, 1e-5), expected):
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-12)


def test_renorm_correction_is_what_renorm_forward_uses():
    rng = np.random.default_rng(4)
    x = rng.normal(2.0, 3.0, size=(8, 5))
    running_mean, running_std = rng.normal(size=5), rng.uniform(0.3, 6.0, size=5)
    _, r, d = numpy_variants.renorm_forward(x, np.ones(5), np.zeros(5), running_mean, running_std, 2.0, 0.5, 1e-3)
    r2, d2 = numpy_variants.renorm_correction(x.mean(0), np.sqrt(x.var(0) + 1e-3), running_mean, running_std, 2.0, 0.5)
    np.testing.assert_array_equal(r, r2)
    np.testing.assert_array_equal(d, d2)
    assert np.all((1 / 2.0 <= r) & (r <= 2.0)) and np.all(np.abs(d) <= 0.5)


def test_renorm_correction_refuses_bad_limits():
    with pytest.raises(ValueError, match="r_max >= 1"):
        numpy_variants.renorm_correction(np.zeros(1), np.ones(1), np.zeros(1), np.ones(1), 0.5, 1.0)


def test_zca_whitening_refuses_a_non_matrix():
    with pytest.raises(ValueError, match=r"\(N, D\) array, got shape \(3,\)"):
        numpy_variants.zca_whitening(np.zeros(3), 1e-5)


def test_exercises_keeps_the_former_names_of_the_references():
    """Chapters that called exercises.zca_whitening_reference etc. keep working (plain re-imports)."""
    assert exercises.zca_whitening_reference is numpy_variants.zca_whitening
    assert exercises.renorm_forward_reference is numpy_variants.renorm_forward
    assert exercises.ghost_batch_norm_reference is numpy_variants.ghost_batch_norm
