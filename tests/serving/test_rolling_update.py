"""A rolling update under load: a new export deployed over a running 2-replica model drops nothing."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_new_export_rolls_out_without_a_failed_request(local_ray, tiny_export: Path, tmp_path: Path):
    from serving import ServeSpec, start_server
    from training.layout import read_export_info, write_export_info

    # Version 2: the same model retrained (here: a copy with new metrics), as `tunefleet train` writes it.
    second = tmp_path / "export-v2"
    shutil.copytree(tiny_export, second)
    write_export_info(second, read_export_info(tiny_export).model_copy(update={"metrics": {"accuracy": 0.99}}))
    settings = ServeSpec(min_replicas=2, max_replicas=2, num_cpus=0.5, graceful_shutdown_timeout_s=20)
    port = _free_port()
    server = start_server([tiny_export], names=["m"], port=port, settings=settings)
    statuses: list[int] = []
    stop = threading.Event()
    update = None

    def load() -> None:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            while not stop.is_set():
                try:
                    statuses.append(client.post("/v1/models/m/predict", json={"inputs": "a fine film"}).status_code)
                except httpx.TransportError:
                    statuses.append(0)  # a dropped connection counts as a failure

    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            before = client.get("/v1/models").json()["models"][0]["version"]
        threads = [threading.Thread(target=load) for _ in range(4)]
        for thread in threads:
            thread.start()
        time.sleep(3)
        update = start_server([second], names=["m"], port=port, settings=settings)  # Serve replaces replicas one by one
        time.sleep(5)
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        with httpx.Client(base_url=server.url, timeout=30) as client:
            after = client.get("/v1/models").json()["models"][0]["version"]
    finally:
        stop.set()
        server.shutdown()
        if update is not None:
            update.shutdown()  # Serve is gone already; this removes the update's own HAProxy folder from /tmp
    assert after != before, "the new export was not deployed"
    assert not [d for d in (server.state_dir, update.state_dir) if os.path.exists(d)], "HAProxy folders left in /tmp"
    failed = [s for s in statuses if s != 200]
    assert len(statuses) > 50 and not failed, f"{len(failed)} of {len(statuses)} requests failed: {sorted(set(failed))}"
