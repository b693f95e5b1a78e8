"""`ia3`: learned rescaling vectors on keys, values and feed-forward activations (PEFT IA3)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from training.methods.base import MethodDefinition
from training.methods.peft_common import PeftOptions, auto_targets, peft_task_kwargs, wrap
from training.methods.registry import METHODS


class IA3Options(PeftOptions):
    feedforward_modules: Literal["auto"] | list[str] = Field(
        "auto", description="Which targets are feed-forward layers (scaled on their input); auto: PEFT's default.")


def _apply(model, options: IA3Options, task: str):
    # peft is imported here, not at the top: validating a job file (the CLI) should not pay for it.
    from peft import IA3Config
    from peft.utils import (TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING,
                            TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING)

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if options.target_modules == "auto":
        targets = auto_targets(model, TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING)
    else:
        targets = options.target_modules
    if options.feedforward_modules != "auto":
        feedforward = options.feedforward_modules
    elif targets is None:
        feedforward = TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.get(model_type)
    else:
        feedforward = []
    config = IA3Config(target_modules=targets, feedforward_modules=feedforward, **peft_task_kwargs(model, task, options))
    return wrap(model, config)


METHODS.register("ia3", MethodDefinition(
    name="ia3",
    description="IA3 rescaling vectors (PEFT); fewest trainable parameters of the adapter methods.",
    tasks=frozenset({"text-classification", "token-classification", "causal-lm", "image-classification"}),
    options=IA3Options,
    apply=_apply,
    export_kind="adapter",
    mergeable=True,
))
