"""Ray Serve application builders for `serve deploy` configs and KubeRay RayServices.

    import_path: serving.deploy:root_app    args: {models: [{name, export}, ...]}
    import_path: serving.deploy:model_app   args: {name, export, serve: {<ServeSpec fields>}}

The same applications `tunefleet serve` runs (serving/app.py), built from plain
config args, so a deployed config and a local server behave alike.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from serving.app import build_model_app, build_root_app
from serving.catalog import load_served_model
from serving.config import ServeSpec


def root_app(args: dict[str, Any]) -> Application:
    models = [load_served_model(entry["export"], entry.get("name")) for entry in args.get("models", [])]
    return build_root_app(models)


def model_app(args: dict[str, Any]) -> Application:
    model = load_served_model(args["export"], args.get("name"))
    return build_model_app(model, ServeSpec.model_validate(args.get("serve") or {}))
