"""Check the service that README command 1 started: ready, and it matches real faces.

    python .ci/quickstart_check.py http://127.0.0.1:PORT ../shared/data/lfw/images [timeout_s]

Waits for /readyz, then verifies two photos of one LFW person (must match) and of two
people (must not), on whatever models the command installed. Exit 0 on success.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import httpx


def photo(images: Path, name: str, number: int) -> tuple[str, bytes]:
    return f"{name}.jpg", (images / name / f"{name}_{number:04d}.jpg").read_bytes()


def main(base_url: str, images: Path, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            print(f"quickstart: {base_url}/readyz not ready within {timeout_s:.0f}s")
            return 1
        time.sleep(1)
    ready_after = timeout_s - (deadline - time.monotonic())
    pairs = {
        "same": (("Abel_Pacheco", 1), ("Abel_Pacheco", 4)),
        "different": (("Abel_Pacheco", 1), ("Akhmed_Zakayev", 1)),
    }
    answers = {}
    with httpx.Client(base_url=base_url, timeout=60) as client:
        for kind, (a, b) in pairs.items():
            r = client.post(
                "/v1/verify", files={"image1": photo(images, *a), "image2": photo(images, *b)}
            )
            if r.status_code != 200:
                print(f"quickstart: /v1/verify ({kind}) answered {r.status_code}: {r.text}")
                return 1
            answers[kind] = r.json()
    same, different = answers["same"], answers["different"]
    print(
        f"quickstart: ready after {ready_after:.0f}s on {same['model']}; same person "
        f"{same['similarity']:.3f} match={same['match']}, different people "
        f"{different['similarity']:.3f} match={different['match']} "
        f"(threshold {same['threshold']:.3f} at {same['operating_point']})"
    )
    return 0 if same["match"] is True and different["match"] is False else 1


if __name__ == "__main__":
    timeout = float(sys.argv[3]) if len(sys.argv) > 3 else 600.0
    sys.exit(main(sys.argv[1], Path(sys.argv[2]), timeout))
