"""Running one function in several processes that form a ``torch.distributed`` group, on one machine.

- `launch` runs ``worker(rank, world_size, *args)`` in `world_size` fresh processes that form a gloo process group over
  the loopback interface (`loopback_interface`), and returns what each rank returned. It cleans up after itself: on an
  error or a timeout every process is terminated, and every process is joined.
- `recorded_collectives` records the all-reduces and all-gathers made inside a block (what `bnnotes.sync` sends).

The data-parallel chapter's experiments (`bnnotes.experiments.data_parallel`) and the tests of `bnnotes.sync` use them.
Spawned processes import the function they run by its module, so workers live in modules, never in a notebook or
``__main__``.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import queue
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from bnnotes import notebook

__all__ = ["launch", "loopback_interface", "recorded_collectives"]


def loopback_interface() -> str | None:
    """The loopback interface's name ("lo" on Linux, "lo0" on macOS), for gloo's GLOO_SOCKET_IFNAME; None if unknown.

    >>> loopback_interface() in ("lo", "lo0", None)
    True
    """
    try:
        names = {name for _, name in socket.if_nameindex()}
    except (AttributeError, OSError):
        return None
    return next((name for name in ("lo", "lo0") if name in names), None)


def _run_rank(
    rank: int,
    world_size: int,
    port: int,
    worker: Callable[..., Any],
    args: tuple,
    threads: int,
    timeout: float,
    results: Any,
) -> None:
    """The body of one spawned process: join the group, run `worker`, report (rank, ok, payload) on `results`."""
    os.environ.pop("BNNOTES_PROGRESS", None)  # a rank's output does not reach the notebook; the parent reports
    interface = loopback_interface()
    if interface is not None:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", interface)  # keep gloo's traffic on the loopback interface
    torch.set_num_threads(threads)
    try:
        store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False, timeout=timedelta(seconds=timeout))
        dist.init_process_group(
            "gloo", store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout)
        )
        value = worker(rank, world_size, *args)
        # Plain pickle copies tensors by value; torch's multiprocessing reducers would share memory with a process
        # that is about to exit.
        results.put((rank, True, pickle.dumps(value)))
    except BaseException:  # report everything, including KeyboardInterrupt, so the parent can stop the others
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    results.close()
    results.join_thread()  # the report is in the pipe
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip the interpreter's teardown, which took seconds here after DDP and gloo had run, for nothing: the report
    # is delivered and the process group destroyed.
    os._exit(0)


def launch(
    worker: Callable[..., Any], world_size: int, args: Sequence[Any] = (), timeout: float = 120.0, threads: int = 1
) -> list[Any]:
    """Run ``worker(rank, world_size, *args)`` in `world_size` new processes joined in a gloo process group.

    The processes are started with the ``spawn`` method and rendezvous at a TCP store that this process serves on
    127.0.0.1, at a port the operating system picks (binding port 0), so no port can be taken by someone else between
    choosing and binding it; gloo is pointed at the loopback interface, so nothing listens beyond it.
    worker: a function defined at the top level of an importable module (the children import it by name).
    timeout: seconds for the whole run and for every collective. threads: torch threads per process.
    Returns the list of the ranks' return values (rank order). A failing rank raises RuntimeError with its traceback;
    a run past `timeout` raises TimeoutError. Either way, and on success, every process is joined, and terminated
    first if it is still running.

    Example: with ``def rank_sum(rank, world_size): t = torch.tensor([rank]); dist.all_reduce(t); return t.item()``
    in an importable module, ``launch(rank_sum, 3)`` returns ``[3, 3, 3]``.
    """
    _check_worker(worker, world_size)
    store = _rendezvous_store(timeout)
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    processes = [
        context.Process(
            target=_run_rank,
            args=(rank, world_size, store.port, worker, tuple(args), threads, timeout, results),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    deadline = time.monotonic() + timeout
    try:
        for process in processes:
            process.start()
        outcomes = _collect(worker, processes, results, deadline, timeout)
        for process in processes:
            process.join(max(deadline - time.monotonic(), 5.0))
        return [outcomes[rank] for rank in range(world_size)]
    finally:
        _stop(processes)
        results.close()
        results.cancel_join_thread()
        del store


def _check_worker(worker: Any, world_size: Any) -> None:
    if not callable(worker):
        raise TypeError(f"worker must be a callable, got {type(worker).__name__}")
    if getattr(worker, "__module__", "__main__") == "__main__" or "<" in getattr(worker, "__qualname__", "<"):
        raise ValueError(
            f"worker {getattr(worker, '__qualname__', worker)!r} must be a top-level function of an importable "
            "module: spawned processes import it by name, and cannot import __main__ (a notebook or script)"
        )
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")


def _rendezvous_store(timeout: float) -> dist.TCPStore:
    """The master TCP store, listening on 127.0.0.1 only, at a port the operating system picks."""
    # The rendezvous server listens on a socket bound to 127.0.0.1 only (TCPStore's own would listen on every
    # interface); the store takes the socket over and closes it.
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    # use_libuv=False: the libuv backend, the default from torch 2.4, cannot take over a listening socket before 2.8
    # ("The libuv TCPStore backend does not support initialization with an listen fd", measured on 2.7.1); the
    # classic backend can, on every torch from 2.2 to 2.13.
    # The classic backend checks that the socket is bound to the port it is given, so it gets the bound one.
    port = listener.getsockname()[1]
    return dist.TCPStore("127.0.0.1", port, None, is_master=True, wait_for_workers=False,
                         timeout=timedelta(seconds=timeout), master_listen_fd=listener.detach(), use_libuv=False)


def _collect(worker: Callable[..., Any], processes: list[Any], results: Any, deadline: float,
             timeout: float) -> dict[int, Any]:
    """Every rank's return value, by rank; raises on the first failure, a silent exit, or the deadline."""
    world_size = len(processes)
    outcomes: dict[int, Any] = {}
    started = time.monotonic()
    while len(outcomes) < world_size:
        # The Colab edition's progress (BNNOTES_PROGRESS): the ranks' own output does not reach the notebook.
        notebook.heartbeat(lambda runs: f"{worker.__name__}: {len(outcomes)} of {world_size} ranks done, "
                                        f"{time.monotonic() - started:.0f} s into this launch")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"the {world_size} ranks did not finish within {timeout} s")
        try:
            rank, ok, payload = results.get(timeout=min(remaining, 1.0))
        except queue.Empty:
            silent = [r for r, p in enumerate(processes) if p.exitcode is not None and r not in outcomes]
            if silent:
                codes = [processes[r].exitcode for r in silent]
                raise RuntimeError(
                    f"rank(s) {silent} exited (exit codes {codes}) without reporting a result; their standard "
                    "error says why (spawn cannot start processes from a parent that reads its script from stdin)"
                )
            continue
        if not ok:
            raise RuntimeError(_failure_report(rank, payload, results, len(outcomes), world_size))
        outcomes[rank] = pickle.loads(payload)
    return outcomes


def _failure_report(rank: int, payload: str, results: Any, finished: int, world_size: int) -> str:
    """The tracebacks of the failed ranks, in rank order."""
    # The first report may be a rank that lost its peer ("Connection closed by peer"); wait briefly for the others,
    # so the rank that failed first is in the message too.
    failures = {rank: payload}
    grace = time.monotonic() + 3.0
    while len(failures) + finished < world_size and time.monotonic() < grace:
        try:
            other, other_ok, other_payload = results.get(timeout=max(grace - time.monotonic(), 0.01))
        except queue.Empty:
            break
        if not other_ok:
            failures[other] = other_payload
    return "\n".join(f"rank {failed} of {world_size} failed:\n{failures[failed]}" for failed in sorted(failures))


def _stop(processes: list[Any]) -> None:
    """Terminate the processes still running, then join every started one (kill what does not stop in 5 s)."""
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        if process.pid is None:
            continue  # never started
        process.join(5.0)
        if process.is_alive():
            process.kill()
            process.join()


@contextmanager
def recorded_collectives() -> Iterator[list[tuple[str, int]]]:
    """Record every ``torch.distributed.all_reduce`` and ``all_gather`` called inside the block.

    Yields the list that ``(name, elements this rank sends)`` pairs are appended to, in call order. `SyncBatchNorm`
    calls both by those names, so its messages are all recorded; DistributedDataParallel's gradient all-reduces run
    in C++ and are not.
    """
    calls: list[tuple[str, int]] = []
    originals = {"all_reduce": dist.all_reduce, "all_gather": dist.all_gather}

    def recording(name: str) -> Callable[..., Any]:
        def collective(*args: Any, **kwargs: Any) -> Any:
            sent = args[0] if name == "all_reduce" else args[1]  # all_gather(tensor_list, tensor, ...)
            calls.append((name, sent.numel()))
            return originals[name](*args, **kwargs)

        return collective

    for name in originals:
        setattr(dist, name, recording(name))
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)
