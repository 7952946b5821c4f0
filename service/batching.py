"""Micro-batching of embedding work across concurrent requests.

:class:`MicroBatcher` wraps an embedder and *is* one (the ``Embedder`` protocol: ``card``,
``model_id``, ``dim``, ``embed``): the app builds it once around the pipeline's ONNX
embedder and gives the pipeline the batcher instead, so no caller chooses between them.
``embed`` blocks the calling worker thread until its rows are back; ``embed_async`` is the
same from the event loop.  One worker task collects what arrives within ``max_wait_ms``
of the first waiting request (or until ``max_batch`` faces are queued), runs the embedder
once on the concatenation in a worker thread of its own, and hands each request its rows
back.  While a batch is running, new requests queue up and form the next batch, so under
load batches grow by themselves and at low load a request waits at most ``max_wait_ms``.
With batching disabled every call goes straight to the embedder.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio
import anyio.to_thread
import numpy as np

from service.pipeline.types import Embedder

if TYPE_CHECKING:
    from service.registry import ModelCard

BatchObserver = Callable[[int, list[float]], None]


@dataclass
class _Job:
    crops: np.ndarray
    future: asyncio.Future
    queued_at: float = field(default_factory=time.perf_counter)


class MicroBatcher:
    """An ``Embedder`` that coalesces concurrent ``embed`` calls into batched calls of the
    embedder it wraps."""

    def __init__(
        self,
        embedder: Embedder,
        *,
        enabled: bool = True,
        max_batch: int = 32,
        max_wait_ms: float = 2.0,
        observer: BatchObserver | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.embedder = embedder
        self.fn = embedder.embed
        self.enabled = enabled
        self.max_batch = max_batch
        self.max_wait_s = max(0.0, max_wait_ms) / 1000.0
        self.observer = observer
        self._queue: asyncio.Queue[_Job] | None = None
        self._worker: asyncio.Task | None = None
        self._carry: _Job | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # The model runs in threads of its own, so that callers blocked in ``embed`` (which
        # hold worker threads) can never starve the batches they wait for.
        self._model_threads = anyio.CapacityLimiter(1)
        self.batches = 0
        self.faces = 0

    # -- the Embedder interface ------------------------------------------------------------
    @property
    def card(self) -> ModelCard:
        return self.embedder.card

    @property
    def model_id(self) -> str:
        return self.embedder.model_id

    @property
    def dim(self) -> int:
        return int(self.embedder.dim)

    def embed(self, crops: np.ndarray) -> np.ndarray:
        """(N, h, w, 3) aligned crops -> (N, dim) embeddings, from a worker thread: blocks
        until the batch holding these crops has run (at once when batching is off)."""
        loop = self._loop
        if not self.enabled or loop is None or loop.is_closed():
            if len(crops) == 0:
                raise ValueError("no crops to embed")
            result = self.fn(crops)
            self._record(len(crops), [0.0])
            return result
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            raise RuntimeError("MicroBatcher.embed blocks: call embed_async on the event loop")
        return asyncio.run_coroutine_threadsafe(self.embed_async(crops), loop).result()

    def config(self) -> dict:
        return {
            "enabled": self.enabled,
            "max_batch": self.max_batch,
            "max_wait_ms": self.max_wait_s * 1000.0,
        }

    def stats(self) -> dict:
        mean = self.faces / self.batches if self.batches else 0.0
        return {"batches": self.batches, "faces": self.faces, "mean_batch_size": round(mean, 3)}

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.enabled and self._worker is None:
            self._queue = asyncio.Queue()
            self._worker = asyncio.create_task(self._run(), name="facegate-micro-batcher")

    async def stop(self) -> None:
        self._loop = None
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        pending = [self._carry] if self._carry else []
        self._carry = None
        while self._queue is not None and not self._queue.empty():
            pending.append(self._queue.get_nowait())
        for job in pending:
            if not job.future.done():
                job.future.set_exception(RuntimeError("embedding batcher stopped"))

    async def embed_async(self, crops: np.ndarray) -> np.ndarray:
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
            crops = (
                batch[0].crops if len(batch) == 1 else np.concatenate([job.crops for job in batch])
            )
            try:
                result = await anyio.to_thread.run_sync(self.fn, crops, limiter=self._model_threads)
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
                    job.future.set_result(result[offset : offset + n])
                offset += n

    def _record(self, size: int, waits: list[float]) -> None:
        self.batches += 1
        self.faces += size
        if self.observer is not None:
            self.observer(size, waits)
