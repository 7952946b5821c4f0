"""Before its lifespan has loaded anything, the app is alive but not ready, and says so."""

from __future__ import annotations

import asyncio

import httpx

from service.app import create_app
from service.config import Settings


def test_not_ready_until_started(tmp_path):
    app = create_app(Settings(data_dir=tmp_path, api_keys=["k"]))

    async def main():
        transport = httpx.ASGITransport(app=app)  # no lifespan: nothing loaded
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return (await client.get("/healthz"), await client.get("/readyz"),
                    await client.get("/v1/info", headers={"X-API-Key": "k"}),
                    await client.get("/v1/info"), await client.get("/metrics"),
                    await client.get("/openapi.json"))

    health, ready, info, unauthorised, metrics, openapi = asyncio.run(main())
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    assert ready.status_code == 503
    assert ready.json()["status"] == "not_ready"
    assert ready.json()["checks"] == {"models": False, "gallery": False}
    assert info.status_code == 503 and info.json()["error"]["code"] == "not_ready"
    assert unauthorised.status_code == 401  # auth is checked before readiness
    assert metrics.status_code == 200
    assert 'facegate_http_requests_total{method="GET",route="/readyz",status="503"} 1.0' in metrics.text
    # every app has its own registry: a second app starts from zero
    other = create_app(Settings(data_dir=tmp_path))
    assert other.state.metrics.registry is not app.state.metrics.registry

    # the OpenAPI description documents both body forms of the image endpoints
    spec = openapi.json()
    for path in ("/v1/verify", "/v1/identify", "/v1/galleries/{gallery}/subjects/{subject_id}/faces"):
        content = spec["paths"][path]["post"]["requestBody"]["content"]
        assert {"multipart/form-data", "application/json"} <= set(content), path
    assert "best" in spec["paths"]["/v1/identify"]["post"]["description"]
    assert "422" in spec["paths"]["/v1/verify"]["post"]["responses"]


def test_serve_refuses_to_start_without_its_models(tmp_path):
    """A model that cannot be resolved stops ``facegate serve`` with the registry's message."""
    from tests.service_helpers import ServeProcess

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
    from tests.service_helpers import ServeProcess

    # 75 s by default: uvicorn's own default (5 s) would close the connection within the wait
    for env, idle_s, closed in (({"FACEGATE_KEEP_ALIVE_S": "1"}, 4.0, True), ({}, 8.0, False)):
        data = tmp_path / str(len(env))
        data.mkdir()
        server = ServeProcess(data, env=env).start()
        try:
            assert _idle_connection_closed_after(server.base_url, idle_s) is closed
        finally:
            server.stop()
