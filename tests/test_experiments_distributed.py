"""bnnotes.experiments.distributed: the launcher (errors, timeouts, clean-up), the measurements and the experiments.

The chapter asserts the experiments' claims at full size; here they run small, to check the machinery.
"""

from __future__ import annotations

import multiprocessing
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from bnnotes.experiments import distributed
from bnnotes.experiments.distributed import (
    CommunicationConfig,
    DataParallelConfig,
    GhostConfig,
    SplitBatch,
    compare_data_parallel_bn,
    ghost_batch_sweep,
    launch,
    measure_communication,
)


def _bad_batch_on_rank_zero(rank: int, world_size: int) -> None:
    """Rank 0 gives SplitBatch a batch it cannot split; rank 1 then waits for rank 0 in a collective forever."""
    model = SplitBatch(nn.Linear(2, 2))
    model(torch.randn(3 if rank == 0 else 4, 2))
    dist.barrier()


def _sleep(rank: int, world_size: int, seconds: float) -> None:
    time.sleep(seconds)


@pytest.mark.timeout(120)
def test_launch_reports_a_failing_rank_and_stops_the_one_left_waiting():
    expected = r"(?s)rank 0 of 2 failed.*batch size 3 is not a multiple of the world size 2"
    with pytest.raises(RuntimeError, match=expected):
        launch(_bad_batch_on_rank_zero, 2, timeout=90)
    assert multiprocessing.active_children() == []


@pytest.mark.timeout(60)
def test_launch_times_out_and_cleans_up():
    with pytest.raises(TimeoutError, match="did not finish within 3"):
        launch(_sleep, 2, (600.0,), timeout=3)
    assert multiprocessing.active_children() == []


def _local_function(rank: int, world_size: int) -> None:
    pass


@pytest.mark.parametrize("worker", [lambda rank, world_size: None, "not callable"])
def test_launch_rejects_workers_spawn_cannot_import(worker):
    with pytest.raises((ValueError, TypeError), match="top-level function|callable"):
        launch(worker, 2)


def test_launch_rejects_a_function_of_main():
    def worker(rank, world_size):
        return None

    worker.__module__ = "__main__"
    worker.__qualname__ = "worker"
    with pytest.raises(ValueError, match="cannot import __main__"):
        launch(worker, 2)
    with pytest.raises(ValueError, match="world_size must be a positive integer"):
        launch(_local_function, 0)


@pytest.mark.timeout(120)
def test_measure_communication_records_one_forward_and_one_backward_collective_per_layer():
    cost = measure_communication(CommunicationConfig(hidden=(6, 10, 6), per_rank_batch=4, repeats=3, step_repeats=2))
    assert cost.forward_messages == [[("all_gather", 13)], [("all_gather", 21)], [("all_gather", 13)]]
    assert cost.backward_messages == [[("all_reduce", 12)], [("all_reduce", 20)], [("all_reduce", 12)]]
    assert set(cost.round_us) == {6, 10} and all(set(t) == {"one_round", "two_rounds"} for t in cost.round_us.values())
    assert all(t > 0 for times in cost.round_us.values() for t in times.values())
    assert cost.round_ratio(6) == cost.round_us[6]["two_rounds"] / cost.round_us[6]["one_round"]
    assert set(cost.step_ms) == {"per_rank", "sync"}
    assert len(cost.table().splitlines()) == 4
    assert "GPU" in cost.torch_cpu_error
    with pytest.raises(TypeError, match="CommunicationConfig"):
        measure_communication({"hidden": (6,)})


def test_round_once_rejects_an_unknown_variant():
    with pytest.raises(ValueError, match="one_round"):
        distributed.round_once("three_rounds", {})


@pytest.mark.timeout(150)
def test_compare_data_parallel_bn_small():
    config = DataParallelConfig(steps=12, eval_every=6, seeds=(0,), hidden=(16,))
    result = compare_data_parallel_bn(config)
    assert set(result.histories) == {"single", "sync", "per_rank", "ghost"}
    assert all(len(h[0].train_loss) == 12 and h[0].step == [0, 6, 12] for h in result.histories.values())
    assert result.max_train_loss_gap("sync", "single") < 1e-10
    assert result.max_train_loss_gap("per_rank", "ghost") < 1e-10
    assert result.max_train_loss_gap("per_rank", "single") > 1e-3
    assert len(result.final_test_acc("sync")) == 1


def test_compare_data_parallel_bn_rejects_a_wrong_config():
    with pytest.raises(TypeError, match="DataParallelConfig"):
        compare_data_parallel_bn({"steps": 10})


def test_ghost_batch_sweep_small():
    config = GhostConfig(batch_size=8, virtual_batch_sizes=(2, 8), steps=6, tail=3, seeds=(0, 1))
    result = ghost_batch_sweep(config, device="cpu")
    for values in (result.train_mode_loss, result.train_loss, result.test_acc):
        assert values.shape == (2, 2) and np.isfinite(values).all()
    with pytest.raises(ValueError, match=r"divide batch_size=8, got \[3\]"):
        ghost_batch_sweep(GhostConfig(batch_size=8, virtual_batch_sizes=(2, 3)), device="cpu")
    with pytest.raises(TypeError, match="GhostConfig"):
        ghost_batch_sweep(DataParallelConfig())


def test_recorded_collectives_restores_the_originals():
    originals = (dist.all_reduce, dist.all_gather)
    with distributed.recorded_collectives() as calls:
        assert dist.all_reduce is not originals[0] and dist.all_gather is not originals[1]
    assert (dist.all_reduce, dist.all_gather) == originals and calls == []
