"""The one training loop of the course, and the measurements every chapter shares."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from bnnotes.experiments.data import Dataset, batch_indices
from bnnotes.experiments.stats import frozen_buffers
from bnnotes.notebook import heartbeat

__all__ = ["TrainConfig", "History", "train", "evaluate", "steps_to_accuracy"]


@dataclass(frozen=True)
class TrainConfig:
    """What `train` does: `steps` SGD steps on mini-batches of `batch_size`.

    lr, momentum, weight_decay: ``torch.optim.SGD``'s. eval_every: evaluate on the test split every this many steps
    (and at step 0 and at the end). order: ``"shuffle"`` or ``"sorted"`` batches (see `batch_indices`).
    seed: the batch order's seed. eval_mode: evaluate in ``model.eval()`` (running statistics) or in train mode.
    stop_at_accuracy: stop after the first evaluation whose test accuracy reaches this value (None: run every step),
    so that sweeps which only ask "how many steps to reach it?" do not pay for the rest of the run.
    """

    steps: int = 1000
    batch_size: int = 60
    lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    eval_every: int = 50
    order: str = "shuffle"
    seed: int = 0
    eval_mode: bool = True
    stop_at_accuracy: float | None = None


@dataclass
class History:
    """What `train` recorded: `step` holds the step numbers at which the test split was evaluated."""

    step: list[int] = field(default_factory=list)
    test_acc: list[float] = field(default_factory=list)
    test_loss: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)  # one per step: the mini-batch loss
    train_batch_acc: list[float] = field(default_factory=list)  # one per step: the mini-batch accuracy (train mode)
    diverged: bool = False

    @property
    def final_test_acc(self) -> float:
        return self.test_acc[-1]


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eval_mode: bool = True) -> tuple[float, float]:
    """(mean cross-entropy loss, accuracy) of `model` on (x, y), in eval mode by default; the mode is restored after.

    In train mode (eval_mode=False) the whole split is one batch, inside `frozen_buffers`: the running statistics are
    left untouched.
    """
    if eval_mode:
        was_training = model.training
        model.eval()
        logits = model(x)
        model.train(was_training)
    else:
        with frozen_buffers(model):
            logits = model(x)
    loss = F.cross_entropy(logits, y).item()
    acc = (logits.argmax(dim=1) == y).float().mean().item()
    return loss, acc


def train(
    model: nn.Module,
    data: Dataset,
    config: TrainConfig,
    callback: Callable[[int, nn.Module], None] | None = None,
    batches: Callable[[torch.Generator], list[torch.Tensor]] | None = None,
) -> History:
    """Train `model` on `data` with SGD and cross-entropy, and record a `History`.

    The model is moved to the data's device. With ``BNNOTES_PROGRESS=1`` (the Colab edition) a long cell of training
    runs prints a line every few seconds (`bnnotes.notebook.heartbeat`); the book's outputs stay free of it. callback(step, model) runs before step 0's update and after every step,
    for measurements. A non-finite loss stops training and sets ``history.diverged`` (accuracy is then chance).
    batches(generator): optionally replaces `batch_indices` as the source of one epoch of index tensors into
    ``data.x_train`` (indices may repeat), for batch compositions that `TrainConfig.order` does not offer.
    """
    device = data.x_train.device
    model.to(device)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    generator = torch.Generator().manual_seed(config.seed)
    history = History()

    def record(step: int) -> None:
        loss, acc = evaluate(model, data.x_test, data.y_test, eval_mode=config.eval_mode)
        history.step.append(step)
        history.test_loss.append(loss)
        history.test_acc.append(acc)
        # The Colab edition's progress (BNNOTES_PROGRESS): a line every few seconds of a long cell; silent in the book.
        heartbeat(lambda runs: f"training run {runs}: step {step}/{config.steps}, test accuracy {acc:.3f}",
                  new_run=step == 0)

    record(0)
    if callback is not None:
        callback(0, model)
    epoch: list[torch.Tensor] = []
    for step in range(1, config.steps + 1):
        if not epoch:
            if batches is not None:
                epoch = list(batches(generator))
                if not epoch:
                    raise ValueError("batches(generator) returned no batches; expected a list of index tensors")
            else:
                epoch = batch_indices(data.y_train, config.batch_size, generator, config.order)
        idx = epoch.pop().to(device)
        model.train()
        logits = model(data.x_train[idx])
        loss = F.cross_entropy(logits, data.y_train[idx])
        if not torch.isfinite(loss):
            history.diverged = True
            history.step.append(step)
            history.test_loss.append(float("nan"))
            history.test_acc.append(1.0 / data.n_classes)
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.train_loss.append(loss.item())
        history.train_batch_acc.append((logits.argmax(1) == data.y_train[idx]).float().mean().item())
        if callback is not None:
            callback(step, model)
        if step % config.eval_every == 0 or step == config.steps:
            record(step)
            if config.stop_at_accuracy is not None and history.test_acc[-1] >= config.stop_at_accuracy:
                break
    return history


def steps_to_accuracy(history: History, target: float) -> int | None:
    """The first evaluated step at which test accuracy reached `target`, or None if it never did."""
    for step, acc in zip(history.step, history.test_acc):
        if acc >= target:
            return step
    return None
