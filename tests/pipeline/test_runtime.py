"""ONNX Runtime session options follow the settings."""

from __future__ import annotations

import pytest

from service.config import Settings
from service.pipeline.runtime import (
    create_session,
    providers_in_use,
    select_providers,
    session_options,
)
from tests.conftest import SHARED_MODELS


def test_threads_and_spinning_follow_settings():
    options = session_options(Settings(intra_op_threads=1, inter_op_threads=1, ort_spinning=False))
    assert options.intra_op_num_threads == 1 and options.inter_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    default = session_options(Settings())
    assert default.intra_op_num_threads == 0
    assert default.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    spinning = session_options(Settings(ort_spinning=True))
    with pytest.raises(Exception, match="does not have configuration"):
        spinning.get_session_config_entry("session.intra_op.allow_spinning")


def test_unavailable_providers_are_skipped_and_cpu_is_last():
    assert select_providers(["NoSuchExecutionProvider"]) == ["CPUExecutionProvider"]
    session = create_session(
        SHARED_MODELS / "yunet_2023mar.onnx",
        Settings(providers=["NoSuchExecutionProvider"], ort_spinning=False),
    )
    assert providers_in_use(session) == ["CPUExecutionProvider"]


def test_mtcnn_sleeps_whatever_the_setting_and_sets_it_once():
    assert (
        session_options(Settings(ort_spinning=True), spinning=False).get_session_config_entry(
            "session.intra_op.allow_spinning"
        )
        == "0"
    )


def test_loading_the_default_pipeline_prints_no_runtime_warning(default_models_dir):
    """ONNX Runtime writes its warnings to the process's stderr from native code, so the
    pipeline is built in a child process whose stderr is read whole."""
    import subprocess
    import sys

    from tests.conftest import REPO

    script = (
        "from service.config import Settings\n"
        "from service.pipeline.pipeline import Pipeline\n"
        f"Pipeline.from_settings(Settings(models_dir={str(default_models_dir)!r}, "
        "providers=['CPUExecutionProvider']))\n"
        "print('built')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and done.stdout.strip() == "built", done.stderr
    assert "allow_spinning" not in done.stderr and "onnxruntime" not in done.stderr, done.stderr
