"""bnnotes.experiments.launch: the process launcher (errors, timeouts, clean-up) and the collectives recorder.

Spawned ranks import their worker by module name, so the workers are top-level functions of this module.
"""

from __future__ import annotations

import multiprocessing
import time

import pytest
import torch
import torch.distributed as dist
from torch import nn

from bnnotes.experiments.data_parallel import SplitBatch
from bnnotes.experiments.launch import launch, loopback_interface, recorded_collectives


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


def _rank_sum(rank: int, world_size: int) -> int:
    t = torch.tensor([rank])
    dist.all_reduce(t)
    return int(t.item())


@pytest.mark.timeout(60)
def test_launch_returns_every_rank_value_in_rank_order():
    assert launch(_rank_sum, 3, timeout=50) == [3, 3, 3]
    assert multiprocessing.active_children() == []
    assert loopback_interface() in ("lo", "lo0", None)


def test_recorded_collectives_restores_the_originals():
    originals = (dist.all_reduce, dist.all_gather)
    with recorded_collectives() as calls:
        assert dist.all_reduce is not originals[0] and dist.all_gather is not originals[1]
    assert (dist.all_reduce, dist.all_gather) == originals and calls == []
