"""Micro-batching of embedding work across concurrent requests.

Requests hand their aligned face crops to :meth:`MicroBatcher.embed`.  One
worker task collects what arrives within ``max_wait_ms`` of the first waiting
request (or until ``max_batch`` faces are queued), runs the embedder once on
the concatenation in a worker thread, and hands each request its rows back.
While a batch is running, new requests queue up and form the next batch, so
under load batches grow by themselves and at low load a request waits at most
``max_wait_ms``.  With batching disabled every request calls the embedder
directly in the thread pool.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio.to_thread
import numpy as np

EmbedFn = Callable[[np.ndarray], np.ndarray]
BatchObserver = Callable[[int, list[float]], None]


@dataclass
class _Job:
    crops: np.ndarray
    future: asyncio.Future
    queued_at: float = field(default_factory=time.perf_counter)


class MicroBatcher:
    """Coalesces concurrent ``embed`` calls into batched calls of ``fn``."""

    def __init__(self, fn: EmbedFn, *, enabled: bool = True, max_batch: int = 32,
                 max_wait_ms: float = 2.0, observer: BatchObserver | None = None) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.fn = fn
        self.enabled = enabled
        self.max_batch = max_batch
        self.max_wait_s = max(0.0, max_wait_ms) / 1000.0
        self.observer = observer
        self._queue: asyncio.Queue[_Job] | None = None
        self._worker: asyncio.Task | None = None
        self._carry: _Job | None = None
        self.batches = 0
        self.faces = 0

    def config(self) -> dict:
        return {"enabled": self.enabled, "max_batch": self.max_batch,
                "max_wait_ms": self.max_wait_s * 1000.0}

    def stats(self) -> dict:
        mean = self.faces / self.batches if self.batches else 0.0
        return {"batches": self.batches, "faces": self.faces, "mean_batch_size": round(mean, 3)}

    async def start(self) -> None:
        if self.enabled and self._worker is None:
            self._queue = asyncio.Queue()
            self._worker = asyncio.create_task(self._run(), name="facegate-micro-batcher")

    async def stop(self) -> None:
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.cancel()
            try:
                await worker
            except asyncio.CancelledError:
                pass
        pending = [self._carry] if self._carry else []
        self._carry = None
        while self._queue is not None and not self._queue.empty():
            pending.append(self._queue.get_nowait())
        for job in pending:
            if not job.future.done():
                job.future.set_exception(RuntimeError("embedding batcher stopped"))

    async def embed(self, crops: np.ndarray) -> np.ndarray:
        """(N, h, w, 3) aligned crops -> (N, dim) embeddings, possibly batched with others."""
        if len(crops) == 0:
            raise ValueError("no crops to embed")
        if not self.enabled:
            result = await anyio.to_thread.run_sync(self.fn, crops)
            self._record(len(crops), [0.0])
            return result
        if self._worker is None:
            await self.start()
        assert self._queue is not None
        job = _Job(crops, asyncio.get_running_loop().create_future())
        self._queue.put_nowait(job)
        return await job.future

    async def _next(self, timeout: float | None) -> _Job | None:
        if self._carry is not None:
            job, self._carry = self._carry, None
            return job
        assert self._queue is not None
        if timeout is None:
            return await self._queue.get()
        if timeout <= 0:
            try:
                return self._queue.get_nowait()
            except asyncio.QueueEmpty:
                return None
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError:
            return None

    async def _collect(self) -> list[_Job]:
        first = await self._next(None)
        assert first is not None
        batch, size = [first], len(first.crops)
        deadline = time.perf_counter() + self.max_wait_s
        while size < self.max_batch:
            job = await self._next(deadline - time.perf_counter())
            if job is None:
                break
            if job.future.done():  # caller went away
                continue
            if size + len(job.crops) > self.max_batch:
                self._carry = job
                break
            batch.append(job)
            size += len(job.crops)
        return batch

    async def _run(self) -> None:
        while True:
            batch = [job for job in await self._collect() if not job.future.done()]
            if not batch:
                continue
            started = time.perf_counter()
            crops = batch[0].crops if len(batch) == 1 else np.concatenate(
                [job.crops for job in batch])
            try:
                result = await anyio.to_thread.run_sync(self.fn, crops)
            except Exception as exc:  # noqa: BLE001 - handed to every waiting request
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            self._record(len(crops), [started - job.queued_at for job in batch])
            offset = 0
            for job in batch:
                n = len(job.crops)
                if not job.future.done():
                    job.future.set_result(result[offset:offset + n])
                offset += n

    def _record(self, size: int, waits: list[float]) -> None:
        self.batches += 1
        self.faces += size
        if self.observer is not None:
            self.observer(size, waits)
