"""A run whose model and storage are s3:// on a real S3 server (SeaweedFS on 127.0.0.1): 2 workers write their
checkpoint shards there, job.yaml / metrics.jsonl / export / report land beside them, nothing is
written locally, and `tunefleet export s3://...` reads the run back from the bucket."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pyarrow.fs as pafs
import pytest

from tests.integration.scale_jobs import JOB_NAME, fit, job_data
from tests.integration.seaweed import ACCESS_KEY, SECRET_KEY, seaweed_s3

pytestmark = pytest.mark.integration


def _drop_cached_copies(name: str) -> None:
    """The model cache is shared by every run on the machine: take this test's copies back out."""
    from training.storage import model_cache_dir

    for copy in model_cache_dir().glob(f"{name}-*"):
        shutil.rmtree(copy, ignore_errors=True)


def test_run_writes_to_s3_and_exports_back(local_ray, tiny_text_model, sentiment_tsv, tmp_path, monkeypatch, request):
    from cluster.storage import check_writable, resolve_storage
    from training.checkpoint import complete_checkpoints

    with seaweed_s3(tmp_path / "weed") as endpoint:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        admin = pafs.S3FileSystem(endpoint_override=endpoint.split("://")[1], scheme="http", access_key=ACCESS_KEY,
                                  secret_key=SECRET_KEY, allow_bucket_creation=True)
        admin.create_dir("tunefleet")
        storage = resolve_storage("s3://tunefleet/runs")
        check_writable(storage)
        # The model too comes from the bucket (`model: s3://...`): each worker reads its own node's copy.
        model_uri = f"s3://tunefleet/models/{tmp_path.name}"
        pafs.copy_files(str(tiny_text_model), model_uri.removeprefix("s3://"), destination_filesystem=admin)

        local_before = set(tmp_path.iterdir())
        data = job_data(model_uri, *sentiment_tsv, "s3://tunefleet/runs",
                        **{"train.max_steps": 20, "train.eval_every_steps": 10})
        request.addfinalizer(lambda: _drop_cached_copies(tmp_path.name))
        result = fit(data, "s3run", storage)
        assert result.run_dir == "s3://tunefleet/runs/scale/s3run"
        assert set(tmp_path.iterdir()) == local_before, "the run must not write into local storage"

        run = storage.child(JOB_NAME, "s3run")
        files = run.files()
        for name in ("job.yaml", "metrics.jsonl", "export/model.safetensors", "export/tunefleet.json",
                     "report/metrics.json", "report/loss_curve.png", "checkpoints/best.json"):
            assert files.get(name, 0) > 0, f"{name} not on S3: {sorted(files)[:20]}"
        checkpoints = complete_checkpoints(run.child("checkpoints"))
        assert [m["step"] for _, m in checkpoints] == [10, 20]
        assert all(m["shards"] == ["rank_00000", "rank_00001"] for _, m in checkpoints)
        metrics = [json.loads(line) for line in run.read_text("metrics.jsonl").splitlines()]
        assert metrics[-1] == {**metrics[-1], "event": "end", "step": 20}

        # A user re-exports from the bucket, credentials from the environment only.
        run.delete("export")
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        exported = subprocess.run([sys.executable, "-m", "cluster.cli", "export", "s3://tunefleet/runs/scale/s3run"],
                                  capture_output=True, text=True, env=env, timeout=300)
        assert exported.returncode == 0, exported.stderr[-3000:]
        assert exported.stdout.strip().splitlines()[-1] == "s3://tunefleet/runs/scale/s3run/export"
        from transformers import AutoModelForSequenceClassification

        local_export = run.download("export", tmp_path / "export")
        info = json.loads((local_export / "tunefleet.json").read_text())
        assert info["source_run"] == "s3://tunefleet/runs/scale/s3run" and info["checkpoint"].startswith("s3://")
        assert info["base_model"] == model_uri  # where the model lives, not a node's copy of it
        assert AutoModelForSequenceClassification.from_pretrained(local_export).config.num_labels == 2
