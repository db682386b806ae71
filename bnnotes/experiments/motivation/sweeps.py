"""The motivation chapter's sweeps: steps to a target accuracy across learning rates (`learning_rate_sweep`),
initial scales (`init_scale_sweep`), fan-based initializations (`init_scheme_steps`) and activations of a deep
network (`saturating_nonlinearities`), plain and with BN."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from bnnotes.experiments.data import Dataset, load_digits
from bnnotes.experiments.models import mlp
from bnnotes.experiments.motivation._checks import PLAIN_AND_BN, check_norms, check_positive, check_seeds, check_target
from bnnotes.experiments.training import TrainConfig, steps_to_accuracy, train

__all__ = [
    "Sweep",
    "LearningRateSweepConfig",
    "learning_rate_sweep",
    "InitScaleSweepConfig",
    "init_scale_sweep",
    "INIT_SCHEMES",
    "apply_init_scheme",
    "InitSchemesConfig",
    "InitSchemes",
    "init_scheme_steps",
    "SaturationConfig",
    "SaturationResult",
    "saturating_nonlinearities",
]


# ----------------------------------------------------------------------------------------------------------------------
# Sweeps: learning rate and initialization scale
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sweep:
    """Steps to a target test accuracy across the values of one hyper-parameter, per normalization and seed.

    parameter: ``"lr"`` or ``"init_std"``. values: (V,). seeds: the seeds, one row each.
    steps_to_target: {norm: (len(seeds), V)}: the first evaluated step at which test accuracy reached `target`;
    ``inf`` where it did not within `max_steps`; ``nan`` where the run was skipped because the sweep had already failed
    `patience` times in a row at smaller values (see `learning_rate_sweep`), which counts as not trained.
    """

    parameter: str
    values: np.ndarray
    seeds: tuple[int, ...]
    target: float
    max_steps: int
    steps_to_target: dict[str, np.ndarray]

    def trains(self, norm: str) -> np.ndarray:
        """(len(seeds), V) bool: whether the run reached the target within `max_steps` (False where skipped)."""
        return np.isfinite(self.steps_to_target[norm])

    def largest_trainable(self, norm: str) -> np.ndarray:
        """(len(seeds),): per seed, the largest value at which the run reached the target (nan if none did)."""
        trains = self.trains(norm)
        return np.array([self.values[row].max() if row.any() else np.nan for row in trains])


#: The fan-based initializations of `init_scheme_steps`: the standard deviation of a (fan_out, fan_in) weight matrix.
#: Glorot & Bengio (2010), "normalized" initialization in its Gaussian form, for sigmoid/tanh units; He et al. (2015)
#: for ReLU units.
INIT_SCHEMES: dict[str, Callable[[int, int], float]] = {
    "glorot": lambda fan_in, fan_out: math.sqrt(2.0 / (fan_in + fan_out)),
    "kaiming": lambda fan_in, fan_out: math.sqrt(2.0 / fan_in),
}


def apply_init_scheme(model: nn.Module, scheme: str, seed: int) -> None:
    """Redraw every Linear weight of `model` from N(0, INIT_SCHEMES[scheme](fan_in, fan_out)^2), biases 0, in place.

    >>> model = mlp(64, hidden=(100,), seed=0)
    >>> apply_init_scheme(model, "glorot", seed=0)
    >>> round(model[0].weight.std().item(), 2)  # sqrt(2 / (64 + 100))
    0.11
    """
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"init scheme must be one of {sorted(INIT_SCHEMES)}, got {scheme!r}")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in (m for m in model.modules() if isinstance(m, nn.Linear)):
            layer.weight.normal_(0.0, INIT_SCHEMES[scheme](layer.in_features, layer.out_features), generator=generator)
            if layer.bias is not None:
                layer.bias.zero_()


def _steps_to_target(
    data: Dataset, norm: str, seed: int, *, lr: float, init_std: float, max_steps: int, target: float,
    eval_every: int, batch_size: int, activation: str = "sigmoid", hidden: Sequence[int] = (100, 100, 100),
    init_scheme: str | None = None,
) -> tuple[float, float]:
    """Train until test accuracy reaches `target` (or for max_steps): (the step it did or inf, the last accuracy).

    init_scheme: None draws every weight from N(0, init_std^2); a key of `INIT_SCHEMES` uses that scheme instead.
    """
    model = mlp(data.n_features, hidden=hidden, activation=activation, norm=norm, init_std=init_std, seed=seed)
    if init_scheme is not None:
        apply_init_scheme(model, init_scheme, seed)
    config = TrainConfig(steps=max_steps, batch_size=batch_size, lr=lr, eval_every=eval_every, seed=seed,
                         stop_at_accuracy=target)
    history = train(model, data, config)
    reached = steps_to_accuracy(history, target)
    return (math.inf if reached is None else float(reached)), history.final_test_acc


def _check_sweep(values: Sequence[float], name: str, max_steps: int, target: float, eval_every: int) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    if values.ndim != 1 or values.size == 0 or not (values > 0).all() or (np.diff(values) <= 0).any():
        raise ValueError(f"{name} must be a non-empty increasing sequence of positive numbers, got {values.tolist()!r}")
    check_target(target)
    check_positive(max_steps=max_steps, eval_every=eval_every)
    return values


@dataclass(frozen=True)
class LearningRateSweepConfig:
    """`learning_rate_sweep`: the Figure 1 network (sigmoid layers of widths `hidden`, weights from N(0, init_std^2))
    at each learning rate of `lrs` (increasing), per norm and seed, for at most `max_steps` steps on batches of
    `batch_size`, evaluated every `eval_every` steps; a sweep stops after `patience` failures in a row."""

    lrs: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0)
    seeds: tuple[int, ...] = (0, 1, 2)
    max_steps: int = 500
    target: float = 0.9
    init_std: float = 0.1
    norms: tuple[str, ...] = ("none", "bn")
    patience: int = 2
    eval_every: int = 10
    batch_size: int = 60
    hidden: tuple[int, ...] = (100, 100, 100)


def learning_rate_sweep(config: LearningRateSweepConfig = LearningRateSweepConfig(),
                        device: torch.device | str | None = None) -> Sweep:
    """How many SGD steps the Figure 1 network needs to reach `target` test accuracy, at each learning rate.

    `lrs` must increase. Each run stops as soon as it reaches the target. A sweep (one norm, one seed) stops after
    `patience` consecutive learning rates that fail and leaves the larger ones unrun (``nan``, counted as not trained):
    larger steps do not rescue plain SGD on this network, and skipping them keeps the sweep cheap.

    >>> config = LearningRateSweepConfig(lrs=(0.5, 1.0), seeds=(0,), max_steps=10, target=0.5, hidden=(8,))
    >>> sweep = learning_rate_sweep(config)
    >>> sweep.steps_to_target["bn"].shape
    (1, 2)
    """
    seeds = check_seeds(config.seeds)
    norms = check_norms(config.norms)
    values = _check_sweep(config.lrs, "lrs", config.max_steps, config.target, config.eval_every)
    if config.patience < 1:
        raise ValueError(f"patience must be at least 1, got {config.patience}")
    data = load_digits(device=device)
    result = {}
    for norm in norms:
        table = np.full((len(seeds), values.size), math.nan)
        for i, seed in enumerate(seeds):
            failures = 0
            for j, lr in enumerate(values):
                table[i, j], _ = _steps_to_target(data, norm, seed, lr=float(lr), init_std=config.init_std,
                                                  max_steps=config.max_steps, target=config.target,
                                                  eval_every=config.eval_every, batch_size=config.batch_size,
                                                  hidden=config.hidden)
                failures = failures + 1 if math.isinf(table[i, j]) else 0
                if failures == config.patience:
                    break
        result[norm] = table
    return Sweep("lr", values, seeds, config.target, config.max_steps, result)


@dataclass(frozen=True)
class InitScaleSweepConfig:
    """`init_scale_sweep`: the Figure 1 network (sigmoid layers of widths `hidden`) with weights from N(0, init_std^2)
    for each value of `init_stds` (increasing), per norm and seed, at learning rate `lr`, for at most `max_steps`
    steps."""

    init_stds: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
    seeds: tuple[int, ...] = (0, 1, 2)
    max_steps: int = 500
    target: float = 0.9
    lr: float = 1.0
    norms: tuple[str, ...] = ("none", "bn")
    eval_every: int = 10
    batch_size: int = 60
    hidden: tuple[int, ...] = (100, 100, 100)


def init_scale_sweep(config: InitScaleSweepConfig = InitScaleSweepConfig(),
                     device: torch.device | str | None = None) -> Sweep:
    """How many SGD steps the Figure 1 network needs to reach `target` test accuracy, per initial weight scale.

    Every Linear layer's weights are drawn from N(0, init_std^2). Each run stops as soon as it reaches the target;
    every value is run (failures happen at both ends, too small and too large).

    >>> config = InitScaleSweepConfig(init_stds=(0.1, 1.0), seeds=(0,), max_steps=10, target=0.5, hidden=(8,))
    >>> sweep = init_scale_sweep(config)
    >>> sorted(sweep.steps_to_target)
    ['bn', 'none']
    """
    seeds = check_seeds(config.seeds)
    norms = check_norms(config.norms)
    values = _check_sweep(config.init_stds, "init_stds", config.max_steps, config.target, config.eval_every)
    check_positive(lr=config.lr)
    data = load_digits(device=device)
    result = {}
    for norm in norms:
        result[norm] = np.array([
            [_steps_to_target(data, norm, seed, lr=config.lr, init_std=float(std), max_steps=config.max_steps,
                              target=config.target, eval_every=config.eval_every, batch_size=config.batch_size,
                              hidden=config.hidden)[0] for std in values]
            for seed in seeds
        ])
    return Sweep("init_std", values, seeds, config.target, config.max_steps, result)


@dataclass(frozen=True)
class InitSchemes:
    """Steps to a target test accuracy from the fan-based initializations, per normalization and seed.

    schemes: the `INIT_SCHEMES` keys, one column each. hidden_std: {scheme: the standard deviation it gives a hidden
    (width x width) layer}. steps_to_target: {norm: (len(seeds), len(schemes))}, ``inf`` where not reached.
    """

    schemes: tuple[str, ...]
    seeds: tuple[int, ...]
    target: float
    max_steps: int
    hidden_std: dict[str, float]
    steps_to_target: dict[str, np.ndarray]

    def trains(self, norm: str) -> np.ndarray:
        """(len(seeds), len(schemes)) bool: whether the run reached the target within `max_steps`."""
        return np.isfinite(self.steps_to_target[norm])


@dataclass(frozen=True)
class InitSchemesConfig:
    """`init_scheme_steps`: the Figure 1 network (3 hidden layers of `width`) initialized by each of `schemes`, per
    norm and seed, at learning rate `lr`, for at most `max_steps` steps."""

    schemes: tuple[str, ...] = ("glorot", "kaiming")
    seeds: tuple[int, ...] = (0, 1, 2)
    max_steps: int = 500
    target: float = 0.9
    lr: float = 1.0
    norms: tuple[str, ...] = ("none", "bn")
    width: int = 100
    eval_every: int = 10
    batch_size: int = 60


def init_scheme_steps(config: InitSchemesConfig = InitSchemesConfig(),
                      device: torch.device | str | None = None) -> InitSchemes:
    """The baseline for `init_scale_sweep`: the Figure 1 network initialized by a fan-based rule instead of one sigma.

    Glorot's rule gives a 100 x 100 layer sigma = 0.1, Kaiming's (meant for ReLUs) sigma = 0.141; the input and output
    layers get their own fans. Each run stops as soon as it reaches `target`.

    >>> config = InitSchemesConfig(schemes=("glorot",), seeds=(0,), max_steps=10, target=0.5, width=8)
    >>> result = init_scheme_steps(config)
    >>> result.steps_to_target["none"].shape
    (1, 1)
    """
    seeds = check_seeds(config.seeds)
    norms = check_norms(config.norms)
    schemes, target, max_steps, lr = tuple(config.schemes), config.target, config.max_steps, config.lr
    width, eval_every, batch_size = config.width, config.eval_every, config.batch_size
    unknown = [scheme for scheme in schemes if scheme not in INIT_SCHEMES]
    if not schemes or unknown:
        raise ValueError(f"schemes must be a non-empty subset of {sorted(INIT_SCHEMES)}, got {schemes!r}")
    check_target(target)
    check_positive(max_steps=max_steps, lr=lr, eval_every=eval_every)
    data = load_digits(device=device)
    hidden = (width,) * 3
    result = {
        norm: np.array([
            [_steps_to_target(data, norm, seed, lr=lr, init_std=1.0, max_steps=max_steps, target=target,
                              eval_every=eval_every, batch_size=batch_size, hidden=hidden, init_scheme=scheme)[0]
             for scheme in schemes]
            for seed in seeds
        ])
        for norm in norms
    }
    hidden_std = {scheme: INIT_SCHEMES[scheme](width, width) for scheme in schemes}
    return InitSchemes(schemes, seeds, target, max_steps, hidden_std, result)




# ----------------------------------------------------------------------------------------------------------------------
# Saturating nonlinearities: a deep sigmoid net against a deep ReLU net
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SaturationResult:
    """Steps to `target` test accuracy for deep nets with each activation, plain and with BN.

    steps_to_target: {(activation, norm): (len(seeds),)}, ``inf`` where the target was not reached in `max_steps`.
    final_test_acc: {(activation, norm): (len(seeds),)}, the test accuracy when the run stopped.
    """

    depth: int
    seeds: tuple[int, ...]
    target: float
    max_steps: int
    steps_to_target: dict[tuple[str, str], np.ndarray]
    final_test_acc: dict[tuple[str, str], np.ndarray]

    def speedup(self, activation: str) -> np.ndarray:
        """(len(seeds),): plain steps over BN steps. A plain run that never reached the target counts as max_steps,
        so the ratio is then a lower bound."""
        plain = np.minimum(self.steps_to_target[activation, "none"], self.max_steps)
        return plain / self.steps_to_target[activation, "bn"]


@dataclass(frozen=True)
class SaturationConfig:
    """`saturating_nonlinearities`: ``depth`` x `width` networks per activation, plain and with BN, weights from
    N(0, init_std^2), plain SGD at `lr` for at most `max_steps` steps, evaluated every `eval_every` steps."""

    activations: tuple[str, ...] = ("sigmoid", "relu")
    depth: int = 6
    width: int = 100
    seeds: tuple[int, ...] = (0, 1, 2)
    lr: float = 0.3
    init_std: float = 0.1
    max_steps: int = 600
    target: float = 0.9
    eval_every: int = 10
    batch_size: int = 60


def saturating_nonlinearities(config: SaturationConfig = SaturationConfig(),
                              device: torch.device | str | None = None) -> SaturationResult:
    """Steps to `target` test accuracy for a ``depth`` x 100 network per activation, without and with BN.

    Same recipe as Figure 1 (N(0, init_std^2) weights, plain SGD); each run stops once it reaches the target.

    >>> config = SaturationConfig(depth=2, width=8, seeds=(0,), max_steps=10, target=0.5)
    >>> result = saturating_nonlinearities(config)
    >>> result.steps_to_target["relu", "bn"].shape
    (1,)
    """
    seeds = check_seeds(config.seeds)
    depth, lr, init_std, max_steps, target = config.depth, config.lr, config.init_std, config.max_steps, config.target
    eval_every, batch_size = config.eval_every, config.batch_size
    check_target(target)
    check_positive(lr=lr, init_std=init_std, max_steps=max_steps, eval_every=eval_every)
    if depth < 1:
        raise ValueError(f"depth must be at least 1, got {depth}")
    data = load_digits(device=device)
    steps, accuracy = {}, {}
    for activation in config.activations:
        for norm in PLAIN_AND_BN:
            runs = [
                _steps_to_target(data, norm, seed, lr=lr, init_std=init_std, max_steps=max_steps, target=target,
                                 eval_every=eval_every, batch_size=batch_size, activation=activation,
                                 hidden=(config.width,) * depth)
                for seed in seeds
            ]
            steps[activation, norm] = np.array([reached for reached, _ in runs])
            accuracy[activation, norm] = np.array([final for _, final in runs])
    return SaturationResult(depth, seeds, target, max_steps, steps, accuracy)
