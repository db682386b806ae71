"""Experiments of the pitfalls chapter: when BN breaks, and what fixes it.

- `global_statistics_experiment`: normalizing with the moving averages during training (`MovingAverageBatchNorm1d`),
  the variant Ioffe (2017, Sec. 2) warns against, against real BN.
- `small_batch_sweep`, `diagnose_bn` and `two_example_gradient`: accuracy against batch size for BN, Batch Renorm,
  LayerNorm, GroupNorm and no normalization, and why BN fails at two examples per batch.
- `order_experiment`: class-sorted (non-i.i.d.) mini-batches.
- `discriminator_experiment`: a GAN-style discriminator trained on pure or mixed real/fake batches.
- `finetune_experiment`: fine-tuning with tiny batches, BN statistics updated or frozen (`freeze_bn_statistics`).

Everything builds on the shared `mlp`, `train`, `TrainConfig`, `load_digits` and `evaluate`; models use bnnotes' own
BN and Batch Renorm layers.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from bnnotes.experiments.data import Dataset, load_digits
from bnnotes.experiments.stats import population_statistics, using_statistics
from bnnotes.experiments.models import hidden_linears, mlp
from bnnotes.experiments.training import TrainConfig, evaluate, train
from bnnotes.renorm import BatchRenorm1d, renorm_schedule
from bnnotes.torch_bn import batch_norm
from bnnotes.variants import freeze_bn_statistics

__all__ = [
    "GlobalStatsConfig",
    "GlobalStatsResult",
    "global_statistics_experiment",
    "renorm_callback",
    "SmallBatchConfig",
    "SmallBatchResult",
    "small_batch_sweep",
    "BNDiagnosis",
    "diagnose_bn",
    "two_example_gradient",
    "OrderConfig",
    "OrderResult",
    "order_experiment",
    "discriminator_data",
    "discriminator_batches",
    "DiscriminatorConfig",
    "DiscriminatorResult",
    "discriminator_experiment",
    "shift_images",
    "FinetuneConfig",
    "FinetuneResult",
    "finetune_experiment",
]

Callback = Callable[[int, nn.Module], None]


def _prepare(data: Dataset | None, device: torch.device | str | None) -> Dataset:
    data = load_digits() if data is None else data
    return data.to(device) if device is not None else data


def _chain(*callbacks: Callback | None) -> Callback:
    """One `train` callback that runs the given ones in order (None entries are skipped)."""
    active = [c for c in callbacks if c is not None]

    def callback(step: int, model: nn.Module) -> None:
        for c in active:
            c(step, model)

    return callback


# --------------------------------------------------------------------------------------------------------------------
# Why training does not use the global statistics
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GlobalStatsConfig:
    """A sigmoid MLP trained with real BN and with `MovingAverageBatchNorm1d`, once per seed.

    linear_bias: keep a bias in the hidden Linear layers (before the normalizer). With real BN its gradient is
    exactly zero; it is the parameter of Ioffe & Szegedy's (2015, Sec. 2) example of the normalization and the
    gradient step counteracting each other.
    """

    hidden: tuple[int, ...] = (100, 100, 100)
    activation: str = "sigmoid"
    linear_bias: bool = True
    train: TrainConfig = TrainConfig(steps=300, batch_size=32, lr=1.0, eval_every=25)
    seeds: tuple[int, ...] = (0, 1)


@dataclass
class GlobalStatsResult:
    """What `global_statistics_experiment` measured, per method ``"bn"`` and ``"moving"``; arrays are (S, T).

    steps: (T,) the evaluation steps. test_acc: eval-mode test accuracy. train_loss: (S, steps) the mini-batch loss of
    every step (NaN after a divergence). weight_norm, bias_norm: the norm of all hidden Linear weights (biases)
    together. diverged: (S,) whether the loss became non-finite.
    """

    steps: np.ndarray
    test_acc: dict[str, np.ndarray]
    train_loss: dict[str, np.ndarray]
    weight_norm: dict[str, np.ndarray]
    bias_norm: dict[str, np.ndarray]
    diverged: dict[str, np.ndarray]
    config: GlobalStatsConfig = field(repr=False)


def _padded(values: Sequence[float], length: int) -> np.ndarray:
    out = np.full(length, np.nan)
    out[: len(values)] = values
    return out


def global_statistics_experiment(config: GlobalStatsConfig = GlobalStatsConfig(), data: Dataset | None = None,
                                 device: torch.device | str | None = None) -> GlobalStatsResult:
    """Train the same MLP with BN and with moving-average normalization (`MovingAverageBatchNorm1d`), per seed.

    data: defaults to ``load_digits()``, moved to `device` if given.
    """
    data = _prepare(data, device)
    methods = {"bn": "bn", "moving": "bn-moving"}
    tc = config.train
    steps = sorted({0, tc.steps, *range(0, tc.steps + 1, tc.eval_every)})
    out: dict[str, dict[str, list]] = {k: {"acc": [], "loss": [], "w": [], "b": [], "div": []} for k in methods}
    for key, norm in methods.items():
        for seed in config.seeds:
            model = mlp(data.n_features, hidden=config.hidden, out_features=data.n_classes,
                        activation=config.activation, norm=norm, linear_bias=config.linear_bias, seed=seed)
            weight_norms: list[float] = []
            bias_norms: list[float] = []

            def measure(step: int, model: nn.Module) -> None:
                if step % tc.eval_every and step != tc.steps:
                    return
                linears = hidden_linears(model)
                weight_norms.append(torch.cat([m.weight.detach().flatten() for m in linears]).norm().item())
                biases = [m.bias.detach() for m in linears if m.bias is not None]
                bias_norms.append(torch.cat(biases).norm().item() if biases else 0.0)

            history = train(model, data, dataclasses.replace(tc, seed=seed), callback=measure)
            out[key]["acc"].append(_padded(history.test_acc, len(steps)))
            out[key]["loss"].append(_padded(history.train_loss, tc.steps))
            out[key]["w"].append(_padded(weight_norms, len(steps)))
            out[key]["b"].append(_padded(bias_norms, len(steps)))
            out[key]["div"].append(history.diverged)
    return GlobalStatsResult(
        steps=np.array(steps),
        test_acc={k: np.array(v["acc"]) for k, v in out.items()},
        train_loss={k: np.array(v["loss"]) for k, v in out.items()},
        weight_norm={k: np.array(v["w"]) for k, v in out.items()},
        bias_norm={k: np.array(v["b"]) for k, v in out.items()},
        diverged={k: np.array(v["div"]) for k, v in out.items()},
        config=config,
    )


# --------------------------------------------------------------------------------------------------------------------
# Small mini-batches
# --------------------------------------------------------------------------------------------------------------------


def renorm_callback(total_steps: int) -> Callback:
    """A `train` callback that sets r_max and d_max of every `BatchRenorm1d` from `renorm_schedule`, compressed.

    The paper's schedule (plain BN for 5k steps, d_max = 5 at 25k and r_max = 3 at 40k) is scaled as if the run had
    100k steps: warm-up for the first 5% of `total_steps`, d_max reaches 5 at 25% and r_max reaches 3 at 40%.
    `train` calls it before the first update and after every step; the limits it sets are used by the next step.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be a positive integer, got {total_steps!r}")
    warmup = total_steps // 20
    limits = {"warmup_steps": warmup, "dmax_steps": max(total_steps // 4, warmup),
              "rmax_steps": max(2 * total_steps // 5, warmup)}

    def callback(step: int, model: nn.Module) -> None:
        r_max, d_max = renorm_schedule(step, **limits)
        for layer in model.modules():
            if isinstance(layer, BatchRenorm1d):
                layer.r_max, layer.d_max = r_max, d_max

    return callback


@dataclass(frozen=True)
class SmallBatchConfig:
    """Accuracy against batch size: one MLP per (norm, batch size, seed), `steps` plain-SGD steps each.

    lr = lr_per_example * batch size (the linear scaling rule), no momentum: with momentum 0.9 both BN and Batch Renorm
    collapse at batch 2 (observed while the chapter was written; not asserted). Batch Renorm ("brn") follows
    `renorm_callback`.
    """

    batch_sizes: tuple[int, ...] = (2, 4, 8, 16, 64)
    norms: tuple[str, ...] = ("none", "bn", "brn", "ln", "gn")
    hidden: tuple[int, ...] = (100, 100)
    activation: str = "relu"
    steps: int = 400
    lr_per_example: float = 0.005
    seeds: tuple[int, ...] = (0, 1)


@dataclass
class SmallBatchResult:
    """What `small_batch_sweep` measured.

    test_acc[norm]: (S, B) final eval-mode test accuracy per seed and batch size.
    grad_norm[(norm, batch_size)]: (S, steps) the norm of the first hidden Linear layer's weight gradient at every step.
    models[(norm, batch_size, seed)]: the trained model.
    """

    batch_sizes: list[int]
    test_acc: dict[str, np.ndarray]
    grad_norm: dict[tuple[str, int], np.ndarray]
    models: dict[tuple[str, int, int], nn.Module] = field(repr=False)
    config: SmallBatchConfig = field(repr=False)


def small_batch_sweep(config: SmallBatchConfig = SmallBatchConfig(), data: Dataset | None = None,
                      device: torch.device | str | None = None) -> SmallBatchResult:
    """Train every normalizer of `config.norms` at every batch size, per seed, and record accuracy and gradients.

    data: defaults to ``load_digits()``, moved to `device` if given.
    """
    data = _prepare(data, device)
    test_acc = {norm: np.zeros((len(config.seeds), len(config.batch_sizes))) for norm in config.norms}
    grad_norm: dict[tuple[str, int], np.ndarray] = {}
    models: dict[tuple[str, int, int], nn.Module] = {}
    for norm in config.norms:
        for j, batch_size in enumerate(config.batch_sizes):
            grads = []
            for i, seed in enumerate(config.seeds):
                model = mlp(data.n_features, hidden=config.hidden, out_features=data.n_classes,
                            activation=config.activation, norm=norm, seed=seed)
                first = hidden_linears(model)[0]
                norms: list[float] = []

                def record_gradient(step: int, model: nn.Module, first: nn.Linear = first,
                                    norms: list[float] = norms) -> None:
                    if step > 0:
                        norms.append(first.weight.grad.norm().item())

                tc = TrainConfig(steps=config.steps, batch_size=batch_size, lr=config.lr_per_example * batch_size,
                                 eval_every=config.steps, seed=seed)
                history = train(model, data, tc, callback=_chain(record_gradient, renorm_callback(config.steps)))
                test_acc[norm][i, j] = history.final_test_acc
                grads.append(_padded(norms, config.steps))
                models[(norm, batch_size, seed)] = model.eval()
            grad_norm[(norm, batch_size)] = np.array(grads)
    return SmallBatchResult(list(config.batch_sizes), test_acc, grad_norm, models, config)


@dataclass
class BNDiagnosis:
    """What `diagnose_bn` measured on one trained BN model.

    acc_running: test accuracy in eval mode with the running (moving-average) statistics.
    acc_population: test accuracy in eval mode with the exact population statistics of the training split.
    train_acc_population: training-split accuracy with the population statistics: how well the model fits at all.
    pre_bn_var: per BN layer, the population variance of its input, (C,).
    first_weight_norm: the norm of the first hidden Linear layer's weight.
    """

    acc_running: float
    acc_population: float
    train_acc_population: float
    pre_bn_var: list[np.ndarray]
    first_weight_norm: float


def diagnose_bn(model: nn.Module, data: Dataset) -> BNDiagnosis:
    """Separate "the running statistics are off" from "the weights are bad" for a trained BN model.

    The population statistics are Algorithm 2's, from the whole training split as one batch
    (`bnnotes.experiments.stats.population_statistics`); the model is left as it was.
    """
    acc_running = evaluate(model, data.x_test, data.y_test)[1]
    population = population_statistics(model, data.x_train)
    with using_statistics(model, population):
        acc_population = evaluate(model, data.x_test, data.y_test)[1]
        train_acc_population = evaluate(model, data.x_train, data.y_train)[1]
    return BNDiagnosis(
        acc_running=acc_running,
        acc_population=acc_population,
        train_acc_population=train_acc_population,
        pre_bn_var=[var.cpu().numpy() for _, var in population],
        first_weight_norm=hidden_linears(model)[0].weight.norm().item(),
    )


def two_example_gradient(x: Tensor, dy: Tensor, eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """The input gradient of training-mode BN (gamma = 1, beta = 0) for a batch of two examples, two ways.

    x, dy: (2, C). Returns (autograd, closed_form), both (2, C): the gradient of ``sum(dy * BN(x))`` by autograd
    through `bnnotes.torch_bn.batch_norm`, and the closed form with delta = (x_1 - x_2) / 2:

        dx_1 = -dx_2 = (dy_1 - dy_2) * eps / (2 * (delta^2 + eps)^(3/2)).

    >>> x = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    >>> auto, closed = two_example_gradient(x, torch.tensor([[1.0], [0.0]], dtype=torch.float64))
    >>> torch.allclose(auto, closed)
    True
    """
    if x.dim() != 2 or x.shape[0] != 2:
        raise ValueError(f"x must have shape (2, C), got {tuple(x.shape)}")
    if dy.shape != x.shape:
        raise ValueError(f"dy must have x's shape {tuple(x.shape)}, got {tuple(dy.shape)}")
    x = x.detach().clone().requires_grad_(True)
    (batch_norm(x, None, None, training=True, eps=eps) * dy).sum().backward()
    delta = (x[0] - x[1]).detach() / 2
    dx_first = (dy[0] - dy[1]) * eps / (2 * (delta**2 + eps) ** 1.5)
    return x.grad, torch.stack([dx_first, -dx_first])


# --------------------------------------------------------------------------------------------------------------------
# Non-shuffled mini-batches
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OrderConfig:
    """Shuffled against class-sorted batches (`TrainConfig.order`), per normalizer and seed.

    last_steps: the training-batch accuracy (train mode, on the batch just trained on) is averaged over the last this
    many steps. Batch Renorm ("brn") follows `renorm_callback`.
    """

    orders: tuple[str, ...] = ("shuffle", "sorted")
    norms: tuple[str, ...] = ("none", "bn", "brn", "ln")
    hidden: tuple[int, ...] = (100, 100)
    activation: str = "relu"
    train: TrainConfig = TrainConfig(steps=600, batch_size=32, lr=0.1, eval_every=600)
    last_steps: int = 100
    seeds: tuple[int, ...] = (0, 1)


@dataclass
class OrderResult:
    """What `order_experiment` measured, per (order, norm): arrays of shape (S,).

    eval_acc: final test accuracy in eval mode. train_batch_acc: the mean training-batch accuracy (train mode) over the
    last `config.last_steps` steps.
    """

    eval_acc: dict[tuple[str, str], np.ndarray]
    train_batch_acc: dict[tuple[str, str], np.ndarray]
    config: OrderConfig = field(repr=False)


def order_experiment(config: OrderConfig = OrderConfig(), data: Dataset | None = None,
                     device: torch.device | str | None = None) -> OrderResult:
    """Train every normalizer with each batch order, per seed. data: defaults to ``load_digits()``."""
    data = _prepare(data, device)
    eval_acc: dict[tuple[str, str], np.ndarray] = {}
    train_batch_acc: dict[tuple[str, str], np.ndarray] = {}
    for order in config.orders:
        for norm in config.norms:
            final, batch = [], []
            for seed in config.seeds:
                model = mlp(data.n_features, hidden=config.hidden, out_features=data.n_classes,
                            activation=config.activation, norm=norm, seed=seed)
                tc = dataclasses.replace(config.train, order=order, seed=seed)
                history = train(model, data, tc, callback=renorm_callback(tc.steps))
                final.append(history.final_test_acc)
                batch.append(float(np.mean(history.train_batch_acc[-config.last_steps:])))
            eval_acc[(order, norm)] = np.array(final)
            train_batch_acc[(order, norm)] = np.array(batch)
    return OrderResult(eval_acc, train_batch_acc, config)


# --------------------------------------------------------------------------------------------------------------------
# GAN discriminators: pure and mixed real/fake batches
# --------------------------------------------------------------------------------------------------------------------


def discriminator_data(data: Dataset, scenario: str, shift_feature: int = 36, shift: float = 1.0) -> Dataset:
    """A real-against-fake classification task built from `data`: label 1 for real, 0 for fake.

    Both splits hold the n real images first (indices [0, n)) and n fakes after them ([n, 2n)), fake i made from
    real image i. scenario ``"shift"``: a fake is the real image with feature `shift_feature` moved by `shift` (in
    standardized units), a difference every single fake carries. ``"collapse"``: a fake is an exact copy of the real
    image, so no single example tells real from fake; what differs is the batch (see `discriminator_batches`).
    """
    if scenario not in ("shift", "collapse"):
        raise ValueError(f"scenario must be 'shift' or 'collapse', got {scenario!r}")
    if not 0 <= shift_feature < data.n_features:
        raise ValueError(f"shift_feature must be in [0, {data.n_features}), got {shift_feature}")

    def split(x: Tensor) -> tuple[Tensor, Tensor]:
        fake = x.clone()
        if scenario == "shift":
            fake[:, shift_feature] += shift
        labels = torch.cat([torch.ones(len(x), dtype=torch.long), torch.zeros(len(x), dtype=torch.long)])
        return torch.cat([x, fake]), labels.to(x.device)

    return Dataset(*split(data.x_train), *split(data.x_test))


def discriminator_batches(n_real: int, batch_size: int, batching: str,
                          distinct_fakes: int | None = None) -> Callable[[torch.Generator], list[Tensor]]:
    """One epoch of discriminator batches over a `discriminator_data` split with `n_real` real images (for `train`).

    batching ``"pure"``: all-real and all-fake batches of `batch_size`, alternating. ``"mixed"``: every batch is half
    real, half fake. distinct_fakes: None draws the fakes of a batch without repetition; an integer k models a
    collapsed generator: the fakes of a batch are k distinct images, each repeated equally often.
    Returns a function of a torch.Generator that gives a list of index tensors (the last one is used first).
    """
    if batching not in ("pure", "mixed"):
        raise ValueError(f"batching must be 'pure' or 'mixed', got {batching!r}")
    fakes_per_batch = batch_size if batching == "pure" else batch_size // 2
    if batching == "mixed" and batch_size % 2:
        raise ValueError(f"mixed batches are half real, half fake: batch_size must be even, got {batch_size}")
    if distinct_fakes is not None and (distinct_fakes < 1 or fakes_per_batch % distinct_fakes):
        raise ValueError(f"distinct_fakes must divide the {fakes_per_batch} fakes of a batch, got {distinct_fakes}")
    if not 1 <= fakes_per_batch <= n_real:
        raise ValueError(f"batch_size must allow 1 to {n_real} fakes per batch, got batch_size={batch_size}")

    def fake_part(g: torch.Generator) -> Tensor:
        if distinct_fakes is None:
            return n_real + torch.randperm(n_real, generator=g)[:fakes_per_batch]
        images = n_real + torch.randperm(n_real, generator=g)[:distinct_fakes]
        return images.repeat_interleave(fakes_per_batch // distinct_fakes)

    def epoch(g: torch.Generator) -> list[Tensor]:
        real_order = torch.randperm(n_real, generator=g)
        if batching == "pure":
            batches = []
            for real in real_order[: n_real - n_real % batch_size].split(batch_size):
                batches += [real, fake_part(g)]
            return batches
        half = batch_size // 2
        return [torch.cat([real, fake_part(g)]) for real in real_order[: n_real - n_real % half].split(half)]

    return epoch


@dataclass(frozen=True)
class DiscriminatorConfig:
    """Discriminators (norm, batching) trained on real-against-fake digits, per scenario and seed.

    discriminators: name -> (norm, batching); batching is "pure" or "mixed" (`discriminator_batches`).
    distinct_fakes: the number of distinct images among the fakes of a batch in the "collapse" scenario.
    test_batches: how many test batches of each kind the train-mode accuracies average over, drawn with the seed
    ``test_seed_offset + seed``.
    """

    scenarios: tuple[str, ...] = ("shift", "collapse")
    discriminators: tuple[tuple[str, str, str], ...] = (
        ("BN, pure batches", "bn", "pure"),
        ("BN, mixed batches", "bn", "mixed"),
        ("LayerNorm, pure batches", "ln", "pure"),
    )
    shift_feature: int = 36
    shift: float = 1.0
    distinct_fakes: int = 2
    hidden: tuple[int, ...] = (100, 100)
    activation: str = "relu"
    train: TrainConfig = TrainConfig(steps=300, batch_size=32, lr=0.1, eval_every=300)
    test_batches: int = 32
    test_seed_offset: int = 10_000
    seeds: tuple[int, ...] = (0, 1)


@dataclass
class DiscriminatorResult:
    """What `discriminator_experiment` measured: acc[(scenario, discriminator name, measurement)], shape (S,).

    Measurements, all on the test split: ``"pure"``, train-mode accuracy on all-real and all-fake batches;
    ``"mixed"``, train-mode accuracy on half-and-half batches; ``"eval"``, eval-mode (per-example) accuracy.
    """

    acc: dict[tuple[str, str, str], np.ndarray]
    config: DiscriminatorConfig = field(repr=False)


def _batched_train_mode_accuracy(model: nn.Module, x: Tensor, y: Tensor, batches: list[Tensor]) -> float:
    """Mean train-mode accuracy over the given index batches (equal sizes); running statistics are left untouched."""
    return float(np.mean([evaluate(model, x[idx], y[idx], eval_mode=False)[1] for idx in batches]))


def discriminator_experiment(config: DiscriminatorConfig = DiscriminatorConfig(), data: Dataset | None = None,
                             device: torch.device | str | None = None) -> DiscriminatorResult:
    """Train each discriminator in each scenario and measure it on pure batches, mixed batches and per example."""
    data = _prepare(data, device)
    acc: dict[tuple[str, str, str], list[float]] = {}
    for scenario in config.scenarios:
        task = discriminator_data(data, scenario, config.shift_feature, config.shift)
        n_train, n_test = data.x_train.shape[0], data.x_test.shape[0]
        distinct = config.distinct_fakes if scenario == "collapse" else None
        bs = config.train.batch_size
        for name, norm, batching in config.discriminators:
            for seed in config.seeds:
                model = mlp(task.n_features, hidden=config.hidden, out_features=2, activation=config.activation,
                            norm=norm, seed=seed)
                batches = discriminator_batches(n_train, bs, batching, distinct)
                train(model, task, dataclasses.replace(config.train, seed=seed), batches=batches)
                g = torch.Generator().manual_seed(config.test_seed_offset + seed)
                measured = {}
                for kind in ("pure", "mixed"):
                    test_epoch = discriminator_batches(n_test, bs, kind, distinct)
                    test = []
                    while len(test) < config.test_batches:
                        test += test_epoch(g)
                    device_test = [idx.to(task.x_test.device) for idx in test[: config.test_batches]]
                    measured[kind] = _batched_train_mode_accuracy(model, task.x_test, task.y_test, device_test)
                measured["eval"] = evaluate(model, task.x_test, task.y_test)[1]
                for kind, value in measured.items():
                    acc.setdefault((scenario, name, kind), []).append(value)
    return DiscriminatorResult({k: np.array(v) for k, v in acc.items()}, config)


# --------------------------------------------------------------------------------------------------------------------
# Fine-tuning with small batches
# --------------------------------------------------------------------------------------------------------------------


def shift_images(x: Tensor, pixels: int = 1) -> Tensor:
    """Move every 8x8 digit (N, 64) `pixels` to the right; the columns that fall off wrap around to the left.

    >>> shift_images(torch.arange(64.0).view(1, 64))[0, :3].tolist()
    [7.0, 0.0, 1.0]
    """
    if x.dim() != 2 or x.shape[1] != 64:
        raise ValueError(f"x must hold flattened 8x8 images, shape (N, 64), got {tuple(x.shape)}")
    return x.view(-1, 8, 8).roll(pixels, dims=2).reshape(-1, 64)


@dataclass(frozen=True)
class FinetuneConfig:
    """Pretrain a BN MLP on digits, then fine-tune it on a few shifted digits with small batches.

    The target task is the same ten digits moved `shift_pixels` to the right (`shift_images`), with only
    `examples_per_class` training images per class. Fine-tuning runs `steps` plain-SGD steps at
    lr = lr_per_example * batch size, once with the BN statistics updated (train mode) and once frozen (eval mode).
    """

    hidden: tuple[int, ...] = (100, 100)
    activation: str = "relu"
    pretrain: TrainConfig = TrainConfig(steps=300, batch_size=64, lr=0.3, eval_every=300)
    shift_pixels: int = 1
    examples_per_class: int = 20
    batch_sizes: tuple[int, ...] = (2, 4, 32)
    steps: int = 300
    lr_per_example: float = 0.005
    seeds: tuple[int, ...] = (0, 1)


@dataclass
class FinetuneResult:
    """What `finetune_experiment` measured.

    acc_source, acc_target_before: (S,) the pretrained model's test accuracy on the original and the shifted digits.
    acc_target[mode]: (S, B) test accuracy on the shifted digits after fine-tuning, mode ``"updated"`` (BN in train
    mode) or ``"frozen"`` (BN statistics frozen), per seed and batch size.
    """

    batch_sizes: list[int]
    acc_source: np.ndarray
    acc_target_before: np.ndarray
    acc_target: dict[str, np.ndarray]
    config: FinetuneConfig = field(repr=False)


def _per_class_subset(labels: Tensor, per_class: int, generator: torch.Generator) -> Tensor:
    chosen = []
    for c in torch.unique(labels.cpu()).tolist():
        members = (labels.cpu() == c).nonzero().flatten()
        if len(members) < per_class:
            raise ValueError(f"class {c} has only {len(members)} examples, fewer than per_class={per_class}")
        chosen.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
    return torch.cat(chosen).to(labels.device)


def finetune_experiment(config: FinetuneConfig = FinetuneConfig(), data: Dataset | None = None,
                        device: torch.device | str | None = None) -> FinetuneResult:
    """Pretrain, then fine-tune with BN statistics updated or frozen at each batch size, per seed."""
    data = _prepare(data, device)
    acc_source, acc_before = [], []
    acc_target = {mode: np.zeros((len(config.seeds), len(config.batch_sizes))) for mode in ("updated", "frozen")}
    for i, seed in enumerate(config.seeds):
        model = mlp(data.n_features, hidden=config.hidden, out_features=data.n_classes,
                    activation=config.activation, norm="bn", seed=seed)
        train(model, data, dataclasses.replace(config.pretrain, seed=seed))
        subset = _per_class_subset(data.y_train, config.examples_per_class, torch.Generator().manual_seed(seed))
        target = Dataset(shift_images(data.x_train[subset], config.shift_pixels), data.y_train[subset],
                         shift_images(data.x_test, config.shift_pixels), data.y_test)
        acc_source.append(evaluate(model, data.x_test, data.y_test)[1])
        acc_before.append(evaluate(model, target.x_test, target.y_test)[1])
        for j, batch_size in enumerate(config.batch_sizes):
            for mode in ("updated", "frozen"):
                tuned = copy.deepcopy(model)
                if mode == "frozen":
                    tuned = freeze_bn_statistics(tuned)
                tc = TrainConfig(steps=config.steps, batch_size=batch_size, lr=config.lr_per_example * batch_size,
                                 eval_every=config.steps, seed=seed)
                acc_target[mode][i, j] = train(tuned, target, tc).final_test_acc
    return FinetuneResult(list(config.batch_sizes), np.array(acc_source), np.array(acc_before), acc_target, config)

