"""Scoped keys against gallery B, looked at from every side, on one real server.

Gallery ``a`` belongs to the keys under test; gallery B (``bravo-canary-gallery``, subject
``bravo-canary-subject``, its enrolled faces) belongs to nobody of them.  The canary test
calls **every route of the OpenAPI description** with every key shape (scoped to ``a``,
admin of ``a``, enrol-only on ``a``, and a global admin as the control that must see B),
naming B wherever a gallery can be named (path, body, query), and asserts that B's name,
subject id and face ids appear nowhere in any answer's body or headers, and that each
refusal is in the audit log with its key, route and the gallery named (path, body or
query, also when the key's scope was refused before the route read the body).  The
other tests pin the defects one by one: ``/v1/info``, ``/v1/audit``, refusals without a
valid key and their throttle, cursors, bulk items.
"""

from __future__ import annotations

import base64
import contextlib
import io
import time

import httpx
import pytest

from service.cli import main as cli_main
from service.config import Settings
from service.gallery import audit as gallery_audit
from tests.conftest import GROUP_PHOTO, SHARED_MODELS, photo
from tests.support.service import InProcessServer

A = "a"
B = "bravo-canary-gallery"
B_SUBJECT = "bravo-canary-subject"
A_SUBJECT = "Angela_Merkel"
FLAT_KEY = "flat-key-canary-0123456789"  # FACEGATE_API_KEYS: audit id key-1

#: key id -> (scopes, galleries); ``root`` is the global admin (the canary's control)
KEYS = {
    "site-a": ("verify,identify,enrol,delete", A),
    "admin-a": ("admin", A),
    "enrol-a": ("enrol", A),
    "root": ("admin", "*"),
}


#: B's people-discovery records, filled by the ``env`` fixture
B_PEOPLE: dict = {}
GROUP_PHOTO_BYTES = GROUP_PHOTO.read_bytes()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "keys.json"
    made = {}
    for key_id, (scopes, galleries) in KEYS.items():
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            args = ["keys", "add", "--id", key_id, "--scopes", scopes, "--galleries", galleries]
            assert cli_main([*args, "--file", str(path)]) == 0
        made[key_id] = {"X-API-Key": out.getvalue().strip()}
    settings = Settings(
        models_dir=SHARED_MODELS,
        detector="yunet_2023mar",
        recognizer="mobilefacenet_peer_128d",
        providers=["CPUExecutionProvider"],
        faiss_gpu=False,
        data_dir=tmp_path_factory.mktemp("data"),
        api_keys=[FLAT_KEY],
        api_keys_file=path,
        store_images=True,
    )
    server = InProcessServer(settings).start()
    client = httpx.Client(base_url=server.base_url, timeout=60)
    root = made["root"]
    b_faces = []
    for gallery, subject, people in (
        (A, A_SUBJECT, [("Angela_Merkel", 1)]),
        (B, B_SUBJECT, [("Angela_Merkel", 2), ("Abdoulaye_Wade", 1)]),
    ):
        r = client.post(
            f"/v1/galleries/{gallery}/faces",
            headers=root,
            json={"items": [{"subject_id": subject, "image": b64(photo(*p))} for p in people]},
        )
        assert r.status_code == 200 and r.json()["enrolled"] == len(people), r.text
        if gallery == B:
            b_faces = [item["face_id"] for item in r.json()["items"]]
    # B's people discovery: a photo (its sha256 is B's photo id, a canary string), its faces
    # and a cluster, so that the cluster and photo-face routes name real records of B
    r = client.post(f"/v1/galleries/{B}/photos", headers=root, files={"image": GROUP_PHOTO_BYTES})
    assert r.status_code == 201, r.text
    B_PEOPLE["photo_id"] = r.json()["photo_id"]
    B_PEOPLE["photo_face"] = r.json()["faces"][0]["face_id"]
    assert client.post(f"/v1/galleries/{B}/clusters/run", headers=root).status_code == 200
    clusters = client.get(f"/v1/galleries/{B}/clusters", headers=root).json()["clusters"]
    B_PEOPLE["cluster_id"] = clusters[0]["cluster_id"] if clusters else "1"
    try:
        yield server, client, made, b_faces
    finally:
        client.close()
        server.stop()


def refusals(client, made, after: int = 0) -> list[dict]:
    """Every ``refused`` record after id ``after`` (the global admin reads them)."""
    records, cursor = [], str(after)
    while cursor is not None:
        page = client.get(
            "/v1/audit",
            headers=made["root"],
            params={"action": "refused", "cursor": cursor, "limit": 1000},
        ).json()
        records += page["records"]
        cursor = page["next_cursor"]
    return records


def last_id(client, made) -> int:
    page = client.get("/v1/audit", headers=made["root"], params={"limit": 1000}).json()
    while page["next_cursor"]:
        page = client.get(
            "/v1/audit",
            headers=made["root"],
            params={"limit": 1000, "cursor": page["next_cursor"]},
        ).json()
    return max((r["id"] for r in page["records"]), default=0)


def _face_ids(value) -> set[int]:
    """Every integer under a ``face_id``/``face_ids`` key of a JSON answer."""
    found: set[int] = set()
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, inner in item.items():
                if key in ("face_id", "face_ids"):
                    found.update(v for v in (inner if isinstance(inner, list) else [inner]))
                stack.append(inner)
        elif isinstance(item, list):
            stack.extend(item)
    return {v for v in found if isinstance(v, int)}


def call_naming_b(client, method: str, path: str, key: dict, b_face: int) -> httpx.Response:
    """``method path`` naming gallery B wherever the route takes a gallery."""
    face = B_PEOPLE["photo_face"] if "/photo-faces/" in path else b_face
    url = path.format(
        gallery=B, subject_id=B_SUBJECT, face_id=face, cluster_id=B_PEOPLE["cluster_id"]
    )
    image = b64(photo("Angela_Merkel", 3))
    body, params = None, {}
    if path == "/v1/verify":
        body = {"image1": image, "gallery": B, "subject_id": B_SUBJECT}
    elif path == "/v1/identify":
        body = {"image": image, "gallery": B}
    elif path in ("/v1/detect", "/v1/embed"):
        body = {"image": image}
    elif path == "/v1/info":
        params = {"check_index": "true"}
    elif path == "/v1/audit":
        params = {"gallery": B}
    elif path.endswith("/subjects") and method == "POST":
        body = {"subject_id": B_SUBJECT}
    elif method == "PATCH":
        body = {"metadata": {"k": 1}}
    elif path.endswith("/reenrol"):
        # into a's name space, from B: the source is the gallery named
        url = path.format(gallery=A)
        body = {"source": B}
    elif path.endswith("/{subject_id}/faces"):
        body = {"image": image}
    elif path.endswith("/{gallery}/faces"):
        body = {"items": [{"subject_id": B_SUBJECT, "image": image}]}
    elif path.endswith("/{gallery}/photos"):
        body = {"image": image}
    elif path.endswith("/name"):
        body = {"subject_id": B_SUBJECT}
    elif path.endswith("/merge"):
        body = {"source": B_PEOPLE["cluster_id"]}
    elif path.endswith("/split"):
        body = {"face_ids": [B_PEOPLE["photo_face"]]}
    elif path.endswith("/move"):
        body = {"subject_id": B_SUBJECT}
    return client.request(method, url, json=body, params=params, headers=key)


def _names_b(method: str, path: str) -> str | None:
    """Where the canary call names B: ``path``, ``body``, ``query`` or None."""
    if path.endswith("/reenrol") or path in ("/v1/verify", "/v1/identify"):
        return "body"
    if "{gallery}" in path:
        return "path"
    if path == "/v1/audit":
        return "query"
    return None


def test_scope_canary_every_route_every_key(env):
    server, client, made, b_faces = env
    spec = client.get("/openapi.json").json()
    routes = sorted(
        (method.upper(), path)
        for path, ops in spec["paths"].items()
        if path.startswith("/v1")
        for method in ops
    )
    assert len(routes) >= 20
    start = last_id(client, made)
    # destructive routes last, so that B still exists for every other call
    routes.sort(key=lambda r: r[0] == "DELETE")
    expected = []  # (key_id, route, gallery or None, code)
    for key_id in ("site-a", "admin-a", "enrol-a"):
        for method, path in routes:
            r = call_naming_b(client, method, path, made[key_id], b_faces[0])
            where = f"{key_id}: {method} {path} -> {r.status_code} {r.text[:200]}"
            assert r.status_code < 500, where
            seen = r.text + "\n" + "\n".join(f"{k}: {v}" for k, v in r.headers.items())
            assert B not in seen and B_SUBJECT not in seen, where
            assert B_PEOPLE["photo_id"] not in seen, where
            if r.headers.get("content-type", "").startswith("application/json"):
                assert not _face_ids(r.json()) & set(b_faces), where
            if _names_b(method, path) is not None:
                assert r.status_code == 403, where  # every call naming B is refused
            if r.status_code in (401, 403):
                # the gallery named, wherever it was named (path, body, query)
                gallery = B if _names_b(method, path) is not None else None
                expected.append((key_id, f"{method} {path}", gallery, r.json()["error"]["code"]))
    assert len(expected) > 3 * 15
    # the control: the global admin is allowed B, and B's name is in its answers
    r = call_naming_b(client, "GET", "/v1/galleries/{gallery}", made["root"], b_faces[0])
    assert r.status_code == 200 and B in r.text
    info = client.get("/v1/info", headers=made["root"], params={"check_index": "true"}).json()
    assert {g["name"] for g in info["galleries"]["galleries"]} == {A, B}
    # every refusal is on record: key, route, gallery, code and a reason
    records = refusals(client, made, start)
    got = [(r["key_id"], r["route"], r["gallery"], r["result"]) for r in records]
    assert sorted(got, key=str) == sorted(expected, key=str)
    assert all(r["reason"] and r["client"] == "127.0.0.1" for r in records)


def test_info_shows_only_the_keys_galleries_and_check_index_is_admin(env):
    _, client, made, _ = env
    for key_id in ("site-a", "enrol-a", "admin-a"):
        info = client.get("/v1/info", headers=made[key_id]).json()
        stats = info["galleries"]
        assert [g["name"] for g in stats["galleries"]] == [A], key_id
        assert (stats["subjects"], stats["faces"]) == (1, 1)
    r = client.get("/v1/info", headers=made["site-a"], params={"check_index": "true"})
    assert r.status_code == 403 and "'admin'" in r.json()["error"]["message"]
    r = client.get("/v1/info", headers=made["admin-a"], params={"check_index": "true"})
    check = r.json()["index_check"]
    assert check["consistent"] and [g["name"] for g in check["galleries"]] == [A]
    full = client.get("/v1/info", headers={"X-API-Key": FLAT_KEY}).json()["galleries"]
    assert {g["name"] for g in full["galleries"]} == {A, B} and full["faces"] == 3


def test_audit_is_scoped_to_the_keys_galleries(env):
    _, client, made, _ = env
    records = client.get("/v1/audit", headers=made["admin-a"], params={"limit": 1000}).json()
    assert records["records"] and {r["gallery"] for r in records["records"]} == {A}
    r = client.get("/v1/audit", headers=made["admin-a"], params={"gallery": B})
    assert r.status_code == 403 and B not in r.text
    everything = client.get("/v1/audit", headers=made["root"], params={"limit": 1000}).json()
    assert B in {r["gallery"] for r in everything["records"]}


def test_refusals_without_a_valid_key_are_recorded(env):
    _, client, made, _ = env
    start = last_id(client, made)
    assert client.delete(f"/v1/galleries/{B}").status_code == 401
    bad = {"X-API-Key": "not-a-key"}
    assert client.get(f"/v1/galleries/{B}/export", headers=bad).status_code == 403
    assert client.post("/v1/identify", headers=bad, json={"gallery": B}).status_code == 403
    records = refusals(client, made, start)
    got = [(r["key_id"], r["route"], r["gallery"], r["result"]) for r in records]
    assert got == [
        ("anonymous", "DELETE /v1/galleries/{gallery}", B, "unauthorized"),
        ("invalid_key", "GET /v1/galleries/{gallery}/export", B, "forbidden"),
        ("invalid_key", "POST /v1/identify", None, "forbidden"),  # the body is never read
    ]


def test_a_scope_refusal_names_the_gallery_of_a_form_body(env):
    _, client, made, _ = env
    start = last_id(client, made)
    for data in ({"gallery": B}, {"gallery": B, "image": b64(photo("Angela_Merkel", 3))}):
        r = client.post(  # enrol-only: no identify scope, refused before the body is parsed
            "/v1/identify",
            headers=made["enrol-a"],
            data=data,
            files={"image2": ("p.jpg", photo("Angela_Merkel", 3))},
        )
        assert r.status_code == 403 and "'identify'" in r.json()["error"]["message"]
    got = [(r["key_id"], r["route"], r["gallery"]) for r in refusals(client, made, start)]
    assert got == [("enrol-a", "POST /v1/identify", B)] * 2


def test_a_flood_of_bad_keys_is_aggregated(env, monkeypatch):
    _, client, made, _ = env
    monkeypatch.setattr(gallery_audit, "THROTTLE_WINDOW_S", 1.0)
    time.sleep(1.1)  # earlier refusals' windows have ended
    start = last_id(client, made)
    for i in range(40):
        r = client.get(f"/v1/galleries/{A}", headers={"X-API-Key": f"guess-{i}"})
        assert r.status_code == 403
    time.sleep(1.1)  # the window ends; its summary is written at the next flush
    records = [r for r in refusals(client, made, start) if r["key_id"] == "invalid_key"]
    burst = gallery_audit.THROTTLE_BURST
    assert len(records) == burst + 1
    assert f"{40 - burst} refusals from this client" in records[-1]["reason"]


def test_cursor_out_of_range_is_invalid_cursor(env):
    _, client, made, _ = env
    for cursor in ("9223372036854775808", "99999999999999999999", "²", "-1", "1e3"):
        r = client.get("/v1/audit", headers=made["root"], params={"cursor": cursor})
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_cursor", cursor
    r = client.get("/v1/audit", headers=made["root"], params={"cursor": str(2**63 - 1)})
    assert r.status_code == 200 and r.json()["records"] == []


def test_bulk_items_use_the_name_rule_and_never_move_a_photo(env):
    _, client, made, _ = env
    key = made["site-a"]
    owned = b64(photo("Angela_Merkel", 4))
    r = client.post(
        f"/v1/galleries/{A}/faces",
        headers=key,
        json={"items": [{"subject_id": "dup", "image": owned}]},
    )
    assert r.status_code == 200 and r.json()["enrolled"] == 1
    dup_face = r.json()["items"][0]["face_id"]
    r = client.post(
        f"/v1/galleries/{A}/faces",
        headers=key,
        json={
            "items": [
                {"subject_id": "..", "image": b64(photo("Abdoulaye_Wade", 2))},
                {"subject_id": ".", "image": b64(photo("Abdoulaye_Wade", 2))},
                {"subject_id": "other", "image": owned},
                {"subject_id": "dup", "image": owned},
                {"subject_id": "wade", "image": b64(photo("Abdoulaye_Wade", 3))},
            ]
        },
    )
    assert r.status_code == 200, r.text
    items = r.json()["items"]
    assert [i["index"] for i in items] == [0, 1, 2, 3, 4]
    assert [i.get("error", {}).get("code") for i in items] == [
        "invalid_input",
        "invalid_input",
        "photo_enrolled_elsewhere",
        None,
        None,
    ]
    elsewhere = items[2]
    assert "dup" not in str(elsewhere) and "face_id" not in elsewhere
    assert (items[3]["face_id"], items[3]["created"]) == (dup_face, False)
    assert items[4]["created"] is True
    assert (r.json()["enrolled"], r.json()["already_enrolled"], r.json()["refused"]) == (1, 1, 3)
    r = client.get(f"/v1/galleries/{A}/subjects/other", headers=key)
    assert r.status_code == 404  # no empty subject was created
