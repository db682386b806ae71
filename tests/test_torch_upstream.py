"""bnnotes' BN against PyTorch's own test data and tooling (``torch.testing._internal``, which needs ``expecttest``).

- every ``module_db`` sample for BatchNorm1d/2d/3d and every ``op_db`` sample of ``nn.functional.batch_norm``, error
  inputs included, run through bnnotes and torch side by side: outputs, every gradient and the buffers;
- TestModule-style checks (forward, factory kwargs, repr, pickle, non-contiguous input, grad, gradgrad, memory format,
  train/eval) written against torch's own ``@modules`` / ``instantiate_device_type_tests`` machinery, with bnnotes'
  classes substituted into torch's ModuleInfos;
- torch.func (grad, vmap, jvp, functional_call), batched gradients, isinstance, convert_sync_batchnorm, quantization
  fusion, torch.compile / torch.export, hooks kept by the converters, and the eps and dtype errors.
"""

from __future__ import annotations

import copy
import inspect
import io
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("expecttest", reason="torch.testing._internal needs expecttest (the test extra)")

from torch.testing._internal.common_device_type import instantiate_device_type_tests  # noqa: E402
from torch.testing._internal.common_methods_invocations import op_db  # noqa: E402
from torch.testing._internal.common_modules import ModuleErrorEnum, TrainEvalMode, module_db, modules  # noqa: E402
from torch.testing._internal.common_utils import TestCase  # noqa: E402

from bnnotes import torch_bn  # noqa: E402
from bnnotes._core import ZERO_EPS_WITH_FIXED_STATISTICS  # noqa: E402
from bnnotes.torch_bn import BatchNorm1d, BatchNorm2d, BatchNorm3d, DtypeMismatchError, batch_norm  # noqa: E402

TORCH_OF = {BatchNorm1d: nn.BatchNorm1d, BatchNorm2d: nn.BatchNorm2d, BatchNorm3d: nn.BatchNorm3d}
BNNOTES_OF = {v: k for k, v in TORCH_OF.items()}

#: torch's BN takes bias= (pytorch/pytorch#176573); older torch (2.4 included) has no such argument, and its module_db
#: no bias=False sample. bnnotes' layers take bias= on every torch (tested in test_torch_bn.py).
TORCH_BN_TAKES_BIAS = "bias" in inspect.signature(nn.BatchNorm1d.__init__).parameters
NO_TORCH_BN_BIAS = pytest.mark.skipif(not TORCH_BN_TAKES_BIAS,
                                      reason=f"torch {torch.__version__}'s BN layers have no bias= argument")


def _torch_validates_eps() -> bool:
    """Whether torch's F.batch_norm refuses eps <= 0 in training (newer torch does; 2.4 normalizes with it)."""
    try:
        F.batch_norm(torch.ones(2, 1), None, None, training=True, eps=0.0)
    except ValueError:
        return True
    return False


TORCH_VALIDATES_EPS = _torch_validates_eps()

TORCH_INFOS = [info for info in module_db if info.module_cls in BNNOTES_OF]
BATCH_NORM_OPS = [op for op in op_db if op.name == "nn.functional.batch_norm"]


def _bnnotes_info(info):
    """torch's ModuleInfo for nn.BatchNormNd with bnnotes' class substituted: same samples, decorators and flags."""
    ours = copy.copy(info)
    ours.module_cls = BNNOTES_OF[info.module_cls]
    # torch's sample functions pick shapes by comparing module_cls with its own classes: give them torch's info.
    ours.module_inputs_func = lambda _info, *args, **kwargs: info.module_inputs_func(info, *args, **kwargs)
    ours.module_error_inputs_func = (
        None if info.module_error_inputs_func is None  # older torch (2.4) ships no error inputs for BN
        else lambda _info, *args, **kwargs: info.module_error_inputs_func(info, *args, **kwargs)
    )
    return ours


BNNOTES_INFOS = [_bnnotes_info(info) for info in TORCH_INFOS]


def test_the_upstream_data_is_there():
    assert len(TORCH_INFOS) == 3 and len(BATCH_NORM_OPS) >= 1
    assert [info.module_cls for info in BNNOTES_INFOS] == [BatchNorm1d, BatchNorm2d, BatchNorm3d]


# --- module_db samples, side by side ---------------------------------------------------------------------------------


def _twin_modules(bnnotes_cls, args, kwargs, device, dtype, training):
    ours = bnnotes_cls(*args, **kwargs).to(device=device, dtype=dtype).train(training)
    theirs = TORCH_OF[bnnotes_cls](*args, **kwargs).to(device=device, dtype=dtype).train(training)
    with torch.no_grad():  # non-trivial parameters and statistics, the same in both
        generator = torch.Generator().manual_seed(0)
        for (name, ours_t), theirs_t in zip(ours.state_dict().items(), theirs.state_dict().values()):
            if ours_t.is_floating_point():
                value = torch.rand(ours_t.shape, generator=generator, dtype=torch.float64) + 0.5
                ours_t.copy_(value)
                theirs_t.copy_(value)
    return ours, theirs


def _compare_module_sample(bnnotes_cls, sample, device, dtype, training):
    args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    ours, theirs = _twin_modules(bnnotes_cls, args, kwargs, device, dtype, training)
    (x,) = sample.forward_input.args
    x_ours = x.detach().clone().requires_grad_(True)
    x_theirs = x.detach().clone().requires_grad_(True)
    y_ours, y_theirs = ours(x_ours), theirs(x_theirs)
    torch.testing.assert_close(y_ours, y_theirs)
    dy = torch.randn(y_theirs.shape, generator=torch.Generator().manual_seed(1), dtype=dtype).to(device)
    y_ours.backward(dy)
    y_theirs.backward(dy)
    torch.testing.assert_close(x_ours.grad, x_theirs.grad)
    for (name, p_ours), p_theirs in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p_ours.grad, p_theirs.grad, msg=lambda m: f"grad of {name}: {m}")
    for (name, b_ours), b_theirs in zip(ours.named_buffers(), theirs.buffers()):
        torch.testing.assert_close(b_ours, b_theirs, msg=lambda m: f"buffer {name}: {m}")
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert list(ours.state_dict()) == list(theirs.state_dict())


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("info", BNNOTES_INFOS, ids=lambda info: info.module_cls.__name__)
def test_every_module_db_sample_matches_torch(info, dtype, training):
    samples = info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True, training=training)
    assert len(samples) >= (7 if TORCH_BN_TAKES_BIAS else 6)  # bias=False (where torch has it), the empty batch
    descriptions = {sample.desc for sample in samples}
    assert "zero_batch" in descriptions and ("affine_not_bias" in descriptions or not TORCH_BN_TAKES_BIAS)
    for sample in samples:
        _compare_module_sample(info.module_cls, sample, "cpu", dtype, training)


@pytest.mark.parametrize("info", BNNOTES_INFOS, ids=lambda info: info.module_cls.__name__)
def test_every_module_db_error_input_raises_as_torch(info):
    if info.module_error_inputs_func is None:
        pytest.skip(f"torch {torch.__version__}'s module_db has no error inputs for {info.module_cls.__name__}")
    errors = info.module_error_inputs_func(info, device="cpu", dtype=torch.float64, requires_grad=True, training=True)
    assert errors, "torch's ModuleInfo ships error inputs for BN"
    for error in errors:
        sample = error.module_error_input
        for cls in (info.module_cls, TORCH_OF[info.module_cls]):
            with pytest.raises(error.error_type, match=error.error_regex):
                layer = cls(*sample.constructor_input.args, **sample.constructor_input.kwargs)
                assert error.error_on == ModuleErrorEnum.FORWARD_ERROR
                layer(*sample.forward_input.args, **sample.forward_input.kwargs)


# --- op_db samples of F.batch_norm, side by side ---------------------------------------------------------------------


def _clone_sample(sample):
    def clone(t):
        return t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t

    return clone(sample.input), [clone(a) for a in sample.args], {k: clone(v) for k, v in sample.kwargs.items()}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("op", BATCH_NORM_OPS, ids=lambda op: op.variant_test_name or "default")
def test_every_op_db_sample_matches_torch(op, dtype):
    samples = list(op.sample_inputs("cpu", dtype, requires_grad=True))
    assert len(samples) >= 10
    assert any(s.input.dim() == 1 and s.input.numel() == 0 for s in samples), "the 1-D empty input is one of them"
    for sample in samples:
        x_o, args_o, kwargs_o = _clone_sample(sample)
        x_t, args_t, kwargs_t = _clone_sample(sample)
        y_o = batch_norm(x_o, *args_o, **kwargs_o)
        y_t = F.batch_norm(x_t, *args_t, **kwargs_t)
        torch.testing.assert_close(y_o, y_t)
        for ours, theirs in zip(args_o[:2], args_t[:2]):  # the running statistics, updated in place or not
            if ours is not None:
                torch.testing.assert_close(ours, theirs)
        inputs_o = [t for t in [x_o, *args_o] if isinstance(t, torch.Tensor) and t.requires_grad]
        inputs_t = [t for t in [x_t, *args_t] if isinstance(t, torch.Tensor) and t.requires_grad]
        if y_t.numel() == 0 or not inputs_t:
            continue
        dy = torch.randn(y_t.shape, generator=torch.Generator().manual_seed(2), dtype=dtype)
        grads_o = torch.autograd.grad(y_o, inputs_o, dy, allow_unused=True)
        grads_t = torch.autograd.grad(y_t, inputs_t, dy, allow_unused=True)
        for g_o, g_t in zip(grads_o, grads_t):
            torch.testing.assert_close(g_o, g_t)


@pytest.mark.parametrize("op", BATCH_NORM_OPS[:1], ids=["default"])
def test_every_op_db_sample_passes_gradcheck_with_forward_mode_and_batched_grads(op):
    for sample in op.sample_inputs("cpu", torch.float64, requires_grad=True):
        x, args, kwargs = _clone_sample(sample)
        running = [a.clone() if isinstance(a, torch.Tensor) else a for a in args[:2]]
        if x.numel() == 0:
            continue

        def f(x, weight, bias, running=running):
            # Fresh copies of the running statistics on every call: the result must not depend on earlier calls.
            stats = [r.clone() if isinstance(r, torch.Tensor) else r for r in running]
            return batch_norm(x, *stats, weight, bias, **kwargs)

        weight, bias = (args + [None, None])[2:4]
        assert torch.autograd.gradcheck(f, (x, weight, bias), check_forward_ad=True, check_batched_grad=True,
                                        check_batched_forward_grad=True, check_undefined_grad=True)
        assert torch.autograd.gradgradcheck(f, (x, weight, bias), check_batched_grad=True)


@pytest.mark.parametrize("op", BATCH_NORM_OPS, ids=lambda op: op.variant_test_name or "default")
def test_op_db_error_inputs_raise_as_torch(op):
    if op.error_inputs_func is None:  # torch 2.13 ships none for batch_norm; a later torch may
        pytest.skip(f"torch {torch.__version__} has no op_db error inputs for {op.name}")
    for error in op.error_inputs("cpu"):
        sample = error.sample_input
        for fn in (batch_norm, F.batch_norm):
            with pytest.raises(error.error_type, match=error.error_regex):
                fn(sample.input, *sample.args, **sample.kwargs)


# --- TestModule through torch's @modules machinery --------------------------------------------------------------------


class TestModule(TestCase):
    """TestModule-style checks, through torch's ``@modules`` / ``instantiate_device_type_tests``, on bnnotes' classes.

    Each test compares against torch's own class (the reference) built from the same sample."""

    precision = 1e-5
    rel_tol = 1e-5

    def _samples(self, module_info, device, dtype, training, requires_grad=False):
        return module_info.module_inputs_func(module_info, device=device, dtype=dtype, requires_grad=requires_grad,
                                              training=training)

    def _twins(self, module_info, sample, device, dtype, training):
        return _twin_modules(module_info.module_cls, sample.constructor_input.args, sample.constructor_input.kwargs,
                             device, dtype, training)

    @modules(BNNOTES_INFOS)
    def test_forward(self, device, dtype, module_info, training):
        for sample in self._samples(module_info, device, dtype, training):
            ours, theirs = self._twins(module_info, sample, device, dtype, training)
            (x,) = sample.forward_input.args
            self.assertEqual(ours(x), theirs(x))
            self.assertEqual(dict(ours.named_buffers()), dict(theirs.named_buffers()))

    @modules(BNNOTES_INFOS)
    def test_factory_kwargs(self, device, dtype, module_info, training):
        for sample in self._samples(module_info, device, dtype, training):
            kwargs = dict(sample.constructor_input.kwargs, device=device, dtype=dtype)
            layer = module_info.module_cls(*sample.constructor_input.args, **kwargs)
            for name, tensor in [*layer.named_parameters(), *layer.named_buffers()]:
                self.assertEqual(tensor.device, torch.device(device), msg=f"{name} on {tensor.device}")
                if tensor.is_floating_point():
                    self.assertEqual(tensor.dtype, dtype, msg=f"{name} has dtype {tensor.dtype}")

    @modules(BNNOTES_INFOS)
    def test_repr(self, device, dtype, module_info, training):
        for sample in self._samples(module_info, device, dtype, training):
            ours, theirs = self._twins(module_info, sample, device, dtype, training)
            self.assertEqual(repr(ours), repr(theirs))
            self.assertIsInstance(ours, type(theirs))

    @modules(BNNOTES_INFOS)
    def test_pickle(self, device, dtype, module_info, training):
        for sample in self._samples(module_info, device, dtype, training):
            ours, _ = self._twins(module_info, sample, device, dtype, training)
            (x,) = sample.forward_input.args
            buffer = io.BytesIO()
            torch.save(ours, buffer)
            buffer.seek(0)
            loaded = torch.load(buffer, weights_only=False)
            again = pickle.loads(pickle.dumps(ours))
            for copy_ in (loaded, again):
                self.assertIs(type(copy_), type(ours))
                self.assertEqual(copy_.state_dict(), ours.state_dict())
            self.assertEqual(loaded(x), copy.deepcopy(ours)(x))

    @modules(BNNOTES_INFOS)
    def test_non_contiguous_tensors(self, device, dtype, module_info, training):
        for sample in self._samples(module_info, device, dtype, training, requires_grad=True):
            (x,) = sample.forward_input.args
            if x.numel() == 0:
                continue
            ours, theirs = self._twins(module_info, sample, device, dtype, training)
            # The same values in a non-contiguous layout: every other element of a tensor twice as long in dim -1.
            x_nc = torch.repeat_interleave(x.detach(), 2, dim=-1)[..., ::2].requires_grad_(True)
            self.assertFalse(x_nc.is_contiguous())
            x_c = x.detach().clone().requires_grad_(True)
            y_nc, y_c = ours(x_nc), theirs(x_c)
            self.assertEqual(y_nc, y_c)
            dy = torch.randn_like(y_c).transpose(0, 1).contiguous().transpose(0, 1)  # non-contiguous upstream grad
            y_nc.backward(dy)
            y_c.backward(dy)
            self.assertEqual(x_nc.grad, x_c.grad)
            for p_ours, p_theirs in zip(ours.parameters(), theirs.parameters()):
                self.assertEqual(p_ours.grad, p_theirs.grad)

    def _gradcheck(self, module_info, device, dtype, training, check):
        for sample in self._samples(module_info, device, dtype, training, requires_grad=True):
            (x,) = sample.forward_input.args
            if x.numel() == 0:
                continue
            layer, _ = self._twins(module_info, sample, device, dtype, training)
            names = [name for name, _ in layer.named_parameters()]
            params = tuple(p.detach().clone().requires_grad_(True) for p in layer.parameters())
            buffers = {name: b.clone() for name, b in layer.named_buffers()}

            def f(x, *params):
                return torch.func.functional_call(layer, ({**dict(zip(names, params)),
                                                           **{k: v.clone() for k, v in buffers.items()}},), (x,))

            # fast_mode: one random projection of the Jacobian, as torch's module tests use for larger modules.
            self.assertTrue(check(f, (x, *params), check_batched_grad=True, fast_mode=True))

    @modules(BNNOTES_INFOS, allowed_dtypes=[torch.float64])
    def test_grad(self, device, dtype, module_info, training):
        self._gradcheck(module_info, device, dtype, training, torch.autograd.gradcheck)

    @modules(BNNOTES_INFOS, allowed_dtypes=[torch.float64])
    def test_gradgrad(self, device, dtype, module_info, training):
        self.assertTrue(module_info.supports_gradgrad)
        self._gradcheck(module_info, device, dtype, training, torch.autograd.gradgradcheck)

    @modules(BNNOTES_INFOS)
    def test_memory_format(self, device, dtype, module_info, training):
        for sample in self._samples(module_info, device, dtype, training, requires_grad=True):
            (x,) = sample.forward_input.args
            if x.dim() not in (4, 5):
                continue
            layout = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
            ours, theirs = self._twins(module_info, sample, device, dtype, training)
            x_cl = x.detach().clone().to(memory_format=layout).requires_grad_(True)
            x_c = x.detach().clone().requires_grad_(True)
            y_cl, y_c = ours(x_cl), theirs(x_c)
            self.assertEqual(y_cl, y_c)
            y_cl.backward(torch.ones_like(y_cl))
            y_c.backward(torch.ones_like(y_c))
            self.assertEqual(x_cl.grad, x_c.grad)

    @modules(BNNOTES_INFOS)
    def test_if_train_and_eval_modes_differ(self, device, dtype, module_info, training):
        self.assertTrue(module_info.train_and_eval_differ)
        for sample in self._samples(module_info, device, dtype, training):
            (x,) = sample.forward_input.args
            ours, theirs = self._twins(module_info, sample, device, dtype, training)
            for mode in (training, not training):
                ours.train(mode)
                theirs.train(mode)
                self.assertEqual(ours(x), theirs(x))
                self.assertEqual(ours.training, mode)

    @modules(BNNOTES_INFOS, train_eval_mode=TrainEvalMode.train_only)
    def test_errors(self, device, dtype, module_info, training):
        if module_info.module_error_inputs_func is None:
            self.skipTest(f"torch {torch.__version__}'s module_db has no error inputs for BN")
        errors = module_info.module_error_inputs_func(module_info, device=device, dtype=dtype, requires_grad=False,
                                                      training=training)
        for error in errors:
            sample = error.module_error_input
            layer = module_info.module_cls(*sample.constructor_input.args, **sample.constructor_input.kwargs)
            with self.assertRaisesRegex(error.error_type, error.error_regex):
                layer(*sample.forward_input.args, **sample.forward_input.kwargs)


instantiate_device_type_tests(TestModule, globals(), only_for=("cpu", "cuda"))


# --- torch.func, batched grads, isinstance and the ecosystem ---------------------------------------------------------


def _pair(cls=BatchNorm1d, channels=3, **kwargs):
    ours = cls(channels, **kwargs).double()
    theirs = TORCH_OF[cls](channels, **kwargs).double()
    with torch.no_grad():
        for p in (*ours.parameters(), *theirs.parameters()):
            p.copy_(torch.linspace(0.5, 1.5, channels, dtype=torch.float64))
    return ours, theirs


def test_isinstance_and_the_tools_that_rely_on_it():
    ours, _ = _pair()
    assert isinstance(ours, nn.BatchNorm1d) and isinstance(ours, nn.modules.batchnorm._BatchNorm)
    assert isinstance(BatchNorm2d(3), nn.BatchNorm2d) and isinstance(BatchNorm3d(3), nn.BatchNorm3d)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNorm2d(4), nn.ReLU())
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert type(synced[1]) is nn.SyncBatchNorm, "convert_sync_batchnorm must pick up bnnotes' layers"
    assert synced[1].weight is model[1].weight


def test_numpy_integer_channels_and_bias_false():
    layer = BatchNorm2d(np.int64(4), bias=False)
    assert layer.num_features == 4 and type(layer.num_features) is int and layer.bias is None
    assert [name for name, _ in layer.named_parameters()] == ["weight"]
    if TORCH_BN_TAKES_BIAS:
        assert repr(layer) == repr(nn.BatchNorm2d(4, bias=False))


@pytest.mark.parametrize("cls,shape", [(BatchNorm1d, (6, 3)), (BatchNorm2d, (4, 3, 2, 2))])
def test_torch_func_grad_over_functional_call(cls, shape):
    ours, theirs = _pair(cls)
    x = torch.randn(shape, dtype=torch.float64)

    def loss(params, module):
        buffers = {k: v.clone() for k, v in module.named_buffers()}
        return torch.func.functional_call(module, (params, buffers), (x,)).pow(3).sum()

    grads_ours = torch.func.grad(loss)(dict(ours.named_parameters()), ours)
    grads_theirs = torch.func.grad(loss)(dict(theirs.named_parameters()), theirs)
    for name in grads_theirs:
        torch.testing.assert_close(grads_ours[name], grads_theirs[name])


def test_torch_func_vmap_and_per_sample_gradients():
    """vmap over independent batches (statistics per vmapped batch), also under grad: per-batch gradients."""
    xs = torch.randn(5, 6, 3, 2, dtype=torch.float64)
    weight = torch.linspace(0.5, 1.5, 3, dtype=torch.float64)
    bias = torch.linspace(-1, 1, 3, dtype=torch.float64)

    def ours(x, w):
        return batch_norm(x, None, None, w, bias, training=True)

    def theirs(x, w):
        return F.batch_norm(x, None, None, w, bias, training=True)

    torch.testing.assert_close(torch.func.vmap(ours, in_dims=(0, None))(xs, weight),
                               torch.func.vmap(theirs, in_dims=(0, None))(xs, weight))
    weights = torch.rand(5, 3, dtype=torch.float64) + 0.5  # batched weight too
    torch.testing.assert_close(torch.func.vmap(ours)(xs, weights), torch.func.vmap(theirs)(xs, weights))
    per_batch = torch.func.vmap(torch.func.grad(lambda x, w: ours(x, w).pow(3).sum(), argnums=(0, 1)),
                                in_dims=(0, None))(xs, weight)
    reference = torch.func.vmap(torch.func.grad(lambda x, w: theirs(x, w).pow(3).sum(), argnums=(0, 1)),
                                in_dims=(0, None))(xs, weight)
    for g_ours, g_theirs in zip(per_batch, reference):
        torch.testing.assert_close(g_ours, g_theirs)
    # A module without running statistics under vmap, as torch.func's docs recommend for BN.
    layer, reference_layer = _pair(track_running_stats=False)
    torch.testing.assert_close(torch.func.vmap(layer)(xs), torch.func.vmap(reference_layer)(xs))


def test_torch_func_jvp_and_forward_mode_ad():
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    tangent = torch.randn_like(x)
    # Training with batch statistics only, and eval. (Training with running statistics mutates captured buffers,
    # which torch.func refuses for torch's BN alike.)
    for kwargs, training in (({"track_running_stats": False}, True), ({}, False)):
        ours, theirs = _pair(BatchNorm2d, **kwargs)
        y_ours, dy_ours = torch.func.jvp(ours.train(training), (x,), (tangent,))
        y_theirs, dy_theirs = torch.func.jvp(theirs.train(training), (x,), (tangent,))
        torch.testing.assert_close(y_ours, y_theirs)
        torch.testing.assert_close(dy_ours, dy_theirs)
    # Forward mode with the parameters' tangents as well (torch.autograd.forward_ad).
    import torch.autograd.forward_ad as fwAD

    w, b = torch.rand(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64)
    w_dot, b_dot = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    results = []
    for fn in (batch_norm, F.batch_norm):
        with fwAD.dual_level():
            args = [fwAD.make_dual(t, t_dot) for t, t_dot in ((x, tangent), (w, w_dot), (b, b_dot))]
            y = fn(args[0], None, None, args[1], args[2], training=True)
            results.append(fwAD.unpack_dual(y).tangent)
    torch.testing.assert_close(results[0], results[1])


def test_batched_gradients_do_not_write_into_shared_tensors():
    x = torch.randn(6, 3, 2, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(3, dtype=torch.float64, requires_grad=True)
    y_ours = batch_norm(x, None, None, weight, None, training=True)
    y_theirs = F.batch_norm(x, None, None, weight, None, training=True)
    cotangents = torch.randn(4, *y_ours.shape, dtype=torch.float64)
    batched_ours = torch.autograd.grad(y_ours, (x, weight), cotangents, is_grads_batched=True)
    batched_theirs = torch.autograd.grad(y_theirs, (x, weight), cotangents, is_grads_batched=True)
    for g_ours, g_theirs in zip(batched_ours, batched_theirs):
        torch.testing.assert_close(g_ours, g_theirs)
    # And the cotangent itself is never modified by the backward.
    dy = torch.randn_like(y_ours)
    dy_before = dy.clone()
    torch.autograd.grad(batch_norm(x, None, None, weight, None, training=True), (x, weight), dy)
    assert torch.equal(dy, dy_before)


def test_eps_is_validated_like_torch():
    x = torch.randn(4, 3)
    # (torch's side only where torch validates eps: 2.4 does not.)
    for eps in (0.0, -1.0):
        for fn in (batch_norm, F.batch_norm) if TORCH_VALIDATES_EPS else (batch_norm,):
            with pytest.raises(ValueError, match="eps must be positive"):
                fn(x, None, None, training=True, eps=eps)
    # With fixed statistics: eps >= 0 (torch 2.13), or eps > 0 as well (torch 2.11): bnnotes follows the installed torch.
    rule = "non-negative" if ZERO_EPS_WITH_FIXED_STATISTICS else "positive"
    with pytest.raises(ValueError, match=f"eps must be {rule}"):
        batch_norm(x, torch.zeros(3), torch.ones(3), training=False, eps=-1.0)
    if TORCH_VALIDATES_EPS:
        with pytest.raises(ValueError, match=f"eps must be {rule}"):
            F.batch_norm(x, torch.zeros(3), torch.ones(3), training=False, eps=-1.0)
    if ZERO_EPS_WITH_FIXED_STATISTICS:  # eps = 0 with fixed statistics: allowed by both, or refused by both
        torch.testing.assert_close(batch_norm(x, torch.zeros(3), torch.ones(3), eps=0.0),
                                   F.batch_norm(x, torch.zeros(3), torch.ones(3), eps=0.0))
    else:
        for fn in (batch_norm, F.batch_norm):
            with pytest.raises(ValueError, match="eps must be positive"):
                fn(x, torch.zeros(3), torch.ones(3), eps=0.0)
    with pytest.raises(ValueError, match="eps must be positive during training"):
        BatchNorm1d(3, eps=0.0)(x)
    # numpy scalars are numbers as well
    torch.testing.assert_close(batch_norm(x, None, None, training=True, eps=np.float32(1e-3), momentum=np.float32(0.5)),
                               F.batch_norm(x, None, None, training=True, eps=1e-3))
    with pytest.raises(TypeError, match="eps must be a real number, got str"):
        batch_norm(x, None, None, training=True, eps="1e-5")


def test_dtype_mismatch_raises_like_torch():
    x64 = torch.randn(4, 3, dtype=torch.float64)
    for training in (True, False):
        with pytest.raises(RuntimeError):
            nn.BatchNorm1d(3).train(training)(x64)
        with pytest.raises(DtypeMismatchError, match=r"running_mean has dtype torch.float32 but input has dtype "
                                                     r"torch.float64; expected torch.float64"):
            BatchNorm1d(3).train(training)(x64)
    assert issubclass(DtypeMismatchError, RuntimeError) and issubclass(DtypeMismatchError, TypeError)
    with pytest.raises(DtypeMismatchError, match="weight has dtype torch.float16"):
        batch_norm(torch.randn(4, 3), None, None, torch.ones(3, dtype=torch.float16), training=True)
    # Mixed precision stays allowed, as in torch: half input with float32 parameters and statistics.
    x16 = torch.randn(4, 3).to(torch.bfloat16)
    ours, theirs = BatchNorm1d(3), nn.BatchNorm1d(3)
    torch.testing.assert_close(ours(x16), theirs(x16))
    torch.testing.assert_close(ours.running_var, theirs.running_var)


def test_quantization_fusion_of_conv_and_bnnotes_bn():
    from torch.ao.quantization import fuse_modules

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNorm2d(4), nn.ReLU())
    model.train()
    model(torch.randn(8, 3, 6, 6))  # non-trivial running statistics
    model.eval()
    x = torch.randn(2, 3, 6, 6)
    expected = model(x)
    fused = fuse_modules(copy.deepcopy(model), [["0", "1", "2"]])
    assert isinstance(fused[1], nn.Identity) and isinstance(fused[2], nn.Identity)
    torch.testing.assert_close(fused(x), expected, rtol=1e-5, atol=1e-5)
    fused_pair = fuse_modules(copy.deepcopy(model), [["0", "1"]])
    torch.testing.assert_close(fused_pair(x), expected, rtol=1e-5, atol=1e-5)
    linear = nn.Sequential(nn.Linear(3, 4), BatchNorm1d(4)).eval()
    with torch.no_grad():
        linear[1].running_mean.uniform_(-1, 1)
        linear[1].running_var.uniform_(0.5, 2)
    x = torch.randn(5, 3)
    torch.testing.assert_close(fuse_modules(copy.deepcopy(linear), [["0", "1"]])(x), linear(x), rtol=1e-5, atol=1e-5)


def test_converters_keep_hooks():
    calls = []
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    handle = model[1].register_forward_hook(lambda module, inputs, output: calls.append("forward"))
    model[1].register_forward_pre_hook(lambda module, inputs: calls.append("pre"))
    model[1].register_full_backward_hook(lambda module, grad_in, grad_out: calls.append("backward"))
    converted = torch_bn.convert_batchnorm(model)
    assert type(converted[1]) is BatchNorm1d
    converted(torch.randn(4, 3, requires_grad=True)).sum().backward()
    assert calls == ["pre", "forward", "backward"]
    back = torch_bn.to_torch_batchnorm(converted)
    assert type(back[1]) is nn.BatchNorm1d
    calls.clear()
    handle.remove()  # the handle still refers to the hooks the layer runs
    back(torch.randn(4, 3))
    assert calls == ["pre"]


@NO_TORCH_BN_BIAS
def test_bias_false_survives_the_converters():
    model = nn.Sequential(nn.BatchNorm1d(3, bias=False))
    converted = torch_bn.convert_batchnorm(model)
    assert converted[0].bias is None and repr(converted[0]) == repr(nn.BatchNorm1d(3, bias=False))
    assert torch_bn.to_torch_batchnorm(converted)[0].bias is None


def test_train_mode_torch_export_program_runs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), BatchNorm1d(4)).train()
    reference = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).train()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(8, 3)
    program = torch.export.export(model, (x,))
    exported = program.module()
    torch.testing.assert_close(exported(x), reference(x))
    buffers = dict(exported.named_buffers())
    torch.testing.assert_close(buffers["1.running_mean"], reference[1].running_mean)
    torch.testing.assert_close(buffers["1.running_var"], reference[1].running_var)
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not [t for t in targets if "batch_norm" in t], "no torch BN kernel in the exported program"


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_torch_compile_fullgraph_train_and_eval(backend):
    """fullgraph=True: any graph break fails. aot_eager also traces the backward (AOTAutograd)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), BatchNorm1d(4)).double()
    reference = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).double()
    reference.load_state_dict(model.state_dict())
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    x = torch.randn(8, 3, dtype=torch.float64)
    for mode in (True, False):
        model.train(mode)
        reference.train(mode)
        y, y_ref = compiled(x), reference(x)
        torch.testing.assert_close(y, y_ref)
        y.pow(2).sum().backward()
        y_ref.pow(2).sum().backward()
        torch.testing.assert_close(model[0].weight.grad, reference[0].weight.grad)
        torch.testing.assert_close(model[1].running_var, reference[1].running_var)


def test_torch_jit_script_is_documented_as_unsupported_and_trace_works():
    assert "torch.jit.script`` is not supported" in torch_bn.BatchNormBase.__doc__
    layer = BatchNorm1d(3).eval()
    x = torch.randn(4, 3)
    traced = torch.jit.trace(layer, (x,))
    torch.testing.assert_close(traced(x), layer(x))
