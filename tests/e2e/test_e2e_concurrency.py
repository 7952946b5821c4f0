"""32 concurrent clients mixing enrolment, identification, verification and deletes
against a real ``facegate serve`` process; afterwards the gallery holds exactly the
acknowledged writes and the index agrees with the store."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter

import httpx
import pytest

from tests.conftest import LFW
from tests.support.service import ServeProcess

CLIENTS = 32
DURATION_S = 20.0
GALLERY = "crowd"
QUALITY_CODES = {"multiple_faces", "face_too_small", "low_quality_face", "no_face"}


def _photos(n: int) -> list[bytes]:
    people = sorted(p for p in (LFW / "images").iterdir() if p.is_dir())
    return [min(p.glob("*.jpg")).read_bytes() for p in people[:n]]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # Unbounded admission, as before it existed: this test checks the gallery's consistency
    # under concurrency; refusals under overload are tested in test_e2e_admission.py.
    srv = ServeProcess(
        tmp_path_factory.mktemp("crowd"), env={"FACEGATE_ADMISSION": "false"}
    ).start()
    yield srv
    srv.stop()


async def _client(n: int, base_url: str, photos: list[bytes], deadline: float, ledger: dict):
    rng = random.Random(n)
    async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:
        mine: list[tuple[str, int]] = []  # (subject, face id) acknowledged for this client
        i = 0
        while time.monotonic() < deadline:
            op = rng.choices(["enrol", "identify", "verify", "delete"], [4, 3, 2, 1])[0]
            start = time.perf_counter()
            if op == "enrol":
                subject = f"c{n:02d}-{i:03d}"
                r = await client.post(
                    f"/v1/galleries/{GALLERY}/subjects", json={"subject_id": subject}
                )
                ledger["status"][("subject", r.status_code)] += 1
                if r.status_code != 201:
                    ledger["errors"].append((op, r.status_code, r.text))
                    continue
                ledger["subjects"].add(subject)
                r = await client.post(
                    f"/v1/galleries/{GALLERY}/subjects/{subject}/faces",
                    files={"image": ("f.jpg", rng.choice(photos))},
                )
                if r.status_code == 201:
                    face_id = r.json()["face_id"]
                    ledger["faces"][face_id] = subject
                    mine.append((subject, face_id))
                i += 1
            elif op == "identify":
                r = await client.post(
                    "/v1/identify",
                    data={"gallery": GALLERY, "top_k": "3"},
                    files={"image": ("p.jpg", rng.choice(photos))},
                )
            elif op == "verify":
                r = await client.post(
                    "/v1/verify",
                    files={
                        "image1": ("a.jpg", rng.choice(photos)),
                        "image2": ("b.jpg", rng.choice(photos)),
                    },
                )
            else:
                if not mine:
                    continue
                subject, face_id = mine.pop(rng.randrange(len(mine)))
                r = await client.delete(f"/v1/galleries/{GALLERY}/faces/{face_id}")
                if r.status_code == 200:
                    del ledger["faces"][face_id]
            ledger["latency"].append(time.perf_counter() - start)
            ledger["status"][(op, r.status_code)] += 1
            ok = r.status_code in (200, 201)
            quality = r.status_code == 422 and r.json()["error"]["code"] in QUALITY_CODES
            not_yet = op == "identify" and r.status_code == 404  # before the first enrolment
            if not (ok or quality or not_yet):
                ledger["errors"].append((op, r.status_code, r.text[:300]))


@pytest.mark.timeout(300)
def test_concurrent_clients_leave_a_consistent_gallery(server):
    photos = _photos(24)
    ledger = {"status": Counter(), "errors": [], "subjects": set(), "faces": {}, "latency": []}

    async def main():
        deadline = time.monotonic() + DURATION_S
        await asyncio.gather(
            *(_client(n, server.base_url, photos, deadline, ledger) for n in range(CLIENTS))
        )

    started = time.monotonic()
    asyncio.run(main())
    elapsed = time.monotonic() - started
    latencies = sorted(ledger["latency"])
    p50 = latencies[len(latencies) // 2]
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    print(
        f"\n{len(latencies)} requests from {CLIENTS} clients in {elapsed:.1f} s "
        f"({len(latencies) / elapsed:.1f}/s), p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms;"
        f" {dict(ledger['status'])}"
    )
    assert not ledger["errors"], ledger["errors"][:5]
    assert ledger["faces"], "no enrolment was acknowledged"

    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        # the store holds exactly the acknowledged subjects and faces
        listed, cursor = {}, None
        while True:
            params = {"limit": 200} | ({"cursor": cursor} if cursor else {})
            page = client.get(f"/v1/galleries/{GALLERY}/subjects", params=params).json()
            for subject in page["subjects"]:
                listed[subject["subject_id"]] = {f["face_id"] for f in subject["faces"]}
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert set(listed) == ledger["subjects"]
        faces = {face_id for ids in listed.values() for face_id in ids}
        assert faces == set(ledger["faces"])
        for face_id, subject in ledger["faces"].items():
            assert face_id in listed[subject]
        info = client.get(f"/v1/galleries/{GALLERY}").json()
        assert info["faces"] == len(ledger["faces"])
        # the search index agrees with the store and nothing is left to replicate
        ready = client.get("/readyz").json()
        assert ready["sync"]["lag"] == 0
        stats = client.get("/v1/info").json()["galleries"]
        crowd = next(g for g in stats["galleries"] if g["name"] == GALLERY)
        assert crowd["indexed"] == crowd["faces"] == len(ledger["faces"])
        metrics = client.get("/metrics").text
        assert 'status="500"' not in metrics
        assert "facegate_embed_batch_size_count" in metrics
