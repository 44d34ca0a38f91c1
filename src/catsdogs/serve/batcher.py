"""Micro-batching: concurrent requests share forward passes, so throughput grows with load.

Requests put a decoded image on an asyncio queue and await a future. A dispatcher task waits for a
free forward worker, takes the first waiting image, gathers more (waiting at most ``batch_wait_ms``
after the first, and only while other requests are known to be on their way), runs the forward pass
in that worker's thread and resolves every future with its own row. A lone request is never delayed:
with nothing announced the dispatcher runs at once, and images that arrive during a forward pass
simply form the next batch.

``workers`` forward passes may run at once. A batch-1 torch forward of these convnets on CPU gains
nothing from a second thread (EfficientNet-Lite12 at 260 px: 70 ms with 2 threads, 53 ms with 1;
``benchmarks.batch_scaling``), so the server's torch default, one single-threaded worker per core,
keeps every core busy under load while a lone request is as fast as it can be. Queued images are
split evenly over the idle workers (a batch takes at most ``ceil(queued / idle workers)``, and never
more than ``max_batch``), so one worker does not take everything while the other idles.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

BatchFn = Callable[[np.ndarray], Any]
"""A batched forward pass: ``(n, H, W, 3)`` uint8 in, anything indexable by row out (row k -> image k)."""


@dataclass
class Ticket:
    """Announced images of one request that have not been submitted yet."""

    left: int


@dataclass
class BatcherStats:
    """Counters for /stats and tests: how many batches of each size ran."""

    batches: int = 0
    items: int = 0
    max_batch_seen: int = 0
    forward_seconds: float = 0.0
    sizes: Counter[int] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {"batches": self.batches, "items": self.items, "max_batch_seen": self.max_batch_seen,
                "mean_batch": self.items / self.batches if self.batches else 0.0,
                "forward_seconds": self.forward_seconds,
                "sizes": {str(k): v for k, v in sorted(self.sizes.items())}}


class MicroBatcher:
    """Groups concurrent single-image requests into batched calls of ``fn``, ``workers`` at a time."""

    def __init__(self, fn: BatchFn, max_batch: int = 32, batch_wait_ms: float = 2.0,
                 workers: int = 1) -> None:
        self.fn = fn
        self.max_batch = max(1, int(max_batch))
        self.wait_s = max(0.0, batch_wait_ms) / 1000.0
        self.workers = max(1, int(workers))
        self.stats = BatcherStats()
        self._queue: asyncio.Queue[tuple[np.ndarray, asyncio.Future[np.ndarray]]] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._free: asyncio.Semaphore | None = None
        self._running: set[asyncio.Task[None]] = set()
        # One thread per forward worker: fn must be safe to call from several threads at once
        # (torch modules in inference mode and onnxruntime sessions are).
        self._executor: ThreadPoolExecutor | None = None
        self._incoming = 0

    @property
    def queued(self) -> int:
        """Images submitted and waiting for a forward worker (the queue depth of /metrics)."""
        return self._queue.qsize() if self._queue is not None else 0

    async def start(self) -> None:
        """Start the dispatcher task on the running event loop."""
        self._queue = asyncio.Queue()
        self._free = asyncio.Semaphore(self.workers)
        self._executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="forward")
        self._worker = asyncio.get_running_loop().create_task(self._run(), name="micro-batcher")

    async def stop(self) -> None:
        """Stop the dispatcher and running batches; requests still queued fail with CancelledError."""
        tasks = [t for t in (self._worker, *self._running) if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._worker = None
        self._running.clear()
        if self._queue is not None:
            while not self._queue.empty():
                _, fut = self._queue.get_nowait()
                if not fut.done():
                    fut.cancel()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    @contextlib.contextmanager
    def expecting(self, n: int = 1) -> Iterator[Ticket]:
        """Announce ``n`` images that are being decoded, so the worker waits for them a little.

        Images not submitted when the block ends (decode failed) are withdrawn.
        """
        ticket = Ticket(n)
        self._incoming += n
        try:
            yield ticket
        finally:
            self._incoming -= ticket.left
            ticket.left = 0

    async def submit(self, image: np.ndarray, ticket: Ticket | None = None) -> np.ndarray:
        """Queue one decoded image ``(H, W, 3)`` and return its probabilities row ``(C,)``."""
        if self._queue is None or self._worker is None or self._worker.done():
            raise RuntimeError("MicroBatcher is not running; call start() first")
        fut: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((image, fut))
        if ticket is not None and ticket.left > 0:
            ticket.left -= 1
            self._incoming -= 1
        return await fut

    async def _gather(self) -> list[tuple[np.ndarray, asyncio.Future[np.ndarray]]]:
        """Wait for a first item, then collect more while allowed (see the module doc)."""
        assert self._queue is not None and self._free is not None  # nosec B101 # type narrowing: set in start()
        loop = asyncio.get_running_loop()
        batch = [await self._queue.get()]
        # This worker plus the other idle ones share what is queued or announced.
        idle = 1 + self._free._value  # noqa: SLF001 - asyncio exposes no public count
        pending = 1 + self._queue.qsize() + max(0, self._incoming)
        limit = min(self.max_batch, math.ceil(pending / idle))
        deadline = loop.time() + self.wait_s
        while len(batch) < limit:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            timeout = deadline - loop.time()
            if self._incoming <= 0 or timeout <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), timeout))
            except TimeoutError:
                break
        return batch

    def _timed(self, images: np.ndarray) -> tuple[np.ndarray, float]:
        """Run the forward pass (in the executor thread); return it with its duration in seconds."""
        start = time.perf_counter()
        probs = self.fn(images)
        return probs, time.perf_counter() - start

    async def _run(self) -> None:
        assert self._free is not None  # nosec B101 # type narrowing: set in start()
        loop = asyncio.get_running_loop()
        while True:
            await self._free.acquire()
            try:
                batch = [(img, fut) for img, fut in await self._gather() if not fut.cancelled()]
            except BaseException:
                self._free.release()
                raise
            if not batch:
                self._free.release()
                continue
            task = loop.create_task(self._forward(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _forward(self, batch: list[tuple[np.ndarray, asyncio.Future[np.ndarray]]]) -> None:
        """Run one batch in a worker thread and resolve its futures; frees the worker slot."""
        assert self._free is not None  # nosec B101 # type narrowing: set in start()
        loop = asyncio.get_running_loop()
        try:
            images = np.stack([img for img, _ in batch])
            probs, seconds = await loop.run_in_executor(self._executor, self._timed, images)
        except asyncio.CancelledError:
            for _, fut in batch:
                fut.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - the model failed: every waiting request gets it
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            return
        finally:
            self._free.release()
        self.stats.forward_seconds += seconds
        self.stats.batches += 1
        self.stats.items += len(batch)
        self.stats.sizes[len(batch)] += 1
        self.stats.max_batch_seen = max(self.stats.max_batch_seen, len(batch))
        for k, (_, fut) in enumerate(batch):
            if not fut.done():
                fut.set_result(probs[k])
