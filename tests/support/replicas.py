"""Several ``facegate serve`` replicas on one gallery store, for the scale-out tests and benchmark.

A :class:`Replica` is a real ``facegate serve`` subprocess on 127.0.0.1 (its own
port and ``FACEGATE_DATA_DIR``) that can also be killed with ``SIGKILL`` and
started again on the same port and data directory.  The functions below talk to
replicas only through the public HTTP API: enrol, identify, ``/readyz`` (the
replica's ``applied_seq`` against the store's ``head_seq``) and ``/v1/info``
(each gallery's size in the store and in this replica's index; with
``check_index=true`` the index compared with the store, face id by face id).
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import httpx

from tests.conftest import CELEBA
from tests.support.service import ServeProcess

#: The visibility bound of the issue: a write acknowledged by one replica is
#: visible to ``/v1/identify`` on every other within this many seconds.
VISIBILITY_BOUND_S = 1.0

#: Codes an enrolment may be refused with for a photo that does not suit enrolment.
UNSUITABLE_PHOTO = {"no_face", "multiple_faces", "face_too_small", "low_quality_face"}


class Replica(ServeProcess):
    """One ``facegate serve`` process; ``kill()`` sends SIGKILL, ``start()`` brings it back."""

    def __init__(
        self,
        data_dir: Path,
        store_url: str = "",
        env: dict[str, str] | None = None,
        workers: int = 1,
        name: str = "replica",
    ):
        extra = {"FACEGATE_STORE_URL": store_url} if store_url else {}
        super().__init__(data_dir, env={**extra, **(env or {})}, workers=workers)
        self.name = name

    def kill(self) -> None:
        """``kill -9`` the server process (no shutdown, no snapshot)."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def client(self, timeout: float = 60.0) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=timeout)

    def sync(self) -> dict:
        """This replica's replication state from ``/readyz`` (whatever its status code)."""
        body = httpx.get(f"{self.base_url}/readyz", timeout=10).json()
        return {**(body.get("sync") or {}), "status": body["status"]}

    def info(self, client: httpx.Client | None = None) -> dict:
        """``GET /v1/info`` on a fresh connection unless ``client`` is given."""
        r = (client or httpx).get(f"{self.base_url}/v1/info", timeout=10)
        r.raise_for_status()
        return r.json()

    def index_check(self) -> dict:
        """``GET /v1/info?check_index=true``: this replica's index compared with the store,
        face id by face id (``consistent``, per gallery counts and examples)."""
        r = httpx.get(f"{self.base_url}/v1/info", params={"check_index": "true"}, timeout=60)
        r.raise_for_status()
        return r.json()["index_check"]

    def __repr__(self) -> str:
        return f"<{self.name} {self.base_url}>"


def start_all(replicas: Iterable[ServeProcess], timeout: float = 120.0) -> None:
    """Start several replicas at once (model loading overlaps); raise the first failure."""
    errors: list[BaseException] = []

    def run(replica: ServeProcess) -> None:
        try:
            replica.start(timeout)
        except Exception as exc:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(r,)) for r in replicas]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def stop_all(replicas: Iterable[ServeProcess]) -> None:
    """Stop several replicas at once (each writes its index snapshots on the way out)."""
    threads = [threading.Thread(target=r.stop) for r in replicas]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


# --- data --------------------------------------------------------------------------------
def celeba_photos() -> dict[str, list[str]]:
    """CelebA identity -> its photo paths (relative to ``images/``), both sorted."""
    groups: dict[str, list[str]] = defaultdict(list)
    for line in (CELEBA / "identities.txt").read_text().splitlines()[1:]:
        path, identity = line.split()
        groups[identity].append(path)
    return {identity: sorted(paths) for identity, paths in sorted(groups.items())}


def photo(path: str) -> bytes:
    return (CELEBA / "images" / path).read_bytes()


# --- API calls ---------------------------------------------------------------------------
def create_subject(client: httpx.Client, gallery: str, subject_id: str) -> httpx.Response:
    return client.post(f"/v1/galleries/{gallery}/subjects", json={"subject_id": subject_id})


def add_face(client: httpx.Client, gallery: str, subject_id: str, image: bytes) -> httpx.Response:
    return client.post(
        f"/v1/galleries/{gallery}/subjects/{subject_id}/faces",
        files={"image": ("photo.jpg", image)},
    )


def enrol(client: httpx.Client, gallery: str, subject_id: str, image: bytes) -> httpx.Response:
    """Create ``subject_id`` and enrol ``image``; the face response (201 when acknowledged)."""
    r = create_subject(client, gallery, subject_id)
    if r.status_code not in (200, 201):
        return r
    return add_face(client, gallery, subject_id, image)


def is_unsuitable(response: httpx.Response) -> bool:
    """A 422 refusal because the photo does not suit enrolment (not a service failure)."""
    return (
        response.status_code == 422
        and response.json().get("error", {}).get("code") in UNSUITABLE_PHOTO
    )


def identify(client: httpx.Client, gallery: str, image: bytes, top_k: int = 5) -> list[dict] | None:
    """Candidates for the largest face (best first), or None when no face is found."""
    r = client.post(
        "/v1/identify",
        files={"image": ("probe.jpg", image)},
        data={"gallery": gallery, "top_k": str(top_k)},
    )
    if r.status_code == 422 and r.json()["error"]["code"] == "no_face":
        return None
    r.raise_for_status()
    faces = r.json()["faces"]
    return faces[0]["candidates"] if faces else None


def rank1(client: httpx.Client, gallery: str, image: bytes) -> tuple[str, float] | None:
    """(subject_id, similarity) of the best candidate, or None (no face / empty gallery)."""
    candidates = identify(client, gallery, image, top_k=1)
    if not candidates:
        return None
    return candidates[0]["subject_id"], candidates[0]["similarity"]


def list_subjects(client: httpx.Client, gallery: str) -> list[dict]:
    """Every subject of ``gallery`` with its faces (follows the pagination cursor)."""
    subjects, cursor = [], None
    while True:
        params = {"limit": "1000", **({"cursor": cursor} if cursor else {})}
        r = client.get(f"/v1/galleries/{gallery}/subjects", params=params)
        r.raise_for_status()
        body = r.json()
        subjects += body["subjects"]
        cursor = body["next_cursor"]
        if not cursor:
            return subjects


# --- replication state -------------------------------------------------------------------
def gallery_sizes(info: dict) -> dict[str, tuple[int, int]]:
    """Gallery -> (faces in the store, faces in this replica's index) from ``/v1/info``."""
    return {g["name"]: (g["faces"], g["indexed"]) for g in info["galleries"]["galleries"]}


def wait_converged(replicas: Iterable[Replica], timeout: float = 30.0) -> list[dict]:
    """Wait until every replica is ready with ``applied_seq == head_seq`` (one head for all);
    return their sync states."""
    replicas = list(replicas)
    deadline = time.monotonic() + timeout
    while True:
        states = [r.sync() for r in replicas]
        heads = {s.get("head_seq") for s in states}
        if (
            all(
                s["status"] == "ready" and s.get("applied_seq") == s.get("head_seq") for s in states
            )
            and len(heads) == 1
        ):
            return states
        if time.monotonic() > deadline:
            raise AssertionError(f"replicas did not converge within {timeout}s: {states}")
        time.sleep(0.05)


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by linear interpolation."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)
