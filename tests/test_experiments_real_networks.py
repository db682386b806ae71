"""Tests of bnnotes.experiments.real_networks: the measurements behave as the chapter says, and bad input is refused."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from bnnotes.experiments import TrainConfig, load_digits, make_norm, mlp
from bnnotes.experiments import real_networks as rn


def test_statistics_masks_are_the_family_picture():
    shape = (5, 4, 3, 3)
    masks = {name: rn.statistics_mask(m, shape, n=2, c=3) for name, m in rn.family_modules(4, 3, 3).items()}
    assert masks["bn"].sum() == 5 and masks["bn"][:, 3].all()  # channel 3 of every example
    assert masks["ln"].sum() == 4 and masks["ln"][2].all()  # every channel of example 2
    assert masks["rms"].sum() == 4 and masks["rms"][2].all()
    assert masks["in"].sum() == 1 and masks["in"][2, 3]
    assert masks["gn"].sum() == 2 and masks["gn"][2, 2:].all()  # group {2, 3} of example 2


def test_family_properties_separate_bn_from_the_rest():
    rows = {row.name: row for row in rn.family_properties()}
    with pytest.raises(TypeError, match="FamilyConfig"):
        rn.family_properties((8, 4, 5, 5))
    assert set(rows) == set(rn.FAMILY)
    assert rows["bn"].batch_dependence > 0 and rows["bn"].train_eval_gap > 0 and rows["bn"].batch1_gap > 0
    for name in ("ln", "in", "gn", "rms"):
        assert rows[name].batch_dependence == rows[name].batch1_gap == rows[name].train_eval_gap == 0.0


def test_make_norm_spatial_registry():
    x = torch.randn(4, 8, 5, 5)
    for name in ("none", "bn", "ln", "gn", "in"):
        assert make_norm(name, 8, spatial=True)(x).shape == x.shape
    assert make_norm("rms", 8)(torch.randn(3, 8)).shape == (3, 8)
    with pytest.raises(ValueError, match="feature-map.*got 'rms'"):
        make_norm("rms", 8, spatial=True)
    ln = make_norm("ln", 8, spatial=True)  # LayerNorm over (C, H, W): each example has mean 0, variance 1
    y = ln(3.0 + 2.0 * x).detach()
    np.testing.assert_allclose(y.mean(dim=(1, 2, 3)), 0.0, atol=1e-5)
    np.testing.assert_allclose(y.var(dim=(1, 2, 3), unbiased=False), 1.0, atol=1e-3)


def test_digit_images_and_convnet_shapes():
    images = rn.load_digit_images(size=16)
    assert tuple(images.x_train.shape) == (1257, 1, 16, 16) and tuple(images.x_test.shape) == (540, 1, 16, 16)
    flat = load_digits()
    # Upsampling then averaging 2x2 blocks approximately restores the 8x8 image.
    down = torch.nn.functional.avg_pool2d(images.x_train[:10], 2).reshape(10, 64)
    assert torch.corrcoef(torch.stack([down.flatten(), flat.x_train[:10].flatten()]))[0, 1] > 0.95
    for placement in ("before", "after"):
        for norm in ("none", "bn", "gn"):
            assert rn.convnet(norm, placement=placement)(images.x_train[:3]).shape == (3, 10)
    assert rn.convnet("bn", image_size=8)(rn.load_digit_images(size=8).x_train[:2]).shape == (2, 10)
    a, b = rn.convnet("bn", seed=1), rn.convnet("bn", seed=1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))  # a pure function of the seed


def test_convnet_and_images_refuse_bad_arguments():
    with pytest.raises(ValueError, match="placement must be 'before' or 'after'"):
        rn.convnet("bn", placement="middle")
    with pytest.raises(ValueError, match="divisible by 2\\*\\*len\\(channels\\)"):
        rn.convnet("bn", image_size=10)
    with pytest.raises(ValueError, match="size must be an integer >= 8"):
        rn.load_digit_images(size=4)


def test_lr_sweep_and_largest_good_lr():
    data = load_digits()
    runs = rn.lr_sweep({"bn": lambda: mlp(64, hidden=(20,), norm="bn")}, data, (0.1, 1e-6),
                       TrainConfig(steps=40, batch_size=60, eval_every=20))
    assert set(runs) == {"bn"} and set(runs["bn"]) == {0.1, 1e-6}
    assert runs["bn"][0.1].final_test_acc > runs["bn"][1e-6].final_test_acc
    assert rn.largest_good_lr(runs["bn"], 0.5) == 0.1
    assert rn.largest_good_lr(runs["bn"], 1.01) is None


def test_residual_stream_follows_the_predictions():
    x = torch.randn(512, 128, generator=torch.Generator().manual_seed(0))
    bn = rn.stream_mean_square(rn.residual_mlp(width=128, depth=10, norm="bn").blocks, x)
    np.testing.assert_allclose(bn[-1], bn[0] + 10, rtol=0.1)
    plain = rn.stream_mean_square(rn.residual_mlp(width=128, depth=10, norm="none").blocks, x)
    assert abs(math.log2(plain[-1] / plain[0]) - 10) < 1.5
    zero = rn.residual_mlp(width=128, depth=4, norm="bn", zero_init_last_gamma=True)
    assert all(torch.equal(block(x), x) for block in zero.blocks)
    assert zero(x[:, :64]).shape == (512, 10)
    with pytest.raises(ValueError, match="needs a normalization with a gamma"):
        rn.residual_mlp(norm="none", zero_init_last_gamma=True)
    with pytest.raises(ValueError, match="depth must be at least 1"):
        rn.residual_mlp(depth=0)


def test_padding_changes_bn_but_not_per_token_norms():
    result = rn.padding_experiment()
    assert result.bn > 0.1 and result.ln == 0.0 and result.rms == 0.0
    assert 0 < result.pad_fraction_short < result.pad_fraction_long < 1
    with pytest.raises(ValueError, match="every length must fit"):
        rn.padding_experiment(rn.PaddingConfig(lengths=(30,), pad_to=(12, 24)))


def test_pre_and_post_ln_streams():
    streams = rn.ln_stream_mean_square(rn.LNStreamConfig(depth=8, width=32, n=256))
    np.testing.assert_allclose(streams.post[1:], 1.0, atol=1e-3)
    assert np.all(np.diff(streams.pre) > 0)


def test_dropout_variance_shift_matches_the_formula():
    for p, mean in ((0.5, 1.0), (0.2, 0.0)):
        shift = rn.dropout_variance_shift(rn.DropoutShiftConfig(p=p, mean=mean, std=1.0, steps=100))
        np.testing.assert_allclose(shift.measured_ratio, shift.predicted_ratio, rtol=0.05)
    no_dropout = rn.dropout_variance_shift(rn.DropoutShiftConfig(p=0.0, steps=50))
    np.testing.assert_allclose(no_dropout.predicted_ratio, 1.0)
    np.testing.assert_allclose(no_dropout.eval_output_std, 1.0, rtol=0.05)
    state = torch.random.get_rng_state()
    rn.dropout_variance_shift(rn.DropoutShiftConfig(steps=5))
    assert torch.equal(state, torch.random.get_rng_state()), "the global generator should be restored"
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\)"):
        rn.dropout_variance_shift(rn.DropoutShiftConfig(p=1.0))


def test_precise_bn_recomputes_the_population_statistics_with_dropout_off():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Dropout(0.5), make_norm("bn", 5), nn.ReLU(), nn.Linear(5, 2))
    x = torch.randn(600, 6) * 3 + 1
    fresh = rn.precise_bn(model, x, batch_size=60)
    assert not fresh.training and model[2].num_batches_tracked == 0  # the input model is untouched
    with torch.no_grad():
        h = model[0](x)  # dropout off
    np.testing.assert_allclose(fresh[2].running_mean, h.mean(dim=0), rtol=1e-5, atol=1e-5)
    # the running variance is the average of the unbiased per-batch variances: close to the population's
    np.testing.assert_allclose(fresh[2].running_var, h.var(dim=0), rtol=0.05)
    assert rn.is_batch_norm(fresh[2]) and not rn.is_batch_norm(fresh[0])


def test_swa_average_and_pruning():
    a, b = rn.convnet("bn", seed=0), rn.convnet("bn", seed=1)
    averaged = rn.swa_average([a.state_dict(), b.state_dict()], a)
    np.testing.assert_allclose(averaged[0].weight.detach(), (a[0].weight + b[0].weight).detach() / 2, rtol=1e-6)
    with pytest.raises(ValueError, match="at least one snapshot"):
        rn.swa_average([], a)
    pruned = rn.magnitude_prune(a, 0.7)
    zero_fraction = float((pruned[0].weight == 0).float().mean())
    assert 0.69 <= zero_fraction <= 0.75 and float((a[0].weight == 0).float().mean()) == 0.0
    with pytest.raises(ValueError, match=r"fraction must be in \[0, 1\)"):
        rn.magnitude_prune(a, 1.0)


def test_variance_shift_in_a_network_with_dropout_before_bn():
    model = rn.dropout_before_bn_mlp(p=0.5, hidden=(20, 20), seed=0)
    assert [type(m).__name__ for m in model][:4] == ["Linear", "Dropout", "BatchNorm1d", "ReLU"]
    x = load_digits().x_train
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        for start in range(0, 600, 60):  # training-mode forwards fill the running statistics through dropout
            model(x[start : start + 60])
    shift = rn.variance_shift_in(model, x)
    assert 0.3 < shift["predicted"] < 0.7 and shift["measured"] < 0.8
    assert model.training  # the mode is restored
    with pytest.raises(ValueError, match="Dropout directly followed by a BN"):
        rn.variance_shift_in(nn.Sequential(nn.Linear(64, 3)), x)
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\)"):
        rn.dropout_before_bn_mlp(p=-0.1)
    a, b = rn.dropout_before_bn_mlp(seed=3), rn.dropout_before_bn_mlp(seed=3)
    assert all(torch.equal(u, v) for u, v in zip(a.parameters(), b.parameters()))
