"""Connecting to Ray, or starting a private local one in-process.

A local Ray gets its own temp directory and stops with `ray.shutdown()` when
the command ends: it never touches a Ray another user started on the machine.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from typing import Iterator

# Quieter, faster local starts; set before Ray is imported by anything else.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray starts workers at nice 15; on a shared node that lets any other work starve training
# steps and Serve replicas. A private local Ray runs them at normal priority.
os.environ.setdefault("RAY_worker_niceness", "0")

import ray  # noqa: E402


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[None]:
    """Ray for the duration of a command: the given cluster, or a private local one."""
    if ray.is_initialized():
        yield
        return
    if address:
        ray.init(address=address, log_to_driver=True)
        try:
            yield
        finally:
            ray.shutdown()
        return
    # One machine, nothing to preempt: no Ray Train preemption-watcher actor (a process importing Ray
    # Train, ~1 s of CPU on the way to the first step).
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # Short path: Ray's unix sockets live under the temp dir (path length is limited).
    temp_dir = tempfile.mkdtemp(prefix="tfray-", dir="/tmp")
    ray.init(
        num_cpus=num_cpus or os.cpu_count(),
        # On (127.0.0.1, Ray's port or the next free one): Ray's state API needs it, and Ray Train's
        # placement-group cleaner asks it every few seconds, warning in the terminal when it cannot.
        # It starts beside Ray's other processes: no later first step (benchmarks/train_text_classification.py).
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        _temp_dir=temp_dir,
        log_to_driver=True,
        configure_logging=True,
        logging_level="WARNING",
    )
    try:
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
