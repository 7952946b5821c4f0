import shutil
import subprocess
import sys

import pytest

from service.registry import ModelError, Registry, sha256_file
from tests.conftest import SHARED_MODELS

SHARED_NAMES = [
    "yunet_2023mar",
    "scrfd_500m_bnkps_640",
    "scrfd_2.5g_bnkps",
    "retinaface_mnet025",
    "mobilefacenet_peer_128d",
]


def test_every_shared_model_resolves_with_checksum(shared_registry):
    for name in SHARED_NAMES:
        card, path = shared_registry.resolve(name)
        assert path.parent == SHARED_MODELS
        assert sha256_file(path) == card.sha256


def test_resolve_by_path_uses_manifest_card(shared_registry):
    card, _ = shared_registry.resolve(str(SHARED_MODELS / "yunet_2023mar.onnx"))
    assert card.name == "yunet_2023mar" and card.task == "detection"


def test_checksum_mismatch_is_refused(tmp_path, shared_registry):
    bad = tmp_path / "mobilefacenet_peer_128d.onnx"
    shutil.copyfile(SHARED_MODELS / "mobilefacenet_peer_128d.onnx", bad)
    with open(bad, "r+b") as fh:
        fh.seek(1000)
        byte = fh.read(1)
        fh.seek(1000)
        fh.write(bytes([byte[0] ^ 0xFF]))
    reg = Registry(shared_registry.manifest, [tmp_path])
    with pytest.raises(ModelError, match="checksum mismatch"):
        reg.resolve("mobilefacenet_peer_128d")


def test_unknown_and_wrong_task(shared_registry):
    with pytest.raises(ModelError, match="unknown model"):
        shared_registry.resolve("no_such_model")
    with pytest.raises(ModelError, match="not recognition"):
        shared_registry.resolve("yunet_2023mar", task="recognition")


def test_operating_point_precedence():
    """Request > FACEGATE_OPERATING_POINT > the recognizer card's default; unknown → 400."""
    from service.config import MANIFEST_PATH
    from service.pipeline.decision import UnknownOperatingPoint, operating_point

    cards = Registry(MANIFEST_PATH, []).cards
    dlib, peer = cards["dlib_resnet_v1"], cards["mobilefacenet_peer_128d"]
    assert operating_point(dlib, None) == "fmr_1e-2"
    assert operating_point(peer, None) == "fmr_1e-3"
    assert operating_point(dlib, None, "fmr_1e-4") == "fmr_1e-4"
    assert operating_point(dlib, "fmr_1e-3", "fmr_1e-4") == "fmr_1e-3"
    # a configured point the card does not calibrate falls back to the card's default
    assert operating_point(dlib, None, "fmr_1e-6") == "fmr_1e-2"
    with pytest.raises(UnknownOperatingPoint) as info:
        operating_point(dlib, "fmr_1e-6")
    assert info.value.status == 400 and info.value.code == "unknown_operating_point"
    assert "fmr_1e-2" in str(info.value)


def _tampered_with_card(tmp_path, shared_registry, sha256: str | None = None):
    """A flipped-byte copy of the peer model and a card beside it that declares the copy."""
    bad = tmp_path / "mobilefacenet_peer_128d.onnx"
    shutil.copyfile(SHARED_MODELS / "mobilefacenet_peer_128d.onnx", bad)
    data = bytearray(bad.read_bytes())
    data[1000] ^= 0xFF
    bad.write_bytes(bytes(data))
    card = shared_registry.cards["mobilefacenet_peer_128d"].model_copy(
        update={"sha256": sha256 or sha256_file(bad)}
    )
    (tmp_path / "mobilefacenet_peer_128d.card.json").write_text(card.model_dump_json())
    return bad


def test_a_card_in_the_models_dir_cannot_change_a_known_models_sha256(tmp_path, shared_registry):
    bad = _tampered_with_card(tmp_path, shared_registry)
    expected = shared_registry.cards["mobilefacenet_peer_128d"].sha256
    with pytest.raises(ModelError) as info:
        Registry(shared_registry.manifest, [tmp_path])
    message = str(info.value)
    assert "mobilefacenet_peer_128d.card.json" in message and expected in message
    assert sha256_file(bad) in message and "cannot change the checksum" in message
    # nor through an .onnx path with the card beside it
    with pytest.raises(ModelError, match="cannot change the checksum"):
        shared_registry.resolve(str(bad))
    # the CLI says so in one line and exits 1
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "models", "list", "--models-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and "cannot change the checksum" in result.stderr


def test_a_card_in_the_models_dir_with_the_manifest_sha256_is_used(tmp_path, shared_registry):
    listed = shared_registry.cards["mobilefacenet_peer_128d"]
    shutil.copyfile(SHARED_MODELS / listed.file, tmp_path / listed.file)
    card = listed.model_copy(update={"description": "described by the models directory"})
    (tmp_path / "mobilefacenet_peer_128d.card.json").write_text(card.model_dump_json())
    resolved, path = Registry(shared_registry.manifest, [tmp_path]).resolve(listed.name)
    assert resolved.description == "described by the models directory"
    assert path == tmp_path / listed.file and resolved.sha256 == listed.sha256
