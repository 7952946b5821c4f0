"""Admission control against a real ``facegate serve`` with tiny bounds.

What reached the embedder is read from the server's own counter of embedded faces
(``facegate_embed_batch_size_sum``): it must grow by exactly the faces the answered
``/v1/embed`` requests returned, so a request refused, expired or abandoned in the
queue cannot have moved it.
"""

from __future__ import annotations

import asyncio
import socket
import time

import httpx
import pytest

from tests.conftest import LFW
from tests.support.service import ServeProcess


def _photos(n: int) -> list[bytes]:
    people = sorted(p for p in (LFW / "images").iterdir() if p.is_dir())
    return [min(p.glob("*.jpg")).read_bytes() for p in people[:n]]


PHOTOS = _photos(8)


def _metric(text: str, name: str, labels: str = "") -> float:
    for line in text.splitlines():
        if line.startswith(name + labels + " ") or (not labels and line.startswith(name + " ")):
            return float(line.split()[-1])
    return 0.0


def _embedded_faces(base_url: str) -> float:
    return _metric(httpx.get(f"{base_url}/metrics").text, "facegate_embed_batch_size_sum")


def _settled(base_url: str) -> str:
    """/metrics once nothing is running or waiting (in-flight and queued gauges at 0)."""
    deadline = time.monotonic() + 30
    while True:
        text = httpx.get(f"{base_url}/metrics").text
        busy = _metric(text, "facegate_admission_in_flight") + _metric(
            text, "facegate_admission_queued"
        )
        if busy == 0 or time.monotonic() > deadline:
            return text
        time.sleep(0.05)


def _faces(answers: list[httpx.Response]) -> int:
    return sum(len(r.json()["faces"]) for r in answers if r.status_code == 200)


def _embed(client: httpx.AsyncClient, i: int, headers: dict | None = None):
    return client.post(
        "/v1/embed", files={"image": ("f.jpg", PHOTOS[i % len(PHOTOS)])}, headers=headers
    )


@pytest.fixture(scope="module")
def tight(tmp_path_factory):
    """One request running, one waiting; overloaded answers say Retry-After: 2."""
    srv = ServeProcess(
        tmp_path_factory.mktemp("tight"),
        env={
            "FACEGATE_MAX_IN_FLIGHT": "1",
            "FACEGATE_MAX_QUEUE": "1",
            "FACEGATE_RETRY_AFTER_S": "2",
        },
    ).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def queued(tmp_path_factory):
    """One request running, up to 32 waiting: nothing is refused for the queue's length."""
    srv = ServeProcess(
        tmp_path_factory.mktemp("queued"),
        env={"FACEGATE_MAX_IN_FLIGHT": "1", "FACEGATE_MAX_QUEUE": "32"},
    ).start()
    yield srv
    srv.stop()


async def _until_queued(client: httpx.AsyncClient, n: int) -> None:
    """Wait until the server reports at least ``n`` requests waiting for the slot."""
    deadline = time.monotonic() + 30
    while _metric((await client.get("/metrics")).text, "facegate_admission_queued") < n:
        assert time.monotonic() < deadline, "the queue never filled"
        await asyncio.sleep(0.001)


async def _warm_connections(client: httpx.AsyncClient, n: int) -> None:
    """Open ``n`` keep-alive connections, so that a burst reaches the server at once."""
    await asyncio.gather(*(client.get("/healthz") for _ in range(n)))


@pytest.mark.timeout(120)
def test_overload_answers_503_overloaded_while_health_stays_up(tight):
    base = tight.base_url
    before = _embedded_faces(base)
    served = '{route="/v1/embed"}'
    served_before = _metric(
        httpx.get(f"{base}/metrics").text, "facegate_admission_served_seconds_count", served
    )
    burst = 24

    async def main():
        limits = httpx.Limits(max_connections=burst + 8, max_keepalive_connections=burst + 8)
        async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:
            await _warm_connections(client, burst + 8)
            work = asyncio.gather(*(_embed(client, i) for i in range(burst)))
            # sent right behind the burst, while it fills the slot and the queue
            probes = asyncio.gather(
                *(client.get(path) for path in ("/healthz", "/readyz", "/metrics") * 2)
            )
            return await work, await probes

    answers, probes = asyncio.run(main())
    statuses = [r.status_code for r in answers]
    assert set(statuses) <= {200, 503}, statuses
    ok = statuses.count(200)
    refused = [r for r in answers if r.status_code == 503]
    assert ok >= 2 and refused, statuses  # one running + one waiting at least; the rest refused
    for r in refused:
        assert r.json()["error"]["code"] == "overloaded"
        assert r.headers["retry-after"] == "2"
    assert all(r.status_code == 200 for r in probes), [(r.url.path, r.status_code) for r in probes]

    text = _settled(base)  # refused requests cost no embedding
    assert _metric(text, "facegate_admission_refused_total", '{reason="overloaded"}') == len(
        refused
    )
    # refused requests cost no embedding: exactly one face per answered request
    assert _metric(text, "facegate_embed_batch_size_sum") - before == _faces(answers)
    assert _metric(text, "facegate_admission_limit", '{bound="in_flight"}') == 1
    assert _metric(text, "facegate_admission_limit", '{bound="queue"}') == 1
    assert _metric(text, "facegate_event_loop_lag_seconds_count") > 0  # the loop is watched
    # the admitted requests' latency histogram counts the answered ones, not the refused
    assert _metric(text, "facegate_admission_served_seconds_count", served) - served_before == ok


@pytest.mark.timeout(120)
def test_deadline_expired_request_never_reaches_the_embedder(queued):
    base = queued.base_url
    before = _embedded_faces(base)
    expired_before = _metric(
        httpx.get(f"{base}/metrics").text, "facegate_admission_refused_total", '{reason="deadline"}'
    )

    async def main():
        async with httpx.AsyncClient(base_url=base, timeout=60) as client:
            await _warm_connections(client, 24)
            normal = [asyncio.ensure_future(_embed(client, i)) for i in range(16)]
            await _until_queued(client, 8)  # the slot is taken, 8+ requests wait before these
            hurried = asyncio.gather(
                *(_embed(client, i, {"X-Request-Timeout": "0.01"}) for i in range(4))
            )
            return await asyncio.gather(*normal), await hurried

    normal, hurried = asyncio.run(main())
    assert [r.status_code for r in normal] == [200] * 16
    assert [r.status_code for r in hurried] == [504] * 4, [r.text for r in hurried]
    assert {r.json()["error"]["code"] for r in hurried} == {"deadline_exceeded"}
    text = _settled(base)
    assert _metric(text, "facegate_admission_refused_total", '{reason="deadline"}') == (
        expired_before + 4
    )
    assert _metric(text, "facegate_embed_batch_size_sum") - before == _faces(normal)


@pytest.mark.timeout(120)
def test_client_that_disconnects_while_queued_is_never_run(queued):
    base = queued.base_url
    before = _embedded_faces(base)
    body = PHOTOS[0]
    boundary = "admissiontest"
    payload = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; '
            f'filename="f.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'
        ).encode()
        + body
        + (f"\r\n--{boundary}--\r\n").encode()
    )
    request = (
        f"POST /v1/embed HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data;"
        f" boundary={boundary}\r\nContent-Length: {len(payload)}\r\n\r\n"
    ).encode() + payload

    async def main():
        async with httpx.AsyncClient(base_url=base, timeout=60) as client:
            await _warm_connections(client, 32)
            normal = [asyncio.ensure_future(_embed(client, i)) for i in range(24)]
            await _until_queued(client, 16)
            with socket.create_connection(("127.0.0.1", queued.port)) as sock:
                sock.sendall(request)
                await asyncio.sleep(0.03)  # read and queued behind 16+ others; then hang up
            return await asyncio.gather(*normal)

    normal = asyncio.run(main())
    assert [r.status_code for r in normal] == [200] * 24
    text = _settled(base)
    assert _metric(text, "facegate_admission_refused_total", '{reason="disconnected"}') == 1
    assert _metric(text, "facegate_embed_batch_size_sum") - before == _faces(normal)


def test_bad_timeout_header_is_a_400_and_health_is_not_admitted(tight):
    r = httpx.post(
        f"{tight.base_url}/v1/embed",
        files={"image": ("f.jpg", PHOTOS[0])},
        headers={"X-Request-Timeout": "soon"},
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_header"
    # above the server's FACEGATE_REQUEST_TIMEOUT_S (default 10 s): refused, as documented
    r = httpx.post(
        f"{tight.base_url}/v1/embed",
        files={"image": ("f.jpg", PHOTOS[0])},
        headers={"X-Request-Timeout": "30"},
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_header"
    assert "at most" in r.json()["error"]["message"]
    r = httpx.post(
        f"{tight.base_url}/v1/embed",
        files={"image": ("f.jpg", PHOTOS[0])},
        headers={"X-Request-Timeout": "9.5"},
    )
    assert r.status_code == 200 and len(r.json()["faces"]) == 1
