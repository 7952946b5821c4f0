"""The embedding micro-batcher, on the real reference recognizer and real LFW faces."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from service.batching import MicroBatcher
from tests.conftest import LFW, SHARED_MODELS


@pytest.fixture(scope="module")
def pipeline():
    from service.config import Settings
    from service.pipeline.pipeline import Pipeline

    settings = Settings(
        models_dir=SHARED_MODELS,
        detector="yunet_2023mar",
        recognizer="mobilefacenet_peer_128d",
        providers=["CPUExecutionProvider"],
    )
    return Pipeline.from_settings(settings)


@pytest.fixture(scope="module")
def crops(pipeline) -> np.ndarray:
    """One aligned face from each of 12 LFW people."""
    people = sorted(p for p in (LFW / "images").iterdir() if p.is_dir())[:12]
    out = []
    for person in people:
        image = pipeline.decode(min(person.glob("*.jpg")).read_bytes())
        detections = pipeline.detect(image)
        out.append(pipeline.align(image, [max(detections, key=lambda d: d.area)])[0])
    return np.stack(out)


def _run(coro):
    return asyncio.run(coro)


def test_concurrent_requests_share_batches_and_get_their_own_rows(pipeline, crops):
    sizes: list[int] = []
    batcher = MicroBatcher(
        pipeline.embedder, max_batch=8, max_wait_ms=20.0, observer=lambda n, waits: sizes.append(n)
    )
    # Requests of 1 and 2 faces, all in flight at once.
    requests = [crops[i : i + 1 + (i % 2)] for i in range(len(crops) - 1)]

    async def main():
        await batcher.start()
        try:
            return await asyncio.gather(*(batcher.embed_async(r) for r in requests))
        finally:
            await batcher.stop()

    results = _run(main())
    for request, got in zip(requests, results, strict=True):
        assert got.shape == (len(request), 128)
        np.testing.assert_allclose(got, pipeline.embed(request), atol=1e-5)
    assert sum(sizes) == sum(len(r) for r in requests)
    assert max(sizes) <= 8
    assert len(sizes) < len(requests), f"no coalescing happened: {sizes}"
    assert batcher.stats()["mean_batch_size"] > 1.0


def test_disabled_batcher_runs_each_request_alone(pipeline, crops):
    sizes: list[int] = []
    batcher = MicroBatcher(pipeline.embedder, enabled=False, observer=lambda n, w: sizes.append(n))

    async def main():
        return await asyncio.gather(*(batcher.embed_async(crops[i : i + 1]) for i in range(6)))

    results = _run(main())
    assert sizes == [1] * 6
    np.testing.assert_allclose(np.concatenate(results), pipeline.embed(crops[:6]), atol=1e-5)


def test_failure_reaches_every_waiting_caller_and_the_batcher_recovers(pipeline, crops):
    calls = []

    class Flaky:
        card, model_id, dim = pipeline.embedder.card, pipeline.model_id, pipeline.dim

        def embed(self, batch: np.ndarray) -> np.ndarray:
            calls.append(len(batch))
            if len(calls) == 1:
                raise RuntimeError("model failed")
            return pipeline.embed(batch)

    batcher = MicroBatcher(Flaky(), max_batch=16, max_wait_ms=50.0)

    async def main():
        await batcher.start()
        try:
            first = await asyncio.gather(
                *(batcher.embed_async(crops[i : i + 1]) for i in range(3)), return_exceptions=True
            )
            second = await batcher.embed_async(crops[:2])
            return first, second
        finally:
            await batcher.stop()

    first, second = _run(main())
    assert all(isinstance(r, RuntimeError) for r in first), first
    np.testing.assert_allclose(second, pipeline.embed(crops[:2]), atol=1e-5)


def pipeline_stub():
    class Identity:
        card, model_id, dim = None, "identity", 3

        def embed(self, batch: np.ndarray) -> np.ndarray:
            return batch

    return Identity()


def test_empty_request_is_refused():
    batcher = MicroBatcher(pipeline_stub())
    with pytest.raises(ValueError):
        _run(batcher.embed_async(np.zeros((0, 112, 112, 3), np.uint8)))


def test_the_batcher_is_the_pipelines_embedder_for_worker_threads(pipeline, crops):
    """Given to the pipeline as its embedder, the batcher serves ``Pipeline.embed`` from any
    worker thread (blocking it until the batch ran) and coalesces those calls."""
    import anyio.to_thread

    from service.pipeline.types import Embedder

    sizes: list[int] = []
    batcher = MicroBatcher(
        pipeline.embedder, max_batch=8, max_wait_ms=30.0, observer=lambda n, waits: sizes.append(n)
    )
    assert isinstance(batcher, Embedder)
    assert (batcher.model_id, batcher.dim, batcher.card) == (
        pipeline.model_id,
        pipeline.dim,
        pipeline.recognizer_card,
    )
    batched = pipeline.with_embedder(batcher)
    assert batched.embedder is batcher and batched.detector is pipeline.detector

    async def main():
        await batcher.start()
        try:
            with pytest.raises(RuntimeError, match="embed_async"):
                batcher.embed(crops[:1])  # on the event loop it would block it
            return await asyncio.gather(
                *(anyio.to_thread.run_sync(batched.embed, crops[i : i + 1]) for i in range(8))
            )
        finally:
            await batcher.stop()

    results = _run(main())
    np.testing.assert_allclose(np.concatenate(results), pipeline.embed(crops[:8]), atol=1e-5)
    assert sum(sizes) == 8 and len(sizes) < 8, sizes
    # once stopped (no event loop), a call goes straight to the model
    np.testing.assert_allclose(batcher.embed(crops[:2]), pipeline.embed(crops[:2]), atol=1e-5)
