"""Streaming HTTP(S) downloads for the model registry and installer.

``urllib.request.urlopen`` builds one process-wide opener on its first call and keeps
the proxy settings it read from the environment then (``HTTP_PROXY``, ``NO_PROXY`` …)
for the life of the process. A long-lived process (or a test run) whose environment
changes would then keep routing through a stale proxy, so every download here builds
its own opener and reads the environment at that moment.
"""

from __future__ import annotations

import shutil
import urllib.request
from pathlib import Path


def open_url(url: str, timeout: float):
    """Open ``url`` (http/https only) with the proxies the environment names now."""
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"not a downloadable URL: {url!r}")
    return urllib.request.build_opener().open(url, timeout=timeout)


def download_to(url: str, dest: Path, timeout: float) -> None:
    """Stream ``url`` into ``dest``; raises ``urllib.error.URLError``/``OSError`` on failure."""
    with open_url(url, timeout) as response, open(dest, "wb") as out:
        shutil.copyfileobj(response, out, 1 << 20)
