"""Tests of bnnotes.variants: every teaching variant against a float64 formula and PyTorch's BN buffers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from bnnotes import variants as V
from bnnotes.experiments import TrainConfig, load_digits, mlp, train
from bnnotes.experiments.models import NORMS, make_norm, norm_factory
from bnnotes.torch_bn import BatchNorm1d

C = 5
GAMMA = np.linspace(0.5, 2.0, C)
BETA = np.linspace(-1.0, 1.0, C)


def _features(n: int = 16, c: int = C, seed: int = 0, length: int | None = None) -> torch.Tensor:
    """(n, c) or (n, c, length) float64 values whose channels have different means and scales."""
    g = torch.Generator().manual_seed(seed)
    shape = (n, c) if length is None else (n, c, length)
    view = (1, c) if length is None else (1, c, 1)
    scales = torch.linspace(0.5, 4.0, c, dtype=torch.float64).view(view)
    return torch.randn(shape, generator=g, dtype=torch.float64) * scales + torch.arange(c, dtype=torch.float64).view(view)


def _with_affine(layer: nn.Module) -> nn.Module:
    layer = layer.double()
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(GAMMA))
        layer.bias.copy_(torch.from_numpy(BETA))
    return layer


def _channels_last(a: np.ndarray) -> np.ndarray:
    """(N, C) or (N, C, L) -> (M, C): one row per value that shares a channel's statistics."""
    return a if a.ndim == 2 else a.transpose(0, 2, 1).reshape(-1, a.shape[1])


def _back(flat: np.ndarray, like: np.ndarray) -> np.ndarray:
    if like.ndim == 2:
        return flat
    n, c, length = like.shape
    return flat.reshape(n, length, c).transpose(0, 2, 1)


def _mean_only_reference(x: np.ndarray, dy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """y = gamma (x - mu) + beta and its input gradient gamma (dy - mean(dy)), per channel, in float64."""
    xs, dys = _channels_last(x), _channels_last(dy)
    y = GAMMA * (xs - xs.mean(0)) + BETA
    dx = GAMMA * (dys - dys.mean(0))
    return _back(y, x), _back(dx, x)


def _variance_only_reference(x: np.ndarray, dy: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """y = gamma x / s + beta with s = sqrt(var + eps), and dx_j = gamma (dy_j / s - (sum_i dy_i x_i)(x_j - mu) / (m s^3))."""
    xs, dys = _channels_last(x), _channels_last(dy)
    m = xs.shape[0]
    mu = xs.mean(0)
    s = np.sqrt(((xs - mu) ** 2).mean(0) + eps)
    y = GAMMA * xs / s + BETA
    dx = GAMMA * (dys / s - (dys * xs).sum(0) * (xs - mu) / (m * s**3))
    return _back(y, x), _back(dx, x)


def _torch_buffers_after(batches: list[torch.Tensor], momentum: float | None) -> nn.BatchNorm1d:
    reference = nn.BatchNorm1d(C, momentum=momentum).double()
    for x in batches:
        reference(x)
    return reference


# ---------------------------------------------------------------------------------------------------- half of BN


@pytest.mark.parametrize("length", [None, 3])
@pytest.mark.parametrize("name, cls", [("mean", V.MeanOnlyBatchNorm1d), ("var", V.VarianceOnlyBatchNorm1d)])
def test_half_bn_training_output_and_gradient_match_the_float64_formula(name, cls, length):
    layer = _with_affine(cls(C))
    x = _features(length=length).requires_grad_(True)
    dy = _features(seed=1, length=length)
    y = layer(x)
    y.backward(dy)
    x_np, dy_np = x.detach().numpy(), dy.numpy()
    if name == "mean":
        y_ref, dx_ref = _mean_only_reference(x_np, dy_np)
    else:
        y_ref, dx_ref = _variance_only_reference(x_np, dy_np, layer.eps)
    np.testing.assert_allclose(y.detach().numpy(), y_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(x.grad.numpy(), dx_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("momentum", [0.3, None])
@pytest.mark.parametrize("cls", [V.MeanOnlyBatchNorm1d, V.VarianceOnlyBatchNorm1d, V.DetachedStatsBatchNorm1d,
                                 V.MovingAverageBatchNorm1d])
def test_running_buffers_follow_pytorch_batchnorm(cls, momentum):
    batches = [_features(seed=s) * (1 + s) for s in range(3)]
    layer = cls(C, momentum=momentum).double()
    for x in batches:
        layer(x)
    reference = _torch_buffers_after(batches, momentum)
    torch.testing.assert_close(layer.running_mean, reference.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.running_var, reference.running_var, rtol=1e-12, atol=1e-12)
    assert int(layer.num_batches_tracked) == int(reference.num_batches_tracked) == 3


def test_half_bn_eval_mode_uses_the_running_statistics():
    batches = [_features(seed=s) * (1 + s) for s in range(3)]
    x = _features(seed=7)
    for cls in (V.MeanOnlyBatchNorm1d, V.VarianceOnlyBatchNorm1d):
        layer = _with_affine(cls(C))
        for batch in batches:
            layer(batch)
        layer.eval()
        running_mean, running_var = layer.running_mean.numpy(), layer.running_var.numpy()
        x_np = x.numpy()
        if cls is V.MeanOnlyBatchNorm1d:
            expected = GAMMA * (x_np - running_mean) + BETA
        else:
            expected = GAMMA * x_np / np.sqrt(running_var + layer.eps) + BETA
        np.testing.assert_allclose(layer(x).detach().numpy(), expected, rtol=1e-12, atol=1e-12)
        # eval mode leaves the buffers alone
        assert int(layer.num_batches_tracked) == 3


def test_half_bn_without_running_stats_uses_the_batch_in_eval_mode_too():
    x = _features()
    for cls in (V.MeanOnlyBatchNorm1d, V.VarianceOnlyBatchNorm1d):
        layer = cls(C, track_running_stats=False).double()
        torch.testing.assert_close(layer.eval()(x), layer.train()(x))


def test_mean_only_centres_but_does_not_scale_and_variance_only_scales_but_does_not_centre():
    x = _features()
    centred = V.MeanOnlyBatchNorm1d(C).double()(x)
    scaled = V.VarianceOnlyBatchNorm1d(C).double()(x)
    torch.testing.assert_close(centred.mean(0), torch.zeros(C, dtype=torch.float64))
    torch.testing.assert_close(centred.var(0), x.var(0))  # the spread is untouched
    torch.testing.assert_close(scaled.var(0, correction=0), torch.ones(C, dtype=torch.float64), rtol=1e-4, atol=0)
    assert (scaled.mean(0) - x.mean(0) / x.std(0, correction=0)).abs().max() < 1e-4  # the mean is only rescaled


@pytest.mark.parametrize("cls", [V.MeanOnlyBatchNorm1d, V.VarianceOnlyBatchNorm1d, V.DetachedStatsBatchNorm1d])
def test_variants_name_the_wrong_channel_count_and_rank(cls):
    layer = cls(4)
    with pytest.raises(ValueError, match="expected 4 channels"):
        layer(torch.randn(7, 3))
    with pytest.raises(ValueError, match="4-D"):
        layer(torch.randn(2, 4, 3, 3))


# ---------------------------------------------------------------------------------------------------- moving averages


def test_moving_average_bn_normalizes_with_the_updated_running_statistics():
    x = _features()
    layer = _with_affine(V.MovingAverageBatchNorm1d(C, momentum=0.3))
    reference = _with_affine(BatchNorm1d(C, momentum=0.3))
    y = layer(x)
    reference(x)  # the same update of the running statistics
    torch.testing.assert_close(layer.running_mean, reference.running_mean)
    torch.testing.assert_close(layer.running_var, reference.running_var)
    assert int(layer.num_batches_tracked) == 1
    expected = layer.weight * (x - layer.running_mean) / torch.sqrt(layer.running_var + layer.eps) + layer.bias
    torch.testing.assert_close(y, expected)
    # Not the batch normalization: the output's batch mean is not beta.
    assert not torch.allclose(y.mean(0), layer.bias)


def test_moving_average_bn_backpropagates_a_fixed_affine_map():
    x = _features().requires_grad_(True)
    layer = _with_affine(V.MovingAverageBatchNorm1d(C))
    dy = _features(seed=1)
    (layer(x) * dy).sum().backward()
    scale = layer.weight.detach() / torch.sqrt(layer.running_var + layer.eps)
    torch.testing.assert_close(x.grad, dy * scale)


def test_moving_average_bn_is_batchnorm_in_eval_mode():
    x = _features()
    layer = V.MovingAverageBatchNorm1d(C).double()
    reference = BatchNorm1d(C).double()
    for _ in range(3):
        layer(x)
        reference(x)
    layer.eval()
    reference.eval()
    torch.testing.assert_close(layer(x), reference(x))


def test_pre_bn_bias_gets_no_gradient_with_bn_but_does_with_moving_averages():
    x = _features(c=4).float()
    grads = {}
    for key, norm in {"bn": BatchNorm1d, "moving": V.MovingAverageBatchNorm1d}.items():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(4, 3), norm(3), nn.Sigmoid(), nn.Linear(3, 2))
        net(x).pow(2).sum().backward()
        grads[key] = net[0].bias.grad.abs().max().item()
    assert grads["bn"] < 1e-6
    assert grads["moving"] > 1e-3


# ---------------------------------------------------------------------------------------------------- detached statistics


@pytest.mark.parametrize("length", [None, 3])
def test_detached_statistics_forward_is_pytorch_bn_and_gradient_is_the_fixed_affine_map(length):
    x = _features(length=length).requires_grad_(True)
    dy = _features(seed=1, length=length)
    layer = _with_affine(V.DetachedStatsBatchNorm1d(C))
    reference = _with_affine(nn.BatchNorm1d(C))
    y = layer(x)
    torch.testing.assert_close(y, reference(x.detach()), rtol=1e-12, atol=1e-12)
    y.backward(dy)
    xs = _channels_last(x.detach().numpy())
    inv_std = 1.0 / np.sqrt(xs.var(0) + layer.eps)
    view = (1, C) if length is None else (1, C, 1)
    np.testing.assert_allclose(x.grad.numpy(), dy.numpy() * (GAMMA * inv_std).reshape(view), rtol=1e-12)
    layer.eval()
    reference.eval()
    torch.testing.assert_close(layer(x.detach()), reference(x.detach()), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------------- frozen statistics


def test_freeze_bn_statistics_keeps_bn_in_eval_mode_and_shares_parameters():
    data = load_digits()
    model = mlp(64, hidden=(10,), activation="relu", norm="bn", seed=0)
    weight = model[1].weight
    frozen = V.freeze_bn_statistics(model)
    layer = frozen[1]
    assert isinstance(layer, V.EvalModeBatchNorm1d) and layer.weight is weight
    frozen.train()
    assert not layer.training and frozen[0].training
    running = (layer.running_mean.clone(), layer.running_var.clone())
    before = layer.weight.detach().clone()
    train(frozen, data, TrainConfig(steps=3, batch_size=2, lr=0.1, eval_every=3))
    torch.testing.assert_close(layer.running_mean, running[0])
    torch.testing.assert_close(layer.running_var, running[1])
    assert not torch.equal(layer.weight.detach(), before)  # gamma is still trained
    assert type(V.freeze_bn_statistics(BatchNorm1d(3))) is V.EvalModeBatchNorm1d  # a bare layer is replaced too
    assert type(V.freeze_bn_statistics(V.MeanOnlyBatchNorm1d(3))) is V.MeanOnlyBatchNorm1d  # variants are not


# ---------------------------------------------------------------------------------------------------- noise


def test_noise_is_resampled_every_step_and_off_in_eval():
    noise = V.ActivationNoise(200, mean_range=0.5, std_range=(1.0, 1.5), seed=3)
    x = torch.zeros(4000, 200)
    first, second = noise(x), noise(x)
    # Each call draws a new mean per unit (within the range) and a new std per unit (within the range).
    for out in (first, second):
        assert out.mean(0).abs().max() < 0.5 + 0.1
        assert 0.9 < out.std(0).min() and out.std(0).max() < 1.6
    assert (first.mean(0) - second.mean(0)).abs().mean() > 0.15
    noise.eval()
    assert torch.equal(noise(x), x)
    # Deterministic given the seed.
    a, b = V.ActivationNoise(5, seed=1), V.ActivationNoise(5, seed=1)
    assert torch.equal(a(torch.zeros(3, 5)), b(torch.zeros(3, 5)))
    with pytest.raises(ValueError, match="std_range"):
        V.ActivationNoise(5, std_range=(2.0, 1.0))


# ---------------------------------------------------------------------------------------------------- the registry


def test_every_registered_norm_builds_a_shape_preserving_layer_in_both_modes():
    x = _features(n=8, c=6).float()
    for name in NORMS:
        layer = make_norm(name, 6)
        assert layer(x).shape == x.shape, name
        assert layer.eval()(x).shape == x.shape, name
    for name, cls in [("bn-moving", V.MovingAverageBatchNorm1d), ("bn-detached", V.DetachedStatsBatchNorm1d),
                      ("bn-frozen", V.EvalModeBatchNorm1d), ("bn-mean-only", V.MeanOnlyBatchNorm1d),
                      ("bn-var-only", V.VarianceOnlyBatchNorm1d)]:
        assert type(make_norm(name, 6)) is cls
        assert type(mlp(6, hidden=(4, 4), norm=name)[1]) is cls


def test_an_unknown_norm_name_lists_the_registered_names():
    with pytest.raises(ValueError, match="bn-mean-only"):
        norm_factory("batchnorm")
    factory = lambda width: nn.Identity()  # noqa: E731
    assert norm_factory(factory) is factory
