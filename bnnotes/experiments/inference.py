"""Experiments of the inference chapter: population statistics against moving averages, train() against eval(),
conventions of other frameworks, and the speed of a BN-folded network.

Everything builds on the shared `mlp`, `train`, `TrainConfig`, `load_digits` and `evaluate`; models use bnnotes' own
BN layers.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from bnnotes import folding, torch_bn
from bnnotes._core import ema_, unbiased_variance
from bnnotes.experiments.data import Dataset, load_digits
from bnnotes.experiments.models import mlp
from bnnotes.experiments.stats import (
    Statistics,
    frozen_buffers,
    norm_layers,
    population_statistics,
    statistic_names,
    statistics_distance,
    using_statistics,
)
from bnnotes.experiments.training import TrainConfig, evaluate, train

__all__ = [
    "EmaTracker",
    "MomentumSweepConfig",
    "MomentumSweep",
    "momentum_sweep",
    "BatchMatesConfig",
    "BatchMates",
    "batch_mates",
    "train_mode_predictions",
    "run_keras_batchnorm",
    "convnet",
    "FoldBenchmarkConfig",
    "FoldBenchmark",
    "fold_benchmark",
]

class EmaTracker:
    """Moving averages of every BN layer's batch statistics, for several momenta at once, in PyTorch's convention.

    The running statistics never influence training-mode forward passes, so one training run yields exactly the
    running statistics that runs with each momentum would have produced. Forward pre-hooks on the BN layers see each
    training batch; ``running = (1 - momentum) * running + momentum * batch``, with the unbiased batch variance,
    starting from (0, 1) like the layers themselves. Use `remove` (or a ``with`` block) to detach the hooks.
    """

    def __init__(self, model: nn.Module, momenta: Sequence[float]):
        self.momenta = [float(mo) for mo in momenta]
        if not self.momenta or any(not 0.0 < mo <= 1.0 for mo in self.momenta):
            raise ValueError(f"momenta must be a non-empty list of numbers in (0, 1], got {list(momenta)}")
        self.layers = norm_layers(model)
        not_bn = [type(layer).__name__ for layer in self.layers if statistic_names(layer) != ("running_mean", "running_var")]
        if not_bn:
            raise ValueError(f"EmaTracker tracks BN's (mean, var); the model also has {not_bn}")
        # One (momenta, C) tensor per layer and statistic, so that a batch updates every momentum in one operation.
        self._mean = [torch.zeros((len(self.momenta),) + bn.running_mean.shape, dtype=bn.running_mean.dtype,
                                  device=bn.running_mean.device) for bn in self.layers]
        self._var = [torch.ones_like(mean) for mean in self._mean]
        self._weight = [torch.tensor(self.momenta, dtype=mean.dtype, device=mean.device).unsqueeze(1)
                        for mean in self._mean]
        self.paused = False
        self._handles = [bn.register_forward_pre_hook(self._make_hook(i)) for i, bn in enumerate(self.layers)]

    def _make_hook(self, index: int):
        def hook(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            if self.paused or not module.training:
                return
            with torch.no_grad():
                x = inputs[0]
                dims = [0] + list(range(2, x.dim()))
                batch_var, batch_mean = torch.var_mean(x.to(module.running_var.dtype), dim=dims, correction=0)
                unbiased = unbiased_variance(batch_var, x.numel() // x.shape[1])
                # One momentum per row: the (momenta, 1) weight broadcasts over the channels.
                ema_(self._mean[index], batch_mean.expand_as(self._mean[index]), self._weight[index])
                ema_(self._var[index], unbiased.expand_as(self._var[index]), self._weight[index])

        return hook

    @property
    def stats(self) -> dict[float, Statistics]:
        """{momentum: the running (mean, var) of every BN layer}; views of the tracked tensors, not copies."""
        return {mo: [(mean[i], var[i]) for mean, var in zip(self._mean, self._var)]
                for i, mo in enumerate(self.momenta)}

    @contextlib.contextmanager
    def pause(self) -> Iterator[None]:
        """Ignore forward passes inside the block (e.g. a pass that computes population statistics)."""
        previous, self.paused = self.paused, True
        try:
            yield
        finally:
            self.paused = previous

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "EmaTracker":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


@dataclass(frozen=True)
class MomentumSweepConfig:
    """A BN MLP on digits, trained once per seed, with the running statistics of every momentum tracked alongside.

    The defaults are the course's sigmoid network (Ioffe & Szegedy's Figure 1 at digits scale): 3 x 100 sigmoid units,
    weights from N(0, 0.1^2), plain SGD with learning rate 1 on batches of 60.

    population_batch_size: Algorithm 2's m for the exact population statistics (None: the training batch size).
    The model's own BN layers keep PyTorch's default momentum 0.1 (it does not affect training).
    """

    momenta: tuple[float, ...] = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 0.5)
    hidden: tuple[int, ...] = (100, 100, 100)
    activation: str = "sigmoid"
    init_std: float | None = 0.1
    train: TrainConfig = TrainConfig(steps=1000, batch_size=60, lr=1.0, eval_every=50)
    population_batch_size: int | None = None
    seeds: tuple[int, ...] = (0, 1, 2)


@dataclass
class MomentumSweep:
    """What `momentum_sweep` measured; arrays have a leading seed axis.

    steps: (T,) the evaluation steps. acc_ema: (S, M, T) test accuracy in eval mode with each momentum's running
    statistics. acc_population: (S, T) with the exact population statistics, recomputed at each evaluation.
    distance: (S, M) `statistics_distance` of each momentum's final running statistics from the final population
    statistics. models: the trained models (eval mode), one per seed.
    """

    momenta: list[float]
    steps: np.ndarray
    acc_ema: np.ndarray
    acc_population: np.ndarray
    distance: np.ndarray
    models: list[nn.Module] = field(repr=False)
    config: MomentumSweepConfig = field(repr=False)

    def final_acc(self, momentum: float) -> np.ndarray:
        """(S,) the final test accuracy with the running statistics of `momentum`, one per seed."""
        return self.acc_ema[:, self.momenta.index(momentum), -1]


def momentum_sweep(config: MomentumSweepConfig = MomentumSweepConfig(), data: Dataset | None = None,
                   device: torch.device | str | None = None) -> MomentumSweep:
    """Train a BN MLP per seed and compare the running statistics of each momentum with exact population statistics.

    data: defaults to ``load_digits()``; it is moved to `device` (default: the data's device).
    """
    data = load_digits() if data is None else data
    if device is not None:
        data = data.to(device)
    m = config.population_batch_size or config.train.batch_size
    all_acc_ema, all_acc_pop, all_distance, models = [], [], [], []
    steps: list[int] = []
    for seed in config.seeds:
        model = mlp(data.n_features, hidden=config.hidden, out_features=data.n_classes,
                    activation=config.activation, norm="bn", init_std=config.init_std, seed=seed)
        model.to(data.x_train.device)
        acc_ema: list[list[float]] = []
        acc_pop: list[float] = []
        population: Statistics = []
        steps = []
        with EmaTracker(model, config.momenta) as tracker:

            def measure(step: int, model: nn.Module) -> None:
                nonlocal population
                if step % config.train.eval_every and step != config.train.steps:
                    return
                steps.append(step)
                acc_ema.append([])
                for mo in config.momenta:
                    with using_statistics(model, tracker.stats[mo]):
                        acc_ema[-1].append(evaluate(model, data.x_test, data.y_test)[1])
                with tracker.pause():
                    population = population_statistics(model, data.x_train, m, seed=step)
                with using_statistics(model, population):
                    acc_pop.append(evaluate(model, data.x_test, data.y_test)[1])

            history = train(model, data, dataclasses.replace(config.train, seed=seed), callback=measure)
            if history.diverged or steps[-1] != config.train.steps:
                raise RuntimeError(f"seed {seed}: training stopped at step {history.step[-1]} of {config.train.steps} "
                                   "(diverged or stopped early); lower the learning rate")
            # `population` is the last evaluation's: the final step is always evaluated.
            all_distance.append([statistics_distance(tracker.stats[mo], population) for mo in config.momenta])
        all_acc_ema.append(np.array(acc_ema).T)
        all_acc_pop.append(acc_pop)
        models.append(model.eval())
    return MomentumSweep(
        momenta=list(config.momenta),
        steps=np.array(steps),
        acc_ema=np.array(all_acc_ema),
        acc_population=np.array(all_acc_pop),
        distance=np.array(all_distance),
        models=models,
        config=config,
    )


@dataclass
class BatchMates:
    """What `batch_mates` measured for `n_examples` test examples and 10 kinds of batch-mates (one class each).

    train_prob, eval_prob: (n_examples, n_classes) the probability of each example's true class in training and in
    eval mode, when its batch-mates all come from class c (column c). train_pred, eval_pred: the predicted classes.
    """

    train_prob: np.ndarray
    eval_prob: np.ndarray
    train_pred: np.ndarray
    eval_pred: np.ndarray
    labels: np.ndarray

    @property
    def changed_fraction(self) -> float:
        """The fraction of examples whose train-mode prediction depends on their batch-mates' class."""
        return float(np.mean([len(set(row)) > 1 for row in self.train_pred]))


@torch.no_grad()
def train_mode_predictions(model: nn.Module, x: Tensor, batch_size: int, seed: int = 0) -> Tensor:
    """The class `model` predicts in training mode for every row of x, when x is cut into random batches.

    x: (N, ...). The rows are shuffled with `seed` and cut into batches of `batch_size`; a remainder of one example
    joins the last full batch (training mode needs two values per channel). The passes run inside `frozen_buffers`,
    so `model` itself (modes, running statistics) is left as it was.
    Returns a long tensor of shape (N,), in x's order.

    >>> model = mlp(4, hidden=(3,), norm="none")
    >>> train_mode_predictions(model, torch.zeros(5, 4), batch_size=2).shape
    torch.Size([5])
    """
    n = x.shape[0]
    if not isinstance(batch_size, int) or not 2 <= batch_size <= n:
        raise ValueError(f"batch_size must be an integer in [2, {n}] for {n} examples, got {batch_size!r}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(x.device)
    batches = list(perm.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) == 1:
        leftover = batches.pop()
        batches[-1] = torch.cat([batches[-1], leftover])
    predictions = torch.empty(n, dtype=torch.long, device=x.device)
    with frozen_buffers(model):
        for idx in batches:
            predictions[idx] = model(x[idx]).argmax(dim=1)
    return predictions


@dataclass(frozen=True)
class BatchMatesConfig:
    """`batch_mates`: `n_examples` test examples, each in batches with `batch_size` - 1 batch-mates of one class; the
    examples and the batch-mates are drawn with `seed`."""

    n_examples: int = 100
    batch_size: int = 16
    seed: int = 0


@torch.no_grad()
def batch_mates(model: nn.Module, data: Dataset, config: BatchMatesConfig = BatchMatesConfig()) -> BatchMates:
    """Predict each of `n_examples` test examples inside batches whose other members all belong to one class.

    In training mode BN normalizes with the batch's statistics, so the prediction depends on the batch-mates; in
    eval mode it must not. The batch-mates are ``batch_size - 1`` training examples of class c, drawn with the
    config's seed. `model` itself is left as it was (the training-mode passes run inside `frozen_buffers`).
    """
    if config.batch_size < 2:
        raise ValueError(f"batch_size must be at least 2 (the example and one batch-mate), got {config.batch_size}")
    generator = torch.Generator().manual_seed(config.seed)
    n_classes = data.n_classes
    y_train = data.y_train.cpu()
    pool = [torch.nonzero(y_train == c).flatten() for c in range(n_classes)]
    examples = torch.randperm(data.x_test.shape[0], generator=generator)[: config.n_examples]
    batches = []  # (row, class of the batch-mates, batch, label)
    for c in range(n_classes):
        draw = torch.randperm(len(pool[c]), generator=generator)[: config.batch_size - 1]
        mates = pool[c][draw].to(data.x_train.device)
        for row, i in enumerate(examples.tolist()):
            batches.append((row, c, torch.cat([data.x_test[i : i + 1], data.x_train[mates]]), int(data.y_test[i])))
    results = {}
    for mode in ("train", "eval"):
        prob = np.zeros((len(examples), n_classes))
        pred = np.zeros((len(examples), n_classes), dtype=int)
        with frozen_buffers(model, train=mode == "train"):  # eval mode then sees the trained statistics
            for row, c, batch, label in batches:
                probs = torch.softmax(model(batch)[0], dim=0)
                prob[row, c] = probs[label].item()
                pred[row, c] = int(probs.argmax())
        results[mode] = (prob, pred)
    return BatchMates(
        train_prob=results["train"][0], eval_prob=results["eval"][0],
        train_pred=results["train"][1], eval_pred=results["eval"][1],
        labels=data.y_test[examples].cpu().numpy(),
    )


def run_keras_batchnorm(batches: Sequence[np.ndarray], probe: np.ndarray | None = None,
                        **layer_kwargs) -> dict[str, object]:
    """Run Keras 3's ``BatchNormalization`` in training mode on `batches` and report what it stores.

    Needs keras. KERAS_BACKEND defaults to ``"torch"`` here (Keras' own default, TensorFlow, is not needed); set it
    before keras is first imported to choose another. batches: arrays (N, C). probe: an optional (N, C) input for an
    inference-mode call (training=False). layer_kwargs: passed to the layer (e.g. momentum, epsilon).
    Keras computes BN's statistics in float32 (its type promotion of float64 with float32 gives float32, so even a
    float64 layer does), with ``E[x^2] - E[x]^2``; comparisons with it hold to float32 rounding.
    Returns a dict with the ``backend``, the layer's ``momentum`` and ``epsilon``, the final ``moving_mean`` and
    ``moving_variance`` (float64 copies) and, with a probe, its ``probe_output``.
    """
    os.environ.setdefault("KERAS_BACKEND", "torch")
    import keras

    def to_numpy(value: object) -> np.ndarray:
        return np.asarray(keras.ops.convert_to_numpy(value), dtype=np.float64)

    layer = keras.layers.BatchNormalization(**layer_kwargs)
    for batch in batches:
        layer(np.asarray(batch, dtype=np.float32), training=True)
    out: dict[str, object] = {
        "backend": keras.backend.backend(),
        "momentum": float(layer.momentum),
        "epsilon": float(layer.epsilon),
        "moving_mean": to_numpy(layer.moving_mean),
        "moving_variance": to_numpy(layer.moving_variance),
    }
    if probe is not None:
        out["probe_output"] = to_numpy(layer(np.asarray(probe, dtype=np.float32), training=False))
    return out


def convnet(channels: Sequence[int] = (16, 32), n_classes: int = 10, image_shape: tuple[int, int] = (8, 8),
            seed: int = 0) -> nn.Sequential:
    """A small convnet for flattened (N, H*W) images: ``[Conv2d(3x3, no bias) -> BatchNorm2d -> ReLU]`` per channel
    count, a 2x2 max-pool after the first block, global average pooling and a Linear classifier.

    Uses bnnotes' ``BatchNorm2d``; the initialization is a pure function of `seed`.

    >>> convnet()(torch.zeros(2, 64)).shape
    torch.Size([2, 10])
    """
    generator = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = [nn.Unflatten(1, (1, *image_shape))]
    c_in = 1
    for i, c in enumerate(channels):
        layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), torch_bn.BatchNorm2d(c), nn.ReLU()]
        if i == 0:
            layers.append(nn.MaxPool2d(2))
        c_in = c
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, n_classes)]
    with torch.no_grad():
        for layer in layers:
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                fan_in = layer.weight[0].numel()
                bound = math.sqrt(6.0 / fan_in)  # Kaiming-uniform for ReLU
                layer.weight.uniform_(-bound, bound, generator=generator)
                if layer.bias is not None:
                    layer.bias.zero_()
    return nn.Sequential(*layers)


@dataclass(frozen=True)
class FoldBenchmarkConfig:
    """Train `convnet` on digits, fold its BN layers, and time inference of both.

    repeats: interleaved timing rounds per batch size; inner: forward passes per timed round.
    num_threads: torch's intra-op threads while timing (None: leave as is). On the CPU the time measured is the
    process's CPU time, so keep one thread for a time per pass that does not depend on the machine's load.
    """

    channels: tuple[int, ...] = (16, 32)
    train: TrainConfig = TrainConfig(steps=300, batch_size=60, lr=0.05, momentum=0.9, eval_every=300)
    batch_sizes: tuple[int, ...] = (1, 64)
    repeats: int = 30
    inner: int = 20
    num_threads: int | None = 1
    seed: int = 0


@dataclass
class FoldBenchmark:
    """What `fold_benchmark` measured.

    acc_unfused, acc_folded: test accuracy in eval mode. max_abs_diff: the largest difference between the two models'
    logits on the test split (float32). seconds: {batch_size: {"bn": ..., "torch_bn": ..., "folded": ...}}, the median
    time of one forward pass with bnnotes' BN, with torch's BN and folded. speedup: {batch_size: {"bn": t_bn / t_folded,
    "torch_bn": t_torch_bn / t_folded}}.
    """

    acc_unfused: float
    acc_folded: float
    max_abs_diff: float
    max_abs_logit: float
    seconds: dict[int, dict[str, float]]
    speedup: dict[int, dict[str, float]]
    model: nn.Module = field(repr=False)
    folded: nn.Module = field(repr=False)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_interleaved(models: dict[str, nn.Module], x: Tensor, repeats: int, inner: int) -> dict[str, float]:
    """Median seconds per forward pass of each model, timing them in turn (rotating the order) in every round.

    On the CPU the clock is the process's CPU time, which does not count time spent waiting for a core on a busy
    machine (with one intra-op thread it equals the compute time); on a GPU it is the wall clock after synchronizing.
    """
    clock = time.process_time if x.device.type == "cpu" else time.perf_counter
    names = list(models)
    times: dict[str, list[float]] = {name: [] for name in names}
    with torch.inference_mode():
        for name in names:  # warm-up
            for _ in range(3):
                models[name](x)
        for r in range(repeats):
            for name in names[r % len(names):] + names[: r % len(names)]:
                _sync(x.device)
                start = clock()
                for _ in range(inner):
                    models[name](x)
                _sync(x.device)
                times[name].append((clock() - start) / inner)
    return {name: float(np.median(t)) for name, t in times.items()}


def fold_benchmark(config: FoldBenchmarkConfig = FoldBenchmarkConfig(), data: Dataset | None = None,
                   device: torch.device | str = "cpu") -> FoldBenchmark:
    """Train a small convnet, fold its BN layers with `bnnotes.folding.fold_batchnorm`, and compare.

    The timing is the median of interleaved rounds (no assertion is made on it); torch's own ``nn.BatchNorm2d``
    (through `bnnotes.torch_bn.to_torch_batchnorm`) is timed as a reference for a fused BN kernel.
    """
    data = (load_digits() if data is None else data).to(device)
    model = convnet(config.channels, data.n_classes, seed=config.seed)
    train(model, data, config.train)
    model.eval()
    folded = folding.fold_batchnorm(model)
    reference = torch_bn.to_torch_batchnorm(copy.deepcopy(model)).eval()
    with torch.no_grad():
        logits, logits_folded = model(data.x_test), folded(data.x_test)
    max_abs_diff = (logits - logits_folded).abs().max().item()
    acc_unfused = evaluate(model, data.x_test, data.y_test)[1]
    acc_folded = evaluate(folded, data.x_test, data.y_test)[1]
    threads = torch.get_num_threads()
    seconds: dict[int, dict[str, float]] = {}
    try:
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        for batch_size in config.batch_sizes:
            x = data.x_test[:batch_size]
            seconds[batch_size] = _median_interleaved(
                {"bn": model, "torch_bn": reference, "folded": folded}, x, config.repeats, config.inner
            )
    finally:
        torch.set_num_threads(threads)
    speedup = {b: {k: s[k] / s["folded"] for k in ("bn", "torch_bn")} for b, s in seconds.items()}
    return FoldBenchmark(
        acc_unfused=acc_unfused, acc_folded=acc_folded, max_abs_diff=max_abs_diff,
        max_abs_logit=logits.abs().max().item(), seconds=seconds, speedup=speedup, model=model, folded=folded,
    )
