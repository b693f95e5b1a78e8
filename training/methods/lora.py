"""`lora`: low-rank adapters on the attention / projection layers (PEFT); the task head trains in full."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from training.methods.base import MethodDefinition
from training.methods.peft_common import PeftOptions, auto_targets, peft_task_kwargs, wrap
from training.methods.registry import METHODS

TASKS = frozenset({"text-classification", "token-classification", "causal-lm", "image-classification"})


class LoraOptions(PeftOptions):
    r: int = Field(8, gt=0, description="Rank of the low-rank update.")
    alpha: float = Field(16, gt=0, description="Scaling: the update is multiplied by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter's input.")
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases train.")


def lora_config(model, task: str, options: LoraOptions):
    """A peft.LoraConfig (peft imported here: validating a job file should not pay for it)."""
    from peft import LoraConfig
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    targets = auto_targets(model, TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING) \
        if options.target_modules == "auto" else options.target_modules
    return LoraConfig(r=options.r, lora_alpha=options.alpha, lora_dropout=options.dropout, bias=options.bias,
                      target_modules=targets, **peft_task_kwargs(model, task, options))


def _apply(model, options: LoraOptions, task: str):
    return wrap(model, lora_config(model, task, options))


METHODS.register("lora", MethodDefinition(
    name="lora",
    description="Low-rank adapters (PEFT LoRA); the base stays frozen, the head trains.",
    tasks=TASKS,
    options=LoraOptions,
    apply=_apply,
    export_kind="adapter",
    mergeable=True,
))
