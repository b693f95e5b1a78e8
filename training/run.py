"""Turn a validated job spec into a Ray Train run, then export and report the best checkpoint.

The caller (cluster) connects to or starts Ray first. Data is prepared here, on
the driver, before any worker starts: a missing column costs no cluster time.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import yaml
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from training.checkpoint import IncompleteCheckpointError, read_manifest
from training.export import export_checkpoint
from training.layout import CHECKPOINTS_DIR, EXPORT_DIR, JOB_FILE, REPORT_DIR
from training.loop import train_loop_per_worker
from training.report import write_report
from training.tasks import TASKS, selection_metric


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    export_dir: Path
    best_checkpoint: Path
    metrics: dict[str, Any]


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def run_dir_for(spec: Any, run_id: str) -> Path:
    return Path(spec.output.storage) / spec.name / run_id


def run_training(spec: Any, run_id: str) -> RunResult:
    """Train (resuming when the run directory already holds checkpoints), export, report."""
    run_dir = run_dir_for(spec, run_id)
    task = TASKS.get(spec.task)
    prepared = task.prepare(spec)
    print(f"data: {json.dumps(prepared.summary())}")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / JOB_FILE).write_text(yaml.safe_dump(spec.dump(), sort_keys=False))

    use_gpu = _use_gpu(spec.scale.use_gpu, spec.scale.workers)
    cpus = spec.scale.cpus_per_worker or max(1, int(ray.cluster_resources().get("CPU", 1)) // spec.scale.workers)
    metric, higher_is_better = selection_metric(spec)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec, "data": prepared, "run_dir": str(run_dir), "cpus_per_worker": cpus},
        scaling_config=ScalingConfig(
            num_workers=spec.scale.workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cpus, **({"GPU": 1} if use_gpu else {})},
        ),
        run_config=RunConfig(
            # Ray Train keeps its checkpoints in <storage_path>/<name>/: the run's checkpoints/ directory.
            name=CHECKPOINTS_DIR,
            storage_path=str(run_dir),
            checkpoint_config=CheckpointConfig(
                num_to_keep=spec.output.keep_checkpoints,
                checkpoint_score_attribute=metric,
                checkpoint_score_order="max" if higher_is_better else "min",
            ),
            failure_config=FailureConfig(max_failures=spec.scale.max_failures),
        ),
    )
    result = trainer.fit()
    best = best_checkpoint(run_dir / CHECKPOINTS_DIR, metric, higher_is_better)
    export_dir = export_checkpoint(best, spec, run_dir / EXPORT_DIR, source_run=str(run_dir))
    manifest = read_manifest(best)
    (run_dir / REPORT_DIR).mkdir(parents=True, exist_ok=True)
    extras = task.report_extras(spec, export_dir, run_dir / REPORT_DIR, manifest) if task.report_extras else {}
    write_report(run_dir, run_dir / REPORT_DIR, manifest, str(best), extras)
    (run_dir / CHECKPOINTS_DIR / "best.json").write_text(json.dumps({"checkpoint": best.name, metric: manifest["metrics"][metric]}) + "\n")
    del result
    return RunResult(run_dir=run_dir, export_dir=export_dir, best_checkpoint=best, metrics=manifest["metrics"])


def complete_checkpoints(checkpoints_dir: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Every finished checkpoint (manifest and all shards present), oldest first."""
    found = []
    for directory in sorted(Path(checkpoints_dir).glob("checkpoint_*")):
        try:
            found.append((directory, read_manifest(directory)))
        except IncompleteCheckpointError:
            continue
    return found


def best_checkpoint(checkpoints_dir: Path, metric: str, higher_is_better: bool) -> Path:
    candidates = complete_checkpoints(checkpoints_dir)
    if not candidates:
        raise IncompleteCheckpointError(f"{checkpoints_dir}: no complete checkpoint to export")
    sign = 1 if higher_is_better else -1
    # Best metric; among equals the later step wins.
    return max(candidates, key=lambda item: (sign * item[1]["metrics"][metric], item[1]["step"]))[0]


def _use_gpu(setting: str | bool, workers: int) -> bool:
    if setting == "auto":
        return ray.cluster_resources().get("GPU", 0) >= workers
    return bool(setting)
