"""Rank 0's progress: a bar on a terminal, a plain line per logged step in a log, nothing when asked."""

from __future__ import annotations

import io

import pytest

from training.loop import _progress
from training.run import progress_style


class _Stdout(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize("tty, env, expected", [
    (True, {}, "bar"),
    (False, {}, "lines"),
    (True, {"TUNEFLEET_NO_PROGRESS": "1"}, "off"),
    (False, {"TUNEFLEET_PROGRESS": "bar"}, "bar"),
    (True, {"TUNEFLEET_PROGRESS": "Lines"}, "lines"),
    (False, {"TUNEFLEET_NO_PROGRESS": "1", "TUNEFLEET_PROGRESS": "lines"}, "lines"),  # the named style wins
])
def test_style_follows_the_terminal_unless_told(monkeypatch, tty, env, expected):
    monkeypatch.delenv("TUNEFLEET_PROGRESS", raising=False)
    monkeypatch.delenv("TUNEFLEET_NO_PROGRESS", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr("sys.stdout", _Stdout(tty))
    assert progress_style() == expected


def test_lines_say_the_step_the_loss_and_the_rate(monkeypatch, capsys):
    monkeypatch.setenv("TUNEFLEET_NO_PROGRESS", "1")  # the worker follows the driver's choice, not its own env
    progress = _progress(0, 63, 20, "sst2", "lines")  # resumed at step 20
    for _ in range(10):
        progress.update(1)
    progress.set_description("sst2 loss 0.6896")
    progress.close()
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith("sst2: step 30/63 (47%), loss 0.6896, ") and line.endswith(" steps/s")


def test_other_ranks_and_off_print_nothing(capsys):
    for progress in (_progress(1, 10, 0, "x", "lines"), _progress(0, 10, 0, "x", "off")):
        progress.update(1)
        progress.set_description("x loss 1.0")
    assert capsys.readouterr().out == ""
