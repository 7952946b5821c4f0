"""``facegate people scan / cluster / report`` on a folder of real LFW photos: every photo
added once (a second scan resumes and adds nothing), a file that is no photo refused and
listed, clusters of one person each, and an HTML contact sheet with the thumbnails."""

from __future__ import annotations

import contextlib
import io
import json
import shutil

from service.cli import main as cli_main
from tests.conftest import LFW, SHARED_MODELS

PEOPLE = ["Tony_Blair", "Jean_Chretien"]
MODELS = [
    "--models-dir",
    str(SHARED_MODELS),
    "--detector",
    "yunet_2023mar",
    "--recognizer",
    "mobilefacenet_peer_128d",
]


def run(argv: list[str]) -> tuple[int, dict]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli_main(argv)
    return code, json.loads(out.getvalue().strip().splitlines()[-1])


def report_clusters(tmp_path) -> list[list[str]]:
    """Per row of the contact sheet: the cluster id, then its face ids."""
    import re

    page = (tmp_path / "sheet" / "index.html").read_text()
    rows = []
    for row in page.split("<tr>")[1:]:
        rows.append([re.search(r"<th>(c\d+)", row).group(1), *re.findall(r"faces/(\d+)", row)])
    return rows


def test_scan_cluster_report(tmp_path, monkeypatch):
    monkeypatch.setenv("FACEGATE_PEOPLE_THUMBNAILS", "true")
    monkeypatch.setenv("FACEGATE_PROVIDERS", "CPUExecutionProvider")
    monkeypatch.setenv("FACEGATE_FAISS_GPU", "false")
    folder = tmp_path / "photos"
    for name in PEOPLE:
        (folder / name).mkdir(parents=True)
        for path in sorted((LFW / "images" / name).glob("*.jpg"))[:4]:
            shutil.copy(path, folder / name / path.name)
    first = sorted((folder / PEOPLE[0]).glob("*.jpg"))[0]
    shutil.copy(first, folder / "copy-of-the-first.jpg")  # the same photo twice
    (folder / "notes.jpg").write_bytes(b"not a photo")
    where = ["--gallery", "lib", "--data-dir", str(tmp_path / "data"), *MODELS]

    code, summary = run(["people", "scan", str(folder), *where])
    assert code == 0, summary
    assert summary["photos"] == 10
    assert summary["added"] == 8 and summary["already_added"] == 1 and summary["refused"] == 1
    assert summary["refused_photos"][0]["path"].endswith("notes.jpg")
    assert summary["faces"] >= 8
    assert summary["clustering"]["clusters"] >= 1

    code, again = run(["people", "scan", str(folder), *where])
    assert code == 0 and again["added"] == 0 and again["already_added"] == 9

    code, report = run(["people", "report", "--out", str(tmp_path / "sheet"), *where])
    assert code == 0, report
    assert report["clusters"] == summary["clustering"]["clusters"]
    assert report["thumbnails"] >= 2 and report["without_thumbnail"] == 0
    page = (tmp_path / "sheet" / "index.html").read_text()
    assert page.count("<tr>") == report["clusters"] and 'src="faces/' in page

    # corrections from the command line
    biggest = max(report_clusters(tmp_path), key=len)
    code, named = run(["people", "name", biggest[0], "--subject", "tony", *where])
    assert code == 0 and named["subject_id"] == "tony" and named["origin"] == "manual"
    code, removed = run(["people", "remove", str(named["face_ids"][-1]), *where])
    assert code == 0 and removed["cluster_id"] is None and removed["subject_id"] is None
    code, refused = run(["people", "merge", biggest[0], biggest[0], *where])
    assert code == 3 and refused["error"]["code"] == "invalid_input"

    code, refused = run(["people", "cluster", *[w if w != "lib" else "none" for w in where]])
    assert code == 3 and refused["error"]["code"] == "gallery_not_found"
