"""Connecting to Ray, or starting a private local one in-process.

A local Ray gets its own temp directory and stops with `ray.shutdown()` when
the command ends: it never touches a Ray another user started on the machine.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager
from typing import Iterator

# Quieter, faster local starts; set before Ray is imported by anything else.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray starts workers at nice 15; on a shared node that lets any other work starve training
# steps and Serve replicas. A private local Ray runs them at normal priority.
os.environ.setdefault("RAY_worker_niceness", "0")

import ray  # noqa: E402


# Loggers whose warnings mean nothing on a private local Ray (no dashboard, so no state API).
_QUIET_ON_LOCAL_RAY = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)


def quiet_worker_logs() -> None:
    """Ray's worker_process_setup_hook for the private local Ray: runs in each worker as it starts."""
    import logging

    for name in _QUIET_ON_LOCAL_RAY:
        logging.getLogger(name).setLevel(logging.ERROR)


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
    # Nor the idle worker processes Ray starts for a new driver (one per CPU): Ray Train's and Serve's
    # actors never run in them (their runtime environments differ), and on a small machine they take
    # CPU from the controller starting beside them.
    os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
    # Short path: Ray's unix sockets live under the temp dir (path length is limited).
    temp_dir = tempfile.mkdtemp(prefix="tfray-", dir="/tmp")
    try:  # a Ray that fails to start (a bad token, a port taken) leaves nothing of its own behind either
        ray.init(
            num_cpus=num_cpus or os.cpu_count(),
            # Off: its processes cost training ~2.5% on 2 cores (docs/performance.md). Without it Ray's
            # state API is down, and Ray Train's placement-group cleaner (which asks it whether the
            # controller lives) would warn in the terminal every few seconds: every worker quiets that logger.
            include_dashboard=False,
            runtime_env={"worker_process_setup_hook": "cluster.runtime.quiet_worker_logs"},
            _temp_dir=temp_dir,
            log_to_driver=True,
            configure_logging=True,
            logging_level="WARNING",
        )
        with _sigterm_as_exit():
            yield
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signal.SIGTERM)


@contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """SIGTERM (`kill`, `timeout`, a process supervisor) ends the command through its finally blocks, as
    Ctrl-C does, so the private Ray stops and its temp dir goes. The handler ray.init installs for the
    driver logs a stack and kills the process on the spot, which left /tmp/tfray-* behind."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
