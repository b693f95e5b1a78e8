"""Serve files, serve plans and `tunefleet serve --build` (no Ray needed): every problem at once, a config Ray accepts."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from adapter_exports import build_lora_export
from serving.pools import PoolKey, pool_key
from serving.servefile import ServeFileError, load_serve_file, parse_serve_file


@pytest.fixture(scope="module")
def lora_exports(tiny_text_model: Path, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("lora")
    return [build_lora_export(tiny_text_model, root / name, name, seed) for name, seed in (("alpha", 1), ("beta", 2))]


def _problems(data, **kwargs) -> list[str]:
    with pytest.raises(ServeFileError) as caught:
        if kwargs.get("file"):
            load_serve_file(kwargs["file"])
        else:
            parse_serve_file(data, "serve.yaml")
    return caught.value.problems


def test_schema_problems_are_reported_together_with_key_paths() -> None:
    problems = _problems({"models": [{"export": "a", "serve": {"min_replicas": -1, "max_batch_sise": 4}},
                                     {"name": "no-export"}], "extra": 1})
    assert problems == ["models[1].export: Field required", "extra: Extra inputs are not permitted (got 1)"]

    problems = _problems({
        "defaults": {"max_batch_size": 64},  # not below the default max_ongoing_requests (64)
        "models": [{"export": "a", "serve": {"min_replicas": -1, "max_batch_sise": 4}},
                   {"export": "b", "serve": {"min_replicas": 3, "max_replicas": 1, "max_batch_size": 8}}],
        "adapter_pools": [{"base_model": "m", "task": "image-classification"},
                          {"base_model": "m", "task": "text-classification"}],
    })
    assert problems[0].startswith("defaults: max_ongoing_requests (64) must be > max_batch_size (64)")
    assert "models[0].serve.min_replicas: Input should be greater than or equal to 0 (got -1)" in problems
    assert "models[0].serve.max_batch_sise: Extra inputs are not permitted (got 4)" in problems
    assert "models[1].serve: min_replicas (3) must be <= max_replicas (1)" in problems
    assert any(p.startswith("adapter_pools[0].task: adapters are multiplexed for") for p in problems)
    assert "adapter_pools[1].num_labels: a text-classification pool needs its head's label count (got 0)" in problems


def test_export_problems_name_the_line(tmp_path: Path, tiny_export: Path, lora_exports: list[Path]) -> None:
    alpha, _ = lora_exports
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump({"models": [
        {"export": str(tiny_export), "route": "/v1/models/x"},  # under a route the endpoint answers itself
        {"export": str(tmp_path / "missing")},
        {"export": str(alpha), "route": "/alpha", "serve": {"min_replicas": 2}},
        {"export": str(tiny_export)},  # same name as the first line
    ]}))
    problems = _problems(None, file=tmp_path / "serve.yaml")
    assert problems[0].startswith("models[0].route: '/v1/models/x' falls under a route")
    assert problems[1].startswith("models[1].export: ") and "tunefleet.json" in problems[1]
    assert problems[2].startswith("models[2].route: 'alpha' is an adapter")
    assert problems[3].startswith("models[2].serve: 'alpha' is an adapter")
    assert problems[4] == "models[3].name: 'tiny-sentiment' is already the name of models[0]; names must be distinct"
    assert len(problems) == 5


def test_adapters_over_one_base_share_one_pool(tmp_path: Path, tiny_export: Path, lora_exports: list[Path],
                                               tiny_text_model: Path) -> None:
    shutil.copytree(tiny_export, tmp_path / "sentiment")
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump({
        "endpoint": "prod",
        "defaults": {"max_batch_size": 8},
        "models": [{"export": "sentiment", "name": "sst2", "route": "/sentiment", "serve": {"min_replicas": 2}},
                   *({"export": str(e)} for e in lora_exports)],
        "adapter_pools": [{"base_model": str(tiny_text_model), "task": "text-classification", "num_labels": 2,
                           "max_models_per_replica": 3, "serve": {"max_replicas": 4}}],
    }))
    plan = load_serve_file(tmp_path / "serve.yaml")
    ((model, spec),) = plan.models
    assert (model.name, model.route_prefix, spec.min_replicas, spec.max_batch_size) == ("sst2", "/sentiment", 2, 8)
    (pool,) = plan.pools
    assert pool.key == PoolKey(str(tiny_text_model), "text-classification", 2, "LORA")
    assert (pool.max_models_per_replica, pool.spec.max_replicas, pool.spec.max_batch_size) == (3, 4, 8)
    assert [(a.name, a.pool) for a in plan.adapters] == [("alpha", pool.app_name), ("beta", pool.app_name)]
    assert plan.endpoint_id == "prod"


def test_build_writes_a_config_ray_serve_accepts(tmp_path: Path, tiny_export: Path, lora_exports: list[Path],
                                                 tiny_text_model: Path) -> None:
    from ray.serve import Application
    from ray.serve.schema import ServeDeploySchema

    from cluster.cli import main
    from serving import deploy

    out = tmp_path / "serve-config.yaml"
    exports = [str(tiny_export), *map(str, lora_exports)]
    assert main(["serve", *exports, "--build", "--out", str(out)]) == 0
    config = yaml.safe_load(out.read_text())
    schema = ServeDeploySchema.model_validate(config)  # what `serve deploy` and a RayService check
    apps = {app.name: app for app in schema.applications}
    assert set(apps) == {"_root", "tiny-sentiment", next(n for n in apps if n.startswith("adapters-"))}
    assert apps["tiny-sentiment"].route_prefix == "/v1/models/tiny-sentiment"
    pool_name = next(n for n in apps if n.startswith("adapters-"))
    assert apps[pool_name].route_prefix is None  # reached through the root app, never over HTTP directly
    assert [a["name"] for a in apps["_root"].args["adapters"]] == ["alpha", "beta"]
    # Each import path builds its application from its args, as Serve will on the cluster.
    for app in schema.applications:
        module, _, builder = app.import_path.partition(":")
        assert module == "serving.deploy"
        assert isinstance(getattr(deploy, builder)(app.args), Application)
    info_key = pool_key(*_read(lora_exports[0]))
    assert apps[pool_name].args["base_model"] == info_key.base_model == str(tiny_text_model)


def _read(export: Path):
    from serving import model_store

    return model_store.read_info(export)[0], model_store.read_json(export, "adapter_config.json")
