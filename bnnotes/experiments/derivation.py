"""Experiments of the derivation chapter: the transform, its gradient, and what the gradient implies.

Each function runs one experiment of ``book/derivation.md``: it takes one frozen Config dataclass that holds every
constant and seed, and returns plain numbers (NumPy arrays in small dataclasses) that the chapter plots and asserts
on. Models use bnnotes' own BN and the shared `mlp`, `train`, `TrainConfig` and `load_digits`.

- `central_differences`, `gradient_agreement`: the hand-derived backward against numerical and automatic
  differentiation.
- `composed_batch_norm`: BN written as ordinary differentiable tensor ops, for autograd to differentiate.
- `detached_statistics`: BN whose backward treats the batch statistics as constants
  (`bnnotes.variants.DetachedStatsBatchNorm1d`; Ioffe & Szegedy, 2015, Section 2), trained against real BN.
- `sigmoid_linearity`: how close to linear a sigmoid is on normalized inputs scaled by gamma.
- `scale_invariance`: BN(aWu) = BN(Wu), the gradient with respect to W scales as 1/a and the step's angle as 1/a^2.
- `weight_norm_under_weight_decay`: the norm of a BN-preceded weight matrix during training, with and without decay.
- `backward_cost`: the hand-written backward of `bnnotes.torch_bn.batch_norm` against autograd over composed ops:
  time (median of interleaved runs) and the bytes saved for the backward.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from bnnotes import numpy_bn, torch_bn
from bnnotes.experiments.data import load_digits
from bnnotes.experiments.models import hidden_linears, mlp
from bnnotes.experiments.stats import frozen_buffers, norm_layers
from bnnotes.experiments.training import TrainConfig, train
from bnnotes.variants import DetachedStatsBatchNorm1d
from bnnotes.timing import median_interleaved

__all__ = [
    "central_differences",
    "composed_batch_norm",
    "GradientAgreementConfig",
    "gradient_agreement",
    "DetachedConfig",
    "DetachedRun",
    "detached_statistics",
    "sigmoid_linearity",
    "ScaleInvarianceConfig",
    "ScaleInvariance",
    "scale_invariance",
    "WeightDecayConfig",
    "WeightNormRun",
    "weight_norm_under_weight_decay",
    "BackwardCostConfig",
    "BackwardCost",
    "backward_cost",
]


# ----------------------------------------------------------------------------------------------------------------------
# The gradient, three ways


def central_differences(loss: Callable[..., float], arrays: Sequence[np.ndarray], h: float = 1e-6) -> list[np.ndarray]:
    """Numerical gradients of the scalar ``loss(*arrays)`` by central differences, one entry at a time.

    arrays: float64 NumPy arrays (not modified). Returns one gradient per array, with its shape.
    The error is O(h^2) from truncation plus O(machine eps / h) from rounding: about 1e-9 relative for h = 1e-6.

    >>> central_differences(lambda a: float(np.sum(a**2)), [np.array([1.0, -2.0])])[0].round(6).tolist()
    [2.0, -4.0]
    """
    arrays = [np.array(a, dtype=np.float64) for a in arrays]
    grads = []
    for index, array in enumerate(arrays):
        grad = np.zeros_like(array)
        for position in np.ndindex(array.shape):
            original = array[position]
            array[position] = original + h
            plus = loss(*arrays)
            array[position] = original - h
            minus = loss(*arrays)
            array[position] = original
            grad[position] = (plus - minus) / (2.0 * h)
        grads.append(grad)
    return grads


def composed_batch_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    """Training-mode BN as a chain of ordinary tensor ops, so that autograd derives (and stores for) the backward.

    x: (N, C) or (N, C, *spatial); weight, bias: (C,). The same function as `bnnotes.torch_bn.batch_norm` in training
    mode without running statistics, but every intermediate that an op needs for its backward is kept alive.
    """
    dims = [0] + list(range(2, x.dim()))
    per_channel = (1, -1) + (1,) * (x.dim() - 2)
    batch_mean = x.mean(dim=dims, keepdim=True)
    x_centered = x - batch_mean
    batch_var = (x_centered * x_centered).mean(dim=dims, keepdim=True)
    x_hat = x_centered * torch.rsqrt(batch_var + eps)
    return x_hat * weight.view(per_channel) + bias.view(per_channel)


def _bn_case(shape: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """float64 x with channels of different means and scales, non-trivial gamma and beta, and a non-uniform dy."""
    rng = np.random.default_rng(seed)
    channels = shape[1]
    per_channel = (1, channels) + (1,) * (len(shape) - 2)
    x = rng.uniform(-3, 3, size=channels).reshape(per_channel) + np.exp(
        rng.uniform(-1.0, 1.0, size=channels)
    ).reshape(per_channel) * rng.standard_normal(shape)
    gamma = rng.uniform(0.5, 2.0, size=channels)
    beta = rng.uniform(-1.0, 1.0, size=channels)
    dy = rng.standard_normal(shape) + rng.uniform(-1.0, 1.0, size=channels).reshape(per_channel)
    return x, gamma, beta, dy


@dataclass(frozen=True)
class GradientAgreementConfig:
    """`gradient_agreement`: a float64 case of `shape` drawn with `seed`, BN with `eps`, central differences with
    step `h`."""

    shape: tuple[int, ...] = (8, 3)
    eps: float = 1e-5
    seed: int = 0
    h: float = 1e-6


def gradient_agreement(config: GradientAgreementConfig = GradientAgreementConfig()) -> dict[str, float]:
    """The largest relative disagreement of each gradient method with `numpy_bn.backward` (the compact form).

    The loss is sum(dy * BN(x)) with a non-uniform dy, in float64. Compared, for (dx, dgamma, dbeta) together:
    ``"staged"`` (`numpy_bn.backward_staged`), ``"central differences"``, ``"autograd (composed ops)"`` and
    ``"torch_bn (hand-written)"``. Returns ``{method: max|g - g_compact| / max|g_compact|}``.

    >>> errors = gradient_agreement(GradientAgreementConfig(shape=(4, 2)))
    >>> bool(errors["staged"] < 1e-12 and errors["central differences"] < 1e-6)
    True
    """
    eps = config.eps
    x, gamma, beta, dy = _bn_case(config.shape, config.seed)
    _, cache = numpy_bn.forward(x, gamma, beta, eps)
    compact = numpy_bn.backward(dy, cache)

    def loss(x_: np.ndarray, gamma_: np.ndarray, beta_: np.ndarray) -> float:
        return float(np.sum(dy * numpy_bn.forward(x_, gamma_, beta_, eps)[0]))

    results = {
        "staged": numpy_bn.backward_staged(dy, cache),
        "central differences": central_differences(loss, [x, gamma, beta], h=config.h),
    }
    for name, function in [
        ("autograd (composed ops)", lambda xt, wt, bt: composed_batch_norm(xt, wt, bt, eps)),
        ("torch_bn (hand-written)", lambda xt, wt, bt: torch_bn.batch_norm(xt, None, None, wt, bt, True, 0.1, eps)),
    ]:
        leaves = [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (x, gamma, beta)]
        function(*leaves).backward(torch.tensor(dy))
        results[name] = [leaf.grad.numpy() for leaf in leaves]
    return {
        name: max(float(np.abs(g - c).max() / np.abs(c).max()) for g, c in zip(grads, compact))
        for name, grads in results.items()
    }


# ----------------------------------------------------------------------------------------------------------------------
# Why the gradient must flow through the batch statistics


@dataclass
class DetachedRun:
    """One training run of `detached_statistics`.

    step: the steps at which the norms were recorded. bias_norm, weight_norm: the Euclidean norm of all pre-BN biases
    (weights) of the hidden Linear layers together, at those steps. train_loss: the mini-batch loss of every step.
    final_test_acc: eval-mode test accuracy at the end. final_gamma: the BN scales gamma of all hidden layers at the
    end (they start at 1). final_pre_bn_std: at the end, the standard deviation over the training set of every hidden
    unit's pre-BN activation (the gamma that would make its BN the identity), in the same order as final_gamma.
    """

    kind: str
    seed: int
    step: list[int] = field(default_factory=list)
    bias_norm: list[float] = field(default_factory=list)
    weight_norm: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    final_test_acc: float = float("nan")
    final_gamma: np.ndarray = field(default_factory=lambda: np.zeros(0))
    final_pre_bn_std: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def final_loss(self, window: int = 100) -> float:
        """The mean mini-batch loss over the last `window` steps."""
        return float(np.mean(self.train_loss[-window:]))


@dataclass(frozen=True)
class DetachedConfig:
    """`detached_statistics`: the sigmoid MLP of widths `hidden` (PyTorch's default initialization from the seed),
    plain SGD at `lr` on batches of `batch_size` for `steps` steps per seed; norms recorded every `record_every`
    steps."""

    seeds: tuple[int, ...] = (0, 1)
    steps: int = 800
    lr: float = 0.5
    batch_size: int = 60
    hidden: tuple[int, ...] = (100, 100, 100)
    record_every: int = 25


def detached_statistics(config: DetachedConfig = DetachedConfig(),
                        device: torch.device | str | None = None) -> list[DetachedRun]:
    """Train the same sigmoid MLP with real BN and with `DetachedStatsBatchNorm1d`, each Linear with a bias.

    With real BN a bias before BN has exactly no effect on the output and gets exactly zero gradient; with the
    statistics detached it gets a gradient the normalization then cancels, so it drifts without improving the loss.
    Returns one `DetachedRun` per (kind, seed), kinds ``"bn"`` and ``"detached"``.
    """
    data = load_digits(device=device)
    steps, record_every = config.steps, config.record_every
    train_config = TrainConfig(steps=steps, lr=config.lr, batch_size=config.batch_size, eval_every=steps)
    factories = {"bn": torch_bn.BatchNorm1d, "detached": DetachedStatsBatchNorm1d}
    runs = []
    for seed in config.seeds:
        for kind, factory in factories.items():
            model = mlp(data.n_features, hidden=config.hidden, norm=factory, linear_bias=True, seed=seed)
            linears = hidden_linears(model)
            run = DetachedRun(kind, seed)

            def record(step: int, _model: nn.Module, run: DetachedRun = run, linears: list = linears) -> None:
                if step % record_every == 0 or step == steps:
                    with torch.no_grad():
                        run.step.append(step)
                        run.bias_norm.append(float(torch.cat([layer.bias for layer in linears]).norm()))
                        run.weight_norm.append(float(torch.cat([layer.weight.flatten() for layer in linears]).norm()))

            history = train(model, data, dataclasses.replace(train_config, seed=seed), callback=record)
            run.train_loss = history.train_loss
            run.final_test_acc = history.final_test_acc
            run.final_gamma = np.concatenate([bn.weight.detach().cpu().numpy() for bn in norm_layers(model)])
            run.final_pre_bn_std = _pre_bn_std(model, data.x_train)
            runs.append(run)
    return runs


@torch.no_grad()
def _pre_bn_std(model: nn.Sequential, x: Tensor) -> np.ndarray:
    """The per-unit standard deviation of every hidden Linear's output on x, in eval mode, concatenated."""
    outputs: list[Tensor] = []
    handles = [linear.register_forward_hook(lambda module, inputs, output: outputs.append(output))
               for linear in hidden_linears(model)]
    try:
        with frozen_buffers(model, train=False):
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return np.concatenate([pre_bn.std(dim=0, correction=0).cpu().numpy() for pre_bn in outputs])


def sigmoid_linearity(gammas: Sequence[float], samples: int = 20000, seed: int = 0) -> np.ndarray:
    """How linear a sigmoid is on its input gamma * x_hat, x_hat ~ N(0, 1): the R^2 of the best straight-line fit.

    R^2 = 1 means the unit behaves like a linear one on the inputs it sees. Returns an array, one R^2 per gamma.

    >>> bool(sigmoid_linearity([1.0])[0] > 0.98)
    True
    """
    x_hat = np.random.default_rng(seed).standard_normal(samples)
    r_squared = []
    for gamma in gammas:
        z = gamma * x_hat
        s = 1.0 / (1.0 + np.exp(-z))
        design = np.stack([z, np.ones_like(z)], axis=1)
        residual = s - design @ np.linalg.lstsq(design, s, rcond=None)[0]
        r_squared.append(1.0 - residual.var() / s.var())
    return np.array(r_squared)


# ----------------------------------------------------------------------------------------------------------------------
# Scale invariance


@dataclass
class ScaleInvariance:
    """What `scale_invariance` measured for each scale a of the weight matrix.

    output_change: ``max|BN(aWu) - BN(Wu)|``. grad_norm: ``||d loss / d(aW)||``. step_angle: the angle (radians) between
    aW and aW - lr * grad after one SGD step with the same lr for every a. row_cosine: the largest |cosine| between a
    row of aW and the same row of its gradient (0 when every row's gradient is orthogonal to the row).
    """

    scales: np.ndarray
    output_change: np.ndarray
    grad_norm: np.ndarray
    step_angle: np.ndarray
    row_cosine: np.ndarray


@dataclass(frozen=True)
class ScaleInvarianceConfig:
    """`scale_invariance`: a (batch, in_features) input u and an (out_features, in_features) W drawn with `seed`,
    scaled by each of `scales`; BN with `eps`; one SGD step of `lr`."""

    scales: tuple[float, ...] = (0.3, 0.6, 1.0, 1.7, 3.1, 7.3)
    batch: int = 32
    in_features: int = 20
    out_features: int = 10
    lr: float = 0.01
    eps: float = 0.0
    seed: int = 0


def scale_invariance(config: ScaleInvarianceConfig = ScaleInvarianceConfig()) -> ScaleInvariance:
    """BN(aWu) against BN(Wu) with `bnnotes.torch_bn.batch_norm`, in float64, and the gradient with respect to aW.

    With eps = 0 the invariance is exact; eps > 0 breaks it by a relative eps / (a^2 var). The loss is
    sum(g * BN(aWu)) for a fixed random g. Returns a `ScaleInvariance`.

    >>> bool(scale_invariance().output_change.max() < 1e-12)
    True
    """
    batch, in_features, out_features = config.batch, config.in_features, config.out_features
    scales, lr, eps = config.scales, config.lr, config.eps
    generator = torch.Generator().manual_seed(config.seed)
    u = torch.randn(batch, in_features, generator=generator, dtype=torch.float64)
    weight = torch.randn(out_features, in_features, generator=generator, dtype=torch.float64)
    upstream = torch.randn(batch, out_features, generator=generator, dtype=torch.float64)
    gamma = torch.rand(out_features, generator=generator, dtype=torch.float64) + 0.5
    beta = torch.randn(out_features, generator=generator, dtype=torch.float64)

    def bn_of(w: Tensor) -> Tensor:
        # The training-mode core of torch_bn.batch_norm, called directly: the functional form follows torch and
        # refuses eps = 0 in training, the case in which the invariance is exact.
        return torch_bn.BatchNormFunction.apply(u @ w.T, gamma, beta, eps)[0]

    reference = bn_of(weight)
    output_change, grad_norm, step_angle, row_cosine = [], [], [], []
    for a in scales:
        scaled = (a * weight).requires_grad_(True)
        out = bn_of(scaled)
        (out * upstream).sum().backward()
        output_change.append(float((out.detach() - reference).abs().max()))
        grad_norm.append(float(scaled.grad.norm()))
        # Each output feature is normalized on its own, so the orthogonality <W, grad> = 0 holds row by row.
        row_cosine.append(float(torch.nn.functional.cosine_similarity(scaled.detach(), scaled.grad, dim=1).abs().max()))
        with torch.no_grad():
            stepped = scaled - lr * scaled.grad
            cosine = (stepped * scaled).sum() / (stepped.norm() * scaled.norm())
            step_angle.append(float(torch.arccos(cosine.clamp(-1.0, 1.0))))
    return ScaleInvariance(np.array(scales, dtype=float), np.array(output_change), np.array(grad_norm),
                           np.array(step_angle), np.array(row_cosine))


@dataclass
class WeightNormRun:
    """One run of `weight_norm_under_weight_decay`: the norm of the first hidden weight matrix over training."""

    weight_decay: float
    step: list[int] = field(default_factory=list)
    weight_norm: list[float] = field(default_factory=list)
    final_test_acc: float = float("nan")


@dataclass(frozen=True)
class WeightDecayConfig:
    """`weight_norm_under_weight_decay`: a 3 x 100 sigmoid MLP with BN (initialization and batches from `seed`),
    plain SGD at `lr` on batches of `batch_size` for `steps` steps under each of `weight_decays`; the norm recorded
    every `record_every` steps."""

    weight_decays: tuple[float, ...] = (0.0, 1e-3)
    steps: int = 800
    lr: float = 0.5
    batch_size: int = 60
    seed: int = 0
    record_every: int = 25


def weight_norm_under_weight_decay(config: WeightDecayConfig = WeightDecayConfig(),
                                   device: torch.device | str | None = None) -> list[WeightNormRun]:
    """Train a 3x100 sigmoid MLP with BN (no pre-BN biases) under each weight decay; record the first layer's norm.

    The loss does not depend on the scale of a BN-preceded weight matrix, so its gradient is orthogonal to W and plain
    SGD can only grow it (``||W - lr g||^2 = ||W||^2 + lr^2 ||g||^2``); weight decay shrinks it, which raises the
    effective learning rate ``lr / ||W||^2``. Returns one `WeightNormRun` per weight decay.
    """
    data = load_digits(device=device)
    steps, record_every = config.steps, config.record_every
    runs = []
    for weight_decay in config.weight_decays:
        model = mlp(data.n_features, norm="bn", seed=config.seed)
        first = hidden_linears(model)[0]
        run = WeightNormRun(weight_decay)

        def record(step: int, model: nn.Module, run: WeightNormRun = run, first: nn.Linear = first) -> None:
            if step % record_every == 0 or step == steps:
                run.step.append(step)
                run.weight_norm.append(float(first.weight.detach().norm()))

        train_config = TrainConfig(steps=steps, lr=config.lr, batch_size=config.batch_size, weight_decay=weight_decay,
                                   eval_every=steps, seed=config.seed)
        run.final_test_acc = train(model, data, train_config, callback=record).final_test_acc
        runs.append(run)
    return runs


# ----------------------------------------------------------------------------------------------------------------------
# Hand-written backward against autograd over composed ops


@dataclass
class BackwardCost:
    """What `backward_cost` measured for one input shape.

    seconds: {method: median seconds of one forward + backward}. saved_bytes: {method: bytes of the tensors autograd
    keeps for the backward, counting each storage once, the input included and the parameters (weight, bias) not}.
    """

    shape: tuple[int, ...]
    seconds: dict[str, float]
    saved_bytes: dict[str, int]

    @property
    def time_ratio(self) -> float:
        """Composed-ops time over hand-written time (above 1: the hand-written backward is faster)."""
        return self.seconds["composed ops"] / self.seconds["hand-written"]


def _methods(eps: float) -> dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]]:
    return {
        "hand-written": lambda x, w, b: torch_bn.batch_norm(x, None, None, w, b, training=True, eps=eps),
        "composed ops": lambda x, w, b: composed_batch_norm(x, w, b, eps),
    }


def saved_tensor_bytes(function: Callable[..., Tensor], x: Tensor, *parameters: Tensor) -> int:
    """Bytes autograd saves for the backward of ``function(x, *parameters)``, each storage counted once.

    The input x counts when it is saved (it must then stay alive until the backward); the parameters do not (they are
    alive anyway). Uses ``torch.autograd.graph.saved_tensors_hooks``: every tensor an op keeps for its backward passes
    through the pack hook. Deterministic for given shapes and dtype.
    """
    excluded = {t.untyped_storage().data_ptr() for t in parameters}
    storages: dict[int, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        function(x, *parameters)
    return sum(storages.values())


@dataclass(frozen=True)
class BackwardCostConfig:
    """`backward_cost`: float32 inputs of each of `shapes` drawn with `seed`, BN with `eps`, `repeats` timing rounds
    after `warmup` untimed calls."""

    shapes: tuple[tuple[int, ...], ...] = ((256, 1024), (32, 64, 16, 16))
    repeats: int = 25
    warmup: int = 2
    eps: float = 1e-5
    seed: int = 0


def backward_cost(config: BackwardCostConfig = BackwardCostConfig(),
                  device: torch.device | str | None = None) -> list[BackwardCost]:
    """Time and saved-tensor bytes of one training forward + backward in float32, for `bnnotes.torch_bn.batch_norm`
    (hand-written backward) and `composed_batch_norm` (autograd).

    The time is `bnnotes.timing.median_interleaved`'s: the median of `repeats` interleaved rounds, synchronized on an
    accelerator. A measurement, not a benchmark to assert on: the times depend on the machine and its load. Returns
    one `BackwardCost` per shape. device: default the CPU.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    generator = torch.Generator().manual_seed(config.seed)
    methods = _methods(config.eps)
    results = []
    for shape in config.shapes:
        x = (torch.randn(shape, generator=generator) * 2.0 + 3.0).to(device).requires_grad_(True)
        weight = (torch.rand(shape[1], generator=generator) + 0.5).to(device).requires_grad_(True)
        bias = torch.randn(shape[1], generator=generator).to(device).requires_grad_(True)
        dy = torch.randn(shape, generator=generator).to(device)
        saved = {name: saved_tensor_bytes(function, x, weight, bias) for name, function in methods.items()}

        def step(function: Callable[[Tensor, Tensor, Tensor], Tensor]) -> None:
            x.grad = weight.grad = bias.grad = None
            function(x, weight, bias).backward(dy)

        steps = {name: (lambda function=function: step(function)) for name, function in methods.items()}
        timing = median_interleaved(steps, config.repeats, inner=1, warmup=config.warmup, device=device)
        results.append(BackwardCost(tuple(shape), timing.median, saved))
    return results
