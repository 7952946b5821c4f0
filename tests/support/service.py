"""Helpers for the REST tests: a real uvicorn server (subprocess or in-process) on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from tests.conftest import REPO, SHARED_MODELS

#: Reference models from ../shared used by the REST tests.
TEST_MODELS = {
    "FACEGATE_MODELS_DIR": str(SHARED_MODELS),
    "FACEGATE_DETECTOR": "yunet_2023mar",
    "FACEGATE_RECOGNIZER": "mobilefacenet_peer_128d",
    "FACEGATE_PROVIDERS": "CPUExecutionProvider",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(base_url: str, timeout: float = 90.0, proc: subprocess.Popen | None = None) -> dict:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            r = httpx.get(f"{base_url}/readyz", timeout=2.0)
            last = r.text
            if r.status_code == 200:
                return r.json()
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.2)
    raise TimeoutError(f"server at {base_url} not ready after {timeout}s: {last}")


class ServeProcess:
    """``facegate serve`` in a subprocess (the real entry point), with its log in a file."""

    def __init__(self, data_dir: Path, env: dict[str, str] | None = None, workers: int = 1):
        self.data_dir = Path(data_dir)
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            **TEST_MODELS,
            "FACEGATE_DATA_DIR": str(self.data_dir),
            "FACEGATE_LOG_LEVEL": "warning",
            **(env or {}),
        }
        self.workers = workers
        self.proc: subprocess.Popen | None = None
        self.log_path = self.data_dir / f"serve-{self.port}.log"

    def start(self, timeout: float = 90.0) -> ServeProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "service.cli",
                    "serve",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--workers",
                    str(self.workers),
                ],
                cwd=REPO,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_ready(self.base_url, timeout, self.proc)
        except (RuntimeError, TimeoutError):
            self.stop()
            raise RuntimeError(f"facegate serve failed to start:\n{self.log()}") from None
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:] if self.log_path.exists() else ""

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        code, self.proc = self.proc.returncode, None
        return code


class InProcessServer:
    """``create_app(settings)`` under a real uvicorn server in a background thread."""

    def __init__(self, settings):
        import uvicorn

        from service.app import create_app

        self.app = create_app(settings)
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def state(self):
        return self.app.state.facegate

    def start(self, timeout: float = 90.0) -> InProcessServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("in-process server failed to start")
            time.sleep(0.05)
        wait_ready(self.base_url, timeout)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(20)
