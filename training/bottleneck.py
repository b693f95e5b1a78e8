"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020) and their export format.

The `adapters` library is tied to transformers 4 and fails to import on
transformers 5 (ENVIRONMENT.md), so tunefleet carries this small module. It is
part of the export format (like training/layout.py): an adapter export holds
`adapter_config.json` with `"peft_type": "TUNEFLEET_BOTTLENECK"` and
`adapter_model.safetensors`, and `load_bottleneck_export` rebuilds the model from
its base, so serving needs no training code.

Placement: each adapter wraps a sublayer's output projection, before the
residual connection and layer norm: after attention and after the feed-forward
block (Houlsby), or after the feed-forward block only (Pfeiffer).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

ADAPTER_TYPE = "TUNEFLEET_BOTTLENECK"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

# Output projections by sublayer, across architectures (BERT, Llama, GPT-2, ViT-style).
ATTENTION_OUTPUTS = ("attention.output.dense", "self_attn.o_proj", "attn.c_proj", "attention.out_proj")
FFN_OUTPUTS = ("output.dense", "mlp.down_proj", "mlp.c_proj", "mlp.fc2")


class Bottleneck(torch.nn.Module):
    """x + up(act(down(x))); `up` starts at zero so training starts from the pretrained function."""

    def __init__(self, wrapped: torch.nn.Linear, reduction_factor: int, activation: str) -> None:
        super().__init__()
        self.wrapped = wrapped
        width = wrapped.out_features
        self.down = torch.nn.Linear(width, max(1, width // reduction_factor))
        self.up = torch.nn.Linear(self.down.out_features, width)
        self.activation = torch.nn.GELU() if activation == "gelu" else torch.nn.ReLU()
        torch.nn.init.zeros_(self.up.weight)
        torch.nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.wrapped(x)
        return hidden + self.up(self.activation(self.down(hidden)))


def _targets(model: torch.nn.Module, placement: str) -> list[str]:
    suffixes = FFN_OUTPUTS + (ATTENTION_OUTPUTS if placement == "houlsby" else ())
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        is_attention = name.endswith(ATTENTION_OUTPUTS)
        if name.endswith(suffixes) and (placement == "houlsby" or not is_attention):
            names.append(name)
    return names


def attach(model: torch.nn.Module, config: dict[str, Any]) -> list[str]:
    """Wrap the target projections in adapters (in place); returns the wrapped names."""
    names = config.get("targets") or _targets(model, config["placement"])
    if not names:
        raise ValueError(f"{type(model).__name__}: no sublayer output projections found for bottleneck adapters")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, Bottleneck(getattr(parent, child), config["reduction_factor"], config["activation"]))
    return names


def save_bottleneck(model: torch.nn.Module, config: dict[str, Any], export_dir: Path) -> None:
    state = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
    save_file(state, str(Path(export_dir) / WEIGHTS_FILE))
    (Path(export_dir) / CONFIG_FILE).write_text(json.dumps({"peft_type": ADAPTER_TYPE, **config}, indent=2) + "\n")


def is_bottleneck_export(export_dir: Path) -> bool:
    path = Path(export_dir) / CONFIG_FILE
    return path.is_file() and json.loads(path.read_text()).get("peft_type") == ADAPTER_TYPE


def load_bottleneck_export(export_dir: Path, base_model: torch.nn.Module) -> torch.nn.Module:
    """The base task model (already built with the right head size) with the export's adapters loaded."""
    config = json.loads((Path(export_dir) / CONFIG_FILE).read_text())
    attach(base_model, config)
    missing = base_model.load_state_dict(load_file(str(Path(export_dir) / WEIGHTS_FILE)), strict=False).unexpected_keys
    if missing:
        raise ValueError(f"{export_dir}: adapter weights {missing[:3]} do not fit {type(base_model).__name__}")
    return base_model
