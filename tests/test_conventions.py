"""bnnotes.conventions, checked against the frameworks themselves: torch.nn.BatchNorm*d, Keras 3 (run for real, on
its torch backend) and a NumPy simulation of Caffe's documented BatchNorm update.

Keras is REQUIRED here (the test extra installs it): a missing keras must fail, not skip.
"""

from __future__ import annotations

import os

os.environ["KERAS_BACKEND"] = "torch"  # before the first import of keras: no TensorFlow needed

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from bnnotes import conventions as cv  # noqa: E402

# Keras 3 on NumPy 2 warns inside its own convert_to_numpy; not our concern here.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


def _batches(n_batches: int, m: int, channels: int = 4, seed: int = 0, spatial: tuple[int, ...] = ()) -> list:
    """Float64 batches with channels on different scales and means (moderate means: Keras uses E[x^2] - E[x]^2)."""
    rng = np.random.default_rng(seed)
    loc = np.linspace(-2.0, 3.0, channels).reshape((1, channels) + (1,) * len(spatial))
    scale = np.logspace(-1, 1, channels).reshape((1, channels) + (1,) * len(spatial))
    return [loc + scale * rng.standard_normal((m, channels) + spatial) for _ in range(n_batches)]


def _torch_run(batches, momentum, eps=1e-5):
    x0 = batches[0]
    bn_class = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d}[x0.ndim]
    bn = bn_class(x0.shape[1], momentum=momentum, eps=eps, affine=False, dtype=torch.float64)
    for batch in batches:
        bn(torch.as_tensor(batch))
    return bn


# --- momentum -----------------------------------------------------------------------------------------------------


def test_momentum_conversion_values_and_round_trip():
    assert cv.keras_to_torch_momentum(0.99) == pytest.approx(0.01, abs=1e-15)
    assert cv.keras_to_torch_momentum(0.999) == pytest.approx(0.001, abs=1e-15)
    assert cv.torch_to_keras_momentum(0.1) == pytest.approx(0.9, abs=1e-15)
    for k in (0.0, 0.5, 0.9, 0.99, 1.0):
        assert cv.torch_to_keras_momentum(cv.keras_to_torch_momentum(k)) == pytest.approx(k, abs=1e-15)


def test_momentum_conversion_rejects_bad_input():
    with pytest.raises(ValueError, match="cumulative average"):
        cv.torch_to_keras_momentum(None)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        cv.keras_to_torch_momentum(1.5)
    with pytest.raises(TypeError, match="real number"):
        cv.keras_to_torch_momentum("0.99")
    with pytest.raises(TypeError, match="real number"):
        cv.torch_to_keras_momentum(True)


def test_torch_with_converted_momentum_follows_the_old_value_weighting_rule():
    """An average that weights the old value by k is PyTorch's with momentum 1 - k (checked on the mean)."""
    batches = _batches(6, 8)
    k = 0.8
    expected = np.zeros(4)
    for batch in batches:
        expected = k * expected + (1 - k) * batch.mean(axis=0)
    bn = _torch_run(batches, cv.keras_to_torch_momentum(k))
    np.testing.assert_allclose(bn.running_mean.numpy(), expected, rtol=1e-13, atol=1e-14)


# --- variance correction -----------------------------------------------------------------------------------------


def test_biased_unbiased_variance():
    x = np.random.default_rng(0).standard_normal((5, 3))
    np.testing.assert_allclose(cv.unbiased_variance(x.var(axis=0), 5), x.var(axis=0, ddof=1), rtol=1e-14)
    np.testing.assert_allclose(cv.biased_variance(x.var(axis=0, ddof=1), 5), x.var(axis=0), rtol=1e-14)
    t = torch.tensor([3.0])
    assert cv.unbiased_variance(t, 4).item() == pytest.approx(4.0)
    with pytest.raises(ValueError, match="at least 2"):
        cv.unbiased_variance(1.0, 1)
    with pytest.raises(TypeError, match="integer"):
        cv.biased_variance(1.0, 4.0)


def test_initial_value_weight():
    assert cv.initial_value_weight(0.1, 0) == 1.0
    assert cv.initial_value_weight(0.1, 3) == pytest.approx(0.9**3)
    assert cv.initial_value_weight(None, 0) == 1.0
    assert cv.initial_value_weight(None, 5) == 0.0
    with pytest.raises(ValueError, match="non-negative integer"):
        cv.initial_value_weight(0.1, -1)


@pytest.mark.parametrize("momentum", [0.1, 0.01, 0.5, None])
@pytest.mark.parametrize("n_batches", [0, 1, 7])
@pytest.mark.parametrize("spatial", [(), (3, 2)])
def test_running_var_conversion_against_torch(momentum, n_batches, spatial):
    """torch's running_var -> the average of *biased* variances with the same weights (simulated), and back."""
    batches = _batches(n_batches, 6, spatial=spatial, seed=n_batches)
    bn = _torch_run(batches, momentum) if n_batches else _torch_run(_batches(1, 6, spatial=spatial), momentum)
    if n_batches == 0:
        bn.reset_running_stats()
    m = 6 * int(np.prod(spatial))
    axes = (0,) + tuple(range(2, 2 + len(spatial)))
    biased = np.ones(4)
    for t, batch in enumerate(batches, start=1):
        w = 1.0 / t if momentum is None else momentum
        biased = (1 - w) * biased + w * batch.var(axis=axes)
    steps = int(bn.num_batches_tracked)
    assert steps == n_batches
    converted = cv.to_biased_running_var(bn.running_var, m, momentum, steps)
    np.testing.assert_allclose(converted.numpy(), biased, rtol=1e-12)
    back = cv.to_unbiased_running_var(torch.as_tensor(biased), m, momentum, steps)
    np.testing.assert_allclose(back.numpy(), bn.running_var.numpy(), rtol=1e-12)


def test_torch_defaults_match_the_table():
    bn = nn.BatchNorm1d(3)
    conv = cv.CONVENTIONS["pytorch"]
    assert (bn.momentum, bn.eps) == (conv.default_momentum, conv.default_eps)
    assert conv.running_var == "unbiased" and conv.momentum_weights == "new batch"


# --- Keras 3, run for real ------------------------------------------------------------------------------------------


def _keras_layer(**kwargs):
    return keras.layers.BatchNormalization(**kwargs)


def test_keras_runs_on_the_torch_backend():
    assert keras.backend.backend() == "torch"
    assert int(keras.__version__.split(".")[0]) >= 3


def test_keras_defaults_match_the_table():
    layer = _keras_layer()
    conv = cv.CONVENTIONS["keras"]
    assert layer.momentum == conv.default_momentum == 0.99
    assert layer.epsilon == conv.default_eps == 1e-3
    assert conv.momentum_weights == "old value" and conv.running_var == "biased"


def test_keras_one_step_from_the_start_values_uses_the_biased_variance():
    x = _batches(1, 8)[0].astype(np.float32)
    layer = _keras_layer()
    layer(x, training=True)
    mean, var = keras.ops.convert_to_numpy(layer.moving_mean), keras.ops.convert_to_numpy(layer.moving_variance)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(mean, 0.01 * x64.mean(axis=0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(var, 0.99 + 0.01 * x64.var(axis=0), rtol=1e-6)  # biased: ddof=0
    # ... and not the unbiased one: the difference is far above float32 rounding.
    assert np.abs(var - (0.99 + 0.01 * x64.var(axis=0, ddof=1))).max() > 1e-2


def test_keras_inference_uses_epsilon_1e_3_and_the_moving_statistics():
    batches = [b.astype(np.float32) for b in _batches(3, 8)]
    layer = _keras_layer()
    for batch in batches:
        layer(batch, training=True)
    probe = batches[0][:4]
    y = keras.ops.convert_to_numpy(layer(probe, training=False)).astype(np.float64)
    mm = keras.ops.convert_to_numpy(layer.moving_mean).astype(np.float64)
    mv = keras.ops.convert_to_numpy(layer.moving_variance).astype(np.float64)
    np.testing.assert_allclose(y, (probe - mm) / np.sqrt(mv + 1e-3), rtol=1e-5, atol=1e-5)
    assert np.abs(y - (probe - mm) / np.sqrt(mv + 1e-5)).max() > 1e-3  # PyTorch's eps would be visibly different


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_converted_torch_running_stats_reproduce_keras(seed):
    """PyTorch with momentum = 1 - 0.99 and the converted variance gives Keras' moving statistics (float32 rounding)."""
    batches = [b.astype(np.float32) for b in _batches(5, 8, seed=seed)]
    layer = _keras_layer()
    for batch in batches:
        layer(batch, training=True)
    keras_mean = keras.ops.convert_to_numpy(layer.moving_mean).astype(np.float64)
    keras_var = keras.ops.convert_to_numpy(layer.moving_variance).astype(np.float64)
    bn = _torch_run([b.astype(np.float64) for b in batches], cv.keras_to_torch_momentum(layer.momentum),
                    eps=layer.epsilon)
    steps = int(bn.num_batches_tracked)
    converted = cv.to_biased_running_var(bn.running_var, 8, bn.momentum, steps).numpy()
    np.testing.assert_allclose(bn.running_mean.numpy(), keras_mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(converted, keras_var, rtol=1e-6)
    # Without the variance conversion the two disagree by far more than rounding.
    assert np.abs(bn.running_var.numpy() - keras_var).max() > 1e-3
    # The other direction: Keras' moving variance -> PyTorch's running_var.
    back = cv.to_unbiased_running_var(keras_var, 8, bn.momentum, steps)
    np.testing.assert_allclose(back, bn.running_var.numpy(), rtol=2e-6)


# --- Caffe, simulated from its documented algorithm -------------------------------------------------------------------


def _caffe_run(batches, fraction):
    c = batches[0].shape[1]
    blobs = (np.zeros(c), np.zeros(c), 0.0)
    for batch in batches:
        blobs = cv.caffe_update(*blobs, batch, moving_average_fraction=fraction)
    return blobs


def test_caffe_update_is_the_documented_rule():
    x = _batches(1, 5)[0]
    mean_blob, var_blob, s = cv.caffe_update(np.ones(4), 2 * np.ones(4), 3.0, x, moving_average_fraction=0.5)
    assert s == 0.5 * 3.0 + 1
    np.testing.assert_allclose(mean_blob, 0.5 + x.mean(axis=0), rtol=1e-14)
    np.testing.assert_allclose(var_blob, 1.0 + x.var(axis=0, ddof=1), rtol=1e-14)


@pytest.mark.parametrize("fraction", [0.999, 0.9, 0.5])
@pytest.mark.parametrize("spatial", [(), (3, 3)])
def test_caffe_blobs_convert_to_torch_running_stats(fraction, spatial):
    batches = _batches(9, 4, spatial=spatial, seed=3)
    mean_blob, var_blob, s = _caffe_run(batches, fraction)
    bn = _torch_run(batches, cv.keras_to_torch_momentum(fraction))
    running_mean, running_var, steps = cv.caffe_to_torch_running_stats(mean_blob, var_blob, s, fraction)
    assert steps == int(bn.num_batches_tracked) == 9
    np.testing.assert_allclose(running_mean, bn.running_mean.numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(running_var, bn.running_var.numpy(), rtol=1e-12)


def test_caffe_fraction_one_is_torch_momentum_none():
    batches = _batches(5, 6, seed=4)
    mean_blob, var_blob, s = _caffe_run(batches, 1.0)
    bn = _torch_run(batches, None)
    running_mean, running_var, steps = cv.caffe_to_torch_running_stats(mean_blob, var_blob, s, 1.0)
    assert steps == 5
    np.testing.assert_allclose(running_mean, bn.running_mean.numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(running_var, bn.running_var.numpy(), rtol=1e-12)
    # With plain sums, the population statistics are the cumulative averages too.
    pop_mean, pop_var = cv.caffe_to_population_stats(mean_blob, var_blob, s)
    np.testing.assert_allclose(pop_var, bn.running_var.numpy(), rtol=1e-12)


def test_caffe_population_stats_are_a_bias_corrected_moving_average():
    batches = _batches(6, 5, seed=5)
    lam = 0.9
    mean_blob, var_blob, s = _caffe_run(batches, lam)
    weights = lam ** np.arange(len(batches) - 1, -1, -1)
    expected_mean = sum(w * b.mean(axis=0) for w, b in zip(weights, batches)) / weights.sum()
    expected_var = sum(w * b.var(axis=0, ddof=1) for w, b in zip(weights, batches)) / weights.sum()
    mean, var = cv.caffe_to_population_stats(mean_blob, var_blob, s)
    np.testing.assert_allclose(mean, expected_mean, rtol=1e-12)
    np.testing.assert_allclose(var, expected_var, rtol=1e-12)
    # Never trained: Caffe uses 0 for a zero scale factor.
    zero_mean, zero_var = cv.caffe_to_population_stats(np.zeros(2), np.zeros(2), 0.0)
    assert np.all(zero_mean == 0) and np.all(zero_var == 0)


def test_caffe_converters_validate_their_input():
    with pytest.raises(ValueError, match="scale_factor"):
        cv.caffe_to_population_stats(np.zeros(2), np.zeros(2), -1.0)
    with pytest.raises(ValueError, match="scale_factor must lie"):
        cv.caffe_to_torch_running_stats(np.zeros(2), np.zeros(2), 20.0, 0.9)
    with pytest.raises(ValueError, match="cannot be recovered"):
        cv.caffe_to_torch_running_stats(np.zeros(2), np.zeros(2), 1.0, 0.0)
    with pytest.raises(ValueError, match="N, C"):
        cv.caffe_update(np.zeros(2), np.zeros(2), 0.0, np.zeros(2))
    assert cv.caffe_to_torch_running_stats(np.zeros(2), np.zeros(2), 0.0, 0.9)[2] == 0


# --- the table ------------------------------------------------------------------------------------------------------


def test_conventions_are_consistent():
    for key, conv in cv.CONVENTIONS.items():
        if conv.momentum_weights == "old value":
            assert conv.torch_momentum == pytest.approx(cv.keras_to_torch_momentum(conv.default_momentum)), key
        else:
            assert conv.torch_momentum == conv.default_momentum, key
    caffe, flax = cv.CONVENTIONS["caffe"], cv.CONVENTIONS["flax"]
    assert (caffe.momentum_name, caffe.default_momentum, caffe.default_eps) == ("moving_average_fraction", 0.999, 1e-5)
    assert (flax.default_momentum, flax.default_eps, flax.running_var) == (0.99, 1e-5, "biased")
    assert "use_running_average" in flax.inference_switch and "use_global_stats" in caffe.inference_switch


def test_conventions_table():
    table = cv.conventions_table()
    lines = table.splitlines()
    assert all(c.framework in lines[0] for c in cv.CONVENTIONS.values())
    assert len({line.count("|") for line in lines}) == 1  # a well-formed Markdown table
    assert cv.conventions_table(["keras", "pytorch"]).splitlines()[0] == "| | Keras 3 | PyTorch |"
    with pytest.raises(ValueError, match="unknown framework"):
        cv.conventions_table(["mxnet"])
