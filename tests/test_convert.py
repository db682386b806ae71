"""bnnotes.convert: one swap walker for every converter; state, mode and hooks carried over; freezing and unfreezing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bnnotes import convert, sync, torch_bn
from bnnotes.ghost import GhostBatchNorm1d
from bnnotes.renorm import BatchRenorm1d

F64 = torch.float64


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)).double()


CONVERTERS = {
    "convert_batchnorm": (convert.convert_batchnorm, torch_bn.BatchNorm1d),
    "to_torch_batchnorm": (lambda m: convert.to_torch_batchnorm(convert.convert_batchnorm(m)), nn.BatchNorm1d),
    "convert_sync_batchnorm": (convert.convert_sync_batchnorm, sync.SyncBatchNorm),
    "freeze_batchnorm": (convert.freeze_batchnorm, torch_bn.FrozenBatchNorm1d),
}


@pytest.mark.parametrize("name", list(CONVERTERS))
def test_every_converter_keeps_hooks_and_their_handles(name):
    converter, expected_type = CONVERTERS[name]
    net = _net()
    calls = []
    forward = net[1].register_forward_hook(lambda m, i, o: calls.append("forward"))
    net[1].register_forward_pre_hook(lambda m, i: calls.append("pre"))
    net[1].register_full_backward_hook(lambda m, gi, go: calls.append("backward"))
    net = converter(net)
    assert type(net[1]) is expected_type
    net(torch.randn(6, 3, dtype=F64, requires_grad=True)).sum().backward()
    assert calls[:3] == ["pre", "forward", "backward"], f"{name} dropped or reordered hooks: {calls}"
    forward.remove()  # a handle from before the conversion still removes its hook
    calls.clear()
    net(torch.randn(6, 3, dtype=F64))
    assert calls == ["pre"]


@pytest.mark.parametrize("name", list(CONVERTERS))
def test_every_converter_shares_the_state_tensors(name):
    converter, _ = CONVERTERS[name]
    net = _net()
    net.train()(torch.randn(8, 3, dtype=F64))  # running statistics away from their initial values
    before = {k: v for k, v in net[1].state_dict(keep_vars=True).items()}
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    net = converter(net)
    after = net[1].state_dict(keep_vars=True)
    assert before.keys() == after.keys()
    assert all(before[k] is after[k] for k in before), "the new layer must hold the very same tensors"
    assert any(p is net[1].weight for group in optimizer.param_groups for p in group["params"])


def test_the_converters_are_one_walker_and_leave_lookalikes_alone():
    net = nn.Sequential(nn.BatchNorm1d(4), BatchRenorm1d(4), GhostBatchNorm1d(4, virtual_batch_size=2),
                        nn.Sequential(nn.BatchNorm1d(4)))
    net = convert.convert_sync_batchnorm(net)
    assert [type(m) for m in net[:3]] == [sync.SyncBatchNorm, BatchRenorm1d, GhostBatchNorm1d]
    assert type(net[3][0]) is sync.SyncBatchNorm, "nested containers are visited"
    root = convert.convert_batchnorm(nn.BatchNorm2d(3))
    assert type(root) is torch_bn.BatchNorm2d, "a BN root is replaced and returned"
    renamed = convert.swap_batchnorm(nn.Sequential(nn.BatchNorm1d(2)), lambda m: torch_bn.BatchNorm1d
                                     if isinstance(m, nn.BatchNorm1d) else None)
    assert type(renamed[0]) is torch_bn.BatchNorm1d
    for converter in (convert.convert_batchnorm, convert.to_torch_batchnorm, convert.convert_sync_batchnorm,
                      convert.freeze_batchnorm):
        with pytest.raises(TypeError, match="must be a torch.nn.Module, got str"):
            converter("not a module")


def test_the_old_names_are_the_converters_themselves():
    assert torch_bn.convert_batchnorm is convert.convert_batchnorm
    assert torch_bn.to_torch_batchnorm is convert.to_torch_batchnorm
    assert sync.convert_sync_batchnorm is convert.convert_sync_batchnorm


def test_freeze_keeps_statistics_and_parameters_fixed_through_training_steps():
    net = _net()
    net.train()(torch.randn(8, 3, dtype=F64))
    frozen = convert.freeze_batchnorm(net)
    bn = frozen[1]
    frozen.train()
    assert not bn.training and bn.weight.requires_grad is False and bn.bias.requires_grad is False
    stats = [t.clone() for t in (bn.running_mean, bn.running_var, bn.num_batches_tracked, bn.weight, bn.bias)]
    optimizer = torch.optim.SGD([p for p in frozen.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        x = torch.randn(8, 3, dtype=F64) * 5 + 2
        optimizer.zero_grad()
        frozen(x).square().sum().backward()
        optimizer.step()
    for before, after in zip(stats, (bn.running_mean, bn.running_var, bn.num_batches_tracked, bn.weight, bn.bias)):
        assert torch.equal(before, after)
    assert frozen[0].weight.grad is not None, "the layers before a frozen BN still train"
    # Frozen BN computes eval-mode BN: the same function as torch's layer in eval mode.
    reference = nn.BatchNorm1d(4).double().eval()
    reference.load_state_dict(bn.state_dict())
    z = torch.randn(5, 4, dtype=F64)
    torch.testing.assert_close(bn(z), reference(z), rtol=1e-12, atol=1e-12)


def test_freeze_with_affine_false_freezes_statistics_only_and_unfreeze_restores_everything():
    net = _net()
    net[1].bias.requires_grad_(False)  # a flag set by the user must come back as it was
    frozen = convert.freeze_batchnorm(net, affine=False)
    assert frozen[1].weight.requires_grad and not frozen[1].bias.requires_grad and not frozen[1].train().training
    frozen = convert.freeze_batchnorm(frozen)  # freezing twice leaves the frozen layer alone
    assert frozen[1].unfrozen_type is nn.BatchNorm1d
    frozen.eval()
    restored = convert.unfreeze_batchnorm(frozen.train())
    assert type(restored[1]) is nn.BatchNorm1d and restored[1].training
    assert restored[1].weight.requires_grad and not restored[1].bias.requires_grad
    ours = convert.unfreeze_batchnorm(convert.freeze_batchnorm(nn.Sequential(torch_bn.BatchNorm2d(3))).eval())
    assert type(ours[0]) is torch_bn.BatchNorm2d and not ours[0].training


def test_freeze_refuses_a_layer_without_running_statistics():
    with pytest.raises(ValueError, match=r"without running statistics.*\['1'\]"):
        convert.freeze_batchnorm(nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3, track_running_stats=False)))


def test_freezing_statistics_only_for_fine_tuning_keeps_eval_mode_and_trains_gamma():
    """The pitfalls chapter's fine-tuning: statistics frozen under model.train(), gamma and beta still trained, the
    same parameter objects (an optimizer built before the swap keeps working)."""
    from bnnotes.experiments import TrainConfig, load_digits, mlp, train
    from bnnotes.variants import MeanOnlyBatchNorm1d

    data = load_digits()
    model = mlp(64, hidden=(10,), activation="relu", norm="bn", seed=0)
    weight = model[1].weight
    frozen = convert.freeze_batchnorm(model, affine=False)
    layer = frozen[1]
    assert isinstance(layer, torch_bn.FrozenBatchNorm1d) and layer.weight is weight and weight.requires_grad
    frozen.train()
    assert not layer.training and frozen[0].training
    running = (layer.running_mean.clone(), layer.running_var.clone())
    before = layer.weight.detach().clone()
    train(frozen, data, TrainConfig(steps=3, batch_size=2, lr=0.1, eval_every=3))
    torch.testing.assert_close(layer.running_mean, running[0])
    torch.testing.assert_close(layer.running_var, running[1])
    assert not torch.equal(layer.weight.detach(), before)  # gamma is still trained
    assert type(convert.freeze_batchnorm(torch_bn.BatchNorm1d(3), affine=False)) is torch_bn.FrozenBatchNorm1d
    assert type(convert.freeze_batchnorm(MeanOnlyBatchNorm1d(3))) is MeanOnlyBatchNorm1d  # variants are left alone
