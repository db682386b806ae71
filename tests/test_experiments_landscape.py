"""Tests for bnnotes.experiments.landscape: noise injection, ICS through gradients, landscape probes, scale symmetry."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from bnnotes.experiments import load_digits, mlp
from bnnotes.experiments.landscape import (
    ICSConfig,
    LandscapeConfig,
    NoisyBNConfig,
    distribution_instability,
    gradient_ics,
    ics_experiment,
    landscape_experiment,
    landscape_probe,
    linear_teacher_data,
    lower_layer_step,
    noisy_bn_experiment,
    recompute_running_stats,
    rescale_pre_norm_weights,
    scale_symmetry,
    with_noise,
)
from bnnotes.lp_norm import LpBatchNorm1d
from bnnotes.torch_bn import BatchNorm1d
from bnnotes.variants import ActivationNoise


def _exact_bn(width: int) -> BatchNorm1d:
    """BN with a negligible eps, so that BN(a W x) = BN(W x) holds to float64 precision."""
    return BatchNorm1d(width, eps=1e-14)


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def test_with_noise_builds_norm_then_noise_with_distinct_seeds():
    factory = with_noise("bn", seed=10)
    first, second = factory(4), factory(4)
    assert isinstance(first[0], BatchNorm1d) and isinstance(first[1], ActivationNoise)
    assert not torch.equal(first[1](torch.zeros(2, 4)), second[1](torch.zeros(2, 4)))
    assert isinstance(with_noise("l1")(4)[0], LpBatchNorm1d)
    with pytest.raises(ValueError, match="norm must be one of"):
        with_noise("nope")


def test_distribution_instability():
    assert distribution_instability(np.zeros((5, 3)), np.ones((5, 3))) == 0.0
    means = np.array([[0.0, 0.0], [0.5, 0.5], [0.0, 0.0]])
    assert distribution_instability(means, 2 * np.ones((3, 2))) == pytest.approx(0.25)
    with pytest.raises(ValueError, match=r"\(T, units\)"):
        distribution_instability(np.zeros(3), np.ones(3))


def test_linear_teacher_data_is_separable_by_a_linear_map():
    data = linear_teacher_data(n_features=6, n_classes=3, n_train=300, n_test=50, seed=1)
    # Least squares on one-hot targets recovers the teacher's argmax on most points.
    onehot = torch.nn.functional.one_hot(data.y_train, 3).float()
    solution = torch.linalg.lstsq(data.x_train, onehot).solution
    assert ((data.x_train @ solution).argmax(1) == data.y_train).float().mean() > 0.85
    with pytest.raises(ValueError, match="n_classes >= 2"):
        linear_teacher_data(n_classes=1)


def test_gradient_ics_matches_a_manual_computation():
    torch.manual_seed(0)
    model = mlp(6, hidden=(5, 4), out_features=3, activation="tanh", seed=0).double()
    x, y = torch.randn(10, 6, dtype=torch.float64), torch.randint(0, 3, (10,))
    lr = 0.3
    l2, cos = gradient_ics(model, x, y, lr)
    assert l2[0] == 0.0 and cos[0] == pytest.approx(1.0)
    # Layer 1 (model[3]): update the parameters of model[0] only, then recompute its gradient.
    loss = nn.functional.cross_entropy(model(x), y)
    params = list(model.parameters())
    grads = torch.autograd.grad(loss, params)
    shifted = mlp(6, hidden=(5, 4), out_features=3, activation="tanh", seed=0).double()
    with torch.no_grad():
        for (name, p), g in zip(shifted.named_parameters(), grads):
            if name.startswith("0."):
                p.sub_(lr * g)
    g_before = grads[[n for n, _ in model.named_parameters()].index("3.weight")]
    g_after = torch.autograd.grad(nn.functional.cross_entropy(shifted(x), y), shifted[3].weight)[0]
    assert l2[1] == pytest.approx((g_before - g_after).norm().item(), rel=1e-9)
    assert cos[1] == pytest.approx(torch.nn.functional.cosine_similarity(g_before.flatten(), g_after.flatten(), 0).item())
    # The model itself was not touched.
    assert torch.equal(model[0].weight, mlp(6, hidden=(5, 4), out_features=3, activation="tanh", seed=0).double()[0].weight)


def test_lower_layer_step_matches_a_manual_computation():
    model = mlp(6, hidden=(5, 4), out_features=3, activation="tanh", norm=_exact_bn, seed=0).double()
    x, y = torch.randn(10, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1)), torch.arange(10) % 3
    lr = 0.3
    step = lower_layer_step(model, x, y, lr)
    assert torch.equal(model[1].running_mean, torch.zeros(5, dtype=torch.float64)), "the model must not be touched"
    model = copy.deepcopy(model)
    # Layer i's relative step covers every parameter registered before its weight: for layer 2 (model[6]) that is
    # the first Linear, its BN, the second Linear and its BN.
    named = list(model.named_parameters())
    grads = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), [p for _, p in named])
    below = [i for i, (n, _) in enumerate(named) if n.split(".")[0] in {"0", "1", "3", "4"}]
    expected = (
        lr * torch.sqrt(sum(grads[i].pow(2).sum() for i in below)) / torch.sqrt(sum(named[i][1].pow(2).sum() for i in below))
    )
    assert step.shape == (3,) and step[0] == 0.0
    assert step[2] == pytest.approx(expected.item(), rel=1e-12)
    assert 0 < step[1] < step[2] * 10
    assert lower_layer_step(model, x, y, 2 * lr)[2] == pytest.approx(2 * step[2], rel=1e-12), "linear in lr"
    with pytest.raises(ValueError, match="positive learning rate"):
        lower_layer_step(model, x, y, 0.0)


def test_landscape_probe_values_and_rescaling(digits):
    model = mlp(64, hidden=(20, 20), norm=_exact_bn, init_std=0.1, seed=0).double()
    x, y = digits.x_train[:60].double(), digits.y_train[:60]
    before = [p.clone() for p in model.parameters()]
    result = landscape_probe(model, x, y, step_sizes=(0.05, 0.1, 0.2))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert result["loss_range"] == pytest.approx(result["loss_max"] - result["loss_min"])
    assert result["grad_change_max"] >= result["grad_change_min"] > 0 and result["beta_eff"] > 0
    # Rescaling the pre-BN weights leaves the relative protocol unchanged (up to BN's eps) but not the absolute one.
    scaled = rescale_pre_norm_weights(model, 4.0)
    rel, rel_scaled = (landscape_probe(m, x, y, (0.01, 0.05), relative=True) for m in (model, scaled))
    assert rel_scaled["beta_eff"] == pytest.approx(rel["beta_eff"], rel=1e-7)
    assert rel_scaled["loss_range"] == pytest.approx(rel["loss_range"], rel=1e-7)
    absolute_scaled = landscape_probe(scaled, x, y, step_sizes=(0.05, 0.1, 0.2))
    assert abs(absolute_scaled["beta_eff"] / result["beta_eff"] - 1.0) > 0.1
    with pytest.raises(ValueError, match="direction"):
        landscape_probe(model, x, y, (0.1,), direction="sideways")
    with pytest.raises(ValueError, match="positive"):
        landscape_probe(model, x, y, (0.0,))


def test_scale_symmetry_ratios(digits):
    model = mlp(64, hidden=(30, 30), norm=_exact_bn, init_std=0.1, seed=1).double()
    x, y = digits.x_train[:50].double(), digits.y_train[:50]
    ratios = scale_symmetry(model, x, y, 3.0)
    assert ratios["loss_ratio"] == pytest.approx(1.0, abs=1e-9)
    assert ratios["grad_ratio"] == pytest.approx(1 / 3, rel=1e-7)
    assert ratios["curvature_ratio"] == pytest.approx(1 / 9, rel=1e-7)
    # Without BN the loss itself changes: the symmetry is BN's.
    plain = mlp(64, hidden=(30, 30), init_std=0.1, seed=1).double()
    assert abs(scale_symmetry(plain, x, y, 3.0)["loss_ratio"] - 1.0) > 1e-3
    with pytest.raises(ValueError, match="positive"):
        rescale_pre_norm_weights(model, -1.0)


def test_recompute_running_stats_switches_noise_off(digits):
    model = mlp(64, hidden=(10,), norm=with_noise("bn", seed=0), seed=0)
    model.train()
    with torch.no_grad():
        for i in range(5):
            model(digits.x_train[60 * i : 60 * (i + 1)])
    fresh = recompute_running_stats(model, digits.x_train[:120], batch_size=60)
    bn = fresh[1][0]
    pre = fresh[0](digits.x_train[:120]).detach()
    assert torch.allclose(bn.running_mean, pre.mean(0), atol=1e-5)
    assert not fresh.training and model.training
    assert model[1][1].enabled and not fresh[1][1].enabled


def test_experiments_run_small(digits):
    runs = noisy_bn_experiment(
        NoisyBNConfig(hidden=(16, 16), steps=20, eval_every=10, record_every=5, probe_size=30, seeds=(0,)), digits
    )
    assert [r.variant for r in runs] == ["plain", "bn", "noisy_bn", "plain_noise"]
    for r in runs:
        assert r.batch_mean.shape == (5, 16) and r.unit_percentiles.shape == (5, 5)
        assert r.layer_values.shape == (5, 30 * 16)
        # The histogram data and the recorded moments describe the same activations.
        np.testing.assert_allclose(r.layer_values.reshape(5, 30, 16).mean(1), r.batch_mean, rtol=1e-4, atol=1e-5)
        assert np.isfinite(r.instability)
    by = {r.variant: r for r in runs}
    assert by["bn"].instability < 0.5 * by["noisy_bn"].instability  # BN pins the moments; the noise moves them
    ics = ics_experiment(ICSConfig(hidden=(16, 16), steps=10, measure_every=5, seeds=(0,)), digits)
    assert [r.norm for r in ics] == ["none", "bn"] and ics[0].cosine.shape == (3, 3)
    assert ics[1].lower_step.shape == (3, 3) and (ics[1].lower_step[:, 0] == 0).all() and (ics[1].lower_step[:, 1:] > 0).all()
    dln = ics_experiment(ICSConfig(data="linear", hidden=(8,) * 4, steps=10, measure_every=5, lr=0.01, seeds=(0,)))
    assert dln[1].l2.shape == (3, 5)
    land = landscape_experiment(
        LandscapeConfig(hidden=(16,), norms=("none", "l1"), steps=10, measure_every=5, seeds=(0,)), digits
    )
    assert set(land[0].measures) == {(d, p) for d in ("gradient", "random") for p in ("absolute", "relative")}
    assert land[1].measures[("gradient", "absolute")]["loss_range"].shape == (3,)
