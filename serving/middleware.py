"""What every request meets before a route: CORS, auth, admission (backpressure), a body limit and a
timeout; and after it: one JSON access-log line and the Prometheus metrics (serving/metrics.py).

    install_guard(api, spec, model="sst2")     # a model's FastAPI app (serving/app.py)
    install_guard(api, spec, model="", admission=False)   # the root app: answers from memory

In the order a request meets them (each refusal is a JSON `{"error", "detail"}` body, as errors.py):

    CORS          off unless `cors_origins`; preflights are answered here, before auth
    auth          401 + WWW-Authenticate without `Authorization: Bearer <token>` (serving/auth.py);
                  /healthz stays open
    admission     503 + Retry-After once `max_ongoing_requests` run and `max_queued_requests` wait
    body limit    413 past `max_body_bytes`: from Content-Length, or counted as the body arrives,
                  always before anything parses it
    timeout       504 when no response has started within `request_timeout_s`

Why admission lives here and not only in Ray Serve: Serve's own `max_queued_requests` answers a
plain-text 503 that the client cannot parse like every other error. So Serve lets in twice
`max_ongoing_requests + max_queued_requests` per replica (serving/app.py), and this layer keeps the
split: `max_ongoing_requests` run, `max_queued_requests` wait, the overflow gets a JSON 503 at once.
Serve's own queue limit stays set as a backstop (and bounds calls that come through handles, not HTTP).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
import uuid
from typing import Any, Awaitable, Callable

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from serving.auth import PUBLIC_PATHS, bearer_problem, token_source
from serving.config import ServeSpec
from serving.schemas import ErrorBody

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

REQUEST_ID_HEADER = b"x-request-id"
_BODY_METHODS = {"POST", "PUT", "PATCH"}
_METHODS = {"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"}  # anything else is labelled "other"
_LOGGED_PATH_CHARS = 512  # a hostile path does not become a hostile log line


def access_logger() -> logging.Logger:
    """`tunefleet.access`: bare JSON lines on the process's stderr (Ray keeps a replica's in its worker-*.err log).

    The process's own stderr, not `sys.stderr`: Serve swaps that for a stream into its buffered,
    prefixed replica log, where a line would no longer be bare JSON nor appear at once.
    """
    logger = logging.getLogger("tunefleet.access")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.__stderr__)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


class _Refusal(Exception):
    def __init__(self, status: int, error: str, detail: Any = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(error)
        self.status, self.error, self.detail, self.headers = status, error, detail, headers or {}


async def _send_json(send: Send, status: int, error: str, detail: Any, headers: dict[str, str]) -> None:
    # No X-Request-Id here: Serve adds it to every response (the one the access log names).
    body = json.dumps({"error": error, "detail": detail}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def _request_id(headers: dict[bytes, bytes]) -> str:
    given = headers.get(REQUEST_ID_HEADER, b"").decode("latin-1")[:128]
    if given:
        return given
    try:
        from ray.serve.context import _get_serve_request_context

        return _get_serve_request_context().request_id or uuid.uuid4().hex
    except Exception:  # outside a replica (unit tests)
        return uuid.uuid4().hex


class Guard:
    """The pure-ASGI layer between a client and one FastAPI app; see the module docstring."""

    def __init__(self, app: ASGIApp, spec: ServeSpec, model: str, admission: bool = True) -> None:
        from serving.metrics import model_metrics

        self.app = app
        self.spec = spec
        self.model = model
        self.tokens = token_source(spec)
        self.admission = admission
        self.slots = asyncio.Semaphore(spec.max_ongoing_requests)
        self.admitted = 0  # running + waiting on this replica
        self.capacity = spec.max_ongoing_requests + spec.max_queued_requests
        self.metrics = model_metrics(model)
        self.log = access_logger() if spec.access_log else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        headers = dict(scope.get("headers") or [])
        request_id = _request_id(headers)
        status = 500  # what an exception escaping the app becomes (errors.py answers it)
        response_started = False

        async def send_tracked(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status, response_started = message["status"], True
            await send(message)

        try:
            await self._guarded(scope, receive, send_tracked, headers)
        except _Refusal as refusal:
            if response_started:
                raise
            await _send_json(send_tracked, refusal.status, refusal.error, refusal.detail, refusal.headers)
        finally:
            self._record(scope, status, time.perf_counter() - start, request_id)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send, headers: dict[bytes, bytes]) -> None:
        path = _relative_path(scope)
        if self.tokens is not None and path not in PUBLIC_PATHS:
            problem = bearer_problem(headers.get(b"authorization"), self.tokens.token())
            if problem:
                challenge = 'Bearer realm="tunefleet"' + ("" if problem.startswith("missing") else ', error="invalid_token"')
                raise _Refusal(401, problem, None, {"WWW-Authenticate": challenge})
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.spec.max_body_bytes:
            raise self._too_large(int(declared))
        if not self.admission:
            await self._with_timeout(lambda tracked: self._run(scope, receive, tracked), send)
            return
        if self.admitted >= self.capacity:
            raise _Refusal(
                503, f"server busy: {self.spec.max_ongoing_requests} requests running and "
                f"{self.spec.max_queued_requests} waiting on this replica; retry after {self.spec.retry_after_s} s",
                {"max_ongoing_requests": self.spec.max_ongoing_requests,
                 "max_queued_requests": self.spec.max_queued_requests, "retry_after_s": self.spec.retry_after_s},
                {"Retry-After": str(self.spec.retry_after_s)},
            )
        self.admitted += 1
        try:
            await self._with_timeout(lambda tracked: self._run(scope, receive, tracked, self.slots), send)
        finally:
            self.admitted -= 1

    async def _run(self, scope: Scope, receive: Receive, send: Send, slots: asyncio.Semaphore | None = None) -> None:
        """Read the whole body within the limit, wait for a slot, then let the app answer."""
        if scope.get("method") in _BODY_METHODS:
            receive = await self._buffered(receive)
        async with slots if slots is not None else contextlib.nullcontext():
            await self.app(scope, receive, send)

    async def _with_timeout(self, work: Callable[[Send], Awaitable[None]], send: Send) -> None:
        """Cancel the work and answer 504 if it has not started a response within request_timeout_s."""
        limit = self.spec.request_timeout_s
        if limit is None:
            await work(send)
            return
        started = asyncio.Event()

        async def send_marked(message: Message) -> None:
            started.set()
            await send(message)

        task = asyncio.ensure_future(work(send_marked))
        task.add_done_callback(lambda _: started.set())
        try:
            await asyncio.wait_for(started.wait(), limit)
        except asyncio.TimeoutError:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
                raise _Refusal(504, f"request timed out: no answer within {limit:g} s",
                               {"request_timeout_s": limit}) from None
        except asyncio.CancelledError:  # the client went away: stop the work too
            task.cancel()
            raise
        await task  # finished, or streaming its response: no deadline on the rest

    async def _buffered(self, receive: Receive) -> Receive:
        """The request body read up to max_body_bytes (413 past it), replayed to the app."""
        limit = self.spec.max_body_bytes
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client disconnected
                pending = [message]
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                raise self._too_large(size, counted=True)
            if not message.get("more_body", False):
                pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]
                break

        async def replay() -> Message:
            return pending.pop(0) if pending else await receive()

        return replay

    def _too_large(self, size: int, counted: bool = False) -> _Refusal:
        limit = self.spec.max_body_bytes
        what = f"more than {limit} bytes arrived" if counted else f"Content-Length is {size} bytes"
        return _Refusal(413, f"request body too large: {what}, at most {limit}", {"max_body_bytes": limit})

    def _record(self, scope: Scope, status: int, seconds: float, request_id: str) -> None:
        route = getattr(scope.get("route"), "path", None) or "unmatched"
        method = scope.get("method", "")
        method = method if method in _METHODS else "other"
        with contextlib.suppress(Exception):  # metrics never fail a request
            self.metrics.request(route, method, status, seconds)
        if self.log is not None:
            self.log.info(json.dumps({
                "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1000) % 1000:03d}Z",
                "type": "access", "method": method, "path": scope.get("path", "")[:_LOGGED_PATH_CHARS],
                "model": self.model or None, "route": route, "status": status,
                "latency_ms": round(seconds * 1000, 2), "request_id": request_id,
            }))


def _relative_path(scope: Scope) -> str:
    """The path inside this application (Serve mounts a model's app under its route prefix)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] or "/" if root and path.startswith(root) else path


def _document(api: FastAPI, spec: ServeSpec, admission: bool) -> None:
    """Add the guard's answers (401, 413, 503, 504) and the bearer scheme to every route in /docs."""
    build = api.openapi
    auth = bool(spec.auth_token_env or spec.auth_token_file)

    def error(description: str) -> dict[str, Any]:
        return {"description": description,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}}

    def openapi() -> dict[str, Any]:
        if api.openapi_schema:
            return api.openapi_schema
        schema = build()
        components = schema.setdefault("components", {})
        components.setdefault("schemas", {}).setdefault("ErrorBody", ErrorBody.model_json_schema())
        if auth:
            components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        for path, operations in schema.get("paths", {}).items():
            for method, operation in operations.items():
                answers = operation.setdefault("responses", {})
                if auth and path not in PUBLIC_PATHS:
                    operation["security"] = [{"bearer": []}]
                    answers.setdefault("401", error("Missing or invalid bearer token (WWW-Authenticate: Bearer)."))
                if method.upper() in _BODY_METHODS:
                    answers.setdefault("413", error(f"Request body over {spec.max_body_bytes} bytes, or an input "
                                                    "over a limit (max_inputs_per_request, max_input_chars, ...)."))
                    answers.setdefault("415", error("A body that is not JSON (or, for uploads, not an image)."))
                if admission:
                    answers.setdefault("503", error("Replica busy: max_ongoing_requests running and "
                                                    "max_queued_requests waiting. Retry after the Retry-After header."))
                if spec.request_timeout_s is not None:
                    answers.setdefault("504", error(f"No answer within request_timeout_s ({spec.request_timeout_s:g} s)."))
        api.openapi_schema = schema
        return schema

    api.openapi = openapi  # type: ignore[method-assign]


def install_guard(api: FastAPI, spec: ServeSpec, model: str, admission: bool = True) -> FastAPI:
    """Add the guard (and CORS when configured, outside it so preflights need no token) to `api`."""
    api.add_middleware(Guard, spec=spec, model=model, admission=admission)
    _document(api, spec, admission)
    if spec.cors_origins:
        api.add_middleware(
            CORSMiddleware,
            allow_origins=list(spec.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
            expose_headers=["Retry-After", "X-Request-Id"],
            max_age=600,
        )
    return api
