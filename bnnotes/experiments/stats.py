"""Statistics tools for networks with BN-like layers: find the layers, read, swap and recompute their running
statistics, and run training-mode forward passes that leave every buffer untouched.

- `norm_layers`: every normalization layer with running statistics (bnnotes' and torch.nn's BN, SyncBatchNorm, Batch
  Renorm, Ghost BN, the ℓp layers), in module order; `statistic_names` says which buffers hold its statistics.
- `frozen_buffers`: a block in which the model runs (in training mode by default) and after which every buffer and
  every module's mode is as before: the one way to "run in train mode without touching the running statistics".
- `population_statistics`: Algorithm 2's population statistics (Ioffe & Szegedy, 2015) over a pass of x, returned or
  recomputed in place ("precise BN").
- `using_statistics`, `statistics_distance`: load statistics temporarily; compare two sets of them.
- `bn_inputs`, `batch_variance_ratio`: what every BN layer sees, and how far a batch's variance falls short of the
  population's.

Used by the inference, pitfalls, landscape and real-networks chapters.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from bnnotes import torch_bn

__all__ = [
    "Statistics",
    "norm_layers",
    "statistic_names",
    "frozen_buffers",
    "using_statistics",
    "population_statistics",
    "statistics_distance",
    "bn_inputs",
    "batch_variance_ratio",
]

#: Per normalization layer (in module order): its running statistics, each of shape (C,), in the order of
#: `statistic_names`: (mean, var) for BN, (mean, std) for Batch Renorm, (mean, norm) for the ℓp layers.
Statistics = list[tuple[Tensor, ...]]

# torch.nn's BN family (bnnotes' BatchNorm{1,2,3}d and SyncBatchNorm subclass it; InstanceNorm with running statistics
# too) and bnnotes' own state base (Batch Renorm, Ghost BN, the ℓp layers).
_NORM_TYPES = (nn.modules.batchnorm._NormBase, torch_bn.RunningStatsNorm)


def norm_layers(model: nn.Module) -> list[nn.Module]:
    """Every normalization layer of `model` that keeps running statistics, in module order.

    Covers torch.nn's BN layers and their bnnotes subclasses (``BatchNorm{1,2,3}d``, ``SyncBatchNorm``, the teaching
    variants), and bnnotes' ``RunningStatsNorm`` layers (Batch Renorm, Ghost BN, ℓp BN). A layer built with
    ``track_running_stats=False`` has none and is left out.

    >>> from bnnotes.experiments.models import mlp
    >>> [type(layer).__name__ for layer in norm_layers(mlp(4, hidden=(3, 2), norm="bn"))]
    ['BatchNorm1d', 'BatchNorm1d']
    """
    return [m for m in model.modules()
            if isinstance(m, _NORM_TYPES) and m.track_running_stats and m.running_mean is not None]


def statistic_names(layer: nn.Module) -> tuple[str, ...]:
    """The names of the buffers that hold `layer`'s running statistics, e.g. ``("running_mean", "running_var")``.

    >>> from bnnotes.renorm import BatchRenorm1d
    >>> statistic_names(BatchRenorm1d(3))
    ('running_mean', 'running_std')
    """
    if isinstance(layer, torch_bn.RunningStatsNorm):
        return tuple(layer.running_stats)
    if isinstance(layer, nn.modules.batchnorm._NormBase):
        return ("running_mean", "running_var")
    raise TypeError(f"expected a normalization layer with running statistics, got {type(layer).__name__}")


def _layers_or_error(model: nn.Module) -> list[nn.Module]:
    layers = norm_layers(model)
    if not layers:
        raise ValueError(f"model has no normalization layer with running statistics (BN, Batch Renorm, Ghost BN, "
                         f"ℓp BN); got a {type(model).__name__} without one")
    return layers


def _current_statistics(layers: list[nn.Module]) -> Statistics:
    return [tuple(getattr(layer, name).clone() for name in statistic_names(layer)) for layer in layers]


@contextlib.contextmanager
def frozen_buffers(model: nn.Module, train: bool = True) -> Iterator[nn.Module]:
    """Run `model` inside the block in training mode (``train=False``: eval mode); on exit every buffer (running
    statistics, ``num_batches_tracked``, ...) holds its old value again and every module has its old mode.

    Training-mode forward passes then see batch statistics, as in training, without moving the running statistics
    that eval mode uses: no deep copy of the model, no momentum set to 0.

    >>> from bnnotes.experiments.models import mlp
    >>> model = mlp(4, hidden=(3,), norm="bn").eval()
    >>> with frozen_buffers(model):
    ...     _ = model(torch.randn(8, 4))
    >>> model[1].running_mean.tolist(), int(model[1].num_batches_tracked), model.training
    ([0.0, 0.0, 0.0], 0, False)
    """
    saved_buffers = [(buffer, buffer.clone()) for buffer in model.buffers()]
    saved_modes = [(module, module.training) for module in model.modules()]
    model.train(train)
    try:
        yield model
    finally:
        with torch.no_grad():
            for buffer, value in saved_buffers:
                buffer.copy_(value)
        for module, training in saved_modes:
            module.training = training


@contextlib.contextmanager
def using_statistics(model: nn.Module, stats: Statistics) -> Iterator[nn.Module]:
    """Temporarily load `stats` into the running buffers of `model`'s normalization layers (restored on exit).

    stats: one tuple per layer of `norm_layers`, in the order of `statistic_names` (e.g. (mean, var) for BN).

    >>> from bnnotes.experiments.models import mlp
    >>> model = mlp(4, hidden=(3,), norm="bn")
    >>> with using_statistics(model, [(torch.ones(3), 2 * torch.ones(3))]):
    ...     model[1].running_var.tolist()
    [2.0, 2.0, 2.0]
    >>> model[1].running_var.tolist()
    [1.0, 1.0, 1.0]
    """
    layers = norm_layers(model)
    if len(stats) != len(layers):
        raise ValueError(f"stats has {len(stats)} entries but the model has {len(layers)} BN layers")
    saved = _current_statistics(layers)
    try:
        _load_statistics(layers, stats)
        yield model
    finally:
        _load_statistics(layers, saved)


@torch.no_grad()
def _load_statistics(layers: list[nn.Module], stats: Statistics) -> None:
    for layer, values in zip(layers, stats):
        names = statistic_names(layer)
        if len(values) != len(names):
            raise ValueError(f"{type(layer).__name__} keeps {len(names)} statistics {names}, got {len(values)}")
        for name, value in zip(names, values):
            getattr(layer, name).copy_(value)


def _batch_starts(n: int, batch_size: int | None) -> tuple[int, range]:
    m = n if batch_size is None else batch_size
    if not isinstance(m, int) or not 2 <= m <= n:
        raise ValueError(f"batch_size must be an integer in [2, {n}] for {n} examples, got {batch_size!r}")
    return m, range(0, n - m + 1, m)


@torch.no_grad()
def population_statistics(model: nn.Module, x: Tensor, batch_size: int | None = None, seed: int | None = 0, *,
                          in_place: bool = False, only_norms_train: bool = False) -> Statistics:
    """Algorithm 2's population statistics of every normalization layer, with the weights frozen.

    One pass over x (N, ...) in mini-batches of size m = batch_size (None: all of x as one batch), shuffled with
    `seed` (None: in x's order); an incomplete last batch is dropped. The network runs in training mode, as during
    training, and every layer accumulates what it would with ``momentum=None`` (a cumulative average), starting from
    reset statistics: for BN ``E[x] = mean over batches of the batch means`` and ``Var[x] = m/(m-1) * mean over
    batches of the biased batch variances``.

    in_place: False leaves `model` exactly as it was (parameters, buffers, modes, momenta); True keeps the recomputed
    statistics in the layers' buffers ("precise BN"; ``num_batches_tracked`` then counts the pass's batches) and
    restores only modes and momenta. only_norms_train: run only the normalization layers in training mode and every
    other module in eval mode (dropout off), as at inference.
    Returns one tuple of statistics per layer of `norm_layers` (see `Statistics`), as copies.
    """
    layers = _layers_or_error(model)
    m, starts = _batch_starts(x.shape[0], batch_size)
    momenta = [layer.momentum for layer in layers]
    buffers = contextlib.nullcontext() if in_place else frozen_buffers(model)
    saved_modes = [(module, module.training) for module in model.modules()]
    try:
        with buffers:
            model.train(not only_norms_train)
            for layer in layers:
                layer.train()
                layer.reset_running_stats()
                layer.momentum = None
            order = (torch.arange(x.shape[0]) if seed is None
                     else torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed)))
            order = order.to(x.device)
            for start in starts:
                model(x[order[start : start + m]])
            return _current_statistics(layers)
    finally:
        for module, training in saved_modes:
            module.training = training
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum


def statistics_distance(stats: Statistics, reference: Statistics, eps: float = 1e-5) -> float:
    """How far BN statistics `stats` are from `reference`, in units of the reference standard deviation.

    Both hold (mean, var) per layer. The mean over every channel of every layer of
    ``(|mu - mu_ref| + |sigma - sigma_ref|) / sigma_ref``, with ``sigma = sqrt(var + eps)``: 0.1 means the statistics
    are off by about a tenth of a standard deviation.

    >>> ref = [(torch.zeros(2), torch.ones(2))]
    >>> statistics_distance([(torch.full((2,), 0.5), torch.ones(2))], ref, eps=0.0)
    0.5
    """
    if len(stats) != len(reference):
        raise ValueError(f"stats has {len(stats)} layers but reference has {len(reference)}")
    errors = []
    for (mean, var), (ref_mean, ref_var) in zip(stats, reference):
        sigma, ref_sigma = torch.sqrt(var.double() + eps), torch.sqrt(ref_var.double() + eps)
        errors.append(((mean.double() - ref_mean.double()).abs() + (sigma - ref_sigma).abs()) / ref_sigma)
    return torch.cat(errors).mean().item()


@torch.no_grad()
def bn_inputs(model: nn.Module, x: Tensor) -> list[Tensor]:
    """The input of every normalization layer of `model` (module order) for one eval-mode forward pass of `x`.

    Eval mode leaves the running statistics untouched; every module's mode is restored on exit.
    Returns a list of tensors of shape (N, C) or (N, C, *spatial), one per layer of `norm_layers`.

    >>> from bnnotes.experiments.models import mlp
    >>> [tuple(t.shape) for t in bn_inputs(mlp(4, hidden=(3, 2), norm="bn"), torch.zeros(5, 4))]
    [(5, 3), (5, 2)]
    """
    layers = _layers_or_error(model)
    captured: list[Tensor] = []
    handles = [layer.register_forward_pre_hook(lambda module, inputs: captured.append(inputs[0].detach()))
               for layer in layers]
    try:
        with frozen_buffers(model, train=False):
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return captured


@torch.no_grad()
def batch_variance_ratio(x: Tensor, batch_size: int, seed: int = 0) -> Tensor:
    """Per channel, the mean biased batch variance over the variance of all of x: E_B[sigma_B^2] / sigma^2.

    x: (N, C) or (N, C, *spatial), a layer's input for N examples. The batches are `batch_size` examples each, from
    one shuffled pass (with `seed`; an incomplete last batch is dropped), so a batch holds
    m = batch_size * prod(spatial) values per channel; sigma^2 is the biased variance of all N * prod(spatial) values.
    For m independent values the ratio is (m - 1) / m (Eq. eq-inference-bias); values within one example of a
    convolutional layer are not independent, and the ratio shows by how much that matters.
    Returns a float64 tensor of shape (C,).

    >>> x = torch.tensor([[0.0], [2.0], [1.0], [3.0]])
    >>> batch_variance_ratio(x, batch_size=4).tolist()
    [1.0]
    """
    if x.dim() < 2:
        raise ValueError(f"x must have shape (N, C) or (N, C, *spatial), got {tuple(x.shape)}")
    n = x.shape[0]
    if not isinstance(batch_size, int) or not 1 <= batch_size <= n:
        raise ValueError(f"batch_size must be an integer in [1, {n}] for {n} examples, got {batch_size!r}")
    if batch_size == 1 and x.dim() == 2:
        raise ValueError("batch_size=1 with (N, C) input leaves one value per channel: its variance is 0")
    dims = [0] + list(range(2, x.dim()))
    x = x.double()
    population_var = x.var(dim=dims, correction=0)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(x.device)
    batch_vars = [x[perm[start : start + batch_size]].var(dim=dims, correction=0)
                  for start in range(0, n - batch_size + 1, batch_size)]
    return torch.stack(batch_vars).mean(0) / population_var
