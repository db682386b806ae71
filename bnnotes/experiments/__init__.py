"""Experiments of the course: offline data, models, the training loop and measurements.

Shared pieces live in `data`, `models` and `training`; each chapter's experiments live in a module of their own
(`motivation`, `derivation`, `inference`, `pitfalls`, `landscape`, `distributed`), built on the shared ones.
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
