"""Images by URL (``image_url``, ``image1_url``, ``image2_url``) from allow-listed hosts only.

A local HTTP server on 127.0.0.1 serves real LFW photos (and a 404, redirects, a body
over the limit, a source that stalls); a real ``facegate serve`` process allows exactly
that server's ``127.0.0.1:<port>``, with a small ``FACEGATE_MAX_IMAGE_BYTES`` and a 1 s
timeout.  Every refusal is a typed 4xx, and a URL refused by the rules is never requested.
(That images by URL are off by default is checked in ``test_api_extract.py``.)
"""

from __future__ import annotations

import http.server
import threading
import time
from typing import Self

import httpx
import pytest

from service.api.urls import UrlFetcher, parse_host
from tests.conftest import GROUP_PHOTO, LFW
from tests.support.service import ServeProcess

MAX_IMAGE_BYTES = 50_000
TIMEOUT_S = 1.0
STALL_S = 4.0
FILES = {
    "/a.jpg": LFW / "images/Abel_Pacheco/Abel_Pacheco_0001.jpg",
    "/b.jpg": LFW / "images/Abel_Pacheco/Abel_Pacheco_0004.jpg",
    "/other.jpg": LFW / "images/Akhmed_Zakayev/Akhmed_Zakayev_0001.jpg",
    "/big.jpg": GROUP_PHOTO,
}


class Source:
    """The image source: a threaded HTTP/1.0 server that records every path it is asked for."""

    def __init__(self) -> None:
        self.requested: list[str] = []
        source = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(
                self,
                status: int,
                body: bytes = b"",
                headers: dict | None = None,
                length: bool = True,
            ) -> None:
                self.send_response(status)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                if length:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                source.requested.append(self.path)
                port = self.server.server_address[1]
                if self.path in FILES:
                    self._send(200, FILES[self.path].read_bytes(), {"Content-Type": "image/jpeg"})
                elif self.path == "/big-stream.jpg":  # no Content-Length: read until closed
                    self._send(200, GROUP_PHOTO.read_bytes(), length=False)
                elif self.path == "/text":
                    self._send(200, b"not an image\n" * 20, {"Content-Type": "image/jpeg"})
                elif self.path == "/redirect-in":
                    self._send(302, headers={"Location": "/b.jpg"})
                elif self.path == "/redirect-out":  # same server, but a host not on the list
                    self._send(302, headers={"Location": f"http://localhost:{port}/offlist"})
                elif self.path == "/redirect-file":
                    self._send(302, headers={"Location": "file:///etc/passwd"})
                elif self.path == "/stall":
                    time.sleep(STALL_S)
                    self._send(200, FILES["/a.jpg"].read_bytes())
                else:
                    self._send(404, b"not found")

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def source():
    with Source() as src:
        yield src


@pytest.fixture(scope="module")
def server(tmp_path_factory, source):
    env = {
        "FACEGATE_URL_ALLOWLIST": f"127.0.0.1:{source.port}",
        "FACEGATE_URL_TIMEOUT_S": str(TIMEOUT_S),
        "FACEGATE_MAX_IMAGE_BYTES": str(MAX_IMAGE_BYTES),
    }
    srv = ServeProcess(tmp_path_factory.mktemp("urls"), env=env).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.base_url, timeout=60, trust_env=False) as c:
        yield c


def test_allowlist_entries_and_matching():
    assert parse_host("Example.COM") == ("example.com", None)
    assert parse_host("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert parse_host("[::1]:9000") == ("::1", 9000)
    for bad in ("http://example.com", "user@example.com", "example.com/path", "host:port", ""):
        with pytest.raises(ValueError):
            parse_host(bad)
    fetcher = UrlFetcher(["images.example.com", "127.0.0.1:8080", "[::1]:9000"])
    for ok in (
        "https://images.example.com/a.jpg",
        "http://IMAGES.example.com/a.jpg",
        "https://images.example.com:443/a.jpg",
        "http://127.0.0.1:8080/x",
        "http://[::1]:9000/x",
    ):
        fetcher.check("image_url", ok)
    for refused in (
        "https://images.example.com:8443/a.jpg",
        "http://127.0.0.1/x",
        "http://127.0.0.1:8081/x",
        "http://images.example.com.evil.net/a.jpg",
        "http://evil.net/images.example.com",
        "ftp://images.example.com/a.jpg",
        "file:///etc/passwd",
        "http://u:p@images.example.com/a.jpg",
        "http://images.example.com\\@evil.net/",
    ):
        with pytest.raises(Exception) as info:
            fetcher.check("image_url", refused)
        assert getattr(info.value, "code", None) == "url_not_allowed", refused
    with pytest.raises(Exception) as info:
        UrlFetcher([]).check("image_url", "http://127.0.0.1:8080/x")
    assert info.value.code == "url_not_allowed" and "disabled" in info.value.message


@pytest.mark.timeout(300)
def test_verify_and_embed_images_by_url(source, client):
    a, b = f"{source.base}/a.jpg", f"{source.base}/b.jpg"
    r = client.post("/v1/verify?timings=true", json={"image1_url": a, "image2_url": b})
    assert r.status_code == 200, r.text
    by_url = r.json()
    assert by_url["match"] is True and "fetch" in by_url["timings"]

    # one URL (form field) + one upload: the same answer as two uploads
    photo_b = FILES["/b.jpg"].read_bytes()
    r = client.post("/v1/verify", data={"image1_url": a}, files={"image2": ("b.jpg", photo_b)})
    assert r.status_code == 200, r.text
    uploads = client.post(
        "/v1/verify",
        files={"image1": ("a.jpg", FILES["/a.jpg"].read_bytes()), "image2": ("b.jpg", photo_b)},
    ).json()
    assert r.json()["match"] is True
    assert r.json()["similarity"] == pytest.approx(uploads["similarity"], abs=1e-6)
    assert by_url["similarity"] == pytest.approx(uploads["similarity"], abs=1e-6)

    r = client.post("/v1/verify", json={"image1_url": a, "image2_url": f"{source.base}/other.jpg"})
    assert r.status_code == 200 and r.json()["match"] is False, r.text

    # a redirect within the allow-list is followed (each target is re-checked)
    r = client.post(
        "/v1/verify", json={"image1_url": f"{source.base}/redirect-in", "image2_url": b}
    )
    assert r.status_code == 200 and r.json()["similarity"] > 0.99, r.text

    # the other image endpoints take image_url too
    r = client.post("/v1/embed", json={"image_url": a})
    assert r.status_code == 200 and len(r.json()["faces"]) == 1, r.text


@pytest.mark.timeout(300)
def test_urls_refused(source, server, client):
    base = source.base
    cases = [
        # (name, body, status, code, words in the message)
        (
            "host not on the list",
            {"image_url": f"http://localhost:{source.port}/a.jpg"},
            400,
            "url_not_allowed",
            "allow-list",
        ),
        (
            "port not on the list",
            {"image_url": f"http://127.0.0.1:{server.port}/healthz"},
            400,
            "url_not_allowed",
            "allow-list",
        ),
        ("file URL", {"image_url": "file:///etc/passwd"}, 400, "url_not_allowed", "http"),
        ("server path", {"image_url": "/etc/passwd"}, 400, "url_not_allowed", "http"),
        (
            "userinfo",
            {"image_url": f"http://user:secret@127.0.0.1:{source.port}/userinfo"},
            400,
            "url_not_allowed",
            "credentials",
        ),
        ("not a string", {"image_url": 12}, 400, "invalid_url", "URL"),
        ("404 at the source", {"image_url": f"{base}/missing.jpg"}, 400, "url_fetch_failed", "404"),
        (
            "body over the limit",
            {"image_url": f"{base}/big.jpg"},
            413,
            "image_too_large",
            str(MAX_IMAGE_BYTES),
        ),
        (
            "streamed body over the limit",
            {"image_url": f"{base}/big-stream.jpg"},
            413,
            "image_too_large",
            str(MAX_IMAGE_BYTES),
        ),
        (
            "redirect off the list",
            {"image_url": f"{base}/redirect-out"},
            400,
            "url_not_allowed",
            "redirect",
        ),
        (
            "redirect to a file",
            {"image_url": f"{base}/redirect-file"},
            400,
            "url_not_allowed",
            "redirect",
        ),
        ("not an image", {"image_url": f"{base}/text"}, 415, "unsupported_image_type", ""),
        (
            "URL and bytes",
            {"image_url": f"{base}/a.jpg", "image": "aGVsbG8="},
            400,
            "ambiguous_request",
            "image_url",
        ),
    ]
    failures = []
    for name, body, status, code, words in cases:
        r = client.post("/v1/detect", json=body)
        error = r.json().get("error", {})
        if r.status_code != status or error.get("code") != code or words not in error["message"]:
            failures.append(
                f"{name}: expected {status} {code} ({words!r}), got {r.status_code} {r.text}"
            )
    assert not failures, "\n".join(failures)

    # a source that stalls: refused after the timeout, not after the stall
    start = time.monotonic()
    r = client.post(
        "/v1/verify", json={"image1_url": f"{base}/stall", "image2_url": f"{base}/a.jpg"}
    )
    elapsed = time.monotonic() - start
    assert r.status_code == 400 and r.json()["error"]["code"] == "url_fetch_failed", r.text
    assert "timed out" in r.json()["error"]["message"]
    assert elapsed < STALL_S - 1.0, f"the stalled fetch took {elapsed:.1f}s"

    # what the rules refuse is never requested: no userinfo path, no off-list redirect target
    assert "/userinfo" not in source.requested and "/offlist" not in source.requested
    assert "/redirect-out" in source.requested and "/missing.jpg" in source.requested

    metrics = httpx.get(f"{server.base_url}/metrics", trust_env=False).text
    for series in (
        'facegate_rejects_total{reason="url_not_allowed"}',
        'facegate_rejects_total{reason="url_fetch_failed"}',
        'facegate_rejects_total{reason="image_too_large"}',
    ):
        assert series in metrics, series
    assert 'status="500"' not in metrics


def test_info_reports_url_fetching(client, source):
    urls = client.get("/v1/info").json()["image_urls"]
    assert urls == {
        "enabled": True,
        "allowed_hosts": [f"127.0.0.1:{source.port}"],
        "timeout_s": TIMEOUT_S,
    }


def test_bulk_items_by_url(client, source):
    """Bulk enrolment items may give ``image_url``: fetched like any image URL, and a failed
    fetch refuses only its own item."""
    items = [
        {"subject_id": "Abel_Pacheco", "image_url": f"{source.base}/a.jpg"},
        {"subject_id": "x", "image_url": f"{source.base}/missing.jpg"},
        {"subject_id": "y", "image_url": f"{source.base}/text"},
        {"subject_id": "z", "image_url": "http://localhost:1/offlist.jpg"},
    ]
    r = client.post("/v1/galleries/bulk-urls/faces", json={"items": items})
    assert r.status_code == 200, r.text
    answers = r.json()["items"]
    assert answers[0]["created"] is True and answers[0]["face_id"] >= 1
    assert [a.get("error", {}).get("code") for a in answers[1:]] == [
        "url_fetch_failed",
        "unsupported_image_type",
        "url_not_allowed",
    ]
    r = client.post(
        "/v1/identify",
        data={"gallery": "bulk-urls"},
        files={"image": ("b.jpg", FILES["/b.jpg"].read_bytes())},
    )
    assert r.json()["faces"][0]["match"] == "Abel_Pacheco"
