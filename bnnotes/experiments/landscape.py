"""Experiments of the loss-landscape chapter: Santurkar et al. (2018), "How Does Batch Normalization Help Optimization?".

Three measurements, each built on the course's one training loop (`train` with a ``callback(step, model)``):

- `noisy_bn_experiment`: BN with noise injected after it (a deliberate, time-varying covariate shift), against BN and
  against the plain network, with the first two moments of one layer's input recorded over training.
- `ics_experiment`: internal covariate shift measured through gradients (their Definition 2.1): a layer's gradient
  before and after the layers below it take their step, and how large that step was (`lower_layer_step`).
- `landscape_experiment`: the loss and the gradient along the gradient (or a random) direction at checkpoints: the
  loss range, the gradient change and the "effective" beta-smoothness, in absolute and in per-layer relative units.

Models come from `mlp`; the normalizations are `bnnotes.torch_bn.BatchNorm1d` and `bnnotes.lp_norm.LpBatchNorm1d`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnnotes.experiments.data import Dataset
from bnnotes.experiments.models import NormFactory, hidden_linears, hidden_norms, mlp, norm_factory
from bnnotes.experiments.stats import frozen_buffers, population_statistics
from bnnotes.experiments.training import History, TrainConfig, train
from bnnotes.variants import ActivationNoise

__all__ = [
    "with_noise",
    "linear_teacher_data",
    "distribution_instability",
    "NoisyBNConfig",
    "NoisyBNRun",
    "noisy_bn_experiment",
    "recompute_running_stats",
    "gradient_ics",
    "lower_layer_step",
    "ICSConfig",
    "ICSRun",
    "ics_experiment",
    "landscape_probe",
    "rescale_pre_norm_weights",
    "scale_symmetry",
    "LandscapeConfig",
    "LandscapeRun",
    "landscape_experiment",
]


# --------------------------------------------------------------------------------------------------------------------
# Noise injection
# --------------------------------------------------------------------------------------------------------------------


def with_noise(
    norm: str | NormFactory, mean_range: float = 0.5, std_range: tuple[float, float] = (1.0, 1.5), seed: int = 0
) -> NormFactory:
    """A norm factory whose layers are ``norm`` followed by `ActivationNoise` (each layer gets seed, seed + 1, ...).

    ``with_noise("bn")`` is the paper's "noisy BatchNorm"; ``with_noise("none")`` puts the same noise into the plain net.
    """
    inner = norm_factory(norm)  # an unknown name fails here, when the factory is built
    counter = [0]

    def factory(width: int) -> nn.Module:
        counter[0] += 1
        return nn.Sequential(inner(width), ActivationNoise(width, mean_range, std_range, seed + counter[0]))

    return factory


# --------------------------------------------------------------------------------------------------------------------
# Data and small measurements
# --------------------------------------------------------------------------------------------------------------------


def linear_teacher_data(
    n_features: int = 20, n_classes: int = 5, n_train: int = 1000, n_test: int = 500, seed: int = 0
) -> Dataset:
    """Synthetic Gaussian inputs labelled by a random linear teacher: x ~ N(0, I), y = argmax(x A), A ~ N(0, 1).

    A (deep) linear network can represent the teacher exactly, which makes this the classification twin of the paper's
    synthetic task for deep linear networks. Returns a `Dataset` of float32 inputs and int64 labels.

    >>> data = linear_teacher_data(n_features=4, n_classes=3, n_train=10, n_test=5)
    >>> tuple(data.x_train.shape), int(data.y_train.max()) < 3
    ((10, 4), True)
    """
    if n_features < 1 or n_classes < 2 or n_train < 2 or n_test < 1:
        raise ValueError(
            f"need n_features >= 1, n_classes >= 2, n_train >= 2 and n_test >= 1, got {n_features}, {n_classes}, "
            f"{n_train}, {n_test}"
        )
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(n_features, n_classes, generator=g)
    x = torch.randn(n_train + n_test, n_features, generator=g)
    y = (x @ teacher).argmax(dim=1)
    return Dataset(x[:n_train], y[:n_train], x[n_train:], y[n_train:])


def distribution_instability(batch_mean: np.ndarray, batch_std: np.ndarray) -> float:
    """How much a layer's input distribution moves from one recorded step to the next, relative to its spread.

    batch_mean, batch_std: (T, units), the per-unit mean and standard deviation of the layer's input on a fixed probe
    batch at T recorded steps. For each unit: the mean over steps of |Delta mean| + |Delta std|, divided by the unit's
    average std; returns the median over units. 0 means a frozen distribution; 1 means the first two moments move by
    about one standard deviation per recorded step.

    >>> distribution_instability(np.array([[0.0], [1.0], [0.0]]), np.ones((3, 1)))
    1.0
    """
    batch_mean = np.asarray(batch_mean, dtype=float)
    batch_std = np.asarray(batch_std, dtype=float)
    if batch_mean.shape != batch_std.shape or batch_mean.ndim != 2 or batch_mean.shape[0] < 2:
        raise ValueError(
            f"batch_mean and batch_std must both be (T, units) with T >= 2, got {batch_mean.shape} and {batch_std.shape}"
        )
    step_change = np.abs(np.diff(batch_mean, axis=0)) + np.abs(np.diff(batch_std, axis=0))
    spread = batch_std.mean(axis=0)
    return float(np.median(step_change.mean(axis=0) / np.maximum(spread, 1e-12)))


def recompute_running_stats(model: nn.Module, x: Tensor, batch_size: int = 60) -> nn.Module:
    """A copy of `model` whose running statistics are recomputed on x (N, features) with the noise switched off.

    Every normalization layer's statistics (BN's and the ℓp layers') are reset and replaced by the cumulative average
    over consecutive batches of x (`bnnotes.experiments.stats.population_statistics` in place), which is what inference
    should see when the training-time noise is gone. The input model is not changed; the copy is in eval mode.
    """
    fresh = copy.deepcopy(model)
    for module in fresh.modules():
        if isinstance(module, ActivationNoise):
            module.enabled = False
    population_statistics(fresh, x, batch_size, seed=None, in_place=True)
    return fresh.eval()


# --------------------------------------------------------------------------------------------------------------------
# Noisy BN
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NoisyBNConfig:
    """A sigmoid MLP trained with plain SGD on digits, with and without BN and noise (see `ActivationNoise`).

    layer: which hidden layer's input to the nonlinearity is recorded (0-based; -1 is the last). record_every: record
    its moments on a fixed probe batch of `probe_size` training images, drawn with `probe_seed`, every this many
    steps. The noise layers of the run with seed s are seeded ``noise_seed_scale * (s + 1) + 1, + 2, ...``.
    """

    hidden: tuple[int, ...] = (100, 100, 100)
    activation: str = "sigmoid"
    steps: int = 600
    lr: float = 1.0
    batch_size: int = 60
    eval_every: int = 50
    mean_range: float = 0.5
    std_range: tuple[float, float] = (1.0, 1.5)
    variants: tuple[str, ...] = ("plain", "bn", "noisy_bn", "plain_noise")
    seeds: tuple[int, ...] = (0, 1)
    layer: int = -1
    record_every: int = 5
    probe_size: int = 200
    unit: int = 0
    init_std: float | None = 0.1
    probe_seed: int = 12345
    noise_seed_scale: int = 1000


@dataclass
class NoisyBNRun:
    """One training run: its `History`, and the recorded layer input on the probe batch.

    record_step: (T,) steps; batch_mean, batch_std: (T, units); unit_percentiles: (T, 5) the 5/15/50/85/95th
    percentiles of unit `config.unit`'s input; instability: `distribution_instability` of the moments;
    layer_values: (T, probe_size * units) every input to the layer's nonlinearity on the probe batch, for histograms.
    """

    variant: str
    seed: int
    history: History
    record_step: np.ndarray
    batch_mean: np.ndarray
    batch_std: np.ndarray
    unit_percentiles: np.ndarray
    instability: float
    model: nn.Module = field(repr=False)
    layer_values: np.ndarray = field(default=None, repr=False)


PERCENTILES = (5, 15, 50, 85, 95)


def _noisy_model(variant: str, config: NoisyBNConfig, n_features: int, n_classes: int, seed: int) -> nn.Sequential:
    noise = {"mean_range": config.mean_range, "std_range": config.std_range, "seed": config.noise_seed_scale * (seed + 1)}
    factories: dict[str, str | NormFactory] = {
        "plain": "none",
        "bn": "bn",
        "noisy_bn": with_noise("bn", **noise),
        "plain_noise": with_noise("none", **noise),
    }
    if variant not in factories:
        raise ValueError(f"variant must be one of {sorted(factories)}, got {variant!r}")
    return mlp(
        n_features,
        hidden=config.hidden,
        out_features=n_classes,
        activation=config.activation,
        norm=factories[variant],
        linear_bias=variant.startswith("plain"),
        init_std=config.init_std,
        seed=seed,
    )


def _probe_batch(data: Dataset, size: int, seed: int) -> tuple[Tensor, Tensor]:
    """`size` training examples drawn without replacement with `seed`: a fixed batch to measure on, (x, y)."""
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randperm(data.x_train.shape[0], generator=generator)[:size].to(data.x_train.device)
    return data.x_train[idx], data.y_train[idx]


def noisy_bn_experiment(config: NoisyBNConfig, data: Dataset) -> list[NoisyBNRun]:
    """Train every variant of `config` for every seed; returns the runs (variant-major, then seed).

    The recorded quantity is the input to the nonlinearity of hidden layer `config.layer` (after BN and noise), on a
    fixed probe batch run in train mode, so that it is the distribution that layer sees while training. Recording does
    not move the running statistics (the probe runs inside `frozen_buffers`).
    """
    probe, _ = _probe_batch(data, config.probe_size, config.probe_seed)
    runs: list[NoisyBNRun] = []
    for variant in config.variants:
        for seed in config.seeds:
            model = _noisy_model(variant, config, data.n_features, data.n_classes, seed)
            # the layer's norm (+ noise) module: its output feeds the nonlinearity
            tap = hidden_norms(model)[config.layer % len(config.hidden)]
            captured: list[Tensor] = []
            handle = tap.register_forward_hook(lambda _m, _i, out: captured.append(out.detach()))
            steps, pcts, values = [], [], []
            moments: tuple[list, list] = ([], [])

            def callback(step: int, net: nn.Module) -> None:
                if step % config.record_every:
                    return
                captured.clear()
                with torch.no_grad(), frozen_buffers(net):
                    net(probe)
                act = captured[-1].double().cpu()
                steps.append(step)
                moments[0].append(act.mean(0).numpy())
                moments[1].append(act.std(0, unbiased=False).numpy())
                pcts.append(np.percentile(act[:, config.unit].numpy(), PERCENTILES))
                values.append(act.flatten().float().numpy())

            train_config = TrainConfig(steps=config.steps, lr=config.lr, batch_size=config.batch_size,
                                       eval_every=config.eval_every, seed=seed)
            history = train(model, data, train_config, callback=callback)
            handle.remove()
            batch_mean, batch_std = np.array(moments[0]), np.array(moments[1])
            runs.append(
                NoisyBNRun(
                    variant, seed, history, np.array(steps), batch_mean, batch_std, np.array(pcts),
                    distribution_instability(batch_mean, batch_std), model, np.array(values),
                )
            )
    return runs


# --------------------------------------------------------------------------------------------------------------------
# Internal covariate shift through gradients (Definition 2.1)
# --------------------------------------------------------------------------------------------------------------------


def _linear_weights(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The weight matrices of every nn.Linear in `model`, in forward order, with their parameter names."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [(names[id(m.weight)], m.weight) for m in model.modules() if isinstance(m, nn.Linear)]


def gradient_ics(model: nn.Module, x: Tensor, y: Tensor, lr: float) -> tuple[np.ndarray, np.ndarray]:
    """ICS of every Linear layer in the sense of Santurkar et al. (2018), Definition 2.1, on the batch (x, y).

    G_i is the gradient of the cross-entropy with respect to layer i's weight at the current parameters (the gradient a
    simultaneous SGD update would apply); G'_i is the same gradient after every parameter *before* layer i has taken
    its SGD step W <- W - lr * G. Returns (l2, cosine), each (n_layers,): ||G_i - G'_i|| and cos(G_i, G'_i).
    Works on a copy in train mode; the model itself is untouched. Layer 0 has nothing before it: l2 = 0, cosine = 1.
    """
    net = copy.deepcopy(model).train()
    params = dict(net.named_parameters())
    order = [n for n, _ in net.named_parameters()]
    weights = [n for n, _ in _linear_weights(net)]
    loss = F.cross_entropy(net(x), y)
    grads = dict(zip(order, torch.autograd.grad(loss, [params[n] for n in order])))
    l2, cosine = [], []
    for name in weights:
        before = order[: order.index(name)]
        with torch.no_grad():
            for n in before:
                params[n].sub_(lr * grads[n])
        loss_shifted = F.cross_entropy(net(x), y)
        (g_shifted,) = torch.autograd.grad(loss_shifted, [params[name]])
        with torch.no_grad():
            for n in before:
                params[n].add_(lr * grads[n])
        g = grads[name]
        l2.append((g - g_shifted).norm().item())
        cosine.append(F.cosine_similarity(g.flatten(), g_shifted.flatten(), dim=0).item())
    return np.array(l2), np.array(cosine)


def lower_layer_step(model: nn.Module, x: Tensor, y: Tensor, lr: float) -> np.ndarray:
    """How far the layers below each Linear layer move in one SGD step on (x, y), relative to their own size.

    For Linear layer i, theta_<i are the parameters that `gradient_ics` moves before measuring G'_i (every parameter
    registered before layer i's weight: weights, biases, gamma, beta). Returns (n_layers,) with
    ||lr * dL/dtheta_<i|| / ||theta_<i||; layer 0 has nothing below it: 0. Dividing the relative ICS
    ||G_i - G'_i|| / ||G_i|| by this gives the gradient's relative change per relative step of the layers below.

    >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    >>> step = lower_layer_step(net, torch.randn(8, 3), torch.randint(0, 2, (8,)), lr=0.1)
    >>> step.shape, float(step[0]), bool(step[1] > 0)
    ((2,), 0.0, True)
    """
    if not lr > 0:
        raise ValueError(f"lr must be a positive learning rate, got {lr!r}")
    named = list(model.named_parameters())
    order = [n for n, _ in named]
    with frozen_buffers(model):  # a training-mode pass that leaves the running statistics alone
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), [p for _, p in named])
    step_sq = np.array([(lr * g.detach().double()).pow(2).sum().item() for g in grads])
    size_sq = np.array([p.detach().double().pow(2).sum().item() for _, p in named])
    relative = []
    for name, _ in _linear_weights(model):
        below = order.index(name)
        size = math.sqrt(size_sq[:below].sum())
        relative.append(math.sqrt(step_sq[:below].sum()) / size if below else 0.0)
    return np.array(relative)


@dataclass(frozen=True)
class ICSConfig:
    """Training runs on which `gradient_ics` is measured every `measure_every` steps on a fixed batch.

    data: ``"digits"`` (an MLP with `activation`) or ``"linear"`` (a deep linear network on `linear_teacher_data`
    drawn with `teacher_seed`, `hidden` identity layers initialised with N(0, 1/width)). init_std: the MLP's
    N(0, init_std^2) initialisation. The fixed batch is `batch_size` training examples drawn with `probe_seed`.
    """

    data: str = "digits"
    hidden: tuple[int, ...] = (100, 100, 100)
    activation: str = "sigmoid"
    norms: tuple[str, ...] = ("none", "bn")
    steps: int = 300
    lr: float = 0.5
    batch_size: int = 60
    measure_every: int = 25
    seeds: tuple[int, ...] = (0, 1)
    init_std: float | None = 0.1
    probe_seed: int = 54321
    teacher_seed: int = 0


@dataclass
class ICSRun:
    """measure_step: (T,); l2, cosine: (T, n_linear_layers) from `gradient_ics`; grad_norm: (T, n_linear_layers)
    ||G_i||; lower_step: (T, n_linear_layers) from `lower_layer_step`; history: the run's `History`."""

    norm: str
    seed: int
    history: History
    measure_step: np.ndarray
    l2: np.ndarray
    cosine: np.ndarray
    grad_norm: np.ndarray
    lower_step: np.ndarray


def ics_experiment(config: ICSConfig, data: Dataset | None = None) -> list[ICSRun]:
    """Train one network per (norm, seed) and measure ICS (Definition 2.1) at checkpoints; runs norm-major.

    data: the digits `Dataset` for ``config.data == "digits"``; for ``"linear"`` only its device is used.
    """
    if config.data == "linear":
        synthetic = linear_teacher_data(seed=config.teacher_seed)
        data = synthetic.to(data.x_train.device) if data is not None else synthetic
        activation, init_std = "identity", 1.0 / math.sqrt(config.hidden[0])
    elif config.data == "digits":
        if data is None:
            raise ValueError("config.data='digits' needs the digits Dataset as `data`")
        activation, init_std = config.activation, config.init_std
    else:
        raise ValueError(f"config.data must be 'digits' or 'linear', got {config.data!r}")
    x_probe, y_probe = _probe_batch(data, config.batch_size, config.probe_seed)
    runs = []
    for norm in config.norms:
        for seed in config.seeds:
            model = mlp(
                data.n_features, hidden=config.hidden, out_features=data.n_classes, activation=activation,
                norm=norm, linear_bias=norm == "none", init_std=init_std, seed=seed,
            )
            steps, l2s, coss, gnorms, lower = [], [], [], [], []

            def callback(step: int, net: nn.Module) -> None:
                if step % config.measure_every:
                    return
                l2, cos = gradient_ics(net, x_probe, y_probe, config.lr)
                ws = [w for _, w in _linear_weights(net)]
                with frozen_buffers(net):
                    loss = F.cross_entropy(net(x_probe), y_probe)
                    gnorms.append([g.norm().item() for g in torch.autograd.grad(loss, ws)])
                lower.append(lower_layer_step(net, x_probe, y_probe, config.lr))
                steps.append(step)
                l2s.append(l2)
                coss.append(cos)

            history = train(
                model, data, TrainConfig(steps=config.steps, lr=config.lr, batch_size=config.batch_size,
                                         eval_every=config.measure_every, seed=seed),
                callback=callback,
            )
            runs.append(
                ICSRun(norm, seed, history, np.array(steps), np.array(l2s), np.array(coss), np.array(gnorms),
                       np.array(lower))
            )
    return runs


# --------------------------------------------------------------------------------------------------------------------
# The loss landscape along a direction
# --------------------------------------------------------------------------------------------------------------------


def _loss_and_weight_grads(net: nn.Module, weights: list[nn.Parameter], x: Tensor, y: Tensor):
    loss = F.cross_entropy(net(x), y)
    return loss.item(), [g.detach() for g in torch.autograd.grad(loss, weights)]


def _probe_directions(grads: list[Tensor], direction: str, seed: int) -> list[Tensor]:
    """-g per layer (``"gradient"``), or a Gaussian direction rescaled per layer to ||g_k|| (``"random"``)."""
    if direction == "gradient":
        return [-g for g in grads]
    gen = torch.Generator().manual_seed(seed)
    dirs = []
    for g in grads:
        r = torch.randn(g.shape, generator=gen).to(g)
        dirs.append(r * (g.norm() / r.norm().clamp_min(1e-30)))
    return dirs


def landscape_probe(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    step_sizes: Sequence[float],
    direction: str = "gradient",
    relative: bool = False,
    seed: int = 0,
) -> dict[str, float]:
    """Walk from the current weights along a direction and measure the loss and the gradient (Santurkar Fig. 4).

    Only the weight matrices of the nn.Linear layers move (biases, gamma, beta stay put). With g = dL/dW on (x, y) in
    train mode and d the direction (``"gradient"``: -g; ``"random"``: Gaussian, rescaled per layer to ||g_k||):

    - ``relative=False`` (the paper's protocol): W' = W + eta * d for each eta in `step_sizes`; distances and gradient
      changes are Euclidean over all weight matrices.
    - ``relative=True`` (per-layer relative units, invariant to rescaling any layer's weights): each layer moves by
      rho = eta of its own norm, W_k' = W_k + eta * ||W_k|| * d_k / ||d_k||; the distance is eta * sqrt(n_layers)
      and a gradient change is measured as sqrt(sum_k (||W_k|| * ||g_k(W') - g_k(W)||)^2).

    Returns ``loss_range`` (max - min of the loss over the steps), ``loss_min``, ``loss_max``, ``grad_change_max``
    and ``grad_change_min`` (over the steps) and ``beta_eff`` (the max over steps of gradient change / distance).
    The model is not changed (a copy is used).
    """
    if direction not in ("gradient", "random"):
        raise ValueError(f"direction must be 'gradient' or 'random', got {direction!r}")
    if len(step_sizes) == 0 or min(step_sizes) <= 0:
        raise ValueError(f"step_sizes must be a non-empty sequence of positive numbers, got {step_sizes!r}")
    net = copy.deepcopy(model).train()
    weights = [w for _, w in _linear_weights(net)]
    origin = [w.detach().clone() for w in weights]
    _, grads = _loss_and_weight_grads(net, weights, x, y)
    dirs = _probe_directions(grads, direction, seed)
    w_norms = [w.norm() for w in origin]
    losses, changes, betas = [], [], []
    for eta in step_sizes:
        with torch.no_grad():
            for w, w0, d, wn in zip(weights, origin, dirs, w_norms):
                step = eta * wn * d / d.norm().clamp_min(1e-30) if relative else eta * d
                w.copy_(w0 + step)
        loss, new_grads = _loss_and_weight_grads(net, weights, x, y)
        if relative:
            change = math.sqrt(sum(((wn * (g1 - g0).norm()) ** 2).item() for g0, g1, wn in zip(grads, new_grads, w_norms)))
            distance = eta * math.sqrt(len(weights))
        else:
            change = math.sqrt(sum(((g1 - g0).norm() ** 2).item() for g0, g1 in zip(grads, new_grads)))
            distance = eta * math.sqrt(sum((d.norm() ** 2).item() for d in dirs))
        losses.append(loss)
        changes.append(change)
        betas.append(change / max(distance, 1e-30))
    return {
        "loss_range": max(losses) - min(losses),
        "loss_min": min(losses),
        "loss_max": max(losses),
        "grad_change_max": max(changes),
        "grad_change_min": min(changes),
        "beta_eff": max(betas),
    }


@torch.no_grad()
def rescale_pre_norm_weights(model: nn.Sequential, factor: float) -> nn.Sequential:
    """A copy of an `mlp` with every hidden Linear weight (the ones feeding a normalization) multiplied by `factor`.

    With BN (or ℓp BN without bias) after each of them the network computes the same function: BN(a W x) = BN(W x) for
    a > 0, up to eps. Gradients with respect to those weights scale by 1/a, second derivatives by 1/a^2.
    """
    if factor <= 0:
        raise ValueError(f"factor must be positive (BN is invariant to positive rescaling only), got {factor!r}")
    scaled = copy.deepcopy(model)
    for layer in hidden_linears(scaled):
        layer.weight.mul_(factor)
    return scaled


def scale_symmetry(model: nn.Sequential, x: Tensor, y: Tensor, factor: float) -> dict[str, float]:
    """Loss, gradient and curvature of the pre-norm weights before and after `rescale_pre_norm_weights` by `factor`.

    The block is the hidden Linear weights (the ones feeding a normalization); v is the unit vector along the block's
    gradient in the original model. Returns ``loss_ratio`` (scaled / original; 1 for a scale-invariant net),
    ``grad_ratio`` (||g_a|| / ||g||; 1/a) and ``curvature_ratio`` (v^T H_a v / v^T H v; 1/a^2), all in train mode.
    """

    def measure(net: nn.Sequential, v: list[Tensor] | None):
        block = [m.weight for m in hidden_linears(net)]
        with frozen_buffers(net):
            loss = F.cross_entropy(net(x), y)
        grads = torch.autograd.grad(loss, block, create_graph=True)
        if v is None:
            norm = torch.sqrt(sum((g.detach() ** 2).sum() for g in grads))
            v = [g.detach() / norm for g in grads]
        directional = sum((g * vk).sum() for g, vk in zip(grads, v))
        hv = torch.autograd.grad(directional, block)
        curvature = sum((h * vk).sum() for h, vk in zip(hv, v)).item()
        grad_norm = math.sqrt(sum((g.detach() ** 2).sum().item() for g in grads))
        return loss.item(), grad_norm, curvature, v

    loss, grad_norm, curvature, v = measure(model, None)
    loss_a, grad_norm_a, curvature_a, _ = measure(rescale_pre_norm_weights(model, factor), v)
    return {
        "loss_ratio": loss_a / loss,
        "grad_ratio": grad_norm_a / grad_norm,
        "curvature_ratio": curvature_a / curvature,
    }


@dataclass(frozen=True)
class LandscapeConfig:
    """Sigmoid MLPs on digits trained with SGD; `landscape_probe` runs every `measure_every` steps on a fixed batch.

    step_sizes: multiples of lr along the gradient in the paper's (absolute) protocol. relative_steps: per-layer
    relative step sizes for the scale-invariant protocol. The fixed batch is `batch_size` training examples drawn with
    `probe_seed`; the random direction at step t is drawn with seed t.
    """

    hidden: tuple[int, ...] = (100, 100, 100)
    activation: str = "sigmoid"
    norms: tuple[str, ...] = ("none", "bn")
    steps: int = 500
    lr: float = 0.5
    batch_size: int = 60
    eval_every: int = 50
    measure_every: int = 50
    step_sizes: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0)
    relative_steps: tuple[float, ...] = (0.005, 0.01, 0.02, 0.05, 0.1)
    seeds: tuple[int, ...] = (0, 1)
    init_std: float | None = 0.1
    probe_seed: int = 2468


@dataclass
class LandscapeRun:
    """measure_step: (T,); measures[(direction, protocol)][key]: (T,) for every key of `landscape_probe`'s result,
    with direction in {"gradient", "random"} and protocol in {"absolute", "relative"}."""

    norm: str
    seed: int
    history: History
    measure_step: np.ndarray
    measures: dict[tuple[str, str], dict[str, np.ndarray]]
    model: nn.Module = field(repr=False)


def landscape_experiment(config: LandscapeConfig, data: Dataset) -> list[LandscapeRun]:
    """Train one network per (norm, seed) and probe the landscape at checkpoints; runs norm-major."""
    x_probe, y_probe = _probe_batch(data, config.batch_size, config.probe_seed)
    absolute_steps = tuple(config.lr * s for s in config.step_sizes)
    runs = []
    for norm in config.norms:
        for seed in config.seeds:
            model = mlp(
                data.n_features, hidden=config.hidden, out_features=data.n_classes, activation=config.activation,
                norm=norm, linear_bias=norm == "none", init_std=config.init_std, seed=seed,
            )
            steps: list[int] = []
            raw: dict[tuple[str, str], list[dict[str, float]]] = {}

            def callback(step: int, net: nn.Module) -> None:
                if step % config.measure_every:
                    return
                steps.append(step)
                for direction in ("gradient", "random"):
                    for protocol, sizes in (("absolute", absolute_steps), ("relative", config.relative_steps)):
                        result = landscape_probe(
                            net, x_probe, y_probe, sizes, direction, relative=protocol == "relative", seed=step
                        )
                        raw.setdefault((direction, protocol), []).append(result)

            history = train(
                model, data, TrainConfig(steps=config.steps, lr=config.lr, batch_size=config.batch_size,
                                         eval_every=config.eval_every, seed=seed),
                callback=callback,
            )
            measures = {
                key: {name: np.array([r[name] for r in results]) for name in results[0]}
                for key, results in raw.items()
            }
            runs.append(LandscapeRun(norm, seed, history, np.array(steps), measures, model))
    return runs
