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
    # (model, options) -> model to train, with requires_grad set on what trains.
    apply: Callable[[Any, BaseModel], Any]
    # Export kind: "full" writes the whole model; adapter methods write the adapter alone.
    export_kind: str = "full"


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameters."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
