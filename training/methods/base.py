"""What a method registers: which tasks it fits, its options, and how it marks parameters trainable."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict


class NoOptions(BaseModel):
    """A method without options: any key beside `name` is an error."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class MethodDefinition:
    name: str
    description: str
    # Task names this method makes sense for; validation refuses the rest.
    tasks: frozenset[str]
    # The method's own options (keys beside `name` under `method:`).
    options: type[BaseModel]
    # (model, options, task name) -> model to train, with requires_grad set on what trains.
    apply: Callable[[Any, BaseModel, str], Any]
    # Export kind: "full" writes the whole model; "adapter" writes the adapter alone (PEFT format)
    # with the base model named in tunefleet.json.
    export_kind: str = "full"
    # Whether `tunefleet export --merge` can fold the adapter into the base weights.
    mergeable: bool = False
    # (options, on_cuda) -> extra from_pretrained kwargs (QLoRA's quantization_config).
    load_kwargs: Callable[[BaseModel, bool], dict] | None = None
    # (model, options, step, epoch) -> True when it changed which parameters train (gradual
    # unfreezing); called before every optimizer step, and once on resume.
    schedule: Callable[[Any, BaseModel, int, int], bool] | None = None
    # (model, options, export_dir) -> None: writes the adapter itself when it is not a PEFT model
    # (bottleneck adapters); None: the task's save_export writes the model or PEFT adapter.
    save_adapter: Callable[[Any, BaseModel, Any], None] | None = None
    # (spec, options) -> [(key path, message, value)]: combinations only this method knows to refuse
    # (head's feature cache with augmentation); run at validation once the options are valid.
    # Sections of a job that failed validation are None.
    check_spec: Callable[[Any, BaseModel], list[tuple[str, str, Any]]] | None = None


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameters."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
