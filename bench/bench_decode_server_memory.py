"""Server memory under decode bombs: peak RSS of ``facegate serve`` per hostile image.

Starts ``facegate serve`` from ``--repo`` (this checkout by default; an older tree
exported with ``git archive`` to compare), posts a small 16-bit 6300x6300 PNG (77 KB,
under the default 40 Mpx limit: issue 17) to ``/v1/detect`` once, then ``--parallel``
at once, and reports how far the server's peak RSS (``VmHWM``, reset through
``/proc/PID/clear_refs`` before each step) rose above its resident size, with the wall
time of each step; also the worker's resident size and absolute peak, its decode budget
(``/v1/info``) and the peak-RSS formula of docs/operations.md
``WORKER_BASE_BYTES + DECODE_PEAK_FACTOR x budget`` (:mod:`service.config`) to compare
with.  Models: ``FACEGATE_*`` from the environment, else YuNet and the MobileFaceNet peer
from ../shared on CPU.  The last output line is one JSON object.

    python bench/bench_decode_server_memory.py
    python bench/bench_decode_server_memory.py --repo /tmp/old --parallel 8
    FACEGATE_DECODE_BUDGET_BYTES=268435456 python bench/bench_decode_server_memory.py
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FACEGATE_SHARED", REPO.parent / "shared")).resolve()
MODELS = {
    "FACEGATE_MODELS_DIR": str(SHARED / "models"),
    "FACEGATE_DETECTOR": "yunet_2023mar",
    "FACEGATE_RECOGNIZER": "mobilefacenet_peer_128d",
    "FACEGATE_PROVIDERS": "CPUExecutionProvider",
}


def memory(pid: int) -> tuple[int, int]:
    text = Path(f"/proc/{pid}/status").read_text()
    return (
        int(text.split("VmRSS:")[1].split()[0]) * 1024,
        int(text.split("VmHWM:")[1].split()[0]) * 1024,
    )


def step(pid: int, url: str, data: bytes, count: int) -> dict:
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    base = memory(pid)[0]
    statuses: list[int] = []
    start = time.perf_counter()
    with httpx.Client(timeout=600) as client:

        def post() -> None:
            files = {"image": ("bomb.png", data, "image/png")}
            statuses.append(client.post(f"{url}/v1/detect", files=files).status_code)

        threads = [threading.Thread(target=post) for _ in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    wall = time.perf_counter() - start
    peak = memory(pid)[1]
    return {
        "requests": count,
        "statuses": sorted(statuses),
        "resident_mib": round(base / 2**20),
        "peak_mib": round(peak / 2**20),
        "peak_rise_mib": round((peak - base) / 2**20),
        "wall_s": round(wall, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=REPO, help="checkout to serve from")
    parser.add_argument("--parallel", type=int, default=8, help="requests sent at once")
    args = parser.parse_args()
    buf = io.BytesIO()
    Image.new("I;16", (6300, 6300)).save(buf, format="PNG")
    data = buf.getvalue()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**MODELS, **os.environ, "FACEGATE_LOG_LEVEL": "warning"}
    budget = None
    with tempfile.TemporaryDirectory(prefix="facegate-bomb-") as tmp:
        env["FACEGATE_DATA_DIR"] = tmp
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--port", str(port)],
            cwd=args.repo,
            env=env,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(600):
                try:
                    if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
            small = io.BytesIO()
            Image.new("RGB", (64, 64)).save(small, format="PNG")
            step(proc.pid, url, small.getvalue(), 1)  # warm-up: first-request allocations
            one = step(proc.pid, url, data, 1)
            print(
                f"1 request:  peak +{one['peak_rise_mib']} MiB in {one['wall_s']} s "
                f"{one['statuses']}",
                flush=True,
            )
            many = step(proc.pid, url, data, args.parallel)
            print(
                f"{args.parallel} at once: peak +{many['peak_rise_mib']} MiB in "
                f"{many['wall_s']} s {many['statuses']}",
                flush=True,
            )
            limits = httpx.get(f"{url}/v1/info", timeout=30).json()["limits"]
            budget = limits.get("decode_budget_bytes")
        finally:
            proc.terminate()
            proc.wait(30)
    formula = None
    if budget:
        from service.config import DECODE_PEAK_FACTOR, WORKER_BASE_BYTES

        formula = round((WORKER_BASE_BYTES + DECODE_PEAK_FACTOR * budget) / 2**20)
        print(
            f"budget {budget / 2**20:.0f} MiB: peak {many['peak_mib']} MiB, formula {formula} MiB",
            flush=True,
        )
    print(
        json.dumps(
            {
                "repo": str(args.repo),
                "image_bytes": len(data),
                "decode_budget_bytes": budget,
                "formula_peak_mib": formula,
                "one": one,
                "parallel": many,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
