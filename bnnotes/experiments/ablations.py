"""The Explore exercises' ablations: one question about BN each, answered by training a few small networks.

Each function takes one Config dataclass that holds every seed and constant, and returns an `AblationResult` (the
momentum sweep: a `MomentumResult`). The chapters call them in their ``## Explore`` sections, where the learner changes
the config and asks what moves:

- `frozen_affine` (derivation): BN with gamma and beta frozen at 1 and 0, against trainable ones.
- `mean_variance_only` (derivation): BN that only centres, or only divides by the batch standard deviation.
- `partial_bn` (motivation): BN after some hidden layers only.
- `momentum_batch_size` (inference): the running averages' momentum against the batch size.
- `init_against_bn` (landscape): a careful (Kaiming) initialization against BN in a deep ReLU network.
- `bn_against_dropout` (real_networks): BN as a regularizer, in place of or alongside dropout.

All of them train the course's `mlp` on the digits with the one training loop, `training.train`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from bnnotes.experiments.data import Dataset
from bnnotes.experiments.models import make_norm, mlp
from bnnotes.experiments.training import History, TrainConfig, evaluate, train
from bnnotes.torch_bn import BatchNorm1d

__all__ = [
    "AblationResult",
    "MomentumResult",
    "FrozenAffineConfig",
    "MeanVarianceOnlyConfig",
    "PartialBNConfig",
    "MomentumBatchConfig",
    "InitConfig",
    "DropoutConfig",
    "frozen_affine",
    "mean_variance_only",
    "partial_bn",
    "momentum_batch_size",
    "init_against_bn",
    "bn_against_dropout",
]


@dataclass
class AblationResult:
    """The runs of one ablation: for each variant, one `History` and one final training-split accuracy per seed.

    train_acc: accuracy on the whole training split in eval mode after training (next to the test accuracy, it shows
    how much a variant overfits). models: the trained networks, to look inside (their gamma, their weights).
    """

    variants: tuple[str, ...]
    seeds: tuple[int, ...]
    histories: dict[str, list[History]] = field(default_factory=dict)
    train_acc: dict[str, list[float]] = field(default_factory=dict)
    models: dict[str, list[nn.Module]] = field(default_factory=dict)

    def final_test_acc(self, variant: str) -> np.ndarray:
        """(seeds,) the test accuracy at the end of each run of `variant` (eval mode)."""
        if variant not in self.histories:
            raise ValueError(f"variant must be one of {list(self.variants)}, got {variant!r}")
        return np.array([h.final_test_acc for h in self.histories[variant]])

    def summary(self) -> str:
        """One line per variant: final test and training accuracy per seed."""
        return "\n".join(
            f"{v:>22}: test {np.round(self.final_test_acc(v), 3)}, train {np.round(self.train_acc[v], 3)}"
            for v in self.variants
        )


def _run_variants(
    data: Dataset,
    build: Callable[[str, int], nn.Module],
    variants: Sequence[str],
    seeds: Sequence[int],
    config: TrainConfig,
) -> AblationResult:
    """Train ``build(variant, seed)`` for every variant and seed on the same batches (the batch order's seed is `seed`)."""
    result = AblationResult(tuple(variants), tuple(seeds))
    for variant in variants:
        result.histories[variant], result.train_acc[variant], result.models[variant] = [], [], []
        for seed in seeds:
            model = build(variant, seed)
            history = train(model, data, TrainConfig(**{**config.__dict__, "seed": seed}))
            result.histories[variant].append(history)
            result.train_acc[variant].append(evaluate(model, data.x_train, data.y_train)[1])
            result.models[variant].append(model)
    return result


@dataclass(frozen=True)
class FrozenAffineConfig:
    """The Figure 1 network of the motivation chapter (sigmoid, weights N(0, init_std^2)), with three variants.

    variants: ``"none"`` (no BN), ``"bn"`` (trainable gamma and beta), ``"bn-frozen-affine"`` (gamma = 1 and beta = 0
    for good: every sigmoid then sees a standardized input).
    """

    variants: tuple[str, ...] = ("none", "bn", "bn-frozen-affine")
    hidden: tuple[int, ...] = (100, 100, 100)
    activation: str = "sigmoid"
    init_std: float = 0.1
    train: TrainConfig = TrainConfig(steps=500, batch_size=60, lr=0.5, eval_every=50)
    seeds: tuple[int, ...] = (0, 1)


def frozen_affine(config: FrozenAffineConfig, data: Dataset) -> AblationResult:
    """BN with and without its learned scale and shift: what do gamma and beta buy?

    >>> FrozenAffineConfig().variants
    ('none', 'bn', 'bn-frozen-affine')
    """

    def build(variant: str, seed: int) -> nn.Module:
        norm = "none" if variant == "none" else "bn"
        model = mlp(data.n_features, config.hidden, data.n_classes, config.activation, norm, config.init_std, seed=seed)
        if variant == "bn-frozen-affine":
            for module in model.modules():
                if isinstance(module, nn.BatchNorm1d):
                    module.weight.requires_grad_(False)
                    module.bias.requires_grad_(False)
        elif variant not in ("none", "bn"):
            raise ValueError(f"variant must be 'none', 'bn' or 'bn-frozen-affine', got {variant!r}")
        return model

    return _run_variants(data, build, config.variants, config.seeds, config.train)


@dataclass(frozen=True)
class MeanVarianceOnlyConfig:
    """Full BN against its two halves, on the Figure 1 network: names of `models.NORMS`.

    ``"bn-mean-only"`` subtracts the batch mean and does not divide; ``"bn-var-only"`` divides by the batch standard
    deviation and does not subtract the mean. Both keep gamma and beta.
    """

    variants: tuple[str, ...] = ("none", "bn-mean-only", "bn-var-only", "bn")
    hidden: tuple[int, ...] = (100, 100, 100)
    activation: str = "sigmoid"
    init_std: float = 0.1
    train: TrainConfig = TrainConfig(steps=500, batch_size=60, lr=0.5, eval_every=50)
    seeds: tuple[int, ...] = (0,)


def mean_variance_only(config: MeanVarianceOnlyConfig, data: Dataset) -> AblationResult:
    """Which half of BN does the work: the centring, or the division by the standard deviation?

    >>> MeanVarianceOnlyConfig().variants
    ('none', 'bn-mean-only', 'bn-var-only', 'bn')
    """

    def build(variant: str, seed: int) -> nn.Module:
        # A bias before a layer that does not centre is not redundant: keep it wherever the mean is not subtracted.
        linear_bias = variant in ("none", "bn-var-only")
        return mlp(data.n_features, config.hidden, data.n_classes, config.activation, variant, config.init_std,
                   linear_bias=linear_bias, seed=seed)

    return _run_variants(data, build, config.variants, config.seeds, config.train)


@dataclass(frozen=True)
class PartialBNConfig:
    """A deeper sigmoid network (weights N(0, init_std^2)) with BN after some hidden layers only.

    placements: the name of each variant and the hidden layers (0-based) that get BN; the others get none, and keep
    their Linear bias (every layer keeps it, which changes nothing before BN: there its gradient is exactly 0).
    """

    placements: tuple[tuple[str, tuple[int, ...]], ...] = (
        ("none", ()), ("first", (0,)), ("last", (4,)), ("every other", (0, 2, 4)), ("all", (0, 1, 2, 3, 4)),
    )
    hidden: tuple[int, ...] = (100, 100, 100, 100, 100)
    activation: str = "sigmoid"
    init_std: float = 0.1
    train: TrainConfig = TrainConfig(steps=400, batch_size=60, lr=0.5, eval_every=50)
    seeds: tuple[int, ...] = (0,)


def partial_bn(config: PartialBNConfig, data: Dataset) -> AblationResult:
    """Does BN need to be everywhere, and if not, where does one BN layer help most?

    >>> [name for name, _ in PartialBNConfig().placements]
    ['none', 'first', 'last', 'every other', 'all']
    """
    layers_of = dict(config.placements)
    for name, layers in config.placements:
        if not set(layers) <= set(range(len(config.hidden))):
            raise ValueError(f"placement {name!r} names layers {layers}, but there are {len(config.hidden)} hidden layers")

    def build(variant: str, seed: int) -> nn.Module:
        hidden_index = iter(range(len(config.hidden)))  # mlp builds the norms in forward order

        def norm(width: int) -> nn.Module:
            return make_norm("bn" if next(hidden_index) in layers_of[variant] else "none", width)

        return mlp(data.n_features, config.hidden, data.n_classes, config.activation, norm, config.init_std,
                   linear_bias=True, seed=seed)

    return _run_variants(data, build, tuple(layers_of), config.seeds, config.train)


@dataclass(frozen=True)
class MomentumBatchConfig:
    """BN networks trained at several batch sizes, each with several running-average momenta (PyTorch's convention).

    lr_per_example: the learning rate is this times the batch size (the linear scaling rule), for `steps` steps.
    """

    batch_sizes: tuple[int, ...] = (4, 64)
    momenta: tuple[float, ...] = (0.001, 0.01, 0.1, 0.9)
    hidden: tuple[int, ...] = (100, 100)
    activation: str = "relu"
    steps: int = 400
    lr_per_example: float = 0.005
    seed: int = 0


@dataclass
class MomentumResult:
    """Test accuracy (batch_sizes, momenta) with the running averages (eval mode) and with the test split's own
    statistics (train mode, the whole split as one batch: the statistics the running averages try to estimate)."""

    batch_sizes: tuple[int, ...]
    momenta: tuple[float, ...]
    eval_acc: np.ndarray
    batch_stats_acc: np.ndarray

    @property
    def gap(self) -> np.ndarray:
        """(batch_sizes, momenta): what the running averages cost, in accuracy."""
        return self.batch_stats_acc - self.eval_acc


def momentum_batch_size(config: MomentumBatchConfig, data: Dataset) -> MomentumResult:
    """How should BN's momentum change with the batch size?

    >>> MomentumBatchConfig().momenta
    (0.001, 0.01, 0.1, 0.9)
    """
    shape = (len(config.batch_sizes), len(config.momenta))
    eval_acc, batch_stats_acc = np.zeros(shape), np.zeros(shape)
    for i, batch_size in enumerate(config.batch_sizes):
        for j, momentum in enumerate(config.momenta):
            model = mlp(data.n_features, config.hidden, data.n_classes, config.activation,
                        lambda width: BatchNorm1d(width, momentum=momentum), seed=config.seed)
            train_config = TrainConfig(steps=config.steps, batch_size=batch_size, lr=config.lr_per_example * batch_size,
                                       eval_every=config.steps, seed=config.seed)
            train(model, data, train_config)
            eval_acc[i, j] = evaluate(model, data.x_test, data.y_test)[1]
            batch_stats_acc[i, j] = evaluate(model, data.x_test, data.y_test, eval_mode=False)[1]
    return MomentumResult(config.batch_sizes, config.momenta, eval_acc, batch_stats_acc)


@dataclass(frozen=True)
class InitConfig:
    """A deep ReLU network, initialized with N(0, small_std^2) or with Kaiming's N(0, 2 / fan_in), with and without BN.

    Variants ``"<init>"`` (no BN) and ``"<init>+bn"`` for init in ("small", "kaiming").
    """

    variants: tuple[str, ...] = ("small", "kaiming", "small+bn", "kaiming+bn")
    hidden: tuple[int, ...] = (100,) * 10
    activation: str = "relu"
    small_std: float = 0.05
    train: TrainConfig = TrainConfig(steps=300, batch_size=60, lr=0.05, eval_every=50)
    seeds: tuple[int, ...] = (0,)


def init_against_bn(config: InitConfig, data: Dataset) -> AblationResult:
    """Does a careful initialization make BN unnecessary in a deep ReLU network?

    >>> InitConfig().variants
    ('small', 'kaiming', 'small+bn', 'kaiming+bn')
    """

    def build(variant: str, seed: int) -> nn.Module:
        init, _, norm = variant.partition("+")
        if init not in ("small", "kaiming") or norm not in ("", "bn"):
            raise ValueError(f"variant must be '<small|kaiming>' or '<small|kaiming>+bn', got {variant!r}")
        model = mlp(data.n_features, config.hidden, data.n_classes, config.activation, norm or "none",
                    init_std=config.small_std, seed=seed)
        if init == "kaiming":
            generator = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for layer in (m for m in model.modules() if isinstance(m, nn.Linear)):
                    # He et al. (2015): Var[w] = 2 / fan_in keeps a ReLU layer's mean square input constant.
                    layer.weight.normal_(0.0, math.sqrt(2.0 / layer.in_features), generator=generator)
        return model

    return _run_variants(data, build, config.variants, config.seeds, config.train)


@dataclass(frozen=True)
class DropoutConfig:
    """A wide ReLU network trained long on a small training split (``test_size`` of the digits held out), so that it
    can overfit; variants ``"none"``, ``"dropout"`` (after each hidden ReLU, probability p), ``"bn"`` and
    ``"bn+dropout"``."""

    variants: tuple[str, ...] = ("none", "dropout", "bn", "bn+dropout")
    hidden: tuple[int, ...] = (256, 256)
    activation: str = "relu"
    p: float = 0.5
    train: TrainConfig = TrainConfig(steps=600, batch_size=32, lr=0.05, eval_every=100)
    seeds: tuple[int, ...] = (0,)


def bn_against_dropout(config: DropoutConfig, data: Dataset) -> AblationResult:
    """Is BN's regularization a substitute for dropout?

    data: typically a small training split, e.g. ``load_digits(test_size=0.8)``.

    >>> DropoutConfig().variants
    ('none', 'dropout', 'bn', 'bn+dropout')
    """

    def build(variant: str, seed: int) -> nn.Module:
        if variant not in ("none", "dropout", "bn", "bn+dropout"):
            raise ValueError(f"variant must be 'none', 'dropout', 'bn' or 'bn+dropout', got {variant!r}")
        use_bn, use_dropout = variant.startswith("bn"), variant.endswith("dropout")

        def norm(width: int) -> nn.Module:
            # Linear -> [BN] -> Dropout -> ReLU equals Linear -> [BN] -> ReLU -> Dropout: ReLU commutes with dropout's
            # zeroing and with its positive rescaling by 1 / (1 - p).
            layers = [make_norm("bn" if use_bn else "none", width)]
            if use_dropout:
                layers.append(nn.Dropout(config.p))
            return nn.Sequential(*layers)

        # Dropout of the mask's own draws: torch's global RNG, seeded per run so that the runs repeat.
        torch.manual_seed(seed)
        return mlp(data.n_features, config.hidden, data.n_classes, config.activation, norm,
                   linear_bias=not use_bn, seed=seed)

    return _run_variants(data, build, config.variants, config.seeds, config.train)
