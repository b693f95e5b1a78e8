"""`tunefleet serve` as a process: it answers, then stops on SIGINT, whenever the signal comes, and leaves
no Ray of its own behind. Started with SIGINT ignored, as a shell's background job or a script's child
(`cmd &`, the README's quickstart run by CI) receives it."""

from __future__ import annotations

import glob
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    def __init__(self, export: Path) -> None:
        self.port = _free_port()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cluster.cli", "serve", str(export), "--port", str(self.port)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
        )
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)

    def wait_for(self, text: str, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while not any(text in line for line in self.lines):
            assert self.process.poll() is None, "tunefleet serve ended:\n" + "".join(self.lines)
            assert time.monotonic() < deadline, f"no {text!r} within {timeout_s:.0f} s:\n" + "".join(self.lines)
            time.sleep(0.1)

    def ray_temp_dir(self) -> str:
        """The private Ray's temp dir: its session directory is named after the driver's pid."""
        found = glob.glob(f"/tmp/tfray-*/session_*_{self.process.pid}")
        assert found, "no private Ray session for the serve process"
        return str(Path(found[0]).parent)

    def stop(self, timeout_s: float = 90) -> int:
        self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            pytest.fail(f"tunefleet serve still ran {timeout_s:.0f} s after SIGINT:\n" + "".join(self.lines))
        finally:
            time.sleep(1)  # the reader thread takes the last lines


def _left_behind(temp_dir: str) -> list[str]:
    processes = []
    for process in psutil.process_iter(["cmdline"]):
        if any(temp_dir in part for part in process.info["cmdline"] or []):
            processes.append(" ".join(process.info["cmdline"])[:120])
    return processes + ([temp_dir] if Path(temp_dir).exists() else [])


def test_serve_answers_then_sigint_drains_and_cleans_up(tiny_export: Path) -> None:
    server = ServeProcess(tiny_export)
    try:
        server.wait_for("tunefleet serving 1 models")
        temp_dir = server.ray_temp_dir()
        answer = httpx.post(f"http://127.0.0.1:{server.port}/v1/models/tiny-sentiment/predict", json={"inputs": "fine"},
                            timeout=30)
        assert answer.status_code == 200 and answer.json()["model"] == "tiny-sentiment"
        hf = httpx.post(f"http://127.0.0.1:{server.port}/v1/models/tiny-sentiment", json={"inputs": "fine"}, timeout=30)
        assert hf.status_code == 200 and hf.json() == answer.json()["predictions"], hf.text  # the Inference API's shape
    finally:
        code = server.stop()
    assert code == 0, "".join(server.lines)
    assert any("answers as a Hugging Face Inference Endpoint" in line for line in server.lines)
    assert any("draining in-flight requests" in line for line in server.lines)
    assert not _left_behind(temp_dir)


def test_sigint_while_starting_stops_the_start(tiny_export: Path) -> None:
    server = ServeProcess(tiny_export)
    server.wait_for("Started Serve")  # Serve's controller runs; the model's replica is still loading
    temp_dir = server.ray_temp_dir()
    code = server.stop()
    output = "".join(server.lines)
    assert code == 130, output
    assert "stopped while starting" in output and "tunefleet serving" not in output
    assert not _left_behind(temp_dir)
