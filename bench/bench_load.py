"""Load generator for ``facegate serve``: throughput and latency per endpoint and concurrency.

Starts one ``facegate serve`` on 127.0.0.1 per variant (default: micro-batching
on, and off), each with a fresh data directory, enrols LFW people into a gallery,
then for ``/v1/verify`` and ``/v1/identify`` runs closed-loop async httpx clients
at each concurrency level for a fixed time, on each variant back to back, and
reports requests/s, p50 and p99.  A final soak (mixed verify/identify) on the
first variant reports the server's RSS at its start and end.

Models come from the ``FACEGATE_*`` environment (default: the reference models
in ../shared).  The last line of output is one JSON object with every figure.

    python bench/bench_load.py --quick
    python bench/bench_load.py        # levels 1,8,32,128 x 8 s, both variants, 300 s soak

The default run takes ~8 minutes on the 2-core VM (16 levels of 8 s, a 300 s soak,
two server starts with enrolment).  A longer soak is its own invocation, so that each
stays under 10 minutes: the levels with ``--soak-seconds 0``, then the soak with
``--concurrency 1 --duration 1 --soak-seconds 540``.
    python bench/bench_load.py --variant two:FACEGATE_PIPELINE_THREADS=2 \
        --variant forty:FACEGATE_PIPELINE_THREADS=40
    python bench/bench_load.py --admission compare --concurrency 1,8,32,128,256 --soak-seconds 0

Latency percentiles and requests/s count accepted (200) requests, as the clients saw
them; ``server_p50_ms`` / ``server_p99_ms`` are the same route's percentiles inside the
server (from its ``/metrics`` histograms: with admission on, the admitted requests only,
``facegate_admission_served_seconds``),
free of the load generator's own delays on a busy machine; 503 ``overloaded``
answers are counted apart (``overloaded``), and a client waits their ``Retry-After``,
doubled per refusal in a row and jittered, before its next request (``--no-retry-after``:
it resends at once).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.conftest import LFW
from tests.support.service import ServeProcess

GALLERY = "bench"


def rss_mb(pid: int) -> float:
    """Resident set size of a process (MiB), from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, every thread) a process has used, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU time this load generator has used."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def lfw_photos(n: int) -> list[tuple[str, bytes, bytes]]:
    """(name, first photo, second photo) of ``n`` LFW people with at least two photos."""
    out = []
    for person in sorted(p for p in (LFW / "images").iterdir() if p.is_dir()):
        files = sorted(person.glob("*.jpg"))
        if len(files) >= 2:
            out.append((person.name, files[0].read_bytes(), files[1].read_bytes()))
        if len(out) == n:
            break
    return out


def enrol(base_url: str, people) -> int:
    ok = 0
    with httpx.Client(base_url=base_url, timeout=60) as client:
        for name, first, _ in people:
            client.post(f"/v1/galleries/{GALLERY}/subjects", json={"subject_id": name})
            r = client.post(
                f"/v1/galleries/{GALLERY}/subjects/{name}/faces", files={"image": ("f.jpg", first)}
            )
            ok += r.status_code == 201
    return ok


BOUNDARY = "facegate-bench-boundary"


def multipart(fields: dict[str, str], files: dict[str, bytes]) -> bytes:
    """A ``multipart/form-data`` body (boundary :data:`BOUNDARY`)."""
    parts = [
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields.items()
    ]
    for name, data in files.items():
        head = (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"; '
            f'filename="{name}.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'
        )
        parts.append(head.encode() + data + b"\r\n")
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def http_request(path: str, body: bytes) -> bytes:
    """A whole HTTP/1.1 ``POST`` of a multipart ``body``, ready to write to a socket."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class Requests:
    """Every request the clients send, encoded once: identify with each person's second
    photo, verify with each ordered pair of them (so that the generator's own work per
    request is writing bytes, not building them)."""

    def __init__(self, people) -> None:
        self.people = people
        self._verify: dict[tuple[int, int], bytes] = {}
        self._identify = [
            http_request(
                "/v1/identify", multipart({"gallery": GALLERY, "top_k": "5"}, {"image": p[2]})
            )
            for p in people
        ]

    def pick(self, endpoint: str, rng: random.Random) -> bytes:
        first = rng.randrange(len(self.people))
        if endpoint != "verify":
            return self._identify[first]
        pair = (first, rng.randrange(len(self.people)))
        if pair not in self._verify:
            images = {"image1": self.people[pair[0]][2], "image2": self.people[pair[1]][2]}
            self._verify[pair] = http_request("/v1/verify", multipart({}, images))
        return self._verify[pair]


class Connection:
    """One client's keep-alive HTTP/1.1 connection, on raw asyncio streams: microseconds of
    the generator's CPU per request where httpx took milliseconds (its shared pool's
    bookkeeping grows with the requests in flight), CPU that on a 2-core machine it took
    from the server under test."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def send(self, request: bytes) -> tuple[int, dict[str, str], bytes]:
        """(status, headers with lower-case names, body); (re)connects as needed."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        try:
            self.writer.write(request)
            head = await self.reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            headers = {}
            for line in lines[1:]:
                if line:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
            body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        except BaseException:
            await self.close()
            raise
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return int(lines[0].split()[1]), headers, body

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


async def closed_loop(
    base_url: str,
    endpoints: list[str],
    concurrency: int,
    seconds: float,
    people,
    honour_retry_after: bool = True,
) -> dict:
    """``concurrency`` clients, each sending its next request when the last one is answered
    (after a 503 ``overloaded``, once its ``Retry-After`` has passed, with exponential
    backoff and jitter over consecutive refusals: :func:`backoff`, as a well-behaved client).

    ``rps``, ``p50_ms`` and ``p99_ms`` are over the accepted (200) requests; ``overloaded``
    counts the 503 ``overloaded`` answers, ``errors`` every other non-200 outcome."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    overloaded = 0
    requests = Requests(people)
    url = httpx.URL(base_url)
    deadline = time.perf_counter() + seconds

    async def worker(n: int) -> None:
        connection = Connection(url.host, url.port or 80)
        try:
            await client_loop(n, connection)
        finally:
            await connection.close()

    async def client_loop(n: int, connection: Connection) -> None:
        nonlocal overloaded
        rng = random.Random(n)
        refusals = 0  # in a row
        while time.perf_counter() < deadline:
            endpoint = endpoints[rng.randrange(len(endpoints))]
            start = time.perf_counter()
            try:
                code, headers, body = await connection.send(requests.pick(endpoint, rng))
                status = str(code)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
                status, headers, body = type(exc).__name__, {}, b""
            if status == "503" and _code(body) == "overloaded":
                overloaded += 1
                refusals += 1
                if honour_retry_after:
                    wait = backoff(float(headers.get("retry-after", "1")), refusals, rng)
                    await asyncio.sleep(min(wait, max(0.0, deadline - time.perf_counter())))
                continue
            refusals = 0
            if status == "200":
                latencies.append(time.perf_counter() - start)
            else:
                errors[status] = errors.get(status, 0) + 1

    started = time.perf_counter()
    await asyncio.gather(*(worker(n) for n in range(concurrency)))
    elapsed = time.perf_counter() - started
    latencies.sort()

    def pct(q: float) -> float | None:
        if not latencies:
            return None
        return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000, 1)

    return {
        "requests": len(latencies),
        "seconds": round(elapsed, 2),
        "rps": round(len(latencies) / elapsed, 2),
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "overloaded": overloaded,
        "errors": errors,
    }


def backoff(retry_after: float, refusals: int, rng: random.Random, cap: float = 8.0) -> float:
    """Seconds a refused client waits: ``Retry-After`` doubled per refusal in a row (at most
    ``cap``), times a random factor in [0.5, 1.5) so that refused clients do not return
    together."""
    return min(cap, retry_after * 2 ** (refusals - 1)) * (0.5 + rng.random())


def _code(body: bytes) -> str | None:
    try:
        return json.loads(body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """``name:VAR=value,VAR=value`` -> (name, environment overrides)."""
    name, _, assignments = text.partition(":")
    env = dict(item.split("=", 1) for item in assignments.split(",") if item)
    return name, env


def run_variants(variants: list[str], args, people) -> dict:
    """One server per variant, all started up front; each (endpoint, level) is measured on
    every variant back to back, so slow drifts in machine load hit all variants alike."""
    # FACEGATE_* variables of the caller (models, threads...) override the test defaults.
    base = {k: v for k, v in os.environ.items() if k.startswith("FACEGATE_")}
    servers, modes, tmps = {}, {}, []
    try:
        for text in variants:
            name, env = parse_variant(text)
            tmp = tempfile.TemporaryDirectory(prefix="facegate-bench-")
            tmps.append(tmp)
            servers[name] = ServeProcess(Path(tmp.name), env={**base, **env}).start()
            modes[name] = {
                "env": env,
                "admission": {**base, **env}.get("FACEGATE_ADMISSION", "true").lower()
                not in ("false", "0", "no", "off"),
                "enrolled": enrol(servers[name].base_url, people),
                "levels": {},
            }
        for endpoint in ("verify", "identify"):
            for level in args.concurrency:
                for name, server in servers.items():
                    admission = modes[name]["admission"]
                    before = server_histogram(server.base_url, endpoint, admission)
                    assert server.proc is not None
                    cpu_before, own_before = cpu_seconds(server.proc.pid), own_cpu_seconds()
                    result = asyncio.run(
                        closed_loop(
                            server.base_url,
                            [endpoint],
                            level,
                            args.duration,
                            people,
                            not args.no_retry_after,
                        )
                    )
                    # share of the machine's cores each side used: an idle server under
                    # load means the clients held back, a busy generator that it competed
                    cores = os.cpu_count() or 1
                    result.update(
                        server_cpu=round(
                            (cpu_seconds(server.proc.pid) - cpu_before)
                            / (result["seconds"] * cores),
                            3,
                        ),
                        generator_cpu=round(
                            (own_cpu_seconds() - own_before) / (result["seconds"] * cores), 3
                        ),
                        **server_quantiles(
                            before, server_histogram(server.base_url, endpoint, admission)
                        ),
                    )
                    modes[name]["levels"][f"{endpoint}@{level}"] = result
                    print(
                        f"{name:>6s} {endpoint:8s} c={level:<4d} {result['rps']:7.2f} req/s  "
                        f"p50 {result['p50_ms']:8.1f} ms  p99 {result['p99_ms']:8.1f} ms  "
                        f"server p50 {result['server_p50_ms']} p99 {result['server_p99_ms']}  "
                        f"overloaded {result['overloaded']}  errors {result['errors']}  "
                        f"cpu server {result['server_cpu']:.2f} generator "
                        f"{result['generator_cpu']:.2f}",
                        flush=True,
                    )
        first = next(iter(servers))
        if args.soak_seconds > 0:
            pid = servers[first].proc.pid
            start_rss = rss_mb(pid)
            soak = asyncio.run(
                closed_loop(
                    servers[first].base_url,
                    ["verify", "identify"],
                    args.soak_concurrency,
                    args.soak_seconds,
                    people,
                )
            )
            soak.update(rss_start_mb=round(start_rss, 1), rss_end_mb=round(rss_mb(pid), 1))
            modes[first]["soak"] = soak
            print(
                f"soak ({first}) {args.soak_seconds:.0f}s c={args.soak_concurrency}: "
                f"{soak['rps']} req/s, RSS {soak['rss_start_mb']} -> {soak['rss_end_mb']} MiB, "
                f"errors {soak['errors']}",
                flush=True,
            )
        for name, server in servers.items():
            metrics = httpx.get(f"{server.base_url}/metrics", timeout=30).text
            modes[name]["mean_batch_size"] = _mean_batch(metrics)
    finally:
        for server in servers.values():
            server.stop()
        for tmp in tmps:
            tmp.cleanup()
    return modes


def server_histogram(base_url: str, endpoint: str, admission: bool) -> dict[float, float]:
    """The server's own cumulative latency histogram of ``POST /v1/<endpoint>``: upper
    bound -> count.  With admission on, of the admitted requests only
    (``facegate_admission_served_seconds``, arrival to answer); with it off, of every
    request (``facegate_http_request_seconds``: all are admitted then)."""
    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    label = f'route="/v1/{endpoint}"'
    name = "facegate_admission_served_seconds" if admission else "facegate_http_request_seconds"
    buckets = {}
    for line in text.splitlines():
        if line.startswith(f"{name}_bucket{{") and label in line:
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            buckets[float(bound)] = float(line.split()[-1])
    return buckets


def server_quantiles(before: dict[float, float], after: dict[float, float]) -> dict:
    """p50 / p99 (ms) of the requests the server's route answered between two readings,
    interpolated linearly within the histogram's buckets: the latency inside the server
    (admission wait included), free of the load generator's own delays."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1] if counts else 0.0
    out = {}
    for name, q in (("server_p50_ms", 0.5), ("server_p99_ms", 0.99)):
        value = None
        if total:
            lower, below = 0.0, 0.0
            for bound, cumulative in zip(bounds, counts, strict=True):
                if cumulative >= q * total:
                    upper = bound if math.isfinite(bound) else lower
                    share = (q * total - below) / max(cumulative - below, 1e-9)
                    value = round((lower + share * (upper - lower)) * 1000, 1)
                    break
                lower, below = bound, cumulative
        out[name] = value
    return out


def _mean_batch(metrics: str) -> float | None:
    total = count = None
    for line in metrics.splitlines():
        if line.startswith("facegate_embed_batch_size_sum"):
            total = float(line.split()[-1])
        elif line.startswith("facegate_embed_batch_size_count"):
            count = float(line.split()[-1])
    return round(total / count, 3) if total is not None and count else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--concurrency",
        default="1,8,32,128",
        help="comma-separated client counts (default 1,8,32,128)",
    )
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per level")
    parser.add_argument("--soak-seconds", type=float, default=300.0)
    parser.add_argument("--soak-concurrency", type=int, default=8)
    parser.add_argument(
        "--variant",
        action="append",
        dest="variants",
        help="NAME:VAR=value,... a server configuration to measure (repeatable);"
        " default: on:FACEGATE_BATCHING=true and off:FACEGATE_BATCHING=false",
    )
    parser.add_argument(
        "--admission",
        choices=("default", "compare"),
        default="default",
        help="compare: measure admission control on and off (batching on) "
        "instead of the default variants",
    )
    parser.add_argument(
        "--no-retry-after",
        action="store_true",
        help="clients resend at once after a 503 overloaded instead of waiting its Retry-After",
    )
    parser.add_argument("--people", type=int, default=30, help="LFW people enrolled")
    parser.add_argument(
        "--quick", action="store_true", help="a short run for tests: levels 1,4; 1 s each; 2 s soak"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.concurrency, args.duration, args.soak_seconds, args.people = "1,4", 1.0, 2.0, 4
    args.concurrency = [int(c) for c in str(args.concurrency).split(",") if c]
    os.environ.setdefault("FACEGATE_LOG_LEVEL", "warning")
    people = lfw_photos(args.people)
    variants = args.variants or (
        ["on:FACEGATE_ADMISSION=true", "off:FACEGATE_ADMISSION=false"]
        if args.admission == "compare"
        else ["on:FACEGATE_BATCHING=true", "off:FACEGATE_BATCHING=false"]
    )
    load_before = os.getloadavg()[0]
    results = {
        "machine": os.environ.get("FACEGATE_BENCH_MACHINE", ""),
        "cpu_count": os.cpu_count(),
        "duration_s": args.duration,
        "concurrency": args.concurrency,
        "modes": run_variants(variants, args, people),
    }
    # other work on the machine skews every figure: record the load it was under
    results["loadavg_1min"] = {"start": round(load_before, 2), "end": round(os.getloadavg()[0], 2)}
    print(json.dumps(results, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
