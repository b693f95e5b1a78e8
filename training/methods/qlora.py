"""`qlora`: the base loaded in 4 bits (bitsandbytes NF4/FP4) with LoRA adapters in full precision.

The task head and any module listed in `keep_full_precision` stay out of
quantisation: quantising a BERT classifier head breaks training (ENVIRONMENT.md),
and a head must train anyway. bitsandbytes 0.50 runs 4-bit layers on the CPU too.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from training.methods.base import MethodDefinition
from training.methods.lora import LoraOptions, lora_config
from training.methods.peft_common import HEAD_NAMES, wrap
from training.methods.registry import METHODS


class QloraOptions(LoraOptions):
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type; NF4 suits normally distributed weights.")
    double_quant: bool = Field(True, description="Quantise the quantisation constants too (~0.4 bit/param saved).")
    compute_dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="dtype of the 4-bit matmuls; auto: bf16 on CUDA, fp32 on CPU.")
    keep_full_precision: list[str] = Field(
        default_factory=list, description="Modules never quantised, besides the task head (classifier/score/lm_head).")


def _compute_dtype(options: QloraOptions, on_cuda: bool) -> torch.dtype:
    if options.compute_dtype == "auto":
        return torch.bfloat16 if on_cuda else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[options.compute_dtype]


def _load_kwargs(options: QloraOptions, on_cuda: bool) -> dict:
    from transformers import BitsAndBytesConfig

    return {"quantization_config": BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=options.quant_type,
        bnb_4bit_use_double_quant=options.double_quant,
        bnb_4bit_compute_dtype=_compute_dtype(options, on_cuda),
        llm_int8_skip_modules=[*HEAD_NAMES, "lm_head", *options.keep_full_precision],
    )}


def _apply(model, options: QloraOptions, task: str):
    from peft import prepare_model_for_kbit_training

    # Casts norms to fp32 and lets inputs carry gradients through the frozen 4-bit base.
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return wrap(model, lora_config(model, task, options))


METHODS.register("qlora", MethodDefinition(
    name="qlora",
    description="4-bit quantised base (bitsandbytes) + LoRA adapters; the head stays in full precision.",
    tasks=frozenset({"text-classification", "token-classification", "causal-lm"}),
    options=QloraOptions,
    apply=_apply,
    export_kind="adapter",
    load_kwargs=_load_kwargs,
))
