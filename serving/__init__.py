"""The data plane for inference: exported models as Ray Serve applications behind one HTTP API.

Public names load lazily: `from serving.config import ServeSpec` (the job spec does
this) must not pay for importing torch and Ray Serve.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ServeSpec": "serving.config",
    "ServingError": "serving.errors",
    "HANDLERS": "serving.handlers",
    "TaskHandler": "serving.handlers",
    "load_handler": "serving.handlers",
    "register_handler": "serving.handlers",
    "ServedModel": "serving.catalog",
    "resolve_models": "serving.catalog",
    "predict_local": "serving.local",
    "build_model_app": "serving.app",
    "build_root_app": "serving.app",
    "AdapterEntry": "serving.multiplex",
    "ServePlan": "serving.plan",
    "make_plan": "serving.plan",
    "ServeFileError": "serving.servefile",
    "load_serve_file": "serving.servefile",
    "deploy_config": "serving.deploy",
    "RunningServer": "serving.server",
    "serve_exports": "serving.server",
    "shutdown": "serving.server",
    "start_server": "serving.server",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'serving' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
