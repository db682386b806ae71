"""Experiments of the chapter "BN in real networks, and what replaced it".

- The normalization family on feature maps (N, C, H, W): which values share statistics (`statistics_mask`), and
  what follows from it (`family_properties`: dependence on the batch, batch size 1, training versus inference).
- A small convolutional network on upsampled digits (`load_digit_images`, `convnet`), with the course's training loop.
- Residual networks at initialization: the variance of the residual stream with depth (`residual_mlp`,
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
from bnnotes.experiments.models import make_norm
from bnnotes.experiments.training import History, TrainConfig, train

__all__ = [
    "FAMILY",
    "family_modules",
    "statistics_mask",
    "FamilyRow",
    "family_properties",
    "load_digit_images",
    "convnet",
    "lr_sweep",
    "largest_good_lr",
    "PreActBlock",
    "ResidualMLP",
    "residual_mlp",
    "stream_mean_square",
    "padding_experiment",
    "ln_stream_mean_square",
    "dropout_variance_shift",
    "dropout_before_bn_mlp",
    "variance_shift_in",
    "is_batch_norm",
    "precise_bn",
    "swa_average",
    "magnitude_prune",
    "accuracy",
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


def statistics_mask(module: nn.Module, shape: tuple[int, int, int, int], n: int = 0, c: int = 0) -> np.ndarray:
    """Which (example, channel) cells share statistics with cell (n, c): measured, not declared.

    Perturbs x[n, c] (all its positions) and returns a boolean (N, C) array, True where the output changed, with the
    module in training mode. For BN that is channel c of every example; for LayerNorm every channel of example n.
    """
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator, dtype=torch.float64)
    bumped = x.clone()
    bumped[n, c] = bumped[n, c] * 3.0 + 1.0
    module = copy.deepcopy(module).train()
    with torch.no_grad():
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


_REDUCES_OVER = {
    "bn": "(N, H, W) per channel",
    "ln": "(C, H, W) per example",
    "in": "(H, W) per example and channel",
    "gn": "(C/G, H, W) per example and group",
    "rms": "(C, H, W) per example, no centring",
}


def family_properties(shape: tuple[int, int, int, int] = (8, 4, 5, 5), seed: int = 0) -> list[FamilyRow]:
    """Measure batch dependence, batch-1 behaviour and the train/eval gap of each normalizer of `FAMILY` in float64.

    shape: (N, C, H, W) of the batches. The inputs have channel means far from 0, so that running statistics that
    have not converged (BN's, after a few batches with momentum 0.1) differ visibly from the batch's.
    """
    n, channels, height, width = shape
    generator = torch.Generator().manual_seed(seed)
    offsets = 3.0 * torch.randn(1, channels, 1, 1, generator=generator, dtype=torch.float64)

    def batch() -> Tensor:
        return offsets + 2.0 * torch.randn(shape, generator=generator, dtype=torch.float64)

    rows = []
    for name, module in family_modules(channels, height, width).items():
        with torch.no_grad():
            module.weight.copy_(1.0 + 0.5 * torch.randn(module.weight.shape, generator=generator, dtype=torch.float64))
            if getattr(module, "bias", None) is not None:
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator, dtype=torch.float64))
            module.train()
            for _ in range(3):  # a few training-mode batches: BN's running statistics move (and nothing else has any)
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


def convnet(
    norm: str = "none",
    channels: Sequence[int] = (16, 32),
    placement: str = "before",
    image_size: int = 16,
    n_classes: int = 10,
    seed: int = 0,
) -> nn.Sequential:
    """``[Conv3x3 -> norm -> ReLU -> MaxPool2] * len(channels) -> Linear``: a LeNet-sized network for 1-channel images.

    norm: a name of `SPATIAL_NORMS` (``"bn"``, ``"gn"``, ``"ln"``, ``"in"``, ``"none"``).
    placement: ``"before"`` the nonlinearity (Ioffe & Szegedy, 2015, Section 3.2) or ``"after"`` it
    (Conv -> ReLU -> norm). A convolution followed directly by a normalizer has no bias (the normalizer's beta
    replaces it); otherwise it has one.
    seed: the initialization (PyTorch's default distribution) is drawn from a generator seeded here.

    >>> [type(m).__name__ for m in convnet("bn")][:4]
    ['Conv2d', 'BatchNorm2d', 'ReLU', 'MaxPool2d']
    """
    if placement not in ("before", "after"):
        raise ValueError(f"placement must be 'before' or 'after' (the nonlinearity), got {placement!r}")
    if image_size % (2 ** len(channels)):
        raise ValueError(f"image_size={image_size} must be divisible by 2**len(channels)={2 ** len(channels)}")
    generator = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    in_channels = 1
    for out_channels in channels:
        conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=norm == "none" or placement == "after")
        norm_layer = make_norm(norm, out_channels, spatial=True)
        pair = [norm_layer, nn.ReLU()] if placement == "before" else [nn.ReLU(), norm_layer]
        layers += [conv, *pair, nn.MaxPool2d(2)]
        in_channels = out_channels
    side = image_size // 2 ** len(channels)
    layers += [nn.Flatten(), nn.Linear(in_channels * side * side, n_classes)]
    model = nn.Sequential(*layers)
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                fan_in = layer.weight[0].numel()
                bound = 1.0 / math.sqrt(fan_in)  # PyTorch's default kaiming_uniform_(a=sqrt(5)), from our generator
                layer.weight.uniform_(-bound, bound, generator=generator)
                if layer.bias is not None:
                    layer.bias.uniform_(-bound, bound, generator=generator)
    return model


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


class PreActBlock(nn.Module):
    """A pre-activation residual block (He et al., 2016): x + W2 relu(norm2(W1 relu(norm1(x)))).

    The Linears have no bias and He-normal weights (std sqrt(2 / width)), so that without normalization each branch
    has the variance of its input and the stream's variance doubles per block (De & Smith, 2020). With BN, each
    branch has variance ~1 at initialization and the stream's variance grows by ~1 per block.
    zero_init_last_gamma: gamma (and beta) of norm2, the branch's last normalization, start at 0, so that the branch
    is exactly 0 and the block is the identity at initialization (Goyal et al., 2017).
    """

    def __init__(self, width: int, norm: str, zero_init_last_gamma: bool, generator: torch.Generator) -> None:
        super().__init__()
        self.norm1 = make_norm(norm, width)
        self.linear1 = nn.Linear(width, width, bias=False)
        self.norm2 = make_norm(norm, width)
        self.linear2 = nn.Linear(width, width, bias=False)
        with torch.no_grad():
            for linear in (self.linear1, self.linear2):
                linear.weight.normal_(0.0, math.sqrt(2.0 / width), generator=generator)
            if zero_init_last_gamma:
                if not hasattr(self.norm2, "weight"):
                    raise ValueError(f"zero_init_last_gamma needs a normalization with a gamma, got norm={norm!r}")
                self.norm2.weight.zero_()
                self.norm2.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        branch = self.linear1(F.relu(self.norm1(x)))
        branch = self.linear2(F.relu(self.norm2(branch)))
        return x + branch


class ResidualMLP(nn.Module):
    """embed (Linear) -> `depth` `PreActBlock`s -> norm -> ReLU -> Linear classifier."""

    def __init__(self, in_features: int, width: int, depth: int, n_classes: int, norm: str,
                 zero_init_last_gamma: bool, seed: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.embed = nn.Linear(in_features, width)
        self.blocks = nn.ModuleList(PreActBlock(width, norm, zero_init_last_gamma, generator) for _ in range(depth))
        self.head_norm = make_norm(norm, width)
        self.head = nn.Linear(width, n_classes)
        with torch.no_grad():
            for linear in (self.embed, self.head):
                bound = 1.0 / math.sqrt(linear.in_features)
                linear.weight.uniform_(-bound, bound, generator=generator)
                linear.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(F.relu(self.head_norm(h)))


def residual_mlp(in_features: int = 64, width: int = 64, depth: int = 16, n_classes: int = 10, norm: str = "bn",
                 zero_init_last_gamma: bool = False, seed: int = 0) -> ResidualMLP:
    """A residual network of `depth` pre-activation blocks for flat inputs (N, in_features); see `PreActBlock`.

    >>> model = residual_mlp(depth=3, norm="bn", zero_init_last_gamma=True)
    >>> x = torch.randn(5, 64)
    >>> bool(torch.equal(model.blocks[0](x), x))  # the zero-gamma block is the identity
    True
    """
    if depth < 1:
        raise ValueError(f"depth must be at least 1, got {depth!r}")
    return ResidualMLP(in_features, width, depth, n_classes, norm, zero_init_last_gamma, seed)


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


def padding_experiment(
    lengths: Sequence[int] = (3, 7, 12, 5), pad_to: Sequence[int] = (12, 24), features: int = 16, seed: int = 0
) -> dict[str, float]:
    """How much the outputs at the REAL tokens change when the same batch is padded to a different length.

    A batch of len(lengths) sequences of token vectors (features,), padded with zeros to each length in `pad_to`.
    BN (`bnnotes.torch_bn.BatchNorm1d` on (N, features, T), statistics over every position of every sequence, the
    padding included) against ``nn.LayerNorm(features)`` (per token) and ``nn.RMSNorm(features)``.
    Returns {name: max |difference|} over the real tokens between the shortest and the longest padding, and the
    fraction of padding in each case.
    """
    if max(lengths) > min(pad_to):
        raise ValueError(f"every length must fit in the shortest padding: lengths={lengths}, pad_to={pad_to}")
    generator = torch.Generator().manual_seed(seed)
    tokens = [1.0 + torch.randn(length, features, generator=generator, dtype=torch.float64) for length in lengths]
    bn = make_norm("bn", features).double().train()
    ln = nn.LayerNorm(features).double()
    rms = nn.RMSNorm(features, eps=1e-5).double()
    outputs: dict[str, list[Tensor]] = {"bn": [], "ln": [], "rms": []}
    with torch.no_grad():
        for total in pad_to:
            batch = torch.zeros(len(lengths), total, features, dtype=torch.float64)  # (N, T, D)
            for i, sequence in enumerate(tokens):
                batch[i, : len(sequence)] = sequence
            outputs["bn"].append(bn(batch.transpose(1, 2)).transpose(1, 2))  # BN over (N, T) per feature
            outputs["ln"].append(ln(batch))
            outputs["rms"].append(rms(batch))
    real = torch.zeros(len(lengths), min(pad_to), dtype=torch.bool)
    for i, length in enumerate(lengths):
        real[i, :length] = True
    result = {}
    for name, (short, long) in ((k, (v[0], v[-1])) for k, v in outputs.items()):
        t = min(pad_to)
        result[name] = float((short[:, :t][real] - long[:, :t][real]).abs().max())
    result["pad_fraction_short"] = 1.0 - sum(lengths) / (len(lengths) * min(pad_to))
    result["pad_fraction_long"] = 1.0 - sum(lengths) / (len(lengths) * max(pad_to))
    return result


def ln_stream_mean_square(depth: int = 24, width: int = 64, n: int = 512, seed: int = 0) -> dict[str, np.ndarray]:
    """The residual stream's mean square (see `stream_mean_square`) with depth, at initialization, pre-LN and post-LN.

    Each block's branch is Linear -> ReLU -> Linear (He-normal weights, no bias), the feed-forward half of a
    transformer layer. Pre-LN: h + f(LN(h)); post-LN: LN(h + f(h)) (Xiong et al., 2020).
    Returns {"pre": (depth + 1,), "post": (depth + 1,)}: E[h^2] over the batch and the features after each block.
    """
    generator = torch.Generator().manual_seed(seed)
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
    return result


# --------------------------------------------------------------------------------------------------------------------
# Dropout before BN
# --------------------------------------------------------------------------------------------------------------------


def dropout_variance_shift(p: float = 0.5, mean: float = 1.0, std: float = 1.0, features: int = 64,
                           batch_size: int = 64, steps: int = 200, seed: int = 0) -> dict[str, float]:
    """Dropout(p) -> BN: the variance BN learns in training against the variance it sees at inference.

    Inputs a ~ N(mean, std^2) per feature. In training, inverted dropout keeps a with probability 1 - p and scales it
    by 1 / (1 - p), so its variance is (std^2 + mean^2) / (1 - p) - mean^2 (Li et al., 2019); at inference
    dropout is the identity, and the variance is std^2. BN's running variance records the first.
    Returns the predicted and measured ratios var_inference / running_var (median over features), and the measured
    standard deviation of BN's output at inference (1 if there were no shift).
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"p must be in [0, 1), got {p!r}")
    generator = torch.Generator().manual_seed(seed)
    torch_generator_state = torch.random.get_rng_state()  # dropout draws from the global generator: restore it after
    torch.manual_seed(seed)
    try:
        dropout = nn.Dropout(p)
        bn = make_norm("bn", features)
        bn.momentum = None  # a cumulative average: the exact mean of the batch variances
        dropout.train()
        bn.train()
        with torch.no_grad():
            for _ in range(steps):
                bn(dropout(mean + std * torch.randn(batch_size, features, generator=generator)))
            dropout.eval()
            bn.eval()
            x = mean + std * torch.randn(4096, features, generator=generator)
            y = bn(dropout(x))
    finally:
        torch.random.set_rng_state(torch_generator_state)
    train_var = (std**2 + mean**2) / (1.0 - p) - mean**2
    measured = float(torch.median(x.var(dim=0) / bn.running_var))
    return {
        "predicted_ratio": std**2 / train_var,
        "measured_ratio": measured,
        "eval_output_std": float(y.std(dim=0).median()),
    }


def dropout_before_bn_mlp(p: float = 0.5, hidden: Sequence[int] = (100, 100, 100), seed: int = 0) -> nn.Sequential:
    """``[Linear -> Dropout(p) -> BN -> ReLU] * len(hidden) -> Linear`` for the 64-pixel digits: dropout before BN.

    The initialization is PyTorch's default, drawn under ``torch.manual_seed(seed)`` inside a forked RNG state (the
    global generator is left as it was). Dropout itself draws from the global generator during training.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"p must be in [0, 1), got {p!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        width_in = 64
        for width in hidden:
            layers += [nn.Linear(width_in, width, bias=False), nn.Dropout(p), make_norm("bn", width), nn.ReLU()]
            width_in = width
        layers.append(nn.Linear(width_in, 10))
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
    """Whether `module` is a BN layer with running statistics (torch.nn's or bnnotes.torch_bn's)."""
    return (
        hasattr(module, "running_mean")
        and hasattr(module, "reset_running_stats")
        and getattr(module, "track_running_stats", True)
        and module.running_mean is not None
    )


@torch.no_grad()
def precise_bn(model: nn.Module, x: Tensor, batch_size: int = 60) -> nn.Module:
    """A copy of `model` whose BN running statistics are recomputed for its current weights ("precise BN").

    Every BN layer's running statistics are reset and replaced by the cumulative average (momentum None) over
    consecutive batches of x (N, ...), the whole training split in practice (Izmailov et al., 2018;
    Wu & Johnson, 2021). Everything but BN runs in eval mode meanwhile, so that dropout is off, as at inference
    (the repair Li et al., 2019 discuss for dropout before BN). The input model is not changed. Returns the copy,
    in eval mode.
    """
    fresh = copy.deepcopy(model).eval()  # the inference-time network: dropout and other noise switched off ...
    for module in fresh.modules():
        if is_batch_norm(module):
            module.reset_running_stats()
            module.momentum = None
            module.train()  # ... except BN, which normalizes with batch statistics and accumulates them
    for start in range(0, x.shape[0] - batch_size + 1, batch_size):
        fresh(x[start : start + batch_size])
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


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Test accuracy of `model` in eval mode (running statistics); the model's mode is restored."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        acc = float((model(x).argmax(dim=1) == y).float().mean())
    model.train(was_training)
    return acc
