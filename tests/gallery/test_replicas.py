"""Scale-out end to end: three ``facegate serve`` replicas on one PostgreSQL gallery.

Every replica is a real subprocess on 127.0.0.1 with its own port, data
directory and FAISS index, and the same ``FACEGATE_STORE_URL``.  The tests talk
to them only through the HTTP API and check that

* enrolments made through one replica are identified through the others, with
  the same answers as the replica that wrote them;
* a deletion through one replica vanishes from ``/v1/identify`` on another
  within the visibility bound (measured);
* a replica killed with SIGKILL during a burst of enrolments comes back and,
  like every other replica, holds each acknowledged enrolment exactly once;
* after 32 concurrent clients mixing enrol / identify / delete over all
  replicas, every replica's index equals the store (face id by face id, with
  its subject: ``/v1/info?check_index=true``);
* ``facegate serve --workers 2`` (SQLite and PostgreSQL): a write through one
  worker reaches every worker's index within the bound.

Uses the reference models in ../shared (YuNet + the 128-d MobileFaceNet peer).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter

import httpx
import pytest

from tests.conftest import REPO
from tests.support.replicas import (
    VISIBILITY_BOUND_S,
    Replica,
    add_face,
    celeba_photos,
    create_subject,
    enrol,
    gallery_sizes,
    identify,
    is_unsuitable,
    list_subjects,
    photo,
    rank1,
    start_all,
    stop_all,
    wait_converged,
)
from tests.support.service import TEST_MODELS

N_REPLICAS = 3
N_ENROLLED = 30
N_CLIENTS = 32
#: Three replicas share two cores here: one ONNX Runtime thread each avoids oversubscription.
# Admission off: these tests check consistency with 32 clients that may pile onto one
# replica; refusals under overload are tested in test_e2e_admission.py.
REPLICA_ENV = {"FACEGATE_INTRA_OP_THREADS": "1", "FACEGATE_ADMISSION": "false"}
MIXED_LOAD_S = 15.0
SAME_PHOTO = 0.99  # similarity of a photo to its own enrolled embedding (1.0 up to rounding)


@pytest.fixture(scope="module")
def photos() -> dict[str, list[str]]:
    return celeba_photos()


@pytest.fixture(scope="module")
def replicas(postgres_cluster, tmp_path_factory):
    """Three replicas on one fresh PostgreSQL database, started together."""
    url = postgres_cluster.create_database()
    root = tmp_path_factory.mktemp("replicas")
    group = [
        Replica(root / f"r{i + 1}", url, env=REPLICA_ENV, name=f"replica {i + 1}")
        for i in range(N_REPLICAS)
    ]
    try:
        start_all(group)
        yield group
    finally:
        stop_all(group)


def _unused_photos(photos: dict[str, list[str]], skip_identities: int, seed: int) -> list[str]:
    """Every photo of the identities after the first ``skip_identities``, shuffled."""
    pool = [p for identity in list(photos)[skip_identities:] for p in photos[identity]]
    random.Random(seed).shuffle(pool)
    return pool


def _assert_every_index_equals_store(replicas: list[Replica], gallery: str) -> int:
    """Converged, and each replica's index holds exactly the store's faces (every face id and
    its subject, by ``/v1/info?check_index=true``), all at one seq; return the face count."""
    states = wait_converged(replicas)
    checks = [r.index_check() for r in replicas]
    for replica, check in zip(replicas, checks, strict=True):
        assert check["consistent"], f"{replica}: index differs from the store: {check} ({states})"
    assert len({c["seq"] for c in checks}) == 1, [c["seq"] for c in checks]
    counts = {
        next(g["store_faces"] for g in c["galleries"] if g["name"] == gallery) for c in checks
    }
    assert len(counts) == 1, counts
    return counts.pop()


@pytest.mark.timeout(300)
def test_enrol_on_one_identify_on_others_and_delete_propagates(replicas, photos, record_property):
    clients = [r.client() for r in replicas]
    gallery = "celeba"

    # --- enrol one photo of each of 30 identities through replica 1 ------------------------
    enrolled: dict[str, str] = {}
    probes: dict[str, str] = {}
    for identity in [i for i in photos if len(photos[i]) >= 3][:N_ENROLLED]:
        assert create_subject(clients[0], gallery, identity).status_code == 201
        for path in photos[identity][:-1]:
            r = add_face(clients[0], gallery, identity, photo(path))
            if r.status_code == 201:
                enrolled[identity], probes[identity] = path, photos[identity][-1]
                break
            assert is_unsuitable(r), r.text
    assert len(enrolled) >= 0.9 * N_ENROLLED
    time.sleep(VISIBILITY_BOUND_S)  # the last enrolment has now reached every replica

    # --- identify other photos through every replica (concurrently, one thread each) -------
    answers: list[dict] = [{} for _ in replicas]

    def probe_all(i: int) -> None:
        for identity, path in probes.items():
            answers[i][identity] = identify(clients[i], gallery, photo(path), top_k=5)

    threads = [threading.Thread(target=probe_all, args=(i,)) for i in range(N_REPLICAS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # Replicas 2 and 3 answer exactly like replica 1, which wrote every face itself.
    for i in (1, 2):
        for identity in probes:
            mine, reference = answers[i][identity], answers[0][identity]
            if reference is None:
                assert mine is None
                continue
            assert [c["subject_id"] for c in mine] == [c["subject_id"] for c in reference]
            assert [c["face_id"] for c in mine] == [c["face_id"] for c in reference]
            assert [c["similarity"] for c in mine] == pytest.approx(
                [c["similarity"] for c in reference], abs=1e-5
            )
    hits = sum(1 for identity, a in answers[0].items() if a and a[0]["subject_id"] == identity)
    print(
        f"\nrank-1 {hits}/{len(probes)} on each of {N_REPLICAS} replicas "
        f"({len(enrolled)} enrolled through replica 1)"
    )
    record_property("rank-1", f"{hits}/{len(probes)} on each of {N_REPLICAS} replicas")
    # accuracy itself is the single-server end-to-end test's subject; this only rules out
    # agreeing on nonsense
    assert hits >= 0.6 * len(probes)

    # --- delete through replica 3; measure when replica 1 (and 2) stop returning it ----------
    victim = next(i for i, a in answers[0].items() if a and a[0]["subject_id"] == i)
    own_photo = photo(enrolled[victim])
    assert rank1(clients[0], gallery, own_photo)[0] == victim
    r = clients[2].delete(f"/v1/galleries/{gallery}/subjects/{victim}")
    acknowledged = time.monotonic()
    assert r.status_code == 200 and r.json()["faces_removed"] == 1
    vanished: dict[str, float] = {}

    def watch(name: str, client: httpx.Client) -> None:
        while time.monotonic() - acknowledged < 10:
            candidates = identify(client, gallery, own_photo, top_k=50) or []
            if victim not in [c["subject_id"] for c in candidates]:
                vanished[name] = time.monotonic() - acknowledged
                return

    watchers = [
        threading.Thread(target=watch, args=(name, client))
        for name, client in (("replica 1", clients[0]), ("replica 2", clients[1]))
    ]
    for thread in watchers:
        thread.start()
    for thread in watchers:
        thread.join()
    print(
        f"delete through replica 3 gone from identify (time to first answer without it, "
        f"request time included): {vanished}"
    )
    assert set(vanished) == {"replica 1", "replica 2"}
    assert max(vanished.values()) <= VISIBILITY_BOUND_S, vanished
    assert _assert_every_index_equals_store(replicas, gallery) == len(enrolled) - 1
    for client in clients:
        client.close()


@pytest.mark.timeout(300)
def test_kill9_during_enrol_burst_loses_and_duplicates_nothing(replicas, photos):
    gallery = "burst"
    pool = iter(_unused_photos(photos, 60, seed=1))
    victim_index = 1  # replica 2 is killed and restarted
    lock = threading.Lock()
    stop = threading.Event()
    acked: dict[str, tuple[int, str, str]] = {}  # subject -> (face_id, photo, replica name)
    attempted: set[str] = set()
    transport_errors: Counter = Counter()
    unexpected: list[str] = []
    counter = iter(range(10**6))

    def burst(k: int) -> None:
        clients = [r.client(timeout=30) for r in replicas]
        turn = k
        while not stop.is_set():
            with lock:
                n, path = next(counter), next(pool)
            subject = f"b{n:04d}"
            target = turn % N_REPLICAS
            turn += 1
            with lock:
                attempted.add(subject)
            try:
                r = enrol(clients[target], gallery, subject, photo(path))
            except httpx.TransportError:
                transport_errors[replicas[target].name] += 1
                clients[target].close()
                clients[target] = replicas[target].client(timeout=30)
                time.sleep(0.2)
                continue
            if r.status_code == 201:
                with lock:
                    acked[subject] = (r.json()["face_id"], path, replicas[target].name)
            elif not is_unsuitable(r):
                unexpected.append(f"{replicas[target].name}: {r.status_code} {r.text[:200]}")
        for client in clients:
            client.close()

    threads = [threading.Thread(target=burst, args=(k,)) for k in range(3)]
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + 60
        while len(acked) < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
        acked_before_kill = len(acked)
        replicas[victim_index].kill()
        time.sleep(0.5)
        restarted = time.monotonic()
        replicas[victim_index].start()  # ready only once caught up with the log
        restart_s = time.monotonic() - restarted
        time.sleep(1.5)  # enrolments keep landing on the restarted replica too
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    print(
        f"\nburst: {len(attempted)} enrolments attempted, {len(acked)} acknowledged "
        f"({acked_before_kill} before the kill), transport errors {dict(transport_errors)}, "
        f"restart to ready {restart_s:.1f}s"
    )
    assert not unexpected, unexpected
    assert transport_errors[replicas[victim_index].name] > 0, "the kill hit no request"
    assert sum(1 for a in acked.values() if a[2] == replicas[victim_index].name) > 0
    assert acked_before_kill > 0 and len(acked) > acked_before_kill

    stored = _assert_every_index_equals_store(replicas, gallery)
    for replica in replicas:
        with replica.client() as client:
            subjects = {
                s["subject_id"]: [f["face_id"] for f in s["faces"]]
                for s in list_subjects(client, gallery)
            }
        # every acknowledged enrolment exactly once; nothing enrolled twice
        for subject, (face_id, _, _) in acked.items():
            assert subjects.get(subject) == [face_id], (replica, subject, subjects.get(subject))
        assert all(len(faces) <= 1 for faces in subjects.values())
        assert set(subjects) <= attempted
        assert sum(len(faces) for faces in subjects.values()) == stored >= len(acked)
    # and each replica's index finds them: the enrolled photo itself comes back at rank 1
    rng = random.Random(2)
    restarted_acks = [s for s, a in acked.items() if a[2] == replicas[victim_index].name]
    for replica in replicas:
        sample = set(rng.sample(sorted(acked), min(8, len(acked))))
        sample |= set(restarted_acks[:2])
        with replica.client() as client:
            for subject in sorted(sample):
                face_id, path, _ = acked[subject]
                candidates = identify(client, gallery, photo(path), top_k=3)
                assert candidates and candidates[0]["subject_id"] == subject, (replica, subject)
                assert candidates[0]["face_id"] == face_id
                assert candidates[0]["similarity"] >= SAME_PHOTO


@pytest.mark.timeout(300)
def test_32_clients_mixed_load_every_index_equals_store(replicas, photos):
    gallery = "mixed"
    pool = iter(_unused_photos(photos, 30, seed=3)[2000:])
    lock = threading.Lock()
    stop = threading.Event()
    alive: dict[str, tuple[str, float]] = {}  # subject -> (photo, time acknowledged)
    empty: set[str] = set()  # created, but the photo was refused: no face
    deleted: dict[str, tuple[str, float]] = {}
    ops: Counter = Counter()
    failures: list[str] = []

    def client_loop(k: int) -> None:
        rng = random.Random(100 + k)
        clients = [r.client(timeout=60) for r in replicas]
        mine: list[str] = []
        n = 0
        while not stop.is_set():
            target = (k + n) % N_REPLICAS
            client, name = clients[target], replicas[target].name
            n += 1
            roll = rng.random()
            try:
                if roll < 0.3 or not mine:
                    with lock:
                        path = next(pool)
                    subject = f"m{k:02d}-{n:04d}"
                    r = enrol(client, gallery, subject, photo(path))
                    if r.status_code == 201:
                        with lock:
                            alive[subject] = (path, time.monotonic())
                        mine.append(subject)
                    elif is_unsuitable(r):
                        with lock:
                            empty.add(subject)
                    else:
                        failures.append(f"enrol via {name}: {r.status_code} {r.text[:200]}")
                    ops["enrol"] += 1
                elif roll < 0.8:
                    probe_deleted = bool(deleted) and rng.random() < 0.25
                    with lock:
                        subject = rng.choice(sorted(deleted) if probe_deleted else mine)
                        path, since = (deleted if probe_deleted else alive)[subject]
                    sent = time.monotonic()
                    candidates = identify(client, gallery, photo(path), top_k=3)
                    settled = sent - since > VISIBILITY_BOUND_S
                    top = candidates[0]["subject_id"] if candidates else None
                    if settled and probe_deleted and top == subject:
                        failures.append(
                            f"{name} still finds {subject}, deleted "
                            f"{sent - since:.2f}s before the request"
                        )
                    if settled and not probe_deleted and top != subject:
                        failures.append(
                            f"{name} misses {subject}, enrolled "
                            f"{sent - since:.2f}s before the request (top {top})"
                        )
                    ops["identify"] += 1
                else:
                    subject = mine.pop(rng.randrange(len(mine)))
                    r = client.delete(f"/v1/galleries/{gallery}/subjects/{subject}")
                    if r.status_code == 200 and r.json()["faces_removed"] == 1:
                        with lock:
                            deleted[subject] = (alive.pop(subject)[0], time.monotonic())
                    else:
                        failures.append(f"delete via {name}: {r.status_code} {r.text[:200]}")
                    ops["delete"] += 1
            except Exception as exc:  # noqa: BLE001 - every failure is reported below
                failures.append(f"{name}: {type(exc).__name__}: {exc}")
        for c in clients:
            c.close()

    threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(N_CLIENTS)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    time.sleep(MIXED_LOAD_S)
    stop.set()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    print(
        f"\n{N_CLIENTS} clients over {N_REPLICAS} replicas for {elapsed:.1f}s: {dict(ops)} "
        f"({sum(ops.values()) / elapsed:.1f} ops/s); {len(alive)} subjects alive, "
        f"{len(deleted)} deleted, {len(empty)} refused photos"
    )
    assert not failures, failures[:10]
    assert ops["enrol"] and ops["identify"] and ops["delete"]

    stored = _assert_every_index_equals_store(replicas, gallery)
    assert stored == len(alive)
    rng = random.Random(4)
    for replica in replicas:
        with replica.client() as client:
            subjects = {s["subject_id"]: len(s["faces"]) for s in list_subjects(client, gallery)}
            assert subjects == {**dict.fromkeys(alive, 1), **dict.fromkeys(empty, 0)}
            for subject in rng.sample(sorted(alive), min(6, len(alive))):
                candidates = identify(client, gallery, photo(alive[subject][0]), top_k=3)
                assert candidates and candidates[0]["subject_id"] == subject, (replica, subject)
                assert candidates[0]["similarity"] >= SAME_PHOTO
            for subject in rng.sample(sorted(deleted), min(3, len(deleted))):
                candidates = identify(client, gallery, photo(deleted[subject][0]), top_k=3) or []
                assert subject not in [c["subject_id"] for c in candidates], (replica, subject)


def _observe_workers(
    server: Replica, gallery: str, subject: str, image: bytes, present: bool, acknowledged: float
) -> dict[int, list[tuple[float, bool]]]:
    """Identify ``image`` on fresh connections until both workers have answered at least
    twice after the bound; per worker pid, (seconds after the acknowledgement the request
    was sent, whether the answer reflected the write)."""
    seen: dict[int, list[tuple[float, bool]]] = {}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with server.client() as client:  # one connection: both requests reach one worker
            sent = time.monotonic() - acknowledged
            candidates = identify(client, gallery, image, top_k=3) or []
            info = server.info(client)
        found = bool(candidates) and candidates[0]["subject_id"] == subject
        stored, indexed = gallery_sizes(info).get(gallery, (0, 0))
        assert indexed == stored or sent <= VISIBILITY_BOUND_S, (info["worker_pid"], info)
        seen.setdefault(info["worker_pid"], []).append((round(sent, 3), found == present))
        settled = [
            pid for pid, obs in seen.items() if sum(t > VISIBILITY_BOUND_S for t, _ in obs) >= 2
        ]
        if len(settled) >= 2:
            break
    return seen


@pytest.mark.timeout(240)
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_workers_see_each_others_writes_within_bound(backend, request, tmp_path, photos):
    url = (
        request.getfixturevalue("postgres_cluster").create_database()
        if backend == "postgresql"
        else ""
    )
    server = Replica(tmp_path, url, env=REPLICA_ENV, workers=2, name=f"{backend} x2")
    server.start(timeout=120)
    gallery = "workers"
    try:
        with server.client() as client:
            for identity in photos:
                path = photos[identity][0]
                subject = f"w-{identity}"
                r = enrol(client, gallery, subject, photo(path))
                if r.status_code == 201:
                    break
                assert is_unsuitable(r), r.text
            enrolled_at = time.monotonic()
        after_enrol = _observe_workers(server, gallery, subject, photo(path), True, enrolled_at)

        with server.client() as client:
            r = client.delete(f"/v1/galleries/{gallery}/subjects/{subject}")
            assert r.status_code == 200, r.text
            deleted_at = time.monotonic()
        after_delete = _observe_workers(server, gallery, subject, photo(path), False, deleted_at)
    finally:
        server.stop()
    print(
        f"\n{backend}, 2 workers: (seconds after ack, answer up to date) per worker pid\n"
        f"  after enrol: {after_enrol}\n  after delete: {after_delete}"
    )
    for seen in (after_enrol, after_delete):
        assert len(seen) == 2, f"requests reached only one worker: {seen}"
        for pid, observations in seen.items():
            stale = [t for t, fresh in observations if not fresh and t > VISIBILITY_BOUND_S]
            assert not stale, f"worker {pid} answered from a stale index {stale}s after the ack"


@pytest.mark.timeout(300)
def test_bench_replicas_quick():
    """``bench/bench_replicas.py --quick`` (1 and 2 replicas on PostgreSQL) ends with one JSON
    line holding throughput per replica count and enrol-to-visible latencies."""
    proc = subprocess.run(
        [sys.executable, "bench/bench_replicas.py", "--quick"],
        check=False,
        cwd=REPO,
        env={**os.environ, **TEST_MODELS},
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result["runs"]) == {"1", "2"}
    for run in result["runs"].values():
        assert run["rps_median"] > 0 and run["errors"] == 0, run
        assert 0 < run["p50_ms"] <= run["p99_ms"]
    for key in ("visible_idle", "visible_loaded"):
        visible = result[key]
        assert visible["samples"] == 4  # one per write: each reaches the one other replica
        assert 0 < visible["p50_ms"] <= visible["p99_ms"] <= VISIBILITY_BOUND_S * 1000, visible
    assert len(result["rss_mb"]) == 2 and min(result["rss_mb"]) > 0
