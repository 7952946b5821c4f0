"""Scale-out benchmark: ``/v1/identify`` throughput with 1, 2, 4 replicas on one PostgreSQL gallery,
and how long an enrolment acknowledged by one replica takes to reach every other replica's index.

Starts a throwaway PostgreSQL cluster (``tests/support/pg.py``) and the largest number
of ``facegate serve`` replicas asked for (every replica its own process, port,
data directory and FAISS index; one gallery of CelebA identities enrolled
through the first), then measures

* **throughput** for each replica count ``n``: ``--clients`` closed-loop async
  clients, spread round-robin over the first ``n`` replicas, identify other
  photos of the enrolled people for ``--duration`` seconds; requests/s, p50,
  p99.  The counts are run in turn, ``--rounds`` times, on the same running
  replicas (the others idle, waiting on LISTEN), and the median round is
  reported, so that drift in the machine's load spreads over every count;
* **enrol-to-visible** over all replicas: one writer enrols a new face through
  each replica in turn; the acknowledgement starts a clock that stops, per
  other replica, when its ``/readyz`` reports ``applied_seq`` at or past the
  write's sequence number (the write is then in that replica's index and
  visible to ``/v1/identify``).  The poll's own round trip is bracketed: the
  upper bound is when the first answer showing the write arrived, the lower
  bound when the poll before it (still without the write) was sent.  Measured
  idle and again while the identify clients run on every replica;
* resident memory of every replica, and for every throughput run the CPU time
  the serving replicas used per answered request and how busy the whole
  machine was (``/proc``), which says what limits scaling.

Models come from the ``FACEGATE_*`` environment (default: the reference models
in ../shared).  The last line of output is one JSON object with every figure.

    python bench/bench_replicas.py --quick
    python bench/bench_replicas.py --replicas 1,2,4 --duration 15 --rounds 3 --clients 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.pg import PostgresCluster  # noqa: E402
from tests.support.replicas import (  # noqa: E402
    Replica,
    celeba_photos,
    enrol,
    is_unsuitable,
    percentile,
    photo,
    start_all,
    stop_all,
)

GALLERY = "bench"
VISIBILITY_GALLERY = "visibility"


def rss_mb(pid: int) -> float:
    """Resident set size of a process (MiB), from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024.0, 1)
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (seconds), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU time of the whole machine so far (seconds), from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    tick = os.sysconf("SC_CLK_TCK")
    return (sum(values) - idle) / tick, sum(values) / tick


def summary_ms(upper: list[float], lower: list[float]) -> dict:
    """Percentiles of the enrol-to-visible upper bounds, and the same of the lower bounds."""
    return {
        "samples": len(upper),
        "p50_ms": round(percentile(upper, 50) * 1000, 1),
        "p99_ms": round(percentile(upper, 99) * 1000, 1),
        "max_ms": round(max(upper) * 1000, 1) if upper else float("nan"),
        "lower_p50_ms": round(percentile(lower, 50) * 1000, 1),
        "lower_p99_ms": round(percentile(lower, 99) * 1000, 1),
    }


def enrol_gallery(replica: Replica, size: int) -> tuple[list[str], list[bytes]]:
    """Enrol one photo of ``size`` CelebA identities; return their subject ids and probe
    photos (every other photo of them)."""
    photos = celeba_photos()
    enrolled, probes = [], []
    with replica.client() as client:
        for identity, paths in photos.items():
            if len(enrolled) == size:
                break
            if len(paths) < 2:
                continue
            r = enrol(client, GALLERY, identity, photo(paths[0]))
            if r.status_code == 201:
                enrolled.append(identity)
                probes += [photo(p) for p in paths[1:4]]
            elif not is_unsuitable(r):
                raise RuntimeError(f"enrolment failed: {r.status_code} {r.text}")
    return enrolled, probes


async def identify_load(
    replicas: list[Replica],
    probes: list[bytes],
    clients: int,
    duration: float,
    stop: asyncio.Event | None = None,
) -> dict:
    """Closed-loop identify clients, client ``k`` on replica ``k % n``, for ``duration``
    seconds (or until ``stop`` is set)."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    no_face = 0
    deadline = time.monotonic() + duration

    async def client_loop(k: int) -> None:
        nonlocal no_face
        rng = random.Random(k)
        base = replicas[k % len(replicas)].base_url
        async with httpx.AsyncClient(base_url=base, timeout=120) as client:
            while time.monotonic() < deadline and not (stop and stop.is_set()):
                t0 = time.perf_counter()
                try:
                    r = await client.post(
                        "/v1/identify",
                        data={"gallery": GALLERY},
                        files={"image": ("probe.jpg", rng.choice(probes))},
                    )
                except httpx.HTTPError as exc:
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                    continue
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - t0)
                elif r.status_code == 422 and r.json()["error"]["code"] == "no_face":
                    no_face += 1
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors[str(r.status_code)] = errors.get(str(r.status_code), 0) + 1

    pids = [r.proc.pid for r in replicas]
    started = time.monotonic()
    cpu0, replica_cpu0 = time.process_time(), sum(cpu_seconds(p) for p in pids)
    busy0, total0 = machine_busy()
    await asyncio.gather(*(client_loop(k) for k in range(clients)))
    elapsed = time.monotonic() - started
    busy1, total1 = machine_busy()
    replica_cpu = sum(cpu_seconds(p) for p in pids) - replica_cpu0
    return {
        "requests": len(latencies),
        "seconds": round(elapsed, 2),
        "rps": round(len(latencies) / elapsed, 2),
        "p50_ms": round(percentile(latencies, 50) * 1000, 1),
        "p99_ms": round(percentile(latencies, 99) * 1000, 1),
        "no_face": no_face,
        "errors": errors,
        "client_cpu_s": round(time.process_time() - cpu0, 2),
        # where the machine's CPU went: the serving replicas' share of it, their CPU
        # time per answered request, and how busy the whole machine was
        "replica_cpu_s": round(replica_cpu, 2),
        "replica_cpu_ms_per_request": round(1000 * replica_cpu / max(1, len(latencies)), 1),
        "machine_busy": round((busy1 - busy0) / max(1e-9, total1 - total0), 3),
        "replica_share_of_machine": round(replica_cpu / max(1e-9, total1 - total0), 3),
    }


async def visibility(
    replicas: list[Replica], samples: int, pool: list[str], offset: int
) -> tuple[list[float], list[float]]:
    """Enrol-to-visible seconds, one per (write, other replica) pair, bracketed: the time the
    answer that first showed the write arrived (an upper bound), and the time the poll before
    it, which did not show it yet, was sent (a lower bound; 0 when the first poll showed it)."""
    found: list[tuple[float, float]] = []
    clients = [httpx.AsyncClient(base_url=r.base_url, timeout=120) for r in replicas]

    async def applied_seq(client: httpx.AsyncClient) -> int:
        return (await client.get("/readyz")).json()["sync"]["applied_seq"]

    async def wait_for(client: httpx.AsyncClient, seq: int, since: float) -> tuple[float, float]:
        not_yet = since
        while True:
            sent = time.monotonic()
            if await applied_seq(client) >= seq:
                return time.monotonic() - since, not_yet - since
            not_yet = sent
            if sent - since > 30:
                raise TimeoutError("a replica did not apply a write within 30 s")

    try:
        done = 0
        while done < samples:
            path = pool.pop()
            writer = (offset + done) % len(replicas)
            subject = f"v{offset + done:05d}"
            r = await clients[writer].post(
                f"/v1/galleries/{VISIBILITY_GALLERY}/subjects", json={"subject_id": subject}
            )
            r.raise_for_status()
            r = await clients[writer].post(
                f"/v1/galleries/{VISIBILITY_GALLERY}/subjects/{subject}/faces",
                files={"image": ("photo.jpg", photo(path))},
            )
            acknowledged = time.monotonic()
            if is_unsuitable(r):
                continue
            r.raise_for_status()
            # the writer applied its own write before acknowledging it: its seq is the write's
            seq = await applied_seq(clients[writer])
            others = [c for i, c in enumerate(clients) if i != writer]
            found += await asyncio.gather(*(wait_for(c, seq, acknowledged) for c in others))
            done += 1
    finally:
        for client in clients:
            await client.aclose()
    return [upper for upper, _ in found], [lower for _, lower in found]


async def visibility_under_load(replicas, probes, clients, samples, pool, offset) -> dict:
    stop = asyncio.Event()
    load = asyncio.create_task(identify_load(replicas, probes, clients, 3600, stop))
    await asyncio.sleep(1.0)
    try:
        upper, lower = await visibility(replicas, samples, pool, offset)
    finally:
        stop.set()
        throughput = await load
    return {
        **summary_ms(upper, lower),
        "identify_rps_meanwhile": throughput["rps"],
        "identify_errors": throughput["errors"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", default="1,2,4", help="replica counts to compare")
    parser.add_argument("--clients", type=int, default=8, help="concurrent identify clients")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per throughput run")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="throughput runs per replica count, interleaved (median reported)",
    )
    parser.add_argument("--gallery-size", type=int, default=50, help="enrolled identities")
    parser.add_argument(
        "--visibility-samples",
        type=int,
        default=60,
        help="enrolments timed for enrol-to-visible, idle and again under load",
    )
    parser.add_argument(
        "--intra-op-threads",
        type=int,
        default=1,
        help="FACEGATE_INTRA_OP_THREADS of every replica (0: ONNX Runtime's default, one per core)",
    )
    parser.add_argument("--quick", action="store_true", help="a few seconds per step (for tests)")
    args = parser.parse_args(argv)
    if args.quick:
        args.replicas, args.clients, args.duration, args.rounds = "1,2", 4, 2.0, 1
        args.gallery_size, args.visibility_samples = 4, 4
    counts = sorted({int(n) for n in args.replicas.split(",")})

    env = {"FACEGATE_INTRA_OP_THREADS": str(args.intra_op_threads)}
    root = Path(tempfile.mkdtemp(prefix="facegate-bench-replicas-"))
    replicas: list[Replica] = []
    result = {
        "cpus": os.cpu_count(),
        "clients": args.clients,
        "duration_s": args.duration,
        "rounds": args.rounds,
        "intra_op_threads": args.intra_op_threads,
        "store": "postgresql",
        "models": {k: os.environ.get(k) for k in ("FACEGATE_DETECTOR", "FACEGATE_RECOGNIZER")},
        "runs": {},
    }
    pool = [p for paths in celeba_photos().values() for p in paths[4:]]
    random.Random(0).shuffle(pool)
    cluster = PostgresCluster().start()
    try:
        url = cluster.create_database()
        replicas += [
            Replica(root / f"r{i + 1}", url, env=env, name=f"replica {i + 1}")
            for i in range(max(counts))
        ]
        t0 = time.monotonic()
        start_all(replicas)
        result["start_s"] = round(time.monotonic() - t0, 1)
        enrolled, probes = enrol_gallery(replicas[0], args.gallery_size)
        result["gallery_size"], result["probes"] = len(enrolled), len(probes)
        print(
            f"{len(replicas)} replicas started in {result['start_s']}s; "
            f"{len(enrolled)} identities enrolled",
            flush=True,
        )

        # Every replica count in turn, round after round, on the same running replicas
        # (idle replicas only wait on LISTEN): drift in the machine's load spreads evenly.
        rounds: dict[int, list[dict]] = {n: [] for n in counts}
        for k in range(args.rounds):
            for n in counts:
                run = asyncio.run(identify_load(replicas[:n], probes, args.clients, args.duration))
                rounds[n].append(run)
                print(f"round {k + 1}, {n} replica(s): {run}", flush=True)
        for n, runs in rounds.items():
            rps = sorted(r["rps"] for r in runs)
            median = runs[[r["rps"] for r in runs].index(rps[len(rps) // 2])]
            keys = (
                "p50_ms",
                "p99_ms",
                "client_cpu_s",
                "replica_cpu_ms_per_request",
                "machine_busy",
                "replica_share_of_machine",
            )
            result["runs"][str(n)] = {
                "rps_median": median["rps"],
                "rps_all": rps,
                **{key: median[key] for key in keys},
                "errors": sum(sum(r["errors"].values()) for r in runs),
            }

        if len(replicas) >= 2:
            upper, lower = asyncio.run(visibility(replicas, args.visibility_samples, pool, 0))
            result["visible_idle"] = summary_ms(upper, lower)
            print(
                f"enrol-to-visible over {len(replicas)} replicas, idle: {result['visible_idle']}",
                flush=True,
            )
            result["visible_loaded"] = asyncio.run(
                visibility_under_load(
                    replicas, probes, args.clients, args.visibility_samples, pool, 10**5
                )
            )
            print(f"enrol-to-visible, under identify load: {result['visible_loaded']}", flush=True)
        result["rss_mb"] = [rss_mb(r.proc.pid) for r in replicas]
    finally:
        stop_all(replicas)
        cluster.stop()
    base = result["runs"][str(counts[0])]["rps_median"]
    result["speedup"] = {
        n: round(run["rps_median"] / base, 2) if base else None for n, run in result["runs"].items()
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
