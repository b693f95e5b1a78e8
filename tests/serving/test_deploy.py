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


def test_the_root_replica_loads_without_torch(tiny_export, tmp_path):
    """The root replica answers /healthz, /v1/models and 404s from memory: unpickling its deployment pulled in
    torch and transformers (through a ServedModel's module), ~4 s of CPU and ~500 MB per root replica."""
    import subprocess
    import sys

    root = root_app({"models": [{"name": "m1", "export": str(tiny_export)},
                                {"name": "bugs", "export": str(tiny_export), "route": "/bugs"}]})
    blob = tmp_path / "root.pkl"
    blob.write_bytes(root._bound_deployment._replica_config.serialized_deployment_def)  # what a replica unpickles
    heavy = ("torch", "transformers", "tokenizers", "serving.handlers")
    code = (f"import sys; from ray import cloudpickle; cloudpickle.loads(open({str(blob)!r}, 'rb').read()); "
            f"print(','.join(m for m in {heavy!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "", f"the root replica imported {out.stdout.strip()}"


@pytest.mark.parametrize("failure", [KeyboardInterrupt("SIGINT while the server was starting"), RuntimeError("deploy")])
def test_a_start_that_fails_leaves_no_haproxy_folder(tiny_export, tmp_path, monkeypatch, failure):
    """Each start makes a private HAProxy folder in /tmp; one interrupted or failed start left it there for good."""
    import tempfile

    import serving.server as server_mod

    def fail(*args, **kwargs):
        raise failure

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(server_mod.serve, "start", fail)  # the deploy's first step: Ray is never needed
    with pytest.raises(type(failure)):
        server_mod.start_server([str(tiny_export)])
    assert not list(tmp_path.glob("tf-haproxy-*"))
