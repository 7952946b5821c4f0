"""Which compressed IVF codes keep identity recall at 1M real faces: raw FAISS, no service.

Explores accelerator candidates for the gallery's ``ivf`` index outside the service (the
service's own index is measured by ``bench_search.py``): per FAISS ``index_factory``
spec (e.g. ``IVF4096,SQ8``, ``IVF4096,PQ128x4fs``, ``PCA128,IVF4096,SQ8``), per probe
count and per short-list depth R, one query at a time on one thread, the short list's
R faces re-ranked by exact inner product (R = 1: the codes' own top face), it reports
the calling thread's CPU ms per query and identity recall@1 against exact search.

The gallery is ``bench_search.py --real-faces``'s: CelebA photos (at most 8 per identity)
embedded by the service pipeline, the first photo of each identity enrolled, the others
queries, padded to ``--size`` with distractors fitted to the real embeddings.  With
several ``--recognizer`` models the embeddings are concatenated (four 128-d models: real
512-d vectors).  ``--metric l2`` builds the codes for L2 distance, which on unit vectors
orders like the inner product (FAISS's 4-bit fast-scan PQ needs it).

    python bench/bench_ann_codes.py --detector mtcnn --recognizer dlib_resnet_v1 \\
        --spec IVF4096,SQ8 --nprobe 64,128,256,512 --rerank 16,64

The last line of output is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_search  # noqa: E402


def gallery(args) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(vectors, subject of each vector, queries, query identities)."""
    split = bench_search.celeba_split(args)
    rng = np.random.default_rng(args.seed)
    distractors = bench_search.fitted_distractors(rng, split.real, args.size - len(split.names))
    vectors = np.ascontiguousarray(np.concatenate([split.gallery, distractors]))
    subjects = np.array(split.names + [""] * len(distractors))
    return vectors, subjects, split.queries, split.query_ids


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1_000_000)
    parser.add_argument("--spec", action="append", required=True, help="repeatable")
    parser.add_argument("--metric", choices=("ip", "l2"), default="ip")
    parser.add_argument("--nprobe", default="256,512")
    parser.add_argument("--rerank", default="1,64", help="short-list depths R")
    parser.add_argument("--train-per-list", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--celeba", default=str(bench_search.SHARED / "data" / "celeba"))
    parser.add_argument("--identities", type=int, default=0, help="first N (0: all)")
    parser.add_argument("--photos-per-identity", type=int, default=8)
    parser.add_argument("--detector", default="mtcnn")
    parser.add_argument("--recognizer", default="dlib_resnet_v1")
    parser.add_argument("--models-dir", default=os.environ.get("FACEGATE_MODELS_DIR", ""))
    parser.add_argument("--embed-cache", default="")
    args = parser.parse_args(argv)

    vectors, subjects, queries, query_ids = gallery(args)
    n, dim = vectors.shape
    exact = faiss.IndexFlatIP(dim)
    exact.add(vectors)
    exact_top = exact.search(queries, 1)[1][:, 0]
    exact_recall = float(np.mean(subjects[exact_top] == query_ids))
    print(f"{n} faces, {dim}-d, {len(queries)} queries: exact recall {exact_recall:.4f}")
    metric = faiss.METRIC_L2 if args.metric == "l2" else faiss.METRIC_INNER_PRODUCT
    rng = np.random.default_rng(args.seed)
    rows = []
    for spec in args.spec:
        faiss.omp_set_num_threads(bench_search.ALL_CORES)
        start = time.perf_counter()
        index = faiss.index_factory(dim, spec, metric)
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.niter = 10
        cap = args.train_per_list * ivf.nlist
        index.train(vectors if n <= cap else vectors[np.sort(rng.choice(n, cap, replace=False))])
        index.add(vectors)
        build_s = time.perf_counter() - start
        size = faiss.serialize_index(index).nbytes
        faiss.omp_set_num_threads(1)
        for nprobe in [int(p) for p in args.nprobe.split(",")]:
            ivf.nprobe = nprobe
            for depth in [int(r) for r in args.rerank.split(",")]:
                cpu, top = [], []
                for query in queries:
                    c0 = time.thread_time()
                    _, found = index.search(query[None], depth)
                    ids = found[0][found[0] >= 0]
                    if depth > 1:  # exact re-rank of the short list
                        ids = ids[np.argsort(-(vectors[ids] @ query), kind="stable")]
                    cpu.append(time.thread_time() - c0)
                    top.append(ids[0] if ids.size else -1)
                hit = subjects[np.array(top)] == query_ids
                row = {
                    "spec": spec,
                    "metric": args.metric,
                    "nprobe": nprobe,
                    "rerank": depth,
                    "build_s": round(build_s, 1),
                    "bytes_per_face": round(size / n, 1),
                    "cpu_p50_ms": round(float(np.median(cpu)) * 1e3, 3),
                    "cpu_p99_ms": round(float(np.percentile(cpu, 99)) * 1e3, 3),
                    "recall_at_1": round(float(np.mean(hit)), 4),
                    "vs_exact_pt": round((float(np.mean(hit)) - exact_recall) * 100, 2),
                    "agreement": round(float(np.mean(np.array(top) == exact_top)), 4),
                }
                rows.append(row)
                print(
                    f"{spec:24s} nprobe {nprobe:5d} R {depth:4d}: cpu p50 {row['cpu_p50_ms']:6.2f}"
                    f" ms  recall {row['recall_at_1']:.4f} ({row['vs_exact_pt']:+.2f} pt)"
                    f"  agreement {row['agreement']:.4f}  {row['bytes_per_face']} B/face",
                    flush=True,
                )
        del index
    report = {
        "benchmark": "ivf_codes_real_faces",
        "size": n,
        "dim": dim,
        "recognizer": args.recognizer,
        "queries": len(queries),
        "exact_recall_at_1": round(exact_recall, 4),
        "load_average": [round(x, 1) for x in os.getloadavg()],
        "faiss": faiss.__version__,
        "results": rows,
    }
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
