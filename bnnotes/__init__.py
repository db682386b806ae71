"""bnnotes: Batch Normalization, end to end.

The companion library of the bnnotes course. Its modules, in the order a learner meets them (ARCHITECTURE.md says what
may import what):

- ``bnnotes.numpy_bn``: the reference implementation in NumPy (forward, staged and compact backward, inference, a
  stateful layer).
- ``bnnotes.torch_bn``: the same in PyTorch with the closed-form backward; drop-in ``BatchNorm{1,2,3}d`` that are
  torch's own classes computing with bnnotes.
- ``bnnotes.conventions``: the running-statistics conventions of PyTorch, Keras and Caffe, and conversions between them.
- ``bnnotes.folding``: folding eval-mode BN into the preceding Linear or convolution, for deployment.
- ``bnnotes.renorm``: Batch Renormalization (Ioffe, 2017).
- ``bnnotes.sync``: synchronized BN over ``torch.distributed``, on any backend.
- ``bnnotes.ghost``: Ghost BN, BN over virtual sub-batches.
- ``bnnotes.lp_norm``: ℓp batch normalization (Santurkar et al., 2018).
- ``bnnotes.numpy_norms``: BN's successors in NumPy: LayerNorm, RMSNorm, GroupNorm, InstanceNorm.
- ``bnnotes.numpy_variants``: NumPy references for BN's variants: ZCA whitening, Batch Renorm, Ghost BN, the merge of
  per-rank statistics, folding (what the exercise checkers compare with).
- ``bnnotes.variants``: teaching variants of BN (moving averages in training, detached or frozen statistics, noise).
- ``bnnotes.convert``: every layer swap: torch's BN to bnnotes' and back, to synchronized BN, frozen BN.
- ``bnnotes.experiments``: offline data, models, training loops and one module of measurements per chapter.
- ``bnnotes.exercises``: checkers for the exercises, one module per chapter.
- ``bnnotes.notebook``: what the chapters need as notebooks: ``glue`` for numbers in the prose, progress in Colab.
- ``bnnotes.plotting``: the one figure style of the book.
- ``bnnotes.timing``: the one interleaved-median timer, with device synchronization.
- ``bnnotes.bench``: bnnotes' BN against torch's native kernels (``python -m bnnotes.bench``).
- ``bnnotes._core``: the shared kernel every implementation above imports: statistics, checks, the running-average
  update, the closed-form backward and the base class of the layers with running statistics.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["device", "__version__"]


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
