"""Before its lifespan has loaded anything, the app is alive but not ready, and says so."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import pytest

from service.app import create_app
from service.config import Settings


def test_not_ready_until_started(tmp_path):
    app = create_app(Settings(data_dir=tmp_path, api_keys=["k"]))

    async def main():
        transport = httpx.ASGITransport(app=app)  # no lifespan: nothing loaded
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return (
                await client.get("/healthz"),
                await client.get("/readyz"),
                await client.get("/v1/info", headers={"X-API-Key": "k"}),
                await client.get("/v1/info"),
                await client.get("/metrics"),
                await client.get("/openapi.json"),
            )

    health, ready, info, unauthorised, metrics, openapi = asyncio.run(main())
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    assert ready.status_code == 503
    assert ready.json()["status"] == "not_ready"
    assert ready.json()["checks"] == {"models": False, "gallery": False}
    assert info.status_code == 503 and info.json()["error"]["code"] == "not_ready"
    assert unauthorised.status_code == 401  # auth is checked before readiness
    assert metrics.status_code == 200
    assert (
        'facegate_http_requests_total{method="GET",route="/readyz",status="503"} 1.0'
        in metrics.text
    )
    # every app has its own registry: a second app starts from zero
    other = create_app(Settings(data_dir=tmp_path))
    assert other.state.metrics.registry is not app.state.metrics.registry

    # the OpenAPI description documents both body forms of the image endpoints
    spec = openapi.json()
    for path in (
        "/v1/verify",
        "/v1/identify",
        "/v1/galleries/{gallery}/subjects/{subject_id}/faces",
    ):
        content = spec["paths"][path]["post"]["requestBody"]["content"]
        assert {"multipart/form-data", "application/json"} <= set(content), path
    assert "best" in spec["paths"]["/v1/identify"]["post"]["description"]
    assert "422" in spec["paths"]["/v1/verify"]["post"]["responses"]


def test_serve_refuses_to_start_without_its_models(tmp_path):
    """A model that cannot be resolved stops ``facegate serve`` with the registry's message."""
    from tests.support.service import ServeProcess

    server = ServeProcess(tmp_path, env={"FACEGATE_RECOGNIZER": "no_such_model"})
    try:
        server.start(timeout=60)
    except RuntimeError as exc:
        assert "unknown model 'no_such_model'" in str(exc)
    else:
        server.stop()
        raise AssertionError("the server started without its recognizer")
    assert server.proc is None  # stopped, nothing left running


def _idle_connection_closed_after(base_url: str, idle_s: float) -> bool:
    """Send one request on a keep-alive connection, read the whole answer, stay idle, and
    report whether the server closed the connection in the meantime."""
    import http.client
    from urllib.parse import urlsplit

    url = urlsplit(base_url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    try:
        conn.request("GET", "/healthz")
        response = conn.getresponse()
        assert response.status == 200 and response.read() and not response.will_close
        conn.sock.settimeout(idle_s)
        try:
            return conn.sock.recv(1) == b""  # b"": the server closed its end
        except TimeoutError:
            return False
    finally:
        conn.close()


def test_keep_alive_follows_settings(tmp_path):
    from tests.support.service import ServeProcess

    # 75 s by default: uvicorn's own default (5 s) would close the connection within the wait
    for env, idle_s, closed in (({"FACEGATE_KEEP_ALIVE_S": "1"}, 4.0, True), ({}, 8.0, False)):
        data = tmp_path / str(len(env))
        data.mkdir()
        server = ServeProcess(data, env=env).start()
        try:
            assert _idle_connection_closed_after(server.base_url, idle_s) is closed
        finally:
            server.stop()


def _readyz(base_url: str) -> httpx.Response:
    return httpx.get(f"{base_url}/readyz", timeout=5)


def _until(predicate, timeout: float, step: float = 0.05):
    """Poll ``predicate`` (returning a value or None) until it returns one; (value, seconds)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        value = predicate()
        if value is not None:
            return value, time.monotonic() - start
        time.sleep(step)
    raise AssertionError(f"condition not met within {timeout}s")


@pytest.mark.timeout(240)
def test_readiness_follows_the_store(tmp_path):
    """A replica on PostgreSQL is not ready while it cannot sync with the store (503 with
    the reason), and ready again once it can.

    Two outages of a real server: stopped (the sync attempts fail: 503 within the freshness
    bound) and frozen with SIGSTOP (the attempts hang, neither failing nor succeeding: 503
    once the last successful sync is older than ``FACEGATE_SYNC_UNREADY_AFTER_S``)."""
    from tests.support.pg import PostgresCluster
    from tests.support.service import ServeProcess

    bound_s, unready_after_s = 1.0, 2.5
    cluster = PostgresCluster().start()  # its own server: stopping it disturbs no other test
    server = ServeProcess(
        tmp_path,
        env={
            "FACEGATE_STORE_URL": cluster.create_database(),
            "FACEGATE_SYNC_BOUND_S": str(bound_s),
            "FACEGATE_SYNC_UNREADY_AFTER_S": str(unready_after_s),
        },
    )
    try:
        server.start(timeout=120)
        ready = _readyz(server.base_url)
        sync = ready.json()["sync"]
        assert ready.status_code == 200 and sync["ready"] and sync["fresh"], ready.text
        assert 0 <= sync["last_synced_age_s"] <= bound_s and "reason" not in ready.json()

        def not_ready():
            r = _readyz(server.base_url)
            return r if r.status_code == 503 else None

        def ready_again():
            r = _readyz(server.base_url)
            return r if r.status_code == 200 else None

        # 1. the server stops: the next sync fails
        cluster.stop_server()
        down, detected_s = _until(not_ready, 10)
        body = down.json()
        assert body["status"] == "not_ready" and body["checks"] == {
            "models": True,
            "gallery": False,
        }
        assert "last sync with the store failed" in body["reason"], body
        assert body["reason"] == body["sync"]["reason"] and body["sync"]["ready"] is False
        time.sleep(1.0)
        still = _readyz(server.base_url)
        assert still.status_code == 503 and still.json()["sync"]["last_synced_age_s"] > bound_s
        cluster.start_server()
        up, recovered_s = _until(ready_again, 60)
        assert up.json()["sync"]["ready"] and "reason" not in up.json()

        # 2. the server hangs: nothing fails, the last successful sync only grows old
        def in_sync():
            sync = _readyz(server.base_url).json()["sync"]
            return sync if sync["ready"] and sync["last_synced_age_s"] <= 0.5 else None

        _until(in_sync, 10)  # the sync that ended the outage may have begun during it
        pids = cluster.server_pids()
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        frozen = time.monotonic()
        try:
            hung, _ = _until(not_ready, unready_after_s + 10)
            hung_s = time.monotonic() - frozen
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
        assert hung.json()["reason"].startswith("no successful sync with the store for"), hung.text
        assert hung.json()["sync"]["last_synced_age_s"] > unready_after_s
        assert unready_after_s - 0.6 <= hung_s <= unready_after_s + 2.0, hung_s
        _, thawed_s = _until(ready_again, 30)
        print(
            f"\nstore stopped: 503 after {detected_s:.2f}s, 200 again {recovered_s:.2f}s "
            f"after the restart; store frozen: 503 after {hung_s:.2f}s, 200 again "
            f"{thawed_s:.2f}s after it resumed"
        )
        assert detected_s <= bound_s, detected_s
    finally:
        server.stop()
        cluster.stop()


def test_dashboard_admission_refusals_are_exported_before_any_refusal():
    """The Grafana dashboard's refusal panel reads ``facegate_admission_refused_total``; the
    series must exist from the start (at 0 for every reason), not only after the first
    refusal, or the panel (and the Docker smoke test's dashboard check) finds no data."""
    import json

    from service.metrics import Metrics
    from tests.conftest import REPO

    dashboard = (REPO / "docker/grafana/dashboards/facegate.json").read_text()
    exprs = [
        target.get("expr", "")
        for panel in json.loads(dashboard)["panels"]
        for target in panel.get("targets", [])
    ]
    assert any("facegate_admission_refused_total" in expr for expr in exprs)
    text = Metrics().render()[0].decode()
    for reason in ("overloaded", "deadline", "disconnected"):
        assert f'facegate_admission_refused_total{{reason="{reason}"}} 0.0' in text, reason
