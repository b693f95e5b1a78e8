"""The optimizer: AdamW parameter groups (no decay on biases and norms, optional layer-wise learning-rate
decay), and the AdamW implementation a job names (torch, or bitsandbytes 8-bit / paged)."""

from __future__ import annotations

import re
from typing import Any, Literal

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


# ---- the optimizer: torch AdamW, or bitsandbytes' 8-bit / paged AdamW -----------------------------

OptimizerName = Literal["adamw", "adamw-8bit", "paged-adamw", "paged-adamw-8bit"]
OPTIMIZER_HELP = (
    "adamw: torch AdamW (8 bytes of state per trained parameter). adamw-8bit: bitsandbytes' block-wise 8-bit AdamW "
    "(2 bytes per parameter; on CUDA and on the CPU, where its step is several times slower than adamw's). "
    "paged-adamw / paged-adamw-8bit: their state in CUDA unified memory, paged out to CPU memory when the GPU runs "
    "short (QLoRA's recipe); GPU only: with scale.use_gpu auto on a worker without a GPU they fall back to adamw / "
    "adamw-8bit with a warning. Not with scale.deepspeed."
)
# name -> (bitsandbytes.optim class or None for torch's, what it falls back to on a worker without CUDA)
_OPTIMIZERS: dict[str, tuple[str | None, str | None]] = {
    "adamw": (None, None),
    "adamw-8bit": ("AdamW8bit", None),
    "paged-adamw": ("PagedAdamW", "adamw"),
    "paged-adamw-8bit": ("PagedAdamW8bit", "adamw-8bit"),
}


_FUSED_DEVICES = ("cpu", "cuda")  # torch's fused AdamW kernels used here


def _needs_cuda(name: str) -> bool:
    return _OPTIMIZERS[name][1] is not None


def optimizer_problems(name: str, use_gpu: str | bool, deepspeed: bool) -> list[tuple[str, str, Any]]:
    """(key path, message, value) for an optimizer the job's devices cannot run, found at validation."""
    problems = []
    if name != "adamw" and deepspeed:
        problems.append(("train.optimizer", "bitsandbytes optimizers are not used under scale.deepspeed (ZeRO "
                         "partitions and may offload the optimizer state itself); use adamw, or plain DDP", name))
    if _needs_cuda(name) and use_gpu is False:
        problems.append(("train.optimizer", f"{name} needs a GPU (it pages its state between GPU and CPU memory; "
                         f"bitsandbytes has no paged optimizer on the CPU) and scale.use_gpu is false: use "
                         f"{_OPTIMIZERS[name][1]}, or scale.use_gpu: auto / true", name))
    return problems


def build_optimizer(name: str, groups: list[dict], learning_rate: float, device: torch.device
                    ) -> tuple[torch.optim.Optimizer, str]:
    """(optimizer, the name actually built): a paged optimizer on a worker without CUDA (scale.use_gpu: auto
    on a CPU cluster) falls back to its unpaged twin, with a warning, rather than fail the run."""
    if _needs_cuda(name) and device.type != "cuda":
        fallback = _OPTIMIZERS[name][1]
        print(f"WARNING: train.optimizer {name} needs a GPU and this worker has none ({device}); "
              f"training with {fallback} instead")
        name = fallback
    class_name = _OPTIMIZERS[name][0]
    if class_name is None:
        # torch's AdamW defaults to its per-tensor Python loop off CUDA (foreach only for CUDA tensors);
        # the fused kernel does the same update ~9x faster on CPU (MiniLM: ~60 -> 7 ms a step, about 7%
        # of a training step) and is what the HF Trainer uses by default (optim="adamw_torch_fused").
        return torch.optim.AdamW(groups, lr=learning_rate, fused=device.type in _FUSED_DEVICES), name
    import bitsandbytes.optim

    return getattr(bitsandbytes.optim, class_name)(groups, lr=learning_rate), name


def lr_schedule(name: Literal["linear", "cosine", "constant"], optimizer: torch.optim.Optimizer,
                warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning-rate schedule, the same multipliers as `transformers.get_scheduler(name, ...)`.

    Why not call transformers: importing `transformers.optimization` imports `trainer_utils`, which
    imports peft and, through it, bitsandbytes: ~3 s in every training worker before its first step
    (`python -X importtime -c "import transformers.optimization"`), for three one-line formulas.
    Same state as transformers' (a LambdaLR), so checkpoints resume either way;
    tests/training/test_optim.py checks every step against transformers.
    """
    warmup, total = warmup_steps, total_steps

    def warming(step: int) -> float | None:
        return step / max(1, warmup) if step < warmup else None

    def linear(step: int) -> float:
        rising = warming(step)
        return rising if rising is not None else max(0.0, (total - step) / max(1, total - warmup))

    def cosine(step: int) -> float:  # half a cosine from the peak to 0, as transformers' num_cycles=0.5
        import math

        rising = warming(step)
        if rising is not None:
            return rising
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    def constant(step: int) -> float:  # transformers' "constant": no warmup
        return 1.0

    multipliers = {"linear": linear, "cosine": cosine, "constant": constant}
    if name not in multipliers:
        raise ValueError(f"unknown scheduler {name!r}; one of {', '.join(multipliers)}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, multipliers[name])
