"""What the audit log costs a search: ``/v1/identify`` latency with and without audit records.

Starts the service (real uvicorn on 127.0.0.1, SQLite store in a temporary directory),
enrols the first photo of ``--people`` LFW people, then sends ``--requests`` identify
requests (their second photos, one client) per block, alternating blocks with the audit
writer on (the service as shipped: each search queues one record, written in the background)
and off (no writer: nothing recorded) and ``discarded`` (entries built and handed to a recorder
that drops them: the request-side cost alone), ``--blocks`` blocks each.  Prints per block
and, last,
one JSON object with each mode's median p50 latency and req/s (modes rotate per block).

    python bench/bench_audit.py --people 20 --requests 60 --blocks 5
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service.config import Settings  # noqa: E402
from tests.conftest import LFW, SHARED_MODELS  # noqa: E402
from tests.support.service import InProcessServer  # noqa: E402


def people(n: int) -> list[Path]:
    found = []
    for person in sorted(p for p in (LFW / "images").iterdir() if p.is_dir()):
        photos = sorted(person.glob("*.jpg"))
        if len(photos) >= 2:
            found.append(person)
        if len(found) == n:
            break
    return found


def block(client: httpx.Client, probes: list[bytes], requests: int) -> tuple[float, float]:
    latencies = []
    start = time.perf_counter()
    for i in range(requests):
        t0 = time.perf_counter()
        r = client.post(
            "/v1/identify",
            data={"gallery": "bench"},
            files={"image": ("p.jpg", probes[i % len(probes)])},
        )
        r.raise_for_status()
        latencies.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - start
    return statistics.median(latencies) * 1000, requests / elapsed


class _Discard:
    """A recorder that drops every entry: the request-side cost of auditing alone."""

    def record(self, entry) -> None:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--people", type=int, default=20)
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--blocks", type=int, default=5)
    args = parser.parse_args(argv)
    folks = people(args.people)
    with tempfile.TemporaryDirectory(prefix="facegate-bench-audit-") as tmp:
        settings = Settings(
            models_dir=SHARED_MODELS,
            detector="yunet_2023mar",
            recognizer="mobilefacenet_peer_128d",
            providers=["CPUExecutionProvider"],
            faiss_gpu=False,
            data_dir=Path(tmp),
            bulk_max_items=64,
        )
        server = InProcessServer(settings).start()
        state = server.state
        writer = state.audit
        discard = _Discard()
        modes = {"audit_on": writer, "audit_off": None, "discarded": discard}
        results: dict[str, list[tuple[float, float]]] = {mode: [] for mode in modes}
        try:
            with httpx.Client(base_url=server.base_url, timeout=120) as client:
                items = [
                    {
                        "subject_id": p.name,
                        "image": base64.b64encode(sorted(p.glob("*.jpg"))[0].read_bytes()).decode(),
                    }
                    for p in folks
                ]
                client.post("/v1/galleries/bench/faces", json={"items": items}).raise_for_status()
                probes = [sorted(p.glob("*.jpg"))[1].read_bytes() for p in folks]
                block(client, probes, 10)  # warm-up
                for b in range(args.blocks):
                    order = list(modes.items())
                    order = order[b % len(order) :] + order[: b % len(order)]  # rotate
                    for mode, recorder in order:
                        state.audit = recorder
                        p50, rate = block(client, probes, args.requests)
                        results[mode].append((p50, rate))
                        print(f"block {b} {mode}: p50 {p50:.1f} ms, {rate:.2f} req/s", flush=True)
            state.audit = writer
            writer.flush()
            recorded = len(state.gallery.store.audit_records(action="identify", limit=100000)[0])
        finally:
            state.audit = writer
            server.stop()
    summary = {
        mode: {
            "p50_ms": round(statistics.median(r[0] for r in rows), 2),
            "req_per_s": round(statistics.median(r[1] for r in rows), 2),
        }
        for mode, rows in results.items()
    }
    print(
        json.dumps(
            {
                "people": len(folks),
                "requests_per_block": args.requests,
                "blocks": args.blocks,
                **summary,
                "identify_records_written": recorded,
                "p50_ratio_on_off": round(
                    summary["audit_on"]["p50_ms"] / summary["audit_off"]["p50_ms"], 3
                ),
                "load_average": os.getloadavg(),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
