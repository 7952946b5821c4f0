"""Embedding throughput: ONNX Runtime (the service's sessions) against PyTorch and the roofline.

For each backbone of ``training/`` (random weights: speed does not depend on them) the
script exports the ONNX model exactly as ``training.export`` does, then measures faces/s
at each batch size for

- ``ort``: the service's own session (:func:`service.pipeline.runtime.create_session`,
  providers from ``FACEGATE_PROVIDERS``: CUDA/TensorRT when onnxruntime-gpu is installed
  and a GPU is present, else CPU), float32 input as the service feeds it;
- ``torch_fp32`` and, on a GPU, ``torch_bf16`` / ``torch_fp16`` (autocast, channels-last):
  the same module under PyTorch on the same device, inference mode;

and the roofline: the model's FLOPs per face (``torch.utils.flop_counter``) divided into
the device's measured dense matrix rate (a large ``matmul`` in float32 and, on a GPU,
bf16), i.e. the faces/s the device could reach if the network ran at its matmul rate.
Timings are medians over repeats after warm-up. The last line of output is one JSON object.

    python bench/bench_embed.py                       # iresnet50 + mobilefacenet, batches 1..256
    python bench/bench_embed.py --quick               # mobilefacenet, batches 1 and 8, CPU-sized

Default batches: 1..256 on a GPU, 1..64 on a CPU, where batches 128 and 256 of
IResNet-50 alone would take ~6 minutes at its ~15 faces/s (BENCHMARKS.md); the
CPU default runs in ~3 minutes on the 2-core VM.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def median_seconds(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_rate(torch, device, dtype, side: int) -> float:
    """Dense matrix multiply rate in FLOP/s on ``device`` for ``dtype``."""
    a = torch.randn(side, side, device=device, dtype=dtype)
    b = torch.randn(side, side, device=device, dtype=dtype)

    def run():
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()

    return 2 * side**3 / median_seconds(run, repeats=5, warmup=2)


def flops_per_face(torch, model, size: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(torch.zeros(1, 3, size, size))
    return float(counter.get_total_flops())


def bench_backbone(name: str, batches: list[int], repeats: int, args) -> dict:
    import torch

    from service.config import Settings
    from service.pipeline.runtime import create_session, providers_in_use
    from training.backbones import build_backbone
    from training.export import to_onnx

    torch.manual_seed(0)
    model = build_backbone(name, args.embedding_dim).eval()
    flops = flops_per_face(torch, model, 112)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.onnx"
        to_onnx(model, path)
        session = create_session(path, Settings())
    providers = providers_in_use(session)
    input_name = session.get_inputs()[0].name

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device)
    variants = {"torch_fp32": None}
    if device.type == "cuda":
        variants.update(torch_bf16=torch.bfloat16, torch_fp16=torch.float16)
        model = model.to(memory_format=torch.channels_last)

    rows = []
    rng = np.random.default_rng(0)
    for batch in batches:
        faces = rng.standard_normal((batch, 3, 112, 112), dtype=np.float32)
        row = {"batch": batch}
        seconds = median_seconds(
            lambda faces=faces: session.run(None, {input_name: faces}), repeats
        )
        row["ort"] = round(batch / seconds, 2)
        x = torch.from_numpy(faces).to(device)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        for label, dtype in variants.items():

            def run(dtype=dtype, x=x):
                with (
                    torch.inference_mode(),
                    torch.autocast(
                        device.type, dtype=dtype or torch.float32, enabled=dtype is not None
                    ),
                ):
                    model(x)
                if device.type == "cuda":
                    torch.cuda.synchronize()

            row[label] = round(batch / median_seconds(run, repeats), 2)
        rows.append(row)
        print(
            f"{name:14s} batch {batch:4d}: "
            + "  ".join(f"{k} {v:9.1f}/s" for k, v in row.items() if k != "batch"),
            file=sys.stderr,
        )

    best = {key: max(r[key] for r in rows) for key in rows[0] if key != "batch"}
    fastest_torch = max(v for k, v in best.items() if k.startswith("torch"))
    return {
        "gflops_per_face": round(flops / 1e9, 3),
        "ort_providers": providers,
        "torch_device": str(device),
        "rows": rows,
        "best_faces_per_s": best,
        "ort_vs_fastest_torch": round(best["ort"] / fastest_torch, 3),
        "flops": flops,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="mobilefacenet only, batches 1 and 8, 2 repeats"
    )
    parser.add_argument("--backbones", default="iresnet50,mobilefacenet")
    parser.add_argument(
        "--batches",
        default="",
        help="comma-separated batch sizes (default: 1,8,32,64,128,256 on a GPU, "
        "1,8,32,64 on a CPU)",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--embedding-dim", type=int, default=512)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = parser.parse_args(argv)
    if args.quick:
        args.backbones, args.batches, args.repeats = "mobilefacenet", "1,8", 2

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    side = 1024 if args.quick else (8192 if device.type == "cuda" else 2048)
    rates = {"fp32": matmul_rate(torch, device, torch.float32, side)}
    if device.type == "cuda":
        rates["bf16"] = matmul_rate(torch, device, torch.bfloat16, side)
    print(
        "matmul TFLOP/s: " + ", ".join(f"{k} {v / 1e12:.2f}" for k, v in rates.items()),
        file=sys.stderr,
    )

    batches = [
        int(b)
        for b in (
            args.batches or ("1,8,32,64,128,256" if device.type == "cuda" else "1,8,32,64")
        ).split(",")
    ]
    report = {}
    for name in args.backbones.split(","):
        result = bench_backbone(name, batches, args.repeats, args)
        flops = result.pop("flops")
        result["roofline_faces_per_s"] = {k: round(v / flops, 1) for k, v in rates.items()}
        result["ort_fraction_of_fp32_roofline"] = round(
            result["best_faces_per_s"]["ort"] / result["roofline_faces_per_s"]["fp32"], 3
        )
        report[name] = result
    print(
        json.dumps(
            {
                "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                "matmul_tflops": {k: round(v / 1e12, 3) for k, v in rates.items()},
                "batches": batches,
                "backbones": report,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
