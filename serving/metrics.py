"""Prometheus metrics per model, recorded through Ray's metrics so every replica on every node counts.

    tunefleet_requests_total{model, route, method, code}      requests answered, by HTTP status
    tunefleet_errors_total{model, code}                       requests answered with a 4xx or 5xx
    tunefleet_request_duration_seconds{model, route, method}  latency histogram (body read to last byte)
    tunefleet_batch_size{model}                               inputs per forward pass (dynamic batching)

Ray exports them (prefixed `ray_`, with its deployment/replica/worker labels) on each node's metrics
port, the one a Prometheus scraping a Ray cluster already reads. `GET /metrics` on the server gathers
the `ray_tunefleet_*` families from every node into one Prometheus text page, for a scraper that
only knows the serving address. Ray forwards a replica's metrics every few seconds, so a count can
lag by that much.

Labels stay bounded whatever clients send: `route` is the matched route's template (`/predict`),
never the raw path, and `model` is a served name or "" (the root application's own routes).
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import httpx

LATENCY_BOUNDS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]
BATCH_BOUNDS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
PREFIX = "ray_tunefleet_"  # as Ray names them on its metrics port
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_SCRAPE_TIMEOUT_S = 5


class ModelMetrics:
    """The four metrics of one application (a model's, or the root's with model="")."""

    def __init__(self, model: str) -> None:
        from ray.serve import metrics  # adds Serve's deployment / replica / application labels

        self.tags = {"model": model}
        self.requests = metrics.Counter(
            "tunefleet_requests_total", "Requests answered, by model, route and HTTP status.",
            tag_keys=("model", "route", "method", "code"))
        self.errors = metrics.Counter(
            "tunefleet_errors_total", "Requests answered with a 4xx or 5xx status, by model and status.",
            tag_keys=("model", "code"))
        self.latency = metrics.Histogram(
            "tunefleet_request_duration_seconds", "Time from a request's arrival to its last response byte.",
            boundaries=LATENCY_BOUNDS_S, tag_keys=("model", "route", "method"))
        self.batch = metrics.Histogram(
            "tunefleet_batch_size", "Inputs in one forward pass of the model (dynamic batching).",
            boundaries=BATCH_BOUNDS, tag_keys=("model",))

    def request(self, route: str, method: str, status: int, seconds: float) -> None:
        tags = {**self.tags, "route": route, "method": method}
        self.requests.inc(tags={**tags, "code": str(status)})
        self.latency.observe(seconds, tags=tags)
        if status >= 400:
            self.errors.inc(tags={**self.tags, "code": str(status)})

    def batch_size(self, size: int) -> None:
        self.batch.observe(size, tags=self.tags)


@functools.cache
def model_metrics(model: str) -> ModelMetrics:
    """One set per model per process: the guard counts requests, the deployment its batches."""
    return ModelMetrics(model)


def _metrics_endpoints() -> list[str]:
    import ray

    return [f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
            for node in ray.nodes() if node.get("Alive") and node.get("MetricsExportPort")]


def merge_families(pages: list[str], prefix: str = PREFIX) -> str:
    """The families named `prefix*` from several Prometheus text pages, each family's HELP/TYPE once."""
    families: dict[str, dict[str, Any]] = {}
    for page in pages:
        current: dict[str, Any] | None = None
        for line in page.splitlines():
            if line.startswith("# HELP ") or line.startswith("# TYPE "):
                name = line.split(" ", 3)[2]
                current = families.setdefault(name, {"help": None, "type": None, "samples": []}) \
                    if name.startswith(prefix) else None
                if current is not None:
                    current["help" if line.startswith("# HELP") else "type"] = line
            elif line and not line.startswith("#") and current is not None and line.startswith(prefix):
                current["samples"].append(line)
    out = []
    for name in sorted(families):
        family = families[name]
        out += [line for line in (family["help"], family["type"]) if line]
        out += family["samples"]
    return "\n".join(out) + "\n" if out else ""


async def gather_metrics() -> str:
    """Every node's tunefleet families as one Prometheus text page (raises RuntimeError with no metrics port)."""
    endpoints = await asyncio.to_thread(_metrics_endpoints)
    if not endpoints:
        raise RuntimeError("no Ray node exports metrics (Ray's metrics agent comes with ray[default])")
    async with httpx.AsyncClient(timeout=_SCRAPE_TIMEOUT_S) as client:
        answers = await asyncio.gather(*(client.get(url) for url in endpoints), return_exceptions=True)
    pages = [a.text for a in answers if isinstance(a, httpx.Response) and a.status_code == 200]
    if not pages:
        raise RuntimeError(f"no Ray metrics port answered ({', '.join(endpoints)})")
    return merge_families(pages)
