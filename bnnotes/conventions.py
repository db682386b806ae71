"""How frameworks store BN's running statistics, and exact converters between their conventions.

Every framework keeps a moving average of the batch mean and variance for inference (Algorithm 2 of Ioffe & Szegedy,
2015), but they disagree on three details:

- **Which value the momentum weights.** PyTorch: ``running = (1 - momentum) * running + momentum * batch``, so its
  momentum (default 0.1) is the weight of the *new batch*. Keras, TF1, Flax and Caffe weight the *old value*:
  ``moving = momentum * moving + (1 - momentum) * batch`` (0.99 in Keras/TF1/Flax, 0.999 in Caffe).
- **Which variance is averaged.** PyTorch and Caffe average the *unbiased* batch variance (scaled by m/(m-1), with m
  values per channel); Keras 3 and Flax average the *biased* one, and so does TensorFlow's non-fused path (its fused
  kernel, the default for 4-D inputs, applies the m/(m-1) correction).
- **Where the average starts.** PyTorch, Keras, TF1 and Flax start from (mean 0, var 1). Caffe accumulates unnormalized
  sums from 0 together with a scale-factor blob and divides by it, so its estimate carries no trace of a start value.

The converters here are exact, not asymptotic: they reproduce one framework's buffers from another's to rounding error
(``tests/test_conventions.py`` checks them against ``torch.nn.BatchNorm1d``, against Keras 3 itself, and against a
NumPy simulation of Caffe's documented update).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from numbers import Real
from typing import Any

import numpy as np

from bnnotes._core import bessel_factor, per_channel, reduction_dims, unbiased_variance, values_per_channel

__all__ = [
    "Convention",
    "CONVENTIONS",
    "conventions_table",
    "keras_to_torch_momentum",
    "torch_to_keras_momentum",
    "unbiased_variance",
    "biased_variance",
    "initial_value_weight",
    "to_biased_running_var",
    "to_unbiased_running_var",
    "caffe_update",
    "caffe_to_population_stats",
    "caffe_to_torch_running_stats",
]


@dataclass(frozen=True)
class Convention:
    """One framework's BN defaults and running-statistics rules.

    momentum_name and default_momentum are as the framework spells them; torch_momentum is the same default in
    PyTorch's convention (the weight of the new batch). running_var is ``"unbiased"`` (m/(m-1)) or ``"biased"``.
    """

    framework: str
    layer: str
    momentum_name: str
    default_momentum: float | None
    momentum_weights: str
    torch_momentum: float | None
    eps_name: str
    default_eps: float
    running_var: str
    start: str
    inference_switch: str
    affine: str


CONVENTIONS: dict[str, Convention] = {
    "pytorch": Convention(
        framework="PyTorch",
        layer="torch.nn.BatchNorm2d",
        momentum_name="momentum",
        default_momentum=0.1,
        momentum_weights="new batch",
        torch_momentum=0.1,
        eps_name="eps",
        default_eps=1e-5,
        running_var="unbiased",
        start="(0, 1); num_batches_tracked counts steps; momentum=None is the cumulative average",
        inference_switch="model.eval() / model.train()",
        affine="in the layer (weight, bias)",
    ),
    "keras": Convention(
        framework="Keras 3",
        layer="keras.layers.BatchNormalization",
        momentum_name="momentum",
        default_momentum=0.99,
        momentum_weights="old value",
        torch_momentum=0.01,
        eps_name="epsilon",
        default_eps=1e-3,
        running_var="biased",
        start="(0, 1)",
        inference_switch="layer(x, training=False); fit() and predict() set it",
        affine="in the layer (gamma, beta)",
    ),
    "tf1": Convention(
        framework="TensorFlow 1",
        layer="tf.compat.v1.layers.batch_normalization",
        momentum_name="momentum",
        default_momentum=0.99,
        momentum_weights="old value",
        torch_momentum=0.01,
        eps_name="epsilon",
        default_eps=1e-3,
        running_var="biased; unbiased with the fused kernel (fused=True, the default for 4-D input)",
        start="(0, 1)",
        inference_switch="training= argument; the UPDATE_OPS must run with the train op",
        affine="in the layer (gamma, beta)",
    ),
    "caffe": Convention(
        framework="Caffe",
        layer='layer { type: "BatchNorm" } + layer { type: "Scale" }',
        momentum_name="moving_average_fraction",
        default_momentum=0.999,
        momentum_weights="old value",
        torch_momentum=0.001,
        eps_name="eps",
        default_eps=1e-5,
        running_var="unbiased",
        start="sums from 0, divided by a scale-factor blob (no start value)",
        inference_switch="use_global_stats (default: true in the TEST phase)",
        affine='a separate "Scale" layer with bias_term: true',
    ),
    "flax": Convention(
        framework="Flax (linen)",
        layer="flax.linen.BatchNorm",
        momentum_name="momentum",
        default_momentum=0.99,
        momentum_weights="old value",
        torch_momentum=0.01,
        eps_name="epsilon",
        default_eps=1e-5,
        running_var="biased",
        start="(0, 1) in the 'batch_stats' collection",
        inference_switch="use_running_average=True (and batch_stats not mutable)",
        affine="in the layer (scale, bias)",
    ),
}


def conventions_table(keys: list[str] | None = None) -> str:
    """The `CONVENTIONS` as a Markdown table, one column per framework.

    keys: which frameworks, in order (default: all). Returns the table as a string.

    >>> conventions_table(["pytorch"]).splitlines()[0]
    '| | PyTorch |'
    """
    keys = list(CONVENTIONS) if keys is None else keys
    unknown = [k for k in keys if k not in CONVENTIONS]
    if unknown:
        raise ValueError(f"unknown framework(s) {unknown}; expected some of {sorted(CONVENTIONS)}")
    columns = [CONVENTIONS[k] for k in keys]
    rows = ["| | " + " | ".join(c.framework for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for f in fields(Convention):
        if f.name == "framework":
            continue
        cells = [_cell(getattr(c, f.name)) for c in columns]
        rows.append(f"| {f.name.replace('_', ' ')} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _cell(value: Any) -> str:
    if value is None:
        return "None"
    if isinstance(value, float):
        return f"{value:g}"
    text = str(value).replace("|", "\\|")
    return f"`{text}`" if ("." in text and " " not in text) else text


# ---------------------------------------------------------------------------------------------------------------------
# Momentum


def _check_fraction(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number in [0, 1], got {type(value).__name__} {value!r}")
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return value


def keras_to_torch_momentum(keras_momentum: float) -> float:
    """PyTorch's momentum (weight of the new batch) for a Keras/TF1/Flax momentum or a Caffe moving_average_fraction.

    Both conventions describe the same moving average, ``moving = k * moving + (1 - k) * batch``; PyTorch calls
    ``1 - k`` the momentum.

    >>> round(keras_to_torch_momentum(0.99), 12)
    0.01
    """
    return 1.0 - _check_fraction(keras_momentum, "keras_momentum")


def torch_to_keras_momentum(torch_momentum: float | None) -> float:
    """The Keras/TF1/Flax momentum (weight of the old value) for a PyTorch momentum; the inverse of
    `keras_to_torch_momentum`.

    PyTorch's ``momentum=None`` (a cumulative average, weight 1/t at step t) has no constant equivalent.

    >>> round(torch_to_keras_momentum(0.1), 12)
    0.9
    """
    if torch_momentum is None:
        raise ValueError(
            "torch momentum=None is a cumulative average (weight 1/t at step t) and has no constant Keras momentum"
        )
    return 1.0 - _check_fraction(torch_momentum, "torch_momentum")


# ---------------------------------------------------------------------------------------------------------------------
# Variance correction




def biased_variance(unbiased_var: Any, m: int) -> Any:
    """The inverse of `unbiased_variance`: ``unbiased_var * (m - 1) / m``.

    >>> biased_variance(4.0, 4)
    3.0
    """
    return unbiased_var / bessel_factor(m)


def initial_value_weight(torch_momentum: float | None, steps: int) -> float:
    """The weight that a moving average still gives its start value after `steps` updates.

    torch_momentum: weight of the new batch (PyTorch's convention); None is the cumulative average.
    Returns ``(1 - momentum) ** steps``; for the cumulative average, 1 before the first step and 0 after it.

    >>> initial_value_weight(0.5, 2), initial_value_weight(None, 3)
    (0.25, 0.0)
    """
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ValueError(f"steps must be a non-negative integer (e.g. num_batches_tracked), got {steps!r}")
    if torch_momentum is None:
        return 1.0 if steps == 0 else 0.0
    return (1.0 - _check_fraction(torch_momentum, "torch_momentum")) ** int(steps)


def _convert_running_var(running_var: Any, factor: float, torch_momentum: float | None, steps: int,
                         initial_var: float) -> Any:
    # The average is w0 * initial_var + sum_k w_k v_k with weights that do not depend on the data; only the batch
    # terms carry the correction, so it applies to everything but the start value's share.
    w0 = initial_value_weight(torch_momentum, steps)
    start = w0 * initial_var
    return start + (running_var - start) * factor


def to_biased_running_var(running_var: Any, m: int, torch_momentum: float | None, steps: int,
                          initial_var: float = 1.0) -> Any:
    """The moving variance that Keras 3 or Flax would hold, from PyTorch's running_var (an average of unbiased ones).

    running_var: PyTorch's buffer (float, array or tensor). m: values per channel in every batch (a constant batch).
    torch_momentum: the layer's momentum (None: cumulative average). steps: the number of updates, which PyTorch
    records as ``num_batches_tracked``. initial_var: the start value of both averages (1 in all frameworks).
    Exact: ``w0 * initial_var + (running_var - w0 * initial_var) * (m - 1) / m`` with ``w0 = (1 - momentum) ** steps``.
    For long training w0 vanishes and this is plain ``running_var * (m - 1) / m``.

    >>> round(to_biased_running_var(0.9 + 0.1 * 4.0, m=4, torch_momentum=0.1, steps=1), 12)
    1.2
    """
    return _convert_running_var(running_var, 1 / bessel_factor(m), torch_momentum, steps, initial_var)


def to_unbiased_running_var(moving_variance: Any, m: int, torch_momentum: float | None, steps: int,
                            initial_var: float = 1.0) -> Any:
    """The running_var that PyTorch would hold, from a Keras 3 or Flax moving variance (an average of biased ones).

    Arguments as in `to_biased_running_var`, whose inverse this is; pass the Keras momentum through
    `keras_to_torch_momentum`.

    >>> round(to_unbiased_running_var(0.99 + 0.01 * 3.0, m=4, torch_momentum=0.01, steps=1), 12)
    1.03
    """
    return _convert_running_var(moving_variance, bessel_factor(m), torch_momentum, steps, initial_var)


# ---------------------------------------------------------------------------------------------------------------------
# Caffe


def caffe_update(
    mean_blob: np.ndarray,
    variance_blob: np.ndarray,
    scale_factor: float,
    x: np.ndarray,
    moving_average_fraction: float = 0.999,
) -> tuple[np.ndarray, np.ndarray, float]:
    """One training step of Caffe's BatchNorm layer on its three blobs, in NumPy (``batch_norm_layer.cpp``).

    mean_blob, variance_blob: (C,), the unnormalized sums (blobs 0 and 1; both start at 0).
    scale_factor: blob 2, a single number that starts at 0. x: (N, C) or (N, C, *spatial).
    Caffe's rule, with lambda = moving_average_fraction and m values per channel::

        scale_factor  <- lambda * scale_factor + 1
        mean_blob     <- lambda * mean_blob + batch_mean
        variance_blob <- lambda * variance_blob + m / (m - 1) * batch_var      (batch_var biased)

    Returns the new (mean_blob, variance_blob, scale_factor). With use_global_stats, Caffe normalizes with the blobs
    divided by scale_factor: see `caffe_to_population_stats`.
    """
    lam = _check_fraction(moving_average_fraction, "moving_average_fraction")
    x = np.asarray(x, dtype=np.float64)
    if x.ndim < 2:
        raise ValueError(f"x must have shape (N, C) or (N, C, *spatial), got {x.ndim}-D x.shape={x.shape}")
    axes = tuple(reduction_dims(x.ndim))
    m = values_per_channel(x)
    batch_mean = x.mean(axis=axes)
    batch_var = ((x - per_channel(batch_mean, x.ndim)) ** 2).mean(axis=axes)
    correction = bessel_factor(m) if m > 1 else 1.0  # Caffe's bias_correction_factor
    return (
        lam * np.asarray(mean_blob, dtype=np.float64) + batch_mean,
        lam * np.asarray(variance_blob, dtype=np.float64) + correction * batch_var,
        lam * float(scale_factor) + 1.0,
    )


def caffe_to_population_stats(mean_blob: Any, variance_blob: Any, scale_factor: float) -> tuple[Any, Any]:
    """The (mean, variance) that Caffe normalizes with when ``use_global_stats: true``: the blobs / scale_factor.

    Like Caffe, a scale factor of 0 (a layer that never trained) gives statistics of 0.
    This is a bias-corrected moving average: the weights lambda^k are divided by their sum, so there is no start value.

    >>> caffe_to_population_stats(np.array([2.0]), np.array([8.0]), 2.0)
    (array([1.]), array([4.]))
    """
    scale_factor = float(scale_factor)
    if scale_factor < 0 or not math.isfinite(scale_factor):
        raise ValueError(f"scale_factor (Caffe's third blob) must be finite and >= 0, got {scale_factor!r}")
    inv = 0.0 if scale_factor == 0 else 1.0 / scale_factor
    return mean_blob * inv, variance_blob * inv


def caffe_to_torch_running_stats(
    mean_blob: Any,
    variance_blob: Any,
    scale_factor: float,
    moving_average_fraction: float = 0.999,
    initial_mean: float = 0.0,
    initial_var: float = 1.0,
) -> tuple[Any, Any, int | None]:
    """PyTorch's (running_mean, running_var, num_batches_tracked) after the same batches as a Caffe BatchNorm layer.

    The PyTorch layer has ``momentum = 1 - moving_average_fraction`` and starts from (initial_mean, initial_var);
    ``moving_average_fraction = 1`` corresponds to ``momentum=None`` (Caffe then keeps plain sums and a count).
    After t steps Caffe's scale factor is s = (1 - lambda^t) / (1 - lambda), so lambda^t = 1 - s (1 - lambda) recovers
    the start value's weight, and ``running = lambda^t * initial + (1 - lambda) * blob`` exactly.

    steps is None where float rounding has made the scale factor saturate at 1/(1 - lambda) (very long training): the
    start value's weight is then below rounding error and the statistics are still exact.

    >>> caffe_to_torch_running_stats(np.array([2.0]), np.array([6.0]), 1.0, 0.9)
    (array([0.2]), array([1.5]), 1)
    """
    lam = _check_fraction(moving_average_fraction, "moving_average_fraction")
    scale_factor = float(scale_factor)
    if lam == 1.0:
        steps = round(scale_factor)
        if steps == 0:
            return mean_blob * 0 + initial_mean, variance_blob * 0 + initial_var, 0
        return mean_blob / scale_factor, variance_blob / scale_factor, steps
    if lam == 0.0:
        raise ValueError("moving_average_fraction 0 keeps only the last batch; the number of steps cannot be recovered")
    max_scale = 1.0 / (1.0 - lam)
    if not 0.0 <= scale_factor < max_scale + 1e-9:
        raise ValueError(
            f"scale_factor must lie in [0, 1/(1 - moving_average_fraction)) = [0, {max_scale:g}), got {scale_factor!r}"
        )
    start_weight = max(0.0, 1.0 - scale_factor * (1.0 - lam))  # lambda^t
    steps: int | None
    if start_weight >= 1.0:
        steps = 0
    elif start_weight > 0.0:
        steps = round(math.log(start_weight) / math.log(lam))
    else:
        steps = None
    momentum = 1.0 - lam
    running_mean = start_weight * initial_mean + momentum * mean_blob
    running_var = start_weight * initial_var + momentum * variance_blob
    return running_mean, running_var, steps
