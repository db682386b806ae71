"""Experiments of the data-parallel chapter: real multi-process runs over ``torch.distributed`` on one machine.

The processes are started by `bnnotes.experiments.launch.launch`, and `recorded_collectives` (same module) records
what SyncBN sends.

- `SplitBatch` makes the course's one training loop (`bnnotes.experiments.train`) data-parallel: every rank computes
  its slice of each batch, and the outputs are gathered back so that every rank computes the loss of the whole batch.
- `measure_communication` counts and times what `SyncBatchNorm` sends, and times its one round against two;
  `compare_data_parallel_bn` trains with
  per-rank BN, SyncBN, one process on the whole batch, and Ghost BN; `ghost_batch_sweep` varies Ghost BN's virtual
  batch size on one device.

Spawned processes import the function they run by its module, so workers live here, never in a notebook or
``__main__``.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from bnnotes.experiments.data import Dataset, load_digits
from bnnotes.experiments.launch import launch, recorded_collectives
from bnnotes.experiments.models import mlp
from bnnotes.experiments.training import History, TrainConfig, evaluate, train
from bnnotes.ghost import GhostBatchNorm1d
from bnnotes.sync import DistributedDataParallel, convert_sync_batchnorm

__all__ = [
    "SplitBatch",
    "CommunicationConfig",
    "CommunicationCost",
    "ROUNDS",
    "round_once",
    "measure_communication",
    "DataParallelConfig",
    "DataParallelResult",
    "compare_data_parallel_bn",
    "GhostConfig",
    "GhostResult",
    "ghost_batch_sweep",
]


# ----------------------------------------------------------------------------------------------------------------------
# Data parallelism for the one training loop.
# ----------------------------------------------------------------------------------------------------------------------


class _GatherRows(torch.autograd.Function):
    """All-gather equal row blocks in rank order. Backward without communication: every rank computes the same loss
    from the same gathered rows, so the sum over ranks of the gradients of block r is world_size times rank r's own."""

    @staticmethod
    def forward(ctx: Any, local: Tensor, group: Any) -> Tensor:
        world_size = dist.get_world_size(group)
        blocks = [torch.empty_like(local) for _ in range(world_size)]
        dist.all_gather(blocks, local.contiguous(), group=group)
        ctx.world_size, ctx.rank, ctx.rows = world_size, dist.get_rank(group), local.shape[0]
        return torch.cat(blocks)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return ctx.world_size * grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows], None


class SplitBatch(nn.Module):
    """Data parallelism around `module` for `bnnotes.experiments.train`: each rank computes one slice of each batch.

    In training mode a batch of N rows is split into world_size equal consecutive slices; rank r runs slice r through
    its ``DistributedDataParallel(module)`` replica, and the slices' outputs are all-gathered (with gradient) so that
    every rank returns the whole batch's output and computes the whole batch's loss, as one process would. DDP then
    averages the parameter gradients over the ranks. In eval mode the whole input runs through the local replica, with
    no communication. Every rank must make the same calls. N must be a multiple of the world size.
    """

    def __init__(self, module: nn.Module, process_group: Any = None) -> None:
        super().__init__()
        self.process_group = process_group
        self.replica = DistributedDataParallel(module, process_group=process_group)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return self.replica.module(x)
        world_size = dist.get_world_size(self.process_group)
        if x.shape[0] % world_size != 0:
            raise ValueError(f"batch size {x.shape[0]} is not a multiple of the world size {world_size}")
        rank = dist.get_rank(self.process_group)
        local_out = self.replica(x.tensor_split(world_size)[rank])
        # The gradient reaching a replica is world_size times the single-process one (the sum over the ranks'
        # identical losses); DDP's average over the ranks divides it back.
        return _GatherRows.apply(local_out, self.process_group)


# ----------------------------------------------------------------------------------------------------------------------
# What SyncBatchNorm sends, and what it costs.
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CommunicationConfig:
    """`measure_communication`'s setting: an `mlp` with BN after each hidden layer, on random inputs.

    hidden: the hidden widths (the BN layers' channel counts C). per_rank_batch: rows per rank.
    repeats: timed rounds per variant and channel count (interleaved); step_repeats: timed training steps per variant
    (interleaved); each after `warmup_rounds` / `warmup_steps` untimed ones. timeout: seconds for the whole run.
    in_features: the width of the random inputs, rank r's drawn with seed ``input_seed + r``; model_seed: the
    initialization of every model.
    """

    world_size: int = 2
    hidden: tuple[int, ...] = (64, 256, 1024)
    per_rank_batch: int = 32
    repeats: int = 100
    step_repeats: int = 40
    timeout: float = 120.0
    in_features: int = 64
    model_seed: int = 0
    input_seed: int = 0
    warmup_rounds: int = 10
    warmup_steps: int = 3


#: The forward-pass communication of the two algorithms, by name (see `round_once`).
ROUNDS = ("one_round", "two_rounds")


@dataclass
class CommunicationCost:
    """What `measure_communication` found (rank 0's measurements).

    forward_messages[i] / backward_messages[i]: the collectives, as ``(name, floats this rank sends)``, that BN layer i
    made in one forward / backward pass. round_us[C][variant]: median microseconds of the forward pass's
    communication for C channels, ``"one_round"`` (bnnotes' and torch's: one all-gather of 2C + 1 floats) or
    ``"two_rounds"`` (the first edition's: an all-reduce of C + 1 floats, then one of C). step_ms: median
    milliseconds of one DDP training step (forward, backward, gradient all-reduce) with ``"per_rank"`` BN and with
    ``"sync"`` BN. torch_cpu_error: what ``torch.nn.SyncBatchNorm`` says to a CPU tensor under an initialized gloo
    group (None if it ran).
    """

    world_size: int
    channels: list[int]
    forward_messages: list[list[tuple[str, int]]]
    backward_messages: list[list[tuple[str, int]]]
    round_us: dict[int, dict[str, float]]
    step_ms: dict[str, float]
    torch_cpu_error: str | None = None

    def round_ratio(self, channels: int) -> float:
        """How many times longer two rounds take than one, for `channels` channels (median over median)."""
        return self.round_us[channels]["two_rounds"] / self.round_us[channels]["one_round"]

    def table(self) -> str:
        """One line per BN layer: its collectives per step, and the forward's median time with one and two rounds."""
        lines = [f"{'layer':>5} {'C':>5}  {'forward':<18} {'backward':<18} {'one round':>10} {'two rounds':>11}"]
        for i, (c, fwd, bwd) in enumerate(zip(self.channels, self.forward_messages, self.backward_messages)):
            forward = ", ".join(f"{name} {n}" for name, n in fwd)
            backward = ", ".join(f"{name} {n}" for name, n in bwd)
            one, two = self.round_us[c]["one_round"], self.round_us[c]["two_rounds"]
            lines.append(f"{i:>5} {c:>5}  {forward:<18} {backward:<18} {one:>7.0f} us {two:>8.0f} us")
        return "\n".join(lines)


def round_once(variant: str, buffers: dict[str, list[Tensor]], group: Any = None) -> None:
    """The forward-pass communication of synchronized BN, as `variant` does it, for the channel count of `buffers`.

    ``"one_round"``: every rank all-gathers every rank's (count, mean, variance), 2C + 1 floats each, and merges them
    locally (`bnnotes.sync.combine_statistics`). ``"two_rounds"``: an all-reduce of (count, sum of x), C + 1 floats,
    gives the global mean; a second all-reduce of the sum of squared deviations from it, C floats, the variance.
    buffers: float64 tensors to send, made by the caller (``"one_round"``: one of 2C + 1 and world_size receive
    buffers; ``"two_rounds"``: one of C + 1 and one of C).
    """
    if variant == "one_round":
        send, *receive = buffers["one_round"]
        dist.all_gather(receive, send, group=group)
    elif variant == "two_rounds":
        count_and_sum, squares = buffers["two_rounds"]
        dist.all_reduce(count_and_sum, group=group)
        dist.all_reduce(squares, group=group)  # in SyncBN it can only start once the mean is known
    else:
        raise ValueError(f"variant must be one of {ROUNDS}, got {variant!r}")


def _communication_worker(rank: int, world_size: int, config: CommunicationConfig) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(config.input_seed + rank)
    x = torch.randn(config.per_rank_batch, config.in_features, generator=generator)
    sync_model = convert_sync_batchnorm(_communication_model(config))
    forward_messages, backward_messages = _record_messages(sync_model, x, len(config.hidden))
    channels = sorted(set(config.hidden))
    models = {"per_rank": DistributedDataParallel(_communication_model(config)),
              "sync": DistributedDataParallel(sync_model)}
    return {
        "forward_messages": forward_messages,
        "backward_messages": backward_messages,
        "round_us": _time_rounds(channels, world_size, config),
        "step_ms": _time_steps(models, x, config),
        "torch_cpu_error": _torch_cpu_error(),
    }


def _communication_model(config: CommunicationConfig) -> nn.Module:
    return mlp(config.in_features, config.hidden, activation="relu", norm="bn", seed=config.model_seed)


def _record_messages(sync_model: nn.Module, x: Tensor, layers: int) -> tuple[list, list]:
    """The collectives of one forward and one backward pass, per BN layer, in forward order."""
    with recorded_collectives() as forward_calls:
        out = sync_model(x)
    with recorded_collectives() as backward_calls:
        out.square().mean().backward()
    if len(forward_calls) != layers or len(backward_calls) != layers:
        raise RuntimeError(f"expected 1 forward and 1 backward collective per layer, got {forward_calls} and "
                           f"{backward_calls} for {layers} layers")
    # the backward visits the layers last to first
    return [[call] for call in forward_calls], [[call] for call in reversed(backward_calls)]


def _time_rounds(channels: list[int], world_size: int, config: CommunicationConfig) -> dict[int, dict[str, float]]:
    """Median microseconds of the forward's communication with one round and with two, per channel count.

    The cases are interleaved, and the order rotates every repeat, identically on every rank (every rank must make
    the same calls).
    """
    buffers = {
        c: {
            "one_round": [torch.zeros(2 * c + 1, dtype=torch.float64) for _ in range(world_size + 1)],
            "two_rounds": [torch.zeros(c + 1, dtype=torch.float64), torch.zeros(c, dtype=torch.float64)],
        }
        for c in channels
    }
    cases = [(c, variant) for c in channels for variant in ROUNDS]
    times: dict[tuple[int, str], list[float]] = {case: [] for case in cases}
    for repeat in range(config.repeats + config.warmup_rounds):
        shift = repeat % len(cases)
        for c, variant in cases[shift:] + cases[:shift]:
            start = time.perf_counter()
            round_once(variant, buffers[c])
            if repeat >= config.warmup_rounds:  # the first rounds warm up the connections
                times[(c, variant)].append(time.perf_counter() - start)
    return {c: {v: 1e6 * statistics.median(times[(c, v)]) for v in ROUNDS} for c in channels}


def _time_steps(models: dict[str, nn.Module], x: Tensor, config: CommunicationConfig) -> dict[str, float]:
    """Median milliseconds of one training step (forward, backward, DDP's all-reduce) per model, interleaved."""
    step_times: dict[str, list[float]] = {name: [] for name in models}
    for repeat in range(config.step_repeats + config.warmup_steps):
        for name, model in models.items():
            start = time.perf_counter()
            model.zero_grad(set_to_none=True)
            model(x).square().mean().backward()
            if repeat >= config.warmup_steps:
                step_times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in step_times.items()}


def _torch_cpu_error() -> str | None:
    """What torch's own SyncBatchNorm says to a CPU tensor under the initialized gloo group (None if it runs)."""
    try:
        nn.SyncBatchNorm(4)(torch.randn(8, 4))
    except (ValueError, RuntimeError) as error:
        return f"{type(error).__name__}: {error}"
    return None


def measure_communication(config: CommunicationConfig = CommunicationConfig()) -> CommunicationCost:
    """Record and time the collectives of `SyncBatchNorm` in `config.world_size` CPU processes over gloo.

    Returns a `CommunicationCost`: per BN layer, its forward and backward collectives (expected one all-gather of
    2C + 1 floats and one all-reduce of 2C); the median time of the forward's communication with one round and with
    two (`round_once`); the median time of a DDP training step with per-rank and with synchronized BN. The numbers
    are this machine's, over loopback: latencies of messages of a few thousand floats at most, which is what SyncBN
    sends.
    """
    if not isinstance(config, CommunicationConfig):
        raise TypeError(f"config must be a CommunicationConfig, got {type(config).__name__}")
    measured = launch(_communication_worker, config.world_size, (config,), timeout=config.timeout)[0]
    return CommunicationCost(world_size=config.world_size, channels=list(config.hidden), **measured)


# ----------------------------------------------------------------------------------------------------------------------
# Per-rank BN, SyncBN, one process, Ghost BN: training on digits.
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataParallelConfig:
    """`compare_data_parallel_bn`'s setting: an `mlp` on digits, trained with the global batch split over ranks.

    The global batch is ``world_size * per_rank_batch``. hidden, activation, lr, steps, eval_every: the model and
    `TrainConfig`'s (plain SGD). seeds: one run per seed (model initialization and batch order).
    dtype: "float64" makes "equal to one process" checkable to rounding error. timeout: seconds for the whole run.
    """

    world_size: int = 2
    per_rank_batch: int = 2
    hidden: tuple[int, ...] = (100, 100)
    activation: str = "relu"
    lr: float = 0.02
    steps: int = 120
    eval_every: int = 20
    seeds: tuple[int, ...] = (0, 1)
    dtype: str = "float64"
    timeout: float = 300.0

    @property
    def global_batch(self) -> int:
        return self.world_size * self.per_rank_batch

    def train_config(self, seed: int) -> TrainConfig:
        return TrainConfig(steps=self.steps, batch_size=self.global_batch, lr=self.lr, eval_every=self.eval_every,
                           seed=seed)


@dataclass
class DataParallelResult:
    """Training histories by variant, one per seed (in `config.seeds` order).

    Variants: ``"single"`` BN in one process on the global batch; ``"sync"`` SyncBN over the ranks; ``"per_rank"``
    BN on each rank's slice (DDP's default); ``"ghost"`` Ghost BN in one process, virtual batch = per-rank batch.
    """

    config: DataParallelConfig
    histories: dict[str, list[History]] = field(default_factory=dict)

    def final_test_acc(self, variant: str) -> list[float]:
        return [h.final_test_acc for h in self.histories[variant]]

    def max_train_loss_gap(self, variant: str, reference: str) -> float:
        """The largest |difference| between two variants' per-step training losses, over all steps and seeds."""
        return max(
            max(abs(a - b) for a, b in zip(h.train_loss, g.train_loss, strict=True))
            for h, g in zip(self.histories[variant], self.histories[reference], strict=True)
        )


def _digits(dtype: str) -> Dataset:
    data = load_digits()
    to = getattr(torch, dtype)
    return Dataset(data.x_train.to(to), data.y_train, data.x_test.to(to), data.y_test)


def _model(config: DataParallelConfig, seed: int, n_features: int, norm: Any = "bn") -> nn.Module:
    model = mlp(n_features, config.hidden, activation=config.activation, norm=norm, seed=seed)
    return model.to(getattr(torch, config.dtype))


def _data_parallel_worker(
    rank: int, world_size: int, config: DataParallelConfig, arrays: tuple[np.ndarray, ...]
) -> dict[str, list[History]]:
    # The parent sends the data as NumPy arrays (copied with the process arguments): the children skip importing
    # scikit-learn, and no tensor memory is shared with another process.
    data = Dataset(*(torch.from_numpy(a) for a in arrays))
    histories: dict[str, list[History]] = {"sync": [], "per_rank": []}
    for seed in config.seeds:
        for variant in histories:
            model = _model(config, seed, data.n_features)
            if variant == "sync":
                model = convert_sync_batchnorm(model)
            histories[variant].append(train(SplitBatch(model), data, config.train_config(seed)))
    return histories


def compare_data_parallel_bn(config: DataParallelConfig = DataParallelConfig()) -> DataParallelResult:
    """Train the same model four ways on digits and return their histories (see `DataParallelResult`).

    The two data-parallel variants run in `config.world_size` CPU processes over gloo (`launch`), with the course's
    training loop (`train`) around `SplitBatch`; the two single-process variants run here, on the CPU as well, so
    that all four see the same float64 arithmetic. Every variant sees the same batches in the same order.
    """
    if not isinstance(config, DataParallelConfig):
        raise TypeError(f"config must be a DataParallelConfig, got {type(config).__name__}")
    data = _digits(config.dtype)
    arrays = tuple(t.numpy() for t in (data.x_train, data.y_train, data.x_test, data.y_test))
    distributed = launch(_data_parallel_worker, config.world_size, (config, arrays), timeout=config.timeout)[0]
    ghost = partial(GhostBatchNorm1d, virtual_batch_size=config.per_rank_batch)
    result = DataParallelResult(config, {"single": [], **distributed, "ghost": []})
    for seed in config.seeds:
        for variant, norm in (("single", "bn"), ("ghost", ghost)):
            model = _model(config, seed, data.n_features, norm)
            result.histories[variant].append(train(model, data, config.train_config(seed)))
    return result


# ----------------------------------------------------------------------------------------------------------------------
# Ghost BN: the virtual batch size as a noise knob, on one device.
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GhostConfig:
    """`ghost_batch_sweep`'s setting: an `mlp` with `GhostBatchNorm1d` on digits, one large batch, several V.

    batch_size: the (large) batch of every SGD step; every virtual batch size must divide it, and V = batch_size is
    plain BN. tail: the training-mode loss is averaged over the last `tail` steps. The rest as in `TrainConfig`.
    """

    batch_size: int = 128
    virtual_batch_sizes: tuple[int, ...] = (2, 4, 8, 32, 128)
    hidden: tuple[int, ...] = (100, 100)
    activation: str = "relu"
    lr: float = 0.1
    steps: int = 200
    tail: int = 50
    seeds: tuple[int, ...] = (0, 1, 2)


@dataclass
class GhostResult:
    """What `ghost_batch_sweep` measured; arrays of shape (len(virtual_batch_sizes), len(seeds)).

    train_mode_loss: the mean mini-batch loss over the last `tail` steps, in training mode (ghost statistics): the
    objective SGD actually descends. train_loss: the eval-mode loss on the whole training split. test_acc: eval-mode
    test accuracy at the end.
    """

    config: GhostConfig
    train_mode_loss: np.ndarray
    train_loss: np.ndarray
    test_acc: np.ndarray


def ghost_batch_sweep(config: GhostConfig = GhostConfig(), device: torch.device | str | None = None) -> GhostResult:
    """Train the same model with Ghost BN at each virtual batch size of `config`, for each seed, on `device`.

    device: defaults to `bnnotes.device()`. Returns a `GhostResult`.
    """
    if not isinstance(config, GhostConfig):
        raise TypeError(f"config must be a GhostConfig, got {type(config).__name__}")
    bad = [v for v in config.virtual_batch_sizes if config.batch_size % v != 0]
    if bad:
        raise ValueError(f"every virtual batch size must divide batch_size={config.batch_size}, got {bad}")
    if device is None:
        from bnnotes import device as best_device

        device = best_device()
    data = load_digits(device=device)
    shape = (len(config.virtual_batch_sizes), len(config.seeds))
    train_mode_loss, train_loss, test_acc = np.zeros(shape), np.zeros(shape), np.zeros(shape)
    for i, virtual_batch_size in enumerate(config.virtual_batch_sizes):
        for j, seed in enumerate(config.seeds):
            ghost = partial(GhostBatchNorm1d, virtual_batch_size=virtual_batch_size)
            model = mlp(data.n_features, config.hidden, activation=config.activation, norm=ghost, seed=seed)
            train_config = TrainConfig(steps=config.steps, batch_size=config.batch_size, lr=config.lr,
                                       eval_every=config.steps, seed=seed)
            history = train(model, data, train_config)
            train_mode_loss[i, j] = float(np.mean(history.train_loss[-config.tail:]))
            train_loss[i, j] = evaluate(model, data.x_train, data.y_train)[0]
            test_acc[i, j] = history.final_test_acc
    return GhostResult(config, train_mode_loss, train_loss, test_acc)
