"""`adapter`: bottleneck adapters (Houlsby or Pfeiffer placement); tunefleet's own small module.

The modules and their saved format live in training/bottleneck.py (part of the
export format, so serving can load them without training code).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from training import bottleneck
from training.methods.base import MethodDefinition
from training.methods.peft_common import head_modules
from training.methods.registry import METHODS


class AdapterOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    placement: Literal["houlsby", "pfeiffer"] = Field(
        "houlsby", description="houlsby: after attention and feed-forward; pfeiffer: after feed-forward only.")
    reduction_factor: int = Field(16, gt=0, description="Bottleneck width = hidden size / this.")
    activation: Literal["relu", "gelu"] = Field("relu", description="Nonlinearity inside the bottleneck.")
    train_layer_norms: bool = Field(True, description="Layer norms train too (as Houlsby et al. do).")


def _config(options: AdapterOptions, targets: list[str]) -> dict:
    return {"placement": options.placement, "reduction_factor": options.reduction_factor,
            "activation": options.activation, "targets": targets}


def _apply(model, options: AdapterOptions, task: str):
    targets = bottleneck.attach(model, _config(options, []))
    model._tunefleet_adapter_targets = targets  # saved with the adapter
    heads = tuple(head_modules(model))
    norms = {id(p) for m in model.modules() if isinstance(m, torch.nn.LayerNorm) or "RMSNorm" in type(m).__name__
             for p in m.parameters()}
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(
            ".down." in name or ".up." in name or name.startswith(heads)
            or (options.train_layer_norms and id(parameter) in norms)
        )
    return model


def _save(model, options: AdapterOptions, export_dir) -> None:
    config = _config(options, model._tunefleet_adapter_targets)
    config["base_model_name_or_path"] = getattr(model.config, "name_or_path", None)
    bottleneck.save_bottleneck(model, config, export_dir)


METHODS.register("adapter", MethodDefinition(
    name="adapter",
    description="Bottleneck adapters (Houlsby / Pfeiffer) with the head; saved like a PEFT adapter.",
    tasks=frozenset({"text-classification", "token-classification", "causal-lm", "image-classification"}),
    options=AdapterOptions,
    apply=_apply,
    export_kind="adapter",
    save_adapter=_save,
))
