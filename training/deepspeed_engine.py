"""DeepSpeed ZeRO inside a Ray Train worker: the config built from the job, the engine, its checkpoints.

The training loop stays one loop. With `scale.deepspeed` set, the model, the
optimizer (tunefleet's torch AdamW over its parameter groups) and the Hugging
Face LR schedule are handed to `deepspeed.initialize`; the loop then calls
`engine(**batch)`, `engine.backward(loss)` and `engine.step()`, which reduce
and partition gradients, clip, step the optimizer and the schedule at the
accumulation boundary the loop sets. Passing a torch optimizer instance avoids
DeepSpeed's FusedAdam / CPUAdam JIT builds (minutes on a CPU machine).

Job → DeepSpeed config:

    scale.deepspeed.stage             zero_optimization.stage
    scale.deepspeed.offload_optimizer zero_optimization.offload_optimizer.device = cpu
    scale.deepspeed.offload_params    zero_optimization.offload_param.device = cpu   (stage 3)
    train.precision                   bf16.enabled / fp16.enabled (dynamic loss scale); fp32: neither
    train.batch_size                  train_micro_batch_size_per_gpu
    train.gradient_accumulation_steps gradient_accumulation_steps
    train.max_grad_norm               gradient_clipping (0: none)

`scale.deepspeed.config` names a raw DeepSpeed JSON instead: its zero/offload/precision
settings are used as written; batch size, accumulation and clipping still come from
`train` (a value there must be "auto", absent, or equal to the job's). If it names an
`optimizer` or `scheduler`, DeepSpeed builds that one instead of tunefleet's.

Checkpoints: every rank calls `engine.save_checkpoint` (a collective) and writes its own
ZeRO partition (`zero/zero_pp_rank_<r>_mp_rank_00_optim_states.pt`, and under ZeRO-3 its
`..._model_states.pt`). DeepSpeed asks torch for its full unpickler when it reads them
(`weights_only` turned off); a checkpoint on shared storage (S3) is not trusted that far. Every
DeepSpeed read here (resume and the export's consolidation) runs inside `_weights_only_loads`:
torch's documented `TORCH_FORCE_WEIGHTS_ONLY_LOAD` switch overrides the caller's choice, and
`safe_globals` admits the four DeepSpeed types the files hold. `check_pickles` runs first so that
a file holding anything else is refused with its path and the offending name.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import torch

from training.layout import ZERO_TAG

# The non-torch types DeepSpeed pickles into ZeRO checkpoints (fp32, bf16 and fp16 runs, stages 1-3).
_CHECKPOINT_TYPES = (
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
)

_FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"  # read by torch.load on every call

BUCKET_ELEMENTS = 50_000_000

# Keys of a raw DeepSpeed config that tunefleet fills from the job's `train` section.
_FROM_TRAIN = {
    "train_micro_batch_size_per_gpu": lambda t: t.batch_size,
    "gradient_accumulation_steps": lambda t: t.gradient_accumulation_steps,
    "gradient_clipping": lambda t: float(t.max_grad_norm or 0.0),
}


def read_raw_config(path: str) -> dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def raw_config_problems(path: str, train: Any) -> list[tuple[str, str, Any]]:
    """(key path, message, value) for a raw config that cannot run as this job."""
    try:
        raw = read_raw_config(path)
    except (OSError, ValueError) as err:
        return [("scale.deepspeed.config", f"not a readable DeepSpeed JSON file: {err}", path)]
    if not isinstance(raw, dict):
        return [("scale.deepspeed.config", "a DeepSpeed config is a JSON object", path)]
    problems = []
    for key, from_train in _FROM_TRAIN.items():
        value = raw.get(key, "auto")
        if value != "auto" and value != from_train(train):
            problems.append((f"scale.deepspeed.config[{key}]",
                             f"differs from the job's train section ({from_train(train)}); set it to \"auto\" or remove it",
                             value))
    if "train_batch_size" in raw and raw["train_batch_size"] != "auto":
        problems.append(("scale.deepspeed.config[train_batch_size]",
                         "is derived from train.batch_size × accumulation × workers; set it to \"auto\" or remove it",
                         raw["train_batch_size"]))
    return problems


def zero_stage(options: Any) -> int:
    """The ZeRO stage a job runs with (a raw config's own, else `stage`)."""
    if options.config:
        return int(read_raw_config(options.config).get("zero_optimization", {}).get("stage", 0))
    return options.stage


def build_config(options: Any, train: Any, precision: torch.dtype | None, on_cuda: bool) -> dict[str, Any]:
    """The DeepSpeed config for `scale.deepspeed` options and the job's `train` section."""
    if options.config:
        config = read_raw_config(options.config)
    else:
        zero: dict[str, Any] = {"stage": options.stage}
        if options.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_cuda}
        if options.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": on_cuda}
        config = {"zero_optimization": zero}
        if precision == torch.bfloat16:
            config["bf16"] = {"enabled": True}
        elif precision == torch.float16:
            config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
        # DeepSpeed's default buckets hold 5e8 elements (2 GB in fp32), and ZeRO-3 allocates its reduce
        # bucket up front: more than a 100M-parameter model's whole partition. 5e7 elements keep the
        # communication batched at a tenth of that memory.
        for key in ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size"):
            zero.setdefault(key, BUCKET_ELEMENTS)
    config.pop("train_batch_size", None)
    for key, from_train in _FROM_TRAIN.items():
        config[key] = from_train(train)
    # A torch AdamW with ZeRO and with CPU offload: allowed on purpose (no FusedAdam/CPUAdam JIT build).
    config.setdefault("zero_allow_untested_optimizer", True)
    config.setdefault("zero_force_ds_cpu_optimizer", False)
    config.setdefault("steps_per_print", 2**31 - 1)  # tunefleet logs its own progress
    config.setdefault("wall_clock_breakdown", False)
    return config


def initialize(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               make_scheduler: Callable[[torch.optim.Optimizer], Any], config: dict[str, Any]):
    """The DeepSpeed engine over `model`; Ray Train has already set up torch.distributed (gloo or NCCL)."""
    import deepspeed

    own_optimizer = "optimizer" not in config
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer if own_optimizer else None,
        model_parameters=None if own_optimizer else [p for p in model.parameters() if p.requires_grad],
        # A callable: DeepSpeed hands it the optimizer it ends up with (ours, or the raw config's).
        lr_scheduler=None if "scheduler" in config else make_scheduler,
        config=config,
    )
    return engine


def input_dtype(engine) -> torch.dtype | None:
    """Floating inputs (pixel values) must match bf16/fp16 weights; None under fp32."""
    if engine.bfloat16_enabled():
        return torch.bfloat16
    if engine.fp16_enabled():
        return torch.float16
    return None


def save(engine, directory: Path) -> None:
    """Every rank writes its own ZeRO files under directory/zero/; frozen weights are not copied."""
    engine.save_checkpoint(str(directory), tag=ZERO_TAG, client_state={}, save_latest=False,
                           exclude_frozen_parameters=True)


def _allowed_types() -> list[type]:
    import importlib

    return [getattr(importlib.import_module(module), name) for module, name in _CHECKPOINT_TYPES]


def check_pickles(directory: Path) -> None:
    """Raise unless every ZeRO file under directory would load with `weights_only=True`."""
    allowed = {f"{module}.{name}" for module, name in _CHECKPOINT_TYPES}
    for path in sorted((Path(directory) / ZERO_TAG).glob("*.pt")):
        try:
            unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path))) - allowed
        except Exception as err:  # torch raises UnpicklingError, EOFError, RuntimeError for bad files
            raise ValueError(f"{path}: not a readable DeepSpeed checkpoint file ({err}); "
                             "resume from another checkpoint or start a new run id") from err
        if unsafe:
            raise ValueError(f"{path}: refusing to unpickle {', '.join(sorted(unsafe))}; a DeepSpeed checkpoint "
                             "holds tensors and DeepSpeed's own state only. Check where this checkpoint came from")


@contextmanager
def _weights_only_loads():
    """Every `torch.load` in this block is weights-only, whatever its caller passes (DeepSpeed passes
    False), with DeepSpeed's own checkpoint types allowed."""
    previous = os.environ.get(_FORCE_WEIGHTS_ONLY)
    os.environ[_FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals(_allowed_types()):
            yield
    finally:
        if previous is None:
            os.environ.pop(_FORCE_WEIGHTS_ONLY, None)
        else:
            os.environ[_FORCE_WEIGHTS_ONLY] = previous


def load(engine, directory: Path) -> None:
    """Exact restore: this rank's partition of weights, optimizer moments and the LR schedule."""
    check_pickles(directory)
    with _weights_only_loads():
        path, _ = engine.load_checkpoint(str(directory), tag=ZERO_TAG, load_module_strict=False,
                                         load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"{directory}: DeepSpeed found no checkpoint under {ZERO_TAG}/")


def consolidated_weights(directory: Path) -> dict[str, Any]:
    """Trainable fp32 weights gathered from every rank's partition, lazily: each tensor is read
    when `.contiguous()` is called, so loading them one by one never holds a second model copy."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    check_pickles(directory)
    with _weights_only_loads():  # lazy mode unpickles every file here; tensors are read from mmaps later
        return get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=ZERO_TAG,
                                                        exclude_frozen_parameters=True, lazy_mode=True)
