"""The audit log on both store backends: the store's in-transaction rows, the REST service's
records of enrolments, searches, exports and deletions, ``GET /v1/audit`` and ``facegate
audit``, and the retention.  Real server on 127.0.0.1, real LFW photos, reference models.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import time
from datetime import UTC, datetime

import httpx
import numpy as np
import pytest

from service.cli import main as cli_main
from service.config import Settings
from service.gallery import GalleryModelMismatch, open_gallery
from service.gallery.audit import AuditEntry, recording
from service.gallery.backends import open_store
from tests.conftest import SHARED_MODELS, photo
from tests.support.service import InProcessServer

PEOPLE = ["Abdoulaye_Wade", "Angela_Merkel", "Arianna_Huffington"]


def test_writes_record_their_audit_row_in_their_transaction(tmp_path, store_url):
    gallery = open_gallery(Settings(data_dir=tmp_path / "g", store_url=store_url, faiss_gpu=False))
    gallery.start()
    try:
        rng = np.random.default_rng(0)
        vector = rng.standard_normal(16).astype(np.float32)
        vector /= np.linalg.norm(vector)
        gallery.upsert_subject("g", "s1", None, "model-a")
        entry = AuditEntry("enrol", key_id="k1", client="10.0.0.1", gallery="g")
        with recording(entry):
            face = gallery.add_face("g", "s1", vector, "model-a", {})
            with pytest.raises(GalleryModelMismatch):  # rolled back: no row
                gallery.add_face("g", "s1", vector, "model-b", {})
        assert entry.written
        rows, more = gallery.store.audit_records()
        assert not more
        assert [
            (
                r["action"],
                r["key_id"],
                r["client"],
                r["gallery"],
                r["subject_ids"],
                r["face_ids"],
                r["result"],
            )
            for r in rows
        ] == [("enrol", "k1", "10.0.0.1", "g", ["s1"], [face["face_id"]], "ok")]
        gallery.add_face("g", "s1", vector, "model-a", {})  # no current entry: no row
        assert len(gallery.store.audit_records()[0]) == 1
    finally:
        gallery.stop()


def test_rest_audit_log(tmp_path, store_url):
    keys = tmp_path / "keys.json"
    made = {}
    for key_id, scopes, galleries in (
        ("app", "verify,identify,enrol,delete", "a"),
        ("auditor", "admin", "*"),
    ):
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
                        str(keys),
                    ]
                )
                == 0
            )
        made[key_id] = out.getvalue().strip()
    old = open_store(store_url)
    old.migrate()
    long_ago = time.time() - 40 * 86400
    old.append_audit([AuditEntry("identify", key_id="x", gallery="a", at=long_ago)])
    old.close()
    settings = Settings(
        models_dir=SHARED_MODELS,
        detector="yunet_2023mar",
        recognizer="mobilefacenet_peer_128d",
        providers=["CPUExecutionProvider"],
        faiss_gpu=False,
        data_dir=tmp_path / "data",
        store_url=store_url,
        api_keys_file=keys,
        audit_retention_days=30,
    )
    server = InProcessServer(settings).start()
    started = datetime.now(UTC)
    try:
        app = {"X-API-Key": made["app"]}
        admin = {"X-API-Key": made["auditor"]}
        with httpx.Client(base_url=server.base_url, timeout=60) as client:
            for name in PEOPLE[:2]:
                client.post("/v1/galleries/a/subjects", headers=app, json={"subject_id": name})
                r = client.post(
                    f"/v1/galleries/a/subjects/{name}/faces",
                    headers=app,
                    files={"image": ("p.jpg", photo(name, 1))},
                )
                assert r.status_code == 201
            bulk = client.post(
                "/v1/galleries/a/faces",
                headers=app,
                json={
                    "items": [
                        {
                            "subject_id": PEOPLE[2],
                            "image": base64.b64encode(photo(PEOPLE[2], 1)).decode(),
                        }
                    ]
                },
            ).json()
            bulk_face = bulk["items"][0]["face_id"]
            r = client.post(
                "/v1/identify",
                headers=app,
                data={"gallery": "a", "top_k": "2"},
                files={"image": ("p.jpg", photo(PEOPLE[1], 2))},
            )
            found = r.json()["faces"][0]["candidates"]
            blank = np.full((120, 120, 3), 128, np.uint8)
            import cv2

            r = client.post(
                "/v1/identify",
                headers=app,
                data={"gallery": "a"},
                files={"image": ("b.png", cv2.imencode(".png", blank)[1].tobytes())},
            )
            assert r.status_code == 422 and r.json()["error"]["code"] == "no_face"
            r = client.post(
                "/v1/verify",
                headers=app,
                data={"gallery": "a", "subject_id": PEOPLE[0]},
                files={"image1": ("p.jpg", photo(PEOPLE[0], 2))},
            )
            assert r.status_code == 200
            client.post(
                "/v1/verify",
                headers=app,  # two photos: no gallery, no record
                files={
                    "image1": ("p.jpg", photo(PEOPLE[0], 2)),
                    "image2": ("q.jpg", photo(PEOPLE[0], 3)),
                },
            )
            assert client.get("/v1/galleries/a/export", headers=admin).status_code == 200
            r = client.delete(f"/v1/galleries/a/subjects/{PEOPLE[1]}", headers=app)
            assert r.status_code == 200
            assert client.get("/v1/audit", headers=app).status_code == 403

            records = client.get("/v1/audit", headers=admin, params={"limit": 100}).json()
            # in the order written (a cursor never misses a record); searches and exports are
            # written in the background, so order by the time of the request to compare
            records["records"].sort(key=lambda r: r["at"])
            rows = [
                (r["action"], r["key_id"], r["gallery"], r["result"]) for r in records["records"]
            ]
            assert rows == [("enrol", "app", "a", "ok")] * 3 + [
                ("identify", "app", "a", "ok"),
                ("identify", "app", "a", "no_face"),
                ("verify", "app", "a", "ok"),
                ("export", "auditor", "a", "ok"),
                ("delete_subject", "app", "a", "ok"),
                ("refused", "app", None, "forbidden"),  # GET /v1/audit without admin
            ]  # the 40-day-old record was pruned
            assert records["next_cursor"] is None
            first = records["records"]
            assert all(r["client"] == "127.0.0.1" for r in first)
            assert first[2]["face_ids"] == [bulk_face]
            assert first[3]["subject_ids"] == [c["subject_id"] for c in found]
            assert first[3]["face_ids"] == [c["face_id"] for c in found]
            assert first[5]["subject_ids"] == [PEOPLE[0]] and len(first[5]["face_ids"]) == 1
            assert "embedding" not in json.dumps(records) and "image" not in json.dumps(records)

            # a deleted subject keeps its trail
            trail = client.get("/v1/audit", headers=admin, params={"subject_id": PEOPLE[1]}).json()[
                "records"
            ]
            assert sorted(r["action"] for r in trail) == ["delete_subject", "enrol", "identify"]
            # filters and pages
            page = client.get(
                "/v1/audit", headers=admin, params={"action": "enrol", "limit": 2}
            ).json()
            assert len(page["records"]) == 2 and page["next_cursor"]
            rest = client.get(
                "/v1/audit",
                headers=admin,
                params={"action": "enrol", "limit": 2, "cursor": page["next_cursor"]},
            ).json()
            assert len(rest["records"]) == 1 and rest["next_cursor"] is None
            params = {"since": started.isoformat(), "until": datetime.now(UTC).isoformat()}
            windowed = client.get("/v1/audit", headers=admin, params=params).json()["records"]
            assert len(windowed) == len(first)
            future = {"since": datetime.now(UTC).replace(year=2100).isoformat()}
            assert client.get("/v1/audit", headers=admin, params=future).json()["records"] == []
            bad = client.get("/v1/audit", headers=admin, params={"action": "fly"})
            assert bad.status_code == 422

            # deleting a face and the gallery leave their records too
            r = client.delete(f"/v1/galleries/a/faces/{bulk_face}", headers=app)
            assert r.status_code == 200
            assert client.delete("/v1/galleries/a", headers=app).status_code == 200
            r = client.delete("/v1/galleries/a/faces/999", headers=app)  # refused: recorded
            assert r.status_code == 404
            tail = client.get(
                "/v1/audit", headers=admin, params={"cursor": str(first[-1]["id"])}
            ).json()["records"]
            tail = [r for r in tail if r["action"].startswith("delete")]
            assert [(r["action"], r["face_ids"], r["result"]) for r in tail] == [
                ("delete_face", [bulk_face], "ok"),
                ("delete_gallery", [], "ok"),
                ("delete_face", [], "gallery_not_found"),
            ]
    finally:
        server.stop()

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli_main(["audit", "--store-url", store_url, "--subject-id", PEOPLE[1]]) == 0
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert sorted(r["action"] for r in lines) == ["delete_subject", "enrol", "identify"]


def test_refusals_without_a_key_are_throttled_per_client(tmp_path, monkeypatch):
    from service.gallery import audit as gallery_audit
    from service.gallery.audit import THROTTLE_BURST, AuditWriter

    store = open_store(f"sqlite:///{tmp_path / 'audit.sqlite3'}")
    store.migrate()
    monkeypatch.setattr(gallery_audit, "THROTTLE_CLIENTS", 2)
    writer = AuditWriter(store)
    try:

        def refuse(client: str, n: int) -> None:
            for i in range(n):
                entry = AuditEntry(
                    "refused", key_id="invalid_key", client=client, result="forbidden"
                )
                entry.reason = f"try {i}"
                writer.record(entry, throttle=client)

        refuse("10.0.0.1", 25)
        refuse("10.0.0.2", 3)
        refuse("10.0.0.3", THROTTLE_BURST + 2)  # a third client: shares the "*" allowance
        writer.flush()
        rows = store.audit_records(limit=1000)[0]
        by_client = [r["client"] for r in rows]
        assert by_client.count("10.0.0.1") == THROTTLE_BURST
        assert by_client.count("10.0.0.2") == 3
        assert by_client.count("10.0.0.3") == THROTTLE_BURST
        monkeypatch.setattr(gallery_audit, "THROTTLE_WINDOW_S", 0.0)  # the windows end
        writer.flush()
        summaries = store.audit_records(limit=1000, after=rows[-1]["id"])[0]
        assert sorted((r["client"], r["reason"].split(" refusals")[0]) for r in summaries) == [
            ("10.0.0.1", str(25 - THROTTLE_BURST)),
            ("10.0.0.3", "2"),
        ]
        assert all(
            r["reason"].endswith("try 24") or r["reason"].endswith(f"try {THROTTLE_BURST + 1}")
            for r in summaries
        )
    finally:
        writer.close()
        store.close()


def test_audit_records_of_some_galleries(store_url):
    store = open_store(store_url)
    store.migrate()
    try:
        store.append_audit(
            [
                AuditEntry("identify", key_id="k", gallery="a"),
                AuditEntry("identify", key_id="k", gallery="b"),
                AuditEntry("refused", key_id="anonymous", route="GET /v1/info", reason="no key"),
                AuditEntry("enrol", key_id="k", gallery="c"),
            ]
        )
        some = store.audit_records(galleries={"a", "b"})[0]
        assert [r["gallery"] for r in some] == ["a", "b"]
        assert store.audit_records(galleries=set())[0] == []  # none: no record, not every one
        everything = store.audit_records()[0]
        assert [r["gallery"] for r in everything] == ["a", "b", None, "c"]
        assert (everything[2]["route"], everything[2]["reason"]) == ("GET /v1/info", "no key")
    finally:
        store.close()
