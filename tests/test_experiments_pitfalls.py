"""Tests of bnnotes.experiments.pitfalls: the layers and batch builders exactly, the experiments on tiny configs."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from bnnotes.experiments import Dataset, TrainConfig, load_digits, mlp, train
from bnnotes.experiments import pitfalls as P
from bnnotes.renorm import BatchRenorm1d, renorm_schedule


@pytest.fixture(scope="module")
def data():
    return load_digits()


def _features(n: int = 16, c: int = 5, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scales = torch.linspace(0.5, 4.0, c, dtype=torch.float64)
    return torch.randn(n, c, generator=g, dtype=torch.float64) * scales + torch.arange(c, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------------- renorm


def test_renorm_callback_sets_the_compressed_schedule_on_every_batch_renorm_layer():
    model = mlp(8, hidden=(6, 6), norm="brn")
    callback = P.renorm_callback(200)
    layers = [m for m in model.modules() if isinstance(m, BatchRenorm1d)]
    assert len(layers) == 2
    for step, expected in [(0, (1.0, 0.0)), (10, (1.0, 0.0)), (50, renorm_schedule(50, 10, 80, 50)),
                           (80, (3.0, 5.0)), (199, (3.0, 5.0))]:
        callback(step, model)
        for layer in layers:
            assert (layer.r_max, layer.d_max) == pytest.approx(expected)
    with pytest.raises(ValueError, match="total_steps"):
        P.renorm_callback(0)


# ------------------------------------------------------------------------------------------------------- two examples


def test_two_example_gradient_matches_its_closed_form():
    x = _features(n=2, c=7)
    x[1, 0] = x[0, 0] + 1e-3  # a nearly tied pair: the closed form's large-gradient regime
    dy = _features(n=2, c=7, seed=3)
    autograd, closed = P.two_example_gradient(x, dy)
    torch.testing.assert_close(autograd, closed, rtol=1e-6, atol=1e-12)
    # The tied unit gets a gradient orders of magnitude above the others.
    assert closed[0, 0].abs() > 100 * closed[0, 1:].abs().max()


def test_two_example_gradient_checks_shapes():
    with pytest.raises(ValueError, match=r"\(2, C\)"):
        P.two_example_gradient(torch.zeros(3, 2), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="dy"):
        P.two_example_gradient(torch.zeros(2, 2), torch.zeros(2, 3))


# ---------------------------------------------------------------------------------------------------------- diagnosis


def test_diagnose_bn_uses_population_statistics_and_leaves_the_model_alone(data):
    model = mlp(64, hidden=(20,), activation="relu", norm="bn", seed=0)
    train(model, data, TrainConfig(steps=20, batch_size=8, lr=0.05, eval_every=20))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    diagnosis = P.diagnose_bn(model, data)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key])
    # Population statistics by hand: the whole training split as one batch through the trained first layer.
    pre = model[0](data.x_train).detach()
    np.testing.assert_allclose(diagnosis.pre_bn_var[0], pre.var(0).numpy(), rtol=1e-4)
    assert diagnosis.acc_running == pytest.approx(
        (model(data.x_test).argmax(1) == data.y_test).float().mean().item())
    assert 0.0 <= diagnosis.acc_population <= 1.0 and 0.0 <= diagnosis.train_acc_population <= 1.0
    assert diagnosis.first_weight_norm == pytest.approx(model[0].weight.norm().item())


# ---------------------------------------------------------------------------------------------------------- GAN batches


def test_discriminator_data_labels_and_fakes(data):
    shift = P.discriminator_data(data, "shift", shift_feature=5, shift=2.0)
    n = data.x_train.shape[0]
    assert shift.x_train.shape == (2 * n, 64)
    assert shift.y_train[:n].eq(1).all() and shift.y_train[n:].eq(0).all()
    difference = shift.x_train[n:] - shift.x_train[:n]
    assert torch.allclose(difference[:, 5], torch.full((n,), 2.0))
    assert difference[:, torch.arange(64) != 5].abs().max() == 0
    collapse = P.discriminator_data(data, "collapse")
    assert torch.equal(collapse.x_test[: data.x_test.shape[0]], collapse.x_test[data.x_test.shape[0]:])
    with pytest.raises(ValueError, match="scenario"):
        P.discriminator_data(data, "mixup")
    with pytest.raises(ValueError, match="shift_feature"):
        P.discriminator_data(data, "shift", shift_feature=64)


def test_pure_batches_alternate_and_are_pure():
    epoch = P.discriminator_batches(100, 8, "pure")(torch.Generator().manual_seed(0))
    assert len(epoch) == 2 * (100 // 8)
    for i, idx in enumerate(epoch):
        assert idx.shape == (8,)
        is_fake = idx >= 100
        assert is_fake.all() if i % 2 else (~is_fake).all()
        assert len(idx.unique()) == 8
    reals = torch.cat(epoch[0::2])
    assert len(reals.unique()) == len(reals)  # real images are drawn without repetition within the epoch


def test_mixed_batches_are_half_and_half_and_collapse_repeats_k_images():
    epoch = P.discriminator_batches(100, 8, "mixed", distinct_fakes=2)(torch.Generator().manual_seed(1))
    assert len(epoch) == 100 // 4
    for idx in epoch:
        fakes = idx[idx >= 100]
        assert len(fakes) == 4 and (idx < 100).sum() == 4
        assert len(fakes.unique()) == 2 and all((fakes == f).sum() == 2 for f in fakes.unique())


def test_discriminator_batches_reject_bad_arguments():
    with pytest.raises(ValueError, match="batching"):
        P.discriminator_batches(100, 8, "alternating")
    with pytest.raises(ValueError, match="even"):
        P.discriminator_batches(100, 7, "mixed")
    with pytest.raises(ValueError, match="distinct_fakes"):
        P.discriminator_batches(100, 8, "pure", distinct_fakes=3)
    with pytest.raises(ValueError, match="batch_size"):
        P.discriminator_batches(4, 8, "pure")


def test_train_uses_the_batches_hook():
    seen: list[torch.Tensor] = []

    class Recorder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.training:
                seen.append(x[:, 0].clone())
            return self.linear(x)

    x = torch.arange(20.0).view(10, 2)
    y = torch.zeros(10, dtype=torch.long)
    task = Dataset(x, y, x, y)
    batches = lambda g: [torch.tensor([3, 3, 4]), torch.tensor([0, 1])]  # noqa: E731 (popped from the end)
    train(Recorder(), task, TrainConfig(steps=3, batch_size=2, eval_every=3), batches=batches)
    assert [s.tolist() for s in seen] == [[0.0, 2.0], [6.0, 6.0, 8.0], [0.0, 2.0]]
    with pytest.raises(ValueError, match="no batches"):
        train(Recorder(), task, TrainConfig(steps=1, batch_size=2), batches=lambda g: [])


# ---------------------------------------------------------------------------------------------------------- fine-tuning


def test_shift_images_moves_columns_right_with_wraparound():
    images = torch.arange(128.0).view(2, 64)
    shifted = P.shift_images(images, 2).view(2, 8, 8)
    torch.testing.assert_close(shifted[:, :, 2:], images.view(2, 8, 8)[:, :, :6])
    torch.testing.assert_close(shifted[:, :, :2], images.view(2, 8, 8)[:, :, 6:])
    with pytest.raises(ValueError, match=r"\(N, 64\)"):
        P.shift_images(torch.zeros(2, 63))


# ---------------------------------------------------------------------------------------------------------- experiments


def test_global_statistics_experiment_shapes_and_the_frozen_bn_bias(data):
    config = P.GlobalStatsConfig(hidden=(16, 16), train=TrainConfig(steps=20, batch_size=16, lr=1.0, eval_every=10),
                                 seeds=(0,))
    result = P.global_statistics_experiment(config, data)
    assert result.steps.tolist() == [0, 10, 20]
    for key in ("bn", "moving"):
        assert result.test_acc[key].shape == (1, 3) and result.train_loss[key].shape == (1, 20)
        assert result.weight_norm[key].shape == (1, 3) and result.diverged[key].shape == (1,)
    # With real BN the bias before the normalizer has exactly zero gradient: its norm never moves.
    np.testing.assert_allclose(result.bias_norm["bn"][0], result.bias_norm["bn"][0, 0], rtol=1e-6)
    assert result.bias_norm["moving"][0, -1] > result.bias_norm["moving"][0, 0]


def test_small_batch_sweep_shapes_and_models(data):
    config = P.SmallBatchConfig(batch_sizes=(2, 8), norms=("bn", "brn"), hidden=(8,), steps=12, seeds=(0, 1))
    result = P.small_batch_sweep(config, data)
    assert result.test_acc["bn"].shape == (2, 2)
    assert result.grad_norm[("brn", 2)].shape == (2, 12) and np.isfinite(result.grad_norm[("brn", 2)]).all()
    brn_model = result.models[("brn", 8, 1)]
    assert not brn_model.training
    layer = next(m for m in brn_model.modules() if isinstance(m, BatchRenorm1d))
    assert (layer.r_max, layer.d_max) == pytest.approx((3.0, 5.0))  # the schedule ran to its end


def test_order_experiment_shapes(data):
    config = P.OrderConfig(norms=("bn", "ln"), hidden=(8,), train=TrainConfig(steps=10, batch_size=16, eval_every=10),
                           last_steps=5, seeds=(0,))
    result = P.order_experiment(config, data)
    assert set(result.eval_acc) == {(o, n) for o in ("shuffle", "sorted") for n in ("bn", "ln")}
    assert all(v.shape == (1,) for v in result.train_batch_acc.values())


def test_discriminator_experiment_collapse_is_invisible_per_example(data):
    config = P.DiscriminatorConfig(scenarios=("collapse",), hidden=(8,),
                                   train=TrainConfig(steps=10, batch_size=8, lr=0.1, eval_every=10), test_batches=3,
                                   seeds=(0,))
    result = P.discriminator_experiment(config, data)
    assert len(result.acc) == 3 * 3
    for (_, _, kind), value in result.acc.items():
        assert value.shape == (1,)
        if kind == "eval":
            # Every test image appears once as real and once as fake: per example, exactly half can be right.
            assert value[0] == pytest.approx(0.5)


def test_finetune_experiment_shapes(data):
    config = P.FinetuneConfig(hidden=(8,), pretrain=TrainConfig(steps=10, batch_size=32, lr=0.3, eval_every=10),
                              examples_per_class=3, batch_sizes=(2, 4), steps=5, seeds=(0,))
    result = P.finetune_experiment(config, data)
    assert result.acc_source.shape == (1,) and result.acc_target_before.shape == (1,)
    assert result.acc_target["frozen"].shape == (1, 2) and result.acc_target["updated"].shape == (1, 2)


def test_experiments_are_deterministic(data):
    config = P.SmallBatchConfig(batch_sizes=(2,), norms=("bn",), hidden=(8,), steps=15, seeds=(0,))
    first = P.small_batch_sweep(config, data)
    second = P.small_batch_sweep(dataclasses.replace(config), data)
    np.testing.assert_array_equal(first.test_acc["bn"], second.test_acc["bn"])
    np.testing.assert_array_equal(first.grad_norm[("bn", 2)], second.grad_norm[("bn", 2)])
