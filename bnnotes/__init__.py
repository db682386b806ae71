"""bnnotes: Batch Normalization, end to end.

The companion library of the bnnotes course. Submodules, from the math up:

- ``bnnotes.numpy_bn``: the reference implementation in NumPy (forward, backward, inference, a stateful layer).
- ``bnnotes.torch_bn``: the same in PyTorch with a hand-written backward, drop-in ``BatchNorm{1,2,3}d``,
  Batch Renormalization and synchronized BN.
- ``bnnotes.numpy_norms``: BN's successors in NumPy, in numpy_bn's style: LayerNorm, RMSNorm, GroupNorm, InstanceNorm.
- ``bnnotes.experiments``: offline data, models, training loops and measurements used by the chapters.
- ``bnnotes.plotting``: the one figure style of the book.
- ``bnnotes.exercises``: checkers for the exercises.
- ``bnnotes.notebook``: what the chapters need as notebooks: ``glue`` for numbers in the prose, progress in Colab.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["device", "seed_everything", "__version__"]


def device(prefer: str | None = None):
    """The best available torch device: CUDA, then Apple's MPS, then the CPU.

    prefer: optionally force one of ``"cuda"``, ``"mps"`` or ``"cpu"``; a ValueError names an unavailable one.
    Returns a ``torch.device``.

    >>> import bnnotes
    >>> bnnotes.device().type in {"cuda", "mps", "cpu"}
    True
    """
    import torch

    available = ["cpu"]
    if torch.backends.mps.is_available():
        available.insert(0, "mps")
    if torch.cuda.is_available():
        available.insert(0, "cuda")
    if prefer is None:
        return torch.device(available[0])
    if prefer not in available:
        raise ValueError(f"device {prefer!r} was requested but only {available} are available here")
    return torch.device(prefer)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (for notebooks; library code takes explicit seeds)."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
