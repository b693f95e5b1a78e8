"""`gradual-unfreeze`: train the head first, then unfreeze backbone blocks from the top on a schedule.

ULMFiT's recipe. The schedule is a pure function of (step, epoch), so a resumed
run recomputes which blocks train; pair it with `train.layer_lr_decay` for
discriminative learning rates (lower layers learn slower).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from training.methods.base import MethodDefinition
from training.methods.head import backbone_of
from training.methods.registry import METHODS


class GradualUnfreezeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    every: int = Field(1, gt=0, description="Unfreeze more blocks every this many `unit`s.")
    unit: Literal["epochs", "steps"] = Field("epochs", description="What `every` counts.")
    blocks_per_stage: int = Field(1, gt=0, description="Blocks unfrozen at each stage, from the top down.")
    unfreeze_embeddings: bool = Field(True, description="Unfreeze the embeddings once every block trains.")


def backbone_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The backbone's stack of blocks: its longest ModuleList / Sequential (encoder layers, features)."""
    stacks = [m for m in backbone_of(model).modules() if isinstance(m, (torch.nn.ModuleList, torch.nn.Sequential))]
    if not stacks:
        raise ValueError(f"{type(model).__name__}: no stack of blocks to unfreeze; use method head or full")
    return list(max(stacks, key=len))


def _schedule(model, options: GradualUnfreezeOptions, step: int, epoch: int) -> bool:
    """Set which backbone parameters train at (step, epoch); True when that changed."""
    stage = (epoch if options.unit == "epochs" else step) // options.every
    blocks = backbone_blocks(model)
    open_count = min(len(blocks), stage * options.blocks_per_stage)
    open_ids = {id(p) for block in blocks[len(blocks) - open_count:] for p in block.parameters()}
    all_open = open_count == len(blocks) and options.unfreeze_embeddings
    changed = False
    for parameter in backbone_of(model).parameters():
        wanted = all_open or id(parameter) in open_ids
        if parameter.requires_grad != wanted:
            parameter.requires_grad_(wanted)
            changed = True
    return changed


def _apply(model, options: GradualUnfreezeOptions, task: str):
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    _schedule(model, options, step=0, epoch=0)
    return model


METHODS.register("gradual-unfreeze", MethodDefinition(
    name="gradual-unfreeze",
    description="Head first, then backbone blocks unfrozen from the top every N epochs or steps.",
    tasks=frozenset({"text-classification", "token-classification", "image-classification"}),
    options=GradualUnfreezeOptions,
    apply=_apply,
    schedule=_schedule,
))
