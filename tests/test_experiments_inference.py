"""bnnotes.experiments.inference: fast checks of the chapter's experiments on tiny configurations."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from bnnotes import torch_bn
from bnnotes.experiments import TrainConfig, load_digits, mlp, train
from bnnotes.experiments import inference as inf


@pytest.fixture(scope="module")
def data():
    return load_digits()


def _tiny_bn_model(seed: int = 0) -> nn.Module:
    return mlp(64, hidden=(16, 16), norm="bn", activation="relu", seed=seed)


def test_population_statistics_is_algorithm_2():
    """One BN layer right after the input: E[mu_B] and m/(m-1) E[sigma_B^2] over the same batches."""
    torch.manual_seed(0)
    model = nn.Sequential(torch_bn.BatchNorm1d(3))
    x = torch.randn(40, 3, dtype=torch.float32) * torch.tensor([1.0, 5.0, 0.1]) + torch.tensor([0.0, 2.0, -1.0])
    model[0].double()
    x = x.double()
    (mean, var), = inf.population_statistics(model, x, batch_size=8, seed=3)
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(3))
    batches = x[perm].split(8)
    expected_mean = torch.stack([b.mean(0) for b in batches]).mean(0)
    expected_var = torch.stack([b.var(0, correction=0) for b in batches]).mean(0) * 8 / 7
    torch.testing.assert_close(mean, expected_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, expected_var, rtol=1e-12, atol=1e-12)
    # batch_size=None: the whole set is one batch (mean and unbiased variance of x).
    (mean, var), = inf.population_statistics(model, x)
    torch.testing.assert_close(mean, x.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, x.var(0, correction=1), rtol=1e-12, atol=1e-12)


def test_population_statistics_leaves_the_model_as_it_was(data):
    model = _tiny_bn_model()
    model.train()
    model[1].momentum = 0.3
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = inf.population_statistics(model, data.x_train, batch_size=60)
    assert len(stats) == 2 and stats[0][0].shape == (16,)
    assert model.training and model[1].momentum == 0.3 and model[4].momentum == 0.1
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="batch_size"):
        inf.population_statistics(model, data.x_train, batch_size=1)
    with pytest.raises(ValueError, match="no bnnotes BN layer"):
        inf.population_statistics(nn.Linear(64, 3), data.x_train)


def test_using_statistics_and_distance():
    model = _tiny_bn_model()
    stats = [(torch.full((16,), 2.0), torch.full((16,), 4.0)) for _ in range(2)]
    with inf.using_statistics(model, stats):
        assert torch.equal(model[4].running_var, torch.full((16,), 4.0))
    assert torch.equal(model[4].running_var, torch.ones(16))
    with pytest.raises(ValueError, match="2 BN layers"):
        with inf.using_statistics(model, stats[:1]):
            pass
    assert inf.statistics_distance(stats, stats) == 0.0
    # Every mean off by one reference standard deviation (2), the standard deviations exact: distance 1.
    shifted = [(m + 2.0, v) for m, v in stats]
    assert inf.statistics_distance(shifted, stats, eps=0.0) == pytest.approx(1.0)


def test_ema_tracker_reproduces_the_layers_own_running_statistics(data):
    model = _tiny_bn_model()
    with inf.EmaTracker(model, [0.1, 0.5]) as tracker:
        train(model, data, TrainConfig(steps=30, batch_size=32, lr=0.1, eval_every=30))
        for bn, (mean, var) in zip(inf.bn_layers(model), tracker.stats[0.1]):
            torch.testing.assert_close(mean, bn.running_mean, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(var, bn.running_var, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(tracker.stats[0.5][0][1], tracker.stats[0.1][0][1])
        frozen = [v.clone() for v in tracker.stats[0.1][0]]
        with tracker.pause():
            model.train()
            model(data.x_train[:32])
        assert torch.equal(frozen[0], tracker.stats[0.1][0][0])
    model(data.x_train[:32])  # hooks removed: no error and no update
    assert torch.equal(frozen[0], tracker.stats[0.1][0][0])
    with pytest.raises(ValueError, match="momenta"):
        inf.EmaTracker(model, [0.0])


def test_momentum_sweep_tiny(data):
    config = inf.MomentumSweepConfig(
        momenta=(0.001, 0.1), hidden=(16,), seeds=(0, 1),
        train=TrainConfig(steps=40, batch_size=30, lr=0.5, eval_every=20),
    )
    result = inf.momentum_sweep(config, data)
    assert list(result.steps) == [0, 20, 40]
    assert result.acc_ema.shape == (2, 2, 3) and result.acc_population.shape == (2, 3)
    assert result.distance.shape == (2, 2) and np.all(result.distance >= 0)
    assert np.all((0 <= result.acc_ema) & (result.acc_ema <= 1))
    # At step 0 every momentum still holds the start values (0, 1): identical accuracies.
    assert np.all(result.acc_ema[:, 0, 0] == result.acc_ema[:, 1, 0])
    # After 40 steps momentum 0.001 has barely moved from (0, 1); 0.1 is much closer to the population.
    assert np.all(result.distance[:, 0] > result.distance[:, 1])
    assert result.final_acc(0.1).shape == (2,)
    assert all(not m.training for m in result.models)


def test_batch_mates_eval_mode_is_independent_of_the_batch(data):
    model = _tiny_bn_model()
    train(model, data, TrainConfig(steps=50, batch_size=32, lr=0.1, eval_every=50))
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = inf.batch_mates(model, data, n_examples=8, batch_size=6, seed=0)
    assert result.train_prob.shape == (8, 10) and result.labels.shape == (8,)
    np.testing.assert_allclose(result.eval_prob, result.eval_prob[:, :1].repeat(10, axis=1), rtol=0, atol=1e-6)
    assert np.ptp(result.train_prob, axis=1).max() > 1e-3  # training mode: the batch-mates matter
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()) and not model.training
    with pytest.raises(ValueError, match="batch_size"):
        inf.batch_mates(model, data, batch_size=1)


@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
def test_run_keras_batchnorm():
    # keras is required (the test extra installs it): no skip.
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((8, 3)) for _ in range(2)]
    out = inf.run_keras_batchnorm(batches, probe=batches[0][:2])
    assert out["momentum"] == 0.99 and out["epsilon"] == 1e-3
    assert out["moving_mean"].shape == (3,) and out["probe_output"].shape == (2, 3)


def test_convnet_and_fold_benchmark_tiny(data):
    model = inf.convnet((4, 6), seed=1)
    assert model(data.x_test[:3]).shape == (3, 10)
    assert sum(isinstance(m, torch_bn.BatchNorm2d) for m in model) == 2
    config = dataclasses.replace(
        inf.FoldBenchmarkConfig(), channels=(4, 6), train=TrainConfig(steps=10, batch_size=30, lr=0.05, eval_every=10),
        batch_sizes=(1, 8), repeats=2, inner=1,
    )
    result = inf.fold_benchmark(config, data)
    assert result.acc_folded == pytest.approx(result.acc_unfused, abs=1 / 540 + 1e-9)
    assert result.max_abs_diff <= 1e-5 * max(1.0, result.max_abs_logit)
    assert set(result.seconds) == {1, 8} and set(result.seconds[1]) == {"bn", "torch_bn", "folded"}
    assert all(s > 0 for per_batch in result.seconds.values() for s in per_batch.values())
    assert not any(isinstance(m, torch_bn.BatchNorm2d) for m in result.folded.modules())


def test_bn_inputs_are_the_inputs_of_the_bn_layers(data):
    model = _tiny_bn_model()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = inf.bn_inputs(model, data.x_test[:7])
    assert [tuple(t.shape) for t in inputs] == [(7, 16), (7, 16)]
    with torch.no_grad():
        first = model[0](data.x_test[:7])
        second = model[3](model[2](model[1].eval()(first)))
    torch.testing.assert_close(inputs[0], first, rtol=0, atol=0)
    torch.testing.assert_close(inputs[1], second, rtol=0, atol=0)
    model[1].train()
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="no bnnotes BN layer"):
        inf.bn_inputs(nn.Linear(64, 3), data.x_test)


def test_batch_variance_ratio_matches_a_direct_computation_and_eq_inference_bias():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 3, 2, dtype=torch.float64, generator=g) * torch.tensor([1.0, 4.0, 0.5]).view(1, 3, 1) + 2.0
    ratio = inf.batch_variance_ratio(x, batch_size=5, seed=7)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(7))
    expected = torch.stack([x[perm[s:s + 5]].var(dim=(0, 2), correction=0) for s in (0, 5)]).mean(0)
    torch.testing.assert_close(ratio, expected / x.var(dim=(0, 2), correction=0), rtol=1e-12, atol=0)
    # Independent values: E[sigma_B^2] / sigma^2 = (m - 1) / m, here m = 4 * 2 = 8 (standard error about 0.002).
    iid = torch.randn(40_000, 2, 2, dtype=torch.float64, generator=g)
    assert torch.allclose(inf.batch_variance_ratio(iid, batch_size=4), torch.tensor(7 / 8, dtype=torch.float64),
                          atol=0.01)
    # One shared offset per example (values within an example correlated): the shortfall is far larger than 1/m.
    correlated = iid + 3.0 * torch.randn(40_000, 1, 1, dtype=torch.float64, generator=g)
    assert torch.all(inf.batch_variance_ratio(correlated, batch_size=4) < 0.8)
    with pytest.raises(ValueError, match="batch_size"):
        inf.batch_variance_ratio(x, batch_size=13)
    with pytest.raises(ValueError, match="one value per channel"):
        inf.batch_variance_ratio(x[:, :, 0], batch_size=1)


def test_train_mode_predictions(data):
    model = _tiny_bn_model()
    train(model, data, TrainConfig(steps=30, batch_size=32, lr=0.1, eval_every=30))
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = data.x_test[:33]  # 33 = 2 * 16 + 1: the single leftover example joins the last batch
    predictions = inf.train_mode_predictions(model, x, batch_size=16, seed=4)
    perm = torch.randperm(33, generator=torch.Generator().manual_seed(4))
    reference = copy.deepcopy(model).train()
    expected = torch.empty(33, dtype=torch.long)
    with torch.no_grad():
        for idx in (perm[:16], perm[16:]):
            expected[idx] = reference(x[idx]).argmax(dim=1)
    assert torch.equal(predictions, expected)
    assert not model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # Without BN the batching cannot matter: training-mode predictions are the eval-mode ones.
    plain = mlp(64, hidden=(16,), norm="none", seed=0)
    with torch.no_grad():
        eval_predictions = plain(x).argmax(dim=1)
    assert torch.equal(inf.train_mode_predictions(plain, x, batch_size=5, seed=1), eval_predictions)
    with pytest.raises(ValueError, match="batch_size"):
        inf.train_mode_predictions(model, x, batch_size=1)
