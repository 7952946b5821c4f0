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

It also builds a raw FAISS ``IVF,PQ`` index (``dim / 8``-byte codes) at one size to measure the memory
of a compressed alternative.  Random vectors on the sphere have no cluster
structure, which makes them a hard case for IVF and HNSW: real face
embeddings cluster by identity and usually reach higher recall.

Usage::

    python bench/bench_search.py --quick
    python bench/bench_search.py --sizes 10000,100000,1000000 --hnsw-max 100000

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
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.gallery.index import IVF_TRAIN_ITERATIONS, GalleryIndex, ivf_lists

QUERY_COSINE = 0.7
ALL_CORES = faiss.omp_get_max_threads()  # before anything lowers it


def unit_vectors(rng: np.random.Generator, n: int, dim: int, chunk: int = 100_000) -> np.ndarray:
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, chunk):
        block = rng.standard_normal((min(chunk, n - start), dim), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[start:start + len(block)] = block
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


def bench_kind(kind: str, vectors: np.ndarray, queries: np.ndarray, truth: np.ndarray,
               threads: list[int]) -> list[dict]:
    """Build one index, then measure its searches once per OpenMP thread count."""
    n, dim = vectors.shape
    ids = np.arange(n, dtype=np.int64)
    subjects = [f"s{i // 2}" for i in range(n)]
    faiss.omp_set_num_threads(ALL_CORES)  # build with every core
    start = time.perf_counter()
    index = GalleryIndex(dim, "bench", kind)
    for lo in range(0, n, 100_000):
        index.add(ids[lo:lo + 100_000], subjects[lo:lo + 100_000], vectors[lo:lo + 100_000])
    if kind == "ivf" and index._trained_at == 0:
        index.train()  # smaller than IVF_MIN_TRAIN: force IVF so it is measured
    build_s = time.perf_counter() - start
    size = faiss.serialize_index(index._index).nbytes

    rows = []
    for count in threads:
        faiss.omp_set_num_threads(count)
        for query in queries[:5]:
            index.search(query[None], 5)  # warm-up
        latencies, cpu, top1 = [], [], []
        for query in queries:
            t0, c0 = time.perf_counter(), time.thread_time()
            hits = index.search(query[None], 5)[0]
            cpu.append(time.thread_time() - c0)
            latencies.append(time.perf_counter() - t0)
            top1.append(hits[0]["face_id"] if hits else -1)
        rows.append({
            "kind": kind, "size": n, "threads": count, "build_s": round(build_s, 2),
            "p50_ms": percentile_ms(latencies, 50), "p99_ms": percentile_ms(latencies, 99),
            "cpu_p50_ms": percentile_ms(cpu, 50), "cpu_p99_ms": percentile_ms(cpu, 99),
            "recall_at_1": round(float(np.mean(np.array(top1) == truth)), 4),
            "bytes_per_vector": round(size / n, 1),
            "gib_per_million": round(size / n * 1e6 / 2**30, 3),
            "params": _params(index),
        })
    return rows


def _params(index: GalleryIndex) -> dict:
    from service.gallery import index as module

    if index.kind == "ivf":
        return {"nlist": int(index._index.nlist), "nprobe": module.IVF_NPROBE}
    if index.kind == "hnsw":
        return {"M": module.HNSW_M, "efConstruction": module.HNSW_EF_CONSTRUCTION,
                "efSearch": module.HNSW_EF_SEARCH}
    return {}


def bench_ivfpq(vectors: np.ndarray, queries: np.ndarray, truth: np.ndarray, threads: int,
                bits: int = 8) -> dict:
    """A compressed alternative (not a service option): IVF + product-quantised codes of
    ``dim / 8`` bytes (64 bytes for 512-d)."""
    n, dim = vectors.shape
    nlist, code_bytes = ivf_lists(n), dim // 8
    faiss.omp_set_num_threads(ALL_CORES)
    start = time.perf_counter()
    index = faiss.index_factory(dim, f"IVF{nlist},PQ{code_bytes}x{bits}",
                                faiss.METRIC_INNER_PRODUCT)
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
        "kind": "ivfpq", "size": n, "build_s": round(build_s, 2),
        "p50_ms": percentile_ms(latencies, 50), "p99_ms": percentile_ms(latencies, 99),
        "cpu_p50_ms": percentile_ms(cpu, 50), "cpu_p99_ms": percentile_ms(cpu, 99),
        "recall_at_1": round(float(np.mean(np.array(top1) == truth)), 4),
        "bytes_per_vector": round(size / n, 1),
        "gib_per_million": round(size / n * 1e6 / 2**30, 3),
        "threads": threads, "params": {"nlist": nlist, "nprobe": 32,
                                       "subquantizers": code_bytes, "bits": bits},
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, 64-d, for tests")
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--kinds", default="flat,ivf,hnsw")
    parser.add_argument("--hnsw-max", type=int, default=100_000,
                        help="largest gallery to build an HNSW graph for (slow to build)")
    parser.add_argument("--pq-size", type=int, default=100_000,
                        help="gallery size for the IVF-PQ memory figure (0: skip)")
    parser.add_argument("--pq-bits", type=int, default=8, help="bits per PQ sub-code")
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--threads", default="1",
                        help="OpenMP threads while searching; a list (1,2) measures each")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.queries, args.pq_size, args.hnsw_max = "1000,4000", 40, 4000, 4000
        args.dim, args.pq_bits = 64, 4

    sizes = sorted(int(s) for s in args.sizes.split(","))
    kinds = [k for k in args.kinds.split(",") if k]
    threads = [int(t) for t in args.threads.split(",")]
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
            for row in bench_kind(kind, vectors[:size], queries, truth, threads):
                results.append(row)
                print(f"{kind:>6} n={size:>8} threads={row['threads']}: build {row['build_s']:8.2f}s"
                      f"  p50 {row['p50_ms']:8.3f} ms  p99 {row['p99_ms']:8.3f} ms"
                      f"  cpu p50 {row['cpu_p50_ms']:8.3f} ms  recall@1 {row['recall_at_1']:.4f}"
                      f"  {row['bytes_per_vector']:7.1f} B/vec", flush=True)
        if args.pq_size and size == min(sizes, key=lambda s: abs(s - args.pq_size)):
            row = bench_ivfpq(vectors[:size], queries, truth, threads[0], args.pq_bits)
            results.append(row)
            print(f" ivfpq n={size:>8}: build {row['build_s']:8.2f}s  p50 {row['p50_ms']:8.3f} ms"
                  f"  recall@1 {row['recall_at_1']:.4f}  {row['bytes_per_vector']:7.1f} B/vec",
                  flush=True)

    memory = {}
    for row in results:  # per kind, measured at its largest size
        memory[row["kind"]] = {"gib_per_million": row["gib_per_million"],
                               "measured_at": row["size"]}
    report = {
        "benchmark": "gallery_search",
        "load_average": [round(x, 1) for x in os.getloadavg()],
        "dim": args.dim, "queries": args.queries, "search_threads": threads,
        "faiss": faiss.__version__, "machine": platform.machine(),
        "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "results": results, "memory_per_million": memory,
    }
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
