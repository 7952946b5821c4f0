"""Gallery export and restore, end to end on both store backends, on real LFW photos.

A real server (uvicorn on 127.0.0.1, ``yunet_2023mar`` + ``mobilefacenet_peer_128d``)
enrols LFW people into store one; ``GET /v1/galleries/staff/export`` and ``facegate
gallery export`` write the gallery; ``facegate gallery restore`` writes it into store two
while a second server already runs on it (so the restored faces reach that server
through the change log, as any enrolment); both servers then answer ``/v1/identify``
for other photos of the same people identically.  Truncated, altered, foreign-model and
duplicate restores are refused and change nothing.
"""

from __future__ import annotations

import gzip
import io
import json
import time

import httpx
import pytest

from service.cli import main as cli_main
from service.config import Settings
from service.gallery.backends import open_store
from service.gallery.errors import InvalidExport
from service.gallery.transfer import read_export
from tests.conftest import SHARED_MODELS, photo
from tests.support.service import InProcessServer

RECOGNIZER = "mobilefacenet_peer_128d"
OTHER_RECOGNIZER = "facegate_mfn_cosface"
PEOPLE = ["Abdoulaye_Wade", "Angela_Merkel", "Arianna_Huffington", "Alan_Greenspan"]
STRANGER = "Alvaro_Uribe"  # never enrolled


@pytest.fixture(params=["sqlite", "postgresql"])
def store_urls(request, tmp_path) -> tuple[str, str]:
    if request.param == "sqlite":
        return (
            f"sqlite:///{tmp_path / 'one' / 'gallery.sqlite3'}",
            f"sqlite:///{tmp_path / 'two' / 'gallery.sqlite3'}",
        )
    cluster = request.getfixturevalue("postgres_cluster")
    return cluster.create_database(), cluster.create_database()


def server(tmp_path, name: str, store_url: str) -> InProcessServer:
    settings = Settings(
        models_dir=SHARED_MODELS,
        detector="yunet_2023mar",
        recognizer=RECOGNIZER,
        providers=["CPUExecutionProvider"],
        faiss_gpu=False,
        data_dir=tmp_path / f"data-{name}",
        store_url=store_url,
        store_images=True,
        sync_interval_s=0.05,
    )
    return InProcessServer(settings).start()


def cli(capsys, *args: str) -> tuple[int, dict]:
    code = cli_main(
        ["gallery", *args, "--models-dir", str(SHARED_MODELS), "--recognizer", RECOGNIZER]
        if "--recognizer" not in args
        else ["gallery", *args, "--models-dir", str(SHARED_MODELS)]
    )
    lines = capsys.readouterr().out.strip().splitlines()
    return code, json.loads(lines[-1])


def identify_all(client: httpx.Client) -> list:
    answers = []
    for name in [*PEOPLE, STRANGER]:
        r = client.post(
            "/v1/identify",
            data={"gallery": "staff", "top_k": "3"},
            files={"image": ("probe.jpg", photo(name, 3))},
        )
        assert r.status_code == 200, r.text
        answers.append(
            [
                (face["match"], [(c["subject_id"], c["similarity"]) for c in face["candidates"]])
                for face in r.json()["faces"]
            ]
        )
    return answers


def rewrite(data: bytes, change) -> bytes:
    """The export with ``change(lines)`` applied to its decompressed lines."""
    lines = gzip.decompress(data).splitlines(keepends=True)
    change(lines)
    return gzip.compress(b"".join(lines))


def store_state(url: str) -> tuple[int, list[dict]]:
    store = open_store(url)
    try:
        return store.head_seq(), store.stats()
    finally:
        store.close()


@pytest.mark.timeout(300)
def test_export_restore_round_trip(tmp_path, store_urls, capsys, monkeypatch):
    url_one, url_two = store_urls
    one = server(tmp_path, "one", url_one)
    two = server(tmp_path, "two", url_two)
    try:
        with httpx.Client(base_url=one.base_url, timeout=60) as client:
            for name in PEOPLE:
                r = client.post(
                    "/v1/galleries/staff/subjects",
                    json={"subject_id": name, "metadata": {"name": name.lower()}},
                )
                assert r.status_code == 201, r.text
                for number in (1, 2):
                    r = client.post(
                        f"/v1/galleries/staff/subjects/{name}/faces",
                        files={"image": ("face.jpg", photo(name, number))},
                    )
                    assert r.status_code == 201, r.text
            exported = client.get("/v1/galleries/staff/export")
            assert exported.status_code == 200, exported.text
            assert exported.headers["content-type"] == "application/gzip"
            missing = client.get("/v1/galleries/nowhere/export")
            assert missing.status_code == 404
            assert missing.json()["error"]["code"] == "gallery_not_found"
            before = identify_all(client)

        # the CLI writes the same gallery (the headers differ only in their export time)
        code, summary = cli(
            capsys, "export", "staff", str(tmp_path / "cli.gz"), "--store-url", url_one
        )
        assert code == 0 and summary["faces"] == 2 * len(PEOPLE)
        rest_lines = gzip.decompress(exported.content).splitlines()
        cli_lines = gzip.decompress((tmp_path / "cli.gz").read_bytes()).splitlines()
        assert rest_lines[1:-1] == cli_lines[1:-1]
        export = read_export(io.BytesIO(exported.content))
        assert export.model_id.startswith(RECOGNIZER + "@") and export.dim == 128
        assert len(export.model_sha256) == 64
        assert [s.subject_id for s in export.subjects] == sorted(PEOPLE)
        assert all(face.image is not None for face in export.faces)
        header = json.loads(rest_lines[0])
        assert header["format"] == "facegate-gallery" and header["version"] == 1

        good = tmp_path / "staff.gz"
        good.write_bytes(exported.content)
        state = store_state(url_two)

        # refusals first: nothing may change in store two
        truncated = tmp_path / "truncated.gz"
        truncated.write_bytes(exported.content[: len(exported.content) // 2])
        cut_lines = tmp_path / "cut.gz"
        cut_lines.write_bytes(rewrite(exported.content, lambda lines: lines.pop(-2)))
        tampered = tmp_path / "tampered.gz"

        def alter(lines):  # another subject's metadata, end record untouched
            record = json.loads(lines[1])
            record["metadata"] = {"name": "someone else"}
            lines[1] = json.dumps(record, separators=(",", ":")).encode() + b"\n"

        tampered.write_bytes(rewrite(exported.content, alter))
        not_gzip = tmp_path / "plain.jsonl"
        not_gzip.write_bytes(gzip.decompress(exported.content))
        for bad in (truncated, cut_lines, tampered, not_gzip):
            code, answer = cli(capsys, "restore", str(bad), "--store-url", url_two)
            assert code == 3 and answer["error"]["code"] == "invalid_export", (bad, answer)
        with pytest.raises(InvalidExport, match="altered"):
            read_export(io.BytesIO(tampered.read_bytes()))
        code, answer = cli(
            capsys, "restore", str(good), "--store-url", url_two, "--recognizer", OTHER_RECOGNIZER
        )
        assert code == 3 and answer["error"]["code"] == "model_mismatch"
        assert store_state(url_two) == state

        # the restore, while server two runs on store two; photos are kept as the store's
        # setting says (FACEGATE_STORE_IMAGES), as for any enrolment
        monkeypatch.setenv("FACEGATE_STORE_IMAGES", "true")
        code, report = cli(capsys, "restore", str(good), "--store-url", url_two)
        assert code == 0, report
        assert report["subjects"] == len(PEOPLE) and report["faces"] == 2 * len(PEOPLE)
        assert report["photos"] == 2 * len(PEOPLE) and report["photos_dropped"] == 0
        code, answer = cli(capsys, "restore", str(good), "--store-url", url_two)
        assert code == 3 and answer["error"]["code"] == "conflict"
        head, stats = store_state(url_two)
        assert head == state[0] + 2 * len(PEOPLE)  # one change-log entry per face

        deadline = time.monotonic() + 10
        while two.state.gallery.stats()["faces"] < 2 * len(PEOPLE):
            assert time.monotonic() < deadline, "server two never applied the restore"
            time.sleep(0.05)
        with httpx.Client(base_url=two.base_url, timeout=60) as client:
            r = client.get("/v1/galleries/staff/subjects/Angela_Merkel")
            assert r.json()["metadata"] == {"name": "angela_merkel"}
            assert len(r.json()["faces"]) == 2
            after = identify_all(client)
        assert after == before
        assert [answer[0][0] for answer in before] == [*PEOPLE, None]
    finally:
        one.stop()
        two.stop()


def test_cli_restore_of_a_flip_augmented_gallery(tmp_path, capsys, monkeypatch):
    """A gallery served with mirrored-face embedding carries the model id ``NAME@SHA+flip``
    (the default recognizer's card asks for it): ``facegate gallery restore`` run with the
    same settings restores it under that id, and refuses it where flip is off."""
    monkeypatch.setenv("FACEGATE_FLIP_AUGMENT", "true")
    settings = Settings(
        models_dir=SHARED_MODELS,
        detector="yunet_2023mar",
        recognizer=RECOGNIZER,
        providers=["CPUExecutionProvider"],
        faiss_gpu=False,
        data_dir=tmp_path / "data-one",
        store_url=f"sqlite:///{tmp_path / 'one.sqlite3'}",
    )
    one = InProcessServer(settings).start()
    try:
        with httpx.Client(base_url=one.base_url, timeout=60) as client:
            r = client.post(
                "/v1/galleries/flipped/subjects/ada/faces",
                files={"image": ("p.jpg", photo(PEOPLE[0], 1))},
            )
            if r.status_code == 404:  # subjects are created first
                client.post("/v1/galleries/flipped/subjects", json={"subject_id": "ada"})
                r = client.post(
                    "/v1/galleries/flipped/subjects/ada/faces",
                    files={"image": ("p.jpg", photo(PEOPLE[0], 1))},
                )
            assert r.status_code == 201, r.text
            model_id = client.get("/v1/galleries/flipped").json()["model_id"]
            assert model_id.endswith("+flip")
            exported = client.get("/v1/galleries/flipped/export")
            assert exported.status_code == 200
    finally:
        one.stop()
    path = tmp_path / "flipped.jsonl.gz"
    path.write_bytes(exported.content)
    two = f"sqlite:///{tmp_path / 'two.sqlite3'}"
    code, report = cli(capsys, "restore", str(path), "--store-url", two)
    assert code == 0, report
    assert open_store(two).get_gallery("flipped")["model_id"] == model_id
    monkeypatch.setenv("FACEGATE_FLIP_AUGMENT", "false")
    three = f"sqlite:///{tmp_path / 'three.sqlite3'}"
    code, answer = cli(capsys, "restore", str(path), "--store-url", three)
    assert code != 0 and answer["error"]["code"] == "model_mismatch", answer
