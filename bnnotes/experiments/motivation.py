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

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits
from torch import nn

from bnnotes import numpy_bn
from bnnotes.experiments.data import Dataset, load_digits
from bnnotes.experiments.models import hidden_linears, mlp
from bnnotes.experiments.training import History, TrainConfig, evaluate, steps_to_accuracy, train
from bnnotes.timing import median_interleaved

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

#: The percentiles of Figure 1 (b, c) of Ioffe & Szegedy (2015).
PERCENTILES: tuple[float, float, float] = (15.0, 50.0, 85.0)

_NORMS = ("none", "bn")


def _check_norms(norms: Sequence[str]) -> tuple[str, ...]:
    norms = tuple(norms)
    unknown = [n for n in norms if n not in _NORMS]
    if not norms or unknown:
        raise ValueError(f"norms must be a non-empty subset of {_NORMS} (plain, with BN), got {norms!r}")
    return norms


def _check_seeds(seeds: Sequence[int]) -> tuple[int, ...]:
    seeds = tuple(seeds)
    if not seeds or not all(isinstance(s, int) for s in seeds):
        raise TypeError(f"seeds must be a non-empty sequence of ints, got {seeds!r}")
    return seeds


def _check_target(target: float) -> None:
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target must be a test accuracy in (0, 1], got {target!r}")


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name} must be positive, got {value!r}")


# ----------------------------------------------------------------------------------------------------------------------
# Saturating nonlinearities: the gradient through a stack of sigmoids
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GradientNormsConfig:
    """`gradient_norms_at_init`: ``depth`` x `width` networks per (activation, norm), weights from N(0, init_std^2),
    one mini-batch of `batch_size` digits per seed (the seed draws the batch and the weights)."""

    depth: int = 6
    width: int = 100
    activations: tuple[str, ...] = ("sigmoid", "relu")
    norms: tuple[str, ...] = ("none", "bn")
    seeds: tuple[int, ...] = (0, 1)
    init_std: float = 0.1
    batch_size: int = 60


def gradient_norms_at_init(config: GradientNormsConfig = GradientNormsConfig(),
                           device: torch.device | str | None = None) -> dict[tuple[str, str], np.ndarray]:
    """The norm of the loss gradient with respect to each Linear layer's weight, at initialization.

    For each (activation, norm) a ``depth`` x `width` network (`mlp`, weights from N(0, init_std^2)) takes one
    mini-batch of `batch_size` digits drawn with the seed, and one backward pass of the cross-entropy.
    Returns {(activation, norm): array (len(seeds), depth + 1)}: the Frobenius norm of dL/dW for the Linear layers
    from the input (column 0) to the output layer (column depth).

    >>> config = GradientNormsConfig(depth=2, activations=("sigmoid",), norms=("none",), seeds=(0,))
    >>> norms = gradient_norms_at_init(config)
    >>> norms["sigmoid", "none"].shape
    (1, 3)
    """
    norms = _check_norms(config.norms)
    seeds = _check_seeds(config.seeds)
    if config.depth < 1:
        raise ValueError(f"depth must be at least 1, got {config.depth}")
    data = load_digits(device=device)
    result: dict[tuple[str, str], np.ndarray] = {}
    for activation in config.activations:
        for norm in norms:
            rows = []
            for seed in seeds:
                model = mlp(data.n_features, hidden=(config.width,) * config.depth, activation=activation, norm=norm,
                            init_std=config.init_std, seed=seed).to(data.x_train.device)
                generator = torch.Generator().manual_seed(seed)
                draw = torch.randperm(data.x_train.shape[0], generator=generator)[: config.batch_size]
                idx = draw.to(data.x_train.device)
                model.train()
                F.cross_entropy(model(data.x_train[idx]), data.y_train[idx]).backward()
                linears = [m for m in model if isinstance(m, nn.Linear)]
                rows.append([layer.weight.grad.norm().item() for layer in linears])
            result[activation, norm] = np.array(rows)
    return result


@dataclass(frozen=True)
class BackpropGains:
    """How one plain sigmoid layer scales the backpropagated gradient at initialization (eq-motivation-backprop).

    For the hidden layers l = 2..depth of a plain ``depth`` x `width` sigmoid network, with a_l = W_l h_{l-1} + b_l and
    h_l = g(a_l), on one mini-batch (arrays of shape (depth - 1,), one entry per layer l):

    measured: ||dL/dh_{l-1}|| / ||dL/dh_l|| (Frobenius norms over the batch), the factor the layer applies.
    bound: ||W_l||_2 * max g'(a_l), the operator-norm bound of eq-motivation-backprop (no vector can do worse).
    typical: init_std * sqrt(fan_in) * rms g'(a_l), the factor for a vector that is not aligned with W_l's top
    singular vectors: each of the fan_in entries of W_l^T v is a sum of fan_out terms W_ij v_i, with variance
    init_std^2 ||v||^2, so a random W_l (fan_out x fan_in) gives ||W_l^T v|| ~ init_std * sqrt(fan_in) * ||v||.
    operator_norm: ||W_l||_2. preact_std: the standard deviation of a_l. mean_derivative: the mean of g'(a_l),
    at most 1/4 (reached at a = 0): near 1/4 the units are not saturated, near 0 they are.
    """

    init_std: float
    measured: np.ndarray
    bound: np.ndarray
    typical: np.ndarray
    operator_norm: np.ndarray
    preact_std: np.ndarray
    mean_derivative: np.ndarray


@dataclass(frozen=True)
class BackpropGainsConfig:
    """`backprop_gains_at_init`: a plain ``depth`` x `width` sigmoid network, weights from N(0, init_std^2), one
    mini-batch of `batch_size` digits; `seed` draws the weights and the batch."""

    init_std: float = 0.1
    depth: int = 6
    width: int = 100
    batch_size: int = 60
    seed: int = 0


def backprop_gains_at_init(config: BackpropGainsConfig = BackpropGainsConfig(),
                           device: torch.device | str | None = None) -> BackpropGains:
    """Measure the per-layer factor of eq-motivation-backprop in a plain sigmoid `mlp` at initialization.

    One mini-batch of `batch_size` digits (drawn with `seed`) goes forward; the cross-entropy goes backward, and the
    gradient with respect to every hidden activation h_l is kept. See `BackpropGains` for what is returned.

    >>> gains = backprop_gains_at_init(BackpropGainsConfig(depth=3, width=20, batch_size=16))
    >>> bool((gains.measured <= gains.bound).all())
    True
    """
    init_std, depth, width, batch_size = config.init_std, config.depth, config.width, config.batch_size
    _check_positive(init_std=init_std)
    if depth < 2 or width < 1 or batch_size < 1:
        raise ValueError(f"need depth >= 2, width >= 1 and batch_size >= 1, got depth={depth}, width={width}, "
                         f"batch_size={batch_size}")
    data = load_digits(device=device)
    model = mlp(data.n_features, hidden=(width,) * depth, activation="sigmoid", norm="none", init_std=init_std,
                seed=config.seed).to(data.x_train.device)
    generator = torch.Generator().manual_seed(config.seed)
    idx = torch.randperm(data.x_train.shape[0], generator=generator)[:batch_size].to(data.x_train.device)
    linears = hidden_linears(model)  # W_1 .. W_depth; norm="none" puts an Identity between each and its sigmoid
    h = data.x_train[idx]  # (batch, features)
    preacts, hiddens = [], []
    for linear in linears:
        a = linear(h)  # (batch, width)
        h = torch.sigmoid(a)
        h.retain_grad()
        preacts.append(a.detach())
        hiddens.append(h)
    F.cross_entropy(model[-1](h), data.y_train[idx]).backward()
    grad_norm = np.array([hidden.grad.norm().item() for hidden in hiddens])  # ||dL/dh_l||, l = 1..depth
    derivatives = [torch.sigmoid(a) * (1 - torch.sigmoid(a)) for a in preacts]  # g'(a_l), eq-motivation-sigmoid
    layers = range(1, depth)  # W_l for l = 2..depth maps h_{l-1} to a_l
    operator_norm = np.array([torch.linalg.matrix_norm(linears[l].weight.detach(), ord=2).item() for l in layers])
    max_derivative = np.array([derivatives[l].max().item() for l in layers])
    rms_derivative = np.array([derivatives[l].pow(2).mean().sqrt().item() for l in layers])
    fan_in = np.array([linears[l].in_features for l in layers])
    return BackpropGains(
        init_std=init_std,
        measured=grad_norm[:-1] / grad_norm[1:],
        bound=operator_norm * max_derivative,
        typical=init_std * np.sqrt(fan_in) * rms_derivative,
        operator_norm=operator_norm,
        preact_std=np.array([preacts[l].std().item() for l in layers]),
        mean_derivative=np.array([derivatives[l].mean().item() for l in layers]),
    )


# ----------------------------------------------------------------------------------------------------------------------
# Why not whiten: cost, and the bias that BN's beta absorbs
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NormalizationCost:
    """Wall time of one whitening and of one per-feature standardization of a (batch_size, d) batch, per width d.

    dims: (D,) the widths. whiten_seconds, standardize_seconds: (D,) medians over interleaved repeats.
    """

    dims: np.ndarray
    batch_size: int
    whiten_seconds: np.ndarray
    standardize_seconds: np.ndarray

    @property
    def ratio(self) -> np.ndarray:
        """(D,) how many times longer whitening takes than per-feature standardization."""
        return self.whiten_seconds / self.standardize_seconds


@dataclass(frozen=True)
class NormalizationCostConfig:
    """`normalization_cost`: a (batch_size, d) batch per width d in `dims`, drawn with `seed`; `repeats` timing
    rounds; a timing sample lasts at least `min_sample_s`."""

    dims: tuple[int, ...] = (100, 200, 400, 700, 1000)
    batch_size: int = 128
    repeats: int = 3
    eps: float = 1e-5
    seed: int = 0
    min_sample_s: float = 0.005


def normalization_cost(
    whiten: Callable[[np.ndarray, float], np.ndarray],
    config: NormalizationCostConfig = NormalizationCostConfig(),
) -> NormalizationCost:
    """Time ``whiten(x, eps)`` (full whitening) against per-feature standardization (`numpy_bn.forward`).

    x is a float64 (batch_size, d) Gaussian batch with correlated features, for each d in `dims`. The timer is
    `bnnotes.timing.median_interleaved`: every width and both methods once per round, so that a busy machine slows
    both alike, a fast call repeated until a timing sample lasts 5 ms, and the median over `repeats` rounds. Both
    run on one BLAS thread (``threadpoolctl``, restored afterwards): the comparison is per core, and on a shared
    machine BLAS threads otherwise wait for each other. This is a measurement to look at, not to assert on: absolute
    times depend on the machine; the growth of the ratio with d is the point.

    >>> config = NormalizationCostConfig(dims=(4, 8), batch_size=16, repeats=1)
    >>> normalization_cost(lambda x, eps: x - x.mean(0), config).ratio.shape
    (2,)
    """
    if not callable(whiten):
        raise TypeError(f"whiten must be a function (x, eps) -> x_white, got {type(whiten).__name__}")
    batch_size, repeats, eps = config.batch_size, config.repeats, config.eps
    dims = np.asarray(config.dims, dtype=int)
    if dims.ndim != 1 or dims.size == 0 or (dims < 1).any():
        raise ValueError(f"dims must be a non-empty sequence of positive widths, got {dims.tolist()!r}")
    if repeats < 1 or batch_size < 2:
        raise ValueError(f"repeats must be >= 1 and batch_size >= 2, got repeats={repeats}, batch_size={batch_size}")
    rng = np.random.default_rng(config.seed)
    batches = {}
    for d in dims:
        mixing = rng.standard_normal((d, d)) / math.sqrt(d) + np.eye(d)  # correlated features
        batches[d] = rng.standard_normal((batch_size, d)) @ mixing
    methods = {
        d: (lambda x=batches[d]: whiten(x, eps),
            lambda x=batches[d], ones=np.ones(d), zeros=np.zeros(d): numpy_bn.forward(x, ones, zeros, eps))
        for d in dims
    }
    functions = {(d, k): fn for d in dims for k, fn in enumerate(methods[d])}
    with threadpool_limits(limits=1):
        timing = median_interleaved(functions, repeats, inner=None, warmup=0, min_sample_s=config.min_sample_s)
    medians = np.array([[timing.median[d, k] for d in dims] for k in range(2)])
    return NormalizationCost(dims, batch_size, medians[0], medians[1])


@dataclass(frozen=True)
class BiasAbsorption:
    """What a bias in front of BN does (Ioffe & Szegedy, 2015, Section 3.2).

    output_change: the largest change of the BN layer's output when the bias is shifted.
    bias_grad_max, weight_grad_max: the largest |dL/db| and |dL/dW| of that Linear layer.
    """

    output_change: float
    bias_grad_max: float
    weight_grad_max: float


@dataclass(frozen=True)
class BiasAbsorptionConfig:
    """`pre_bn_bias_effect`: one hidden layer of `width` units (weights from N(0, init_std^2)), a batch of `batch_size`
    digits, a bias shift of `bias_shift` standard normal vectors; `seed` draws everything."""

    bias_shift: float = 3.0
    batch_size: int = 60
    width: int = 100
    init_std: float = 0.1
    seed: int = 0


def pre_bn_bias_effect(config: BiasAbsorptionConfig = BiasAbsorptionConfig()) -> BiasAbsorption:
    """Shift the bias of the Linear layer in ``Linear(64, width) -> BatchNorm1d -> sigmoid`` and measure what changes.

    The layer is `mlp` with one hidden layer, a Linear bias kept on purpose, and bnnotes' own `BatchNorm1d` with a
    non-trivial gamma and beta, in float64 and training mode; its readout Linear and the cross-entropy of a batch of
    digits give the loss. The bias is shifted by `bias_shift` times a standard normal vector.

    >>> effect = pre_bn_bias_effect(BiasAbsorptionConfig(batch_size=8, width=5))
    >>> effect.output_change < 1e-12 and effect.bias_grad_max < 1e-12
    True
    """
    bias_shift, batch_size, width = config.bias_shift, config.batch_size, config.width
    _check_positive(bias_shift=bias_shift)
    if batch_size < 2:
        raise ValueError(f"batch_size must be at least 2 for batch statistics, got {batch_size}")
    data = load_digits()
    generator = torch.Generator().manual_seed(config.seed)
    idx = torch.randperm(data.x_train.shape[0], generator=generator)[:batch_size]
    x, y = data.x_train[idx].double(), data.y_train[idx]
    model = mlp(data.n_features, hidden=(width,), norm="bn", linear_bias=True, init_std=config.init_std,
                seed=config.seed).double()
    linear, norm = model[0], model[1]
    with torch.no_grad():  # a non-zero bias, and a non-trivial gamma and beta
        linear.bias.normal_(0.0, 1.0, generator=generator)
        norm.weight.uniform_(0.5, 2.0, generator=generator)
        norm.bias.normal_(0.0, 1.0, generator=generator)
    hidden_layer = model[:3].train()

    out_before = hidden_layer(x)
    F.cross_entropy(model[3](out_before), y).backward()
    with torch.no_grad():
        linear.bias.add_(bias_shift * torch.randn(width, generator=generator, dtype=torch.float64))
        out_after = hidden_layer(x)
    return BiasAbsorption(
        output_change=(out_after - out_before).abs().max().item(),
        bias_grad_max=linear.bias.grad.abs().max().item(),
        weight_grad_max=linear.weight.grad.abs().max().item(),
    )


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

    >>> runs = reproduce_figure1(Figure1Config(seeds=(0,), steps=20, hidden=(8, 8), measure_every=10))
    >>> runs["bn"][0].trace.percentiles.shape
    (3, 3, 8)
    """
    seeds = _check_seeds(config.seeds)
    _check_positive(steps=config.steps, lr=config.lr, init_std=config.init_std, measure_every=config.measure_every,
                    eval_every=config.eval_every)
    data = load_digits(device=device)
    runs: dict[str, list[Figure1Run]] = {}
    for norm in _NORMS:
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
    _check_target(target)
    _check_positive(max_steps=max_steps, eval_every=eval_every)
    return values


@dataclass(frozen=True)
class LearningRateSweepConfig:
    """`learning_rate_sweep`: the Figure 1 network (weights from N(0, init_std^2)) at each learning rate of `lrs`
    (increasing), per norm and seed, for at most `max_steps` steps on batches of `batch_size`, evaluated every
    `eval_every` steps; a sweep stops after `patience` failures in a row."""

    lrs: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0)
    seeds: tuple[int, ...] = (0, 1, 2)
    max_steps: int = 500
    target: float = 0.9
    init_std: float = 0.1
    norms: tuple[str, ...] = ("none", "bn")
    patience: int = 2
    eval_every: int = 10
    batch_size: int = 60


def learning_rate_sweep(config: LearningRateSweepConfig = LearningRateSweepConfig(),
                        device: torch.device | str | None = None) -> Sweep:
    """How many SGD steps the Figure 1 network needs to reach `target` test accuracy, at each learning rate.

    `lrs` must increase. Each run stops as soon as it reaches the target. A sweep (one norm, one seed) stops after
    `patience` consecutive learning rates that fail and leaves the larger ones unrun (``nan``, counted as not trained):
    larger steps do not rescue plain SGD on this network, and skipping them keeps the sweep cheap.

    >>> sweep = learning_rate_sweep(LearningRateSweepConfig(lrs=(0.5, 1.0), seeds=(0,), max_steps=30, target=0.5))
    >>> sweep.steps_to_target["bn"].shape
    (1, 2)
    """
    seeds = _check_seeds(config.seeds)
    norms = _check_norms(config.norms)
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
                                                  eval_every=config.eval_every, batch_size=config.batch_size)
                failures = failures + 1 if math.isinf(table[i, j]) else 0
                if failures == config.patience:
                    break
        result[norm] = table
    return Sweep("lr", values, seeds, config.target, config.max_steps, result)


@dataclass(frozen=True)
class InitScaleSweepConfig:
    """`init_scale_sweep`: the Figure 1 network with weights from N(0, init_std^2) for each value of `init_stds`
    (increasing), per norm and seed, at learning rate `lr`, for at most `max_steps` steps."""

    init_stds: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
    seeds: tuple[int, ...] = (0, 1, 2)
    max_steps: int = 500
    target: float = 0.9
    lr: float = 1.0
    norms: tuple[str, ...] = ("none", "bn")
    eval_every: int = 10
    batch_size: int = 60


def init_scale_sweep(config: InitScaleSweepConfig = InitScaleSweepConfig(),
                     device: torch.device | str | None = None) -> Sweep:
    """How many SGD steps the Figure 1 network needs to reach `target` test accuracy, per initial weight scale.

    Every Linear layer's weights are drawn from N(0, init_std^2). Each run stops as soon as it reaches the target;
    every value is run (failures happen at both ends, too small and too large).

    >>> sweep = init_scale_sweep(InitScaleSweepConfig(init_stds=(0.1, 1.0), seeds=(0,), max_steps=30, target=0.5))
    >>> sorted(sweep.steps_to_target)
    ['bn', 'none']
    """
    seeds = _check_seeds(config.seeds)
    norms = _check_norms(config.norms)
    values = _check_sweep(config.init_stds, "init_stds", config.max_steps, config.target, config.eval_every)
    _check_positive(lr=config.lr)
    data = load_digits(device=device)
    result = {}
    for norm in norms:
        result[norm] = np.array([
            [_steps_to_target(data, norm, seed, lr=config.lr, init_std=float(std), max_steps=config.max_steps,
                              target=config.target, eval_every=config.eval_every,
                              batch_size=config.batch_size)[0] for std in values]
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

    >>> result = init_scheme_steps(InitSchemesConfig(schemes=("glorot",), seeds=(0,), max_steps=30, target=0.5))
    >>> result.steps_to_target["none"].shape
    (1, 1)
    """
    seeds = _check_seeds(config.seeds)
    norms = _check_norms(config.norms)
    schemes, target, max_steps, lr = tuple(config.schemes), config.target, config.max_steps, config.lr
    width, eval_every, batch_size = config.width, config.eval_every, config.batch_size
    unknown = [scheme for scheme in schemes if scheme not in INIT_SCHEMES]
    if not schemes or unknown:
        raise ValueError(f"schemes must be a non-empty subset of {sorted(INIT_SCHEMES)}, got {schemes!r}")
    _check_target(target)
    _check_positive(max_steps=max_steps, lr=lr, eval_every=eval_every)
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
    """`generalization_gap`: the Figure 1 network trained on `n_train` training digits (drawn per seed) for `steps`
    steps of plain SGD at `lr`, weights from N(0, init_std^2), evaluated every `eval_every` steps."""

    n_train: int = 300
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 800
    lr: float = 1.0
    init_std: float = 0.1
    batch_size: int = 60
    eval_every: int = 20


def generalization_gap(config: GapConfig = GapConfig(),
                       device: torch.device | str | None = None) -> dict[str, list[GapRun]]:
    """Train the Figure 1 network, plain and with BN, on a random subset of `n_train` training digits.

    With so few examples both nets fit the subset completely; the question is how far test accuracy and loss stay
    behind. Each seed draws its own subset (the same for both nets), initialization and batch order.
    Returns {"none": [GapRun per seed], "bn": [GapRun per seed]}.

    >>> gaps = generalization_gap(GapConfig(n_train=120, seeds=(0,), steps=20, eval_every=10))
    >>> gaps["bn"][0].steps.tolist()
    [0, 10, 20]
    """
    seeds = _check_seeds(config.seeds)
    n_train, steps, lr, init_std = config.n_train, config.steps, config.lr, config.init_std
    batch_size, eval_every = config.batch_size, config.eval_every
    _check_positive(steps=steps, lr=lr, init_std=init_std, eval_every=eval_every)
    full = load_digits(device=device)
    if not batch_size <= n_train <= full.x_train.shape[0]:
        raise ValueError(f"n_train must be in [batch_size={batch_size}, {full.x_train.shape[0]}], got {n_train}")
    runs: dict[str, list[GapRun]] = {norm: [] for norm in _NORMS}
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        subset = torch.randperm(full.x_train.shape[0], generator=generator)[:n_train].to(full.x_train.device)
        data = Dataset(full.x_train[subset], full.y_train[subset], full.x_test, full.y_test)
        for norm in _NORMS:
            model = mlp(data.n_features, norm=norm, init_std=init_std, seed=seed)
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

    >>> result = saturating_nonlinearities(SaturationConfig(depth=2, seeds=(0,), max_steps=30, target=0.5))
    >>> result.steps_to_target["relu", "bn"].shape
    (1,)
    """
    seeds = _check_seeds(config.seeds)
    depth, lr, init_std, max_steps, target = config.depth, config.lr, config.init_std, config.max_steps, config.target
    eval_every, batch_size = config.eval_every, config.batch_size
    _check_target(target)
    _check_positive(lr=lr, init_std=init_std, max_steps=max_steps, eval_every=eval_every)
    if depth < 1:
        raise ValueError(f"depth must be at least 1, got {depth}")
    data = load_digits(device=device)
    steps, accuracy = {}, {}
    for activation in config.activations:
        for norm in _NORMS:
            runs = [
                _steps_to_target(data, norm, seed, lr=lr, init_std=init_std, max_steps=max_steps, target=target,
                                 eval_every=eval_every, batch_size=batch_size, activation=activation,
                                 hidden=(config.width,) * depth)
                for seed in seeds
            ]
            steps[activation, norm] = np.array([reached for reached, _ in runs])
            accuracy[activation, norm] = np.array([final for _, final in runs])
    return SaturationResult(depth, seeds, target, max_steps, steps, accuracy)
