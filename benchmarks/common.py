"""What the benchmark scripts share: a free port on 127.0.0.1, and stopping a scenario's process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess


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
