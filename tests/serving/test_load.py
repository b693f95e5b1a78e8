"""Bounded load against a real Serve on 127.0.0.1 (the tiny text model), with a stopwatch on each request:

- 10,000 requests at concurrency 32 → no 5xx, no dropped connection;
- the same while one replica's process is killed (by its PID) → at most 1% fail, and within 30 s
  the deployment is back to full strength and every request succeeds;
- a step in load → the autoscaler adds a replica, and removes it once the load is gone;
- more requests than a replica may hold → JSON 503 with Retry-After, then normal service.

The figures each test measured are printed (run with -s to see them).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import httpx
import pytest

pytestmark = pytest.mark.integration

MODEL = "tiny-sentiment"
PREDICT = f"/v1/models/{MODEL}/predict"
BODY = {"inputs": "a calm and steady review of a film"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Load:
    """Requests sent by `concurrency` workers until `total` are done or `stop` is set; (start, end, outcome) each."""

    url: str
    total: int
    concurrency: int
    path: str = PREDICT
    stop: threading.Event = field(default_factory=threading.Event)
    results: list[tuple[float, float, int | str]] = field(default_factory=list)
    started_at: float = 0.0

    def run(self) -> None:
        asyncio.run(self._run())

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, daemon=True)
        thread.start()
        return thread

    async def _run(self) -> None:
        self.started_at = time.monotonic()
        remaining = iter(range(self.total))
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        async with httpx.AsyncClient(base_url=self.url, timeout=30, limits=limits) as client:

            async def worker() -> None:
                for _ in remaining:
                    if self.stop.is_set():
                        return
                    begin = time.monotonic()
                    try:
                        outcome: int | str = (await client.post(self.path, json=BODY)).status_code
                    except httpx.HTTPError as exc:
                        outcome = type(exc).__name__
                    self.results.append((begin, time.monotonic(), outcome))

            await asyncio.gather(*(worker() for _ in range(self.concurrency)))

    def failures(self, since: float = 0.0) -> list[tuple[float, float, int | str]]:
        return [r for r in self.results if r[0] >= since and r[2] != 200]

    def summary(self) -> str:
        took = max(r[1] for r in self.results) - self.started_at
        latencies = sorted(r[1] - r[0] for r in self.results)
        p50, p99 = latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.99)]
        outcomes: dict[int | str, int] = {}
        for r in self.results:
            outcomes[r[2]] = outcomes.get(r[2], 0) + 1
        return (f"{len(self.results)} requests in {took:.1f} s ({len(self.results) / took:.0f} req/s), "
                f"p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, outcomes {outcomes}")


def _replicas(app: str) -> dict[str, int]:
    """Replica states of the app's one deployment, e.g. {"RUNNING": 2}."""
    from ray import serve

    deployments = serve.status().applications[app].deployments
    return dict(next(iter(deployments.values())).replica_states)


def _replica_pids(app: str) -> list[int]:
    """PIDs of the app's live replica actors, from Ray's actor table (the GCS)."""
    from ray._private import state

    return [a["Pid"] for a in state.actors().values()
            if a["State"] == "ALIVE" and a["ActorClassName"].startswith(f"ServeReplica:{app}:")]


@pytest.fixture()
def start(local_ray, tiny_export: Path) -> Iterator:
    """start(settings[, export]) → a running server with the tiny model (or the export given); stopped after the test."""
    from serving import start_server

    servers = []

    def _start(settings, export: Path = tiny_export):
        servers.append(start_server([export], port=_free_port(), settings=settings))
        return servers[-1]

    yield _start
    for server in servers:
        server.shutdown()


@pytest.mark.slow
def test_10k_requests_at_concurrency_32_no_5xx_and_a_killed_replica_costs_under_1_percent(start) -> None:
    from serving import ServeSpec

    server = start(ServeSpec(min_replicas=2, max_replicas=2, num_cpus=0.5, max_batch_size=16))
    load = Load(server.url, total=10_000, concurrency=32)
    load.run()
    print("\nsteady:", load.summary())
    assert not load.failures(), load.summary()

    # Again, killing one of the two replicas once a fifth of the requests are done.
    pids = _replica_pids(MODEL)
    assert len(pids) == 2, pids
    load = Load(server.url, total=10_000, concurrency=32)
    thread = load.start()
    while len(load.results) < 2_000 and thread.is_alive():
        time.sleep(0.05)
    os.kill(pids[0], signal.SIGKILL)
    killed_at = time.monotonic()
    recovered_at = None
    while time.monotonic() - killed_at < 60:
        alive = set(_replica_pids(MODEL)) - {pids[0]}
        if len(alive) == 2 and _replicas(MODEL).get("RUNNING") == 2:
            recovered_at = time.monotonic()
            break
        time.sleep(0.25)
    thread.join()
    failed = load.failures()
    late = [r for r in failed if r[0] > (recovered_at or killed_at) + 1]
    last_failure = max((r[1] - killed_at for r in failed), default=0.0)
    print(f"kill: {load.summary()}; failed {len(failed)} ({len(failed) / len(load.results):.2%}), the last "
          f"{last_failure:.1f} s after the kill; back to 2 running replicas "
          f"{((recovered_at or float('nan')) - killed_at):.1f} s after the kill; failures after that: {len(late)}")
    assert len(load.results) == 10_000
    assert len(failed) <= 100, load.summary()
    assert recovered_at is not None and recovered_at - killed_at <= 30, "no second replica within 30 s"
    assert not late, late[:5]


@pytest.mark.slow
def test_autoscaling_adds_a_replica_under_load_and_removes_it_after(start) -> None:
    from serving import ServeSpec

    server = start(ServeSpec(min_replicas=1, max_replicas=2, num_cpus=0.5, target_ongoing_requests=2,
                             upscale_delay_s=2, downscale_delay_s=5, max_batch_size=8, max_ongoing_requests=16))
    assert _replicas(MODEL) == {"RUNNING": 1}
    load = Load(server.url, total=1_000_000, concurrency=24)
    thread = load.start()
    began, scaled_up_at = time.monotonic(), None
    while time.monotonic() - began < 90:
        if _replicas(MODEL).get("RUNNING") == 2:
            scaled_up_at = time.monotonic()
            break
        time.sleep(0.5)
    time.sleep(5)  # both replicas serving
    load.stop.set()
    thread.join()
    stopped_at = time.monotonic()
    scaled_down_at = None
    while time.monotonic() - stopped_at < 120:
        if _replicas(MODEL) == {"RUNNING": 1}:
            scaled_down_at = time.monotonic()
            break
        time.sleep(0.5)

    def p50(since: float, until: float) -> float:
        window = sorted(r[1] - r[0] for r in load.results if since <= r[0] < until)
        return window[len(window) // 2] * 1000 if window else float("nan")

    up = (scaled_up_at or stopped_at) - began
    print(f"\nautoscaling: {load.summary()}; 2 replicas {up:.1f} s into the load; p50 {p50(began, began + up):.0f} ms "
          f"with 1 replica, {p50(began + up + 2, stopped_at):.0f} ms with 2; back to 1 replica "
          f"{((scaled_down_at or float('nan')) - stopped_at):.1f} s after the load stopped")
    assert scaled_up_at is not None, "no replica added under load"
    assert scaled_down_at is not None, "the added replica was not removed after the load"
    assert not load.failures(), load.summary()


def test_more_requests_than_a_replica_holds_get_json_503_with_retry_after(start, minilm_export: Path) -> None:
    """One replica running 2 and queueing 2 of MiniLM's slow requests: the rest are refused at once."""
    from serving import ServeSpec

    settings = ServeSpec(min_replicas=1, max_replicas=1, num_cpus=1, max_batch_size=1, max_ongoing_requests=2,
                         max_queued_requests=2, retry_after_s=2)
    server = start(settings, minilm_export)
    path = "/v1/models/minilm/predict"
    long_body = {"inputs": ["a long sentence for the model to read slowly " * 12] * 8}
    answers: list[httpx.Response] = []
    go = threading.Barrier(12)

    def ask() -> None:
        with httpx.Client(base_url=server.url, timeout=120) as own:
            go.wait()
            answers.append(own.post(path, json=long_body))

    threads = [threading.Thread(target=ask) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(a.status_code for a in answers)
    print(f"\nbackpressure: {codes}")
    busy = [a for a in answers if a.status_code == 503]
    assert busy and set(codes) <= {200, 503} and codes.count(200) >= 4, codes
    for answer in busy:
        assert answer.headers["retry-after"] == "2"
        assert answer.headers["content-type"].startswith("application/json")
        assert "server busy" in answer.json()["error"]
    with httpx.Client(base_url=server.url, timeout=120) as own:
        assert own.post(path, json={"inputs": "and now it answers"}).status_code == 200


def test_killing_the_only_replica_never_answers_500(start) -> None:
    """The only replica killed: requests wait for Serve's new replica (its proxy stands in) or get a JSON 503;
    HAProxy's own error page is tunefleet's JSON 503, not Ray's plain-text 500. Only requests in flight
    at the kill may lose their connection."""
    from serving import ServeSpec
    from serving.server import HAPROXY_ERROR_PAGE

    server = start(ServeSpec(min_replicas=1, max_replicas=1, num_cpus=0.5, retry_after_s=3))
    [page] = Path(server.state_dir).glob(f"*/{HAPROXY_ERROR_PAGE}")  # one node: its HAProxy's page
    head, _, body = page.read_bytes().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 3" in head, head
    assert "no replica could answer" in json.loads(body)["error"]
    config = (page.parent / "haproxy.cfg").read_text()
    assert f"errorfile 503 {page}" in config and f"errorfile 502 {page}" in config

    with httpx.Client(base_url=server.url, timeout=60) as client:
        assert client.post(PREDICT, json=BODY).status_code == 200
        [pid] = _replica_pids(MODEL)
        os.kill(pid, signal.SIGKILL)
        killed_at, answers = time.monotonic(), []
        while time.monotonic() - killed_at < 60:
            sent = time.monotonic()
            try:
                answer = client.post(PREDICT, json=BODY)
                answers.append((sent, answer.status_code, answer))
            except httpx.TransportError as exc:
                answers.append((sent, type(exc).__name__, None))
                continue
            if answer.status_code == 200 and set(_replica_pids(MODEL)) - {pid}:
                break
            time.sleep(0.05)
    codes = [code for _, code, _ in answers]
    print(f"\nonly replica killed: {len(codes)} requests until a new replica answered "
          f"{time.monotonic() - killed_at:.1f} s after the kill; outcomes {codes[:20]}")
    assert codes[-1] == 200, codes[-10:]
    for sent, code, answer in answers:
        if isinstance(code, str):  # a connection cut: only for what was sent right at the kill
            assert sent - killed_at < 1, (code, sent - killed_at)
        else:
            assert code in (200, 503), (code, answer.text)
            if code == 503:
                assert answer.headers["retry-after"] == "3" and answer.json()["error"]
