"""Shared test fixtures: the devices to parametrize over, and a float64 default for exact comparisons."""

from __future__ import annotations

import pytest
import torch


def _available_devices() -> list:
    """cpu always; cuda and mps where present. cuda tests carry the `cuda` marker, so `-m "not cuda"` deselects them."""
    devices = [pytest.param("cpu", id="cpu")]
    devices.append(
        pytest.param(
            "cuda",
            id="cuda",
            marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")],
        )
    )
    if torch.backends.mps.is_available():
        devices.append(pytest.param("mps", id="mps"))
    return devices


#: Use as ``@pytest.mark.parametrize("device", DEVICES)``: cpu, cuda (skipped without a GPU) and mps where present.
DEVICES = _available_devices()


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """A torch.device, once per entry of DEVICES (cuda is skipped where there is no GPU)."""
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _single_thread_torch():
    """Tests run on a shared 2-core machine: one intra-op thread keeps them fast and predictable."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Helpers of the exercise-checker tests (tests/test_exercises*.py).


def fails_with(checker, fn, *hint_parts: str) -> str:
    """Run `checker` on a wrong `fn`; it must raise AssertionError whose message contains every hint part."""
    with pytest.raises(AssertionError) as failure:
        checker(fn)
    message = str(failure.value)
    assert "failed on case" in message, message
    for part in hint_parts:
        assert part in message, f"expected {part!r} in the message:\n{message}"
    return message


def passes(checker, fn, capsys) -> None:
    checker(fn)
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and checker.__name__ in out[0] and "match the reference" in out[0], out
