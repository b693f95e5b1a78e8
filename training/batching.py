"""Which examples go into which batch, on which rank, in which order.

The plan for an epoch is a pure function of (lengths, batch size, seed, epoch,
world size, rank), so a resumed run rebuilds the same plan and skips the
batches it already trained on: the data position is one integer.

Length grouping uses transformers' `get_length_grouped_indices` (the sampler
behind the Trainer's `group_by_length`): shuffled megabatches, each sorted by
length, so batches hold examples of similar length and dynamic padding wastes
little. It is a per-process sampler; sharding whole batches across ranks is
added here so every rank sees the same number of batches (DDP needs that).
"""

from __future__ import annotations

import numpy as np
import torch
from transformers.trainer_pt_utils import get_length_grouped_indices


def epoch_batches(
    lengths: list[int], batch_size: int, world_size: int, rank: int, seed: int, epoch: int, group_by_length: bool = True
) -> list[list[int]]:
    """This rank's batches of example indices for one epoch (drops the tail that cannot be shared evenly)."""
    generator = torch.Generator().manual_seed(seed * 1000 + epoch)
    global_batch = batch_size * world_size
    if group_by_length:
        order = get_length_grouped_indices(lengths, global_batch, generator=generator)
    else:
        order = torch.randperm(len(lengths), generator=generator).tolist()
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    usable = (len(batches) // world_size) * world_size
    if usable == 0:
        usable, batches = world_size, [order[r::world_size] for r in range(world_size)]
    return batches[rank:usable:world_size]


def evaluation_batches(lengths: list[int], batch_size: int, world_size: int, rank: int) -> list[list[int]]:
    """Every example exactly once across ranks, sorted by length (no padding waste, no duplicates)."""
    order = np.argsort(np.asarray(lengths), kind="stable").tolist()
    mine = order[rank::world_size]
    return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]


def batches_per_epoch(num_examples: int, batch_size: int, world_size: int) -> int:
    """len(epoch_batches(...)) without building the plan."""
    return max(1, -(-num_examples // batch_size) // world_size)
