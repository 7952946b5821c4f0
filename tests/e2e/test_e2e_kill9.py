"""``kill -9`` of a real ``facegate serve`` on the default SQLite store during an enrolment burst.

One server process (the real entry point, 127.0.0.1, ``FACEGATE_STORE_URL`` unset: the
SQLite file in its data directory), enrolments over HTTP from a few client threads,
SIGKILL mid-burst, a restart on the same data directory.  Every acknowledged (201)
enrolment must be there exactly once and be found by ``/v1/identify``; an enrolment in
flight at the kill may or may not be there, but never twice.  The server had been
stopped cleanly once before the burst, so the restart loads a stale index snapshot
and catches it up from the store's change log.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import httpx
import pytest

from tests.support.replicas import (
    Replica,
    celeba_photos,
    enrol,
    gallery_sizes,
    identify,
    is_unsuitable,
    list_subjects,
    photo,
)

GALLERY = "burst"
N_CLIENTS = 3
ACKED_BEFORE_KILL = 8
SAME_PHOTO = 0.99  # similarity of a photo to its own enrolled embedding (1.0 up to rounding)


@pytest.mark.timeout(120)
def test_kill9_mid_burst_keeps_every_acknowledged_enrolment_once(tmp_path, record_property):
    started = time.monotonic()
    pool = iter([p for paths in celeba_photos().values() for p in paths[:1]])
    server = Replica(tmp_path / "server", name="server")
    server.start()
    try:
        # A clean stop first: the restart after the kill then starts from this snapshot.
        with server.client() as client:
            for n in range(2):
                assert enrol(client, GALLERY, f"warm{n}", photo(next(pool))).status_code == 201
        server.stop()
        server.start()

        lock = threading.Lock()
        stop = threading.Event()
        counter = iter(range(10**6))
        acked: dict[str, tuple[int, str]] = {}  # subject -> (face_id, photo)
        attempted: set[str] = set()
        cut_off: Counter = Counter()  # requests the kill cut off, by exception type
        unexpected: list[str] = []

        def burst() -> None:
            with server.client(timeout=30) as client:
                while not stop.is_set():
                    with lock:
                        subject, path = f"b{next(counter):04d}", next(pool)
                        attempted.add(subject)
                    try:
                        r = enrol(client, GALLERY, subject, photo(path))
                    except httpx.TransportError as exc:
                        with lock:
                            cut_off[type(exc).__name__] += 1
                        return  # the server is gone
                    if r.status_code == 201:
                        with lock:
                            acked[subject] = (r.json()["face_id"], path)
                    elif not is_unsuitable(r):
                        unexpected.append(f"{r.status_code} {r.text[:200]}")

        threads = [threading.Thread(target=burst) for _ in range(N_CLIENTS)]
        for thread in threads:
            thread.start()
        try:
            deadline = time.monotonic() + 30
            while len(acked) < ACKED_BEFORE_KILL and time.monotonic() < deadline:
                time.sleep(0.02)
            server.kill()  # SIGKILL while the clients are mid-request
        finally:
            stop.set()
            for thread in threads:
                thread.join(30)
        assert not unexpected, unexpected
        assert len(acked) >= ACKED_BEFORE_KILL, f"only {len(acked)} enrolments acknowledged"
        assert sum(cut_off.values()) > 0, "the kill cut off no request"

        server.start()
        with server.client() as client:
            subjects = {
                s["subject_id"]: [f["face_id"] for f in s["faces"]]
                for s in list_subjects(client, GALLERY)
            }
            face_ids = [f for faces in subjects.values() for f in faces]
            # every acknowledged enrolment exactly once, nothing twice, nothing invented
            for subject, (face_id, _) in acked.items():
                assert subjects.get(subject) == [face_id], (subject, subjects.get(subject))
            assert len(face_ids) == len(set(face_ids))
            assert all(len(faces) <= 1 for faces in subjects.values())
            assert set(subjects) - {"warm0", "warm1"} <= attempted
            in_flight = len(face_ids) - 2 - len(acked)
            assert 0 <= in_flight <= N_CLIENTS
            info = server.info(client)
            assert gallery_sizes(info)[GALLERY] == (len(face_ids), len(face_ids))
            assert info["galleries"]["source"] == "snapshot"
            # the restarted index finds them: each enrolled photo comes back at rank 1
            for subject in sorted(acked)[:5] + sorted(acked)[-3:]:
                face_id, path = acked[subject]
                candidates = identify(client, GALLERY, photo(path), top_k=3)
                assert candidates and candidates[0]["subject_id"] == subject, subject
                assert candidates[0]["face_id"] == face_id
                assert candidates[0]["similarity"] >= SAME_PHOTO
        record_property(
            "kill -9 mid-burst",
            f"{len(attempted)} enrolments attempted, {len(acked)} acknowledged, "
            f"{in_flight} committed unacknowledged, cut off {dict(cut_off)}; "
            f"{time.monotonic() - started:.1f}s in all",
        )
    finally:
        server.stop()
    assert time.monotonic() - started < 60
