"""Which adapters can share base-model replicas, and what a model name may be (no torch: the root app imports it).

Adapters in one pool share the base model, the task and the head's size (number of labels),
and are one adapter type (PEFT's peft_type, or TUNEFLEET_BOTTLENECK): their `PoolKey`. The
serve plan groups adapter exports by it; a registration must match a served pool's key.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from training.layout import ExportInfo

# A model name is one URL path segment (/v1/models/{name}/predict) and a Serve application name.
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
NAME_RULE = "must be letters, digits, '.', '_' or '-', starting with a letter or digit"

# Tasks whose handlers take (info, spec, model, tokenizer, device): an adapter's handler shares the pool's model.
BASE_MODEL_CLASSES = {
    "text-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "causal-lm": "AutoModelForCausalLM",
}


@dataclass(frozen=True)
class PoolKey:
    """What adapters must share to be served by one set of base-model replicas."""

    base_model: str
    task: str
    num_labels: int  # 0 for causal LMs (no head)
    kind: str  # PEFT's peft_type (LORA, IA3, ...) or TUNEFLEET_BOTTLENECK

    def describe(self) -> str:
        head = f", {self.num_labels} labels" if self.num_labels else ""
        return f"{self.kind} adapters over {self.base_model} ({self.task}{head})"


def pool_key(info: ExportInfo, adapter_config: dict[str, Any] | None) -> PoolKey:
    """The pool an adapter export joins; ValueError when it cannot be multiplexed."""
    if not info.adapter or adapter_config is None:
        raise ValueError("not an adapter export (tunefleet.json adapter: false, or no adapter_config.json)")
    if info.task not in BASE_MODEL_CLASSES:
        raise ValueError(f"task {info.task!r} adapters cannot be multiplexed; multiplexed tasks: "
                         f"{', '.join(sorted(BASE_MODEL_CLASSES))}")
    kind = str(adapter_config.get("peft_type") or "")
    if not kind:
        raise ValueError("adapter_config.json names no peft_type")
    num_labels = 0 if info.task == "causal-lm" else len(info.labels)
    return PoolKey(base_model=info.base_model, task=info.task, num_labels=num_labels, kind=kind)


def pool_app_name(key: PoolKey) -> str:
    """A stable application name for a pool: `adapters-<base dir or hub name>-<digest>`."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", key.base_model.rstrip("/").rsplit("/", 1)[-1]).strip("-.")[:40] or "base"
    digest = hashlib.sha256(repr((key.base_model, key.task, key.num_labels, key.kind)).encode()).hexdigest()[:8]
    return f"adapters-{stem}-{digest}"
