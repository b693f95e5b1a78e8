"""The run directory and export format: the contract between training and serving.

Every file name inside a run directory or an export is a constant here, and
`ExportInfo` is the schema of `tunefleet.json`. Serving imports this module and
nothing else from training.

    <storage>/<job name>/<run id>/
      job.yaml  metrics.jsonl  checkpoints/  export/  report/
      tracking.json  mlflow.db  mlartifacts/  tensorboard/     (experiment tracking)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

JOB_FILE = "job.yaml"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
BEST_CHECKPOINT_FILE = "best.json"  # in checkpoints/: the exported checkpoint and its metric
EXPORT_DIR = "export"
REPORT_DIR = "report"

# Experiment tracking (training/tracking.py): which MLflow run this run directory logs to,
# the default local MLflow store and its artifacts, TensorBoard event files.
TRACKING_FILE = "tracking.json"
MLFLOW_DB = "mlflow.db"
MLFLOW_ARTIFACTS_DIR = "mlartifacts"
TENSORBOARD_DIR = "tensorboard"

EXPORT_INFO_FILE = "tunefleet.json"
REPORT_METRICS_FILE = "metrics.json"
CONFUSION_MATRIX_PNG = "confusion_matrix.png"
LOSS_CURVE_PNG = "loss_curve.png"
# Image classification, torchvision backbones: architecture, labels and preprocessing beside
# model.safetensors (a plain torchvision state dict); an export without it is a Hugging Face model.
TORCHVISION_CONFIG_FILE = "torchvision.json"
ENTITY_REPORT_FILE = "entities.md"  # token classification: per-type precision / recall / F1

# Inside one Ray Train checkpoint: a manifest written last (a checkpoint without it
# is incomplete), and one shard directory per rank.
CHECKPOINT_MANIFEST = "manifest.json"
MODEL_WEIGHTS = "model.safetensors"
OPTIMIZER_STATE = "optimizer.pt"
TRAINER_STATE = "trainer_state.pt"
# DeepSpeed runs: engine.save_checkpoint(<checkpoint>, tag=ZERO_TAG) puts every rank's ZeRO files
# (zero_pp_rank_<r>_mp_rank_00_{model,optim}_states.pt, mp_rank_00_model_states.pt) in <checkpoint>/zero/.
ZERO_TAG = "zero"

EXPORT_FORMAT_VERSION = 1


def read_metrics_log(path: str | Path) -> list[dict[str, Any]]:
    """metrics.jsonl's records, oldest first. A line that does not parse is skipped: only the last line of a
    run killed while writing it can be cut, and the records before it stay readable (a resumed run writes on)."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def shard_dir_name(rank: int) -> str:
    return f"rank_{rank:05d}"


class ExportInfo(BaseModel):
    """`tunefleet.json` beside an exported Hugging Face model."""

    model_config = ConfigDict(extra="allow", frozen=True)

    format_version: int = EXPORT_FORMAT_VERSION
    name: str = Field(description="Default model name when served (the job name).")
    task: str
    labels: list[str] = Field(default_factory=list)
    base_model: str
    method: str
    adapter: bool = Field(False, description="The export holds a PEFT adapter; its base is base_model.")
    merged: bool = Field(False, description="An adapter folded into the base weights (plain model).")
    trainable_parameters: int | None = None
    total_parameters: int | None = None
    max_length: int | None = None
    text_pairs: bool | None = Field(
        None, description="Text classification: trained on sentence pairs (data.columns.text_pair) or on single "
                          "texts; the server refuses the other kind. null: another task, or an export written before.")
    metrics: dict[str, Any] = Field(default_factory=dict)
    source_run: str | None = None
    checkpoint: str | None = None


def read_export_info(export_dir: str | Path) -> ExportInfo:
    path = Path(export_dir) / EXPORT_INFO_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{export_dir} is not a tunefleet export: no {EXPORT_INFO_FILE}; pass a run's export/ directory"
        )
    return ExportInfo.model_validate_json(path.read_text(encoding="utf-8"))


def write_export_info(export_dir: str | Path, info: ExportInfo) -> None:
    Path(export_dir, EXPORT_INFO_FILE).write_text(json.dumps(info.model_dump(mode="json"), indent=2) + "\n")


def resolve_export_dir(path: str | Path) -> Path:
    """An export directory, or a run directory holding one."""
    path = Path(path)
    if (path / EXPORT_INFO_FILE).is_file():
        return path
    if (path / EXPORT_DIR / EXPORT_INFO_FILE).is_file():
        return path / EXPORT_DIR
    raise FileNotFoundError(f"{path}: neither an export (no {EXPORT_INFO_FILE}) nor a run directory with {EXPORT_DIR}/")
