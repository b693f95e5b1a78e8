"""The application builders a `serve deploy` config / KubeRay RayService names (serving.deploy)."""

from __future__ import annotations

import pytest
from ray.serve import Application

from serving.deploy import model_app, root_app


def test_builders_take_plain_config_args(tiny_export):
    root = root_app({"models": [{"name": "m1", "export": str(tiny_export)}]})
    model = model_app({"name": "m1", "export": str(tiny_export), "serve": {"min_replicas": 2, "max_replicas": 3}})
    assert isinstance(root, Application) and isinstance(model, Application)


def test_bad_serve_args_are_refused(tiny_export):
    with pytest.raises(ValueError, match="min_replicas"):
        model_app({"name": "m1", "export": str(tiny_export), "serve": {"min_replicas": 3, "max_replicas": 1}})
