"""Export a checkpoint as a Hugging Face model directory plus tunefleet.json.

The export loads unchanged with `transformers.pipeline(<task>, model=export_dir)`:
config, safetensors weights (never pickles), tokenizer or image processor.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from transformers.utils import logging as hf_logging

from training.checkpoint import load_model_weights, read_manifest
from training.layout import ExportInfo, write_export_info
from training.methods import METHODS, count_parameters
from training.model_builder import build_training_model
from training.tasks import TASKS
from training.tasks.torchvision_models import TorchvisionClassifier


@contextmanager
def _rebuilding_quietly() -> Iterator[None]:
    """The base model reloaded under the trained weights, without transformers' load report (or ours).

    Rebuilding from the base is how the checkpoint's trainable state finds its place, so the
    report's "classifier MISSING ... Consider training on your downstream task" (said once
    already, by the worker that trained it) would tell the user something false here. Errors
    still show: only warnings and the loading bar are held back.
    """
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    ours = logging.getLogger("training.tasks")  # torchvision's "pretrained weights from ...; new head for N labels"
    level = ours.level
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    ours.setLevel(logging.WARNING)
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        ours.setLevel(level)


def export_checkpoint(checkpoint_dir: Path, spec: Any, export_dir: Path, source_run: str | None = None,
                      merge: bool = False, checkpoint_uri: str | None = None) -> Path:
    """Write `export_dir` from one complete checkpoint (on local disk); replaces an earlier export atomically.

    Parameter-efficient methods write the adapter alone (PEFT: adapter_config.json +
    adapter_model.safetensors) with the base named in tunefleet.json; `merge` folds a
    LoRA / IA3 adapter into the base and writes a plain model instead. A ZeRO checkpoint
    is consolidated from every rank's partition into the rebuilt model, one tensor at a
    time. An export whose weights files hold no tensors (or empty ones) is refused.
    """
    manifest = read_manifest(checkpoint_dir)
    labels = manifest["labels"]
    task = TASKS.get(spec.task)
    method = METHODS.get(spec.method.name)
    if not torch.cuda.is_available():
        # save_pretrained imports DeepSpeed (accelerate's unwrap checks for its engine), which warns that it
        # "was unable to detect" a GPU unless told which accelerator this process has.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    with _rebuilding_quietly():
        model = build_training_model(spec, labels)
    load_model_weights(checkpoint_dir, model)
    trainable, total = count_parameters(model)
    adapter = method.export_kind == "adapter"
    if adapter and isinstance(getattr(model, "get_base_model", lambda: model)(), TorchvisionClassifier):
        merge = True  # a torchvision export is plain weights (torchvision.json): there is no adapter format to write
    if adapter and spec.model.gguf_file:
        merge = True  # adapter_config.json names a base folder; without gguf_file no one else can load that base
    if merge:
        if not method.mergeable:
            mergeable = [m for m in METHODS.names() if METHODS.get(m).mergeable]
            raise ValueError(f"method {method.name} cannot be merged into its base; mergeable: {', '.join(mergeable)}")
        model, adapter = model.merge_and_unload(), False
    staging = export_dir.with_name(export_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    processor = task.build_processor(spec)
    if method.save_adapter and adapter:
        staging.mkdir(parents=True)
        method.save_adapter(model, spec.method_options(), staging)
        processor.save_pretrained(staging)
    else:
        task.save_export(model, processor, staging)
    _refuse_empty_weights(staging)
    write_export_info(staging, ExportInfo(
        name=spec.name,
        task=spec.task,
        labels=labels,
        base_model=spec.model.path,
        method=spec.method.name,
        adapter=adapter,
        merged=merge,
        trainable_parameters=trainable,
        total_parameters=total,
        max_length=spec.data.max_length,
        text_pairs=spec.data.columns.text_pair is not None if spec.task == "text-classification" else None,
        metrics=manifest["metrics"],
        source_run=source_run,
        checkpoint=checkpoint_uri or str(checkpoint_dir),
    ))
    shutil.rmtree(export_dir, ignore_errors=True)
    staging.rename(export_dir)
    return export_dir


def _refuse_empty_weights(directory: Path) -> None:
    """The failure peers ship silently: an adapter saved under ZeRO-3 without gathering holds 0-element tensors."""
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as weights:
            shapes = {name: weights.get_slice(name).get_shape() for name in weights.keys()}
        empty = [name for name, shape in shapes.items() if math.prod(shape) == 0]
        if not shapes or empty:
            raise ValueError(f"{path.name} holds {'no tensors' if not shapes else f'empty tensors {empty[:3]}'}; "
                             "the export would load as an untrained model. Re-export from a complete checkpoint.")
