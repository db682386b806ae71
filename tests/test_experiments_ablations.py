"""The Explore ablations: each builds the networks it names, repeats itself exactly, and refuses unknown variants."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from bnnotes.experiments import ablations, load_digits
from bnnotes.experiments.training import TrainConfig

SHORT = TrainConfig(steps=20, batch_size=30, lr=0.5, eval_every=10)


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def bn_layers(model):
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]


def test_frozen_affine_keeps_gamma_and_beta_while_bn_learns_them(digits):
    result = ablations.frozen_affine(ablations.FrozenAffineConfig(train=SHORT, seeds=(0,)), digits)
    assert result.variants == ("none", "bn", "bn-frozen-affine")
    assert not bn_layers(result.models["none"][0])
    for layer in bn_layers(result.models["bn-frozen-affine"][0]):
        assert torch.equal(layer.weight, torch.ones_like(layer.weight)) and torch.equal(layer.bias, torch.zeros_like(layer.bias))
    trained = bn_layers(result.models["bn"][0])
    assert len(trained) == 3 and all((layer.weight != 1).any() for layer in trained), "trainable gamma should move"
    assert all(0 <= acc <= 1 for v in result.variants for acc in result.final_test_acc(v))


def test_partial_bn_puts_bn_exactly_where_the_placement_says(digits):
    config = ablations.PartialBNConfig(placements=(("none", ()), ("odd", (1, 3))), train=SHORT)
    result = ablations.partial_bn(config, digits)
    assert result.variants == ("none", "odd")
    model = result.models["odd"][0]
    norms = [model[i + 1] for i, m in enumerate(model) if isinstance(m, nn.Linear) and i + 1 < len(model)]
    is_bn = [any(isinstance(m, nn.BatchNorm1d) for m in norm.modules()) for norm in norms]
    assert is_bn == [False, True, False, True, False]
    assert not bn_layers(result.models["none"][0])


def test_partial_bn_rejects_a_layer_that_does_not_exist(digits):
    with pytest.raises(ValueError, match=r"layers \(7,\).*5 hidden layers"):
        ablations.partial_bn(ablations.PartialBNConfig(placements=(("bad", (7,)),), train=SHORT), digits)


def test_init_against_bn_draws_kaiming_weights(digits):
    config = ablations.InitConfig(variants=("kaiming", "small+bn"),
                                  train=TrainConfig(steps=1, batch_size=30, lr=1e-9, eval_every=1))
    result = ablations.init_against_bn(config, digits)
    linears = [m for m in result.models["kaiming"][0].modules() if isinstance(m, nn.Linear)]
    for layer in linears[1:-1]:  # the 100 x 100 hidden layers: 10^4 draws pin the std to about 1%
        assert layer.weight.std().item() == pytest.approx(math.sqrt(2 / 100), rel=0.03)
    small = [m for m in result.models["small+bn"][0].modules() if isinstance(m, nn.Linear)]
    assert small[1].weight.std().item() == pytest.approx(config.small_std, rel=0.03)
    assert len(bn_layers(result.models["small+bn"][0])) == 10
    with pytest.raises(ValueError, match="got 'xavier'"):
        ablations.init_against_bn(ablations.InitConfig(variants=("xavier",), train=SHORT), digits)


def test_bn_against_dropout_builds_each_variant_and_repeats_exactly(digits):
    config = ablations.DropoutConfig(hidden=(32,), train=SHORT)
    first = ablations.bn_against_dropout(config, digits)
    second = ablations.bn_against_dropout(config, digits)
    for variant in config.variants:
        assert first.histories[variant][0].train_loss == second.histories[variant][0].train_loss
        modules = list(first.models[variant][0].modules())
        assert any(isinstance(m, nn.Dropout) for m in modules) == variant.endswith("dropout")
        assert any(isinstance(m, nn.BatchNorm1d) for m in modules) == variant.startswith("bn")
    with pytest.raises(ValueError, match="got 'ln'"):
        ablations.bn_against_dropout(ablations.DropoutConfig(variants=("ln",), train=SHORT), digits)


def test_momentum_batch_size_uses_each_momentum_and_measures_the_gap(digits):
    config = ablations.MomentumBatchConfig(batch_sizes=(8,), momenta=(0.0, 1.0), steps=5, hidden=(16,))
    result = ablations.momentum_batch_size(config, digits)
    assert result.eval_acc.shape == result.batch_stats_acc.shape == (1, 2)
    # Momentum 0 never moves the running statistics away from (0, 1), momentum 1 keeps only the last batch: the two
    # networks differ only there, so their batch-statistics accuracies agree while their eval accuracies need not.
    assert result.batch_stats_acc[0, 0] == result.batch_stats_acc[0, 1]
    np.testing.assert_array_equal(result.gap, result.batch_stats_acc - result.eval_acc)


def test_final_test_acc_names_the_variants(digits):
    result = ablations.frozen_affine(ablations.FrozenAffineConfig(variants=("none",), train=SHORT, seeds=(0,)), digits)
    with pytest.raises(ValueError, match=r"one of \['none'\], got 'bn'"):
        result.final_test_acc("bn")


def test_mean_variance_only_builds_the_variants_of_the_registry(digits):
    from bnnotes import variants

    config = ablations.MeanVarianceOnlyConfig(train=SHORT)
    result = ablations.mean_variance_only(config, digits)
    expected = {"none": None, "bn-mean-only": variants.MeanOnlyBatchNorm1d,
                "bn-var-only": variants.VarianceOnlyBatchNorm1d, "bn": nn.BatchNorm1d}
    for variant, kind in expected.items():
        model = result.models[variant][0]
        norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
        assert (not norms) if kind is None else (len(norms) == 3 and all(isinstance(m, kind) for m in norms))
        # Only a layer that subtracts the batch mean makes the Linear bias before it redundant.
        has_bias = [m.bias is not None for m in model.modules() if isinstance(m, nn.Linear)][:-1]
        assert has_bias == [variant in ("none", "bn-var-only")] * 3
