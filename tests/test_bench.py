"""The benchmark runs and reports ratios (a smoke test: timings are measurements, never asserted)."""

from __future__ import annotations

import pytest

from bnnotes import bench


def test_quick_benchmark_runs_and_prints_a_ratio_per_shape_and_device(capsys):
    results = bench.main(["--quick", "--device", "cpu", "--runs", "2"])
    assert [r.shape for r in results] == list(bench.QUICK_SHAPES)
    assert all(r.device == "cpu" and r.native_s > 0 and r.bnnotes_s > 0 and r.ratio > 0 for r in results)
    lines = capsys.readouterr().out.splitlines()
    assert "ratio = bnnotes / native" in lines[0]
    for shape in bench.QUICK_SHAPES:
        row = next(line for line in lines if line.startswith("cpu") and str(shape) in line)
        assert row.rstrip().endswith("x")


def test_measure_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"shape must have 2 to 5 dims .* got \(4,\)"):
        bench.measure((4,))
    with pytest.raises(ValueError, match=r"clock must be 'wall' or 'cpu', got 'gpu'"):
        bench.measure((4, 2), clock="gpu")
