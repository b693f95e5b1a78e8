"""Ray Serve application builders for `serve deploy` configs and KubeRay RayServices, and the config itself.

    import_path: serving.deploy:root_app          args: {models: [{name, export, route}], adapters: [{name, export}],
                                                         pools: [POOL], endpoint, registry_file, serve: {...}}
    import_path: serving.deploy:model_app         args: {name, export, route, serve: {<ServeSpec fields>}}
    import_path: serving.deploy:adapter_pool_app  args: POOL = {base_model, task, num_labels, adapter_type,
                                                                max_models_per_replica, affinity, serve: {...}}

The same applications `tunefleet serve` runs (serving/app.py, serving/multiplex.py), built from
plain config args, so a deployed config and a local server behave alike. `deploy_config(plan)`
writes that config for a serve plan (`tunefleet serve --build`); it is checked with Ray's own
`ServeDeploySchema` before it is returned. Export paths in it must be readable where the
applications are built and run (a shared volume, or a storage URI).
"""

from __future__ import annotations

import json
from typing import Any

from ray.serve import Application

from serving.app import ROOT_APP_NAME, build_model_app, build_root_app
from serving.catalog import load_served_model
from serving.config import ServeSpec
from serving.multiplex import AdapterPool, build_adapter_pool_app
from serving.plan import DEFAULT_MAX_MODELS_PER_REPLICA, ModelRequest, PoolRequest, ServePlan, make_plan
from serving.pools import PoolKey, pool_app_name

# Replicas tokenize serially and leave the cores to torch (as serving/app.py sets for `tunefleet serve`).
RUNTIME_ENV = {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}


def _pool_key(args: dict[str, Any]) -> PoolKey:
    task = args["task"]
    return PoolKey(base_model=args["base_model"], task=task,
                   num_labels=0 if task == "causal-lm" else int(args.get("num_labels") or 0),
                   kind=args.get("adapter_type", "LORA"))


def _pool(args: dict[str, Any]) -> AdapterPool:
    key = _pool_key(args)
    return AdapterPool(app_name=pool_app_name(key), key=key, spec=ServeSpec.model_validate(args.get("serve") or {}),
                       max_models_per_replica=int(args.get("max_models_per_replica") or DEFAULT_MAX_MODELS_PER_REPLICA),
                       affinity=args.get("affinity"))


def _plan(args: dict[str, Any]) -> ServePlan:
    """The root app's view of the endpoint: names, cards and pools (full models' weights are not fetched)."""
    requests = [ModelRequest(export=m["export"], name=m.get("name"), route=m.get("route"), where=f"models[{i}]")
                for i, m in enumerate(args.get("models", []))]
    requests += [ModelRequest(export=a["export"], name=a.get("name"), where=f"adapters[{i}]")
                 for i, a in enumerate(args.get("adapters", []))]
    pools = [PoolRequest(key=_pool_key(p), spec=ServeSpec.model_validate(p.get("serve") or {}),
                         max_models_per_replica=p.get("max_models_per_replica"), affinity=p.get("affinity"),
                         where=f"pools[{i}]")
             for i, p in enumerate(args.get("pools", []))]
    return make_plan(requests, ServeSpec.model_validate(args.get("serve") or {}), pools,
                     endpoint_id=args.get("endpoint", "default"), state_file=args.get("registry_file"), fetch=False)


def root_app(args: dict[str, Any]) -> Application:
    from serving.registration import install_adapter_routes

    plan = _plan(args)
    models = plan.full_models

    def adapter_routes(api) -> None:
        install_adapter_routes(api, models, list(plan.pools), list(plan.adapters), plan.endpoint_id, plan.state_file)

    return build_root_app(models, settings=ServeSpec.model_validate(args.get("serve") or {}),
                          extra_routes=adapter_routes)


def model_app(args: dict[str, Any]) -> Application:
    model = load_served_model(args["export"], args.get("name"), args.get("route"))
    return build_model_app(model, ServeSpec.model_validate(args.get("serve") or {}))


def adapter_pool_app(args: dict[str, Any]) -> Application:
    return build_adapter_pool_app(_pool(args))


def _spec_args(spec: ServeSpec) -> dict[str, Any]:
    """The fields that differ from ServeSpec's defaults (a short, readable config)."""
    return spec.model_dump(mode="json", exclude_defaults=True)


def deploy_config(plan: ServePlan, host: str = "0.0.0.0", port: int = 8000,
                  root_settings: ServeSpec | None = None) -> dict[str, Any]:
    """A Serve config (`serve deploy` / RayService `serveConfigV2`) for the plan, validated with Ray's schema."""
    from ray.serve.schema import ServeDeploySchema

    pools = [{"base_model": p.key.base_model, "task": p.key.task, "num_labels": p.key.num_labels,
              "adapter_type": p.key.kind, "max_models_per_replica": p.max_models_per_replica, "affinity": p.affinity,
              "serve": _spec_args(p.spec)} for p in plan.pools]
    root_args: dict[str, Any] = {
        "endpoint": plan.endpoint_id,
        "models": [{"name": m.name, "export": m.source or m.export_dir, **({"route": m.route} if m.route else {})}
                   for m in plan.full_models],
        "adapters": [{"name": a.name, "export": a.source} for a in plan.adapters],
        "pools": pools,
        "serve": _spec_args(root_settings or plan.settings),
    }
    if plan.state_file:
        root_args["registry_file"] = plan.state_file
    applications = [{"name": ROOT_APP_NAME, "route_prefix": "/", "import_path": "serving.deploy:root_app",
                     "args": root_args, "runtime_env": RUNTIME_ENV}]
    for model, spec in plan.models:
        args = {"name": model.name, "export": model.source or model.export_dir, "serve": _spec_args(spec)}
        if model.route:
            args["route"] = model.route
        applications.append({"name": model.name, "route_prefix": model.route_prefix,
                             "import_path": "serving.deploy:model_app", "args": args, "runtime_env": RUNTIME_ENV})
    for pool, args in zip(plan.pools, pools):
        applications.append({"name": pool.app_name, "route_prefix": None,
                             "import_path": "serving.deploy:adapter_pool_app", "args": args,
                             "runtime_env": RUNTIME_ENV})
    config = {"proxy_location": "EveryNode", "http_options": {"host": host, "port": port},
              "applications": applications}
    config = json.loads(json.dumps(config))  # plain data, no shared objects (YAML would write &anchors)
    ServeDeploySchema.model_validate(config)  # what `serve deploy` and KubeRay's RayService will check
    return config
