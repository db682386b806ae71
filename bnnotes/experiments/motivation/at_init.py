"""The motivation chapter at initialization and for one batch: how the gradient shrinks through sigmoids
(`gradient_norms_at_init`, `backprop_gains_at_init`), what full whitening costs (`normalization_cost`), and what a bias
before BN does (`pre_bn_bias_effect`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits
from torch import nn

from bnnotes import numpy_bn
from bnnotes.experiments.data import load_digits
from bnnotes.experiments.models import hidden_linears, mlp
from bnnotes.experiments.motivation._checks import check_norms, check_positive, check_seeds
from bnnotes.timing import median_interleaved

__all__ = [
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
]


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
    norms = check_norms(config.norms)
    seeds = check_seeds(config.seeds)
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
    check_positive(init_std=init_std)
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
    check_positive(bias_shift=bias_shift)
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
