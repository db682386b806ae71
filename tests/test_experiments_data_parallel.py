"""bnnotes.experiments.data_parallel: the measurements and the experiments (the launcher: test_launch.py).

The chapter asserts the experiments' claims at full size; here they run small, to check the machinery.
"""

from __future__ import annotations

import numpy as np
import pytest

from bnnotes.experiments import data_parallel
from bnnotes.experiments.data_parallel import (
    CommunicationConfig,
    DataParallelConfig,
    GhostConfig,
    compare_data_parallel_bn,
    ghost_batch_sweep,
    measure_communication,
)


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
        data_parallel.round_once("three_rounds", {})


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
