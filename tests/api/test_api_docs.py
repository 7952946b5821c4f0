"""The API documentation pages work offline, and every route has its own metrics label."""

from __future__ import annotations

import asyncio
import re

import httpx

from service.app import DOCS_ASSETS_URL, create_app
from service.config import Settings

#: ``src``/``href`` attributes and the JS string literals holding a URL in the docs pages.
_URL = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']|url:\s*['"]([^'"]+)['"]""")


def _urls(html: str) -> list[str]:
    return [a or b for a, b in _URL.findall(html)]


def _get_all(app, paths: list[str]) -> list[httpx.Response]:
    async def main() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return [await client.get(path) for path in paths]

    return asyncio.run(main())


def test_docs_pages_use_only_assets_the_service_serves(tmp_path):
    app = create_app(Settings(data_dir=tmp_path))
    docs, redoc = _get_all(app, ["/docs", "/redoc"])
    assert docs.status_code == 200 and redoc.status_code == 200
    urls = {"docs": _urls(docs.text), "redoc": _urls(redoc.text)}
    assert any(u.endswith("swagger-ui-bundle.js") for u in urls["docs"]), urls
    assert any(u.endswith(".css") for u in urls["docs"]), urls
    assert any(u.endswith("redoc.standalone.js") for u in urls["redoc"]), urls
    every = urls["docs"] + urls["redoc"]
    assert "/openapi.json" in every
    # nothing from another host: every URL is a path on this service
    assert all(u.startswith("/") and not u.startswith("//") for u in every), every
    assets = sorted({u for u in every if u.startswith(DOCS_ASSETS_URL + "/")})
    assert len(assets) >= 3, assets
    for url, response in zip(assets, _get_all(app, assets), strict=True):
        assert response.status_code == 200, url
        assert len(response.content) > 1000, url
        kind = response.headers["content-type"]
        if url.endswith(".js"):
            assert "javascript" in kind, (url, kind)
        elif url.endswith(".css"):
            assert kind.startswith("text/css"), (url, kind)


def test_metrics_label_the_docs_and_metrics_routes(tmp_path):
    app = create_app(Settings(data_dir=tmp_path))
    asset = f"{DOCS_ASSETS_URL}/swagger-ui.css"
    paths = ["/docs", "/openapi.json", "/redoc", asset, "/metrics", "/no/such/path", "/metrics"]
    *_, missing, metrics = _get_all(app, paths)
    assert missing.status_code == 404
    text = metrics.text
    for route in ("/docs", "/openapi.json", "/redoc", DOCS_ASSETS_URL, "/metrics"):
        series = f'facegate_http_requests_total{{method="GET",route="{route}",status="200"}} 1.0'
        assert series in text, route
    unmatched = [
        line
        for line in text.splitlines()
        if line.startswith("facegate_http_requests_total{") and "unmatched" in line
    ]
    assert unmatched == [
        'facegate_http_requests_total{method="GET",route="unmatched",status="404"} 1.0'
    ]
