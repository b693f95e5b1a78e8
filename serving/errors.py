"""Errors a client sees: always a 4xx JSON `{"error": ..., "detail": ...}` for bad input.

`ServingError` is raised by handlers (limits, unknown model); `install_error_handlers`
makes a FastAPI app answer its own and FastAPI's errors in that one shape:
malformed JSON 400, schema violations 422, unknown routes 404, and Ray's overload and
lost-replica errors 503 with Retry-After. Limits applied before a route runs (auth,
body size, backpressure, timeouts) answer the same shape from serving/middleware.py.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

# Segments pydantic adds to an error location for union members and validators;
# they name types, not fields, so a client's message leaves them out.
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "bytes"}
RETRY_AFTER_S = 1  # Retry-After on a 503 for an overloaded or restarting model


class ServingError(Exception):
    """A request the server understood but will not serve: status, message, specifics."""

    def __init__(self, status: int, error: str, detail: Any = None) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.detail = detail

    def __reduce__(self):
        # Picklable with its three fields, so one raised in a replica reaches a caller through Ray intact.
        return (type(self), (self.status, self.error, self.detail))


def error_response(status: int, error: str, detail: Any = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": error, "detail": detail}, headers=headers)


def _field_path(loc: tuple[Any, ...]) -> str:
    path = ""
    for part in loc:
        if part == "body" and not path:
            continue
        if isinstance(part, int):
            path += f"[{part}]"
        elif "[" in part or part in _TYPE_TAGS or part[:1].isupper():
            continue
        else:
            path += f".{part}" if path else part
    return path or "body"


def _message(err: dict[str, Any]) -> str:
    msg = str(err.get("msg", "invalid"))
    return msg.removeprefix("Value error, ")


def describe_validation_errors(errors: list[dict[str, Any]]) -> tuple[str, list[dict[str, str]]]:
    """One readable line (`inputs: Field required`) and a JSON-safe list of the problems."""
    by_path: dict[str, list[str]] = {}
    for err in errors:
        msgs = by_path.setdefault(_field_path(tuple(err.get("loc", ()))), [])
        if _message(err) not in msgs:
            msgs.append(_message(err))
    if by_path.get("body") == ["Field required"]:
        by_path["body"] = ['a JSON body is required, e.g. {"inputs": "a text"}']
    line = "; ".join(f"{path}: {' or '.join(msgs)}" for path, msgs in by_path.items())
    detail = [{"field": _field_path(tuple(e.get("loc", ()))), "message": _message(e), "type": str(e.get("type"))}
              for e in errors]
    return line, detail


# In a JSON route's OpenAPI extras: the route that takes the same request as uploaded files, which a 415 names.
UPLOAD_ROUTE_KEY = "x-tunefleet-upload-route"


def is_json_type(content_type: str) -> bool:
    kind = content_type.split(";", 1)[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


def json_body(raw: bytes) -> Any:
    """A body that a route reads itself → its JSON value (None when empty); a 400 naming the problem if malformed."""
    try:
        return json.loads(raw or b"null")
    except ValueError as exc:
        raise ServingError(400, "malformed JSON body", str(exc)) from None


async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = list(exc.errors())
    if any(e.get("type") == "json_invalid" for e in errors):
        ctx = next(e for e in errors if e.get("type") == "json_invalid").get("ctx") or {}
        return error_response(400, "malformed JSON body", str(ctx.get("error", "")) or None)
    content_type = request.headers.get("content-type", "")
    if content_type and not is_json_type(content_type) and any(tuple(e.get("loc", ())) == ("body",) for e in errors):
        # FastAPI passes a non-JSON body through as bytes, which then fails the schema as a whole.
        fix = "send a JSON body with Content-Type: application/json"
        upload = (getattr(request.scope.get("route"), "openapi_extra", None) or {}).get(UPLOAD_ROUTE_KEY)
        if upload:  # a route of a model that takes files: say where the files go
            fix += (f", or POST the files themselves to {request.scope.get('root_path', '')}{upload} "
                    "(multipart/form-data, or one raw image body)")
        return error_response(415, f"unsupported content type {content_type[:100]!r}: {fix}", None)
    line, detail = describe_validation_errors(errors)
    return error_response(422, f"invalid request: {line}", detail)


async def _on_serving_error(_: Request, exc: ServingError) -> JSONResponse:
    return error_response(exc.status, exc.error, exc.detail)


async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 404:
        error = f"no route {request.method} {request.url.path}"
    elif exc.status_code == 405:
        error = f"method {request.method} not allowed on {request.url.path}"
    elif exc.status_code == 400 and isinstance(exc.__cause__, RecursionError):  # FastAPI's JSON parse failed
        error = "malformed JSON body: nested too deeply"
    elif exc.status_code == 400 and isinstance(exc.__cause__, UnicodeDecodeError):
        error = f"malformed JSON body: not valid UTF-8 ({exc.__cause__.reason} at byte {exc.__cause__.start})"
    else:
        error = str(exc.detail)
    return error_response(exc.status_code, error, None, getattr(exc, "headers", None))


async def _on_overloaded(_: Request, exc: Exception) -> JSONResponse:
    # A handle call (the OpenAI routes forward to a model's app) met the model's full queue.
    return error_response(503, f"model busy: its request queue is full; retry after {RETRY_AFTER_S} s",
                          type(exc).__name__, {"Retry-After": str(RETRY_AFTER_S)})


async def _on_replica_lost(_: Request, exc: Exception) -> JSONResponse:
    # The replica serving a forwarded call died or is restarting; Serve starts another.
    logger.warning("a model replica became unavailable during a request: %s", type(exc).__name__)
    return error_response(503, f"model replica unavailable; retry after {RETRY_AFTER_S} s",
                          type(exc).__name__, {"Retry-After": str(RETRY_AFTER_S)})


async def _on_unexpected(_: Request, exc: Exception) -> JSONResponse:
    logger.exception("unexpected error while serving a request", exc_info=exc)
    return error_response(500, "internal error", type(exc).__name__)


def install_error_handlers(app: FastAPI) -> FastAPI:
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(ServingError, _on_serving_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected)
    try:  # Ray's overload and lost-replica errors: 503 with Retry-After (apps run in Ray; a unit test may not)
        from ray.exceptions import RayActorError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
    except ImportError:
        return app
    app.add_exception_handler(BackPressureError, _on_overloaded)
    for lost in (DeploymentUnavailableError, ReplicaUnavailableError, RayActorError):
        app.add_exception_handler(lost, _on_replica_lost)
    return app
