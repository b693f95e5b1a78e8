"""Adapter exports and their base model on S3 (a real SeaweedFS server on 127.0.0.1): one adapter listed in
the serve file, one registered later by URI. The pool's replica fetches each once into its model cache and answers as
that adapter; credentials and the endpoint reach the replicas through their environment only."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import pyarrow.fs as pafs
import pytest
import yaml

from adapter_exports import LABELS, build_lora_export, reference_probs
from tests.integration.seaweed import ACCESS_KEY, SECRET_KEY, seaweed_s3
from training.layout import read_export_info, write_export_info

pytestmark = pytest.mark.integration

TEXTS = ["a good film", "a terrible waste of time"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _probs(answer: httpx.Response) -> list[float]:
    assert answer.status_code == 200, answer.text
    return [dict((p["label"], p["score"]) for p in ranked)[label]
            for ranked in answer.json()["predictions"] for label in LABELS]


def test_adapters_load_from_s3_uris(local_ray, tiny_text_model: Path, tmp_path: Path, monkeypatch) -> None:
    from serving import start_server
    from serving.servefile import load_serve_file

    local = {name: build_lora_export(tiny_text_model, tmp_path / name, name, seed)
             for name, seed in (("alpha", 1), ("beta", 2))}
    with seaweed_s3(tmp_path / "weed") as endpoint:
        admin = pafs.S3FileSystem(endpoint_override=endpoint.split("://")[1], scheme="http", access_key=ACCESS_KEY,
                                  secret_key=SECRET_KEY, allow_bucket_creation=True)
        admin.create_dir("models")
        # The base too lives in the bucket: each adapter names it by URI, and the pool's replica copies it.
        base_uri = "s3://models/base/tiny"
        pafs.copy_files(str(tiny_text_model), base_uri.removeprefix("s3://"), destination_filesystem=admin)
        for name, export in local.items():
            write_export_info(export, read_export_info(export).model_copy(update={"base_model": base_uri}))
            pafs.copy_files(str(export), f"models/adapters/{name}", destination_filesystem=admin)
        cache = tmp_path / "model-cache"
        env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
               "TUNEFLEET_MODEL_CACHE": str(cache)}
        for key, value in env.items():
            monkeypatch.setenv(key, value)  # this process plans the serve file (reads tunefleet.json from S3)
        serve_file = tmp_path / "serve.yaml"
        small = {"num_cpus": 0.5, "max_batch_size": 4, "max_ongoing_requests": 8, "graceful_shutdown_timeout_s": 2,
                 "min_replicas": 1, "max_replicas": 1, "dtype": "float32"}  # compared with float32 at 1e-4
        serve_file.write_text(yaml.safe_dump({
            "endpoint": "test-s3-adapters",
            "defaults": small,
            "models": [{"export": "s3://models/adapters/alpha"}],
            "adapter_pools": [{"base_model": base_uri, "task": "text-classification", "num_labels": 2,
                               "serve": small}],
        }))
        running = start_server(port=_free_port(), plan=load_serve_file(serve_file), env_vars=env)  # the replicas'
        try:
            with httpx.Client(base_url=running.url, timeout=60) as client:
                body = {"inputs": TEXTS, "parameters": {"top_k": None}}
                alpha = _probs(client.post("/v1/models/alpha/predict", json=body))
                want = [x for row in reference_probs(tiny_text_model, local["alpha"], TEXTS) for x in row]
                assert alpha == pytest.approx(want, abs=1e-4)

                added = client.post("/v1/registrations", json={"export": "s3://models/adapters/beta"})
                assert added.status_code == 201, added.text
                beta = _probs(client.post("/v1/models/beta/predict", json=body))
                want = [x for row in reference_probs(tiny_text_model, local["beta"], TEXTS) for x in row]
                assert beta == pytest.approx(want, abs=1e-4)

                missing = client.post("/v1/registrations", json={"export": "s3://models/adapters/nope"})
                assert missing.status_code == 422, missing.text
                assert "s3://models/adapters/nope" in missing.text
        finally:
            running.shutdown()
    # The replica fetched each adapter once into the cache the environment named.
    assert [p.parent.name.split("-")[0] for p in cache.glob("*/config.json")] == ["tiny"], "the base was not copied"
    fetched = {p.name for p in cache.rglob("adapter_model.safetensors")} if cache.exists() else set()
    assert fetched, f"nothing fetched into {cache}: {sorted(p.name for p in cache.rglob('*'))[:20] if cache.exists() else 'no cache dir'}"
