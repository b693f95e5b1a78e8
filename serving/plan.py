"""What one endpoint serves: full models (one application each) and adapter pools (one per base).

`make_plan` reads every export once (a local path or a storage URI), names it, and groups
adapter exports by what they share (serving/adapters.py `PoolKey`): each group is one pool of
base-model replicas. An adapter of a task no pool serves (image classification) gets an
application of its own, as a full model does, its adapter merged over its base at load. Every
problem is collected and raised at once, each prefixed with the key path it came from
(`models[2].export: ...`), before any Ray time is spent.

Both `tunefleet serve EXPORT...` and a serve file (serving/servefile.py) end here; the
server (serving/server.py) and the `serve deploy` config (serving/deploy.py) start from a plan.
"""

from __future__ import annotations

from dataclasses import dataclass

from serving import model_store
from serving.catalog import ServedModel, load_served_model
from serving.config import ServeSpec
from serving.handlers import HANDLERS
from serving.multiplex import AdapterEntry, AdapterPool
from serving.pools import BASE_MODEL_CLASSES, MODEL_NAME, NAME_RULE, PoolKey, pool_app_name, pool_key

DEFAULT_MAX_MODELS_PER_REPLICA = 8  # LoRA on a MiniLM-size base is ~1 MB: memory is rarely what limits this
# Routes the root application answers; a model's own `route` may not shadow them.
RESERVED_ROUTES = ("/healthz", "/metrics", "/docs", "/openapi.json", "/v1/models", "/v1/registrations",
                   "/v1/completions", "/v1/chat/completions")


class PlanError(ValueError):
    """Every problem with what was asked to be served, one per line."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("cannot serve this:\n  " + "\n  ".join(problems))


@dataclass(frozen=True)
class ModelRequest:
    """One model to serve, as a serve file line or a CLI argument asks for it."""

    export: str
    name: str | None = None
    route: str | None = None
    spec: ServeSpec | None = None  # None: the plan's default spec
    where: str = ""  # key path in messages: "models[2]"


@dataclass(frozen=True)
class PoolRequest:
    """Settings for the pool serving adapters over one base (also declares an empty pool to register into)."""

    key: PoolKey
    spec: ServeSpec | None = None
    max_models_per_replica: int | None = None
    affinity: bool | None = None  # see AdapterPool.affinity
    where: str = ""


@dataclass(frozen=True)
class ServePlan:
    models: tuple[tuple[ServedModel, ServeSpec], ...]
    pools: tuple[AdapterPool, ...]
    adapters: tuple[AdapterEntry, ...]
    settings: ServeSpec = ServeSpec()  # the default spec: endpoint-wide auth, CORS, limits for the root app
    endpoint_id: str = "default"  # names the registry actor: one per endpoint on a Ray cluster
    state_file: str | None = None  # registrations mirrored to this JSON file (a shared volume)

    @property
    def full_models(self) -> list[ServedModel]:
        return [m for m, _ in self.models]

    def names(self) -> list[str]:
        return [m.name for m, _ in self.models] + [a.name for a in self.adapters]


def _at(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _route_problem(route: str) -> str | None:
    if not route.startswith("/") or route == "/" or route.endswith("/") or "//" in route:
        return f"must start with '/', name a path and not end with '/' (got {route!r})"
    if any(route == r or route.startswith(r + "/") for r in RESERVED_ROUTES):
        return f"{route!r} falls under a route the endpoint answers itself ({', '.join(RESERVED_ROUTES)})"
    return None


def make_plan(
    requests: list[ModelRequest],
    spec: ServeSpec | None = None,
    pools: list[PoolRequest] | tuple[PoolRequest, ...] = (),
    max_models_per_replica: int = DEFAULT_MAX_MODELS_PER_REPLICA,
    endpoint_id: str = "default",
    state_file: str | None = None,
    fetch: bool = True,
) -> ServePlan:
    """Read, name and group every export; PlanError listing every problem.

    `fetch=False` reads each export's tunefleet.json only (a config to write, a root app's model list):
    full models from storage URIs are not copied to this node.
    """
    spec = spec or ServeSpec()
    problems: list[str] = []
    models: list[tuple[ServedModel, ServeSpec]] = []
    adapters: list[tuple[str, ModelRequest, str, object, str, PoolKey]] = []
    seen_names: dict[str, str] = {}
    seen_routes: dict[str, str] = {}
    if not requests and not pools:
        problems.append("nothing to serve: give at least one export (or an adapter pool to register into)")
    for i, request in enumerate(requests):
        where = request.where or f"exports[{i}]"
        try:
            info, version = model_store.read_info(request.export)
            adapter_config = model_store.read_json(request.export, "adapter_config.json") if info.adapter else None
        except (OSError, ValueError) as exc:
            problems.append(f"{_at(where, 'export')}: {exc}")
            continue
        name = request.name or info.name
        if not MODEL_NAME.match(name):
            problems.append(f"{_at(where, 'name')}: {name!r} {NAME_RULE}")
        if name in seen_names:
            problems.append(f"{_at(where, 'name')}: {name!r} is already the name of {seen_names[name]}; names must "
                            "be distinct")
        seen_names.setdefault(name, where)
        if info.adapter and info.task in BASE_MODEL_CLASSES:  # else: its own application, like a full model
            try:
                key = pool_key(info, adapter_config)
            except ValueError as exc:
                problems.append(f"{_at(where, 'export')}: {exc}")
                continue
            if request.route is not None:
                problems.append(f"{_at(where, 'route')}: {name!r} is an adapter, served by its base's pool at "
                                f"/v1/models/{name}; remove route")
            if request.spec is not None:
                problems.append(f"{_at(where, 'serve')}: {name!r} is an adapter; replicas and batching are its "
                                "pool's (set them under adapter_pools)")
            adapters.append((name, request, model_store.normalize(request.export), info, version, key))
            continue
        if info.task not in HANDLERS:
            problems.append(f"{_at(where, 'export')}: task {info.task!r} has no serving handler; servable tasks: "
                            f"{', '.join(HANDLERS.names())}")
            continue
        route = request.route or f"/v1/models/{name}"
        if request.route is not None and (problem := _route_problem(request.route)):
            problems.append(f"{_at(where, 'route')}: {problem}")
        if route in seen_routes:
            problems.append(f"{_at(where, 'route')}: {route} is already the route of {seen_routes[route]}")
        seen_routes.setdefault(route, where)
        if problems:
            continue  # do not fetch weights for a plan that will be refused
        try:
            model = load_served_model(request.export, name, request.route, fetch=fetch)
        except (OSError, ValueError) as exc:
            problems.append(f"{_at(where, 'export')}: {exc}")
            continue
        models.append((model, request.spec or spec))

    pool_settings: dict[PoolKey, PoolRequest] = {}
    for request in pools:
        if request.key in pool_settings:
            problems.append(f"{request.where}: {request.key.describe()} is already configured by "
                            f"{pool_settings[request.key].where}")
        pool_settings.setdefault(request.key, request)
    keys = list(dict.fromkeys([*pool_settings, *(a[5] for a in adapters)]))
    built = {}
    for key in keys:
        settings = pool_settings.get(key, PoolRequest(key))
        if (settings.spec or spec).dtype == "int8":  # adapters switch float tensors on one base; not quantized
            problems.append(f"{settings.where or 'serve'}: {key.describe()}: serve.dtype int8 is for full models; an adapter "
                            "pool serves float32 or bfloat16: use auto, float32 or bfloat16")
        built[key] = AdapterPool(app_name=pool_app_name(key), key=key, spec=settings.spec or spec,
                                 max_models_per_replica=settings.max_models_per_replica or max_models_per_replica,
                                 affinity=settings.affinity)
    entries = tuple(AdapterEntry(name=name, source=source, version=version, info=info, pool=built[key].app_name)
                    for name, _, source, info, version, key in adapters)
    if problems:
        raise PlanError(problems)
    return ServePlan(models=tuple(models), pools=tuple(built.values()), adapters=entries, settings=spec,
                     endpoint_id=endpoint_id, state_file=state_file)
