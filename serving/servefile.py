"""The serve file: many models and adapter pools behind one endpoint, in YAML.

    endpoint: prod                       # names the registry (serve add); one per endpoint on a Ray cluster
    registry_file: /mnt/models/registry.json   # optional: registrations survive a restart
    defaults:                            # ServeSpec fields for every model and pool
      max_batch_size: 16
    models:
      - export: runs/sst2/20261101-1200  # an export or run directory, local path or storage URI
        name: sst2                       # default: the export's own name (its job name)
        route: /sentiment                # default: /v1/models/<name>
        serve: {min_replicas: 2, max_batch_size: 32}
      - export: s3://models/runs/support-lora    # an adapter: served by its base's pool
    adapter_pools:                       # optional: settings per base; also an empty pool to `serve add` into
      - base_model: sentence-transformers/all-MiniLM-L6-v2
        task: text-classification
        num_labels: 2
        max_models_per_replica: 8
        affinity: null                   # true: to replicas holding the adapter; false: by load (mixed batches);
                                         # null: true once adapters outnumber max_models_per_replica
        serve: {min_replicas: 2}

Validation collects every problem and names its key path (`models[1].serve.min_replicas:
must be >= 0 (got -1)`); the exports are then read, and their problems reported the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from serving.config import ServeSpec
from serving.plan import DEFAULT_MAX_MODELS_PER_REPLICA, ModelRequest, PlanError, PoolRequest, ServePlan, make_plan
from serving.pools import BASE_MODEL_CLASSES, PoolKey


class ServeFileError(ValueError):
    def __init__(self, source: str, problems: list[str]) -> None:
        self.problems = problems
        count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
        super().__init__(f"{source}: {count}\n  " + "\n  ".join(problems))


class ModelLine(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    export: str = Field(min_length=1, description="Export or run directory: a local path or a storage URI.")
    name: str | None = Field(None, description="Model name in URLs; default: the export's own name.")
    route: str | None = Field(None, description="Route prefix of a full model; default /v1/models/<name>.")
    serve: dict[str, Any] | None = Field(None, description="ServeSpec fields over `defaults` (full models only).")


class PoolLine(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    base_model: str = Field(min_length=1, description="The adapters' base model, as their tunefleet.json names it.")
    task: str = Field(description=f"One of {', '.join(sorted(BASE_MODEL_CLASSES))}.")
    num_labels: int = Field(0, ge=0, description="Labels of the adapters' task head (classification tasks).")
    adapter_type: str = Field("LORA", description="PEFT peft_type (LORA, IA3) or TUNEFLEET_BOTTLENECK.")
    max_models_per_replica: int | None = Field(
        None, gt=0, description="Adapters one replica keeps loaded (LRU); default: the file's max_models_per_replica.")
    affinity: bool | None = Field(
        None, description="true: route an adapter's requests to replicas holding it (fewer loads when a replica "
        "cannot keep every adapter; Serve then batches each adapter apart); false: spread requests by load and mix "
        "adapters in one forward pass; null: true once the pool has more adapters than max_models_per_replica.")
    serve: dict[str, Any] | None = Field(None, description="ServeSpec fields over `defaults`.")


class ServeFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoint: str = Field("default", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$",
                          description="Names this endpoint's registry of added adapters on the Ray cluster.")
    registry_file: str | None = Field(None, description="JSON file mirroring registrations (a shared volume).")
    defaults: dict[str, Any] = Field(default_factory=dict, description="ServeSpec fields for every model and pool.")
    max_models_per_replica: int = Field(DEFAULT_MAX_MODELS_PER_REPLICA, gt=0,
                                        description="Default LRU size of adapter pools.")
    models: list[ModelLine] = Field(default_factory=list)
    adapter_pools: list[PoolLine] = Field(default_factory=list)


def _path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _describe(error: dict[str, Any], prefix: tuple[Any, ...] = ()) -> str:
    path = _path((*prefix, *error.get("loc", ())))
    message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
    given = error.get("input")
    shown = "" if error.get("type") in ("missing", "model_type") or isinstance(given, dict) else f" (got {given!r})"
    return f"{path or '(top level)'}: {message}{shown}"


def _spec(defaults: dict[str, Any], override: dict[str, Any] | None, where: tuple[Any, ...],
          problems: list[str]) -> ServeSpec | None:
    try:
        return ServeSpec.model_validate({**defaults, **(override or {})})
    except ValidationError as exc:
        for error in exc.errors():
            # A field the override did not set came from `defaults`: name it there (once).
            loc = error.get("loc") or ()
            from_defaults = override is None or (bool(loc) and loc[0] not in override)
            problem = _describe(error, ("defaults",) if from_defaults else where)
            if problem not in problems:
                problems.append(problem)
        return None


def parse_serve_file(data: Any, source: str = "serve file") -> tuple[ServeFile, list[str]]:
    """The schema and every ServeSpec merge checked; ServeFileError listing every problem."""
    try:
        parsed = ServeFile.model_validate(data if data is not None else {})
    except ValidationError as exc:
        raise ServeFileError(source, [_describe(e) for e in exc.errors()]) from None
    problems: list[str] = []
    _spec(parsed.defaults, None, ("defaults",), problems)
    for i, line in enumerate(parsed.models):
        if line.serve is not None:
            _spec(parsed.defaults, line.serve, ("models", i, "serve"), problems)
    for i, pool in enumerate(parsed.adapter_pools):
        if pool.task not in BASE_MODEL_CLASSES:
            problems.append(f"adapter_pools[{i}].task: adapters are multiplexed for "
                            f"{', '.join(sorted(BASE_MODEL_CLASSES))} (got {pool.task!r})")
        elif pool.task != "causal-lm" and pool.num_labels < 1:
            problems.append(f"adapter_pools[{i}].num_labels: a {pool.task} pool needs its head's label count (got 0)")
        _spec(parsed.defaults, pool.serve, ("adapter_pools", i, "serve"), problems)
    if not parsed.models and not parsed.adapter_pools:
        problems.append("models: list at least one export (or an adapter pool to register adapters into)")
    if problems:
        raise ServeFileError(source, problems)
    return parsed, problems


def plan_serve_file(data: Any, source: str = "serve file", base_dir: Path | None = None,
                    fetch: bool = True) -> ServePlan:
    """A serve file's content → a ServePlan; relative export paths are relative to `base_dir`
    (`fetch=False`: full models' weights are not copied from storage URIs; see serving/plan.py)."""
    parsed, _ = parse_serve_file(data, source)
    defaults = ServeSpec.model_validate(parsed.defaults)

    def where_is(export: str) -> str:
        if "://" in export or base_dir is None or Path(export).is_absolute():
            return export
        return str((base_dir / export).resolve())

    requests = [
        ModelRequest(export=where_is(line.export), name=line.name, route=line.route,
                     spec=ServeSpec.model_validate({**parsed.defaults, **line.serve}) if line.serve is not None else None,
                     where=f"models[{i}]")
        for i, line in enumerate(parsed.models)
    ]
    pools = [
        PoolRequest(
            key=PoolKey(base_model=pool.base_model, task=pool.task,
                        num_labels=0 if pool.task == "causal-lm" else pool.num_labels, kind=pool.adapter_type),
            spec=ServeSpec.model_validate({**parsed.defaults, **(pool.serve or {})}),
            max_models_per_replica=pool.max_models_per_replica,
            affinity=pool.affinity,
            where=f"adapter_pools[{i}]",
        )
        for i, pool in enumerate(parsed.adapter_pools)
    ]
    try:
        return make_plan(requests, defaults, pools, parsed.max_models_per_replica, parsed.endpoint,
                         parsed.registry_file, fetch=fetch)
    except PlanError as exc:
        raise ServeFileError(source, exc.problems) from None


def load_serve_file(path: str | Path, fetch: bool = True) -> ServePlan:
    """Read and plan a serve file (YAML); ServeFileError with every problem."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ServeFileError(str(path), [f"cannot read: {exc.strerror or exc}"]) from None
    except yaml.YAMLError as exc:
        raise ServeFileError(str(path), [f"not valid YAML: {exc}"]) from None
    return plan_serve_file(data, str(path), base_dir=path.parent, fetch=fetch)
