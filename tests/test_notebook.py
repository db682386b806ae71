"""Tests of bnnotes.notebook: glue, progress and heartbeat are silent in the book and speak in the Colab edition."""

from __future__ import annotations

import pytest

from bnnotes import notebook


def test_glue_prints_only_when_asked(monkeypatch, capsys):
    monkeypatch.delenv("BNNOTES_SHOW_GLUE", raising=False)
    assert notebook.glue("chapter_ratio", 2.5) == 2.5
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("BNNOTES_SHOW_GLUE", "1")
    notebook.glue("chapter_ratio", 2.5)
    assert capsys.readouterr().out == "chapter_ratio = 2.5\n"
    with pytest.raises(ValueError, match="Python identifier"):
        notebook.glue("not a name", 1)


@pytest.mark.parametrize("value, enabled", [(None, False), ("", False), ("0", False), ("1", True)])
def test_progress_follows_the_environment(monkeypatch, capsys, value, enabled):
    if value is None:
        monkeypatch.delenv("BNNOTES_PROGRESS", raising=False)
    else:
        monkeypatch.setenv("BNNOTES_PROGRESS", value)
    assert list(notebook.progress(["a", "b"], "seeds")) == ["a", "b"]
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" (")[0] for line in lines] == (["seeds: 1/2", "seeds: 2/2"] if enabled else [])


def test_heartbeat_throttles_counts_runs_and_restarts_per_cell(monkeypatch, capsys):
    monkeypatch.setenv("BNNOTES_PROGRESS", "1")
    clock = iter([0.0, 1.0, 2.0, 6.0, 7.0, 20.0]).__next__
    monkeypatch.setattr(notebook.time, "perf_counter", clock)
    cells = iter([1, 1, 1, 1, 2]).__next__
    monkeypatch.setattr(notebook, "_cell_number", cells)
    beat = notebook.Heartbeat(every=5.0)  # clock 0.0
    beat(lambda runs: f"run {runs}", new_run=True)  # 1.0: new cell, first run, nothing due yet
    beat(lambda runs: f"run {runs}", new_run=True)  # 2.0
    beat(lambda runs: f"run {runs}")  # 6.0: 5 s after the cell's start: a line
    beat(lambda runs: f"run {runs}")  # 7.0: too soon
    beat(lambda runs: f"run {runs}", new_run=True)  # 20.0: a new cell restarts the clock and the count
    assert capsys.readouterr().out.splitlines() == ["run 2 (5 s)"]


def test_heartbeat_is_silent_in_the_book(monkeypatch, capsys):
    monkeypatch.delenv("BNNOTES_PROGRESS", raising=False)
    called = []
    notebook.Heartbeat(every=0.0)(lambda runs: called.append(runs) or "x", new_run=True)
    assert called == [] and capsys.readouterr().out == ""
