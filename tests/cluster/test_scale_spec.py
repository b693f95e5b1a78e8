"""`scale.deepspeed` and `output.storage` at validation: combinations DeepSpeed cannot train are refused
with what to use instead, a raw config is checked against the job, storage URIs resolve or say why not."""

from __future__ import annotations

import json

import pyarrow.fs as pafs
import pytest
import torch

from cluster.spec import JobSpecError, validate_job
from cluster.storage import StorageError, check_writable, resolve_storage
from training.deepspeed_engine import build_config


@pytest.fixture()
def job(tmp_path, monkeypatch):
    (tmp_path / "model").mkdir()
    (tmp_path / "train.tsv").write_text("sentence\tlabel\na fine film\tpositive\na dull film\tnegative\n")
    monkeypatch.chdir(tmp_path)

    def make(deepspeed, method="full", **train):
        return {"name": "ds", "task": "text-classification", "model": "./model",
                "data": {"train": "train.tsv", "validation": "train.tsv", "columns": {"text": "sentence"}},
                "method": {"name": method}, "train": {"batch_size": 8, **train},
                "scale": {"workers": 2, "deepspeed": deepspeed}}

    return make


def _problems(data) -> str:
    with pytest.raises(JobSpecError) as err:
        validate_job(data, check_data=False)
    return str(err.value)


def test_qlora_under_zero3_is_refused_with_the_stage_to_use(job):
    message = _problems(job({"stage": 3}, method="qlora"))
    assert "scale.deepspeed.stage: qlora cannot train under ZeRO-3" in message and "use stage 2" in message
    assert validate_job(job({"stage": 2}, method="qlora"), check_data=False).scale.deepspeed.stage == 2


def test_refused_combinations_name_the_fix(job):
    assert "offload_params: needs stage 3" in _problems(job({"stage": 2, "offload_params": True}))
    assert "use plain DDP (scale.deepspeed: null)" in _problems(job({"stage": 2}, method="gradual-unfreeze"))
    assert "scale.deepspeed.stage" in _problems(job({"stage": 4}))
    assert "scale.deepspeed.stages: unknown key" in _problems(job({"stages": 2}))


def test_raw_config_is_checked_against_the_train_section(job, tmp_path):
    raw = tmp_path / "ds.json"
    raw.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 4,
                               "gradient_accumulation_steps": "auto"}))
    message = _problems(job({"config": "ds.json"}))
    assert "scale.deepspeed.config[train_micro_batch_size_per_gpu]: differs from the job's train section (8)" in message
    raw.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto"}))
    spec = validate_job(job({"config": "ds.json"}), check_data=False)
    assert spec.scale.deepspeed.config == str(raw)  # resolved, as every path in the run's job.yaml
    assert "qlora cannot train under ZeRO-3" in _problems(job({"config": "ds.json"}, method="qlora"))
    assert "scale.deepspeed.config: no such file" in _problems(job({"config": "missing.json"}))


def test_job_maps_onto_a_deepspeed_config(job):
    spec = validate_job(job({"stage": 3, "offload_optimizer": True, "offload_params": True},
                            gradient_accumulation_steps=4, max_grad_norm=0.5), check_data=False)
    config = build_config(spec.scale.deepspeed, spec.train, torch.bfloat16, on_cuda=False)
    zero = config["zero_optimization"]
    assert {k: zero[k] for k in ("stage", "offload_optimizer", "offload_param")} == {
        "stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": False},
        "offload_param": {"device": "cpu", "pin_memory": False}}
    assert zero["reduce_bucket_size"] <= 5e7  # DeepSpeed's 5e8 default is 2 GB of fp32 ZeRO-3 allocates up front
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"],
            config["gradient_clipping"]) == (8, 4, 0.5)
    assert config["bf16"] == {"enabled": True} and "fp16" not in config
    assert "optimizer" not in config and "scheduler" not in config  # tunefleet's AdamW and schedule are passed in
    fp32 = build_config(spec.scale.deepspeed, spec.train, None, on_cuda=False)
    assert "bf16" not in fp32 and "fp16" not in fp32


def test_storage_uris_resolve(tmp_path, monkeypatch):
    local = resolve_storage(str(tmp_path / "runs"))
    assert local.local_path == tmp_path / "runs"
    check_writable(local)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    s3 = resolve_storage("s3://bucket/prefix/")
    assert isinstance(s3.filesystem, pafs.S3FileSystem) and s3.path == "bucket/prefix" and s3.uri == "s3://bucket/prefix"
    assert s3.child("job", "run").uri == "s3://bucket/prefix/job/run"
    with pytest.raises(StorageError, match="unsupported scheme hdfs://"):
        resolve_storage("hdfs://x/y")
    with pytest.raises(StorageError, match="names no bucket"):
        resolve_storage("s3://")
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(StorageError, match="cannot write to .*check the path"):
        check_writable(resolve_storage(str(tmp_path / "file" / "runs")))


def test_a_worker_group_the_local_ray_can_never_hold_is_refused_with_the_fix():
    """On the private local Ray, Ray Train waited without end for 4 one-CPU workers on 2 cores."""
    from training.run import local_capacity_problems

    assert local_capacity_problems(2, 1, False, total_cpus=2, total_gpus=0) == []
    assert local_capacity_problems(4, 0.5, False, total_cpus=2, total_gpus=0) == []
    [(key, message, value)] = local_capacity_problems(4, 1, False, total_cpus=2, total_gpus=0)
    assert (key, value) == ("scale.workers", 4)
    assert message.startswith("4 workers x 1 CPU each need 4 CPUs, and the local Ray this command started has 2")
    assert "scale.cpus_per_worker: 0.5" in message
    [(key, message, _)] = local_capacity_problems(2, 1, True, total_cpus=16, total_gpus=1)
    assert key == "scale.use_gpu" and message.startswith("2 workers need a GPU each, and this machine has 1")
