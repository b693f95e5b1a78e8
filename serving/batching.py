"""Dynamic batching inside one replica: items from concurrent requests share one forward pass.

    batcher = Batcher(handler.run_batch, max_batch_size=32, wait_s=0.005, observe=metrics.batch_size)
    output = await batcher.submit(item)         # from any request's coroutine on the replica's event loop

Why not `@serve.batch`: its loop closes the *next* batch `batch_wait_timeout_s` after that batch's
first item arrived, even while the previous batch is still computing. Under steady load the next
batch then holds only what arrived in those first milliseconds, waits for the model, and everything
behind it waits for the batch after. Measured with MiniLM at concurrency 16, 2 cores
(benchmarks/serve_text_classification.py): batches of 9 on average instead of 16, and the replica at
0.63x a FastAPI app that batches for itself. Here a batch closes only when the model is free: it
takes every item already waiting (up to `max_batch_size`) and waits for more only until `wait_s`
after its oldest item arrived, so an item never waits twice. Adapter pools keep `@serve.batch`
(serving/multiplex.py): it splits batches by multiplexed model id, which this does not do.

The model runs in a worker thread, so the event loop keeps reading requests while torch computes.
An exception from the model fails every request in that batch (as `@serve.batch` does); a request
cancelled while queued (its client went away) is dropped before its batch runs.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, Callable


class Batcher:
    def __init__(self, run: Callable[[list[Any]], list[Any]], max_batch_size: int, wait_s: float,
                 observe: Callable[[int], None] | None = None) -> None:
        if max_batch_size < 1 or wait_s < 0:
            raise ValueError(f"max_batch_size must be >= 1 and wait_s >= 0; got {max_batch_size}, {wait_s}")
        self.run, self.max_batch_size, self.wait_s, self.observe = run, max_batch_size, wait_s, observe
        self._queue: deque[tuple[Any, asyncio.Future, float]] = deque()
        self._arrived: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None

    async def submit(self, item: Any) -> Any:
        """The model's output for `item`, computed in a batch with whatever else is waiting."""
        loop = asyncio.get_running_loop()
        if self._loop_task is None or self._loop_task.done():
            self._arrived = asyncio.Event()
            self._loop_task = loop.create_task(self._batches())
        future = loop.create_future()
        self._queue.append((item, future, loop.time()))
        self._arrived.set()  # type: ignore[union-attr]
        return await future

    async def _batches(self) -> None:
        loop = asyncio.get_running_loop()
        arrived = self._arrived
        assert arrived is not None
        while True:
            while not self._queue:
                arrived.clear()
                await arrived.wait()
            deadline = self._queue[0][2] + self.wait_s  # the oldest item waits at most wait_s for company
            while len(self._queue) < self.max_batch_size and (left := deadline - loop.time()) > 0:
                arrived.clear()
                try:
                    await asyncio.wait_for(arrived.wait(), left)
                except asyncio.TimeoutError:
                    break
            taken = [self._queue.popleft() for _ in range(min(self.max_batch_size, len(self._queue)))]
            batch = [(item, future) for item, future, _ in taken if not future.done()]
            if batch:
                await self._run(batch)

    async def _run(self, batch: list[tuple[Any, asyncio.Future]]) -> None:
        if self.observe is not None:
            self.observe(len(batch))
        try:
            outputs = await asyncio.to_thread(self.run, [item for item, _ in batch])
            if len(outputs) != len(batch):
                raise RuntimeError(f"the model returned {len(outputs)} outputs for a batch of {len(batch)}")
        except Exception as exc:  # noqa: BLE001 - every waiting request gets the model's error
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), output in zip(batch, outputs):
            if not future.done():
                future.set_result(output)
