"""Experiments of the motivation chapter: why normalize, and what BN promises (Ioffe & Szegedy, 2015).

Each function runs one experiment of ``book/motivation.md``: it takes one frozen Config dataclass that holds every
constant and seed, and returns plain numbers (NumPy arrays in small dataclasses) that the chapter plots and asserts
on. Everything is built on the shared pieces: `mlp`, `train`, `TrainConfig`, `evaluate`, `steps_to_accuracy` and
`load_digits`; models use bnnotes' own BN.

- `gradient_norms_at_init`: how the gradient shrinks layer by layer through sigmoids, with and without BN.
- `backprop_gains_at_init`: the factor by which one plain sigmoid layer scales the backpropagated gradient, against the
  operator-norm bound and the typical-vector estimate of eq-motivation-backprop, and whether the units saturate.
- `normalization_cost`: wall time of full whitening against per-feature standardization, as the width grows.
- `pre_bn_bias_effect`: a bias before BN changes nothing and receives a zero gradient.
- `reproduce_figure1`: Figure 1 of the paper at small scale (accuracy, and percentiles of one sigmoid's input).
- `learning_rate_sweep`, `init_scale_sweep`: steps to a target accuracy across learning rates and initial scales.
- `init_scheme_steps`: the same measure for the standard fan-based initializations (Glorot, Kaiming).
- `generalization_gap`: train against test accuracy and loss on a small training subset.
- `saturating_nonlinearities`: a deep sigmoid net against a deep ReLU net, with and without BN.
"""

from bnnotes.experiments.motivation.at_init import (
    BackpropGains,
    BackpropGainsConfig,
    BiasAbsorption,
    BiasAbsorptionConfig,
    GradientNormsConfig,
    NormalizationCost,
    NormalizationCostConfig,
    backprop_gains_at_init,
    gradient_norms_at_init,
    normalization_cost,
    pre_bn_bias_effect,
)
from bnnotes.experiments.motivation.figure1 import (
    PERCENTILES,
    Figure1Config,
    Figure1Run,
    GapConfig,
    GapRun,
    SigmoidInputTrace,
    generalization_gap,
    reproduce_figure1,
)
from bnnotes.experiments.motivation.sweeps import (
    INIT_SCHEMES,
    InitScaleSweepConfig,
    InitSchemes,
    InitSchemesConfig,
    LearningRateSweepConfig,
    SaturationConfig,
    SaturationResult,
    Sweep,
    apply_init_scheme,
    init_scale_sweep,
    init_scheme_steps,
    learning_rate_sweep,
    saturating_nonlinearities,
)

__all__ = [
    "PERCENTILES",
    "INIT_SCHEMES",
    "GradientNormsConfig",
    "gradient_norms_at_init",
    "BackpropGainsConfig",
    "BackpropGains",
    "backprop_gains_at_init",
    "NormalizationCostConfig",
    "NormalizationCost",
    "normalization_cost",
    "BiasAbsorptionConfig",
    "BiasAbsorption",
    "pre_bn_bias_effect",
    "Figure1Config",
    "SigmoidInputTrace",
    "Figure1Run",
    "reproduce_figure1",
    "Sweep",
    "LearningRateSweepConfig",
    "learning_rate_sweep",
    "InitScaleSweepConfig",
    "init_scale_sweep",
    "InitSchemesConfig",
    "InitSchemes",
    "init_scheme_steps",
    "apply_init_scheme",
    "GapConfig",
    "GapRun",
    "generalization_gap",
    "SaturationConfig",
    "SaturationResult",
    "saturating_nonlinearities",
]
