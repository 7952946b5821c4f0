"""Scoped API keys against a real server on 127.0.0.1.

Keys are made with ``facegate keys add`` (the file holds only their hashes) next to a flat
``FACEGATE_API_KEYS`` key.  A table of the scope every ``/v1`` route needs, written here
independently of the code, must cover exactly the routes of the OpenAPI description (a new
route fails this test until it is classified), and every route is driven with: no key
(401), a wrong key (403), a key without the scope (403 naming it), a key with the scope
but not the gallery (403 saying so, without echoing the gallery's name), and a key with
both (neither 401 nor 403).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json

import httpx
import pytest

from service.api.keys import hash_key, read_keys_file
from service.cli import main as cli_main
from service.config import Settings
from tests.conftest import SHARED_MODELS, photo
from tests.support.service import InProcessServer

FLAT_KEY = "flat-key-for-tests-0123456789"
SCOPES = ("verify", "identify", "enrol", "delete", "admin")

#: (method, path) -> (scope needed or None for any valid key, where its gallery is named)
ROUTES = {
    ("POST", "/v1/verify"): ("verify", "body"),
    ("POST", "/v1/identify"): ("identify", "body"),
    ("POST", "/v1/detect"): ("verify", None),
    ("POST", "/v1/embed"): ("verify", None),
    ("GET", "/v1/info"): (None, None),
    ("GET", "/v1/audit"): ("admin", None),
    ("GET", "/v1/galleries"): ("identify", None),
    ("PUT", "/v1/galleries/{gallery}"): ("enrol", "path"),
    ("GET", "/v1/galleries/{gallery}"): ("identify", "path"),
    ("DELETE", "/v1/galleries/{gallery}"): ("delete", "path"),
    ("POST", "/v1/galleries/{gallery}/subjects"): ("enrol", "path"),
    ("GET", "/v1/galleries/{gallery}/subjects"): ("identify", "path"),
    ("GET", "/v1/galleries/{gallery}/subjects/{subject_id}"): ("identify", "path"),
    ("PATCH", "/v1/galleries/{gallery}/subjects/{subject_id}"): ("enrol", "path"),
    ("DELETE", "/v1/galleries/{gallery}/subjects/{subject_id}"): ("delete", "path"),
    ("POST", "/v1/galleries/{gallery}/subjects/{subject_id}/faces"): ("enrol", "path"),
    ("POST", "/v1/galleries/{gallery}/faces"): ("enrol", "path"),
    ("DELETE", "/v1/galleries/{gallery}/faces/{face_id}"): ("delete", "path"),
    ("POST", "/v1/galleries/{gallery}/reenrol"): ("enrol", "path"),
    ("GET", "/v1/galleries/{gallery}/export"): ("admin", "path"),
    ("POST", "/v1/galleries/{gallery}/photos"): ("enrol", "path"),
    ("POST", "/v1/galleries/{gallery}/clusters/run"): ("enrol", "path"),
    ("GET", "/v1/galleries/{gallery}/clusters"): ("identify", "path"),
    ("GET", "/v1/galleries/{gallery}/clusters/{cluster_id}"): ("identify", "path"),
    ("POST", "/v1/galleries/{gallery}/clusters/{cluster_id}/name"): ("enrol", "path"),
    ("POST", "/v1/galleries/{gallery}/clusters/{cluster_id}/merge"): ("enrol", "path"),
    ("POST", "/v1/galleries/{gallery}/clusters/{cluster_id}/split"): ("enrol", "path"),
    ("GET", "/v1/galleries/{gallery}/photo-faces/{face_id}"): ("identify", "path"),
    ("GET", "/v1/galleries/{gallery}/photo-faces/{face_id}/thumbnail"): ("identify", "path"),
    ("POST", "/v1/galleries/{gallery}/photo-faces/{face_id}/move"): ("enrol", "path"),
    ("POST", "/v1/galleries/{gallery}/photo-faces/{face_id}/remove"): ("enrol", "path"),
}


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "keys.json"
    made = {}

    def add(key_id: str, scopes: str, galleries: str) -> None:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert (
                cli_main(
                    [
                        "keys",
                        "add",
                        "--id",
                        key_id,
                        "--scopes",
                        scopes,
                        "--galleries",
                        galleries,
                        "--file",
                        str(path),
                    ]
                )
                == 0
            )
        made[key_id] = out.getvalue().strip()

    for scope in SCOPES:
        add(f"{scope}-a", scope, "a")
        add(f"{scope}-all", scope, "*")
    add("app-a", "verify,identify,enrol", "a")
    add("reader", "identify", "*")
    return path, made


@pytest.fixture
def server(tmp_path_factory, keys):
    path, _ = keys
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
    running = InProcessServer(settings).start()
    yield running
    running.stop()


def test_keys_file_holds_hashes_only(keys):
    path, made = keys
    text = path.read_text()
    records = {k.id: k for k in read_keys_file(path)}
    assert set(records) == set(made)
    for key_id, key in made.items():
        assert key not in text
        assert records[key_id].hash == hash_key(key)
    assert records["app-a"].scopes == {"verify", "identify", "enrol"}
    assert records["app-a"].galleries == {"a"}
    assert (
        cli_main(["keys", "add", "--id", "reader", "--scopes", "identify", "--file", str(path)])
        == 2
    )  # ids are unique
    assert cli_main(["keys", "add", "--id", "x", "--scopes", "fly", "--file", str(path)]) == 2


def request(client: httpx.Client, method: str, path: str, gallery: str, key: str | None):
    url = path.format(gallery=gallery, subject_id="s1", face_id=1, cluster_id="c1")
    headers = {} if key is None else {"X-API-Key": key}
    image = base64.b64encode(photo("Angela_Merkel", 1)).decode()
    body = None
    if path == "/v1/verify":
        body = {"image1": image, "gallery": gallery, "subject_id": "s1"}
    elif path in ("/v1/identify", "/v1/detect", "/v1/embed"):
        body = {"image": image, "gallery": gallery} if path == "/v1/identify" else {"image": image}
    elif path.endswith("/subjects") and method == "POST":
        body = {"subject_id": "s1"}
    elif method == "PATCH":
        body = {"metadata": {"k": 1}}
    elif path.endswith("/reenrol"):
        body = {"source": gallery + "-old"}
    elif path.endswith(("/{subject_id}/faces", "/photos")):
        body = {"image": image}
    elif path.endswith("/{gallery}/faces"):
        body = {"items": [{"subject_id": "s1", "image": image}]}
    if body is None:
        return client.request(method, url, headers=headers)
    return client.request(method, url, json=body, headers=headers)


def test_every_v1_route_is_guarded(server, keys):
    _, made = keys
    spec = httpx.get(f"{server.base_url}/openapi.json").json()
    served = {
        (method.upper(), path)
        for path, ops in spec["paths"].items()
        if path.startswith("/v1")
        for method in ops
    }
    assert served == set(ROUTES), f"classify these routes: {served ^ set(ROUTES)}"
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        for (method, path), (scope, where) in sorted(ROUTES.items()):
            route = f"{method} {path}"
            r = request(client, method, path, "b", None)
            assert r.status_code == 401, (route, r.text)
            assert r.json()["error"]["code"] == "unauthorized"
            r = request(client, method, path, "b", "not-a-key")
            assert r.status_code == 403, (route, r.text)
            if scope is not None:
                other = next(s for s in SCOPES if s not in (scope, "admin"))
                r = request(client, method, path, "b", made[f"{other}-all"])
                assert r.status_code == 403, (route, r.text)
                assert repr(scope) in r.json()["error"]["message"], route
            if where is not None:
                r = request(client, method, path, "b", made[f"{scope}-a"])
                assert r.status_code == 403, (route, r.text)
                message = r.json()["error"]["message"]
                assert "may not touch the gallery" in message and "'b'" not in message, route
            allowed = made[f"{scope}-all"] if scope is not None else made["verify-a"]
            for key in (allowed, FLAT_KEY):
                r = request(client, method, path, "b", key)
                assert r.status_code not in (401, 403), (route, r.text)


def test_key_scoped_to_one_gallery(server, keys):
    _, made = keys
    app, reader = made["app-a"], made["reader"]
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        for gallery in ("a", "b"):
            r = client.post(
                f"/v1/galleries/{gallery}/faces",
                headers={"X-API-Key": FLAT_KEY},
                json={
                    "items": [
                        {
                            "subject_id": "Angela_Merkel",
                            "image": base64.b64encode(photo("Angela_Merkel", 1)).decode(),
                        }
                    ]
                },
            )
            assert r.status_code == 200 and r.json()["enrolled"] == 1, r.text
        probe = {"image": ("p.jpg", photo("Angela_Merkel", 2))}

        def call(method, url, key, **kwargs):
            return client.request(method, url, headers={"X-API-Key": key}, **kwargs)

        r = call("POST", "/v1/identify", app, data={"gallery": "a"}, files=probe)
        assert r.status_code == 200 and r.json()["faces"][0]["match"] == "Angela_Merkel"
        r = call("POST", "/v1/identify", app, data={"gallery": "b"}, files=probe)
        assert r.status_code == 403 and "may not touch the gallery" in r.json()["error"]["message"]
        r = call("POST", "/v1/galleries/b/subjects", app, json={"subject_id": "x"})
        assert r.status_code == 403
        assert call("GET", "/v1/galleries/b/subjects", app).status_code == 403
        assert call("GET", "/v1/galleries/b/export", app).status_code == 403
        assert call("GET", "/v1/galleries/a/export", app).status_code == 403  # not admin
        assert call("GET", "/v1/galleries/a/export", made["admin-a"]).status_code == 200
        listed = call("GET", "/v1/galleries", app).json()["galleries"]
        assert [g["name"] for g in listed] == ["a"]
        r = call("POST", "/v1/galleries/a/subjects", app, json={"subject_id": "x"})
        assert r.status_code == 201
        assert call("DELETE", "/v1/galleries/a/subjects/x", app).status_code == 403

        # a read-only key reads every gallery and changes none
        assert call("GET", "/v1/galleries/b/subjects", reader).status_code == 200
        r = call("POST", "/v1/galleries/b/subjects", reader, json={"subject_id": "y"})
        assert r.status_code == 403 and "'enrol'" in r.json()["error"]["message"]
        assert call("DELETE", "/v1/galleries/a/subjects/x", reader).status_code == 403
        assert call("DELETE", "/v1/galleries/b", reader).status_code == 403
        assert call("GET", "/v1/galleries/a/subjects/x", reader).status_code == 200
        # open routes stay open
        assert client.get("/healthz").status_code == 200


def test_yaml_keys_file(tmp_path):
    path = tmp_path / "keys.yaml"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert (
            cli_main(
                [
                    "keys",
                    "add",
                    "--id",
                    "kiosk",
                    "--scopes",
                    "verify,identify",
                    "--galleries",
                    "a,b",
                    "--file",
                    str(path),
                ]
            )
            == 0
        )
    key = out.getvalue().strip()
    assert "hash: sha256:" in path.read_text() and key not in path.read_text()
    (record,) = read_keys_file(path)
    assert (record.id, record.hash) == ("kiosk", hash_key(key))
    assert record.scopes == {"verify", "identify"} and record.galleries == {"a", "b"}
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps(
            {"keys": [{"id": "k", "hash": "plain-key", "scopes": ["verify"], "galleries": ["*"]}]}
        )
    )
    with pytest.raises(ValueError, match="never the key"):
        read_keys_file(bad)


def test_reserved_key_ids_and_bad_gallery_names_are_refused(tmp_path, capsys):
    path = tmp_path / "keys.json"
    base = ["keys", "add", "--scopes", "verify", "--file", str(path)]
    # the audit log's own ids: FACEGATE_API_KEYS' keys, the CLI, no key, an unknown key
    for key_id in ("key-1", "key-12", "cli", "anonymous", "invalid_key"):
        assert cli_main([*base, "--id", key_id]) == 2, key_id
        assert "reserved" in capsys.readouterr().err
    for gallery in ("..", ".", "a/b", "x" * 65, "a b"):
        assert cli_main([*base, "--id", "k", "--galleries", gallery]) == 2, gallery
    assert not path.exists()
    assert cli_main([*base, "--id", "key-a", "--galleries", "a,b.c"]) == 0  # not key-N
    # a keys file written by hand is held to the same rules when the server reads it
    for entry in (
        {"id": "anonymous", "galleries": ["a"]},
        {"id": "k2", "galleries": [".."]},
    ):
        path.write_text(
            json.dumps({"keys": [{**entry, "hash": "sha256:" + "0" * 64, "scopes": ["verify"]}]})
        )
        with pytest.raises(ValueError):
            read_keys_file(path)
