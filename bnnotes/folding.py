"""Folding batch normalization into the preceding Linear or convolution, for deployment.

In eval mode BN is a fixed affine map per channel, ``y = s * z + (beta - s * running_mean)`` with
``s = gamma / sqrt(running_var + eps)``. When ``z = W x + b`` comes from a Linear or a convolution, the composition is
again a Linear or a convolution, with every output row (channel) of W scaled by s::

    W' = s[:, None, ...] * W
    b' = s * (b - running_mean) + beta

so the BN layer disappears from the deployed network (Jacob et al., 2018, fold it this way before quantizing).
`fold_weights` is the arithmetic on tensors, `fold_bn` folds one (layer, BN) pair, and `fold_batchnorm` folds every
such pair in the ``nn.Sequential`` containers of a model. Works with bnnotes' ``BatchNorm{1,2,3}d`` and with torch's.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from bnnotes import torch_bn

__all__ = ["fold_weights", "fold_bn", "fold_batchnorm", "is_foldable"]

# Which BN follows which layer: a Linear's (N, F) output and a Conv1d's (N, C, L) output go to a BatchNorm1d.
_BN_FOR_LAYER: dict[type, tuple[type, ...]] = {
    nn.Linear: (torch_bn.BatchNorm1d, nn.BatchNorm1d),
    nn.Conv1d: (torch_bn.BatchNorm1d, nn.BatchNorm1d),
    nn.Conv2d: (torch_bn.BatchNorm2d, nn.BatchNorm2d),
    nn.Conv3d: (torch_bn.BatchNorm3d, nn.BatchNorm3d),
}
_BN_TYPES = tuple({bn for pair in _BN_FOR_LAYER.values() for bn in pair})


def fold_weights(
    weight: Tensor,
    bias: Tensor | None,
    gamma: Tensor | None,
    beta: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor]:
    """The weight and bias of ``BN_eval(layer(x))`` as one layer.

    weight: (C_out, ...) — a Linear's (out, in) or a convolution's (out, in / groups, *kernel).
    bias: (C_out,) or None (no bias). gamma, beta: (C_out,), or None for an ``affine=False`` BN (1 and 0).
    running_mean, running_var: (C_out,). eps: the BN layer's eps.
    Returns (folded_weight, folded_bias) in weight's dtype and on its device, computed in float64 (float32 on Apple's
    MPS, which has no float64) and rounded once at the end.

    >>> w, b = fold_weights(torch.ones(1, 2), None, torch.tensor([2.0]), torch.tensor([1.0]),
    ...                     torch.tensor([3.0]), torch.tensor([4.0]), eps=0.0)
    >>> w.tolist(), b.tolist()
    ([[1.0, 1.0]], [-2.0])
    """
    if not isinstance(weight, Tensor) or not weight.is_floating_point() or weight.dim() < 2:
        raise TypeError(f"weight must be a floating-point tensor of shape (C_out, ...), got {_describe(weight)}")
    out = weight.shape[0]
    named = {"bias": bias, "gamma": gamma, "beta": beta, "running_mean": running_mean, "running_var": running_var}
    for name, v in named.items():
        if v is None and name in ("running_mean", "running_var"):
            raise ValueError(f"{name} is required: a BN layer without running statistics cannot be folded")
        if v is not None and not isinstance(v, Tensor):
            raise TypeError(f"{name} must be a tensor of shape ({out},) or None, got {_describe(v)}")
        if v is not None and v.shape != (out,):
            raise ValueError(f"{name} must have shape ({out},) to match weight.shape={tuple(weight.shape)}, "
                             f"got {_describe(v)}")
    compute = torch.float32 if weight.device.type == "mps" else torch.float64
    zeros = torch.zeros(out, dtype=compute, device=weight.device)
    as_compute = lambda v, default: default if v is None else v.detach().to(compute)  # noqa: E731
    scale = as_compute(gamma, zeros + 1) * torch.rsqrt(running_var.detach().to(compute) + eps)
    folded_weight = weight.detach().to(compute) * scale.view((-1,) + (1,) * (weight.dim() - 1))
    folded_bias = scale * (as_compute(bias, zeros) - running_mean.detach().to(compute)) + as_compute(beta, zeros)
    return folded_weight.to(weight.dtype), folded_bias.to(weight.dtype)


def _describe(v: object) -> str:
    if isinstance(v, Tensor):
        return f"a {v.dtype} tensor of shape {tuple(v.shape)}"
    return f"{type(v).__name__}"


def _layer_kind(layer: nn.Module) -> type | None:
    for kind in _BN_FOR_LAYER:
        if isinstance(layer, kind):
            return kind
    return None


def is_foldable(layer: nn.Module, bn: nn.Module) -> bool:
    """Whether `fold_bn` accepts the pair: a Linear or Conv{1,2,3}d, then a BN of the matching dimension with running
    statistics and as many features as the layer has outputs."""
    kind = _layer_kind(layer)
    if kind is None or not isinstance(bn, _BN_FOR_LAYER[kind]):
        return False
    out = layer.out_features if kind is nn.Linear else layer.out_channels
    return bn.track_running_stats and bn.running_mean is not None and bn.num_features == out


def fold_bn(layer: nn.Module, bn: nn.Module) -> nn.Module:
    """A new Linear or Conv{1,2,3}d, with bias, equal to ``bn(layer(x))`` with bn in eval mode.

    layer: ``nn.Linear`` or ``nn.Conv1d/2d/3d`` (any stride, padding, dilation, groups; with or without bias).
    bn: bnnotes' or torch's ``BatchNorm1d`` (after Linear/Conv1d), ``BatchNorm2d`` (after Conv2d) or ``BatchNorm3d``,
    in eval mode, with running statistics; ``affine=False`` is fine. Neither argument is modified.
    Returns a copy of layer (same class, hyper-parameters, device, dtype) with the folded weight and a bias.

    >>> lin, bn = nn.Linear(3, 2), nn.BatchNorm1d(2).eval()
    >>> x = torch.randn(4, 3)
    >>> torch.allclose(fold_bn(lin, bn)(x), bn(lin(x)), atol=1e-6)
    True
    """
    kind = _layer_kind(layer)
    if kind is None:
        raise TypeError(
            f"layer must be nn.Linear, nn.Conv1d, nn.Conv2d or nn.Conv3d, got {type(layer).__name__}"
        )
    if not isinstance(bn, _BN_FOR_LAYER[kind]):
        expected = " or ".join(f"{t.__module__}.{t.__name__}" for t in _BN_FOR_LAYER[kind])
        raise TypeError(f"a {kind.__name__} must be followed by {expected} to fold, got {type(bn).__name__}")
    out = layer.out_features if kind is nn.Linear else layer.out_channels
    if bn.num_features != out:
        raise ValueError(f"{type(bn).__name__}({bn.num_features}) cannot follow a layer with {out} outputs")
    if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        raise ValueError(
            "bn has no running statistics (track_running_stats=False): it normalizes with batch statistics even in "
            "eval mode, so it is not a fixed affine map and cannot be folded"
        )
    if bn.training:
        raise ValueError(
            "bn is in training mode, where it normalizes with batch statistics; folding uses the running statistics, "
            "which only eval mode uses: call .eval() on the model first"
        )
    folded_weight, folded_bias = fold_weights(
        layer.weight, layer.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps
    )
    folded = copy.deepcopy(layer)
    folded.weight = nn.Parameter(folded_weight, requires_grad=layer.weight.requires_grad)
    folded.bias = nn.Parameter(folded_bias, requires_grad=layer.weight.requires_grad)
    return folded


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of `model` in which every (Linear or Conv, BN) pair of consecutive modules in an ``nn.Sequential`` is folded.

    Each folded layer replaces the Linear/Conv, and an ``nn.Identity`` replaces the BN, so indices and ``state_dict``
    prefixes stay put (as in ``torch.ao.quantization.fuse_modules``). Sequential containers are searched recursively.
    A BN that follows anything else, or that has no running statistics, is left in place, so the copy still computes
    the same function. The model must be in eval mode: a ValueError names the BN layers in training mode.
    Returns the new model in eval mode; `model` itself is not modified.

    >>> net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU()).eval()
    >>> [type(m).__name__ for m in fold_batchnorm(net)]
    ['Linear', 'Identity', 'ReLU']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    training = [name or "<model>" for name, m in model.named_modules() if isinstance(m, _BN_TYPES) and m.training]
    if training:
        shown = ", ".join(repr(n) for n in training[:3]) + (", ..." if len(training) > 3 else "")
        raise ValueError(
            f"fold_batchnorm needs the model in eval mode, but {len(training)} BN layer(s) are in training mode "
            f"({shown}): call model.eval() first"
        )
    folded = copy.deepcopy(model)
    for module in folded.modules():
        if isinstance(module, nn.Sequential):
            _fold_sequential(module)
    return folded.eval()


def _fold_sequential(seq: nn.Sequential) -> None:
    names = list(seq._modules)
    for first, second in zip(names, names[1:]):
        layer, bn = seq._modules[first], seq._modules[second]
        if layer is not None and bn is not None and is_foldable(layer, bn):
            seq._modules[first] = fold_bn(layer, bn)
            seq._modules[second] = nn.Identity()
