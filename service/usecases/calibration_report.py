"""The HTML report of a calibration (``facegate models calibrate --report DIR``).

``DIR/index.html`` with PNG pictures beside it: the DET curve (FNMR against FMR, log axes)
with the operating points marked, the genuine and impostor score histograms, and the 12
highest-scoring impostor pairs and 12 lowest-scoring genuine pairs as aligned face
thumbnails side by side (where mislabelled photos, twins and bad crops show up). Needs
matplotlib (the ``report`` extra).
"""

from __future__ import annotations

import html
from pathlib import Path

import cv2
import numpy as np

from service.pipeline.calibration import HISTOGRAM_BINS, det_curve

from .calibrate import CalibrationError, CalibrationResult

#: Pairs shown in each of the two thumbnail tables.
SHOWN = 12


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CalibrationError(
            "report_unavailable",
            "--report needs matplotlib: pip install 'facegate[report]'",
        ) from None
    return plt


def _det(result: CalibrationResult, path: Path) -> None:
    plt = _pyplot()
    fmr, fnmr = det_curve(result.scores)
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=110)
    keep = (fmr > 0) & (fnmr > 0)
    ax.plot(fmr[keep], fnmr[keep], color="tab:blue", lw=1.5, label=result.model)
    for point in result.points.points:
        y = max(point.fnmr, 1.0 / max(1, result.scores.genuine.size))
        ax.plot([point.fmr], [y], "o", color="tab:red")
        ax.annotate(
            f"{point.name}\nt={point.threshold:.3f}",
            (point.fmr, y),
            textcoords="offset points",
            xytext=(6, 6),
            fontsize=8,
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("false match rate (FMR)")
    ax.set_ylabel("false non-match rate (FNMR)")
    ax.set_title("DET curve")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _histograms(result: CalibrationResult, path: Path) -> None:
    plt = _pyplot()
    scores = result.scores
    edges = np.linspace(-1.0, 1.0, HISTOGRAM_BINS + 1)
    used = np.nonzero(scores.histogram)[0]
    lo = min(edges[used[0]] if used.size else -1.0, float(scores.genuine.min(initial=1.0)))
    hi = max(edges[used[-1] + 1] if used.size else 1.0, float(scores.genuine.max(initial=-1.0)))
    group = max(1, int((hi - lo) / 2 * HISTOGRAM_BINS / 120))  # about 120 bars
    n = HISTOGRAM_BINS // group * group
    impostor = scores.histogram[:n].reshape(-1, group).sum(axis=1)
    coarse = edges[: n + 1 : group]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    width = np.diff(coarse)
    if scores.impostors:
        ax.bar(
            coarse[:-1],
            impostor / scores.impostors / width,
            width=width,
            align="edge",
            alpha=0.5,
            color="tab:red",
            label=f"impostor ({scores.impostors:,} pairs)",
        )
    if scores.genuine.size:
        ax.hist(
            scores.genuine,
            bins=coarse,
            density=True,
            alpha=0.5,
            color="tab:green",
            label=f"genuine ({scores.genuine.size:,} pairs)",
        )
    for point in result.points.points:
        ax.axvline(point.threshold, color="k", lw=0.8, ls="--")
        ax.text(point.threshold, ax.get_ylim()[1] * 0.9, point.name, rotation=90, fontsize=7)
    ax.set_xlim(lo, hi)
    ax.set_xlabel("cosine similarity")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _chip(pipeline, path: Path) -> np.ndarray:
    """The aligned main face of a photo as the pipeline sees it (the photo itself, resized,
    when no face is found there)."""
    width, height = pipeline.crop_size
    try:
        faces = pipeline.locate(Path(path).read_bytes(), "largest", allow_none=True)
        if len(faces.detections):
            return np.asarray(faces.crops[0])
        image = pipeline.decode(Path(path).read_bytes())
    except Exception:  # a thumbnail must not fail the report
        return np.full((height, width, 3), 127, np.uint8)
    return cv2.resize(image, (width, height))


def _pairs_table(result, pipeline, directory: Path, kind: str, rows, scores) -> str:
    cells = []
    for k, ((a, b), score) in enumerate(zip(rows, scores, strict=True)):
        picture = np.hstack([_chip(pipeline, result.photos[a]), _chip(pipeline, result.photos[b])])
        name = f"{kind}_{k + 1:02d}.png"
        cv2.imwrite(str(directory / name), picture)
        label = (
            f"{html.escape(result.persons[a])}/{html.escape(result.photos[a].name)} &harr; "
            f"{html.escape(result.persons[b])}/{html.escape(result.photos[b].name)}"
        )
        cells.append(
            f'<figure><img src="{name}" alt="{kind} pair {k + 1}">'
            f"<figcaption>{score:.4f}<br>{label}</figcaption></figure>"
        )
    return "\n".join(cells)


def write_report(result: CalibrationResult, pipeline, directory: Path) -> Path:
    """Write ``directory/index.html`` and its pictures; returns the page's path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _det(result, directory / "det.png")
    _histograms(result, directory / "histograms.png")
    scores = result.scores
    impostor_rows = scores.tail_pairs[:SHOWN]
    order = np.argsort(scores.genuine, kind="stable")[:SHOWN]
    impostors = _pairs_table(
        result, pipeline, directory, "impostor", impostor_rows, scores.tail[:SHOWN]
    )
    genuine = _pairs_table(
        result, pipeline, directory, "genuine", scores.genuine_pairs[order], scores.genuine[order]
    )
    rows = "\n".join(
        f"<tr><td>{p.name}</td><td>{p.threshold:.4f}</td><td>{p.fmr:.2e}</td>"
        f"<td>{p.fnmr * 100:.2f}%</td>"
        + (
            f"<td>[{p.threshold_ci.low:.4f}, {p.threshold_ci.high:.4f}]</td>"
            if p.threshold_ci
            else "<td></td>"
        )
        + (
            f"<td>[{p.fnmr_ci.low * 100:.2f}%, {p.fnmr_ci.high * 100:.2f}%]</td>"
            if p.fnmr_ci
            else "<td></td>"
        )
        + "</tr>"
        for p in result.points.points
    )
    missing = "".join(
        f"<li>{u.name}: needs {u.impostors_needed:,} impostor pairs, about "
        f"{u.photos_needed:,} photos of {u.persons_needed:,} persons</li>"
        for u in result.points.unsupported
    )
    source = result.source
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Calibration of {html.escape(result.model)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 4px 8px; }}
figure {{ display: inline-block; margin: 6px; text-align: center; font-size: 11px; }}
</style></head><body>
<h1>Calibration of {html.escape(result.model)}</h1>
<p>Model {html.escape(result.model_id)} (sha256 {result.model_sha256}), detector
{html.escape(result.detector)}, flip {result.flip}. {html.escape(str(source.get("kind")))}
from {html.escape(str(source.get("path")))}: {source["persons"]} persons,
{source["photos"]} photos, {source["genuine_pairs"]:,} genuine and
{source["impostor_pairs"]:,} impostor pairs; {len(result.refused)} photos refused.</p>
<table><tr><th>operating point</th><th>threshold</th><th>FMR</th><th>FNMR</th>
<th>threshold 95% CI</th><th>FNMR 95% CI</th></tr>
{rows}
</table>
<p>Intervals: bootstrap over persons.</p>
<ul>{missing}</ul>
<h2>DET curve</h2><img src="det.png" alt="DET curve">
<h2>Score histograms</h2><img src="histograms.png" alt="score histograms">
<h2>The {SHOWN} highest-scoring impostor pairs</h2>
{impostors}
<h2>The {SHOWN} lowest-scoring genuine pairs</h2>
{genuine}
</body></html>
"""
    path = directory / "index.html"
    path.write_text(page)
    return path
