"""Experiments of the course: offline data, models, the training loop and measurements.

Shared pieces, in the order a learner meets them:

- `data`: scikit-learn's digits and synthetic data, offline.
- `models`: `mlp` with a pluggable normalizer (`make_norm`), `hidden_linears`.
- `training`: the one training loop (`train`, `TrainConfig`, `evaluate`, `steps_to_accuracy`).
- `stats`: the statistics of BN-like layers: find them (`norm_layers`), run in training mode without touching their
  buffers (`frozen_buffers`), recompute Algorithm 2's population statistics (`population_statistics`), swap and
  compare them.
- `launch`: the process launcher of the data-parallel experiments.
- `ablations`: the open explorations of the exercises (mean-only BN, frozen gamma/beta, BN in some layers, ...).

One module (or package) per chapter, named like the chapter, built on the shared ones: `motivation`, `derivation`,
`inference`, `pitfalls`, `landscape`, `real_networks`, `data_parallel`. Each experiment takes one frozen Config
dataclass that holds every seed and constant, and returns a result dataclass. Timing goes through
`bnnotes.timing.median_interleaved`.
"""

from bnnotes.experiments.data import Dataset, batch_indices, load_digits
from bnnotes.experiments.models import make_norm, mlp
from bnnotes.experiments.training import History, TrainConfig, evaluate, steps_to_accuracy, train

__all__ = [
    "Dataset",
    "History",
    "TrainConfig",
    "batch_indices",
    "evaluate",
    "load_digits",
    "make_norm",
    "mlp",
    "steps_to_accuracy",
    "train",
]
