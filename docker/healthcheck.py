"""Container health probe: exit 0 when the service answers ``GET /healthz`` with 200.

Reads the same ``FACEGATE_HOST`` / ``FACEGATE_PORT`` the server listens on; a
wildcard listen address is probed on loopback.  Standard library only, so the
image needs no curl.
"""

from __future__ import annotations

import os
import sys
import urllib.request

WILDCARDS = {"", "0.0.0.0", "::", "[::]"}


def probe_url() -> str:
    host = os.environ.get("FACEGATE_HOST", "0.0.0.0")
    port = os.environ.get("FACEGATE_PORT", "8000")
    if host in WILDCARDS:
        host = "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}/healthz"


def main() -> int:
    try:
        with urllib.request.urlopen(probe_url(), timeout=4) as response:
            return 0 if response.status == 200 else 1
    except OSError as exc:
        print(f"healthcheck failed: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
