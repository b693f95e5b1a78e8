"""What a task registers: how its data is prepared, its model built, its loss and metrics computed.

A task is a `TaskDefinition` of plain functions, registered once in its own
module. The training loop, the checkpoint and the export only ever call these.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa

from training.data.tables import DataError
from training.losses import build_loss, sequence_argmax


def reads_the_model(build_processor: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A task's `build_processor`, with a model it cannot read (an unreachable or misspelled hub id, a folder
    without the model's files) reported as one problem at `model`, like a job file's, not as a traceback.

    The processor is the first thing a run loads from `model`, on the driver, before any worker starts:
    transformers raises OSError for a hub id it cannot reach or find, and ValueError for a folder it
    cannot make a tokenizer of."""

    @functools.wraps(build_processor)
    def build(spec: Any) -> Any:
        try:
            return build_processor(spec)
        except DataError:
            raise
        except (OSError, ValueError) as err:
            folder = Path(spec.model.path)
            if folder.is_dir() and not (folder / "config.json").is_file() and not spec.model.gguf_file:
                why = ("the folder has no config.json: give a folder that save_pretrained() wrote (config.json, "
                       "the weights and the tokenizer's files), or a hub id")
            else:
                why = str(err)
            raise DataError([("model", f"cannot load {spec.model.path}: {why}", None)]) from None

    return build


@dataclass(frozen=True)
class PreparedData:
    """Tokenized splits as Arrow tables (they travel to Ray workers as data, not as paths)."""

    train: pa.Table
    validation: pa.Table
    labels: list[str]
    label_counts: list[int] = field(default_factory=list)
    # What preparation dropped or noticed (e.g. {"skipped_images": 3}): shown in the run's `data:` line.
    notes: dict[str, Any] = field(default_factory=dict)
    # `data.streaming`: the training split as a lazy Ray Dataset of the same columns as `train`
    # (which is then empty); Ray Train shards it to the workers (training/streaming.py).
    train_stream: Any = None

    def without_stream(self) -> "PreparedData":
        """What travels to the workers in the loop's config (the stream goes through Ray Train's datasets)."""
        return dataclasses.replace(self, train_stream=None)

    def summary(self) -> dict[str, Any]:
        return {"train_rows": self.train.num_rows, "validation_rows": self.validation.num_rows, "labels": self.labels,
                **self.notes}


@dataclass(frozen=True)
class TaskDefinition:
    name: str
    # transformers.pipeline task name the export must load with.
    pipeline_tag: str
    # Metric that picks the best checkpoint, and whether larger is better.
    default_metric: str
    greater_is_better: bool
    # spec -> [(key path, message, value)]: rules only this task knows (e.g. required columns).
    check_spec: Callable[[Any], list[tuple[str, str, Any]]]
    # spec -> [(key path, message, value)]: cheap data checks (columns exist), for `tunefleet validate`.
    check_data: Callable[[Any], list[tuple[str, str, Any]]]
    # spec -> PreparedData. Runs on the driver before any worker starts, so a missing
    # column or an unknown label costs no cluster time.
    prepare: Callable[[Any], PreparedData]
    # (spec, labels, **load_kwargs) -> torch.nn.Module with pretrained weights and a head sized to
    # the labels; load_kwargs come from the method (e.g. quantization_config) and go to from_pretrained.
    build_model: Callable[..., Any]
    # (spec) -> tokenizer / processor saved with the export.
    build_processor: Callable[[Any], Any]
    # (processor, training) -> collate function: list of rows (dicts) -> dict of tensors with "labels".
    # `training` is False for evaluation (no augmentation).
    build_collator: Callable[[Any, bool], Callable[[list[dict]], dict]]
    # (predictions, references, labels, eval_loss) -> metrics dict (plain floats, plus lists/dicts
    # for reports); predictions and references hold one entry per example, from `eval_outputs`;
    # eval_loss is the mean validation loss per target (perplexity = exp of it).
    compute_metrics: Callable[[list, list, list[str], float], dict[str, Any]]
    # (class weights, label smoothing, device) -> loss(logits, labels); default: cross-entropy over
    # the last dimension, -100 ignored (sequence and token classification alike).
    build_loss: Callable[[list[float] | None, float, Any], Callable] = build_loss
    # (logits, labels) -> (predictions, references), one entry per example, on the CPU.
    eval_outputs: Callable[[Any, Any], tuple[list, list]] = sequence_argmax
    # (model, processor, export_dir) -> None: write the model in the format its standard loader
    # reads. Default: Hugging Face save_pretrained (safetensors) for both.
    save_export: Callable[[Any, Any, Any], None] = None  # type: ignore[assignment]
    # (spec, export_dir, report_dir, manifest) -> dict merged into report/metrics.json; may write
    # task-specific files (sample generations, per-type tables). None: nothing extra.
    report_extras: Callable[[Any, Any, Any, dict], dict] | None = None
    # Column of PreparedData tables that holds each example's length (for length grouping).
    length_column: str = "length"
    # Whether `prepare` honours data.streaming (returns PreparedData.train_stream).
    supports_streaming: bool = False

    def __post_init__(self) -> None:
        if self.save_export is None:
            object.__setattr__(self, "save_export", save_pretrained)


def save_pretrained(model: Any, processor: Any, export_dir: Any) -> None:
    """Hugging Face layout: config + model.safetensors, or for a PEFT model the adapter alone
    (its label names live in tunefleet.json), and the tokenizer / image processor."""
    model.save_pretrained(export_dir, safe_serialization=True)
    processor.save_pretrained(export_dir)
