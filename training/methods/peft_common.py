"""What every PEFT-based method shares: the task type, the head kept trainable, 'auto' targets."""

from __future__ import annotations

import warnings
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

# peft asks every model it wraps for `is_gradient_checkpointing`, which transformers 5 deprecates in favour of
# `is_activation_checkpointing`: a FutureWarning in each PEFT run's output that only peft can act on.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

PEFT_TASK_TYPES = {
    "text-classification": "SEQ_CLS",
    "token-classification": "TOKEN_CLS",
    "causal-lm": "CAUSAL_LM",
    "image-classification": None,  # PEFT has no task type for it: the head goes in modules_to_save
}

# Head module names across Hugging Face task models (and tunefleet's torchvision wrapper).
HEAD_NAMES = ("classifier", "score", "head", "fc")


class PeftOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    target_modules: Literal["auto"] | list[str] = Field(
        "auto", description="Modules to adapt; auto: PEFT's per-architecture default (attention projections), "
        "else every Linear and ungrouped Conv2d outside the head.")
    modules_to_save: list[str] | None = Field(
        None, description="Extra modules trained in full and saved with the adapter; the task head always is.")


def head_modules(model: torch.nn.Module) -> list[str]:
    """Top-level head modules of a task model (trained in full, saved with the adapter)."""
    return [name for name, _ in model.named_children() if name in HEAD_NAMES]


def auto_targets(model: torch.nn.Module, mapping: dict[str, list[str]]) -> list[str] | None:
    """PEFT's own default for known architectures (None lets PEFT pick it); else every Linear and
    every ungrouped Conv2d outside the head, by full name.

    Full names, not leaf names: PEFT matches a name by its ending, and a torchvision CNN's leaves are
    Sequential indices ("0", "1"), which also end the names of whole blocks PEFT cannot adapt. A grouped
    (depthwise) convolution is left out: PEFT's LoRA needs its rank divisible by the groups and cannot
    merge it, and a torchvision export is merged weights.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in mapping:
        return None
    heads = tuple(head_modules(model))
    names = [
        name
        for name, module in model.named_modules()
        if (isinstance(module, torch.nn.Linear) or isinstance(module, torch.nn.Conv2d) and module.groups == 1)
        and not name.startswith(heads)
    ]
    return sorted(names) or None


def peft_task_kwargs(model: torch.nn.Module, task: str, options: Any) -> dict[str, Any]:
    """task_type and modules_to_save for a PEFT config."""
    task_type = PEFT_TASK_TYPES.get(task)
    save = list(options.modules_to_save or [])
    if task != "causal-lm":
        save += [name for name in head_modules(model) if name not in save]
    return {"task_type": task_type, "modules_to_save": save or None}


def wrap(model: torch.nn.Module, config) -> torch.nn.Module:
    from peft import get_peft_model

    return get_peft_model(model, config)
