"""Adapters by name on the root application, and registering new ones with a running endpoint.

    POST   /v1/models/{name}/predict      an adapter: forwarded to its pool (serving/multiplex.py)
    POST   /v1/models/{name}              the same, answered in the Hugging Face Inference API's shape
    GET    /v1/models/{name}              its card
    GET    /v1/models                     every model: full models, adapters from the serve plan, registered ones
    POST   /v1/registrations              {"export": PATH_OR_URI, "name": optional} → 201 and the card
    DELETE /v1/registrations/{name}       forget a registered adapter → 200

The registry is one detached Ray actor per endpoint (`tunefleet-registry-<id>`, namespace
`tunefleet`), so registrations outlive a redeploy of the applications; with `state_file`
they are also written to a JSON file (a shared volume) and survive a restart of the actor
or of Ray. Every write goes through the actor, one at a time.

Consistency (documented in docs/serving.md): `POST /v1/registrations` answers 201 only after
the export was read and one pool replica loaded it, and the registry recorded it. A name
this root replica does not know is looked up in the registry before any 404, so a request
sent after the 201, through any root replica, finds it; a pool replica that has not loaded
it yet loads it on that request. A replacement (same name, new export) or a removal is seen
at once by the root replica that made it and within `REFRESH_S` by any other.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from ray.serve.exceptions import BackPressureError

from serving.errors import ServingError, json_body
from serving.hf_compat import HF_OPENAPI, HF_RESPONSE, hf_request, is_json
from serving.multiplex import POOL_DEPLOYMENT, AdapterEntry, AdapterPool
from serving.pools import MODEL_NAME, NAME_RULE, pool_key
from serving.schemas import ErrorBody, ModelCard, ModelList, PredictResponse

NAMESPACE = "tunefleet"
REFRESH_S = 2.0  # how stale a root replica's copy of a registered entry may get (replacements, removals)
_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorBody} for code in (400, 404, 409, 413, 422, 503)}
# An adapter's request is its task's (checked by the pool replica, which knows the task): the common shape here.
_PREDICT_BODY = {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["inputs"],
    "properties": {"inputs": {"description": "The task's inputs: a text, a list of texts or text pairs, ..."},
                   "parameters": {"type": "object", "description": "The task's parameters (top_k, ...)."}},
}}}}


class RegistrationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    export: str = Field(min_length=1, description="The export (or run directory holding export/): a path the "
                        "replicas can read, or a storage URI (s3://, gs://, file://).")
    name: str | None = Field(None, description="Model name; default: the export's own name (its job name).")


class ModelRegistry:
    """Registered adapters by name (a Ray actor: one writer at a time); optionally mirrored to a JSON file."""

    def __init__(self, state_file: str | None = None) -> None:
        self.state_file = Path(state_file) if state_file else None
        self.entries: dict[str, dict[str, Any]] = {}
        if self.state_file and self.state_file.is_file():
            self.entries = {e["name"]: e for e in json.loads(self.state_file.read_text())["adapters"]}

    def _save(self) -> None:
        if self.state_file:
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            partial = self.state_file.with_name(self.state_file.name + ".partial")
            partial.write_text(json.dumps({"adapters": list(self.entries.values())}, indent=2) + "\n")
            os.replace(partial, self.state_file)  # a crash leaves the old file or the new one

    def register(self, entry: dict[str, Any]) -> None:
        self.entries[entry["name"]] = entry
        self._save()

    def unregister(self, name: str) -> bool:
        found = self.entries.pop(name, None) is not None
        self._save()
        return found

    def get(self, name: str) -> dict[str, Any] | None:
        return self.entries.get(name)

    def all(self) -> list[dict[str, Any]]:
        return list(self.entries.values())


def registry_name(endpoint_id: str) -> str:
    return f"tunefleet-registry-{endpoint_id}"


def registry_actor(endpoint_id: str, state_file: str | None = None):
    """The endpoint's registry actor, created on first use (detached: it outlives the process that made it)."""
    import ray

    actor = ray.remote(ModelRegistry).options(
        name=registry_name(endpoint_id), namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
        num_cpus=0, max_restarts=-1, max_task_retries=-1,
    )
    return actor.remote(state_file)


def drop_registry(endpoint_id: str) -> None:
    """End the endpoint's registry actor (its state file, if any, stays)."""
    import ray

    try:
        ray.kill(ray.get_actor(registry_name(endpoint_id), namespace=NAMESPACE), no_restart=True)
    except ValueError:  # never created
        pass


def _as_serving_error(exc: BaseException) -> ServingError | None:
    cause = exc if isinstance(exc, ServingError) else getattr(exc, "cause", None)
    return ServingError(cause.status, cause.error, cause.detail) if isinstance(cause, ServingError) else None


def install_adapter_routes(
    api: FastAPI,
    full_models: list[Any],
    pools: list[AdapterPool],
    adapters: list[AdapterEntry],
    endpoint_id: str,
    state_file: str | None = None,
) -> FastAPI:
    """Add the adapter and registration routes to the root app (before its catch-all 404 routes)."""
    from serving import model_store
    from serving.handlers import HANDLERS  # here, building the app: the root replica runs without torch

    generative = HANDLERS.generative_tasks()  # task names: all that the routes below carry into the replica

    full = {m.name: m for m in full_models}
    static = {a.name: a for a in adapters}
    by_key = {p.key: p for p in pools}
    by_app = {p.app_name: p for p in pools}
    cache: dict[str, tuple[AdapterEntry, float]] = {}
    handles: dict[str, Any] = {}
    registry: list[Any] = []

    def the_registry():
        if not registry:
            registry.append(registry_actor(endpoint_id, state_file))
        return registry[0]

    def pool_handle(app_name: str):
        if app_name not in handles:
            from ray import serve

            handles[app_name] = serve.get_deployment_handle(POOL_DEPLOYMENT, app_name=app_name)
        return handles[app_name]

    def known_names() -> list[str]:
        return sorted({*full, *static, *cache})

    async def lookup(name: str) -> AdapterEntry:
        if name in static:
            return static[name]
        if not MODEL_NAME.match(name):  # "..", "%2e%2e", a 10 kB name: never a registry key
            raise ServingError(400, f"invalid model name {name[:64]!r}: a name is 1-100 letters, digits, "
                               "'.', '_' or '-', starting with a letter or digit", {"models": known_names()})
        held = cache.get(name)
        if held is None or time.monotonic() - held[1] > REFRESH_S:
            found = await the_registry().get.remote(name)
            if found is None:
                cache.pop(name, None)
                if name in full:  # a full model on its own route (a serve file's `route`)
                    raise full[name].served_elsewhere()
                raise ServingError(404, f"unknown model {name!r}; served models: {', '.join(known_names())}",
                                   {"models": known_names()})
            held = (AdapterEntry.from_json(found), time.monotonic())
            cache[name] = held
        return held[0]

    def affinity(pool: AdapterPool) -> bool:
        if pool.affinity is not None:
            return pool.affinity
        served = {n for n, a in static.items() if a.pool == pool.app_name}
        served |= {n for n, (e, _) in cache.items() if e.pool == pool.app_name}  # registered ones seen here
        return len(served) > pool.max_models_per_replica

    async def call_pool(entry: AdapterEntry, method: str, *args: Any) -> Any:
        handle = pool_handle(entry.pool)
        if affinity(by_app[entry.pool]):  # Serve's router then prefers replicas that hold this adapter
            handle = handle.options(multiplexed_model_id=entry.model_id)
        try:
            return await getattr(handle, method).remote(entry, *args)
        except BackPressureError:
            raise ServingError(503, f"the replicas serving {entry.name!r} are full; retry shortly",
                               {"model": entry.name}) from None
        except Exception as exc:
            error = _as_serving_error(exc)
            if error is None:
                raise
            raise error from None

    async def openai_target(name: str) -> tuple[Any, tuple[AdapterEntry]]:
        """(pool handle, leading args) for an OpenAI request naming a causal-LM adapter (serving/openai_compat.py)."""
        entry = await lookup(name)
        if entry.info.task != "causal-lm":
            raise ServingError(400, f"model {name!r} is a {entry.info.task} adapter; the OpenAI routes serve "
                               "text generation (causal-lm) models", {"task": entry.info.task})
        handle = pool_handle(entry.pool)
        if affinity(by_app[entry.pool]):
            handle = handle.options(multiplexed_model_id=entry.model_id)
        return handle, (entry,)

    api.state.openai_adapters = openai_target

    @api.get("/v1/models", response_model=ModelList)
    async def list_models() -> dict[str, Any]:
        registered = [AdapterEntry.from_json(e) for e in await the_registry().all.remote()]
        cards = [m.card() for m in full.values()] + [a.card() for a in static.values()]
        cards += [e.card() for e in registered if e.name not in static]
        return ModelList.of(cards, generative).model_dump()

    @api.post("/v1/models/{name}/predict", response_model=PredictResponse, responses=_ERRORS,
              summary="Predict with an adapter", openapi_extra={"requestBody": _PREDICT_BODY})
    async def predict(name: str, request: Request) -> JSONResponse:
        """The body is the adapter's task request, as its base's `/predict` takes it; the task's own
        schema is checked by the pool replica (422 naming the field)."""
        entry = await lookup(name)
        body = json_body(await request.body())
        if body is None:
            raise ServingError(422, 'invalid request: body: a JSON body is required, e.g. {"inputs": "a text"}')
        answer = await call_pool(entry, "predict", body)
        replica = answer.pop("replica", None)
        return JSONResponse(answer, headers={"x-tunefleet-replica": str(replica)})

    @api.post("/v1/models/{name}", responses={**_ERRORS, **HF_RESPONSE}, openapi_extra=HF_OPENAPI,
              summary="Predict with an adapter, answered in the Hugging Face Inference API's shape")
    async def predict_hf(name: str, request: Request) -> JSONResponse:
        """As /predict, and the answer is the pipeline's output itself (serving/hf_compat.py). JSON only: an
        image goes base64 in `inputs`."""
        entry = await lookup(name)
        if not is_json(request) and request.headers.get("content-type"):
            raise ServingError(415, f"unsupported content type {request.headers['content-type'][:100]!r}: an "
                                    'adapter takes a JSON body {"inputs": ...} (an image as base64 in inputs)')
        payload, single = hf_request(await request.body())
        answer = await call_pool(entry, "predict", payload, single)
        return JSONResponse(answer["hf"], headers={"x-tunefleet-replica": str(answer.get("replica"))})

    @api.get("/v1/models/{name}", response_model=ModelCard, responses=_ERRORS)
    @api.get("/v1/models/{name}/", response_model=ModelCard, include_in_schema=False)
    async def card(name: str) -> dict[str, Any]:
        return (await lookup(name)).card().model_dump()

    @api.api_route("/v1/models/{name}/{rest:path}", methods=["GET", "POST"], include_in_schema=False)
    async def other_route(name: str, request: Request) -> None:
        """Any other route under an adapter's name: say which it has (the root's catch-all called it unknown)."""
        await lookup(name)  # an unknown, invalid or elsewhere-served name gets its own 404 or 400
        raise ServingError(404, f"no route {request.method} {request.url.path[:200]}: an adapter answers POST "
                                f"/v1/models/{name}/predict, POST /v1/models/{name} and GET /v1/models/{name}",
                           {"model": name})

    @api.post("/v1/registrations", status_code=201, response_model=ModelCard, responses=_ERRORS)
    async def register(body: RegistrationRequest) -> dict[str, Any]:
        """Serve an adapter export from now on, without a redeploy; answers once a replica has loaded it."""
        try:
            info, version = await asyncio.to_thread(model_store.read_info, body.export)
            adapter_config = await asyncio.to_thread(model_store.read_json, body.export, "adapter_config.json")
            source = model_store.normalize(body.export)
        except (OSError, ValueError) as exc:
            raise ServingError(422, f"cannot read the export {body.export}: {exc}", {"export": body.export}) from None
        name = body.name or info.name
        if not MODEL_NAME.match(name):
            raise ServingError(422, f"model name {name!r} {NAME_RULE}", {"name": name})
        if name in full or name in static:
            raise ServingError(409, f"model name {name!r} is deployed with this endpoint; registrations cannot "
                               "replace it: pick another name or redeploy", {"name": name})
        if not info.adapter:
            raise ServingError(409, f"{body.export} is a full model ({info.method}); a running endpoint takes "
                               "adapter exports only (they load into the base's replicas): add it to the serve "
                               "file and redeploy", {"method": info.method})
        try:
            key = pool_key(info, adapter_config)
        except ValueError as exc:
            raise ServingError(409, f"{body.export}: {exc}") from None
        pool = by_key.get(key)
        if pool is None:
            served = [p.key.describe() for p in pools]
            raise ServingError(409, f"no replicas here serve {key.describe()}; this endpoint serves "
                               f"{'; '.join(served) or 'no adapter pools'}", {"pools": served})
        entry = AdapterEntry(name=name, source=source, version=version, info=info, pool=pool.app_name)
        await call_pool(entry, "load")  # proves the export loads before anyone is told it is served
        await the_registry().register.remote(entry.to_json())
        cache[name] = (entry, time.monotonic())
        return entry.card().model_dump()

    @api.delete("/v1/registrations/{name}", responses=_ERRORS)
    async def unregister(name: str) -> dict[str, Any]:
        """Stop serving a registered adapter (replicas drop it from their LRU as others are used)."""
        if name in full or name in static:
            raise ServingError(409, f"model {name!r} is deployed with this endpoint, not registered; redeploy "
                               "without it", {"name": name})
        if not await the_registry().unregister.remote(name):
            raise ServingError(404, f"no registered model {name!r}", {"name": name})
        cache.pop(name, None)
        return {"removed": name}

    return api
