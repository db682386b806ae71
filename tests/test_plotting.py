"""Tests of bnnotes.plotting: the helpers that the chapters' figures rely on."""

from __future__ import annotations

import pytest

from bnnotes import plotting


def test_log_ticks_labels_only_the_given_ticks():
    fig, (ax,) = plotting.subplots()
    ax.set(xscale="log", xlim=(0.2, 8))
    plotting.log_ticks(ax, "x", [0.3, 1, 3])
    fig.canvas.draw()
    assert [label.get_text() for label in ax.get_xticklabels()] == ["0.3", "1", "3"]
    assert all(not label.get_text() for label in ax.xaxis.get_minorticklabels())
    with pytest.raises(ValueError, match="positive"):
        plotting.log_ticks(ax, "x", [0, 1])
    with pytest.raises(ValueError, match="'x' or 'y'"):
        plotting.log_ticks(ax, "z", [1])
