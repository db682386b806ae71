"""Benchmark: training forward + backward of bnnotes' BN against PyTorch's native BN.

    python -m bnnotes.bench            # the issue's shapes, on every device present
    python -m bnnotes.bench --quick    # a tiny smoke configuration (seconds)

For every shape and device, one "run" times `inner` training steps (forward, then backward of a fixed non-uniform
upstream gradient) of each implementation; the runs of the two implementations are interleaved, in alternating
order, so that a busy machine slows both alike. Reported: the median time per step of each, and the ratio
bnnotes / native as the median over runs of the ratio within each interleaved pair (below 1: bnnotes is faster). Timings are measurements, never assertions.

``--clock cpu`` times CPU devices by the process's CPU time instead of the wall clock: on a machine shared with other
jobs it is much steadier, because time spent waiting for a core is not counted (with several threads it is their sum).
GPU devices are always timed by the wall clock, after synchronizing.

``--steady-heap`` (glibc only) stops the C allocator from returning freed memory to the system. Without it, whether
an implementation's large temporaries come back as fresh, page-faulted memory depends on the history of
allocations, and either side of the comparison can be slowed by up to 3x from one run to the next.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

import bnnotes
from bnnotes import torch_bn
from bnnotes.timing import median_interleaved

__all__ = ["SHAPES", "QUICK_SHAPES", "Result", "available_devices", "measure", "run", "steady_heap", "main"]

#: The issue's shapes: a fully connected layer's activations and two convolutional feature maps, in float32.
SHAPES: tuple[tuple[int, ...], ...] = ((256, 1024), (64, 64, 32, 32), (32, 256, 14, 14))
QUICK_SHAPES: tuple[tuple[int, ...], ...] = ((64, 32), (8, 16, 8, 8))

_LAYERS = {
    2: (nn.BatchNorm1d, torch_bn.BatchNorm1d),
    3: (nn.BatchNorm1d, torch_bn.BatchNorm1d),
    4: (nn.BatchNorm2d, torch_bn.BatchNorm2d),
    5: (nn.BatchNorm3d, torch_bn.BatchNorm3d),
}


@dataclass(frozen=True)
class Result:
    """Median seconds per training step (forward + backward) of each implementation, and the median paired ratio.

    ratio: the median over runs of (bnnotes time / native time) within each interleaved pair of runs.
    """

    device: str
    shape: tuple[int, ...]
    native_s: float
    bnnotes_s: float
    ratio: float
    runs: int


def available_devices() -> list[str]:
    """cpu always, then cuda and mps where `bnnotes.device` finds them."""
    devices = ["cpu"]
    for name in ("cuda", "mps"):
        try:
            devices.append(bnnotes.device(name).type)
        except ValueError:  # not available here
            pass
    return devices


def steady_heap() -> bool:
    """Ask glibc's malloc to keep freed memory (no trimming, no mmap for blocks under 32 MiB). Returns whether it took.

    This changes the whole process's allocator, so it is for benchmark processes only.
    """
    import ctypes
    import ctypes.util

    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))


def _training_step(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        x.grad = None
        layer.zero_grad(set_to_none=True)
        layer(x).backward(dy)

    return step


def measure(
    shape: Sequence[int], device: str = "cpu", runs: int = 15, inner: int | None = None, seed: int = 0,
    target_run_s: float = 0.02, clock: str = "wall",
) -> Result:
    """Time training steps of ``torch.nn.BatchNorm*d`` and bnnotes' counterpart on one input shape.

    shape: (N, C, *spatial), 2 to 5 dims. runs: interleaved runs per implementation (the median is reported).
    inner: steps per run; by default as many as take about `target_run_s` (at least 1), per implementation.
    clock: "wall" (``time.perf_counter``) or "cpu" (``time.process_time``; used for the CPU device only).
    The timer is `bnnotes.timing.median_interleaved` (2 warm-up steps each, the order rotated every run).
    Returns a `Result`.

    >>> measure((16, 4), runs=3, inner=2).shape
    (16, 4)
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) not in _LAYERS:
        raise ValueError(f"shape must have 2 to 5 dims (N, C, *spatial), got {shape}")
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    if clock not in ("wall", "cpu"):
        raise ValueError(f"clock must be 'wall' or 'cpu', got {clock!r}")
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=generator) * 2.0 + 0.5).to(device).requires_grad_(True)
    dy = torch.randn(shape, generator=generator).to(device)
    native_cls, ours_cls = _LAYERS[len(shape)]
    steps = {
        "native": _training_step(native_cls(shape[1]).to(device), x, dy),
        "bnnotes": _training_step(ours_cls(shape[1]).to(device), x, dy),
    }
    timing = median_interleaved(steps, runs, inner, warmup=2, min_sample_s=target_run_s, clock=clock,
                                device=device)
    median = timing.median
    return Result(device, shape, median["native"], median["bnnotes"], timing.paired_ratio("bnnotes", "native"), runs)


def run(
    shapes: Sequence[Sequence[int]] = SHAPES, devices: Sequence[str] | None = None, runs: int = 15,
    inner: int | None = None, clock: str = "wall", print_fn: Callable[[str], None] | None = print,
) -> list[Result]:
    """Measure every shape on every device (default: all present) and print a table of ratios. Returns the results."""
    devices = available_devices() if devices is None else list(devices)
    results = []
    if print_fn is not None:
        print_fn(f"training forward+backward, float32, median of {runs} interleaved runs, {clock} clock; "
                 f"ratio = bnnotes / native (torch {torch.__version__}, {torch.get_num_threads()} CPU threads)")
        print_fn(f"{'device':<7}{'shape':<20}{'native ms':>11}{'bnnotes ms':>12}{'ratio':>8}")
    for device in devices:
        for shape in shapes:
            result = measure(shape, device, runs=runs, inner=inner, clock=clock)
            results.append(result)
            if print_fn is not None:
                print_fn(f"{device:<7}{str(tuple(shape)):<20}{result.native_s * 1e3:>11.3f}"
                         f"{result.bnnotes_s * 1e3:>12.3f}{result.ratio:>7.2f}x")
    return results


def main(argv: Sequence[str] | None = None) -> list[Result]:
    """Command-line entry point: ``python -m bnnotes.bench [--quick] [--runs N] [--device D] [--threads T]
    [--clock {wall,cpu}] [--steady-heap]``.

    Returns the list of `Result`s it printed.
    """
    parser = argparse.ArgumentParser(prog="python -m bnnotes.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes and few runs: a smoke test in seconds")
    parser.add_argument("--runs", type=int, default=None, help="interleaved runs per implementation (default 15)")
    parser.add_argument("--device", action="append", choices=["cpu", "cuda", "mps"],
                        help="device to measure (repeatable; default: every device present)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="time CPU runs by the wall clock (default) or by the process's CPU time")
    parser.add_argument("--steady-heap", action="store_true",
                        help="glibc: keep freed memory, so page faults do not depend on allocation history")
    args = parser.parse_args(argv)
    if args.steady_heap and not steady_heap():
        print("--steady-heap: glibc's mallopt is not available here; measuring with the default allocator")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    runs = args.runs if args.runs is not None else (3 if args.quick else 15)
    return run(shapes, args.device, runs=runs, inner=2 if args.quick else None, clock=args.clock)


if __name__ == "__main__":
    main()
