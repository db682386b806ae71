"""Checkers for the course's exercises: they say what is wrong, not only that something is.

Each ``check_*`` function takes the learner's function, runs it on a few seeded random cases and compares the answer
with a bnnotes reference (`bnnotes.numpy_bn`, `bnnotes.numpy_norms`, `bnnotes.numpy_variants`). The cases are chosen
so that the mistakes people really make give clearly different answers: a small batch, so that the biased and
unbiased variances differ; one case with a large eps, so that eps inside and outside the square root differ; a
non-uniform upstream gradient; gamma != 1; means far from 0; and N != D, so that the axes cannot be confused.

On success a checker prints one line. On failure it raises ``AssertionError`` with the case that failed, expected
against got (a few numbers), and, when the wrong answer equals a known mistake (computed and compared), a hint that
names the mistake. A non-callable answer is a TypeError.

An exercise that is not attempted yet is not a failure: in the Colab edition each solution is a stub whose body raises
``NotImplementedError("Hint: ...")``, and a predicted value is ``None``. A checker given ``None``, or a function that
raises ``NotImplementedError``, prints that the exercise is not attempted yet and returns ``None`` without raising, so
that "Run all" runs through a notebook whose exercises are still open.

Layout: `_harness` runs the cases of any checker (call, validate, compare, name the mistake); `_catalogue` holds the
test data and the wrong variants of BN that several checkers share; one module per chapter holds that chapter's
checkers, each a case generator with its catalogue of mistakes; `prediction` grades predictions in every chapter.

>>> def my_scaled_gradient(grad_w, c):
...     raise NotImplementedError("Hint: differentiate L(c W) = L(W) with respect to W.")
>>> check_scale_invariance(my_scaled_gradient)  # doctest: +NORMALIZE_WHITESPACE
check_scale_invariance: not attempted yet (your function raises NotImplementedError). Hint: differentiate
L(c W) = L(W) with respect to W. Write it, then run this cell again.
>>> check_scale_invariance(lambda grad_w, c: grad_w / c)
check_scale_invariance: all 4 cases match the reference. Well done.
"""

from __future__ import annotations

from bnnotes.exercises.data_parallel import check_ghost_batch_norm, check_merge_statistics
from bnnotes.exercises.derivation import (
    check_backward,
    check_batch_of_two,
    check_conv_backward,
    check_conv_forward,
    check_forward,
)
from bnnotes.exercises.inference import (
    check_bessel_factor,
    check_caffe_scale_factor,
    check_fold,
    check_momentum_conversion,
    check_running_stats,
)
from bnnotes.exercises.landscape import check_gradient_projection, check_scale_invariance
from bnnotes.exercises.motivation import check_whitening
from bnnotes.exercises.pitfalls import check_renorm_correction, check_renorm_forward
from bnnotes.exercises.prediction import check_prediction
from bnnotes.exercises.real_networks import check_layer_norm, check_residual_variance

# The NumPy references under their former names here, for chapters that used them (one home: bnnotes.numpy_variants).
from bnnotes.numpy_variants import ghost_batch_norm as ghost_batch_norm_reference
from bnnotes.numpy_variants import renorm_forward as renorm_forward_reference
from bnnotes.numpy_variants import zca_whitening as zca_whitening_reference

__all__ = [
    # motivation
    "check_whitening",
    # derivation
    "check_forward",
    "check_backward",
    "check_conv_forward",
    "check_conv_backward",
    "check_batch_of_two",
    # inference
    "check_running_stats",
    "check_bessel_factor",
    "check_caffe_scale_factor",
    "check_fold",
    "check_momentum_conversion",
    # pitfalls
    "check_renorm_correction",
    "check_renorm_forward",
    # data_parallel
    "check_ghost_batch_norm",
    "check_merge_statistics",
    # landscape
    "check_gradient_projection",
    "check_scale_invariance",
    # real_networks
    "check_layer_norm",
    "check_residual_variance",
    # every chapter
    "check_prediction",
    "renorm_forward_reference",
    "ghost_batch_norm_reference",
    "zca_whitening_reference",
]
