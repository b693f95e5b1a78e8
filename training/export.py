"""Export a checkpoint as a Hugging Face model directory plus tunefleet.json.

The export loads unchanged with `transformers.pipeline(<task>, model=export_dir)`:
config, safetensors weights (never pickles), tokenizer or image processor.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from training.checkpoint import load_model_weights, read_manifest
from training.layout import ExportInfo, write_export_info
from training.methods import METHODS, count_parameters
from training.tasks import TASKS


def export_checkpoint(checkpoint_dir: Path, spec: Any, export_dir: Path, source_run: str | None = None) -> Path:
    """Write `export_dir` from one complete checkpoint; replaces an earlier export atomically."""
    manifest = read_manifest(checkpoint_dir)
    labels = manifest["labels"]
    task = TASKS.get(spec.task)
    method = METHODS.get(spec.method.name)
    model = method.apply(task.build_model(spec, labels), spec.method_options())
    load_model_weights(checkpoint_dir, model)
    trainable, total = count_parameters(model)
    staging = export_dir.with_name(export_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    task.save_export(model, task.build_processor(spec), staging)
    write_export_info(staging, ExportInfo(
        name=spec.name,
        task=spec.task,
        labels=labels,
        base_model=spec.model.path,
        method=spec.method.name,
        trainable_parameters=trainable,
        total_parameters=total,
        max_length=spec.data.max_length,
        metrics=manifest["metrics"],
        source_run=source_run,
        checkpoint=str(checkpoint_dir),
    ))
    shutil.rmtree(export_dir, ignore_errors=True)
    staging.rename(export_dir)
    return export_dir
