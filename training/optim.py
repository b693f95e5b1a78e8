"""AdamW parameter groups: no decay on biases and norms, optional layer-wise learning-rate decay."""

from __future__ import annotations

import re

import torch

_LAYER = re.compile(r"\.(?:layer|layers|h|blocks|block|features)\.(\d+)\.")


def _depth(name: str, top: int) -> int:
    """0 for embeddings, i+1 for block i, top for everything above the blocks (head, final norm)."""
    match = _LAYER.search(name)
    if match:
        return int(match.group(1)) + 1
    return 0 if "embed" in name else top


def parameter_groups(model: torch.nn.Module, learning_rate: float, weight_decay: float,
                     layer_lr_decay: float | None = None, include_frozen: bool = False) -> list[dict]:
    """Groups for AdamW. With layer_lr_decay d, a parameter k levels below the top gets lr·d^k
    (discriminative fine-tuning, as ULMFiT and ELECTRA do). include_frozen keeps parameters that
    do not train yet (a schedule may unfreeze them; AdamW skips them while they have no gradient)."""
    named = [(n, p) for n, p in model.named_parameters() if include_frozen or p.requires_grad]
    blocks = [int(m.group(1)) for n, _ in named if (m := _LAYER.search(n))]
    top = (max(blocks) + 2) if blocks else 1
    groups: dict[tuple[int, bool], list] = {}
    for name, parameter in named:
        depth = _depth(name, top) if layer_lr_decay else top
        decays = parameter.ndim >= 2 and "norm" not in name.lower()
        groups.setdefault((depth, decays), []).append(parameter)
    return [
        {"params": params, "weight_decay": weight_decay if decays else 0.0,
         "lr": learning_rate * (layer_lr_decay ** (top - depth) if layer_lr_decay else 1.0)}
        for (depth, decays), params in sorted(groups.items())
    ]
