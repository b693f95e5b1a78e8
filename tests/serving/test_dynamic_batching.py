"""serving/batching.py: batches close when the model is free, never split by a timer that started early."""

import asyncio
import threading
import time

import pytest

from serving.batching import Batcher


class SlowModel:
    """Records each batch; one forward pass takes `seconds`."""

    def __init__(self, seconds: float = 0.05, fail_on: object = None) -> None:
        self.seconds, self.fail_on = seconds, fail_on
        self.batches: list[list[int]] = []
        self.threads: set[int] = set()

    def __call__(self, items: list[int]) -> list[int]:
        self.threads.add(threading.get_ident())
        self.batches.append(list(items))
        time.sleep(self.seconds)
        if self.fail_on in items:
            raise ValueError(f"bad item {self.fail_on}")
        return [item * 10 for item in items]


def test_items_waiting_while_the_model_computes_form_one_full_batch():
    model = SlowModel(seconds=0.05)
    sizes: list[int] = []

    async def main() -> list[int]:
        batcher = Batcher(model, max_batch_size=16, wait_s=0.005, observe=sizes.append)
        first = asyncio.ensure_future(batcher.submit(0))
        await asyncio.sleep(0.01)  # the first batch (one item) is computing now
        rest = []
        for i in range(1, 17):  # arrive over ~8 ms, well past wait_s, all while the model is busy
            rest.append(asyncio.ensure_future(batcher.submit(i)))
            await asyncio.sleep(0.0005)
        return await asyncio.gather(first, *rest)

    outputs = asyncio.run(main())
    assert outputs == [i * 10 for i in range(17)]  # each request gets its own item's output, in order
    # @serve.batch would have closed the second batch 5 ms after item 1 arrived (a few items) and left
    # the rest for a third pass; here the 16 waiting items go together once the model is free.
    assert [len(b) for b in model.batches] == [1, 16]
    assert sizes == [1, 16]
    assert threading.get_ident() not in model.threads  # the model ran off the event loop


def test_a_lone_item_waits_at_most_wait_s():
    model = SlowModel(seconds=0)

    async def main() -> float:
        batcher = Batcher(model, max_batch_size=8, wait_s=0.02)
        start = time.perf_counter()
        assert await batcher.submit(3) == 30
        return time.perf_counter() - start

    waited = asyncio.run(main())
    assert 0.015 <= waited < 0.5
    assert model.batches == [[3]]


def test_a_full_batch_does_not_wait():
    model = SlowModel(seconds=0)

    async def main() -> float:
        batcher = Batcher(model, max_batch_size=4, wait_s=5)
        start = time.perf_counter()
        assert await asyncio.gather(*(batcher.submit(i) for i in range(4))) == [0, 10, 20, 30]
        return time.perf_counter() - start

    assert asyncio.run(main()) < 1
    assert model.batches == [[0, 1, 2, 3]]


def test_model_error_fails_its_batch_only_and_the_batcher_goes_on():
    model = SlowModel(seconds=0, fail_on=2)

    async def main():
        batcher = Batcher(model, max_batch_size=4, wait_s=0.001)
        failed = await asyncio.gather(*(batcher.submit(i) for i in range(4)), return_exceptions=True)
        after = await batcher.submit(7)
        return failed, after

    failed, after = asyncio.run(main())
    assert all(isinstance(r, ValueError) and "bad item 2" in str(r) for r in failed)
    assert after == 70


def test_a_cancelled_request_is_left_out_of_its_batch():
    model = SlowModel(seconds=0.05)

    async def main():
        batcher = Batcher(model, max_batch_size=8, wait_s=0.001)
        busy = asyncio.ensure_future(batcher.submit(0))
        await asyncio.sleep(0.01)  # the model is busy with item 0
        gone = asyncio.ensure_future(batcher.submit(1))
        kept = asyncio.ensure_future(batcher.submit(2))
        await asyncio.sleep(0)
        gone.cancel()  # its client disconnected while it waited
        return await busy, await kept

    assert asyncio.run(main()) == (0, 20)
    assert model.batches == [[0], [2]]


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="max_batch_size"):
        Batcher(lambda items: items, max_batch_size=0, wait_s=0.01)
