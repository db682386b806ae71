"""One timer for every measurement of the course: interleaved rounds, device synchronization, the median.

Timing a function once on a shared machine measures the machine as much as the function. `median_interleaved` times
several functions in rounds, every function once per round and in a rotated order, so that a busy spell slows all of
them alike; it synchronizes an accelerator before reading the clock; and it reports the median over rounds. Used by
`bnnotes.bench` and the timing experiments of the chapters (whitening's cost, the hand-written backward, the folded
network). A timing is a measurement to look at, never a claim to assert.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass

import torch

__all__ = ["CLOCKS", "synchronize", "Timing", "median_interleaved"]

#: "wall": ``time.perf_counter``. "cpu": ``time.process_time``, the process's CPU time, which does not count time spent
#: waiting for a core on a busy machine (with several threads it is their sum); for the CPU device only, since an
#: accelerator's work is not the process's CPU time.
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def synchronize(device: torch.device | str | None) -> None:
    """Wait until `device` has finished its queued work (CUDA and MPS run asynchronously); a no-op for the CPU.

    >>> synchronize("cpu")
    """
    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


@dataclass(frozen=True)
class Timing:
    """What `median_interleaved` measured.

    seconds: {name: seconds per call, one sample per round, in round order}. calls: {name: calls per sample}.
    """

    seconds: dict[Hashable, list[float]]
    calls: dict[Hashable, int]

    @property
    def median(self) -> dict[Hashable, float]:
        """{name: the median over rounds of the seconds per call}."""
        return {name: statistics.median(samples) for name, samples in self.seconds.items()}

    def paired_ratio(self, numerator: Hashable, denominator: Hashable) -> float:
        """The median over rounds of numerator's time over denominator's time in the same round."""
        return statistics.median(a / b for a, b in zip(self.seconds[numerator], self.seconds[denominator]))


def median_interleaved(
    functions: Mapping[Hashable, Callable[[], object]],
    rounds: int,
    inner: int | None = 1,
    *,
    warmup: int = 2,
    min_sample_s: float = 0.005,
    clock: str = "wall",
    device: torch.device | str | None = None,
) -> Timing:
    """Time every function of `functions` in `rounds` interleaved rounds; see `Timing` for what is returned.

    Each function is first called `warmup` times untimed (allocator, caches, lazy initialization). A sample is `inner`
    consecutive calls between two readings of the clock, divided by `inner`; inner=None chooses, per function, as many
    calls as make a sample last `min_sample_s` (at least 1; the call that measures this counts as a warm-up), so that
    the clock's resolution weighs on fast functions no more than on slow ones. Round r calls the functions in their
    order rotated by r. device: synchronized before every reading of the clock (default: the CPU, nothing to wait
    for). clock: a key of `CLOCKS`; "cpu" is used only when device is the CPU, the wall clock otherwise.

    >>> timing = median_interleaved({"sum": lambda: sum(range(100)), "max": lambda: max(range(100))}, rounds=3)
    >>> sorted(timing.median), len(timing.seconds["sum"])
    (['max', 'sum'], 3)
    """
    if not functions:
        raise ValueError("functions must name at least one function to time, got an empty mapping")
    if not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be a positive integer, got {rounds!r}")
    if inner is not None and (not isinstance(inner, int) or inner < 1):
        raise ValueError(f"inner must be a positive integer or None (calibrate), got {inner!r}")
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {sorted(CLOCKS)}, got {clock!r}")
    on_cpu = torch.device("cpu" if device is None else device).type == "cpu"
    now = CLOCKS[clock] if on_cpu else CLOCKS["wall"]

    def sample(function: Callable[[], object], calls: int) -> float:
        synchronize(device)
        start = now()
        for _ in range(calls):
            function()
        synchronize(device)
        return (now() - start) / calls

    for function in functions.values():
        for _ in range(warmup):
            function()
    if inner is None:
        calls = {name: max(1, math.ceil(min_sample_s / max(sample(f, 1), 1e-7))) for name, f in functions.items()}
    else:
        calls = {name: inner for name in functions}
    names = list(functions)
    seconds: dict[Hashable, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            seconds[name].append(sample(functions[name], calls[name]))
    return Timing(seconds, calls)
