"""One training checkpoint: a shard per rank and a manifest that makes it complete.

    checkpoint_<timestamp>/
      manifest.json          step, epoch, metrics, world size, the shard list (rank 0 writes it last)
      rank_00000/            model.safetensors, optimizer.pt (optimizer + scheduler), trainer_state.pt
      rank_00001/            trainer_state.pt (this rank's RNG states and data position)

Each rank hands its own directory to `ray.train.report`; Ray Train merges them
into one checkpoint directory on storage. With data parallelism the model and
optimizer are replicated, so rank 0 holds them once; what differs per rank is
its RNG stream. A checkpoint counts only when the manifest exists and every
shard it lists is present.

Loading never unpickles code: weights are safetensors, and the `.pt` files
hold tensors and plain containers only, read with `weights_only=True`.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from training.layout import CHECKPOINT_MANIFEST, MODEL_WEIGHTS, OPTIMIZER_STATE, TRAINER_STATE, shard_dir_name


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
) -> None:
    """Write this rank's shard; rank 0 also writes the replicated model/optimizer and, last, the manifest."""
    shard = Path(directory) / shard_dir_name(rank)
    shard.mkdir(parents=True, exist_ok=True)
    torch.save({"state": asdict(state), "rng": _rng_state()}, shard / TRAINER_STATE)
    if rank != 0:
        return
    save_file(trainable_state(model), str(shard / MODEL_WEIGHTS))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, shard / OPTIMIZER_STATE)
    manifest = {
        "step": state.step,
        "epoch": state.epoch,
        "world_size": world_size,
        "shards": [shard_dir_name(r) for r in range(world_size)],
        "metrics": metrics,
        **(extra or {}),
    }
    (Path(directory) / CHECKPOINT_MANIFEST).write_text(json.dumps(manifest, indent=2))


def read_manifest(directory: Path) -> dict[str, Any]:
    directory = Path(directory)
    path = directory / CHECKPOINT_MANIFEST
    if not path.is_file():
        raise IncompleteCheckpointError(f"{directory}: no {CHECKPOINT_MANIFEST}; the checkpoint was not finished")
    manifest = json.loads(path.read_text())
    missing = [s for s in manifest["shards"] if not (directory / s / TRAINER_STATE).is_file()]
    if missing or not (directory / shard_dir_name(0) / MODEL_WEIGHTS).is_file():
        raise IncompleteCheckpointError(f"{directory}: shards missing: {missing or [MODEL_WEIGHTS]}")
    return manifest


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
    """Load a checkpoint's trainable state onto a model rebuilt the same way (task + method)."""
    state = load_file(str(Path(directory) / shard_dir_name(0) / MODEL_WEIGHTS))
    unexpected = model.load_state_dict(state, strict=False).unexpected_keys
    if unexpected:
        raise IncompleteCheckpointError(
            f"{directory}: weights {unexpected[:3]} do not fit this model; was it saved by another task or method?"
        )


def load_shard(directory: Path, rank: int, world_size: int, model: torch.nn.Module, optimizer, scheduler) -> TrainState:
    """Restore model, optimizer, scheduler, this rank's RNG and the data position.

    Saved by the same number of workers: exact continuation. Saved by another
    number: the model, optimizer and schedule continue exactly; the data
    position is rescaled to the same number of examples seen, and ranks that
    did not exist before get fresh RNG streams.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    load_model_weights(directory, model)
    states = torch.load(directory / shard_dir_name(0) / OPTIMIZER_STATE, weights_only=True, map_location="cpu")
    optimizer.load_state_dict(states["optimizer"])
    scheduler.load_state_dict(states["scheduler"])
    saved_world = manifest["world_size"]
    own = directory / shard_dir_name(rank)
    shard = torch.load((own if rank < saved_world else directory / shard_dir_name(0)) / TRAINER_STATE, weights_only=True)
    state = TrainState(**shard["state"])
    if rank < saved_world:
        _set_rng_state(shard["rng"])
    if saved_world != world_size:
        state.batch_in_epoch = state.batch_in_epoch * saved_world // world_size
    return state
