"""`scale.deepspeed`: the DeepSpeed ZeRO options of a job, and the combinations refused at validation.

The mapping onto a DeepSpeed config lives in training/deepspeed_engine.py; docs/scale.md explains both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from training.deepspeed_engine import raw_config_problems
from training.deepspeed_engine import zero_stage as deepspeed_zero_stage
from training.methods import METHODS


class DeepSpeedSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    stage: int = Field(2, ge=0, le=3, description="ZeRO stage: 0 replicates everything (DDP-like), 1 partitions the "
                       "optimizer state, 2 also gradients, 3 also the weights.")
    offload_optimizer: bool = Field(False, description="Keep the optimizer state (and its step) in CPU memory: "
                                    "less GPU memory, slower steps. Stages 1-3.")
    offload_params: bool = Field(False, description="Keep the weights in CPU memory between uses (stage 3 only).")
    config: str | None = Field(
        None, description="A raw DeepSpeed JSON config for experts, used instead of the keys above; batch size, "
        "accumulation and clipping still come from `train` (in the file: \"auto\", absent, or the same values); "
        "precision as the file sets it.")


def deepspeed_problems(spec: Any) -> list[tuple[str, str, Any]]:
    """Combinations DeepSpeed cannot train, refused before any cluster time is spent."""
    zero = spec.scale.deepspeed if spec.scale is not None else None
    if zero is None:
        return []
    problems: list[tuple[str, str, Any]] = []
    stage = zero.stage
    if zero.config is not None:
        if not Path(zero.config).expanduser().is_file():
            return []  # reported with the other missing paths
        if spec.train is not None:
            problems += raw_config_problems(zero.config, spec.train)
        stage = deepspeed_zero_stage(zero)
    elif zero.offload_params and stage != 3:
        problems.append(("scale.deepspeed.offload_params",
                         f"needs stage 3 (weights are only partitioned there); got stage {stage}", True))
    if zero.config is None and zero.offload_optimizer and stage == 0:
        problems.append(("scale.deepspeed.offload_optimizer", "needs stage 1, 2 or 3", True))
    method = spec.method.name if spec.method is not None else None
    if method == "qlora" and stage == 3:
        # Upstream: 4-bit (bitsandbytes) weights cannot be partitioned by ZeRO-3; training goes
        # wrong or saves an empty adapter. ZeRO-2 partitions optimizer state and gradients only.
        problems.append(("scale.deepspeed.stage", "qlora cannot train under ZeRO-3 (4-bit weights cannot be "
                         "partitioned; the adapter comes out empty); use stage 2", stage))
    if method is not None and method in METHODS and METHODS.get(method).schedule is not None:
        problems.append(("scale.deepspeed", f"method {method} changes which parameters train during the run; "
                         "DeepSpeed fixes them at start: use plain DDP (scale.deepspeed: null)", None))
    return problems
