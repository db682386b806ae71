"""Tests of bnnotes.experiments.derivation: the pieces the derivation chapter runs, on small configurations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bnnotes import numpy_bn, torch_bn, variants
from bnnotes.experiments import derivation


def test_central_differences_is_accurate_and_leaves_its_inputs_alone():
    a = np.array([[1.0, -2.0], [0.5, 3.0]])
    b = np.array([2.0, -1.0])
    grads = derivation.central_differences(lambda a_, b_: float(np.sum(np.sin(a_) @ b_**3)), [a, b])
    np.testing.assert_allclose(grads[0], np.cos(a) * b**3, rtol=1e-8)
    np.testing.assert_allclose(grads[1], 3 * b**2 * np.sin(a).sum(axis=0), rtol=1e-8)
    np.testing.assert_array_equal(a, [[1.0, -2.0], [0.5, 3.0]])


@pytest.mark.parametrize("shape", [(6, 3), (3, 4, 2, 5)])
def test_composed_batch_norm_is_batch_norm(shape):
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, size=shape)
    gamma, beta = rng.uniform(0.5, 2, shape[1]), rng.normal(size=shape[1])
    y = derivation.composed_batch_norm(torch.tensor(x), torch.tensor(gamma), torch.tensor(beta), eps=1e-3)
    np.testing.assert_allclose(y.numpy(), numpy_bn.forward(x, gamma, beta, 1e-3)[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape, eps", [((8, 3), 1e-5), ((3, 2, 2, 3), 0.1)])
def test_all_gradient_methods_agree(shape, eps):
    errors = derivation.gradient_agreement(derivation.GradientAgreementConfig(shape, eps=eps, seed=1))
    assert set(errors) == {"staged", "central differences", "autograd (composed ops)", "torch_bn (hand-written)"}
    assert errors["central differences"] < 1e-7
    for name in ("staged", "autograd (composed ops)", "torch_bn (hand-written)"):
        assert errors[name] < 1e-12, (name, errors[name])


def detached_pair(seed=0):
    torch.manual_seed(seed)
    real = torch_bn.BatchNorm1d(4).double()
    detached = variants.DetachedStatsBatchNorm1d(4).double()
    with torch.no_grad():
        for layer in (real, detached):
            layer.weight.copy_(torch.tensor([0.5, 1.0, 2.0, -1.5]))
            layer.bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    return real, detached


def test_detached_layer_has_bn_forward_and_running_statistics():
    real, detached = detached_pair()
    for step in range(3):
        x = torch.randn(7, 4, dtype=torch.float64) * 3 + step
        torch.testing.assert_close(detached(x), real(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(detached.running_mean, real.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(detached.running_var, real.running_var, rtol=1e-12, atol=1e-12)
    assert int(detached.num_batches_tracked) == int(real.num_batches_tracked) == 3
    real.eval()
    detached.eval()
    x = torch.randn(5, 4, dtype=torch.float64)
    torch.testing.assert_close(detached(x), real(x))


def test_detached_layer_gradient_treats_the_statistics_as_constants():
    _, detached = detached_pair()
    x = (torch.randn(7, 4, dtype=torch.float64) * 3).requires_grad_(True)
    dy = torch.randn(7, 4, dtype=torch.float64)
    detached(x).backward(dy)
    inv_std = torch.rsqrt(x.detach().var(dim=0, correction=0) + detached.eps)
    torch.testing.assert_close(x.grad, dy * detached.weight.detach() * inv_std)
    with pytest.raises(ValueError, match="expected 4 channels"):
        detached(torch.randn(7, 3, dtype=torch.float64))


def test_a_bias_before_bn_gets_zero_gradient_only_with_real_bn():
    torch.manual_seed(0)
    x = torch.randn(16, 5, dtype=torch.float64)
    dy = torch.randn(16, 3, dtype=torch.float64)
    grads = {}
    layers = (("bn", torch_bn.BatchNorm1d(3).double()), ("detached", variants.DetachedStatsBatchNorm1d(3).double()))
    for name, layer in layers:
        linear = torch.nn.Linear(5, 3).double()
        torch.manual_seed(1)
        torch.nn.init.normal_(linear.bias)
        layer(linear(x)).double().backward(dy)
        grads[name] = linear.bias.grad.abs().max().item()
    assert grads["bn"] < 1e-12
    assert grads["detached"] > 1e-2


def test_detached_statistics_small_run():
    runs = derivation.detached_statistics(
        derivation.DetachedConfig(seeds=(0,), steps=60, hidden=(20, 20), record_every=20))
    assert [(r.kind, r.seed) for r in runs] == [("bn", 0), ("detached", 0)]
    for run in runs:
        assert run.step == [0, 20, 40, 60]
        assert len(run.bias_norm) == len(run.weight_norm) == 4
        assert len(run.train_loss) == 60
        assert run.final_gamma.shape == (40,)
        assert 0.0 <= run.final_test_acc <= 1.0
    bn, detached = runs
    assert abs(bn.bias_norm[-1] - bn.bias_norm[0]) < 1e-5 * bn.bias_norm[0]  # zero gradient: the bias stays put
    assert detached.bias_norm[-1] > detached.bias_norm[0] * 1.01


def test_sigmoid_linearity_falls_with_gamma():
    r_squared = derivation.sigmoid_linearity([0.5, 1.0, 2.0, 4.0])
    assert np.all(np.diff(r_squared) < 0)
    assert r_squared[0] > 0.99 and r_squared[-1] < 0.9


def test_scale_invariance_numbers():
    result = derivation.scale_invariance()
    assert np.all(result.output_change < 1e-12)
    np.testing.assert_allclose(result.grad_norm * result.scales, result.grad_norm[2], rtol=1e-10)
    np.testing.assert_allclose(result.step_angle * result.scales**2, result.step_angle[2], rtol=0.02)
    assert result.row_cosine.shape == result.scales.shape and np.all(result.row_cosine < 1e-12)  # <W_row, grad_row> = 0
    # eps > 0 breaks the invariance, by a relative eps / (a^2 var): visible at small a.
    with_eps = derivation.scale_invariance(derivation.ScaleInvarianceConfig(scales=(0.01, 1.0), eps=1e-2))
    assert with_eps.output_change[0] > 1e-3
    assert with_eps.row_cosine[0] > 1e-6  # ... and with it the orthogonality, again visible at small a


def test_weight_norm_small_run():
    runs = derivation.weight_norm_under_weight_decay(
        derivation.WeightDecayConfig(weight_decays=(0.0, 1e-2), steps=80, record_every=40))
    free, decayed = runs
    assert free.step == [0, 40, 80] and free.weight_decay == 0.0
    assert free.weight_norm[-1] > free.weight_norm[0]
    assert decayed.weight_norm[-1] < free.weight_norm[-1]


def test_saved_tensor_bytes_is_deterministic_and_counts_activations():
    x = torch.randn(64, 32, requires_grad=True)
    w = torch.rand(32, requires_grad=True)
    b = torch.zeros(32, requires_grad=True)
    hand = derivation.saved_tensor_bytes(
        lambda x_, w_, b_: torch_bn.batch_norm(x_, None, None, w_, b_, training=True), x, w, b
    )
    composed = derivation.saved_tensor_bytes(derivation.composed_batch_norm, x, w, b)
    assert hand == derivation.saved_tensor_bytes(
        lambda x_, w_, b_: torch_bn.batch_norm(x_, None, None, w_, b_, training=True), x, w, b
    )
    activation = 64 * 32 * 4
    assert activation <= hand <= activation + 4 * 32 * 4  # the input itself and a few per-channel vectors
    assert composed >= 2 * activation  # at least two (N, C) intermediates: the centred input and x_hat


def test_backward_cost_reports_every_method():
    results = derivation.backward_cost(derivation.BackwardCostConfig(shapes=((16, 8), (4, 3, 2, 2)), repeats=2))
    assert [r.shape for r in results] == [(16, 8), (4, 3, 2, 2)]
    for result in results:
        assert set(result.seconds) == set(result.saved_bytes) == {"hand-written", "composed ops"}
        assert all(t > 0 for t in result.seconds.values())
        assert result.time_ratio > 0
        assert result.saved_bytes["hand-written"] < result.saved_bytes["composed ops"]
