"""Offline datasets for the experiments: scikit-learn's bundled digits and synthetic data. Nothing is downloaded."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

__all__ = ["Dataset", "load_digits", "batch_indices"]


@dataclass(frozen=True)
class Dataset:
    """A classification split as tensors on one device.

    x_train: (n_train, n_features) float32, y_train: (n_train,) int64; likewise for the test split.
    """

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor

    @property
    def n_features(self) -> int:
        return self.x_train.shape[1]

    @property
    def n_classes(self) -> int:
        return int(self.y_train.max().item()) + 1

    def to(self, device: torch.device | str) -> "Dataset":
        return Dataset(*(t.to(device) for t in (self.x_train, self.y_train, self.x_test, self.y_test)))


@lru_cache(maxsize=4)
def _digits_arrays(test_size: float, seed: int) -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        bunch.data, bunch.target, test_size=test_size, stratify=bunch.target, random_state=seed
    )
    # Standardize with the training split's statistics only; constant pixels get scale 1.
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    std[std == 0] = 1.0
    return (x_train - mean) / std, y_train, (x_test - mean) / std, y_test


def load_digits(test_size: float = 0.3, seed: int = 0, device: torch.device | str | None = None) -> Dataset:
    """scikit-learn's 8x8 digits (1797 images, 10 classes), standardized, in a stratified train/test split.

    The default split has 1257 training and 540 test images with 64 features each. Ships with scikit-learn: no download.

    >>> data = load_digits()
    >>> tuple(data.x_train.shape), tuple(data.x_test.shape)
    ((1257, 64), (540, 64))
    """
    if not 0.0 < test_size < 1.0:
        raise ValueError(f"test_size must be in (0, 1), got {test_size!r}")
    x_train, y_train, x_test, y_test = _digits_arrays(float(test_size), int(seed))
    data = Dataset(
        torch.as_tensor(x_train, dtype=torch.float32),
        torch.as_tensor(y_train, dtype=torch.long),
        torch.as_tensor(x_test, dtype=torch.float32),
        torch.as_tensor(y_test, dtype=torch.long),
    )
    return data.to(device) if device is not None else data


def batch_indices(
    labels: Tensor, batch_size: int, generator: torch.Generator, order: str = "shuffle"
) -> list[Tensor]:
    """One epoch of mini-batch index tensors (on the CPU), dropping a last incomplete batch.

    order: ``"shuffle"`` draws a fresh random permutation (i.i.d.-like batches); ``"sorted"`` sorts the examples by
    label, so each batch holds one or two classes (a non-i.i.d. stream; the batch order itself is shuffled).
    """
    n = labels.shape[0]
    if batch_size < 1 or batch_size > n:
        raise ValueError(f"batch_size must be in [1, {n}] for {n} examples, got {batch_size}")
    if order == "shuffle":
        perm = torch.randperm(n, generator=generator)
    elif order == "sorted":
        # Shuffle within each class first so that the sorted batches differ from epoch to epoch.
        perm = torch.randperm(n, generator=generator)
        perm = perm[torch.argsort(labels.cpu()[perm], stable=True)]
    else:
        raise ValueError(f"order must be 'shuffle' or 'sorted', got {order!r}")
    batches = list(perm[: n - n % batch_size].split(batch_size))
    if order == "sorted":
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return batches
