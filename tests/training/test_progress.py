"""Rank 0's progress: a bar on a terminal, a plain line per logged step and evaluation in a log, nothing when asked."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys

import pytest

from training.progress import RAY_REPORT_LINES, progress, quiet_ray_report_lines
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
    shown = progress(0, 63, 20, "sst2", "lines")  # resumed at step 20
    for _ in range(10):
        shown.advance()
    shown.logged(0.6896)
    shown.close()
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith("sst2: step 30/63 (47%), loss 0.6896, ") and line.endswith(" steps/s")


def test_lines_say_each_evaluation_selection_metric_first(capsys):
    shown = progress(0, 96, 0, "bees", "lines")
    shown.advance(16)
    shown.evaluated({"eval_loss": 0.32872, "accuracy": 0.90196, "macro_f1": 0.90113}, "accuracy", best=True)
    shown.advance(16)
    shown.evaluated({"eval_loss": 0.4, "accuracy": 0.8, "macro_f1": 0.79}, "accuracy", best=False)
    assert capsys.readouterr().out.splitlines() == [
        "bees: evaluation at step 16/96: accuracy 0.9020, eval_loss 0.3287, macro_f1 0.9011 (best so far)",
        "bees: evaluation at step 32/96: accuracy 0.8000, eval_loss 0.4000, macro_f1 0.7900",
    ]
    assert shown.summary() == "accuracy 0.8000"  # what a bar shows beside the loss
    shown.evaluated({"perplexity": 44.37862, "eval_tokens": 2040, "eval_loss": 3.79281}, "perplexity", best=True)
    assert capsys.readouterr().out.splitlines() == [  # a count reads as a count, not 2040.0000
        "bees: evaluation at step 32/96: perplexity 44.3786, eval_tokens 2040, eval_loss 3.7928 (best so far)"]


def test_ray_report_lines_leave_the_console_only(capsys):
    """Ray Train's per-report lines repeat the evaluation line; the console drops them, a file keeps them."""
    logger = logging.getLogger("ray.train.tests-progress")
    console, kept = logging.StreamHandler(io.StringIO()), []
    file = logging.Handler()
    file.emit = lambda record: kept.append(record.getMessage())
    ray_train = logging.getLogger("ray.train")
    for handler in (console, file):
        ray_train.addHandler(handler)
    try:
        quiet_ray_report_lines()
        quiet_ray_report_lines()  # once per handler, however often a worker asks
        assert len(console.filters) == 1
        logger.warning("Reporting training result 3: TrainingReport(metrics={...}) from rank 0")
        logger.warning("Checkpoint successfully created at: Checkpoint(filesystem=local, path=/x)")
        logger.warning("Started training worker group of size 2")
    finally:
        for handler in (console, file):
            ray_train.removeHandler(handler)
    assert console.stream.getvalue().splitlines() == ["Started training worker group of size 2"]
    assert len(kept) == 3 and kept[0].startswith(RAY_REPORT_LINES)


def test_other_ranks_and_off_print_nothing(capsys):
    for shown in (progress(1, 10, 0, "x", "lines"), progress(0, 10, 0, "x", "off")):
        shown.advance()
        shown.logged(1.0)
        shown.evaluated({"accuracy": 1.0}, "accuracy", best=True)
    assert capsys.readouterr().out == ""


def test_library_bars_go_quiet_for_a_log_but_a_users_choice_stands():
    code = ("import datasets, transformers\n"
            "from huggingface_hub.utils import are_progress_bars_disabled\n"
            "from transformers.utils import logging\n"
            "from training.progress import quiet_library_bars\n"
            "quiet_library_bars()\n"
            "print(logging.is_progress_bar_enabled(), are_progress_bars_disabled(), datasets.is_progress_bar_enabled())")
    env = {k: v for k, v in os.environ.items() if not k.endswith("_DISABLE_PROGRESS_BARS")}
    quiet = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert quiet.stdout.split() == ["False", "True", "False"]
    kept = subprocess.run([sys.executable, "-c", code], env={**env, "HF_DATASETS_DISABLE_PROGRESS_BARS": "0"},
                          capture_output=True, text=True, check=True)
    assert kept.stdout.split() == ["False", "True", "True"]
