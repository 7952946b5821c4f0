"""Where a use case's blocking work runs: worker threads in the service, inline in the CLI.

A :class:`Worker` is the use cases' one way to analyse images (:meth:`Pipeline.locate`,
:meth:`Pipeline.embed_faces`) and to call the gallery.  In the service
(``threads=True``) decoding, detection and alignment run in worker threads, at most
``limiter``'s tokens at a time; embedding runs through the pipeline's embedder (the
micro-batcher there) without holding a token; gallery calls run in the thread pool.
Each stage's time is added to the request's :class:`Timings`.  In the CLI
(``threads=False``) the same calls run one after another in the caller's thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

import anyio.to_thread

from service.pipeline.errors import PipelineError
from service.pipeline.faces import Faces, Policy
from service.pipeline.types import Timings

if TYPE_CHECKING:
    from service.pipeline.pipeline import Pipeline

T = TypeVar("T")


@dataclass(frozen=True)
class Worker:
    """The pipeline, and how its blocking calls are run (see the module docstring)."""

    pipeline: Pipeline
    threads: bool = True
    limiter: anyio.CapacityLimiter | None = None  # images decoded/detected at once
    on_faces: Callable[[int], None] | None = None  # faces detected per image (metrics)

    @property
    def model_id(self) -> str:
        return self.pipeline.model_id

    async def run(self, fn: Callable[[], T], *, limited: bool = True) -> T:
        """Run blocking image work: in a worker thread under ``limiter`` (``limited``), or
        inline."""
        if not self.threads:
            return fn()
        return await anyio.to_thread.run_sync(fn, limiter=self.limiter if limited else None)

    def _seen(self, found: Faces) -> None:
        if self.on_faces is not None:
            self.on_faces(found.detected)

    async def locate(
        self,
        data: bytes,
        policy: Policy,
        timings: Timings,
        *,
        allow_none: bool = False,
        limit: int | None = None,
    ) -> Faces:
        """Find and align the faces of one image under ``policy``, without embedding them."""
        found = await self.run(
            partial(self.pipeline.locate, data, policy, timings, allow_none=allow_none, limit=limit)
        )
        self._seen(found)
        return found

    async def embed(self, found: list[Faces], timings: Timings) -> None:
        """Embed the kept faces of ``found`` (one embedder call for them all)."""
        if any(len(f.detections) for f in found):
            await self.run(partial(self.pipeline.embed_faces, found, timings), limited=False)
        else:
            self.pipeline.embed_faces(found, timings)  # nothing to embed: no model call

    async def analyze(
        self,
        data: bytes,
        policy: Policy,
        timings: Timings,
        *,
        allow_none: bool = False,
        limit: int | None = None,
    ) -> Faces:
        """Find the faces of one image under ``policy`` and embed them."""
        found = await self.locate(data, policy, timings, allow_none=allow_none, limit=limit)
        await self.embed([found], timings)
        return found

    async def analyze_labelled(
        self, images: dict[str, bytes], policy: Policy, timings: Timings
    ) -> list[Faces]:
        """The faces of several images (in the service: one batched detection in one
        worker thread; in the CLI: one image after another), then embedded in one call; a
        refusal names its image's label."""
        labels = list(images)
        results: list[Faces | PipelineError]
        if self.threads:
            results = await self.run(
                partial(self.pipeline.locate_batch, [images[k] for k in labels], policy, timings)
            )
        else:
            results = []
            for label in labels:
                try:
                    results.append(self.pipeline.locate(images[label], policy, timings))
                except PipelineError as exc:
                    results.append(exc)
                    break
        found = []
        for label, result in zip(labels, results, strict=False):
            if isinstance(result, PipelineError):
                raise type(result)(f"{label}: {result}") from None
            self._seen(result)
            found.append(result)
        await self.embed(found, timings)
        return found

    async def call(self, timings: Timings, stage: str, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking call (gallery work), timing it as ``stage``: in the thread pool
        (service) or inline (CLI)."""
        if self.threads:
            return await self.call_in_pool(timings, stage, fn, *args)
        start = time.perf_counter()
        try:
            return fn(*args)
        finally:
            timings.add(stage, time.perf_counter() - start)

    @staticmethod
    async def call_in_pool(timings: Timings, stage: str, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking call in the thread pool, timing it as ``stage``."""
        start = time.perf_counter()
        try:
            return await anyio.to_thread.run_sync(partial(fn, *args))
        finally:
            timings.add(stage, time.perf_counter() - start)
