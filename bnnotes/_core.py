"""The shared core of bnnotes: the small operations every implementation uses, spelled once.

Every module of bnnotes (NumPy and PyTorch, layers, experiments and checkers) imports these public names instead of
re-writing them. This module imports nothing of bnnotes. See ARCHITECTURE.md for the layers and what may import what.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["bessel_factor", "unbiased_variance", "ema_"]


def bessel_factor(m: Any) -> float:
    """Bessel's correction m / (m - 1) for m values per channel (N, or N * H * W for images).

    Raises TypeError for a non-integer m and ValueError for m < 2 (one value has no unbiased variance).

    >>> bessel_factor(4)
    1.3333333333333333
    """
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)):
        raise TypeError(f"m (values per channel in a batch) must be an integer, got {type(m).__name__} {m!r}")
    if m < 2:
        raise ValueError(f"m (values per channel in a batch) must be at least 2 for the m/(m-1) correction, got {m}")
    return int(m) / (int(m) - 1)


def unbiased_variance(biased_var: Any, m: Any) -> Any:
    """The unbiased variance from the biased one of m values: ``biased_var * m / (m - 1)``.

    biased_var: a float, NumPy array or torch tensor (any shape). m: values per channel.

    >>> unbiased_variance(3.0, 4)
    4.0
    """
    return biased_var * bessel_factor(m)


def ema_(running: Any, batch: Any, momentum: float) -> Any:
    """The running-average update of PyTorch's convention, in place: ``running = (1 - momentum) * running +
    momentum * batch`` (momentum is the weight of the NEW value; Keras's momentum is 1 - this one).

    running: a torch tensor or NumPy array, updated in place and returned; batch: the same shape (a tensor of another
    dtype is cast to running's). Written as a step towards the batch, ``running += momentum * (batch - running)``.

    >>> import numpy as np
    >>> ema_(np.array([0.0, 10.0]), np.array([1.0, 0.0]), 0.1).tolist()
    [0.1, 9.0]
    """
    if isinstance(running, np.ndarray):
        running += momentum * (np.asarray(batch, dtype=running.dtype) - running)
        return running
    return running.lerp_(batch.to(running.dtype), momentum)
