"""Tests for bnnotes.lp_norm: ℓp batch normalization (Santurkar et al., 2018, Section 3.3)."""

from __future__ import annotations

import math

import pytest
import torch

from bnnotes.lp_norm import LpBatchNorm1d, lp_batch_norm, lp_batch_stats


def _features(n: int = 16, c: int = 5, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.5, 4.0, c, dtype=torch.float64)
    shift = torch.linspace(-3.0, 2.0, c, dtype=torch.float64)
    return torch.randn(n, c, generator=g, dtype=torch.float64) * scale + shift


@pytest.mark.parametrize("p", [1, 2, math.inf])
def test_stats_match_their_definition(p):
    x = _features()
    mu, s = lp_batch_stats(x, p, eps=0.0)
    assert torch.allclose(mu, x.mean(0))
    v = x.abs()
    expected = v.amax(0) if math.isinf(p) else v.pow(p).mean(0).pow(1.0 / p)
    assert torch.allclose(s, expected)
    # Centred: the norm is taken over x - mu instead.
    _, s_c = lp_batch_stats(x, p, eps=0.0, centered_norm=True)
    vc = (x - x.mean(0)).abs()
    expected_c = vc.amax(0) if math.isinf(p) else vc.pow(p).mean(0).pow(1.0 / p)
    assert torch.allclose(s_c, expected_c)


def test_centred_l2_is_exactly_batch_norm():
    x = _features()
    weight = torch.linspace(0.5, 2.0, 5, dtype=torch.float64)
    bias = torch.linspace(-1.0, 1.0, 5, dtype=torch.float64)
    ours = lp_batch_norm(x, 2, weight, bias, eps=1e-5, centered_norm=True)
    reference = torch.nn.functional.batch_norm(x, None, None, weight, bias, training=True, eps=1e-5)
    assert torch.allclose(ours, reference, atol=1e-12)


@pytest.mark.parametrize("p", [1, 2, math.inf])
def test_output_has_zero_mean_and_the_scheme_differs_from_bn(p):
    x = _features()
    y = lp_batch_norm(x, p, eps=0.0)
    assert torch.allclose(y.mean(0), torch.zeros(5, dtype=torch.float64), atol=1e-12)
    # Not unit variance: (sigma / s)^2, which for the paper's (uncentred) reading is < 1 whenever the mean is not 0.
    var = y.var(0, unbiased=False)
    assert not torch.allclose(var, torch.ones_like(var), atol=1e-2)
    if p == 2:
        sigma2 = x.var(0, unbiased=False)
        assert torch.allclose(var, sigma2 / (sigma2 + x.mean(0) ** 2))
    if math.isinf(p):
        assert (y.abs() <= 2.0 + 1e-12).all()  # |x - mu| <= 2 max|x|


@pytest.mark.parametrize("p", [1, 2, math.inf])
def test_invariant_to_positive_rescaling(p):
    x = _features()
    assert torch.allclose(lp_batch_norm(3.7 * x, p, eps=0.0), lp_batch_norm(x, p, eps=0.0), atol=1e-12)


@pytest.mark.parametrize("p", [1, 2, math.inf])
def test_gradient_matches_finite_differences(p):
    x = _features(n=6, c=3).requires_grad_(True)
    weight = torch.tensor([0.5, 1.5, -1.0], dtype=torch.float64, requires_grad=True)
    bias = torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, w, b: lp_batch_norm(a, p, w, b, eps=1e-3), (x, weight, bias))


def test_module_running_statistics_and_eval_mode():
    torch.manual_seed(0)
    layer = LpBatchNorm1d(5, p=1, momentum=0.5).double()
    x1, x2 = _features(seed=1), _features(seed=2)
    layer(x1)
    layer(x2)
    mu1, s1 = lp_batch_stats(x1, 1, layer.eps)
    mu2, s2 = lp_batch_stats(x2, 1, layer.eps)
    assert torch.allclose(layer.running_mean, 0.25 * mu1 + 0.5 * mu2)  # from 0: 0.5 * (0.5 * mu1) + 0.5 * mu2
    assert torch.allclose(layer.running_norm, 0.25 * 1.0 + 0.25 * s1 + 0.5 * s2)
    assert int(layer.num_batches_tracked) == 2
    layer.eval()
    x = _features(n=3, seed=3)
    expected = (x - layer.running_mean) / layer.running_norm * layer.weight + layer.bias
    assert torch.allclose(layer(x), expected)
    assert set(layer.state_dict()) == {"weight", "bias", "running_mean", "running_norm", "num_batches_tracked"}


def test_cumulative_average_with_momentum_none():
    layer = LpBatchNorm1d(5, p=math.inf, momentum=None).double()
    xs = [_features(seed=s) for s in range(3)]
    for x in xs:
        layer(x)
    means = torch.stack([lp_batch_stats(x, math.inf, layer.eps)[0] for x in xs])
    assert torch.allclose(layer.running_mean, means.mean(0))


def test_bad_input_gets_clear_errors():
    with pytest.raises(ValueError, match="p must be 1, 2 or math.inf"):
        LpBatchNorm1d(4, p=3)
    with pytest.raises(TypeError, match="p must be"):
        LpBatchNorm1d(4, p="l1")
    with pytest.raises(ValueError, match="num_features"):
        LpBatchNorm1d(0, p=1)
    with pytest.raises(ValueError, match="momentum"):
        LpBatchNorm1d(4, p=1, momentum=2.0)
    layer = LpBatchNorm1d(4, p=1)
    with pytest.raises(ValueError, match=r"LpBatchNorm1d\(4\) expected 4 channels, got input with 3 channels"):
        layer(torch.randn(8, 3))
    with pytest.raises(ValueError, match=r"LpBatchNorm1d expected 2-D input \(N, C\), got 3-D input of shape \(8, 4, 2\)"):
        layer(torch.randn(8, 4, 2))
    with pytest.raises(ValueError, match="more than 1 example"):
        layer(torch.randn(1, 4))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(8, 4, dtype=torch.long))
