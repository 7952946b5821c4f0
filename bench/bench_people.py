"""People discovery benchmark: cluster real photo sets through the service, against a
tuned DBSCAN baseline in the same run.

For each data set (``--sets``: the shared CelebA, 200 people in 4,243 in-the-wild photos;
the shared LFW images, 7,701 photos), starts the service (real uvicorn on 127.0.0.1,
SQLite store in a temporary directory, YuNet + ``mobilefacenet_peer_128d`` from
``../shared/models``), posts every photo to ``POST /v1/galleries/{g}/photos`` (every face
is stored), runs ``POST .../clusters/run`` and reads ``GET .../clusters``.  Each photo's
identity labels its **main** (largest) face; the other faces of a photo take part in
clustering but not in the scores.  Reported on the labelled faces (a face in no cluster
counts as a cluster of its own):

* BCubed precision, recall and F1, pairwise precision, recall and F1;
* clusters listed against people, outliers, and the time of the clustering request;

and the same for a **DBSCAN baseline in the style of Immich's** (a face is a core point with
``min_samples`` neighbours within a cosine threshold; scikit-learn's DBSCAN) over the same
faces (those the service's quality gate lets into clustering, read from the store), tuned
honestly **with the labels** over a grid: thresholds at false-match rates 1e-4 down to 1e-6
of the set's own impostor pairs (labelled main faces of different people), and 2-6
neighbours; its best F1 among the settings with BCubed precision >= 0.95 is the baseline.
DBSCAN at the card's ``fmr_1e-3`` threshold is shown too (it chains).  The service's
algorithm gets no labels.

``--scale 100000`` also times clustering that many faces: the real CelebA embeddings
padded with distractors drawn from a Gaussian fitted to them, as ``bench_search.py
--real-faces`` does, each face its own photo; first the algorithm alone
(:func:`service.gallery.clustering.cluster` with the card-derived parameters), then the
whole use case on a SQLite store filled with those faces (``run_clustering``: read every
face, cluster, write every assignment in one transaction), as ``POST .../clusters/run``
and ``facegate people cluster`` run it.

    python bench/bench_people.py --sets celeba,lfw --scale 100000

The last line of output is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_search import fitted_distractors  # noqa: E402

from service.config import MANIFEST_PATH, Settings  # noqa: E402
from service.gallery.backends import open_store  # noqa: E402
from service.gallery.clustering import cluster, params_from_card  # noqa: E402
from service.registry import Registry  # noqa: E402
from tests.conftest import CELEBA, LFW, SHARED_MODELS  # noqa: E402
from tests.support.service import InProcessServer  # noqa: E402

GRID_FMR = (1e-4, 3e-5, 1e-5, 3e-6, 1e-6)
GRID_NEIGHBOURS = (2, 3, 4, 5, 6)
MIN_PRECISION = 0.95


def photo_set(name: str, limit: int) -> list[tuple[Path, str]]:
    if name == "celeba":
        rows = [line.split() for line in (CELEBA / "identities.txt").read_text().splitlines()[1:]]
        items = [(CELEBA / "images" / path, identity) for path, identity in rows]
    elif name == "lfw":
        items = [(p, p.parent.name) for p in sorted((LFW / "images").glob("*/*.jpg"))]
    else:
        raise SystemExit(f"unknown set {name!r}")
    return items[: limit or None]


def bcubed(labels: np.ndarray, truth: np.ndarray) -> tuple[float, float, float]:
    """BCubed precision, recall, F1; label -1: a cluster of its own."""
    labels = labels.astype(np.int64).copy()
    alone = labels < 0
    labels[alone] = labels.max(initial=0) + 1 + np.arange(alone.sum())
    both = Counter(zip(labels.tolist(), truth.tolist(), strict=True))
    sizes, people = Counter(labels.tolist()), Counter(truth.tolist())
    p = float(np.mean([both[(a, b)] / sizes[a] for a, b in zip(labels, truth, strict=True)]))
    r = float(np.mean([both[(a, b)] / people[b] for a, b in zip(labels, truth, strict=True)]))
    return p, r, 2 * p * r / (p + r)


def pairwise(labels: np.ndarray, truth: np.ndarray) -> tuple[float, float, float]:
    """Precision, recall, F1 over pairs of faces put together / of one person."""
    labels = labels.astype(np.int64).copy()
    alone = labels < 0
    labels[alone] = labels.max(initial=0) + 1 + np.arange(alone.sum())

    def pairs(counts) -> int:
        return sum(c * (c - 1) // 2 for c in counts)

    both = pairs(Counter(zip(labels.tolist(), truth.tolist(), strict=True)).values())
    predicted = pairs(Counter(labels.tolist()).values())
    actual = pairs(Counter(truth.tolist()).values())
    p = both / predicted if predicted else 1.0
    r = both / actual if actual else 1.0
    return p, r, (2 * p * r / (p + r)) if p + r else 0.0


def scores(labels: np.ndarray, truth: np.ndarray) -> dict:
    bp, br, bf = bcubed(labels, truth)
    pp, pr, pf = pairwise(labels, truth)
    return {
        "bcubed_precision": round(bp, 4),
        "bcubed_recall": round(br, 4),
        "bcubed_f1": round(bf, 4),
        "pairwise_precision": round(pp, 4),
        "pairwise_recall": round(pr, 4),
        "pairwise_f1": round(pf, 4),
        "clusters": int(len(set(labels[labels >= 0].tolist()))),
        "outliers": int((labels < 0).sum()),
    }


def impostor_thresholds(vectors: np.ndarray, truth: np.ndarray) -> dict[float, float]:
    """Cosine at each of GRID_FMR over every pair of faces of different people."""
    _, ids = np.unique(truth, return_inverse=True)
    parts = []
    for lo in range(0, len(vectors), 1000):
        sims = vectors[lo : lo + 1000] @ vectors.T
        rows = np.arange(lo, lo + len(sims))[:, None]
        upper = rows < np.arange(len(vectors))[None, :]
        parts.append(sims[upper & (ids[lo : lo + 1000, None] != ids[None, :])])
    impostors = np.concatenate(parts)
    return {f: float(np.quantile(impostors, 1.0 - f)) for f in GRID_FMR}


def dbscan(vectors: np.ndarray, threshold: float, neighbours: int) -> np.ndarray:
    from sklearn.cluster import DBSCAN

    eps = max(1.0 - threshold, 1e-6)
    return DBSCAN(eps=eps, min_samples=neighbours, metric="cosine").fit(vectors).labels_


async def post_photos(base_url: str, gallery: str, photos, clients: int) -> tuple[dict, int]:
    """Post every photo; (main face id -> identity, faces stored)."""
    main: dict[int, str] = {}
    stored = 0
    todo = iter(photos)
    async with httpx.AsyncClient(base_url=base_url, timeout=300) as client:

        async def worker() -> None:
            nonlocal stored
            for path, identity in todo:
                r = await client.post(
                    f"/v1/galleries/{gallery}/photos", files={"image": ("p.jpg", path.read_bytes())}
                )
                r.raise_for_status()
                faces = r.json()["faces"]
                stored += len(faces)
                if faces:
                    best = max(faces, key=lambda f: f["quality"]["face_size_px"])
                    main[best["face_id"]] = identity

        await asyncio.gather(*(worker() for _ in range(clients)))
    return main, stored


def run_set(name: str, args, settings_for) -> dict:
    photos = photo_set(name, args.limit)
    with tempfile.TemporaryDirectory(prefix="facegate-bench-people-") as tmp:
        settings = settings_for(Path(tmp))
        server = InProcessServer(settings).start()
        try:
            base = server.base_url
            httpx.put(f"{base}/v1/galleries/{name}", timeout=60).raise_for_status()
            began = time.perf_counter()
            main, stored = asyncio.run(post_photos(base, name, photos, args.clients))
            ingest_s = time.perf_counter() - began
            began = time.perf_counter()
            r = httpx.post(f"{base}/v1/galleries/{name}/clusters/run", timeout=3600)
            r.raise_for_status()
            run = r.json()
            cluster_s = time.perf_counter() - began
            listed, cursor = [], None
            while True:
                params = {"limit": 1000, **({"cursor": cursor} if cursor else {})}
                page = httpx.get(f"{base}/v1/galleries/{name}/clusters", params=params).json()
                listed += page["clusters"]
                cursor = page["next_cursor"]
                if cursor is None:
                    break
        finally:
            server.stop()
        store = open_store(settings.resolved_store_url)
        try:
            faces = store.people_faces(name)
        finally:
            store.close()
    of_face = {f: k for k, c in enumerate(listed) for f in c["face_ids"]}
    labelled = sorted(main)
    truth = np.array([main[f] for f in labelled])
    ours = np.array([of_face.get(f, -1) for f in labelled])
    result = {
        "set": name,
        "photos": len(photos),
        "faces": stored,
        "labelled_faces": len(labelled),
        "people": int(len(set(truth.tolist()))),
        "ingest_s": round(ingest_s, 1),
        "photos_per_s": round(len(photos) / ingest_s, 1),
        "cluster_request_s": round(cluster_s, 2),
        "clusters_listed": len(listed),
        "run": run,
        "ours": scores(ours, truth),
    }
    print(f"{name}: ours {result['ours']} in {cluster_s:.2f} s", flush=True)

    # the baseline: DBSCAN over the same faces (those the gate admits), tuned with labels
    position = {int(f): k for k, f in enumerate(faces.face_ids)}
    gate = faces.clusterable
    pool = np.flatnonzero(gate)
    vectors = faces.embeddings[pool]
    at = {int(faces.face_ids[k]): j for j, k in enumerate(pool)}
    rows = [at.get(f, -1) for f in labelled]
    main_vectors = faces.embeddings[[position[f] for f in labelled]]
    thresholds = impostor_thresholds(main_vectors, truth)
    grid = []
    for fmr, threshold in thresholds.items():
        for k in GRID_NEIGHBOURS:
            began = time.perf_counter()
            found = dbscan(vectors, threshold, k)
            labels = np.array([found[j] if j >= 0 else -1 for j in rows])
            row = {
                "fmr": fmr,
                "threshold": round(threshold, 4),
                "neighbours": k,
                "seconds": round(time.perf_counter() - began, 2),
                **scores(labels, truth),
            }
            grid.append(row)
            print(f"{name}: dbscan {row}", flush=True)
    eligible = [g for g in grid if g["bcubed_precision"] >= MIN_PRECISION]
    result["baseline"] = max(eligible, key=lambda g: g["bcubed_f1"]) if eligible else None
    result["baseline_grid"] = grid
    card_threshold = args.card_thresholds["fmr_1e-3"]
    found = dbscan(vectors, card_threshold, 2)
    result["dbscan_card_fmr_1e-3"] = {
        "threshold": card_threshold,
        "neighbours": 2,
        **scores(np.array([found[j] if j >= 0 else -1 for j in rows]), truth),
    }
    result["real_embeddings"] = faces.embeddings[gate]
    return result


def scale_timing(real: np.ndarray, total: int, args, card) -> dict:
    """The algorithm alone, then the whole clustering use case (read the faces from a
    SQLite store, cluster, write every assignment in one transaction) on ``total`` faces."""
    from service.gallery import GalleryService
    from service.gallery.store import NewPhoto, NewPhotoFace
    from service.usecases import people

    rng = np.random.default_rng(0)
    vectors = np.concatenate([real, fitted_distractors(rng, real, max(total - len(real), 0))])
    vectors = np.ascontiguousarray(vectors[:total], dtype=np.float32)
    params = params_from_card(
        args.card_thresholds, "fmr_1e-2", "fmr_1e-3", args.neighbours, len(vectors)
    )
    began = time.perf_counter()
    labels = cluster(vectors, np.arange(len(vectors)), params)
    seconds = time.perf_counter() - began
    result = {
        "faces": len(vectors),
        "real_faces": len(real),
        "algorithm_s": round(seconds, 1),
        "params": params.to_dict(),
        "clusters": int(len(set(labels[labels >= 0].tolist()))),
        "real_faces_clustered": int((labels[: len(real)] >= 0).sum()),
        "distractors_clustered": int((labels[len(real) :] >= 0).sum()),
    }
    print(f"scale, algorithm: {result}", flush=True)
    with tempfile.TemporaryDirectory(prefix="facegate-bench-people-scale-") as tmp:
        settings = Settings(data_dir=Path(tmp), faiss_gpu=False, people_neighbours=args.neighbours)
        gallery = GalleryService.offline(settings)
        try:
            gallery.create_gallery("scale", card.id, vectors.shape[1])
            store = people.people_store(gallery)
            began = time.perf_counter()
            for lo in range(0, len(vectors), 5000):
                photos = [
                    NewPhoto(
                        f"{k:064x}",
                        100,
                        100,
                        [NewPhotoFace(vectors[k], [0, 0, 50, 50], [[0, 0]] * 5, {}, True)],
                    )
                    for k in range(lo, min(lo + 5000, len(vectors)))
                ]
                store.add_photos("scale", card.id, photos)
            result["store_fill_s"] = round(time.perf_counter() - began, 1)
            began = time.perf_counter()
            run = people.run_clustering(gallery, card, settings, "scale", card.id)
            result["use_case_s"] = round(time.perf_counter() - began, 1)
            result["use_case_clusters"] = run.clusters
        finally:
            gallery.stop()
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default="celeba,lfw")
    parser.add_argument("--limit", type=int, default=0, help="first N photos of each set")
    parser.add_argument("--clients", type=int, default=2, help="concurrent uploading clients")
    parser.add_argument("--scale", type=int, default=0, help="also time this many faces")
    parser.add_argument("--neighbours", type=int, default=16)
    parser.add_argument(
        "--models-dir", default=os.environ.get("FACEGATE_MODELS_DIR", str(SHARED_MODELS))
    )
    parser.add_argument("--detector", default="yunet_2023mar")
    parser.add_argument("--recognizer", default="mobilefacenet_peer_128d")
    args = parser.parse_args(argv)
    card, _ = Registry(MANIFEST_PATH, [Path(args.models_dir)]).resolve(args.recognizer)
    args.card_thresholds = dict(card.thresholds)

    def settings_for(tmp: Path) -> Settings:
        return Settings(
            models_dir=Path(args.models_dir),
            detector=args.detector,
            recognizer=args.recognizer,
            providers=["CPUExecutionProvider"],
            faiss_gpu=False,
            data_dir=tmp / "data",
            people_neighbours=args.neighbours,
            people_max_cluster_faces=10**7,
        )

    report: dict = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "models": f"{args.detector} + {args.recognizer}",
        "sets": [],
    }
    real = None
    for name in args.sets.split(","):
        result = run_set(name, args, settings_for)
        embeddings = result.pop("real_embeddings")
        if real is None or name == "celeba":
            real = embeddings
        report["sets"].append(result)
    if args.scale and real is not None:
        report["scale"] = scale_timing(real, args.scale, args, card)
        print(f"scale: {report['scale']}", flush=True)
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
