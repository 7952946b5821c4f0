"""Hostile input against the real service: what an attacker sends, and what must not happen.

One ``facegate serve`` process on 127.0.0.1 (the real entry point, so its memory can be
read from /proc), with API keys, a metrics key and short header/body time limits.
Each test sends the exact inputs of issue 17.  The route table ``ROUTES`` lists every
endpoint with a sample request; ``test_route_table_covers_every_endpoint`` fails when an
endpoint is added to the service and not to the table, so that every table-driven test
(keys before bodies, no redirects, dot-segment ids, deep JSON) covers it.
"""

from __future__ import annotations

import base64
import io
import json
import math
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.conftest import LFW
from tests.support.service import ServeProcess

KEY = "hostile-key-0123"
METRICS_KEY = "metrics-key-4567"
HEADER_TIMEOUT_S = 2.0
BODY_TIMEOUT_S = 3.0
MIB = 1024 * 1024
MAX_DECODE_BYTES = 256 * MIB
DECODE_BUDGET_BYTES = 600 * MIB
ENV = {
    "FACEGATE_API_KEYS": KEY,
    "FACEGATE_METRICS_KEY": METRICS_KEY,
    "FACEGATE_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
    "FACEGATE_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
    "FACEGATE_MAX_DECODE_BYTES": str(MAX_DECODE_BYTES),
    "FACEGATE_DECODE_BUDGET_BYTES": str(DECODE_BUDGET_BYTES),
    "FACEGATE_GALLERY_SNAPSHOTS": "false",
}
FACE = LFW / "images/Abel_Pacheco/Abel_Pacheco_0001.jpg"


@dataclass(frozen=True)
class Route:
    """One endpoint: method, a concrete path, whether it needs the API key, and a body."""

    method: str
    template: str  # as in /openapi.json
    path: str
    keyed: bool = True
    body: str | None = None  # "image": an image upload; "json": a JSON object

    @property
    def writes(self) -> bool:
        return self.method in ("POST", "PUT", "PATCH", "DELETE")


#: Every endpoint of the service.  Add a new endpoint here (the coverage test insists).
ROUTES = [
    Route("GET", "/healthz", "/healthz", keyed=False),
    Route("GET", "/readyz", "/readyz", keyed=False),
    Route("GET", "/metrics", "/metrics", keyed=False),  # its own key: test_metrics_*
    Route("GET", "/v1/info", "/v1/info"),
    Route("POST", "/v1/verify", "/v1/verify", body="image"),
    Route("POST", "/v1/identify", "/v1/identify", body="image"),
    Route("POST", "/v1/detect", "/v1/detect", body="image"),
    Route("POST", "/v1/embed", "/v1/embed", body="image"),
    Route("GET", "/v1/galleries", "/v1/galleries"),
    Route("PUT", "/v1/galleries/{gallery}", "/v1/galleries/victim"),
    Route("GET", "/v1/galleries/{gallery}", "/v1/galleries/victim"),
    Route("DELETE", "/v1/galleries/{gallery}", "/v1/galleries/victim"),
    Route("POST", "/v1/galleries/{gallery}/subjects", "/v1/galleries/victim/subjects", body="json"),
    Route("GET", "/v1/galleries/{gallery}/subjects", "/v1/galleries/victim/subjects"),
    Route(
        "GET",
        "/v1/galleries/{gallery}/subjects/{subject_id}",
        "/v1/galleries/victim/subjects/alice",
    ),
    Route(
        "PATCH",
        "/v1/galleries/{gallery}/subjects/{subject_id}",
        "/v1/galleries/victim/subjects/alice",
        body="json",
    ),
    Route(
        "DELETE",
        "/v1/galleries/{gallery}/subjects/{subject_id}",
        "/v1/galleries/victim/subjects/alice",
    ),
    Route(
        "POST",
        "/v1/galleries/{gallery}/subjects/{subject_id}/faces",
        "/v1/galleries/victim/subjects/alice/faces",
        body="image",
    ),
    Route("POST", "/v1/galleries/{gallery}/reenrol", "/v1/galleries/victim/reenrol", body="json"),
    Route("DELETE", "/v1/galleries/{gallery}/faces/{face_id}", "/v1/galleries/victim/faces/1"),
    Route("POST", "/v1/galleries/{gallery}/faces", "/v1/galleries/victim/faces", body="json"),
    Route("GET", "/v1/galleries/{gallery}/export", "/v1/galleries/victim/export"),
    Route("GET", "/v1/audit", "/v1/audit"),
    Route("POST", "/v1/galleries/{gallery}/photos", "/v1/galleries/victim/photos", body="image"),
    Route("POST", "/v1/galleries/{gallery}/clusters/run", "/v1/galleries/victim/clusters/run"),
    Route("GET", "/v1/galleries/{gallery}/clusters", "/v1/galleries/victim/clusters"),
    Route(
        "GET", "/v1/galleries/{gallery}/clusters/{cluster_id}", "/v1/galleries/victim/clusters/c1"
    ),
    *(
        Route(
            "POST",
            f"/v1/galleries/{{gallery}}/clusters/{{cluster_id}}/{action}",
            f"/v1/galleries/victim/clusters/c1/{action}",
            body="json",
        )
        for action in ("name", "merge", "split")
    ),
    Route(
        "GET",
        "/v1/galleries/{gallery}/photo-faces/{face_id}",
        "/v1/galleries/victim/photo-faces/1",
    ),
    Route(
        "GET",
        "/v1/galleries/{gallery}/photo-faces/{face_id}/thumbnail",
        "/v1/galleries/victim/photo-faces/1/thumbnail",
    ),
    Route(
        "POST",
        "/v1/galleries/{gallery}/photo-faces/{face_id}/move",
        "/v1/galleries/victim/photo-faces/1/move",
        body="json",
    ),
    Route(
        "POST",
        "/v1/galleries/{gallery}/photo-faces/{face_id}/remove",
        "/v1/galleries/victim/photo-faces/1/remove",
    ),
]
KEYED = [r for r in ROUTES if r.keyed]
WITH_BODY = [r for r in ROUTES if r.body]
WITH_IDS = [r for r in ROUTES if "{gallery}" in r.template]


def _id(route: Route) -> str:
    return f"{route.method} {route.template}"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServeProcess(tmp_path_factory.mktemp("hostile"), env=ENV).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.base_url, headers={"X-API-Key": KEY}, timeout=60) as c:
        yield c


@pytest.fixture
def victim(client):
    """Gallery ``victim`` with subjects ``alice`` and ``bob``, fresh for each test."""
    client.delete("/v1/galleries/victim")
    for subject in ("alice", "bob"):
        r = client.post("/v1/galleries/victim/subjects", json={"subject_id": subject})
        assert r.status_code == 201, r.text
    return "victim"


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, (response.status_code, response.text[:500])
    error = response.json()["error"]
    if code is not None:
        assert error["code"] == code, error
    return error


def _raw(server, request: bytes, read_timeout: float) -> tuple[bytes, float]:
    """Send ``request`` on a fresh socket; what came back before the server closed (or
    ``read_timeout`` passed), and the seconds that took."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=read_timeout) as sock:
        start = time.monotonic()
        sock.sendall(request)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
                if b"\r\n\r\n" in received and b'"error"' in received:
                    break
        except TimeoutError:
            pass
        return received, time.monotonic() - start


# --- the route table -------------------------------------------------------------------------


def test_route_table_covers_every_endpoint(client):
    spec = client.get("/openapi.json").json()
    served = {(method.upper(), path) for path, item in spec["paths"].items() for method in item}
    assert served == {(r.method, r.template) for r in ROUTES}


# --- 1. decode memory ------------------------------------------------------------------------


def _memory(pid: int) -> tuple[int, int]:
    """(current RSS, peak RSS since the last reset) of ``pid`` in bytes."""
    fields = dict(
        line.split(":", 1)
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if ":" in line
    )
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def _reset_peak(pid: int) -> int:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    return _memory(pid)[0]


def _detect(client, data: bytes) -> httpx.Response:
    return client.post("/v1/detect", files={"image": ("x.png", data, "image/png")})


@pytest.mark.timeout(300)
def test_sixteen_bit_bomb_is_decoded_within_its_bytes(server, client):
    """Issue: a 77 KB 16-bit 6300x6300 PNG took ~750 MB per request, 8 in parallel 5.3 GB."""
    bomb = _png(Image.new("I;16", (6300, 6300)))
    assert len(bomb) < 100_000
    pid = server.proc.pid
    _detect(client, _png(Image.new("RGB", (64, 64))))  # warm every lazy allocation once

    base = _reset_peak(pid)
    r = _detect(client, bomb)
    assert r.status_code == 200, r.text  # accepted: under every limit, no face in it
    assert r.json()["image"] == {"width": 6300, "height": 6300} and r.json()["faces"] == []
    one = _memory(pid)[1] - base
    # Independent bound: the 16-bit samples (2 B/px) next to the 8-bit BGR result (3 B/px),
    # plus 100 MB for the strip being converted, detection and the request itself.
    pixels = 6300 * 6300
    assert one < pixels * (2 + 3) + 100 * MIB, f"one decode took {one / MIB:.0f} MiB"

    base = _reset_peak(pid)
    with httpx.Client(base_url=server.base_url, headers={"X-API-Key": KEY}, timeout=300) as c:
        results: list[int] = []
        threads = [
            threading.Thread(target=lambda: results.append(_detect(c, bomb).status_code))
            for _ in range(8)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert results == [200] * 8
    eight = _memory(pid)[1] - base
    # Decodes in flight are bounded by the budget, however many requests arrive at once.
    assert eight < DECODE_BUDGET_BYTES + 150 * MIB, f"8 decodes took {eight / MIB:.0f} MiB"


def test_decode_cost_counts_channels_not_just_pixels(client):
    """Same 6300x6300 size under the pixel limit: 16-bit gray fits the decode limit, RGBA
    (4 B/px in the decoder, then 3 B/px out) does not, and is refused from its header."""
    rgba = _png(Image.new("RGBA", (6300, 6300)))
    assert MAX_DECODE_BYTES < 6300 * 6300 * (4 + 3)
    error = _error(_detect(client, rgba), 413, "decode_too_large")
    assert "6300x6300" in error["message"] and str(MAX_DECODE_BYTES) in error["message"]


# --- 2. dot-segment ids and redirects ----------------------------------------------------------


def test_normalised_dot_segment_delete_does_not_delete_the_gallery(server, client, victim):
    """Issue: DELETE .../subjects/.. normalised to DELETE /v1/galleries/victim/ answered 307
    to /v1/galleries/victim, and a client following it deleted the whole gallery."""
    import requests  # normalises dot-segments and follows 307s, as in the issue

    r = requests.delete(
        f"{server.base_url}/v1/galleries/victim/subjects/..", headers={"X-API-Key": KEY}, timeout=30
    )
    assert r.status_code == 404 and not r.history, (r.status_code, r.history, r.text)
    r = client.delete("/v1/galleries/victim/", follow_redirects=True)
    _error(r, 404, "not_found")
    assert not r.history
    assert client.get("/v1/galleries/victim").json()["subjects"] == 2


@pytest.mark.parametrize("route", ROUTES, ids=_id)
def test_no_route_redirects(client, route):
    r = client.request(route.method, route.path + "/", follow_redirects=False)
    assert not 300 <= r.status_code < 400, (r.status_code, r.headers.get("location"))


@pytest.mark.parametrize("dots", [".", ".."])
@pytest.mark.parametrize("route", WITH_IDS, ids=_id)
def test_dot_segment_ids_are_refused_on_every_route(client, victim, route, dots):
    """An escaped dot-segment reaches the service as ``.``/``..``: refused as an id."""
    escaped = dots.replace(".", "%2E")
    paths = [route.path.replace("/victim", f"/{escaped}", 1)]
    if "{subject_id}" in route.template:
        paths.append(route.path.replace("/alice", f"/{escaped}"))
    for path in paths:
        r = client.request(route.method, path, **_sample_body(route))
        error = _error(r, 422, "validation_error")
        assert "dot-segment" in error["message"]
    assert client.get("/v1/galleries/victim").json()["subjects"] == 2


#: Requests naming a gallery or subject in their body or form fields, by where the id goes.
ID_IN_BODY = {
    "subject_id": lambda c, v: c.post("/v1/galleries/victim/subjects", json={"subject_id": v}),
    "source": lambda c, v: c.post("/v1/galleries/copy/reenrol", json={"source": v}),
    "identify gallery": lambda c, v: c.post(
        "/v1/identify", files={"image": FACE.read_bytes()}, data={"gallery": v}
    ),
    "verify gallery": lambda c, v: c.post(
        "/v1/verify", files={"image1": FACE.read_bytes()}, data={"gallery": v, "subject_id": "a"}
    ),
    "verify subject_id": lambda c, v: c.post(
        "/v1/verify",
        files={"image1": FACE.read_bytes()},
        data={"gallery": "victim", "subject_id": v},
    ),
}


@pytest.mark.parametrize("value", [".", ".."])
@pytest.mark.parametrize("where", ID_IN_BODY)
def test_dot_segment_ids_are_refused_in_bodies(client, victim, where, value):
    r = ID_IN_BODY[where](client, value)
    assert "dot-segment" in _error(r, 422, "validation_error")["message"]
    assert client.get("/v1/galleries/victim").json()["subjects"] == 2


# --- 3. metadata that could not be read back ---------------------------------------------------


def _nested(levels: int) -> dict:
    """``levels`` nested objects, built as text (no recursion on either side)."""
    return json.loads('{"a":' * (levels - 1) + "{}" + "}" * (levels - 1))


def test_deep_metadata_is_refused_before_writing(client, victim):
    """Issue: metadata 256 levels deep was committed, then every read of it answered 500."""
    for levels in (256, 17):
        r = client.post(
            "/v1/galleries/victim/subjects",
            json={"subject_id": "deep", "metadata": _nested(levels)},
        )
        _error(r, 400, "invalid_metadata")
        r = client.patch(
            "/v1/galleries/victim/subjects/alice", json={"metadata": {"x": _nested(levels - 1)}}
        )
        _error(r, 400, "invalid_metadata")
    _error(client.get("/v1/galleries/victim/subjects/deep"), 404, "subject_not_found")
    # The deepest metadata accepted (16 levels) is stored and reads back on every read.
    deepest = _nested(16)
    r = client.post(
        "/v1/galleries/victim/subjects", json={"subject_id": "deep", "metadata": deepest}
    )
    assert r.status_code == 201, r.text
    r = client.patch("/v1/galleries/victim/subjects/alice", json={"metadata": {"x": _nested(15)}})
    assert r.status_code == 200, r.text
    assert client.get("/v1/galleries/victim/subjects/deep").json()["metadata"] == deepest
    listed = client.get("/v1/galleries/victim/subjects").json()["subjects"]
    assert {s["subject_id"] for s in listed} == {"alice", "bob", "deep"}


# --- 4. keys before bodies, header and body time limits -----------------------------------


@pytest.mark.parametrize("key", [None, "wrong-key"])
@pytest.mark.parametrize("route", KEYED, ids=_id)
def test_key_is_checked_before_the_body_is_read(server, route, key):
    """Issue: a request declaring a 25 MB body got its 401 only after the body arrived.
    Every keyed route, whether it takes a body or not, answers from the headers alone."""
    head = (
        f"{route.method} {route.path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        "Content-Type: application/json\r\nContent-Length: 25000000\r\n"
    )
    if key:
        head += f"X-API-Key: {key}\r\n"
    received, elapsed = _raw(server, (head + "\r\n").encode(), read_timeout=10)
    status, code = (401, b"unauthorized") if key is None else (403, b"forbidden")
    assert received.startswith(f"HTTP/1.1 {status}".encode()), received[:200]
    assert code in received and elapsed < 5


@pytest.mark.parametrize(
    "method,path,status", [("POST", "/nowhere", 404), ("POST", "/healthz", 405)]
)
def test_no_route_answers_without_reading_the_body(server, method, path, status):
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        "Content-Type: application/json\r\nContent-Length: 25000000\r\n\r\n"
    )
    received, elapsed = _raw(server, head.encode(), read_timeout=10)
    assert received.startswith(f"HTTP/1.1 {status}".encode()), received[:200]
    assert elapsed < 5


def test_slow_headers_are_timed_out(server):
    """Issue: a client sending its headers slowly held the connection for ever."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never finished
        closed = sock.recv(1024) == b""
    assert closed and time.monotonic() - start < HEADER_TIMEOUT_S + 5


def test_slow_body_is_timed_out(server):
    head = (
        b"POST /v1/detect HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\nX-API-Key: " + KEY.encode() + b'\r\n\r\n{"image": '
    )
    received, elapsed = _raw(server, head, read_timeout=BODY_TIMEOUT_S + 10)
    assert received.startswith(b"HTTP/1.1 408"), received[:200]
    assert b"request_timeout" in received and elapsed < BODY_TIMEOUT_S + 5


# --- 5. client input that answered 500 --------------------------------------------------------


def _sample_body(route: Route) -> dict:
    if route.body == "image":
        return {"files": {"image": FACE.read_bytes()}}
    if route.body == "json":
        return {"json": {}}
    return {}


@pytest.mark.parametrize("route", WITH_BODY, ids=_id)
def test_deeply_nested_json_is_a_bad_request(client, victim, route):
    """Issue: JSON nested 10,000 levels answered 500 (RecursionError) on the image routes."""
    body = '{"a":' * 10_000 + "1" + "}" * 10_000
    r = client.request(
        route.method, route.path, content=body, headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 400, (r.status_code, r.text[:300])
    assert r.json()["error"]["code"] in ("invalid_json", "bad_request")
    assert client.get("/v1/galleries/victim").json()["subjects"] == 2


def test_lone_surrogate_in_metadata_is_a_bad_request(client, victim):
    body = '{"subject_id": "carol", "metadata": {"name": "\\ud800"}}'
    r = client.post(
        "/v1/galleries/victim/subjects", content=body, headers={"Content-Type": "application/json"}
    )
    _error(r, 400, "invalid_metadata")
    r = client.patch(
        "/v1/galleries/victim/subjects/alice",
        content='{"metadata": {"name": "\\udfff"}}',
        headers={"Content-Type": "application/json"},
    )
    _error(r, 400, "invalid_metadata")
    assert client.get("/v1/galleries/victim").json()["subjects"] == 2
    assert client.get("/v1/galleries/victim/subjects/alice").json()["metadata"] == {}


# --- 6. metrics -------------------------------------------------------------------------------


def test_metrics_need_the_metrics_key(server, client, victim):
    """Issue: with API keys set, /metrics stayed open and listed gallery names and sizes."""
    with httpx.Client(base_url=server.base_url, timeout=30) as anonymous:
        _error(anonymous.get("/metrics"), 401, "unauthorized")
        _error(anonymous.get("/metrics", headers={"X-API-Key": KEY}), 403, "forbidden")
        for headers in (
            {"X-API-Key": METRICS_KEY},
            {"Authorization": f"Bearer {METRICS_KEY}"},
        ):  # Prometheus
            r = anonymous.get("/metrics", headers=headers)
            assert r.status_code == 200 and 'gallery="victim"' in r.text
        assert anonymous.get("/healthz").status_code == 200  # probes stay open


# --- 7. page cursors --------------------------------------------------------------------------


def test_cursors_are_bound_to_their_gallery_and_refused_when_bad(client, victim):
    client.post("/v1/galleries/other/subjects", json={"subject_id": "zed"})
    page = client.get("/v1/galleries/victim/subjects", params={"limit": 1}).json()
    cursor = page["next_cursor"]
    assert [s["subject_id"] for s in page["subjects"]] == ["alice"] and cursor
    rest = client.get("/v1/galleries/victim/subjects", params={"cursor": cursor}).json()
    assert [s["subject_id"] for s in rest["subjects"]] == ["bob"]
    plain = base64.urlsafe_b64encode(b"alice").decode().rstrip("=")  # the old format
    for gallery, bad in (
        ("victim", "!!!"),
        ("victim", plain),
        ("other", cursor),
        ("victim", cursor[:-1]),
    ):
        r = client.get(f"/v1/galleries/{gallery}/subjects", params={"cursor": bad})
        _error(r, 422, "invalid_cursor")


# --- 8. details -------------------------------------------------------------------------------


def _identify(client, **fields) -> httpx.Response:
    body = {"image": base64.b64encode(FACE.read_bytes()).decode(), "gallery": "victim", **fields}
    return client.post(
        "/v1/identify", content=json.dumps(body), headers={"Content-Type": "application/json"}
    )


def test_nan_threshold_is_refused_as_not_finite(client, victim):
    error = _error(_identify(client, threshold=math.nan), 422, "validation_error")
    assert "finite" in error["message"] and "1" not in error["message"].split(":", 1)[1]
    r = client.post(
        "/v1/identify",
        files={"image": FACE.read_bytes()},
        data={"gallery": "victim", "threshold": "nan"},
    )
    assert "finite" in _error(r, 422, "validation_error")["message"]


def test_long_operating_point_is_not_echoed(client, victim):
    error = _error(_identify(client, operating_point="x" * 10_000), 422, "validation_error")
    assert len(error["message"]) < 300
    error = _error(
        _identify(client, operating_point="fmr_" + "9" * 28), 400, "unknown_operating_point"
    )
    assert len(error["message"]) < 300


def test_boolean_top_k_is_refused(client, victim):
    error = _error(_identify(client, top_k=True), 422, "validation_error")
    assert "top_k" in error["message"] and "boolean" in error["message"]
