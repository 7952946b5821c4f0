"""The people tables on both store backends: photos, photo faces, clusters, corrections,
each one transaction with its change-log entries (an assigned face is an enrolled face of
its subject), and the invariants the store keeps whatever it is asked."""

from __future__ import annotations

import numpy as np
import pytest

from service.gallery.backends import open_store
from service.gallery.errors import (
    ClusterNotFound,
    Conflict,
    FaceNotFound,
    GalleryNotFound,
    InvalidInput,
)
from service.gallery.store import NewPhoto, NewPhotoFace

MODEL = "m"


def unit(seed: int, dim: int = 8) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


def face(seed: int, subject_id: str | None = None) -> NewPhotoFace:
    return NewPhotoFace(
        embedding=unit(seed),
        box=[1, 2, 30, 40],
        landmarks=[[5, 5]] * 5,
        quality={"det_score": 0.9, "face_size_px": 40.0},
        clusterable=True,
        subject_id=subject_id,
    )


@pytest.fixture
def store(store_url):
    s = open_store(store_url)
    s.migrate()
    s.create_gallery("g", MODEL)
    s.create_gallery("h", MODEL)
    yield s
    s.close()


def logged(store, before: int) -> list[tuple[str, str]]:
    """The change-log entries after seq ``before``: (op, gallery)."""
    return [(ch.op, ch.gallery) for ch in store.changes_after(before)]


def test_photos_clusters_and_corrections(store):
    head = store.head_seq()
    one, created, seq = store.add_photo("g", MODEL, "p1", 100, 80, [face(1), face(2)])
    assert created and len(one["faces"]) == 2
    # no index changed, yet the write has its log entry (in its transaction)
    assert seq == head + 1 == store.head_seq() and logged(store, head) == [("people", "g")]
    again, created, seq = store.add_photo("g", MODEL, "p1", 100, 80, [face(1)])
    assert not created and again == one and seq is None and store.head_seq() == head + 1
    added, _ = store.add_photos(  # several photos in one transaction, one of them known
        "g",
        MODEL,
        [NewPhoto("p1", 100, 80, [face(1)]), NewPhoto("p2", 100, 80, [face(3)])],
    )
    assert [created for _, created in added] == [False, True] and added[0][0] == one
    two = added[1][0]
    three, _, _ = store.add_photo("g", MODEL, "p3", 100, 80, [face(4)])
    a, b = (f["face_id"] for f in one["faces"])
    c, d = two["faces"][0]["face_id"], three["faces"][0]["face_id"]
    # a group holding two faces of one photo loses one of them: never one person
    head = store.head_seq()
    counts, seq = store.apply_clusters("g", {}, [[a, b, c], [d]])
    assert counts == {"clusters_created": 1, "faces_joined": 0}
    assert seq == head + 1 and logged(store, head) == [("people", "g")]
    head = store.head_seq()
    counts, seq = store.apply_clusters("g", {}, [[d]])  # nothing to do: nothing logged
    assert counts == {"clusters_created": 0, "faces_joined": 0} and seq is None
    assert store.head_seq() == head
    (cluster,), more = store.list_clusters("g", 10, None)
    assert not more and cluster["face_ids"] == [a, c]
    number = int(cluster["cluster_id"][1:])
    assert store.list_clusters("g", 10, (cluster["size"], number)) == ([], False)
    assert store.list_clusters("g", 10, (cluster["size"] + 1, 0))[0] == [cluster]

    head = store.head_seq()
    named, seq = store.name_cluster("g", number, "ann", {"k": 1}, MODEL)
    assert named["subject_id"] == "ann" and seq == head + 3  # two enrolled faces added
    enrolled = store.get_subject("g", "ann")["faces"]
    assert len(enrolled) == 2
    assert [op for op, _ in logged(store, head)] == ["add", "add", "people"]

    # remove: the enrolled face goes (logged), the rule stays
    head = store.head_seq()
    removed, seq = store.remove_face("g", c)
    assert removed["subject_id"] is None and removed["cluster_id"] is None
    assert [op for op, _ in logged(store, head)] == ["delete_face", "people"] and seq == head + 2
    snapshot = store.people_faces("g")
    assert snapshot.cannot_link == [(c, number, "ann")]
    # a rerun may not put it back
    counts, _ = store.apply_clusters("g", {number: [c, d]}, [])
    assert counts["faces_joined"] == 1
    assert store.get_photo_face("g", c)["cluster_id"] is None
    assert store.get_photo_face("g", d)["subject_id"] == "ann"
    assert store.get_photo_face("g", d)["assignment"] == "automatic"

    # move, split, merge and their refusals, each changing nothing
    with pytest.raises(Conflict):
        store.move_face("g", b, MODEL, cluster_no=number)  # a's photo is there already
    other = store.get_photo_face(
        "h", store.add_photo("h", MODEL, "q", 9, 9, [face(9)])[0]["faces"][0]["face_id"]
    )
    with pytest.raises(FaceNotFound):
        store.move_face("g", other["face_id"], MODEL, cluster_no=number)
    with pytest.raises(ClusterNotFound):
        store.merge_clusters("g", number, 10**6, MODEL)
    with pytest.raises(InvalidInput):
        store.merge_clusters("g", number, number, MODEL)
    with pytest.raises(InvalidInput):
        store.split_cluster("g", number, [other["face_id"]])
    head = store.head_seq()
    split, seq = store.split_cluster("g", number, [d])
    assert split["face_ids"] == [d] and store.get_photo_face("g", d)["subject_id"] is None
    assert [op for op, _ in logged(store, head)] == ["delete_face", "people"] and seq == head + 2
    head = store.head_seq()
    merged, seq = store.merge_clusters("g", number, int(split["cluster_id"][1:]), MODEL)
    assert merged["face_ids"] == [a, d] and merged["subject_id"] == "ann"
    assert [op for op, _ in logged(store, head)] == ["add", "people"] and seq == head + 2
    assert store.get_photo_face("g", d)["assignment"] == "manual"
    with pytest.raises(Conflict):  # nor in the subject
        store.move_face("g", b, MODEL, subject_id="ann")
    store.upsert_subject("g", "cy", None, MODEL)
    head = store.head_seq()
    moved, seq = store.move_face("g", b, MODEL, subject_id="cy")
    assert moved["subject_id"] == "cy" and moved["assignment"] == "manual"
    assert moved["cluster_id"] is None
    assert [op for op, _ in logged(store, head)] == ["add", "people"] and seq == head + 2
    # pure cluster changes (no subject anywhere): each its own entry
    e, f, g2 = (
        store.add_photo("g", MODEL, f"u{i}", 9, 9, [face(20 + i)])[0]["faces"][0]["face_id"]
        for i in range(3)
    )
    store.apply_clusters("g", {}, [[e, f], [g2, f]])  # f is taken by the first group
    head = store.head_seq()
    (unnamed,) = [c for c in store.list_clusters("g", 100, None)[0] if c["face_ids"] == [e, f]]
    unnamed_no = int(unnamed["cluster_id"][1:])
    split, seq = store.split_cluster("g", unnamed_no, [f])
    assert seq == head + 1 and logged(store, head) == [("people", "g")]
    moved, seq = store.move_face("g", g2, MODEL, cluster_no=int(split["cluster_id"][1:]))
    assert moved["cluster_id"] == split["cluster_id"] and seq == head + 2
    merged, seq = store.merge_clusters("g", unnamed_no, int(split["cluster_id"][1:]), MODEL)
    assert merged["face_ids"] == [e, f, g2] and merged["subject_id"] is None
    assert seq == head + 3 and logged(store, head) == [("people", "g")] * 3


def test_deleting_a_subject_unassigns_its_photo_faces(store):
    store.upsert_subject("g", "bob", None, MODEL)
    photo, _, seq = store.add_photo("g", MODEL, "p", 10, 10, [face(1, "bob"), face(2)])
    assert seq is not None
    assigned = photo["faces"][0]
    assert assigned["subject_id"] == "bob" and assigned["assignment"] == "automatic"
    assert store.get_subject("g", "bob")["faces"][0]["face_id"] == assigned["enrolled_face_id"]
    other, _, _ = store.add_photo("g", MODEL, "q", 10, 10, [face(3, "bob")])
    store.delete_face("g", other["faces"][0]["enrolled_face_id"])  # the classic delete
    gone = store.get_photo_face("g", other["faces"][0]["face_id"])
    assert gone["subject_id"] is None and gone["enrolled_face_id"] is None
    store.delete_subject("g", "bob")
    assert store.get_photo_face("g", assigned["face_id"])["subject_id"] is None
    store.delete_gallery("g")
    with pytest.raises(GalleryNotFound):
        store.get_photo_face("g", assigned["face_id"])
