"""What a task registers: how its data is prepared, its model built, its loss and metrics computed.

A task is a `TaskDefinition` of plain functions, registered once in its own
module. The training loop, the checkpoint and the export only ever call these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import pyarrow as pa


@dataclass(frozen=True)
class PreparedData:
    """Tokenized splits as Arrow tables (they travel to Ray workers as data, not as paths)."""

    train: pa.Table
    validation: pa.Table
    labels: list[str]
    label_counts: list[int] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"train_rows": self.train.num_rows, "validation_rows": self.validation.num_rows, "labels": self.labels}


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
    # (spec, labels) -> torch.nn.Module with pretrained weights and a head sized to the labels.
    build_model: Callable[[Any, list[str]], Any]
    # (spec) -> tokenizer / processor saved with the export.
    build_processor: Callable[[Any], Any]
    # (processor) -> collate function: list of rows (dicts) -> dict of tensors with "labels".
    build_collator: Callable[[Any], Callable[[list[dict]], dict]]
    # (predictions, references, labels) -> metrics dict (plain floats, plus lists for reports).
    compute_metrics: Callable[[Any, Any, list[str]], dict[str, Any]]
    # Column of PreparedData tables that holds each example's length (for length grouping).
    length_column: str = "length"
