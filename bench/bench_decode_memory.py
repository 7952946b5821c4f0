"""Peak memory and time of decoding one image, by mode and format (``decode_image``).

Each case runs in a fresh subprocess: it builds the image (a blank one of the given
size, or a file), resets the process's peak RSS (``/proc/self/clear_refs``), decodes
it with :func:`service.pipeline.decode.decode_image` and reports the peak RSS above
the level before the decode, per pixel, and the median decode time of ``--repeat``
runs.  Where the tree has :func:`~service.pipeline.decode.decode_cost` it also reports
that estimate, so that the measured peak can be checked against it.  ``--repo`` points
at another checkout (e.g. an older commit exported with ``git archive``) to compare
both trees in the same run.  The last output line is one JSON object.

    python bench/bench_decode_memory.py --size 6300x6300
    python bench/bench_decode_memory.py --repo /tmp/old --size 6300x6300
    python bench/bench_decode_memory.py --file photo.jpg --repeat 50
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CASES = [
    ("I;16", "PNG"),
    ("L", "PNG"),
    ("RGB", "PNG"),
    ("RGBA", "PNG"),
    ("P", "PNG"),
    ("RGB", "JPEG"),
    ("RGB", "WEBP"),
]

CHILD = r"""
import io, json, statistics, sys, time
sys.path.insert(0, sys.argv[1])
from PIL import Image
from service.pipeline import decode

mode, fmt, width, height, path, repeat = sys.argv[2:8]
if path:
    data = open(path, "rb").read()
else:
    buf = io.BytesIO()
    Image.new(mode, (int(width), int(height))).save(buf, format=fmt)
    data = buf.getvalue()
pixels = Image.open(io.BytesIO(data)).size
pixels = pixels[0] * pixels[1]


def status(field):
    text = open("/proc/self/status").read()
    return int(text.split(field + ":")[1].split()[0]) * 1024


estimate = None
if hasattr(decode, "decode_cost"):
    estimate = decode.decode_cost(decode.read_header(data, 10**10, 10**10))
open("/proc/self/clear_refs", "w").write("5")
base = status("VmRSS")
image = decode.decode_image(data, 10**10, 10**10)
peak = status("VmHWM") - base
del image
times = []
for _ in range(int(repeat)):
    start = time.perf_counter()
    decode.decode_image(data, 10**10, 10**10)
    times.append(time.perf_counter() - start)
print(json.dumps({"mode": mode, "format": fmt, "bytes": len(data), "pixels": pixels,
                  "peak_mib": round(peak / 2**20, 1), "peak_per_pixel": round(peak / pixels, 2),
                  "estimate_mib": None if estimate is None else round(estimate / 2**20, 1),
                  "median_ms": round(statistics.median(times) * 1000, 2)}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=REPO, help="checkout whose decoder to run")
    parser.add_argument("--size", default="4000x4000", help="WxH of the blank test images")
    parser.add_argument("--file", type=Path, help="decode this file instead of blank images")
    parser.add_argument("--repeat", type=int, default=3, help="timed decodes per case")
    args = parser.parse_args()
    width, height = args.size.split("x")
    cases = [("file", "file")] if args.file else CASES
    results = []
    for mode, fmt in cases:
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                CHILD,
                str(args.repo),
                mode,
                fmt,
                width,
                height,
                str(args.file or ""),
                str(args.repeat),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        row = json.loads(out.stdout.strip().splitlines()[-1])
        results.append(row)
        print(
            f"{row['mode']:>5} {row['format']:<5} {row['pixels'] / 1e6:6.1f} Mpx "
            f"peak {row['peak_mib']:7.1f} MiB ({row['peak_per_pixel']:5.2f} B/px) "
            f"estimate {row['estimate_mib'] or '-':>7} MiB  median {row['median_ms']:8.1f} ms"
        )
    print(json.dumps({"repo": str(args.repo), "size": args.size, "results": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
