"""Small models for the experiments: fully connected networks with a pluggable normalization layer."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from bnnotes import variants
from bnnotes.lp_norm import LpBatchNorm1d
from bnnotes.renorm import BatchRenorm1d
from bnnotes.torch_bn import BatchNorm1d, BatchNorm2d

__all__ = ["norm_factory", "make_norm", "mlp", "hidden_linears", "NORMS", "SPATIAL_NORMS", "ACTIVATIONS"]

NormFactory = Callable[[int], nn.Module]

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "sigmoid": nn.Sigmoid,
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "identity": nn.Identity,
}


def _groupnorm(width: int) -> nn.Module:
    # 10 features per group for 100-wide layers, as far as the width allows.
    groups = math.gcd(width, 10) or 1
    return nn.GroupNorm(groups, width)


def _groupnorm_channels(channels: int) -> nn.Module:
    # Wu & He (2018) use 32 groups; our convnets are narrow, so 4 channels per group as far as the width allows.
    return nn.GroupNorm(max(1, channels // 4) if channels % 4 == 0 else 1, channels)


# Features (N, width): every normalizer of the fully connected networks, the teaching variants of `bnnotes.variants`
# and the ℓp schemes of Santurkar et al. (2018) included. A new normalizer is its class and one line here.
NORMS: dict[str, NormFactory] = {
    "none": lambda width: nn.Identity(),
    "bn": BatchNorm1d,
    "brn": BatchRenorm1d,
    "ln": lambda width: nn.LayerNorm(width),
    "gn": _groupnorm,
    "rms": lambda width: nn.RMSNorm(width),
    "l1": lambda width: LpBatchNorm1d(width, p=1),
    "l2": lambda width: LpBatchNorm1d(width, p=2),
    "linf": lambda width: LpBatchNorm1d(width, p=math.inf),
    "bn-moving": variants.MovingAverageBatchNorm1d,
    "bn-detached": variants.DetachedStatsBatchNorm1d,
    "bn-frozen": variants.EvalModeBatchNorm1d,
    "bn-mean-only": variants.MeanOnlyBatchNorm1d,
    "bn-var-only": variants.VarianceOnlyBatchNorm1d,
}

# Feature maps (N, C, H, W): the same names for convolutional networks. LayerNorm normalizes each example over
# (C, H, W), which is GroupNorm with one group; InstanceNorm over (H, W) per channel; RMSNorm has no standard 2-D form.
SPATIAL_NORMS: dict[str, NormFactory] = {
    "none": lambda channels: nn.Identity(),
    "bn": BatchNorm2d,
    "ln": lambda channels: nn.GroupNorm(1, channels),
    "gn": _groupnorm_channels,
    "in": lambda channels: nn.InstanceNorm2d(channels, affine=True),
}


def norm_factory(norm: str | NormFactory, spatial: bool = False) -> NormFactory:
    """The factory ``width -> nn.Module`` that `norm` names: an entry of `NORMS` (of `SPATIAL_NORMS` if spatial), or
    `norm` itself if it is callable. Raises ValueError, listing the names, for an unknown name.

    >>> type(norm_factory("bn-mean-only")(4)).__name__
    'MeanOnlyBatchNorm1d'
    """
    if callable(norm):
        return norm
    registry = SPATIAL_NORMS if spatial else NORMS
    if norm not in registry:
        kind = "feature-map (spatial=True)" if spatial else "feature"
        raise ValueError(
            f"norm must be one of the {kind} normalizers {sorted(registry)} or a callable width -> nn.Module, "
            f"got {norm!r}"
        )
    return registry[norm]


def make_norm(norm: str | NormFactory, width: int, spatial: bool = False) -> nn.Module:
    """A normalization layer for `width` features: one of `NORMS` by name, or any factory ``width -> nn.Module``.

    spatial: the layer follows a 2-D convolution, so it sees (N, width, H, W) feature maps: the name is looked up in
    `SPATIAL_NORMS` (``"bn"`` is then a BatchNorm2d, ``"ln"`` normalizes over (C, H, W)).

    >>> type(make_norm("bn", 8, spatial=True)).__name__, type(make_norm("gn", 8, spatial=True)).__name__
    ('BatchNorm2d', 'GroupNorm')
    """
    return norm_factory(norm, spatial)(width)


def mlp(
    in_features: int,
    hidden: Sequence[int] = (100, 100, 100),
    out_features: int = 10,
    activation: str = "sigmoid",
    norm: str | NormFactory = "none",
    init_std: float | None = None,
    linear_bias: bool | None = None,
    seed: int = 0,
) -> nn.Sequential:
    """A fully connected network: ``[Linear -> norm -> activation] * len(hidden) -> Linear``.

    The normalization sits between each hidden Linear and its nonlinearity, as in Ioffe & Szegedy (2015, Section 3.2).
    linear_bias: whether hidden Linear layers carry a bias; by default only without normalization, because a
    normalizer subtracts the mean and its own shift (beta) takes over the bias's role.
    init_std: weights drawn from N(0, init_std^2) (biases 0); None keeps PyTorch's default initialization.
    seed: the initialization is a pure function of the seed (the global RNG is not touched).
    Returns an ``nn.Sequential`` of Linear, norm and activation triples (`hidden_linears` lists the Linear layers).

    >>> model = mlp(64, hidden=(100, 100), norm="bn")
    >>> [type(m).__name__ for m in model][:3]
    ['Linear', 'BatchNorm1d', 'Sigmoid']
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    if linear_bias is None:
        linear_bias = norm == "none"
    generator = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    width_in = in_features
    for width in hidden:
        layers += [nn.Linear(width_in, width, bias=linear_bias), make_norm(norm, width), ACTIVATIONS[activation]()]
        width_in = width
    layers.append(nn.Linear(width_in, out_features))
    for layer in layers:
        if isinstance(layer, nn.Linear):
            _init_linear(layer, init_std, generator)
    return nn.Sequential(*layers)


def hidden_linears(model: nn.Module) -> list[nn.Linear]:
    """The hidden ``nn.Linear`` layers of an `mlp`, in forward order: every Linear but the last (the classifier).

    These are the layers that feed a normalization when the model has one.

    >>> len(hidden_linears(mlp(64, hidden=(100, 100))))
    2
    """
    return [m for m in model.modules() if isinstance(m, nn.Linear)][:-1]


def _init_linear(layer: nn.Linear, init_std: float | None, generator: torch.Generator) -> None:
    with torch.no_grad():
        if init_std is None:
            # PyTorch's default (Kaiming-uniform with a = sqrt(5)), drawn from our own generator.
            bound = 1.0 / math.sqrt(layer.in_features)
            layer.weight.uniform_(-bound, bound, generator=generator)
            if layer.bias is not None:
                layer.bias.uniform_(-bound, bound, generator=generator)
        else:
            layer.weight.normal_(0.0, init_std, generator=generator)
            if layer.bias is not None:
                layer.bias.zero_()
