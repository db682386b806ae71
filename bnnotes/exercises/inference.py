"""Checkers for the chapter "Inference: from batch to population statistics" (inference.md): the running averages,
their corrections (Bessel's m/(m-1) and Caffe's scale factor), and folding BN into the layer before it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from bnnotes import numpy_bn, numpy_variants
from bnnotes._core import bessel_factor
from bnnotes.exercises._catalogue import HINT_EPS_OUTSIDE, rng_affine, rng_features
from bnnotes.exercises._harness import Case, NotAttempted, Output, is_real_number, reports_not_attempted, run_cases

__all__ = ["check_running_stats", "check_fold", "check_momentum_conversion", "check_bessel_factor",
           "check_caffe_scale_factor"]


# ----------------------------------------------------------------------------------------------------------------------
# The running averages
# ----------------------------------------------------------------------------------------------------------------------

_HINT_KERAS = ("this matches the Keras/TensorFlow convention new = momentum * old + (1 - momentum) * batch: in "
               "PyTorch, momentum is the weight of the NEW batch, new = (1 - momentum) * old + momentum * batch")


def _running_stats_case(shape: tuple[int, int], seed: int, momentum: float, dtype: type = np.float64) -> Case:
    rng = np.random.default_rng(seed)
    x = rng_features(rng, *shape).astype(dtype)
    running_mean = rng.uniform(-3.0, 3.0, size=shape[1]).astype(dtype)
    running_var = rng.uniform(0.5, 5.0, size=shape[1]).astype(dtype)
    layer = numpy_bn.BatchNorm(shape[1], momentum=momentum)  # its buffers are float64: the reference, then cast
    layer.running_mean, layer.running_var = running_mean.astype(np.float64), running_var.astype(np.float64)
    layer.forward(x)
    batch_mean, unbiased, biased = x.mean(0), x.var(0, ddof=1), x.var(0)
    axis_hint = {(shape[0],): "this has one entry per example: average over the batch, axis=0"}
    mean_mistakes = [
        (_HINT_KERAS, lambda: momentum * running_mean + (1 - momentum) * batch_mean),
        ("the running mean was not updated: you returned the old value", lambda: running_mean),
        ("this is the batch mean alone: blend it into the running mean with the momentum", lambda: batch_mean),
    ]
    var_mistakes = [
        (_HINT_KERAS, lambda: momentum * running_var + (1 - momentum) * unbiased),
        (_HINT_KERAS + "; also, PyTorch's running variance uses the UNBIASED batch variance (Keras's uses the biased)",
         lambda: momentum * running_var + (1 - momentum) * biased),
        ("this matches a running variance fed with the BIASED batch variance: PyTorch feeds it the UNBIASED one, "
         "x.var(axis=0, ddof=1) = biased * N / (N - 1)", lambda: (1 - momentum) * running_var + momentum * biased),
        ("this matches a running average of the standard deviation: it averages the variance",
         lambda: (1 - momentum) * running_var + momentum * np.sqrt(unbiased)),
        ("the running variance was not updated: you returned the old value", lambda: running_var),
        ("this is the batch variance alone: blend it into the running variance with the momentum", lambda: unbiased),
    ]
    dtype_note = "" if dtype == np.float64 else ", dtype=float32"
    return Case(f"x.shape={shape}, seed={seed}, momentum={momentum}{dtype_note}",
                (running_mean, running_var, x, momentum),
                (Output("new_mean", layer.running_mean.astype(dtype), mean_mistakes, axis_hint),
                 Output("new_var", layer.running_var.astype(dtype), var_mistakes, axis_hint)))


@reports_not_attempted
def check_running_stats(fn: Callable[..., tuple[np.ndarray, np.ndarray]]) -> None:
    """Check ``fn(running_mean, running_var, x, momentum) -> (new_mean, new_var)`` in PyTorch's convention.

    new = (1 - momentum) * old + momentum * batch, where the batch variance is the UNBIASED one (divide by N - 1).
    running_mean, running_var: (D,); x: (N, D); the new values in x's dtype (one case is float32). Reference:
    `bnnotes.numpy_bn.BatchNorm`.

    >>> def my_update(running_mean, running_var, x, momentum):
    ...     new_mean = (1 - momentum) * running_mean + momentum * x.mean(axis=0)
    ...     new_var = (1 - momentum) * running_var + momentum * x.var(axis=0, ddof=1)
    ...     return new_mean, new_var
    >>> check_running_stats(my_update)
    check_running_stats: all 4 cases match the reference. Well done.
    """
    specs = [((4, 3), 0, 0.1), ((3, 5), 1, 0.3), ((8, 2), 2, 0.05), ((10, 4), 3, 0.1, np.float32)]
    run_cases(fn, "check_running_stats", "fn(running_mean, running_var, x, momentum) -> (new_mean, new_var)",
              [_running_stats_case(*spec) for spec in specs])


@reports_not_attempted
def check_momentum_conversion(fn: Callable[[float], float]) -> None:
    """Check ``fn(keras_momentum) -> torch_momentum``.

    Keras's momentum is the weight of the OLD running value, PyTorch's the weight of the NEW batch: they sum to 1.

    >>> check_momentum_conversion(lambda keras_momentum: 1.0 - keras_momentum)
    check_momentum_conversion: all 4 cases match the reference. Well done.
    """
    checker = "check_momentum_conversion"
    if not callable(fn):
        raise TypeError(f"{checker} expects your function fn(keras_momentum) -> torch_momentum, got "
                        f"{type(fn).__name__} {fn!r:.60}")
    values = [0.99, 0.9, 0.999, 0.75]
    for index, keras_momentum in enumerate(values):
        header = f"{checker} failed on case {index + 1} of {len(values)} (keras_momentum={keras_momentum})"
        try:
            out = fn(keras_momentum)
        except NotImplementedError as error:  # the Colab edition's stub: not attempted yet, not wrong
            raise NotAttempted(str(error)) from error
        except Exception as error:
            raise AssertionError(f"{header}:\n  your function raised {type(error).__name__}: {error}") from error
        if not is_real_number(out):
            note = " (did you forget a `return`?)" if out is None else ""
            raise AssertionError(f"{header}:\n  expected a real number, got {type(out).__name__} {out!r:.60}{note}")
        expected, got = 1.0 - keras_momentum, float(out)
        if not np.isclose(got, expected, rtol=1e-9, atol=1e-12):
            lines = [f"{header}:", f"  expected torch momentum {expected:.6g}, got {got:.6g}"]
            if np.isclose(got, keras_momentum):
                lines.append("  Hint: the conventions differ: Keras's momentum weights the OLD running value "
                             "(new = m * old + (1 - m) * batch), PyTorch's the NEW batch "
                             "(new = (1 - m) * old + m * batch)")
            elif got < 0 or got > 1:
                lines.append("  Hint: a momentum is a weight between 0 and 1")
            raise AssertionError("\n".join(lines))
    print(f"{checker}: all {len(values)} cases match the reference. Well done.")


# ----------------------------------------------------------------------------------------------------------------------
# Derive: Bessel's correction and Caffe's scale factor
# ----------------------------------------------------------------------------------------------------------------------


def _bessel_case(m: int) -> Case:
    mistakes = [
        ("this matches (m - 1) / m, the factor by which the biased variance falls short, E[biased var] = "
         "(m - 1) / m * sigma^2: the correction undoes it, its inverse", lambda: (m - 1) / m),
        ("this matches m / (m + 1): the mean of the batch uses up one degree of freedom, so the squared "
         "deviations sum to (m - 1) sigma^2 in expectation, not (m + 1) sigma^2", lambda: m / (m + 1)),
        ("this matches (m + 1) / m: the squared deviations from the batch mean sum to (m - 1) sigma^2 in "
         "expectation, so the biased variance (their sum / m) needs the factor m / (m - 1)", lambda: (m + 1) / m),
        ("this matches 1, no correction: the biased batch variance is too small on average, because the batch "
         "mean is closer to the batch than the true mean is: E[biased var] = (m - 1) / m * sigma^2", lambda: 1.0),
    ]
    return Case(f"m={m}", (m,), (Output("c(m)", np.float64(bessel_factor(m)), mistakes, scalar=True),))


@reports_not_attempted
def check_bessel_factor(fn: Callable[[int], float]) -> None:
    """Check ``fn(m) -> c``: the factor c(m) with E[c * biased batch variance] = sigma^2 for a batch of m values.

    The biased variance of m independent values, sum (x_i - mean)^2 / m, has expectation (m - 1) / m * sigma^2, so
    c(m) = m / (m - 1) (Bessel's correction). m: an int >= 2; c: a real number. Reference:
    `bnnotes._core.bessel_factor`.

    >>> check_bessel_factor(lambda m: m / (m - 1))
    check_bessel_factor: all 4 cases match the reference. Well done.
    """
    run_cases(fn, "check_bessel_factor", "fn(m) -> c", [_bessel_case(m) for m in (2, 3, 8, 50)])


def _caffe_case(momentum: float, t: int) -> Case:
    def after(steps: int) -> float:
        return (1.0 - momentum**steps) / (1.0 - momentum)

    mistakes = [
        ("this matches momentum**t, the weight left on the initial s_0: s_t = 1 + momentum + ... + momentum**(t-1), "
         "a geometric sum", lambda: momentum**t),
        ("this matches 1 / (1 - momentum), the limit as t -> infinity: after t updates the geometric sum has only t "
         "terms, (1 - momentum**t) / (1 - momentum)", lambda: 1.0 / (1.0 - momentum)),
        ("this matches t, the sum of t ones: that is momentum = 1; with momentum < 1 each older 1 is multiplied by "
         "momentum once more per update", lambda: float(t)),
        ("this matches the recursion one step too far, s_(t+1): s_1 = momentum * 0 + 1 = 1, so s_t has t terms, "
         "(1 - momentum**t) / (1 - momentum)", lambda: after(t + 1)),
        ("this matches the recursion one step short, s_(t-1): s_1 = momentum * 0 + 1 = 1, so s_t has t terms, "
         "(1 - momentum**t) / (1 - momentum)", lambda: after(t - 1)),
    ]
    return Case(f"momentum={momentum}, t={t}", (momentum, t), (Output("s_t", np.float64(after(t)), mistakes,
                                                                      scalar=True),))


@reports_not_attempted
def check_caffe_scale_factor(fn: Callable[[float, int], float]) -> None:
    """Check ``fn(momentum, t) -> s_t``: Caffe's scale factor after t updates, in closed form.

    Caffe's BatchNorm stores running SUMS, s_t = momentum * s_(t-1) + 1 from s_0 = 0 (and the statistics likewise),
    and divides its stored statistics by s_t at inference. In closed form s_t = (1 - momentum**t) / (1 - momentum),
    a geometric sum. momentum: a float in [0, 1); t: an int >= 1; s_t: a real number.

    >>> check_caffe_scale_factor(lambda momentum, t: (1 - momentum**t) / (1 - momentum))
    check_caffe_scale_factor: all 5 cases match the reference. Well done.
    """
    specs = [(0.9, 1), (0.5, 3), (0.999, 10), (0.0, 4), (0.99, 100)]
    run_cases(fn, "check_caffe_scale_factor", "fn(momentum, t) -> s_t", [_caffe_case(*spec) for spec in specs])


# ----------------------------------------------------------------------------------------------------------------------
# Folding BN into the Linear layer before it
# ----------------------------------------------------------------------------------------------------------------------


def _fold_case(shape: tuple[int, int], seed: int, eps: float, dtype: type = np.float64) -> Case:
    rng = np.random.default_rng(seed)
    out_features, in_features = shape
    weight = rng.standard_normal(shape)
    bias = rng.uniform(-2.0, 2.0, size=out_features)
    gamma, beta = rng_affine(rng, out_features)
    running_mean = rng.uniform(-4.0, 4.0, size=out_features)
    running_var = np.exp(rng.uniform(np.log(0.05), np.log(5.0), size=out_features))
    weight, bias, gamma, beta, running_mean, running_var = (
        v.astype(dtype) for v in (weight, bias, gamma, beta, running_mean, running_var))
    args = (weight, bias, gamma, beta, running_mean, running_var, eps)
    weight_ref, bias_ref = numpy_variants.fold_linear(*args)
    scale = gamma / np.sqrt(running_var + eps)
    std_outside = gamma / (np.sqrt(running_var) + eps)
    weight_mistakes = [
        ("the weight is unscaled: BN multiplies each output feature by gamma / sqrt(running_var + eps), so "
         "folded_weight = weight * scale[:, None]", lambda: weight),
        ("this matches scaling by gamma / (running_var + eps): divide by the standard deviation sqrt(running_var "
         "+ eps)", lambda: weight * (gamma / (running_var + eps))[:, None]),
        ("this matches scaling by 1 / sqrt(running_var + eps) without gamma",
         lambda: weight * (scale / gamma)[:, None]),
        (HINT_EPS_OUTSIDE, lambda: weight * std_outside[:, None]),
    ]
    bias_mistakes = [
        ("the bias is not shifted by the running mean: folded_bias = (bias - running_mean) * scale + beta",
         lambda: bias * scale + beta),
        ("this matches (bias - running_mean) * scale without beta: add BN's shift beta",
         lambda: (bias - running_mean) * scale),
        ("this matches bias - running_mean * scale + beta: the layer's own bias is scaled too, "
         "(bias - running_mean) * scale + beta", lambda: bias - running_mean * scale + beta),
        ("the bias is unchanged: it must go through BN too, (bias - running_mean) * scale + beta", lambda: bias),
        (HINT_EPS_OUTSIDE, lambda: (bias - running_mean) * std_outside + beta),
    ]
    layout = {shape[::-1]: "weight is (out, in), like nn.Linear's: keep that layout"}
    dtype_note = "" if dtype == np.float64 else ", dtype=float32"
    return Case(f"weight.shape={shape}, seed={seed}, eps={eps}{dtype_note}", args,
                (Output("folded_weight", weight_ref, weight_mistakes, layout),
                 Output("folded_bias", bias_ref, bias_mistakes)),
                exception_hint="weight is (out, in) and the BN scale has one entry per OUTPUT feature: "
                               "weight * scale[:, None]")


@reports_not_attempted
def check_fold(fn: Callable[..., tuple[np.ndarray, np.ndarray]]) -> None:
    """Check ``fn(weight, bias, gamma, beta, running_mean, running_var, eps) -> (folded_weight, folded_bias)``.

    The model is a Linear layer, y = x @ weight.T + bias with weight (out, in), followed by BN in eval mode over its
    `out` features; the folded Linear computes the same function in one layer:
    scale = gamma / sqrt(running_var + eps), folded_weight = weight * scale[:, None],
    folded_bias = (bias - running_mean) * scale + beta, in weight's dtype (one case is float32). Reference:
    `bnnotes.numpy_variants.fold_linear` (tested to equal the Linear layer composed with `bnnotes.numpy_bn.inference`).

    >>> def my_fold(weight, bias, gamma, beta, running_mean, running_var, eps):
    ...     scale = gamma / np.sqrt(running_var + eps)
    ...     return weight * scale[:, None], (bias - running_mean) * scale + beta
    >>> check_fold(my_fold)
    check_fold: all 4 cases match the reference. Well done.
    """
    specs = [((5, 3), 0, 1e-5), ((2, 6), 1, 0.1), ((4, 7), 2, 1e-3), ((6, 4), 3, 1e-5, np.float32)]
    run_cases(fn, "check_fold",
              "fn(weight, bias, gamma, beta, running_mean, running_var, eps) -> (folded_weight, folded_bias)",
              [_fold_case(*spec) for spec in specs])
