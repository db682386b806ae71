"""The motivation chapter's training runs of one network: Figure 1 of Ioffe & Szegedy (2015) at small scale
(`reproduce_figure1`: accuracy, and percentiles of one sigmoid's input), and the generalization gap on a small
training subset (`generalization_gap`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from bnnotes.experiments.data import Dataset, load_digits
from bnnotes.experiments.models import mlp
from bnnotes.experiments.motivation._checks import PLAIN_AND_BN, check_positive, check_seeds
from bnnotes.experiments.training import History, TrainConfig, evaluate, train

__all__ = [
    "PERCENTILES",
    "Figure1Config",
    "SigmoidInputTrace",
    "Figure1Run",
    "reproduce_figure1",
    "GapConfig",
    "GapRun",
    "generalization_gap",
]

#: The percentiles of Figure 1 (b, c) of Ioffe & Szegedy (2015).
PERCENTILES: tuple[float, float, float] = (15.0, 50.0, 85.0)


# ----------------------------------------------------------------------------------------------------------------------
# Figure 1 of the paper
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SigmoidInputTrace:
    """Percentiles of the inputs to the sigmoids of one hidden layer, measured on a held-out batch during training.

    steps: (T,) the training steps at which they were measured (0: before the first update).
    percentiles: (T, 3, units): the `PERCENTILES` (15th, 50th, 85th) over the held-out batch, for each unit.
    """

    steps: np.ndarray
    percentiles: np.ndarray

    def unit_drift(self, start: int = 0, end: int = -1) -> np.ndarray:
        """(units,): how far each unit's percentiles moved between measurements `start` and `end` (indices).

        The mean over the three percentiles of |P_q(end) - P_q(start)|, in the units of the sigmoid's input.
        """
        return np.abs(self.percentiles[end] - self.percentiles[start]).mean(axis=0)

    def drift(self, start: int = 0, end: int = -1) -> float:
        """The median over units of `unit_drift`: one number for how much the layer's input distribution moved."""
        return float(np.median(self.unit_drift(start, end)))

    def spread(self) -> np.ndarray:
        """(T,): the median over units of the 15th-to-85th percentile range, the width of the distribution."""
        return np.median(self.percentiles[:, 2] - self.percentiles[:, 0], axis=1)

    def typical_unit(self) -> int:
        """The unit whose drift is the median over units (the lower one for an even count): a typical sigmoid."""
        drift = self.unit_drift()
        return int(np.argsort(drift)[(drift.size - 1) // 2])


@dataclass(frozen=True)
class Figure1Run:
    """One training run of the Figure 1 network: its `History` (test accuracy against steps) and its trace."""

    norm: str
    seed: int
    history: History
    trace: SigmoidInputTrace


def _percentile_recorder(model: nn.Sequential, layer: int, held_out: Dataset, measure_every: int):
    """A `train` callback that records the percentiles of the inputs to hidden layer `layer`'s sigmoid.

    The held-out batch (the whole test split) goes through the network in training mode, so a BN layer normalizes it
    with its own statistics, as during training; `evaluate` restores the running statistics afterwards.
    """
    activation = [module for module in model.modules() if isinstance(module, nn.Sigmoid)][layer]
    quantiles = torch.tensor(PERCENTILES, device=held_out.x_test.device) / 100.0
    steps: list[int] = []
    rows: list[np.ndarray] = []
    captured: dict[str, torch.Tensor] = {}

    def capture(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        captured["z"] = inputs[0].detach()

    def callback(step: int, net: nn.Module) -> None:
        if step % measure_every:
            return
        handle = activation.register_forward_hook(capture)
        try:
            evaluate(net, held_out.x_test, held_out.y_test, eval_mode=False)
        finally:
            handle.remove()
        steps.append(step)
        rows.append(torch.quantile(captured["z"].float(), quantiles, dim=0).cpu().numpy())

    def trace() -> SigmoidInputTrace:
        return SigmoidInputTrace(np.array(steps), np.stack(rows))

    return callback, trace


@dataclass(frozen=True)
class Figure1Config:
    """`reproduce_figure1`: sigmoid layers of widths `hidden`, weights from N(0, init_std^2), plain SGD at `lr` on
    batches of `batch_size` for `steps` steps per seed; test accuracy every `eval_every` steps, the sigmoid inputs'
    percentiles every `measure_every` steps."""

    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 1000
    lr: float = 1.0
    init_std: float = 0.1
    batch_size: int = 60
    hidden: tuple[int, ...] = (100, 100, 100)
    measure_every: int = 10
    eval_every: int = 10


def reproduce_figure1(config: Figure1Config = Figure1Config(),
                      device: torch.device | str | None = None) -> dict[str, list[Figure1Run]]:
    """Figure 1 of Ioffe & Szegedy (2015) on digits: the same sigmoid network trained without and with BN.

    The network: fully connected sigmoid layers of widths `hidden`, weights from N(0, init_std^2), plain SGD at `lr`
    on mini-batches of `batch_size`, for `steps` steps per seed. The plain net has Linear biases; the BN net has BN
    (bnnotes' own) before every sigmoid, whose beta takes the bias's role.
    Test accuracy (eval mode) is recorded every `eval_every` steps; every `measure_every` steps the `PERCENTILES` of
    the inputs to the last hidden layer's sigmoids are measured on the test split (see `SigmoidInputTrace`).
    Returns {"none": [run per seed], "bn": [run per seed]}.

    >>> runs = reproduce_figure1(Figure1Config(seeds=(0,), steps=20, hidden=(8, 8), measure_every=10, eval_every=20))
    >>> runs["bn"][0].trace.percentiles.shape
    (3, 3, 8)
    """
    seeds = check_seeds(config.seeds)
    check_positive(steps=config.steps, lr=config.lr, init_std=config.init_std, measure_every=config.measure_every,
                    eval_every=config.eval_every)
    data = load_digits(device=device)
    runs: dict[str, list[Figure1Run]] = {}
    for norm in PLAIN_AND_BN:
        runs[norm] = []
        for seed in seeds:
            model = mlp(data.n_features, hidden=config.hidden, norm=norm, init_std=config.init_std, seed=seed)
            callback, trace = _percentile_recorder(model, len(config.hidden) - 1, data, config.measure_every)
            train_config = TrainConfig(steps=config.steps, batch_size=config.batch_size, lr=config.lr,
                                       eval_every=config.eval_every, seed=seed)
            history = train(model, data, train_config, callback=callback)
            runs[norm].append(Figure1Run(norm, seed, history, trace()))
    return runs




# ----------------------------------------------------------------------------------------------------------------------
# Regularization: the generalization gap
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GapRun:
    """Loss and accuracy on the training subset and on the test split (eval mode) during one run.

    steps: (T,); train_loss, train_acc, test_loss, test_acc: (T,) at those steps.
    """

    norm: str
    seed: int
    steps: np.ndarray
    train_loss: np.ndarray
    train_acc: np.ndarray
    test_loss: np.ndarray
    test_acc: np.ndarray

    @property
    def acc_gap(self) -> float:
        """Final training accuracy minus final test accuracy."""
        return float(self.train_acc[-1] - self.test_acc[-1])

    @property
    def loss_gap(self) -> float:
        """Final test loss minus final training loss."""
        return float(self.test_loss[-1] - self.train_loss[-1])


@dataclass(frozen=True)
class GapConfig:
    """`generalization_gap`: the Figure 1 network (sigmoid layers of widths `hidden`) trained on `n_train` training
    digits (drawn per seed) for `steps` steps of plain SGD at `lr`, weights from N(0, init_std^2), evaluated every
    `eval_every` steps."""

    n_train: int = 300
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 800
    lr: float = 1.0
    init_std: float = 0.1
    batch_size: int = 60
    eval_every: int = 20
    hidden: tuple[int, ...] = (100, 100, 100)


def generalization_gap(config: GapConfig = GapConfig(),
                       device: torch.device | str | None = None) -> dict[str, list[GapRun]]:
    """Train the Figure 1 network, plain and with BN, on a random subset of `n_train` training digits.

    With so few examples both nets fit the subset completely; the question is how far test accuracy and loss stay
    behind. Each seed draws its own subset (the same for both nets), initialization and batch order.
    Returns {"none": [GapRun per seed], "bn": [GapRun per seed]}.

    >>> gaps = generalization_gap(GapConfig(n_train=120, seeds=(0,), steps=20, eval_every=10, hidden=(8,)))
    >>> gaps["bn"][0].steps.tolist()
    [0, 10, 20]
    """
    seeds = check_seeds(config.seeds)
    n_train, steps, lr, init_std = config.n_train, config.steps, config.lr, config.init_std
    batch_size, eval_every = config.batch_size, config.eval_every
    check_positive(steps=steps, lr=lr, init_std=init_std, eval_every=eval_every)
    full = load_digits(device=device)
    if not batch_size <= n_train <= full.x_train.shape[0]:
        raise ValueError(f"n_train must be in [batch_size={batch_size}, {full.x_train.shape[0]}], got {n_train}")
    runs: dict[str, list[GapRun]] = {norm: [] for norm in PLAIN_AND_BN}
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        subset = torch.randperm(full.x_train.shape[0], generator=generator)[:n_train].to(full.x_train.device)
        data = Dataset(full.x_train[subset], full.y_train[subset], full.x_test, full.y_test)
        for norm in PLAIN_AND_BN:
            model = mlp(data.n_features, hidden=config.hidden, norm=norm, init_std=init_std, seed=seed)
            on_train: list[tuple[float, float]] = []

            def callback(step: int, net: nn.Module) -> None:
                if step % eval_every == 0 or step == steps:
                    on_train.append(evaluate(net, data.x_train, data.y_train))

            train_config = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, eval_every=eval_every, seed=seed)
            history = train(model, data, train_config, callback=callback)
            train_loss, train_acc = np.array(on_train).T
            runs[norm].append(GapRun(norm, seed, np.array(history.step), train_loss, train_acc,
                                     np.array(history.test_loss), np.array(history.test_acc)))
    return runs
