"""Tests of bnnotes.experiments.motivation: tiny configurations, deterministic given the seed, right shapes and keys,
and one sanity property per experiment. The chapter runs the real configurations and asserts the claims."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bnnotes.experiments import TrainConfig, load_digits, mlp, steps_to_accuracy, train
from bnnotes.experiments import motivation as M
from bnnotes.experiments.motivation import figure1

# ----------------------------------------------------------------------------------------------------------------------
# The early stop that the sweeps use (TrainConfig.stop_at_accuracy, added for them)
# ----------------------------------------------------------------------------------------------------------------------


def test_train_stops_at_the_first_evaluation_that_reaches_the_target():
    data = load_digits()
    config = TrainConfig(steps=100, lr=1.0, eval_every=10, stop_at_accuracy=0.5)
    history = train(mlp(64, norm="bn", init_std=0.1, seed=0), data, config)
    full = train(mlp(64, norm="bn", init_std=0.1, seed=0), data, TrainConfig(steps=100, lr=1.0, eval_every=10))
    reached = steps_to_accuracy(full, 0.5)
    assert reached is not None and reached < 100
    assert history.step[-1] == reached  # stopped right there ...
    assert history.test_acc == full.test_acc[: len(history.test_acc)]  # ... after the same run up to that point
    assert len(history.train_loss) == reached


def test_train_without_a_target_runs_every_step():
    history = train(mlp(64, seed=0), load_digits(), TrainConfig(steps=25, eval_every=10))
    assert history.step == [0, 10, 20, 25] and len(history.train_loss) == 25


# ----------------------------------------------------------------------------------------------------------------------
# Gradient norms at initialization
# ----------------------------------------------------------------------------------------------------------------------


def test_gradient_norms_shapes_and_determinism():
    kwargs = dict(depth=3, activations=("sigmoid", "relu"), norms=("none", "bn"), seeds=(0, 1))
    config = M.GradientNormsConfig(**kwargs)
    first, second = M.gradient_norms_at_init(config), M.gradient_norms_at_init(config)
    assert sorted(first) == [("relu", "bn"), ("relu", "none"), ("sigmoid", "bn"), ("sigmoid", "none")]
    for key, norms in first.items():
        assert norms.shape == (2, 4)
        np.testing.assert_array_equal(norms, second[key])


def test_gradient_vanishes_through_plain_sigmoids_but_not_with_bn():
    norms = M.gradient_norms_at_init(M.GradientNormsConfig(depth=4, activations=("sigmoid",), seeds=(0,)))
    plain, bn = norms["sigmoid", "none"][0], norms["sigmoid", "bn"][0]
    # g'(x) <= 1/4: each plain sigmoid layer shrinks the gradient by roughly 4x at this scale.
    assert plain[0] < 0.1 * plain[3]
    assert bn[0] > 0.3 * bn[3]


@pytest.mark.parametrize("bad", [{"norms": ("ln",)}, {"norms": ()}, {"depth": 0}])
def test_gradient_norms_rejects_bad_input(bad):
    with pytest.raises(ValueError):
        M.gradient_norms_at_init(M.GradientNormsConfig(**bad))


# ----------------------------------------------------------------------------------------------------------------------
# Cost of whitening and the bias before BN
# ----------------------------------------------------------------------------------------------------------------------


def _center(x, eps):
    return x - x.mean(axis=0)


def test_normalization_cost_shapes():
    cost = M.normalization_cost(_center, M.NormalizationCostConfig(dims=(4, 8, 16), batch_size=10, repeats=2))
    assert cost.dims.tolist() == [4, 8, 16] and cost.batch_size == 10
    for times in (cost.whiten_seconds, cost.standardize_seconds, cost.ratio):
        assert times.shape == (3,) and (times > 0).all()


def test_normalization_cost_calls_the_whitening_with_each_batch():
    calls = []
    M.normalization_cost(lambda x, eps: calls.append((x.shape, eps)),
                         M.NormalizationCostConfig(dims=(3, 5), batch_size=7, repeats=2, eps=0.1))
    assert set(calls) == {((7, 3), 0.1), ((7, 5), 0.1)}
    assert calls.count(((7, 3), 0.1)) >= 3  # calibration, then at least one call per repeat


@pytest.mark.parametrize(
    "whiten, kwargs, error",
    [("zca", {}, TypeError), (_center, {"dims": ()}, ValueError),
     (_center, {"dims": (0,)}, ValueError), (_center, {"repeats": 0}, ValueError)],
)
def test_normalization_cost_rejects_bad_input(whiten, kwargs, error):
    with pytest.raises(error):
        M.normalization_cost(whiten, M.NormalizationCostConfig(**kwargs))


def test_bias_before_bn_changes_nothing_and_gets_no_gradient():
    effect = M.pre_bn_bias_effect(M.BiasAbsorptionConfig(bias_shift=5.0, batch_size=16, width=7, seed=3))
    assert effect.weight_grad_max > 1e-4  # the layer does learn through its weights ...
    assert effect.bias_grad_max < 1e-12 * max(1.0, effect.weight_grad_max)  # ... but not through its bias
    assert effect.output_change < 1e-12


def test_bias_before_bn_rejects_a_batch_of_one():
    with pytest.raises(ValueError, match="batch_size"):
        M.pre_bn_bias_effect(M.BiasAbsorptionConfig(batch_size=1))


# ----------------------------------------------------------------------------------------------------------------------
# Figure 1
# ----------------------------------------------------------------------------------------------------------------------


def test_trace_drift_spread_and_typical_unit_on_known_percentiles():
    # 3 measurements, 3 percentiles, 3 units. Unit 0 does not move; unit 1 shifts by 1; unit 2 by 4.
    start = np.array([[-1.0, -1.0, -1.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    shift = np.array([0.0, 1.0, 4.0])
    percentiles = np.stack([start, start + shift / 2, start + shift])
    trace = M.SigmoidInputTrace(np.array([0, 10, 20]), percentiles)
    np.testing.assert_allclose(trace.unit_drift(), shift)
    assert trace.drift() == 1.0  # the median over units
    assert trace.drift(start=1) == 0.5
    np.testing.assert_allclose(trace.spread(), [2.0, 2.0, 2.0])
    assert trace.typical_unit() == 1


def test_reproduce_figure1_shapes_keys_and_determinism():
    kwargs = dict(seeds=(0, 1), steps=30, hidden=(8, 6), measure_every=10, eval_every=15)
    config = M.Figure1Config(**kwargs)
    runs, again = M.reproduce_figure1(config), M.reproduce_figure1(config)
    assert sorted(runs) == ["bn", "none"]
    for norm in runs:
        assert [run.seed for run in runs[norm]] == [0, 1]
        for run, other in zip(runs[norm], again[norm]):
            assert run.norm == norm
            assert run.history.step == [0, 15, 30]
            assert run.trace.steps.tolist() == [0, 10, 20, 30]
            assert run.trace.percentiles.shape == (4, 3, 6)
            p = run.trace.percentiles
            assert (p[:, 0] <= p[:, 1]).all() and (p[:, 1] <= p[:, 2]).all()
            np.testing.assert_array_equal(p, other.trace.percentiles)
            assert run.history.test_acc == other.history.test_acc


def test_bn_trace_at_step_0_uses_the_held_out_batch_statistics():
    # gamma = 1 and beta = 0 at step 0: every unit's held-out inputs are standardized with their own statistics, so
    # the median is near 0 and the 15-85 range near that of a standard normal (2.07), whatever the raw scale.
    run = M.reproduce_figure1(M.Figure1Config(seeds=(0,), steps=10, hidden=(20, 20), measure_every=10))["bn"][0]
    p0 = run.trace.percentiles[0]
    assert np.abs(np.median(p0[1])) < 0.3
    assert 1.5 < np.median(p0[2] - p0[0]) < 2.6


def test_percentile_measurement_leaves_running_statistics_alone():
    data = load_digits()
    model = mlp(64, hidden=(10, 10), norm="bn", init_std=0.1, seed=0)
    callback, trace = figure1._percentile_recorder(model, 1, data, measure_every=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    callback(0, model)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    assert model.training and trace().percentiles.shape == (1, 3, 10)


# ----------------------------------------------------------------------------------------------------------------------
# Sweeps
# ----------------------------------------------------------------------------------------------------------------------


def test_sweep_trains_and_largest_trainable():
    steps = {"bn": np.array([[10.0, 20.0, math.inf], [10.0, math.inf, math.nan]]),
             "none": np.array([[math.inf] * 3, [30.0, math.inf, 40.0]])}
    sweep = M.Sweep("lr", np.array([1.0, 2.0, 4.0]), (0, 1), 0.9, 50, steps)
    np.testing.assert_array_equal(sweep.trains("bn"), [[True, True, False], [True, False, False]])
    np.testing.assert_array_equal(sweep.largest_trainable("bn"), [2.0, 1.0])
    largest_plain = sweep.largest_trainable("none")
    assert math.isnan(largest_plain[0]) and largest_plain[1] == 4.0


def test_learning_rate_sweep_shapes_and_determinism():
    kwargs = dict(lrs=[0.5, 1.0, 2.0], seeds=(0, 1), max_steps=40, target=0.5)
    config = M.LearningRateSweepConfig(**kwargs)
    sweep, again = M.learning_rate_sweep(config), M.learning_rate_sweep(config)
    assert sweep.parameter == "lr" and sweep.values.tolist() == [0.5, 1.0, 2.0] and sweep.seeds == (0, 1)
    for norm in ("none", "bn"):
        assert sweep.steps_to_target[norm].shape == (2, 3)
        np.testing.assert_array_equal(sweep.steps_to_target[norm], again.steps_to_target[norm])
    # Sanity: with BN, lr 1 reaches 50% test accuracy within 40 steps.
    assert sweep.trains("bn")[:, 1].all()


@pytest.mark.parametrize("patience", [1, 2])
def test_learning_rate_sweep_stops_after_patience_failures(patience):
    # An unreachable target: every run fails; after `patience` failures the rest are skipped (nan, not trained).
    sweep = M.learning_rate_sweep(M.LearningRateSweepConfig(lrs=(1.0, 2.0, 4.0, 8.0), seeds=(0,), max_steps=3,
                                                            target=1.0, norms=("bn",), patience=patience))
    steps = sweep.steps_to_target["bn"][0]
    assert np.isinf(steps[:patience]).all() and np.isnan(steps[patience:]).all()
    assert not sweep.trains("bn").any() and math.isnan(sweep.largest_trainable("bn")[0])


@pytest.mark.parametrize(
    "kwargs", [{"lrs": [2.0, 1.0]}, {"lrs": []}, {"lrs": [0.0, 1.0]}, {"lrs": [1.0], "target": 1.5},
               {"lrs": [1.0], "patience": 0}, {"lrs": [1.0], "norms": ("gn",)}],
)
def test_learning_rate_sweep_rejects_bad_input(kwargs):
    with pytest.raises(ValueError):
        M.learning_rate_sweep(M.LearningRateSweepConfig(**kwargs))


def test_init_scale_sweep_shapes_and_sanity():
    sweep = M.init_scale_sweep(M.InitScaleSweepConfig(init_stds=(0.1, 1.0), seeds=(0,), max_steps=40, target=0.5,
                                                      norms=("bn",)))
    assert sweep.parameter == "init_std" and list(sweep.steps_to_target) == ["bn"]
    assert sweep.steps_to_target["bn"].shape == (1, 2)
    assert sweep.trains("bn").all()  # BN reaches 50% within 40 steps from either scale


def test_sweeps_reject_an_empty_seed_list():
    with pytest.raises(TypeError, match="seeds"):
        M.init_scale_sweep(M.InitScaleSweepConfig(init_stds=[0.1], seeds=()))


# ----------------------------------------------------------------------------------------------------------------------
# Generalization gap and saturating nonlinearities
# ----------------------------------------------------------------------------------------------------------------------


def test_generalization_gap_shapes_and_gaps():
    runs = M.generalization_gap(M.GapConfig(n_train=120, seeds=(0, 1), steps=40, eval_every=20))
    assert sorted(runs) == ["bn", "none"]
    for norm, per_seed in runs.items():
        assert [run.seed for run in per_seed] == [0, 1]
        for run in per_seed:
            assert run.steps.tolist() == [0, 20, 40]
            for series in (run.train_loss, run.train_acc, run.test_loss, run.test_acc):
                assert series.shape == (3,)
            assert run.acc_gap == pytest.approx(run.train_acc[-1] - run.test_acc[-1])
            assert run.loss_gap == pytest.approx(run.test_loss[-1] - run.train_loss[-1])
            assert run.train_loss[-1] < run.train_loss[0]  # sanity: it learns the subset


def test_generalization_gap_is_deterministic():
    first = M.generalization_gap(M.GapConfig(n_train=60, seeds=(2,), steps=10, eval_every=5))
    second = M.generalization_gap(M.GapConfig(n_train=60, seeds=(2,), steps=10, eval_every=5))
    for norm in first:
        np.testing.assert_array_equal(first[norm][0].test_loss, second[norm][0].test_loss)
        np.testing.assert_array_equal(first[norm][0].train_loss, second[norm][0].train_loss)


def test_generalization_gap_rejects_a_subset_smaller_than_a_batch():
    with pytest.raises(ValueError, match="n_train"):
        M.generalization_gap(M.GapConfig(n_train=30, batch_size=60))


def test_saturating_nonlinearities_shapes_and_speedup():
    result = M.saturating_nonlinearities(M.SaturationConfig(depth=2, seeds=(0, 1), max_steps=40, target=0.5))
    assert sorted(result.steps_to_target) == [("relu", "bn"), ("relu", "none"), ("sigmoid", "bn"), ("sigmoid", "none")]
    assert all(v.shape == (2,) for v in result.steps_to_target.values())
    assert result.final_test_acc.keys() == result.steps_to_target.keys()
    assert np.isfinite(result.steps_to_target["relu", "bn"]).all()  # sanity: a BN ReLU net reaches 50% quickly
    assert (result.final_test_acc["relu", "bn"] >= 0.5).all()  # ... and stops right there


def test_speedup_counts_a_failed_plain_run_as_max_steps():
    steps = {("sigmoid", "none"): np.array([math.inf, 300.0]), ("sigmoid", "bn"): np.array([50.0, 100.0])}
    result = M.SaturationResult(6, (0, 1), 0.9, 600, steps, {key: np.zeros(2) for key in steps})
    np.testing.assert_allclose(result.speedup("sigmoid"), [12.0, 3.0])


# ----------------------------------------------------------------------------------------------------------------------
# The per-layer gain of eq-motivation-backprop, and the fan-based initializations
# ----------------------------------------------------------------------------------------------------------------------


def test_backprop_gains_respect_the_operator_norm_bound_and_match_the_typical_gain():
    gains = M.backprop_gains_at_init(M.BackpropGainsConfig(init_std=0.1, depth=4, width=100, batch_size=60, seed=0))
    assert gains.measured.shape == gains.bound.shape == gains.typical.shape == (3,)
    assert (gains.measured <= gains.bound).all()  # the bound holds for every layer, as an inequality must
    np.testing.assert_allclose(gains.measured, gains.typical, rtol=0.25)  # the typical-vector estimate
    np.testing.assert_allclose(gains.operator_norm, 0.1 * 2 * math.sqrt(100), rtol=0.15)  # ~ sigma (sqrt(n) + sqrt(n))
    assert (gains.mean_derivative > 0.22).all() and (gains.mean_derivative <= 0.25).all()  # g' <= 1/4, unsaturated


def test_backprop_gains_see_saturation_at_large_scales():
    small, large = (M.backprop_gains_at_init(M.BackpropGainsConfig(init_std=std, depth=3, width=50, batch_size=30))
                    for std in (0.1, 3.0))
    assert (large.preact_std > 10 * small.preact_std).all()
    assert (large.mean_derivative < 0.2 * small.mean_derivative).all()


def test_backprop_gains_reject_a_network_without_a_hidden_to_hidden_layer():
    with pytest.raises(ValueError, match="depth >= 2"):
        M.backprop_gains_at_init(M.BackpropGainsConfig(depth=1))
    with pytest.raises(ValueError, match="init_std must be positive"):
        M.backprop_gains_at_init(M.BackpropGainsConfig(init_std=0.0))


def test_init_schemes_give_the_fan_based_standard_deviations():
    assert M.INIT_SCHEMES["glorot"](100, 100) == pytest.approx(0.1)
    assert M.INIT_SCHEMES["kaiming"](100, 10) == pytest.approx(math.sqrt(0.02))
    model = mlp(64, hidden=(400, 400), seed=0)
    M.apply_init_scheme(model, "kaiming", seed=0)
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    for layer in linears:
        expected = math.sqrt(2.0 / layer.in_features)
        assert layer.weight.std().item() == pytest.approx(expected, rel=0.05)
        assert layer.bias is None or (layer.bias == 0).all()
    with pytest.raises(ValueError, match="init scheme must be one of"):
        M.apply_init_scheme(model, "xavier", seed=0)


def test_init_scheme_steps_shapes_and_determinism():
    config = M.InitSchemesConfig(schemes=("glorot", "kaiming"), seeds=(0,), max_steps=40, target=0.5)
    run = lambda: M.init_scheme_steps(config)
    first, second = run(), run()
    assert first.steps_to_target["bn"].shape == (1, 2) and set(first.steps_to_target) == {"none", "bn"}
    for norm in ("none", "bn"):
        np.testing.assert_array_equal(first.steps_to_target[norm], second.steps_to_target[norm])
    assert first.hidden_std == pytest.approx({"glorot": 0.1, "kaiming": math.sqrt(0.02)})
    with pytest.raises(ValueError, match="schemes must be a non-empty subset"):
        M.init_scheme_steps(M.InitSchemesConfig(schemes=("lecun",)))

