"""Small models for the experiments, each with a pluggable normalization layer named in one registry (`NORMS`,
`SPATIAL_NORMS`): fully connected networks (`mlp`), a LeNet-sized convnet for images (`convnet`) and pre-activation
residual networks (`residual_mlp`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnnotes import variants
from bnnotes.lp_norm import LpBatchNorm1d
from bnnotes.renorm import BatchRenorm1d
from bnnotes.torch_bn import BatchNorm1d, BatchNorm2d

__all__ = [
    "norm_factory", "make_norm", "mlp", "hidden_linears", "hidden_norms", "convnet", "PreActBlock", "ResidualMLP",
    "residual_mlp", "NORMS", "SPATIAL_NORMS", "ACTIVATIONS",
]

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


def hidden_norms(model: nn.Sequential) -> list[nn.Module]:
    """The normalization module after each hidden Linear of an `mlp`, in forward order (``nn.Identity`` without one):
    the module whose output feeds the layer's nonlinearity.

    >>> [type(m).__name__ for m in hidden_norms(mlp(64, hidden=(100, 100), norm="bn"))]
    ['BatchNorm1d', 'BatchNorm1d']
    """
    layers = list(model)
    positions = {id(layer): i for i, layer in enumerate(layers)}
    return [layers[positions[id(linear)] + 1] for linear in hidden_linears(model)]


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


# --------------------------------------------------------------------------------------------------------------------
# A convolutional network (the real-networks chapter)
# --------------------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------------------
# Residual networks (the real-networks chapter)
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
