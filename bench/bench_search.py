"""Gallery search benchmark: latency, recall@1 and memory of the FAISS index types.

Builds the service's own ``GalleryIndex`` (``service/gallery/index.py``) over
synthetic L2-normalised vectors (two faces per subject) for growing gallery
sizes and, per index type (exact ``flat``, ``ivf``, ``hnsw``), reports:

* build time,
* single-query search latency p50/p99 (top-5 subjects, one query per call, as
  ``/v1/identify`` issues them, with ``--threads`` OpenMP threads), as wall time
  and as the calling thread's CPU time (``cpu_p50_ms``: with one OpenMP thread the
  search runs in that thread, so this figure does not grow when other processes
  compete for the cores),
* recall@1: how often the top face equals the exact nearest neighbour (queries
  are noisy copies of enrolled faces, cosine ~0.7 to their source),
* index bytes per vector (serialised size) and so GiB per million vectors.

``--nprobe 1,8,32,128`` measures the ``ivf`` index once per probe count on the same
built index (``FACEGATE_IVF_NPROBE``; default: the index default): recall@1 against
latency.

It also builds a raw FAISS ``IVF,PQ`` index (``dim / 8``-byte codes) at one size to measure the
memory of a compressed alternative.  Random vectors on the sphere have no cluster
structure, a hard case for IVF and HNSW; ``--real-faces`` measures real faces.

``--real-faces`` measures identity recall@1 on real faces instead: CelebA photos
(``../shared/data/celeba``) are embedded by the service pipeline (YuNet +
``mobilefacenet_peer_128d`` from ``../shared/models``: the quicker of the pipelines
at hand, ~45 vs ~31 photos/s for the default MTCNN + dlib ResNet on this CPU);
the first photo with a face of each identity is enrolled, the gallery is padded
to each size with synthetic distractors (unit vectors drawn from a Gaussian fitted
to the real embeddings, so they lie where faces lie), and every other photo is a
query: recall@1 = the query's own identity is the top subject.  Embeddings are
cached per photo in ``--embed-cache`` (embedding all 4,243 photos took 143 s; a
run with cached embeddings, about a minute).

Usage::

    python bench/bench_search.py --quick
    python bench/bench_search.py --quick --real-faces
    python bench/bench_search.py --real-faces --nprobe 1,8,32,128 --hnsw-max 100000

The headline table of BENCHMARKS.md is split into invocations of under 10 minutes
each on the 2-core VM (estimated from the build times it reports): the default run
(10k and 100k faces, flat and ivf, HNSW at 10k: about a minute), ``--sizes 100000
--kinds hnsw --hnsw-max 100000`` (the HNSW build: 686 s at load average 23-50, about
5 minutes at load 7), ``--sizes 100000 --kinds flat --pq-size 100000`` (IVF-PQ
memory: about 2.5 minutes), ``--sizes 1000000 --kinds flat`` and ``--sizes 1000000
--kinds ivf`` (1M: about 4 and 7.5 minutes at load 23-50, from builds of 61 and 398 s
and 200 exact searches of 0.66 s) and ``--sizes 10000 --threads 1,2`` (OpenMP threads).

The last line of output is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.gallery.index import IVF_NPROBE, IVF_TRAIN_ITERATIONS, GalleryIndex, ivf_lists

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FACEGATE_SHARED", REPO.parent / "shared")).resolve()
EMBED_CACHE = Path.home() / ".cache" / "facegate" / "bench"
QUERY_COSINE = 0.7
ALL_CORES = faiss.omp_get_max_threads()  # before anything lowers it


def unit_vectors(rng: np.random.Generator, n: int, dim: int, chunk: int = 100_000) -> np.ndarray:
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, chunk):
        block = rng.standard_normal((min(chunk, n - start), dim), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[start : start + len(block)] = block
    return out


def noisy_copies(rng: np.random.Generator, vectors: np.ndarray) -> np.ndarray:
    """Unit vectors with cosine ~QUERY_COSINE to ``vectors`` (a re-captured face)."""
    dim = vectors.shape[1]
    sigma = math.sqrt((1 / QUERY_COSINE**2 - 1) / dim)
    noisy = vectors + sigma * rng.standard_normal(vectors.shape, dtype=np.float32)
    return noisy / np.linalg.norm(noisy, axis=1, keepdims=True)


def percentile_ms(samples: list[float], q: float) -> float:
    return round(float(np.percentile(samples, q)) * 1000, 3)


def exact_top1(vectors: np.ndarray, queries: np.ndarray) -> np.ndarray:
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    return index.search(queries, 1)[1][:, 0]


def build(
    kind: str, vectors: np.ndarray, subjects: list[str], target_recall: float = 0.0
) -> tuple[GalleryIndex, float]:
    """The service's index over ``vectors`` (face ids 0..n-1), and its build seconds;
    with ``target_recall`` an ivf index's probe count is tuned for it (part of the build)."""
    n, dim = vectors.shape
    ids = np.arange(n, dtype=np.int64)
    faiss.omp_set_num_threads(ALL_CORES)  # build with every core
    start = time.perf_counter()
    tuned = kind == "ivf" and target_recall > 0
    index = GalleryIndex(
        dim,
        "bench",
        kind,
        nprobe=0 if tuned else IVF_NPROBE,
        target_recall=target_recall if tuned else 0.0,
    )
    for lo in range(0, n, 100_000):
        index.add(ids[lo : lo + 100_000], subjects[lo : lo + 100_000], vectors[lo : lo + 100_000])
    if kind == "ivf" and index._trained_at == 0:
        index.train()  # smaller than IVF_MIN_TRAIN: force IVF so it is measured
    return index, time.perf_counter() - start


def snapshot_seconds(index: GalleryIndex, folder: Path) -> dict:
    """Seconds to write the index's snapshot and to load (and check) it again."""
    folder.mkdir(parents=True, exist_ok=True)
    prefix = folder / f"bench-{index.kind}"
    start = time.perf_counter()
    index.save(prefix, seq=1, gallery="bench")
    saved = time.perf_counter()
    GalleryIndex.load(
        prefix, index.kind, nprobe=index.nprobe or IVF_NPROBE, target_recall=index.target_recall
    )
    loaded = time.perf_counter()
    for suffix in (".faiss", ".json"):
        prefix.with_suffix(suffix).unlink()
    return {"snapshot_save_s": round(saved - start, 2), "snapshot_load_s": round(loaded - saved, 2)}


def settings_of(
    index: GalleryIndex, nprobes: list[int], efs: list[int] | None = None
) -> list[int | None]:
    """Search breadths to measure: the ``--nprobe`` list for an ivf index, ``--ef-search``
    for hnsw, else one pass."""
    if index.kind == "hnsw":
        return list(efs) if efs else [None]
    if index.kind != "ivf" or index.target_recall:
        return [None]  # not ivf, or its probe count was tuned when it was trained
    return nprobes or [IVF_NPROBE]


def apply_setting(index: GalleryIndex, value: int | None) -> None:
    """Set the search breadth measured next: ivf probes, or hnsw efSearch."""
    if value is None:
        return
    if index.kind == "hnsw":
        index.ef_search = value
    else:
        index.nprobe = value


def timed_searches(index: GalleryIndex, queries: np.ndarray):
    """One top-5 search per query: (wall seconds, thread CPU seconds, top hit or None)."""
    for query in queries[:5]:
        index.search(query[None], 5)  # warm-up
    latencies, cpu, top = [], [], []
    for query in queries:
        t0, c0 = time.perf_counter(), time.thread_time()
        hits = index.search(query[None], 5)[0]
        cpu.append(time.thread_time() - c0)
        latencies.append(time.perf_counter() - t0)
        top.append(hits[0] if hits else None)
    return latencies, cpu, top


def row_of(
    index: GalleryIndex, build_s: float, threads: int, latencies, cpu, recall: float
) -> dict:
    n = len(index)
    size = index.serialized_bytes()
    return {
        "kind": index.kind,
        "size": n,
        "threads": threads,
        "build_s": round(build_s, 2),
        "p50_ms": percentile_ms(latencies, 50),
        "p99_ms": percentile_ms(latencies, 99),
        "cpu_p50_ms": percentile_ms(cpu, 50),
        "cpu_p99_ms": percentile_ms(cpu, 99),
        "recall_at_1": round(recall, 4),
        "bytes_per_vector": round(size / n, 1),
        "gib_per_million": round(size / n * 1e6 / 2**30, 3),
        "params": _params(index),
    }


def bench_kind(
    kind: str,
    vectors: np.ndarray,
    queries: np.ndarray,
    truth: np.ndarray,
    threads: list[int],
    nprobes: list[int] | None = None,
    target_recall: float = 0.0,
    snapshot_dir: Path | None = None,
    efs: list[int] | None = None,
) -> list[dict]:
    """Build one index, then measure its searches once per OpenMP thread count (and,
    for ivf, per probe count)."""
    index, build_s = build(
        kind, vectors, [f"s{i // 2}" for i in range(len(vectors))], target_recall
    )
    snapshot = snapshot_seconds(index, snapshot_dir) if snapshot_dir else {}
    rows = []
    for count in threads:
        faiss.omp_set_num_threads(count)
        for nprobe in settings_of(index, nprobes or [], efs):
            apply_setting(index, nprobe)
            latencies, cpu, top = timed_searches(index, queries)
            found = np.array([-1 if hit is None else hit["face_id"] for hit in top])
            rows.append(
                {
                    **row_of(index, build_s, count, latencies, cpu, float(np.mean(found == truth))),
                    **snapshot,
                }
            )
    return rows


def _params(index: GalleryIndex) -> dict:
    from service.gallery import index as module

    if index.kind == "ivf":
        assert index._ivf is not None
        params = {
            "nlist": int(index._ivf.nlist),
            "nprobe": min(index.nprobe, int(index._ivf.nlist)),
        }
        if index.tuned_recall is not None:
            params.update(
                target_recall=index.target_recall, tuned_recall=round(index.tuned_recall, 4)
            )
        return params
    if index.kind == "hnsw":
        return {
            "M": module.HNSW_M,
            "efConstruction": module.HNSW_EF_CONSTRUCTION,
            "efSearch": index.ef_search,
        }
    return {}


# --- real faces ---------------------------------------------------------------------
def celeba_photos(root: Path, identities: int, per_identity: int) -> list[tuple[str, str]]:
    """(relative path, identity) of the first ``identities`` identities (0: all), at most
    ``per_identity`` photos each (0: all), in file order."""
    by_identity: dict[str, list[str]] = {}
    for line in (root / "identities.txt").read_text().splitlines()[1:]:
        path, identity = line.split()
        by_identity.setdefault(identity, []).append(path)
    chosen = sorted(by_identity)[: identities or None]
    return [
        (path, identity)
        for identity in chosen
        for path in sorted(by_identity[identity])[: per_identity or None]
    ]


def embed_photos(
    root: Path,
    paths: list[str],
    detector: str,
    recognizer: str,
    cache: Path,
    models_dirs: list[Path] | None = None,
) -> tuple[np.ndarray, float, int]:
    """Embedding of each photo's primary face (NaN row: no face), through the service
    pipeline; cached per photo in ``cache``.  Returns (embeddings, seconds, newly embedded)."""
    from service.config import MANIFEST_PATH, Settings
    from service.pipeline.pipeline import Pipeline
    from service.registry import Registry

    stored: dict[str, np.ndarray] = {}
    if cache.is_file():
        with np.load(cache) as data:
            stored = dict(zip(data["paths"].tolist(), data["embeddings"], strict=True))
    missing = [p for p in paths if p not in stored]
    start = time.perf_counter()
    if missing:
        settings = Settings(
            detector=detector, recognizer=recognizer, providers=["CPUExecutionProvider"]
        )
        dirs = [*(models_dirs or []), REPO / "models", SHARED / "models"]
        pipeline = Pipeline.from_settings(settings, Registry(MANIFEST_PATH, dirs))
        dim = None
        for path in missing:
            faces = pipeline.analyze(
                (root / "images" / path).read_bytes(), "largest", allow_none=True
            )
            if faces.detections:
                stored[path] = faces.embeddings[0].astype(np.float32)
                dim = len(stored[path])
            else:
                stored[path] = None
        dim = dim or next(len(v) for v in stored.values() if v is not None)
        stored = {
            p: np.full(dim, np.nan, np.float32) if v is None else v for p, v in stored.items()
        }
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp.npz")
        np.savez(tmp, paths=np.array(list(stored)), embeddings=np.stack(list(stored.values())))
        os.replace(tmp, cache)
    return np.stack([stored[p] for p in paths]), time.perf_counter() - start, len(missing)


def concatenated_embeddings(args, root: Path, paths: list[str]) -> tuple[np.ndarray, float, int]:
    """Each photo's embedding by ``--recognizer`` (a comma-separated list: the models'
    L2-normalised embeddings concatenated and scaled to unit length, so the cosine is
    the mean of the models' cosines); NaN rows where a model found no face."""
    parts, seconds, embedded = [], 0.0, 0
    models_dirs = [Path(d).expanduser() for d in args.models_dir.split(",") if d]
    for recognizer in args.recognizer.split(","):
        name = Path(recognizer).stem
        cache = Path(args.embed_cache or EMBED_CACHE / f"celeba-{args.detector}-{name}.npz")
        if "," in args.recognizer and args.embed_cache:
            cache = cache.with_name(f"{cache.stem}-{name}.npz")
        vectors, spent, count = embed_photos(
            root, paths, args.detector, recognizer, cache, models_dirs
        )
        parts.append(vectors / np.linalg.norm(vectors, axis=1, keepdims=True))
        seconds, embedded = seconds + spent, embedded + count
    joined = np.concatenate(parts, axis=1) / np.sqrt(len(parts))
    return joined.astype(np.float32), seconds, embedded


def fitted_distractors(rng: np.random.Generator, real: np.ndarray, n: int) -> np.ndarray:
    """``n`` unit vectors from a Gaussian with the mean and covariance of ``real``."""
    mean = real.mean(axis=0)
    cov = np.cov(real, rowvar=False) + 1e-6 * np.eye(real.shape[1])
    chol = np.linalg.cholesky(cov)
    out = np.empty((n, real.shape[1]), dtype=np.float32)
    for lo in range(0, n, 100_000):
        z = rng.standard_normal((min(100_000, n - lo), real.shape[1]))
        block = (mean + z @ chol.T).astype(np.float32)
        out[lo : lo + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


@dataclass
class CelebaSplit:
    """CelebA photos embedded by ``--recognizer``: the first photo with a face of each
    identity enrolled, every other photo with a face a query."""

    photos: list[tuple[str, str]]
    found: np.ndarray  # per photo: a face was found
    real: np.ndarray  # the embeddings of the photos with a face
    gallery: np.ndarray  # one enrolled face per identity
    names: list[str]  # their identities
    queries: np.ndarray
    query_ids: np.ndarray
    embed_s: float
    embedded: int


def celeba_split(args) -> CelebaSplit:
    root = Path(args.celeba)
    photos = celeba_photos(root, args.identities, args.photos_per_identity)
    embeddings, embed_s, embedded = concatenated_embeddings(args, root, [p for p, _ in photos])
    found = ~np.isnan(embeddings).any(axis=1)
    enrolled, queries, query_ids = {}, [], []
    for (_path, identity), vector, ok in zip(photos, embeddings, found, strict=True):
        if not ok:
            continue
        if identity not in enrolled:
            enrolled[identity] = vector  # the identity's first photo with a face
        else:
            queries.append(vector)
            query_ids.append(identity)
    return CelebaSplit(
        photos,
        found,
        embeddings[found],
        np.stack(list(enrolled.values())),
        list(enrolled),
        np.stack(queries),
        np.array(query_ids),
        embed_s,
        embedded,
    )


def real_faces(
    args, sizes: list[int], kinds: list[str], threads: list[int], nprobes: list[int]
) -> dict:
    split = celeba_split(args)
    photos, found, real, names = split.photos, split.found, split.real, split.names
    gallery, queries, query_ids = split.gallery, split.queries, split.query_ids
    embed_s, embedded = split.embed_s, split.embedded
    print(
        f"{len(photos)} photos of {len({i for _, i in photos})} identities "
        f"({embedded} embedded in {embed_s:.1f}s, {int((~found).sum())} without a face): "
        f"{len(names)} enrolled, {len(queries)} queries",
        flush=True,
    )
    rng = np.random.default_rng(args.seed)
    distractors = fitted_distractors(rng, real, max(sizes) - len(names))
    # Distractors should score against a query like other people's faces do.
    own = np.array([names.index(i) for i in query_ids])
    impostor = np.delete((queries @ gallery.T).ravel(), np.arange(len(queries)) * len(names) + own)
    fake = (queries @ distractors[: len(names)].T).ravel()
    check = {
        "real_impostor_mean": round(float(impostor.mean()), 3),
        "real_impostor_p99": round(float(np.percentile(impostor, 99)), 3),
        "distractor_mean": round(float(fake.mean()), 3),
        "distractor_p99": round(float(np.percentile(fake, 99)), 3),
    }
    print(f"query cosine to other enrolled people vs to as many distractors: {check}", flush=True)
    results = []
    for size in [len(names), *sizes]:
        vectors = np.concatenate([gallery, distractors[: size - len(names)]])
        subjects = names + [f"distractor{i}" for i in range(size - len(names))]
        for kind in ["flat"] if size == len(names) else kinds:
            if kind == "hnsw" and size > args.hnsw_max:
                continue
            index, build_s = build(kind, vectors, subjects, args.target_recall)
            snapshot = snapshot_seconds(index, Path(args.snapshot_dir)) if args.snapshot_dir else {}
            for count in threads:
                faiss.omp_set_num_threads(count)
                for nprobe in settings_of(index, nprobes, args.efs):
                    apply_setting(index, nprobe)
                    latencies, cpu, top = timed_searches(index, queries)
                    hit = np.array([t is not None and t["subject_id"] for t in top]) == query_ids
                    row = row_of(index, build_s, count, latencies, cpu, float(np.mean(hit)))
                    row.update(snapshot)
                    results.append(row)
                    print(
                        f"{kind:>6} n={size:>8} {row['params']}: build {row['build_s']:7.2f}s"
                        f"  cpu p50 {row['cpu_p50_ms']:7.3f} ms  identity recall@1 "
                        f"{row['recall_at_1']:.4f}",
                        flush=True,
                    )
    return {
        "benchmark": "gallery_search_real_faces",
        "load_average": [round(x, 1) for x in os.getloadavg()],
        "detector": args.detector,
        "recognizer": args.recognizer,
        "dim": int(gallery.shape[1]),
        "photos": len(photos),
        "photos_without_face": int((~found).sum()),
        "identities": len(names),
        "queries": len(queries),
        "embed_s": round(embed_s, 1),
        "embedded_now": embedded,
        "distractors": "unit vectors from a Gaussian fitted to the real embeddings",
        "distractor_check": check,
        "search_threads": threads,
        "faiss": faiss.__version__,
        "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "results": results,
    }


def bench_ivfpq(
    vectors: np.ndarray, queries: np.ndarray, truth: np.ndarray, threads: int, bits: int = 8
) -> dict:
    """A compressed alternative (not a service option): IVF + product-quantised codes of
    ``dim / 8`` bytes (64 bytes for 512-d)."""
    n, dim = vectors.shape
    nlist, code_bytes = ivf_lists(n), dim // 8
    faiss.omp_set_num_threads(ALL_CORES)
    start = time.perf_counter()
    # "np": no polysemous training (its codebook reordering only serves Hamming
    # filtering, which this search does not use; it was 80% of the build time).
    index = faiss.index_factory(
        dim, f"IVF{nlist},PQ{code_bytes}x{bits}np", faiss.METRIC_INNER_PRODUCT
    )
    index.cp.niter = IVF_TRAIN_ITERATIONS
    index.train(vectors[: max(64 * nlist, 256 * 40)])
    index.add_with_ids(vectors, np.arange(n, dtype=np.int64))
    build_s = time.perf_counter() - start
    faiss.omp_set_num_threads(threads)
    params = faiss.SearchParametersIVF(nprobe=32)
    latencies, cpu, top1 = [], [], []
    for query in queries:
        t0, c0 = time.perf_counter(), time.thread_time()
        top1.append(int(index.search(query[None], 1, params=params)[1][0, 0]))
        cpu.append(time.thread_time() - c0)
        latencies.append(time.perf_counter() - t0)
    size = faiss.serialize_index(index).nbytes
    return {
        "kind": "ivfpq",
        "size": n,
        "build_s": round(build_s, 2),
        "p50_ms": percentile_ms(latencies, 50),
        "p99_ms": percentile_ms(latencies, 99),
        "cpu_p50_ms": percentile_ms(cpu, 50),
        "cpu_p99_ms": percentile_ms(cpu, 99),
        "recall_at_1": round(float(np.mean(np.array(top1) == truth)), 4),
        "bytes_per_vector": round(size / n, 1),
        "gib_per_million": round(size / n * 1e6 / 2**30, 3),
        "threads": threads,
        "params": {"nlist": nlist, "nprobe": 32, "subquantizers": code_bytes, "bits": bits},
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, 64-d, for tests")
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--kinds", default="flat,ivf,hnsw")
    parser.add_argument(
        "--hnsw-max",
        type=int,
        default=10_000,
        help="largest gallery to build an HNSW graph for (slow to build)",
    )
    parser.add_argument(
        "--pq-size", type=int, default=0, help="gallery size for the IVF-PQ memory figure (0: skip)"
    )
    parser.add_argument("--pq-bits", type=int, default=8, help="bits per PQ sub-code")
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument(
        "--threads", default="1", help="OpenMP threads while searching; a list (1,2) measures each"
    )
    parser.add_argument(
        "--nprobe",
        default="",
        help="ivf: probe counts to measure on each built index, e.g. 1,8,32,128 "
        f"(default: the index default, {IVF_NPROBE})",
    )
    parser.add_argument(
        "--target-recall",
        type=float,
        default=0.0,
        help="ivf: tune the probe count for this recall on the gallery's own "
        "vectors when it is trained (FACEGATE_IVF_NPROBE=0), instead of "
        "--nprobe",
    )
    parser.add_argument(
        "--ef-search",
        default="",
        help="hnsw: efSearch values to measure on each built graph, e.g. "
        "128,256,512 (default: the index default)",
    )
    parser.add_argument(
        "--snapshot-dir",
        default="",
        help="also time writing and loading each index's snapshot here",
    )
    parser.add_argument("--seed", type=int, default=0)
    real = parser.add_argument_group("real faces (--real-faces)")
    real.add_argument(
        "--real-faces",
        action="store_true",
        help="identity recall@1 of CelebA photos in a gallery padded with "
        "distractors, instead of synthetic vectors",
    )
    real.add_argument("--celeba", default=str(SHARED / "data" / "celeba"))
    real.add_argument("--identities", type=int, default=0, help="first N identities (0: all)")
    real.add_argument("--photos-per-identity", type=int, default=0, help="at most N (0: all)")
    real.add_argument("--detector", default="yunet_2023mar")
    real.add_argument(
        "--recognizer",
        default="mobilefacenet_peer_128d",
        help="a model, or a comma-separated list whose embeddings are concatenated "
        "(e.g. four 128-d models for real 512-d embeddings)",
    )
    real.add_argument(
        "--models-dir",
        default=os.environ.get("FACEGATE_MODELS_DIR", ""),
        help="extra model folders (comma-separated) besides models/ and ../shared/models",
    )
    real.add_argument(
        "--embed-cache", default="", help=f"embedding cache file (default under {EMBED_CACHE})"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.queries, args.pq_size, args.hnsw_max = "1000,4000", 40, 4000, 4000
        args.dim, args.pq_bits = 64, 4
        args.identities, args.photos_per_identity = 20, 4

    sizes = sorted(int(s) for s in args.sizes.split(","))
    kinds = [k for k in args.kinds.split(",") if k]
    threads = [int(t) for t in args.threads.split(",")]
    nprobes = [int(p) for p in args.nprobe.split(",") if p]
    args.efs = [int(e) for e in args.ef_search.split(",") if e]
    if any(p < 1 for p in nprobes):
        parser.error("--nprobe values must be at least 1")
    if args.real_faces:
        report = real_faces(args, sizes, kinds, threads, nprobes)
        print(json.dumps(report))
        return report
    rng = np.random.default_rng(args.seed)
    vectors = unit_vectors(rng, sizes[-1], args.dim)
    sources = rng.choice(sizes[0], args.queries, replace=False)
    queries = noisy_copies(rng, vectors[sources])

    results = []
    for size in sizes:
        faiss.omp_set_num_threads(ALL_CORES)
        truth = exact_top1(vectors[:size], queries)
        for kind in kinds:
            if kind == "hnsw" and size > args.hnsw_max:
                continue
            for row in bench_kind(
                kind,
                vectors[:size],
                queries,
                truth,
                threads,
                nprobes,
                args.target_recall,
                Path(args.snapshot_dir) if args.snapshot_dir else None,
                args.efs,
            ):
                results.append(row)
                print(
                    f"{kind:>6} n={size:>8} threads={row['threads']} {row['params']}: "
                    f"build {row['build_s']:8.2f}s"
                    f"  p50 {row['p50_ms']:8.3f} ms  p99 {row['p99_ms']:8.3f} ms"
                    f"  cpu p50 {row['cpu_p50_ms']:8.3f} ms  recall@1 {row['recall_at_1']:.4f}"
                    f"  {row['bytes_per_vector']:7.1f} B/vec",
                    flush=True,
                )
        if args.pq_size and size == min(sizes, key=lambda s: abs(s - args.pq_size)):
            row = bench_ivfpq(vectors[:size], queries, truth, threads[0], args.pq_bits)
            results.append(row)
            print(
                f" ivfpq n={size:>8}: build {row['build_s']:8.2f}s  p50 {row['p50_ms']:8.3f} ms"
                f"  recall@1 {row['recall_at_1']:.4f}  {row['bytes_per_vector']:7.1f} B/vec",
                flush=True,
            )

    memory = {}
    for row in results:  # per kind, measured at its largest size
        memory[row["kind"]] = {
            "gib_per_million": row["gib_per_million"],
            "measured_at": row["size"],
        }
    report = {
        "benchmark": "gallery_search",
        "load_average": [round(x, 1) for x in os.getloadavg()],
        "dim": args.dim,
        "queries": args.queries,
        "search_threads": threads,
        "faiss": faiss.__version__,
        "machine": platform.machine(),
        "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "results": results,
        "memory_per_million": memory,
    }
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
