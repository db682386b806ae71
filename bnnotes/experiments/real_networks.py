"""Experiments of the chapter "BN in real networks, and what replaced it".

- The normalization family on feature maps (N, C, H, W): which values share statistics (`statistics_mask`), and
  what follows from it (`family_properties`: dependence on the batch, batch size 1, training versus inference).
- A small convolutional network on upsampled digits (`load_digit_images`, `models.convnet`), with the course's
  training loop.
- Residual networks at initialization: the variance of the residual stream with depth (`models.residual_mlp`,
  `stream_mean_square`; De & Smith, 2020), and zero-initialized gamma in the last BN of each branch
  (Goyal et al., 2017).
- Why sequence models normalize per token: BN's statistics over padded batches (`padding_experiment`), and pre-LN
  against post-LN stacks (`ln_stream_mean_square`).
- Dropout before BN: the variance shift (Li et al., 2019; `dropout_variance_shift`).
- Recomputing BN's statistics after the weights change under it ("precise BN"): `precise_bn`, `swa_average`,
  `magnitude_prune`.

PyTorch's own LayerNorm, GroupNorm, InstanceNorm and RMSNorm are used; BN is `bnnotes.torch_bn`'s (via `make_norm`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnnotes.experiments.data import Dataset, load_digits
# The chapter's models live with the others in `models` (and are documented there); the chapter and its exercises
# name them from here.
from bnnotes.experiments.models import PreActBlock, ResidualMLP, convnet, make_norm, residual_mlp  # noqa: F401
from bnnotes.experiments.stats import frozen_buffers, norm_layers, population_statistics
from bnnotes.experiments.training import History, TrainConfig, train

__all__ = [
    "FAMILY",
    "family_modules",
    "statistics_mask",
    "FamilyConfig",
    "FamilyRow",
    "family_properties",
    "load_digit_images",
    "lr_sweep",
    "largest_good_lr",
    "stream_mean_square",
    "PaddingConfig",
    "PaddingResult",
    "padding_experiment",
    "LNStreamConfig",
    "LNStream",
    "ln_stream_mean_square",
    "DropoutShiftConfig",
    "DropoutShift",
    "dropout_variance_shift",
    "dropout_before_bn_mlp",
    "variance_shift_in",
    "is_batch_norm",
    "precise_bn",
    "swa_average",
    "magnitude_prune",
]

# The five normalizers of the family picture, in the order of Wu & He (2018, Figure 2), plus RMSNorm.
FAMILY: tuple[str, ...] = ("bn", "ln", "in", "gn", "rms")


# --------------------------------------------------------------------------------------------------------------------
# The family
# --------------------------------------------------------------------------------------------------------------------


def family_modules(channels: int, height: int, width: int, num_groups: int = 2) -> dict[str, nn.Module]:
    """One module per normalizer of `FAMILY` for feature maps (N, channels, height, width), in float64.

    BN is `bnnotes.torch_bn.BatchNorm2d`; the others are torch's own: ``nn.LayerNorm((C, H, W))``,
    ``nn.InstanceNorm2d(C, affine=True)``, ``nn.GroupNorm(num_groups, C)`` and ``nn.RMSNorm((C, H, W))``.
    """
    return {
        "bn": make_norm("bn", channels, spatial=True).double(),
        "ln": nn.LayerNorm((channels, height, width)).double(),
        "in": nn.InstanceNorm2d(channels, affine=True).double(),
        "gn": nn.GroupNorm(num_groups, channels).double(),
        "rms": nn.RMSNorm((channels, height, width), eps=1e-5).double(),
    }


def statistics_mask(module: nn.Module, shape: tuple[int, int, int, int], n: int = 0, c: int = 0,
                    seed: int = 0) -> np.ndarray:
    """Which (example, channel) cells share statistics with cell (n, c): measured, not declared.

    Perturbs x[n, c] (all its positions) of a standard normal x drawn with `seed`, and returns a boolean (N, C) array,
    True where the output changed, with the module in training mode. For BN that is channel c of every example; for
    LayerNorm every channel of example n.
    """
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator, dtype=torch.float64)
    bumped = x.clone()
    bumped[n, c] = bumped[n, c] * 3.0 + 1.0
    with torch.no_grad(), frozen_buffers(module):
        change = (module(bumped) - module(x)).abs().flatten(2).amax(dim=2)  # (N, C)
    changed = (change > 1e-9).numpy()
    changed[n, c] = True  # the perturbed cell itself (it changes however it is normalized)
    return changed


@dataclass(frozen=True)
class FamilyRow:
    """What one normalizer does with the batch; every number is a max |difference| between two outputs.

    batch_dependence: example 0's output when the rest of the batch is replaced by other examples.
    batch1_gap: example 0 normalized alone (a batch of 1) against within the batch; nan if batch 1 raises.
    train_eval_gap: the output in training mode against eval mode, after a few training-mode batches.
    """

    name: str
    reduces_over: str
    batch_dependence: float
    batch1_gap: float
    batch1_error: str
    train_eval_gap: float


@dataclass(frozen=True)
class FamilyConfig:
    """`family_properties`' setting: batches of shape (N, C, H, W), in float64, drawn with `seed`.

    Channel c's values are ``offset_c + noise_std * N(0, 1)`` with ``offset_c ~ offset_std * N(0, 1)``: means far from
    0, so that running statistics that have not converged (BN's, after `warmup_batches` training batches with momentum
    0.1) differ visibly from the batch's. GroupNorm uses `num_groups` groups.
    """

    shape: tuple[int, int, int, int] = (8, 4, 5, 5)
    seed: int = 0
    num_groups: int = 2
    offset_std: float = 3.0
    noise_std: float = 2.0
    warmup_batches: int = 3


_REDUCES_OVER = {
    "bn": "(N, H, W) per channel",
    "ln": "(C, H, W) per example",
    "in": "(H, W) per example and channel",
    "gn": "(C/G, H, W) per example and group",
    "rms": "(C, H, W) per example, no centring",
}


def family_properties(config: FamilyConfig = FamilyConfig()) -> list[FamilyRow]:
    """Measure batch dependence, batch-1 behaviour and the train/eval gap of each normalizer of `FAMILY` in float64.

    Returns one `FamilyRow` per normalizer, in `FAMILY` order.
    """
    if not isinstance(config, FamilyConfig):
        raise TypeError(f"config must be a FamilyConfig, got {type(config).__name__}")
    shape = config.shape
    n, channels, height, width = shape
    generator = torch.Generator().manual_seed(config.seed)
    offsets = config.offset_std * torch.randn(1, channels, 1, 1, generator=generator, dtype=torch.float64)

    def batch() -> Tensor:
        return offsets + config.noise_std * torch.randn(shape, generator=generator, dtype=torch.float64)

    rows = []
    for name, module in family_modules(channels, height, width, config.num_groups).items():
        with torch.no_grad():
            module.weight.copy_(1.0 + 0.5 * torch.randn(module.weight.shape, generator=generator, dtype=torch.float64))
            if getattr(module, "bias", None) is not None:
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator, dtype=torch.float64))
            module.train()
            for _ in range(config.warmup_batches):  # a few training-mode batches: BN's running statistics move (and nothing else has any)
                module(batch())
            x = batch()
            other = x.clone()
            other[1:] = batch()[1:]
            y_train = module(x)
            dependence = float((y_train[0] - module(other)[0]).abs().max())
            try:
                batch1_gap, error = float((module(x[:1])[0] - y_train[0]).abs().max()), ""
            except ValueError as exc:  # torch's BN refuses one value per channel; ours too, with its own message
                batch1_gap, error = math.nan, str(exc).splitlines()[0]
            module.eval()
            train_eval_gap = float((module(x) - y_train).abs().max())
        rows.append(FamilyRow(name, _REDUCES_OVER[name], dependence, batch1_gap, error, train_eval_gap))
    return rows


# --------------------------------------------------------------------------------------------------------------------
# A small convolutional network on upsampled digits
# --------------------------------------------------------------------------------------------------------------------


def load_digit_images(size: int = 16, device: torch.device | str | None = None) -> Dataset:
    """The digits of `load_digits` as images (N, 1, size, size), bilinearly upsampled from 8x8. Offline.

    Each pixel is standardized with the training split's statistics (as in `load_digits`) before upsampling.

    >>> images = load_digit_images()
    >>> tuple(images.x_train.shape)
    (1257, 1, 16, 16)
    """
    if not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be an integer >= 8 (the digits are 8x8), got {size!r}")
    flat = load_digits()

    def as_images(x: Tensor) -> Tensor:
        images = x.reshape(-1, 1, 8, 8)  # (N, 1, 8, 8)
        return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)

    data = Dataset(as_images(flat.x_train), flat.y_train, as_images(flat.x_test), flat.y_test)
    return data.to(device) if device is not None else data


def lr_sweep(
    builders: dict[str, Callable[[], nn.Module]], data: Dataset, lrs: Sequence[float], config: TrainConfig
) -> dict[str, dict[float, History]]:
    """Train a fresh model from each builder at each learning rate with the course's loop (`train`).

    builders: {name: () -> a freshly initialized model}. config: everything but the learning rate.
    Returns {name: {lr: History}}.
    """
    return {
        name: {lr: train(build(), data, replace(config, lr=lr)) for lr in lrs} for name, build in builders.items()
    }


def largest_good_lr(histories: dict[float, History], target: float) -> float | None:
    """The largest learning rate whose final test accuracy reaches `target` (None if none does)."""
    good = [lr for lr, history in histories.items() if not history.diverged and history.final_test_acc >= target]
    return max(good) if good else None


# --------------------------------------------------------------------------------------------------------------------
# Residual networks
# --------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def stream_mean_square(blocks: Sequence[nn.Module], x: Tensor) -> np.ndarray:
    """The mean square of the residual stream after each block: (len(blocks) + 1,), entry 0 the input's.

    x: (N, width). The mean square E[h^2] over the batch and the features is the variance of the stream's entries
    over inputs AND random initializations (De & Smith, 2020); it also counts the per-feature offsets that
    a fixed initialization gives each unit. The blocks run in training mode (batch statistics), as at the first step.
    """
    mean_squares = [float(x.pow(2).mean())]
    h = x
    for block in blocks:
        block.train()
        h = block(h)
        mean_squares.append(float(h.pow(2).mean()))
    return np.array(mean_squares)


# --------------------------------------------------------------------------------------------------------------------
# Sequence models
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PaddingConfig:
    """`padding_experiment`'s setting: len(lengths) sequences of token vectors (features,), ``1 + N(0, 1)`` drawn with
    `seed`, zero-padded to each length in `pad_to`."""

    lengths: tuple[int, ...] = (3, 7, 12, 5)
    pad_to: tuple[int, ...] = (12, 24)
    features: int = 16
    seed: int = 0


@dataclass(frozen=True)
class PaddingResult:
    """Per normalizer, the max |difference| over the real tokens between the shortest and the longest padding; and
    the fraction of the batch that is padding in each case."""

    bn: float
    ln: float
    rms: float
    pad_fraction_short: float
    pad_fraction_long: float


def padding_experiment(config: PaddingConfig = PaddingConfig()) -> PaddingResult:
    """How much the outputs at the REAL tokens change when the same batch is padded to a different length.

    BN (`bnnotes.torch_bn.BatchNorm1d` on (N, features, T), statistics over every position of every sequence, the
    padding included) against ``nn.LayerNorm(features)`` (per token) and ``nn.RMSNorm(features)``.
    """
    lengths, pad_to, features = config.lengths, config.pad_to, config.features
    if max(lengths) > min(pad_to):
        raise ValueError(f"every length must fit in the shortest padding: lengths={lengths}, pad_to={pad_to}")
    generator = torch.Generator().manual_seed(config.seed)
    tokens = [1.0 + torch.randn(length, features, generator=generator, dtype=torch.float64) for length in lengths]
    norms = {"bn": make_norm("bn", features).double().train(), "ln": nn.LayerNorm(features).double(),
             "rms": nn.RMSNorm(features, eps=1e-5).double()}
    outputs: dict[str, list[Tensor]] = {name: [] for name in norms}
    with torch.no_grad():
        for total in pad_to:
            batch = torch.zeros(len(lengths), total, features, dtype=torch.float64)  # (N, T, D)
            for i, sequence in enumerate(tokens):
                batch[i, : len(sequence)] = sequence
            outputs["bn"].append(norms["bn"](batch.transpose(1, 2)).transpose(1, 2))  # BN over (N, T) per feature
            outputs["ln"].append(norms["ln"](batch))
            outputs["rms"].append(norms["rms"](batch))
    t = min(pad_to)
    real = torch.zeros(len(lengths), t, dtype=torch.bool)
    for i, length in enumerate(lengths):
        real[i, :length] = True
    change = {name: float((v[0][:, :t][real] - v[-1][:, :t][real]).abs().max()) for name, v in outputs.items()}
    return PaddingResult(
        **change,
        pad_fraction_short=1.0 - sum(lengths) / (len(lengths) * min(pad_to)),
        pad_fraction_long=1.0 - sum(lengths) / (len(lengths) * max(pad_to)),
    )


@dataclass(frozen=True)
class LNStreamConfig:
    """`ln_stream_mean_square`'s setting: `depth` blocks of `width` features on n standard normal inputs; the inputs,
    then the weights, drawn with `seed`."""

    depth: int = 24
    width: int = 64
    n: int = 512
    seed: int = 0


@dataclass(frozen=True)
class LNStream:
    """E[h^2] over the batch and the features after each block, entry 0 the input's: pre, post (depth + 1,)."""

    pre: np.ndarray
    post: np.ndarray


def ln_stream_mean_square(config: LNStreamConfig = LNStreamConfig()) -> LNStream:
    """The residual stream's mean square (see `stream_mean_square`) with depth, at initialization, pre-LN and post-LN.

    Each block's branch is Linear -> ReLU -> Linear (He-normal weights, no bias), the feed-forward half of a
    transformer layer. Pre-LN: h + f(LN(h)); post-LN: LN(h + f(h)) (Xiong et al., 2020).
    """
    depth, width, n = config.depth, config.width, config.n
    generator = torch.Generator().manual_seed(config.seed)
    x = torch.randn(n, width, generator=generator)
    weights = [(torch.randn(width, width, generator=generator) * math.sqrt(2.0 / width),
                torch.randn(width, width, generator=generator) * math.sqrt(2.0 / width)) for _ in range(depth)]

    def branch(h: Tensor, w1: Tensor, w2: Tensor) -> Tensor:
        return F.relu(h @ w1.T) @ w2.T

    def layer_norm(h: Tensor) -> Tensor:
        return F.layer_norm(h, (width,))

    result = {}
    for kind in ("pre", "post"):
        h = x
        mean_squares = [float(h.pow(2).mean())]
        for w1, w2 in weights:
            h = h + branch(layer_norm(h), w1, w2) if kind == "pre" else layer_norm(h + branch(h, w1, w2))
            mean_squares.append(float(h.pow(2).mean()))
        result[kind] = np.array(mean_squares)
    return LNStream(**result)


# --------------------------------------------------------------------------------------------------------------------
# Dropout before BN
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DropoutShiftConfig:
    """`dropout_variance_shift`'s setting: inputs ``mean + std * N(0, 1)`` of `features` features, through Dropout(p)
    into BN for `steps` training batches of `batch_size`, then `eval_examples` at inference; inputs drawn with `seed`,
    and dropout's masks from the global generator seeded with `seed` (restored afterwards)."""

    p: float = 0.5
    mean: float = 1.0
    std: float = 1.0
    features: int = 64
    batch_size: int = 64
    steps: int = 200
    seed: int = 0
    eval_examples: int = 4096


@dataclass(frozen=True)
class DropoutShift:
    """The ratio var_inference / running_var (median over features), predicted by Li et al. (2019) and measured, and
    the measured standard deviation of BN's output at inference (1 if there were no shift)."""

    predicted_ratio: float
    measured_ratio: float
    eval_output_std: float


def dropout_variance_shift(config: DropoutShiftConfig = DropoutShiftConfig()) -> DropoutShift:
    """Dropout(p) -> BN: the variance BN learns in training against the variance it sees at inference.

    In training, inverted dropout keeps an input a with probability 1 - p and scales it by 1 / (1 - p), so its
    variance is (std^2 + mean^2) / (1 - p) - mean^2 (Li et al., 2019); at inference dropout is the identity, and the
    variance is std^2. BN's running variance records the first.
    """
    p, mean, std, features = config.p, config.mean, config.std, config.features
    if not 0.0 <= p < 1.0:
        raise ValueError(f"p must be in [0, 1), got {p!r}")
    generator = torch.Generator().manual_seed(config.seed)
    torch_generator_state = torch.random.get_rng_state()  # dropout draws from the global generator: restore it after
    torch.manual_seed(config.seed)
    try:
        dropout = nn.Dropout(p)
        bn = make_norm("bn", features)
        bn.momentum = None  # a cumulative average: the exact mean of the batch variances
        dropout.train()
        bn.train()
        with torch.no_grad():
            for _ in range(config.steps):
                bn(dropout(mean + std * torch.randn(config.batch_size, features, generator=generator)))
            dropout.eval()
            bn.eval()
            x = mean + std * torch.randn(config.eval_examples, features, generator=generator)
            y = bn(dropout(x))
    finally:
        torch.random.set_rng_state(torch_generator_state)
    train_var = (std**2 + mean**2) / (1.0 - p) - mean**2
    return DropoutShift(
        predicted_ratio=std**2 / train_var,
        measured_ratio=float(torch.median(x.var(dim=0) / bn.running_var)),
        eval_output_std=float(y.std(dim=0).median()),
    )


def dropout_before_bn_mlp(p: float = 0.5, hidden: Sequence[int] = (100, 100, 100), seed: int = 0,
                          in_features: int = 64, n_classes: int = 10) -> nn.Sequential:
    """``[Linear -> Dropout(p) -> BN -> ReLU] * len(hidden) -> Linear`` (for the 64-pixel digits by default):
    dropout before BN.

    The initialization is PyTorch's default, drawn under ``torch.manual_seed(seed)`` inside a forked RNG state (the
    global generator is left as it was). Dropout itself draws from the global generator during training.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"p must be in [0, 1), got {p!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        width_in = in_features
        for width in hidden:
            layers += [nn.Linear(width_in, width, bias=False), nn.Dropout(p), make_norm("bn", width), nn.ReLU()]
            width_in = width
        layers.append(nn.Linear(width_in, n_classes))
        return nn.Sequential(*layers)


@torch.no_grad()
def variance_shift_in(model: nn.Sequential, x: Tensor) -> dict[str, float]:
    """The variance shift at the last ``Dropout -> BN`` pair of a trained `model`, measured on inputs x at inference.

    measured: the median over units of (variance of BN's input at inference) / (BN's running variance).
    predicted: the median over units of eq. (Li et al., 2019) sigma^2 / ((sigma^2 + mu^2) / (1 - p) - mu^2), with mu and
    sigma^2 the unit's mean and variance at inference (dropout off).
    """
    pairs = [i for i in range(len(model) - 1) if isinstance(model[i], nn.Dropout) and is_batch_norm(model[i + 1])]
    if not pairs:
        raise ValueError("variance_shift_in needs a model with a Dropout directly followed by a BN layer")
    index = pairs[-1]
    dropout, bn = model[index], model[index + 1]
    was_training = model.training
    model.eval()
    h = x
    for layer in list(model)[:index]:
        h = layer(h)  # the input of the dropout layer; at inference, also the input of BN
    model.train(was_training)
    mean, var = h.mean(dim=0), h.var(dim=0)
    train_var = (var + mean**2) / (1.0 - dropout.p) - mean**2
    return {
        "measured": float(torch.median(var / bn.running_var)),
        "predicted": float(torch.median(var / train_var)),
    }


# --------------------------------------------------------------------------------------------------------------------
# Precise BN after SWA or pruning
# --------------------------------------------------------------------------------------------------------------------


def is_batch_norm(module: nn.Module) -> bool:
    """Whether `module` itself is a normalization layer with running statistics (`stats.norm_layers`' kind)."""
    layers = norm_layers(module)
    return bool(layers) and layers[0] is module


def precise_bn(model: nn.Module, x: Tensor, batch_size: int = 60) -> nn.Module:
    """A copy of `model` whose BN running statistics are recomputed for its current weights ("precise BN").

    Every BN layer's running statistics are reset and replaced by the cumulative average over consecutive batches of
    x (N, ...), the whole training split in practice (Izmailov et al., 2018; Wu & Johnson, 2021). Everything but BN
    runs in eval mode meanwhile, so that dropout is off, as at inference (the repair Li et al., 2019 discuss for
    dropout before BN). The input model is not changed. Returns the copy, in eval mode.
    """
    fresh = copy.deepcopy(model)
    population_statistics(fresh, x, batch_size, seed=None, in_place=True, only_norms_train=True)
    return fresh.eval()


@torch.no_grad()
def swa_average(snapshots: Sequence[dict[str, Tensor]], model: nn.Module) -> nn.Module:
    """A copy of `model` whose parameters AND BN buffers are the averages of the state dicts in `snapshots`.

    Averaging the running statistics is what a naive average of checkpoints does; they belong to none of the
    averaged weights, and `precise_bn` replaces them (Izmailov et al., 2018).
    """
    if not snapshots:
        raise ValueError("swa_average needs at least one snapshot (a state_dict), got none")
    averaged = copy.deepcopy(model)
    state = {}
    for key, value in snapshots[0].items():
        if value.is_floating_point():
            state[key] = torch.stack([s[key] for s in snapshots]).mean(dim=0)
        else:
            state[key] = snapshots[-1][key]
    averaged.load_state_dict(state)
    return averaged.eval()


@torch.no_grad()
def magnitude_prune(model: nn.Module, fraction: float) -> nn.Module:
    """A copy of `model` with the smallest `fraction` of each Conv2d / Linear weight set to 0 (per layer, by |w|).

    The classifier is pruned too. BN layers are left as they are, running statistics included: they now describe
    activations the pruned network no longer produces.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction!r}")
    pruned = copy.deepcopy(model)
    for module in pruned.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            magnitudes = module.weight.abs().flatten()
            k = int(fraction * magnitudes.numel())
            if k > 0:
                threshold = magnitudes.kthvalue(k).values
                module.weight[module.weight.abs() <= threshold] = 0.0
    return pruned.eval()
