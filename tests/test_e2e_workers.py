"""``facegate serve --workers 2``: two processes share one store; a write acknowledged by
one worker is found by the other once it has followed the change log."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.conftest import LFW
from tests.service_helpers import ServeProcess


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServeProcess(tmp_path_factory.mktemp("workers"), workers=2,
                       env={"FACEGATE_SYNC_INTERVAL_S": "0.1"}).start(timeout=120)
    yield srv
    srv.stop()


@pytest.mark.timeout(240)
def test_two_workers_serve_one_gallery(server):
    photo = (LFW / "images/Abel_Pacheco/Abel_Pacheco_0001.jpg").read_bytes()
    probe = (LFW / "images/Abel_Pacheco/Abel_Pacheco_0004.jpg").read_bytes()
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        assert client.post("/v1/galleries/w/subjects", json={"subject_id": "abel"}).status_code == 201
        r = client.post("/v1/galleries/w/subjects/abel/faces", files={"image": ("a.jpg", photo)})
        assert r.status_code == 201, r.text
    # fresh connections land on either worker; each must find the face once it has synced
    seen: dict[int, list] = {}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with httpx.Client(base_url=server.base_url, timeout=60) as client:
            r = client.post("/v1/identify", data={"gallery": "w"}, files={"image": ("p.jpg", probe)})
            assert r.status_code == 200, r.text
            pid = client.get("/v1/info").json()["worker_pid"]  # same connection, same worker
            seen.setdefault(pid, []).append(r.json()["faces"][0]["match"])
        if len(seen) == 2 and all(answers[-1] == "abel" for answers in seen.values()):
            break
        time.sleep(0.05)
    print(f"\nanswers per worker: {seen}")
    assert len(seen) == 2, "all requests went to one worker"
    assert all(answers[-1] == "abel" for answers in seen.values()), seen
