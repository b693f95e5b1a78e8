"""Shared by the scale tests: one tiny job, a private in-process Ray, and an uninterrupted reference run.

The job trains the tiny BERT on separable sentences with a constant learning rate, so a run
stopped at step 20 and continued to 40 should retrace, step for step, the run that never stopped.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest

TOTAL_STEPS = 40
JOB_NAME = "scale"


def job_data(model: Path, train: Path, dev: Path, storage: str | Path, **overrides: Any) -> dict[str, Any]:
    """The job as YAML data; overrides are dotted keys (`scale.deepspeed`, `train.max_steps`)."""
    data = {
        "name": JOB_NAME,
        "task": "text-classification",
        "model": str(model),
        "data": {"train": str(train), "validation": str(dev), "columns": {"text": "sentence", "label": "label"},
                 "max_length": 32},
        "train": {"max_steps": TOTAL_STEPS, "batch_size": 8, "learning_rate": 3.0e-3, "warmup_ratio": 0.0,
                  "scheduler": "constant", "eval_every_steps": 20, "log_every_steps": 2, "seed": 7},
        "scale": {"workers": 2, "cpus_per_worker": 1},
        "output": {"storage": str(storage), "keep_checkpoints": 2},
    }
    data = copy.deepcopy(data)
    for key, value in overrides.items():
        node, *parts = data, *key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return data


def fit(data: dict[str, Any], run_id: str, storage=None):
    """Validate and train in this process (Ray must be up): what `tunefleet train` does."""
    from cluster.spec import validate_job
    from training.run import run_training

    return run_training(validate_job(data), run_id, storage)


def records(metrics_file: Path | str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(metrics_file).read_text().splitlines() if line.strip()]


def losses(metrics: list[dict[str, Any]]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics if r["event"] == "train"}


def final_eval(metrics: list[dict[str, Any]]) -> dict[str, Any]:
    return [r for r in metrics if r["event"] == "eval"][-1]


@pytest.fixture(scope="session")
def deepspeed_ops():
    """DeepSpeed JIT-compiles its shared-memory comm op at the first initialize (~2-4 min on 2 cores, once
    per machine: cached in ~/.cache/torch_extensions). Build it here, once, not in two workers at a time."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        builder.load(verbose=False)


@pytest.fixture(scope="session")
def reference(local_ray, tiny_text_model, sentiment_tsv, tmp_path_factory) -> list[dict[str, Any]]:
    """metrics.jsonl records of the plain-DDP run, 2 workers, never interrupted."""
    storage = tmp_path_factory.mktemp("reference")
    fit(job_data(tiny_text_model, *sentiment_tsv, storage), "ref")
    return records(storage / JOB_NAME / "ref" / "metrics.jsonl")
