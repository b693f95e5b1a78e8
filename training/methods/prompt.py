"""`prompt-tuning` and `prefix-tuning`: learned virtual tokens before the input (PEFT)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from training.methods.base import MethodDefinition
from training.methods.peft_common import PEFT_TASK_TYPES, wrap
from training.methods.registry import METHODS

# Virtual tokens shift positions: fine for a sequence label or next-token loss, not for per-token labels.
TASKS = frozenset({"text-classification", "causal-lm"})


class PromptTuningOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    num_virtual_tokens: int = Field(20, gt=0, le=512, description="Learned tokens prepended to every input.")
    init: Literal["random", "text"] = Field("random", description="Start from random embeddings or from a text's.")
    init_text: str | None = Field(None, description="Text whose token embeddings initialise the prompt (init: text).")


class PrefixTuningOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    num_virtual_tokens: int = Field(20, gt=0, le=512, description="Learned key/value positions in every layer.")
    projection: bool = Field(False, description="Reparameterise the prefix through an MLP (more stable, more parameters).")
    projection_hidden_size: int = Field(512, gt=0, description="Hidden size of that MLP.")


def _apply_prompt(model, options: PromptTuningOptions, task: str):
    from peft import PromptTuningConfig, PromptTuningInit

    if options.init == "text" and not options.init_text:
        raise ValueError("method.init_text: required when method.init is text")
    text_init = options.init == "text"
    config = PromptTuningConfig(
        task_type=PEFT_TASK_TYPES[task],
        num_virtual_tokens=options.num_virtual_tokens,
        prompt_tuning_init=PromptTuningInit.TEXT if text_init else PromptTuningInit.RANDOM,
        prompt_tuning_init_text=options.init_text if text_init else None,
        tokenizer_name_or_path=model.config.name_or_path if text_init else None,
    )
    return wrap(model, config)


def _apply_prefix(model, options: PrefixTuningOptions, task: str):
    from peft import PrefixTuningConfig

    config = PrefixTuningConfig(
        task_type=PEFT_TASK_TYPES[task],
        num_virtual_tokens=options.num_virtual_tokens,
        prefix_projection=options.projection,
        encoder_hidden_size=options.projection_hidden_size,
    )
    return wrap(model, config)


METHODS.register("prompt-tuning", MethodDefinition(
    name="prompt-tuning",
    description="Learned soft prompt embeddings (PEFT prompt tuning); the model stays frozen.",
    tasks=TASKS, options=PromptTuningOptions, apply=_apply_prompt, export_kind="adapter",
))
METHODS.register("prefix-tuning", MethodDefinition(
    name="prefix-tuning",
    description="Learned key/value prefixes in every layer (PEFT prefix tuning).",
    tasks=TASKS, options=PrefixTuningOptions, apply=_apply_prefix, export_kind="adapter",
))
