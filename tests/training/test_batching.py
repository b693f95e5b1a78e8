"""The batch plan: which examples each rank trains on, per epoch, and how much padding that costs."""

from __future__ import annotations

import random

import pytest

from training.batching import batches_per_epoch, epoch_batches, evaluation_batches


def skewed_lengths(n: int = 1000, seed: int = 0) -> list[int]:
    """Mostly short texts with a long tail, like real reviews and news."""
    rng = random.Random(seed)
    return [rng.randint(100, 128) if rng.random() < 0.15 else rng.randint(5, 30) for _ in range(n)]


def plan(lengths, batch_size, world, seed=42, epoch=0, group=True) -> list[list[list[int]]]:
    return [epoch_batches(lengths, batch_size, world, rank, seed, epoch, group) for rank in range(world)]


def padding(lengths, batches) -> int:
    """Pad tokens that dynamic padding adds: each batch is padded to its longest example."""
    return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)


@pytest.mark.parametrize("n, batch_size, world", [(1000, 16, 1), (1000, 16, 2), (997, 8, 3), (37, 4, 4), (5, 8, 2)])
def test_each_example_at_most_once_and_equal_batches_per_rank(n, batch_size, world):
    lengths = skewed_lengths(n)
    ranks = plan(lengths, batch_size, world)
    seen = [i for batches in ranks for b in batches for i in b]
    assert len(seen) == len(set(seen)), "an example is used twice in one epoch"
    assert set(seen) <= set(range(n))
    assert len(seen) > n - batch_size * world, "more than the tail that cannot be shared evenly was dropped"
    counts = {len(batches) for batches in ranks}
    assert counts == {batches_per_epoch(n, batch_size, world)}, "ranks run different numbers of steps (DDP would hang)"
    assert all(0 < len(b) <= batch_size for batches in ranks for b in batches)


@pytest.mark.parametrize("group", [True, False])
def test_plan_is_a_function_of_seed_and_epoch(group):
    lengths = skewed_lengths(500)
    first = plan(lengths, 8, 2, seed=1, epoch=0, group=group)
    assert plan(lengths, 8, 2, seed=1, epoch=0, group=group) == first  # a resumed run rebuilds the same plan
    assert plan(lengths, 8, 2, seed=1, epoch=1, group=group) != first  # a new order every epoch
    assert plan(lengths, 8, 2, seed=2, epoch=0, group=group) != first


def test_grouped_batches_pad_less_than_random_ones():
    lengths = skewed_lengths(2000)
    for world in (1, 2):
        grouped = [b for batches in plan(lengths, 16, world, group=True) for b in batches]
        shuffled = [b for batches in plan(lengths, 16, world, group=False) for b in batches]
        assert padding(lengths, grouped) < 0.1 * padding(lengths, shuffled), (
            padding(lengths, grouped), padding(lengths, shuffled))


def test_ranks_take_similar_lengths_at_the_same_step():
    """Under DDP a step waits for the slowest rank: grouping spans the global batch, so the
    ranks' batches at one step are alike and little compute is spent on padding anywhere."""
    lengths = skewed_lengths(2000)

    def efficiency(ranks):
        # Real tokens over what the world computes: every rank pays the slowest rank's padded batch.
        step_cost = [max(max(lengths[i] for i in b) * len(b) for b in step) for step in zip(*ranks)]
        real = sum(lengths[i] for batches in ranks for b in batches for i in b)
        return real / (len(ranks) * sum(step_cost))

    grouped, shuffled = efficiency(plan(lengths, 16, 2, group=True)), efficiency(plan(lengths, 16, 2, group=False))
    assert grouped > 0.75 and grouped > 2.5 * shuffled, (grouped, shuffled)


@pytest.mark.parametrize("n, batch_size, world", [(1000, 32, 1), (1001, 32, 2), (10, 4, 3), (2, 8, 2)])
def test_evaluation_covers_every_example_exactly_once(n, batch_size, world):
    lengths = skewed_lengths(n)
    ranks = [evaluation_batches(lengths, batch_size, world, rank) for rank in range(world)]
    seen = sorted(i for batches in ranks for b in batches for i in b)
    assert seen == list(range(n))
    assert all(0 < len(b) <= batch_size for batches in ranks for b in batches)
    for batches in ranks:  # sorted by length: the least padding
        flat = [lengths[i] for b in batches for i in b]
        assert flat == sorted(flat)
