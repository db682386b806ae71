"""bnnotes.experiments.stats: the statistics tools, against direct computations and torch's own layers."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from bnnotes import torch_bn
from bnnotes.experiments import load_digits, mlp, stats
from bnnotes.ghost import GhostBatchNorm1d
from bnnotes.lp_norm import LpBatchNorm1d
from bnnotes.renorm import BatchRenorm1d


@pytest.fixture(scope="module")
def data():
    return load_digits()


def _tiny_bn_model(seed: int = 0) -> nn.Module:
    return mlp(64, hidden=(16, 16), norm="bn", activation="relu", seed=seed)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_norm_layers_finds_every_bn_like_layer_with_running_statistics():
    model = nn.Sequential(
        nn.BatchNorm1d(3), torch_bn.BatchNorm1d(3), BatchRenorm1d(3), GhostBatchNorm1d(3, virtual_batch_size=2),
        LpBatchNorm1d(3, p=1), nn.Sequential(nn.BatchNorm1d(3)),
        nn.BatchNorm1d(3, track_running_stats=False), nn.InstanceNorm1d(3), nn.LayerNorm(3),
    )
    found = stats.norm_layers(model)
    assert found == [model[0], model[1], model[2], model[3], model[4], model[5][0]]
    assert [stats.statistic_names(layer) for layer in found[2:5]] == [
        ("running_mean", "running_std"), ("running_mean", "running_var"), ("running_mean", "running_norm")]
    with pytest.raises(TypeError, match="normalization layer.*got LayerNorm"):
        stats.statistic_names(nn.LayerNorm(3))


def test_frozen_buffers_restores_every_buffer_and_every_mode(data):
    model = _tiny_bn_model()
    model.eval()
    model[1].train()  # mixed modes come back as they were
    model[4].momentum = None
    before = _state(model)
    with stats.frozen_buffers(model) as net:
        assert net is model and all(m.training for m in model.modules())
        out = model(data.x_train[:32])
        assert not torch.equal(model[1].running_mean, before["1.running_mean"])  # the block did move them
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model[1].training and not model.training and not model[4].training
    # Training-mode output inside the block is the one a deep copy in training mode gives.
    torch.testing.assert_close(out, copy.deepcopy(model).train()(data.x_train[:32]), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="inside"):
        with stats.frozen_buffers(model, train=False):
            assert not any(m.training for m in model.modules())
            model(data.x_train[:32])
            raise RuntimeError("an error inside the block")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()) and model[1].training


def test_population_statistics_in_order_and_in_place_is_precise_bn(data):
    """seed=None, in_place=True: what a momentum=None layer holds after one pass of consecutive batches."""
    model = _tiny_bn_model()
    model.train()
    reference = copy.deepcopy(model)
    for layer in stats.norm_layers(reference):
        layer.reset_running_stats()
        layer.momentum = None
    with torch.no_grad():
        for start in range(0, 250 - 60 + 1, 60):
            reference(data.x_train[start : start + 60])
    returned = stats.population_statistics(model, data.x_train[:250], batch_size=60, seed=None, in_place=True)
    for layer, ref, (mean, var) in zip(stats.norm_layers(model), stats.norm_layers(reference), returned):
        assert torch.equal(layer.running_mean, ref.running_mean) and torch.equal(layer.running_var, ref.running_var)
        assert torch.equal(mean, ref.running_mean) and torch.equal(var, ref.running_var)
        assert int(layer.num_batches_tracked) == 4 and layer.momentum == 0.1  # the momentum comes back
    assert model.training


def test_population_statistics_covers_the_variants_and_can_switch_dropout_off(data):
    x = data.x_train[:120, :6].double()
    model = nn.Sequential(nn.Dropout(0.5), BatchRenorm1d(6), LpBatchNorm1d(6, p=2)).double()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        (renorm_mean, renorm_std), (lp_mean, lp_norm) = stats.population_statistics(
            model, x, batch_size=60, seed=None, only_norms_train=True)
    # Dropout off: the first layer sees x itself; its mean is the mean of the two batch means.
    torch.testing.assert_close(renorm_mean, x.mean(0), rtol=1e-12, atol=1e-12)
    assert renorm_std.shape == lp_norm.shape == (6,) and model.training and model[0].training
    with torch.random.fork_rng():
        torch.manual_seed(0)
        (dropped_mean, _), _ = stats.population_statistics(model, x, batch_size=60, seed=None)
    assert not torch.allclose(dropped_mean, x.mean(0), atol=1e-3)  # dropout on: a different input
    assert not torch.equal(lp_mean, torch.zeros(6))


def test_population_statistics_is_algorithm_2():
    """One BN layer right after the input: E[mu_B] and m/(m-1) E[sigma_B^2] over the same batches."""
    torch.manual_seed(0)
    model = nn.Sequential(torch_bn.BatchNorm1d(3))
    x = torch.randn(40, 3, dtype=torch.float32) * torch.tensor([1.0, 5.0, 0.1]) + torch.tensor([0.0, 2.0, -1.0])
    model[0].double()
    x = x.double()
    (mean, var), = stats.population_statistics(model, x, batch_size=8, seed=3)
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(3))
    batches = x[perm].split(8)
    expected_mean = torch.stack([b.mean(0) for b in batches]).mean(0)
    expected_var = torch.stack([b.var(0, correction=0) for b in batches]).mean(0) * 8 / 7
    torch.testing.assert_close(mean, expected_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, expected_var, rtol=1e-12, atol=1e-12)
    # batch_size=None: the whole set is one batch (mean and unbiased variance of x).
    (mean, var), = stats.population_statistics(model, x)
    torch.testing.assert_close(mean, x.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, x.var(0, correction=1), rtol=1e-12, atol=1e-12)


def test_population_statistics_leaves_the_model_as_it_was(data):
    model = _tiny_bn_model()
    model.train()
    model[1].momentum = 0.3
    before = {k: v.clone() for k, v in model.state_dict().items()}
    population = stats.population_statistics(model, data.x_train, batch_size=60)
    assert len(population) == 2 and population[0][0].shape == (16,)
    assert model.training and model[1].momentum == 0.3 and model[4].momentum == 0.1
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="batch_size"):
        stats.population_statistics(model, data.x_train, batch_size=1)
    with pytest.raises(ValueError, match="no normalization layer with running statistics"):
        stats.population_statistics(nn.Linear(64, 3), data.x_train)


def test_using_statistics_and_distance():
    model = _tiny_bn_model()
    loaded = [(torch.full((16,), 2.0), torch.full((16,), 4.0)) for _ in range(2)]
    with stats.using_statistics(model, loaded):
        assert torch.equal(model[4].running_var, torch.full((16,), 4.0))
    assert torch.equal(model[4].running_var, torch.ones(16))
    with pytest.raises(ValueError, match="2 BN layers"):
        with stats.using_statistics(model, loaded[:1]):
            pass
    assert stats.statistics_distance(loaded, loaded) == 0.0
    # Every mean off by one reference standard deviation (2), the standard deviations exact: distance 1.
    shifted = [(m + 2.0, v) for m, v in loaded]
    assert stats.statistics_distance(shifted, loaded, eps=0.0) == pytest.approx(1.0)


def test_bn_inputs_are_the_inputs_of_the_bn_layers(data):
    model = _tiny_bn_model()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = stats.bn_inputs(model, data.x_test[:7])
    assert [tuple(t.shape) for t in inputs] == [(7, 16), (7, 16)]
    with torch.no_grad():
        first = model[0](data.x_test[:7])
        second = model[3](model[2](model[1].eval()(first)))
    torch.testing.assert_close(inputs[0], first, rtol=0, atol=0)
    torch.testing.assert_close(inputs[1], second, rtol=0, atol=0)
    model[1].train()
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="no normalization layer with running statistics"):
        stats.bn_inputs(nn.Linear(64, 3), data.x_test)


def test_batch_variance_ratio_matches_a_direct_computation_and_eq_inference_bias():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 3, 2, dtype=torch.float64, generator=g) * torch.tensor([1.0, 4.0, 0.5]).view(1, 3, 1) + 2.0
    ratio = stats.batch_variance_ratio(x, batch_size=5, seed=7)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(7))
    expected = torch.stack([x[perm[s:s + 5]].var(dim=(0, 2), correction=0) for s in (0, 5)]).mean(0)
    torch.testing.assert_close(ratio, expected / x.var(dim=(0, 2), correction=0), rtol=1e-12, atol=0)
    # Independent values: E[sigma_B^2] / sigma^2 = (m - 1) / m, here m = 4 * 2 = 8 (standard error about 0.002).
    iid = torch.randn(40_000, 2, 2, dtype=torch.float64, generator=g)
    assert torch.allclose(stats.batch_variance_ratio(iid, batch_size=4), torch.tensor(7 / 8, dtype=torch.float64),
                          atol=0.01)
    # One shared offset per example (values within an example correlated): the shortfall is far larger than 1/m.
    correlated = iid + 3.0 * torch.randn(40_000, 1, 1, dtype=torch.float64, generator=g)
    assert torch.all(stats.batch_variance_ratio(correlated, batch_size=4) < 0.8)
    with pytest.raises(ValueError, match="batch_size"):
        stats.batch_variance_ratio(x, batch_size=13)
    with pytest.raises(ValueError, match="one value per channel"):
        stats.batch_variance_ratio(x[:, :, 0], batch_size=1)


