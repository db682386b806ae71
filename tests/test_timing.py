"""bnnotes.timing: the one interleaved-median timer, checked with a fake clock whose readings are known."""

from __future__ import annotations

import pytest
import torch

from bnnotes import timing


@pytest.fixture
def fake_clock(monkeypatch):
    """A wall clock that advances only when a timed function says how long it took."""
    state = {"now": 0.0}
    monkeypatch.setitem(timing.CLOCKS, "wall", lambda: state["now"])
    return state


def test_rounds_rotate_the_order_and_samples_are_per_call(fake_clock):
    calls: list[str] = []
    cost = {"a": 1.0, "b": 3.0, "c": 2.0}

    def make(name):
        def function():
            calls.append(name)
            fake_clock["now"] += cost[name]
        return function

    result = timing.median_interleaved({name: make(name) for name in cost}, rounds=4, inner=2, warmup=1)
    assert calls[:3] == ["a", "b", "c"]  # the warm-up, once each
    timed = calls[3:][::2]  # inner = 2: every function twice in a row
    assert timed == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    assert result.seconds == {"a": [1.0] * 4, "b": [3.0] * 4, "c": [2.0] * 4}
    assert result.calls == {"a": 2, "b": 2, "c": 2}
    assert result.median == {"a": 1.0, "b": 3.0, "c": 2.0}
    assert result.paired_ratio("b", "a") == 3.0


def test_inner_none_calibrates_each_function_to_the_sample_length(fake_clock):
    def fast():
        fake_clock["now"] += 0.001

    def slow():
        fake_clock["now"] += 0.5

    result = timing.median_interleaved({"fast": fast, "slow": slow}, rounds=3, inner=None, warmup=0, min_sample_s=0.01)
    assert result.calls == {"fast": 10, "slow": 1}
    assert result.median["fast"] == pytest.approx(0.001) and result.median["slow"] == pytest.approx(0.5)


def test_the_median_ignores_one_slow_round(fake_clock):
    durations = iter([1.0, 1.0, 9.0, 1.0, 1.0])

    def function():
        fake_clock["now"] += next(durations)

    assert timing.median_interleaved({"f": function}, rounds=5, warmup=0).median["f"] == 1.0


def test_bad_arguments_are_refused_with_what_arrived():
    with pytest.raises(ValueError, match="at least one function"):
        timing.median_interleaved({}, rounds=1)
    with pytest.raises(ValueError, match="rounds must be a positive integer, got 0"):
        timing.median_interleaved({"f": lambda: None}, rounds=0)
    with pytest.raises(ValueError, match="inner must be a positive integer or None"):
        timing.median_interleaved({"f": lambda: None}, rounds=1, inner=0)
    with pytest.raises(ValueError, match=r"clock must be one of \['cpu', 'wall'\], got 'gpu'"):
        timing.median_interleaved({"f": lambda: None}, rounds=1, clock="gpu")


def test_the_cpu_clock_counts_cpu_time_and_synchronize_accepts_every_device_name():
    result = timing.median_interleaved({"sum": lambda: sum(range(1000))}, rounds=2, clock="cpu", device="cpu")
    assert all(s >= 0 for s in result.seconds["sum"])
    timing.synchronize(None)
    timing.synchronize(torch.device("cpu"))
    if torch.cuda.is_available():
        timing.synchronize("cuda")
