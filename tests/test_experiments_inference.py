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
from bnnotes.experiments import stats


@pytest.fixture(scope="module")
def data():
    return load_digits()


def _tiny_bn_model(seed: int = 0) -> nn.Module:
    return mlp(64, hidden=(16, 16), norm="bn", activation="relu", seed=seed)


def test_ema_tracker_reproduces_the_layers_own_running_statistics(data):
    model = _tiny_bn_model()
    with inf.EmaTracker(model, [0.1, 0.5]) as tracker:
        train(model, data, TrainConfig(steps=30, batch_size=32, lr=0.1, eval_every=30))
        for bn, (mean, var) in zip(stats.norm_layers(model), tracker.stats[0.1]):
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
    result = inf.batch_mates(model, data, inf.BatchMatesConfig(n_examples=8, batch_size=6, seed=0))
    assert result.train_prob.shape == (8, 10) and result.labels.shape == (8,)
    np.testing.assert_allclose(result.eval_prob, result.eval_prob[:, :1].repeat(10, axis=1), rtol=0, atol=1e-6)
    assert np.ptp(result.train_prob, axis=1).max() > 1e-3  # training mode: the batch-mates matter
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()) and not model.training
    with pytest.raises(ValueError, match="batch_size"):
        inf.batch_mates(model, data, inf.BatchMatesConfig(batch_size=1))


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
