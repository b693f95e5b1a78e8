"""One training checkpoint: a shard per rank and a manifest that makes it complete.

    checkpoint_<timestamp>/
      manifest.json          step, epoch, metrics, world size, shards, every file with its size (written last)
      rank_00000/            model.safetensors, optimizer.pt (optimizer + scheduler), trainer_state.pt
      rank_00001/            trainer_state.pt (this rank's RNG states and data position)
      zero/                  DeepSpeed runs: each rank's ZeRO partition (zero_pp_rank_<r>_*_states.pt);
                             rank_00000/ then holds the schedule alone (and model.safetensors at stage 0)

Each rank hands its own directory to `ray.train.report`; Ray Train merges them
into one checkpoint directory on storage. With data parallelism the model and
optimizer are replicated, so rank 0 holds them once; what differs per rank is
its RNG stream. With ZeRO (stage >= 1) weights and optimizer moments are
partitioned, and every rank writes its own part. Before rank 0 writes the
manifest, the ranks exchange the names and sizes of what they wrote; a
checkpoint counts only when the manifest exists and every file it lists is
there at that size (an upload cut short leaves a checkpoint that never counts).

Loading never unpickles code from tunefleet's files: weights are safetensors,
and the `.pt` files hold tensors and plain containers only, read with
`weights_only=True`. DeepSpeed's own files are checked and read weights-only too
(training/deepspeed_engine.py).

Resume (`plan_resume`, `restore`) says what holds:
- same workers, same mode (DDP, or DeepSpeed at the same stage): exact: weights,
  optimizer moments, schedule, each rank's RNG and data position;
- DDP checkpoint on another worker count: exact weights, optimizer and schedule; the
  data position is rescaled to the same number of examples seen; new ranks get fresh RNG;
- ZeRO checkpoint on another worker count, or a switch between DDP and DeepSpeed or
  between stages: the fp32 weights are consolidated from every partition (exact), the
  schedule continues, the data position is rescaled, and the AdamW moments restart
  from zero (they are partitioned by the old worker count; resharding them is not done).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

import torch.distributed as dist

from training.layout import CHECKPOINT_MANIFEST, MODEL_WEIGHTS, OPTIMIZER_STATE, TRAINER_STATE, shard_dir_name
from training.storage import StorageDir, as_storage, write_whole


@dataclass
class TrainState:
    """Where training stands; enough to continue exactly where it stopped."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches this rank already trained on in `epoch`
    best_metric: float | None = None
    evals_without_improvement: int = 0


class IncompleteCheckpointError(RuntimeError):
    pass


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_shard(
    directory: Path, rank: int, world_size: int, model: torch.nn.Module, optimizer, scheduler,
    state: TrainState, metrics: dict[str, Any], extra: dict[str, Any] | None = None,
    engine: Any = None, zero_stage: int | None = None,
) -> None:
    """Write this rank's shard; rank 0 writes the replicated state and, last, the manifest.

    With a DeepSpeed `engine` every rank must call this (saving is a collective)."""
    directory = Path(directory)
    shard = directory / shard_dir_name(rank)
    shard.mkdir(parents=True, exist_ok=True)
    torch.save({"state": asdict(state), "rng": _rng_state()}, shard / TRAINER_STATE)
    partitioned = engine is not None and (zero_stage or 0) >= 1
    if engine is not None:
        from training import deepspeed_engine

        deepspeed_engine.save(engine, directory)
    if rank == 0:
        if not partitioned:
            save_file(trainable_state(model), str(shard / MODEL_WEIGHTS))
        states = {"scheduler": scheduler.state_dict()}
        if engine is None:
            states["optimizer"] = optimizer.state_dict()
        torch.save(states, shard / OPTIMIZER_STATE)
    files = _gather_files(directory, world_size)
    if rank != 0:
        return
    manifest = {
        "step": state.step,
        "epoch": state.epoch,
        "world_size": world_size,
        "shards": [shard_dir_name(r) for r in range(world_size)],
        "weights": "zero" if partitioned else "safetensors",
        "deepspeed": None if engine is None else {"stage": zero_stage},
        "files": files,
        "metrics": metrics,
        **(extra or {}),
    }
    write_whole(directory / CHECKPOINT_MANIFEST, json.dumps(manifest, indent=2))  # whole or absent, never cut


def _gather_files(directory: Path, world_size: int) -> dict[str, int]:
    """Every rank's files (relative path -> bytes), so the manifest can list what all of them wrote."""
    own = {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()}
    if world_size == 1 or not dist.is_initialized():
        return own
    gathered: list[dict[str, int]] = [{} for _ in range(world_size)]
    dist.all_gather_object(gathered, own)
    return {path: size for files in gathered for path, size in files.items()}


def read_manifest(directory: "Path | StorageDir") -> dict[str, Any]:
    """The manifest of a complete checkpoint; IncompleteCheckpointError if anything is missing."""
    storage = as_storage(directory)
    if not storage.exists(CHECKPOINT_MANIFEST):
        raise IncompleteCheckpointError(f"{storage.uri}: no {CHECKPOINT_MANIFEST}; the checkpoint was not finished")
    try:
        manifest = json.loads(storage.read_text(CHECKPOINT_MANIFEST))
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError both are
        # Ray Train copies the checkpoint's files to storage in no set order: a copy stopped mid-way can leave
        # the manifest itself cut short (a written manifest always ends in its closing brace, so it never parses).
        raise IncompleteCheckpointError(f"{storage.uri}: {CHECKPOINT_MANIFEST} cut short ({error})") from None
    present = storage.files()
    expected = dict(manifest.get("files", {}))
    for shard in manifest["shards"]:
        expected.setdefault(f"{shard}/{TRAINER_STATE}", None)
    if manifest.get("weights", "safetensors") == "safetensors":
        expected.setdefault(f"{shard_dir_name(0)}/{MODEL_WEIGHTS}", None)
    wrong = [path for path, size in expected.items() if path not in present or size not in (None, present[path])]
    if wrong:
        raise IncompleteCheckpointError(f"{storage.uri}: files missing or cut short: {wrong[:5]}")
    return manifest


def complete_checkpoints(checkpoints_dir: "Path | StorageDir") -> list[tuple[StorageDir, dict[str, Any]]]:
    """Every finished checkpoint under a run's checkpoints/ (manifest and every listed file present), oldest first."""
    found = []
    for directory in as_storage(checkpoints_dir).list_dirs():
        if not directory.name.startswith("checkpoint_"):
            continue
        try:
            found.append((directory, read_manifest(directory)))
        except IncompleteCheckpointError:
            continue
    return found


def newest_complete(checkpoints_dir: "Path | StorageDir") -> tuple[StorageDir, dict[str, Any]] | None:
    """The finished checkpoint with the highest step (the one a restart continues from)."""
    found = complete_checkpoints(checkpoints_dir)
    return max(found, key=lambda item: (item[1]["step"], item[0].name)) if found else None


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What training changes: parameters that train, and persistent buffers (BatchNorm statistics).

    Frozen pretrained weights are not copied into every checkpoint: the model is
    rebuilt from its pretrained source (and method) first, then this is loaded on
    top. Tied parameters are written once.
    """
    state, seen = {}, set()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad and id(parameter) not in seen:
            seen.add(id(parameter))
            state[name] = parameter.detach().contiguous().cpu()
    persistent = model.state_dict(keep_vars=True)
    for name, buffer in model.named_buffers():
        if name in persistent and id(buffer) not in seen:
            seen.add(id(buffer))
            state[name] = buffer.detach().contiguous().cpu()
    return state


def load_model_weights(directory: Path, model: torch.nn.Module) -> None:
    """Load a checkpoint's trainable state onto a model rebuilt the same way (task + method).

    A ZeRO checkpoint is consolidated from every rank's partition, one tensor at a
    time into the model's own parameters (never a second full copy in memory)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest.get("weights") == "zero":
        from training import deepspeed_engine

        state = deepspeed_engine.consolidated_weights(directory)
        _copy_lazily(directory, state, model)
    else:
        state = load_file(str(directory / shard_dir_name(0) / MODEL_WEIGHTS))
        unexpected = model.load_state_dict(state, strict=False).unexpected_keys
        if unexpected:
            raise IncompleteCheckpointError(f"{directory}: weights {unexpected[:3]} do not fit this model; "
                                            "was it saved by another task or method?")
    empty = [name for name, tensor in state.items() if math.prod(tensor.shape) == 0]
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    if empty or (trained and not any(name in state for name in trained)):
        raise IncompleteCheckpointError(
            f"{directory}: the checkpoint holds no weights for the parameters that train ({(empty or trained)[:3]}); "
            "it was saved empty (e.g. an adapter under ZeRO-3 saved without gathering its partitions)"
        )


def _copy_lazily(directory: Path, state: dict[str, Any], model: torch.nn.Module) -> None:
    targets = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    unexpected = [name for name in state if name not in targets]
    if unexpected:
        raise IncompleteCheckpointError(f"{directory}: weights {unexpected[:3]} do not fit this model; "
                                        "was it saved by another task or method?")
    with torch.no_grad():
        for name, lazy in state.items():
            if lazy.shape != targets[name].shape:
                raise IncompleteCheckpointError(
                    f"{directory}: {name} has shape {tuple(lazy.shape)}, the model {tuple(targets[name].shape)}")
            targets[name].copy_(lazy.contiguous())


@dataclass(frozen=True)
class ResumePlan:
    """How a run continues from a checkpoint (see the module docstring for what holds)."""

    directory: Path
    manifest: dict[str, Any]
    engine_restores: bool  # DeepSpeed reloads its own partitions (weights, moments, schedule)
    optimizer: str  # "restored" or "reset"
    reason: str

    @property
    def weights_first(self) -> bool:
        """Load weights into the bare model before DDP / DeepSpeed wraps (and partitions) it."""
        return not self.engine_restores


def plan_resume(directory: Path, world_size: int, zero_stage: int | None) -> ResumePlan:
    """zero_stage: the DeepSpeed stage this run uses, None for plain DDP."""
    manifest = read_manifest(directory)
    saved_world, saved_ds = manifest["world_size"], manifest.get("deepspeed")
    saved_stage = None if saved_ds is None else saved_ds["stage"]
    same_world = saved_world == world_size
    if saved_stage is None and zero_stage is None:
        reason = "same workers" if same_world else f"DDP (replicated): data position rescaled from {saved_world} workers"
        return ResumePlan(Path(directory), manifest, False, "restored", reason)
    if saved_stage is not None and saved_stage == zero_stage and same_world:
        return ResumePlan(Path(directory), manifest, True, "restored", "same workers and ZeRO stage")
    before = "DDP" if saved_stage is None else f"ZeRO-{saved_stage}"
    now = "DDP" if zero_stage is None else f"ZeRO-{zero_stage}"
    return ResumePlan(Path(directory), manifest, False, "reset",
                      f"saved by {saved_world} worker(s) with {before}, resumed by {world_size} with {now}: "
                      "weights restored exactly (consolidated from ZeRO partitions), schedule continues, "
                      "AdamW moments restart")


def restore(plan: ResumePlan, rank: int, world_size: int, optimizer, scheduler, engine: Any = None) -> TrainState:
    """After the model is wrapped: optimizer, schedule, this rank's RNG and data position."""
    directory = plan.directory
    if plan.engine_restores:
        from training import deepspeed_engine

        deepspeed_engine.load(engine, directory)
    else:
        states = torch.load(directory / shard_dir_name(0) / OPTIMIZER_STATE, weights_only=True, map_location="cpu")
        if plan.optimizer == "restored":
            optimizer.load_state_dict(states["optimizer"])
        scheduler.load_state_dict(states["scheduler"])
        if plan.optimizer == "reset":  # a fresh optimizer starts at the schedule's current rate
            for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
                group["lr"] = lr
    saved_world = plan.manifest["world_size"]
    own = directory / shard_dir_name(rank)
    shard = torch.load((own if rank < saved_world else directory / shard_dir_name(0)) / TRAINER_STATE, weights_only=True)
    state = TrainState(**shard["state"])
    if rank < saved_world:
        _set_rng_state(shard["rng"])
    if saved_world != world_size:
        state.batch_in_epoch = state.batch_in_epoch * saved_world // world_size
    return state
