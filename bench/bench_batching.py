"""The micro-batcher's effect on embedding throughput and latency.

Builds the configured pipeline (``FACEGATE_*`` environment, or the options
below), aligns LFW faces once, then lets ``C`` concurrent asyncio callers each
embed one face at a time through :class:`service.batching.MicroBatcher` — with
batching on and off — for ``--requests`` faces in all.  Reports faces/s, p50/p99
latency per call and the mean batch size; the last output line is one JSON object.

    python bench/bench_batching.py --recognizer dlib_resnet_v1 \\
        --models-dir ~/.cache/facegate/test-models --detector ../shared/models/yunet_2023mar.onnx
    python bench/bench_batching.py --quick --models-dir ~/.cache/facegate/test-models
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service.batching import MicroBatcher
from service.config import Settings
from service.pipeline.pipeline import Pipeline
from tests.conftest import LFW


def aligned_faces(pipeline: Pipeline, n: int) -> np.ndarray:
    crops = []
    for person in sorted(p for p in (LFW / "images").iterdir() if p.is_dir()):
        image = pipeline.decode(min(person.glob("*.jpg")).read_bytes())
        detections = pipeline.detect(image)
        if detections:
            crops.append(pipeline.align(image, [max(detections, key=lambda d: d.area)])[0])
        if len(crops) == n:
            break
    return np.stack(crops)


async def run(
    pipeline: Pipeline,
    crops: np.ndarray,
    enabled: bool,
    concurrency: int,
    requests: int,
    max_batch: int,
    max_wait_ms: float,
) -> dict:
    sizes: list[int] = []
    batcher = MicroBatcher(
        pipeline.embedder,
        enabled=enabled,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        observer=lambda n, w: sizes.append(n),
    )
    await batcher.start()
    latencies: list[float] = []
    counter = iter(range(requests))

    async def caller() -> None:
        for i in counter:
            start = time.perf_counter()
            await batcher.embed_async(crops[i % len(crops)][None])
            latencies.append(time.perf_counter() - start)

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    await batcher.stop()
    latencies.sort()
    return {
        "batching": enabled,
        "concurrency": concurrency,
        "faces": requests,
        "seconds": round(elapsed, 4),
        "faces_per_s": round(requests / elapsed, 1),
        "p50_ms": round(latencies[len(latencies) // 2] * 1000, 2),
        "p99_ms": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1000, 2),
        "batches": len(sizes),
        "mean_batch": round(sum(sizes) / len(sizes), 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir")
    parser.add_argument("--detector")
    parser.add_argument("--recognizer")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--requests", type=int, default=384)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=2.0)
    parser.add_argument("--faces", type=int, default=64, help="distinct LFW faces aligned")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a short run for tests: 16 faces, 32 requests, concurrency 1,8",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.faces, args.requests, args.concurrency = 16, 32, "1,8"
    overrides = {
        k: v
        for k, v in {
            "models_dir": args.models_dir,
            "detector": args.detector,
            "recognizer": args.recognizer,
        }.items()
        if v
    }
    settings = Settings(**overrides)
    pipeline = Pipeline.from_settings(settings)
    crops = aligned_faces(pipeline, args.faces)
    pipeline.embed(crops[:8])  # warm
    rows = []
    for level in [int(c) for c in args.concurrency.split(",")]:
        for enabled in (False, True):
            row = asyncio.run(
                run(
                    pipeline, crops, enabled, level, args.requests, args.max_batch, args.max_wait_ms
                )
            )
            rows.append(row)
            print(
                f"{pipeline.embedder.model_id:40s} batching={'on ' if enabled else 'off'} "
                f"c={level:<3d} {row['faces_per_s']:7.1f} faces/s  p50 {row['p50_ms']:7.2f} ms"
                f"  p99 {row['p99_ms']:7.2f} ms  mean batch {row['mean_batch']}",
                flush=True,
            )
    print(
        json.dumps(
            {
                "model": pipeline.embedder.model_id,
                "cpu_count": os.cpu_count(),
                "intra_op_threads": settings.intra_op_threads,
                "faces": len(crops),
                "max_batch": args.max_batch,
                "rows": rows,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
