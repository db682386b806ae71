"""Every layer swap in one place: torch's BN to bnnotes' and back, to synchronized BN, and frozen BN.

All converters are one walker, `swap_batchnorm`: it replaces each layer whose *exact* type is a key of a mapping by a
new layer of the mapped class, built with the old layer's hyper-parameters, and hands it the old layer's state:

- the parameter and buffer *tensors* themselves (so an optimizer built before the swap still updates them), with their
  device, dtype and requires_grad;
- the hyper-parameters (num_features, eps, momentum, affine, bias or not, track_running_stats), the train/eval mode
  and ``qconfig`` if there is one (as ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` does);
- the hooks: forward, forward-pre, backward (module and full), state-dict and load-state-dict hooks, by taking over the
  registries themselves, so a handle obtained before the swap still removes its hook.

Not kept: any other attribute set by hand on the old layer instance, and its identity (a reference to the old layer
elsewhere still points at it). Containers are changed in place and returned; when the root itself is swapped, the new
layer is returned. A swapped layer's own children are not visited (BN layers have none).

Exact types, not ``isinstance``: layers that only resemble BN (Batch Renorm, Ghost BN, a teaching variant subclassing
BatchNorm1d) are left alone unless a mapping names them.

This module is below the layers it swaps: `bnnotes.torch_bn` re-exports `convert_batchnorm` and `to_torch_batchnorm`,
and `bnnotes.sync` re-exports `convert_sync_batchnorm`, under the names they have always had. So the layer classes are
looked up when a converter is called, not when this module is imported, and no import cycle exists.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from torch import nn

__all__ = [
    "swap_batchnorm",
    "convert_batchnorm",
    "to_torch_batchnorm",
    "convert_sync_batchnorm",
    "freeze_batchnorm",
    "unfreeze_batchnorm",
]

# nn.Module's hook registries. The new layer takes over the old layer's dictionaries themselves.
_HOOK_REGISTRIES = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_pre_hooks",
    "_backward_hooks",
    "_is_full_backward_hook",
    "_state_dict_pre_hooks",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)
_STATE = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _takes_bias(cls: type) -> bool:
    """Whether a BN class's constructor takes ``bias=`` (torch's do since pytorch/pytorch#176573; bnnotes' always)."""
    return "bias" in inspect.signature(cls.__init__).parameters


def _swapped(old: nn.Module, target: type, **kwargs: Any) -> nn.Module:
    """A `target` layer with old's hyper-parameters, state tensors, mode, qconfig and hooks (see the module docstring).

    kwargs: further constructor arguments of target (SyncBatchNorm's ``process_group``)."""
    if _takes_bias(target):  # (a torch layer on older torch takes no bias=: its bias is set to None below)
        kwargs["bias"] = getattr(old, "bias", None) is not None or not old.affine
    new = target(old.num_features, eps=old.eps, momentum=old.momentum, affine=old.affine,
                 track_running_stats=old.track_running_stats, device="meta", **kwargs)  # every tensor is old's below
    for name in _STATE:
        setattr(new, name, getattr(old, name))
    new.train(old.training)
    if hasattr(old, "qconfig"):
        new.qconfig = old.qconfig
    for registry in _HOOK_REGISTRIES:
        if registry in old.__dict__:
            new.__dict__[registry] = old.__dict__[registry]
    return new


def swap_batchnorm(
    module: nn.Module, mapping: dict[type, type] | Callable[[nn.Module], type | None], **kwargs: Any
) -> nn.Module:
    """Replace every layer of `module` (the root included) whose exact type is a key of `mapping` by a layer of the
    mapped class that shares its state and hooks (see the module docstring). Returns the (possibly new) root.

    mapping: {old BN class: new BN class}, or a function of a layer returning its new class (None: keep the layer);
    the classes take torch's BN constructor arguments. kwargs: passed to every new layer's constructor.

    >>> net = swap_batchnorm(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), {nn.BatchNorm1d: nn.SyncBatchNorm})
    >>> type(net[1]).__name__
    'SyncBatchNorm'
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    target = mapping(module) if callable(mapping) else mapping.get(type(module))
    if target is not None:
        return _swapped(module, target, **kwargs)
    for name, child in module.named_children():
        new_child = swap_batchnorm(child, mapping, **kwargs)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


def _torch_to_bnnotes() -> dict[type, type]:
    from bnnotes import torch_bn  # at call time: torch_bn imports this module (see the module docstring)

    return {nn.BatchNorm1d: torch_bn.BatchNorm1d, nn.BatchNorm2d: torch_bn.BatchNorm2d,
            nn.BatchNorm3d: torch_bn.BatchNorm3d}


def convert_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``torch.nn.BatchNorm{1,2,3}d`` in `module` by bnnotes' own, sharing state, mode and hooks.

    >>> net = convert_batchnorm(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)))
    >>> type(net[1]).__module__
    'bnnotes.torch_bn'
    """
    return swap_batchnorm(module, _torch_to_bnnotes())


def to_torch_batchnorm(module: nn.Module) -> nn.Module:
    """The inverse of `convert_batchnorm`: bnnotes' BN layers back to ``torch.nn.BatchNorm{1,2,3}d``, sharing state.

    >>> from bnnotes.torch_bn import BatchNorm1d
    >>> net = to_torch_batchnorm(nn.Sequential(nn.Linear(3, 4), BatchNorm1d(4)))
    >>> type(net[1]) is nn.BatchNorm1d
    True
    """
    return swap_batchnorm(module, {ours: theirs for theirs, ours in _torch_to_bnnotes().items()})


def convert_sync_batchnorm(module: nn.Module, process_group: Any = None) -> nn.Module:
    """Replace every BatchNorm layer in `module` by bnnotes' `~bnnotes.sync.SyncBatchNorm`, as
    ``nn.SyncBatchNorm.convert_sync_batchnorm`` does with torch's.

    Converts torch.nn's ``BatchNorm{1,2,3}d`` and ``SyncBatchNorm`` and bnnotes' ``BatchNorm{1,2,3}d`` and
    ``SyncBatchNorm`` (exactly these types), keeping what `swap_batchnorm` keeps. process_group: the group the new
    layers synchronize over (None: the whole world).

    >>> net = convert_sync_batchnorm(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)))
    >>> type(net[1]).__module__, type(net[1]).__name__
    ('bnnotes.sync', 'SyncBatchNorm')
    """
    from bnnotes.sync import SyncBatchNorm  # at call time: sync imports this module (see the module docstring)

    # Exactly these types, so that layers which only look like BN (Batch Renorm, Ghost BN) are left alone.
    sources = (*_torch_to_bnnotes(), *_torch_to_bnnotes().values(), nn.SyncBatchNorm, SyncBatchNorm)
    return swap_batchnorm(module, dict.fromkeys(sources, SyncBatchNorm), process_group=process_group)


def _to_frozen() -> dict[type, type]:
    from bnnotes import torch_bn  # at call time, as `_torch_to_bnnotes`

    frozen = {torch_bn.BatchNorm1d: torch_bn.FrozenBatchNorm1d, torch_bn.BatchNorm2d: torch_bn.FrozenBatchNorm2d,
              torch_bn.BatchNorm3d: torch_bn.FrozenBatchNorm3d}
    return {**frozen, **{theirs: frozen[ours] for theirs, ours in _torch_to_bnnotes().items()}}


def freeze_batchnorm(model: nn.Module, affine: bool = True) -> nn.Module:
    """Freeze every BN layer of `model` in place: eval-mode statistics for good and, with affine=True, no gradient
    for gamma and beta. Reversible with `unfreeze_batchnorm`. Returns the (possibly new) root.

    Each ``BatchNorm{1,2,3}d`` (torch's or bnnotes', exact types) becomes a ``bnnotes.torch_bn.FrozenBatchNorm{1,2,3}d``
    sharing its state and hooks (see `swap_batchnorm`), which stays in eval mode under ``model.train()``; its weight
    and bias get
    ``requires_grad=False`` (affine=False: they keep training, only the statistics are frozen). The old class and the
    old requires_grad flags are remembered on the frozen layer for `unfreeze_batchnorm`. A BN layer without running
    statistics (track_running_stats=False) cannot be frozen: a ValueError names it.

    >>> net = freeze_batchnorm(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))).train()
    >>> type(net[1]).__name__, net[1].training, net[1].weight.requires_grad
    ('FrozenBatchNorm1d', False, False)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    to_frozen = _to_frozen()
    untracked = [name or "<model>" for name, m in model.named_modules()
                 if type(m) in to_frozen and m.running_mean is None]
    if untracked:
        raise ValueError(f"BN layers without running statistics (track_running_stats=False) cannot be frozen: they "
                         f"normalize with batch statistics even in eval mode; got {untracked}")
    # The swap keeps the very same tensors: a layer's running_mean identifies it before and after.
    originals = {id(m.running_mean): type(m) for m in model.modules() if type(m) in to_frozen}
    model = swap_batchnorm(model, to_frozen)
    for layer in model.modules():
        if type(layer) in to_frozen.values() and id(layer.running_mean) in originals:
            layer.unfrozen_type = originals[id(layer.running_mean)]
            layer.unfrozen_requires_grad = {name: p.requires_grad for name, p in layer.named_parameters()}
            if affine:
                for p in layer.parameters():
                    p.requires_grad_(False)
    return model


def unfreeze_batchnorm(model: nn.Module) -> nn.Module:
    """Undo `freeze_batchnorm` in place: each frozen layer becomes a layer of its class before freezing, sharing its
    state and hooks, in `model`'s current mode, with the requires_grad flags it had. Returns the (possibly new) root.

    >>> net = unfreeze_batchnorm(freeze_batchnorm(nn.Sequential(nn.BatchNorm1d(4))))
    >>> type(net[0]) is nn.BatchNorm1d, net[0].weight.requires_grad
    (True, True)
    """
    mode = model.training
    frozen = [m for m in model.modules() if hasattr(m, "unfrozen_type")]
    flags = {id(p): m.unfrozen_requires_grad[name] for m in frozen for name, p in m.named_parameters()}
    restored = {id(m.running_mean) for m in frozen}  # the same tensors after the swap
    model = swap_batchnorm(model, lambda m: getattr(m, "unfrozen_type", None))
    for layer in model.modules():
        if id(getattr(layer, "running_mean", None)) in restored:
            layer.train(mode)
            for p in layer.parameters(recurse=False):
                p.requires_grad_(flags[id(p)])
    return model
