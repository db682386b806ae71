"""bnnotes.folding: a folded layer must equal Linear/Conv followed by BN in eval mode."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bnnotes import torch_bn
from bnnotes.experiments import mlp
from bnnotes.folding import fold_batchnorm, fold_bn, fold_weights, is_foldable

BN_CLASSES = {
    ("bnnotes", 1): torch_bn.BatchNorm1d,
    ("bnnotes", 2): torch_bn.BatchNorm2d,
    ("bnnotes", 3): torch_bn.BatchNorm3d,
    ("torch", 1): nn.BatchNorm1d,
    ("torch", 2): nn.BatchNorm2d,
    ("torch", 3): nn.BatchNorm3d,
}

# (name, layer factory, BN dimension, input shape)
LAYERS = [
    ("linear", lambda bias: nn.Linear(7, 5, bias=bias), 1, (6, 7)),
    ("conv1d", lambda bias: nn.Conv1d(4, 6, 3, stride=2, padding=1, bias=bias), 1, (3, 4, 11)),
    ("conv2d", lambda bias: nn.Conv2d(4, 6, 3, padding=1, bias=bias), 2, (3, 4, 7, 6)),
    ("conv2d_groups", lambda bias: nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2, bias=bias), 2,
     (3, 4, 9, 8)),
    ("conv2d_reflect", lambda bias: nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect", bias=bias), 2,
     (2, 3, 5, 5)),
    ("conv3d", lambda bias: nn.Conv3d(2, 4, (3, 2, 2), stride=(1, 2, 1), padding=1, bias=bias), 3, (2, 2, 5, 6, 4)),
]


def _random_bn(bn: nn.Module, generator: torch.Generator) -> nn.Module:
    """Non-trivial statistics and affine parameters, channels on very different scales."""
    c = bn.num_features
    with torch.no_grad():
        scales = torch.logspace(-2, 2, c, dtype=torch.float64)
        bn.running_mean.copy_(torch.randn(c, generator=generator, dtype=torch.float64) * scales)
        bn.running_var.copy_(scales**2 * (0.5 + torch.rand(c, generator=generator, dtype=torch.float64)))
        if bn.affine:
            bn.weight.copy_(torch.randn(c, generator=generator, dtype=torch.float64))
            bn.bias.copy_(torch.randn(c, generator=generator, dtype=torch.float64))
    return bn


def _pair(name, bias, family, affine, dtype, seed=0):
    _, factory, dim, shape = next(entry for entry in LAYERS if entry[0] == name)
    torch.manual_seed(seed)
    layer = factory(bias).to(dtype)
    out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    bn = BN_CLASSES[(family, dim)](out, eps=1e-3, affine=affine).to(dtype)
    _random_bn(bn, torch.Generator().manual_seed(seed))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1), dtype=dtype) * 3 + 1
    return layer, bn.eval(), x


@pytest.mark.parametrize("name", [entry[0] for entry in LAYERS])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("family", ["bnnotes", "torch"])
@pytest.mark.parametrize("affine", [True, False])
def test_folded_layer_equals_layer_then_bn_float64(name, bias, family, affine):
    layer, bn, x = _pair(name, bias, family, affine, torch.float64)
    expected = bn(layer(x))
    folded = fold_bn(layer, bn)
    assert type(folded) is type(layer)
    assert folded.bias is not None
    torch.testing.assert_close(folded(x), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", [entry[0] for entry in LAYERS])
@pytest.mark.parametrize("family", ["bnnotes", "torch"])
def test_folded_layer_equals_layer_then_bn_float32(name, family):
    layer, bn, x = _pair(name, True, family, True, torch.float32)
    expected = bn(layer(x))
    folded = fold_bn(layer, bn)
    assert folded.weight.dtype == torch.float32
    scale = expected.abs().max()
    assert (folded(x) - expected).abs().max() <= 1e-5 * scale


def test_fold_bn_does_not_modify_its_arguments_and_keeps_hyperparameters():
    layer, bn, _ = _pair("conv2d_groups", False, "bnnotes", True, torch.float64)
    weight, buffers = layer.weight.clone(), {k: v.clone() for k, v in bn.state_dict().items()}
    folded = fold_bn(layer, bn)
    assert torch.equal(layer.weight, weight) and layer.bias is None
    assert all(torch.equal(v, buffers[k]) for k, v in bn.state_dict().items())
    for attr in ("stride", "padding", "dilation", "groups", "padding_mode", "kernel_size"):
        assert getattr(folded, attr) == getattr(layer, attr)


def test_fold_weights_matches_the_formula():
    g = torch.Generator().manual_seed(3)
    w, b = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    gamma, beta = torch.randn(4, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    mean, var = torch.randn(4, generator=g, dtype=torch.float64), torch.rand(4, generator=g, dtype=torch.float64)
    fw, fb = fold_weights(w, b, gamma, beta, mean, var, eps=1e-5)
    s = gamma / torch.sqrt(var + 1e-5)
    torch.testing.assert_close(fw, w * s[:, None], rtol=0, atol=1e-14)
    torch.testing.assert_close(fb, (b - mean) * s + beta, rtol=0, atol=1e-14)
    # affine=False and no bias mean gamma = 1, beta = 0, b = 0.
    fw, fb = fold_weights(w, None, None, None, mean, var, eps=0.0)
    torch.testing.assert_close(fb, -mean / torch.sqrt(var), rtol=0, atol=1e-14)


def test_fold_weights_validates_its_input():
    w, v = torch.ones(3, 2), torch.ones(3)
    with pytest.raises(TypeError, match="weight"):
        fold_weights(torch.ones(3), None, None, None, v, v)
    with pytest.raises(TypeError, match="weight"):
        fold_weights(torch.ones(3, 2, dtype=torch.long), None, None, None, v, v)
    with pytest.raises(ValueError, match=r"gamma must have shape \(3,\)"):
        fold_weights(w, None, torch.ones(4), None, v, v)
    with pytest.raises(TypeError, match="beta"):
        fold_weights(w, None, None, [0.0, 0.0, 0.0], v, v)
    with pytest.raises(ValueError, match="running_var is required"):
        fold_weights(w, None, None, None, v, None)


def test_fold_bn_errors_are_clear():
    layer, bn, _ = _pair("linear", True, "bnnotes", True, torch.float64)
    with pytest.raises(ValueError, match="training mode"):
        fold_bn(layer, bn.train())
    bn.eval()
    with pytest.raises(ValueError, match="cannot follow a layer with 5 outputs"):
        fold_bn(layer, torch_bn.BatchNorm1d(4).eval())
    with pytest.raises(ValueError, match="no running statistics"):
        fold_bn(layer, torch_bn.BatchNorm1d(5, track_running_stats=False).eval())
    with pytest.raises(TypeError, match="must be followed by"):
        fold_bn(layer, nn.BatchNorm2d(5).eval())
    with pytest.raises(TypeError, match="must be followed by"):
        fold_bn(nn.Conv2d(2, 5, 3), torch_bn.BatchNorm1d(5).eval())
    with pytest.raises(TypeError, match="layer must be"):
        fold_bn(nn.ConvTranspose2d(2, 5, 3), nn.BatchNorm2d(5).eval())
    assert not is_foldable(nn.ConvTranspose2d(2, 5, 3), nn.BatchNorm2d(5))
    assert is_foldable(layer, bn)


def _trained_bn_mlp(seed: int = 0) -> nn.Module:
    """An MLP whose BN layers have seen real training batches (non-trivial running statistics)."""
    model = mlp(10, hidden=(16, 12), norm="bn", activation="relu", seed=seed).double()
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(20):
        x = torch.randn(32, 10, generator=g, dtype=torch.float64) * 2 + 0.5
        loss = model(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def test_fold_batchnorm_on_an_mlp_equals_the_unfused_model():
    model = _trained_bn_mlp()
    x = torch.randn(50, 10, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_batchnorm(model)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-10, atol=1e-10)
    assert not any(isinstance(m, torch_bn.BatchNorm1d) for m in folded.modules())
    assert [type(m).__name__ for m in folded][:3] == ["Linear", "Identity", "ReLU"]
    assert not folded.training
    # The original is untouched.
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert any(isinstance(m, torch_bn.BatchNorm1d) for m in model.modules())


def test_fold_batchnorm_recurses_and_leaves_unfoldable_bn_in_place():
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
    model = nn.Sequential(
        inner,
        torch_bn.BatchNorm2d(4),  # follows a Sequential, not a conv: stays
        nn.Conv2d(4, 4, 1, bias=False),
        torch_bn.BatchNorm2d(4, track_running_stats=False),  # no running statistics: stays
        nn.Flatten(),
        nn.Linear(4 * 5 * 5, 3),
        torch_bn.BatchNorm1d(3),
    )
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, torch_bn.BatchNorm2d, torch_bn.BatchNorm1d)) and m.track_running_stats:
            _random_bn(m, g)
    model.eval()
    x = torch.randn(6, 3, 5, 5, generator=g)
    folded = fold_batchnorm(model)
    assert isinstance(folded[0][1], nn.Identity) and isinstance(folded[6], nn.Identity)
    assert isinstance(folded[1], torch_bn.BatchNorm2d) and isinstance(folded[3], torch_bn.BatchNorm2d)
    scale = model(x).abs().max()
    assert (folded(x) - model(x)).abs().max() <= 1e-5 * scale


def test_fold_batchnorm_refuses_a_model_in_training_mode():
    model = _trained_bn_mlp().train()
    with pytest.raises(ValueError, match=r"eval mode.*2 BN layer\(s\).*'1', '4'.*model.eval\(\)"):
        fold_batchnorm(model)
    with pytest.raises(TypeError, match="nn.Module"):
        fold_batchnorm(lambda x: x)


def test_fold_batchnorm_on_device(device):
    model = _trained_bn_mlp().float().to(device)
    x = torch.randn(20, 10, device=device)
    folded = fold_batchnorm(model)
    assert folded[0].weight.device.type == device.type
    assert (folded(x) - model(x)).abs().max() <= 1e-5 * model(x).abs().max()
