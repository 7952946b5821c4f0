"""Bulk enrolment vs one photo per request: faces/s, same process, same photos, same run.

Starts the service (real uvicorn on 127.0.0.1, SQLite store in a temporary directory) and
enrols the first photo of ``--photos`` LFW people, round after round, in four ways, each
into a fresh gallery:

* ``single-1``: ``POST /v1/galleries/{g}/subjects/{id}/faces``, one photo per request, one
  client (subjects created beforehand, outside the timing);
* ``single-4``: the same with 4 concurrent clients;
* ``bulk``: ``POST /v1/galleries/{g}/faces`` with ``--items`` photos per request, one client;
* ``import``: ``facegate gallery import``'s
  :class:`service.usecases.enrol_many.DirectoryImport` in this process on a second store
  (no HTTP), batches of ``--items``.

Prints one line per run and, last, one JSON object with the medians per way.

    python bench/bench_bulk.py --photos 96 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service.config import Settings  # noqa: E402
from service.gallery import GalleryService  # noqa: E402
from service.usecases.enrol_many import DirectoryImport  # noqa: E402
from tests.conftest import LFW, SHARED_MODELS  # noqa: E402
from tests.support.service import InProcessServer  # noqa: E402


def lfw_photos(n: int) -> list[tuple[str, Path]]:
    people = sorted(p for p in (LFW / "images").iterdir() if p.is_dir())
    return [(person.name, min(person.glob("*.jpg"))) for person in people[:n]]


async def single(base_url: str, gallery: str, photos, clients: int) -> float:
    async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:
        for name, _ in photos:
            r = await client.post(f"/v1/galleries/{gallery}/subjects", json={"subject_id": name})
            r.raise_for_status()
        todo = iter(photos)
        enrolled = 0

        async def worker() -> None:
            nonlocal enrolled
            for name, path in todo:
                r = await client.post(
                    f"/v1/galleries/{gallery}/subjects/{name}/faces",
                    files={"image": ("p.jpg", path.read_bytes())},
                )
                enrolled += r.status_code == 201

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return enrolled / (time.perf_counter() - start)


def bulk(base_url: str, gallery: str, photos, items: int) -> float:
    enrolled = 0
    with httpx.Client(base_url=base_url, timeout=300) as client:
        start = time.perf_counter()
        for i in range(0, len(photos), items):
            body = {
                "items": [
                    {"subject_id": name, "image": base64.b64encode(path.read_bytes()).decode()}
                    for name, path in photos[i : i + items]
                ]
            }
            r = client.post(f"/v1/galleries/{gallery}/faces", json=body)
            r.raise_for_status()
            enrolled += r.json()["enrolled"]
        return enrolled / (time.perf_counter() - start)


def directory_import(settings: Settings, pipeline, root: Path, gallery: str, items: int) -> float:
    service = GalleryService.offline(settings)
    try:
        report = DirectoryImport(service, pipeline, settings, root, gallery, items).run()
    finally:
        service.stop()
    return report["enrolled"] / report["seconds"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=96)
    parser.add_argument("--items", type=int, default=32, help="photos per bulk request/batch")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--models-dir", default=os.environ.get("FACEGATE_MODELS_DIR", str(SHARED_MODELS))
    )
    parser.add_argument("--detector", default=os.environ.get("FACEGATE_DETECTOR", "yunet_2023mar"))
    parser.add_argument(
        "--recognizer", default=os.environ.get("FACEGATE_RECOGNIZER", "mobilefacenet_peer_128d")
    )
    args = parser.parse_args(argv)
    photos = lfw_photos(args.photos)
    with tempfile.TemporaryDirectory(prefix="facegate-bench-bulk-") as tmp:
        root = Path(tmp) / "photos"
        for name, path in photos:
            (root / name).mkdir(parents=True)
            (root / name / path.name).symlink_to(path)
        common = {
            "models_dir": args.models_dir,
            "detector": args.detector,
            "recognizer": args.recognizer,
            "providers": ["CPUExecutionProvider"],
            "faiss_gpu": False,
            "bulk_max_items": max(64, args.items),
        }
        server = InProcessServer(Settings(data_dir=Path(tmp) / "served", **common)).start()
        offline = Settings(data_dir=Path(tmp) / "offline", **common)
        pipeline = server.state.pipeline
        rates: dict[str, list[float]] = {"single-1": [], "single-4": [], "bulk": [], "import": []}
        try:
            for r in range(args.rounds):
                runs = {
                    "single-1": lambda r=r: asyncio.run(
                        single(server.base_url, f"s1-{r}", photos, 1)
                    ),
                    "single-4": lambda r=r: asyncio.run(
                        single(server.base_url, f"s4-{r}", photos, 4)
                    ),
                    "bulk": lambda r=r: bulk(server.base_url, f"b-{r}", photos, args.items),
                    "import": lambda r=r: directory_import(
                        offline, pipeline, root, f"i-{r}", args.items
                    ),
                }
                for way, run in runs.items():
                    rate = run()
                    rates[way].append(rate)
                    print(f"round {r} {way}: {rate:.2f} faces/s", flush=True)
        finally:
            server.stop()
    medians = {way: round(statistics.median(values), 2) for way, values in rates.items()}
    base = medians["single-1"]
    print(
        json.dumps(
            {
                "photos": len(photos),
                "items": args.items,
                "rounds": args.rounds,
                "detector": args.detector,
                "recognizer": args.recognizer,
                "median_faces_per_s": medians,
                "ratio_to_single_1": {w: round(v / base, 2) for w, v in medians.items()},
                "load_average": os.getloadavg(),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
