"""What the benchmark scripts share: a free port on 127.0.0.1, stopping a scenario's process, AG News texts,
a working folder that goes when the run ends."""

from __future__ import annotations

import csv
import itertools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

AG_NEWS_TEST = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "ag_news" / "test.csv"


def ag_news_texts(limit: int) -> list[str]:
    """The first LIMIT AG News test texts (title + description), in the file's order: real traffic's mixed lengths."""
    if not AG_NEWS_TEST.exists():
        raise SystemExit(f"{AG_NEWS_TEST} not found: run from a checkout with ../shared beside it")
    with AG_NEWS_TEST.open(newline="", encoding="utf-8") as f:
        return [f"{title} {description}" for _, title, description in itertools.islice(csv.reader(f), limit)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_scenario(proc: subprocess.Popen, timeout_s: float = 120) -> None:
    """SIGTERM (a server drains and shuts Ray down), then SIGKILL to its whole session if it hangs.
    The process was started with start_new_session=True: its group is its own, nothing else's."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    """A working folder in the temp dir for one benchmark run (its data splits, exports, run directories),
    removed when the run ends, failed or interrupted included: they are hundreds of MB a run."""
    directory = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)
