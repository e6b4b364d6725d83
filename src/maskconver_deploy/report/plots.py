"""The report's figures, drawn with matplotlib (imported lazily, Agg backend) from plain numbers.

Every function takes already extracted values and a PNG path, writes the figure and returns the path; none of
them reads a results file or knows a model or a backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

DPI = 110
MARKERS = "osD^v<>phX*"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, format="png", metadata={"Software": None})
    _pyplot().close(fig)
    return path


def pareto_front(points: Sequence[tuple[str, float, float]]) -> list[tuple[str, float, float]]:
    """Points (label, latency, quality) not beaten by another that is both faster-or-equal and better-or-equal."""
    front: list[tuple[str, float, float]] = []
    best = float("-inf")
    for label, latency, quality in sorted(points, key=lambda p: (p[1], -p[2])):
        if quality > best:
            front.append((label, latency, quality))
            best = quality
    return front


PATH_MARKERS = "o^sDv<>phX*"  # one marker per merge path in pq_vs_latency


def pq_vs_latency(points: Sequence[tuple[str, float, float]], path: Path, title: str,
                  paths: Sequence[str] | None = None) -> Path:  # fmt: skip
    """Scatter of (median latency ms, PQ) per backend with the Pareto front drawn through the winners.

    `paths`: the merge path of each point; points of one path share a marker (one per path), and the legend names
    the path. Without it every point gets its own marker."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.6))
    order = list(dict.fromkeys(paths)) if paths else []
    for index, (label, latency, quality) in enumerate(points):
        if paths:
            marker = PATH_MARKERS[order.index(paths[index]) % len(PATH_MARKERS)]
        else:
            marker = MARKERS[index % len(MARKERS)]
        ax.scatter([latency], [quality], marker=marker, s=55, label=label, zorder=3)
        ax.annotate(label, (latency, quality), textcoords="offset points", xytext=(5, 4 + 7 * (index % 3)), fontsize=7)
    front = pareto_front(points)
    if front:
        ax.plot([p[1] for p in front], [p[2] for p in front], "--", color="0.35", lw=1.2, label="Pareto front", zorder=2)
    ax.set_xlabel("median latency, end to end (ms)")
    ax.set_ylabel("PQ")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return _save(fig, path)


def latency_vs_size(
    series: dict[str, list[tuple[int, float]]], raw_series: dict[str, list[tuple[int, float]]], path: Path, title: str
) -> Path:
    """Median latency against input size per backend; solid end to end, dashed network alone."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.6))
    colors: dict[str, Any] = {}
    for index, (backend, values) in enumerate(series.items()):
        values = sorted(values)
        (line,) = ax.plot([v[0] for v in values], [v[1] for v in values], marker=MARKERS[index % len(MARKERS)],
                          label=f"{backend} (end to end)")  # fmt: skip
        colors[backend] = line.get_color()
    for backend, values in raw_series.items():
        values = sorted(values)
        ax.plot([v[0] for v in values], [v[1] for v in values], "--", marker=".", color=colors.get(backend),
                label=f"{backend} (network alone)")  # fmt: skip
    sizes = sorted({v[0] for values in [*series.values(), *raw_series.values()] for v in values})
    ax.set_xticks(sizes)
    ax.set_xlabel("input size (pixels, square)")
    ax.set_ylabel("median latency (ms)")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="best")
    return _save(fig, path)


def by_proposals(
    latency: dict[str, list[tuple[int, float]]], quality: dict[str, list[tuple[int, float]]], path: Path, title: str
) -> Path:
    """Two panels against the number of proposals N: median latency, and PQ (where evaluated)."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10.0, 4.2))
    for index, (backend, values) in enumerate(latency.items()):
        values = sorted(values)
        left.plot([v[0] for v in values], [v[1] for v in values], marker=MARKERS[index % len(MARKERS)], label=backend)
    left.set_xlabel("proposals N")
    left.set_ylabel("median latency, end to end (ms)")
    left.grid(alpha=0.3)
    left.legend(fontsize=7)
    for index, (backend, values) in enumerate(quality.items()):
        values = sorted(values)
        right.plot([v[0] for v in values], [v[1] for v in values], marker=MARKERS[index % len(MARKERS)], label=backend)
    right.set_xlabel("proposals N")
    right.set_ylabel("PQ")
    right.grid(alpha=0.3)
    if quality:
        right.legend(fontsize=7)
    else:
        right.text(0.5, 0.5, "no evaluation by proposals in these results", ha="center", va="center",
                   transform=right.transAxes, fontsize=9, color="0.4")  # fmt: skip
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def postprocess_share(bars: Sequence[tuple[str, float, float]], path: Path, title: str) -> Path:
    """Stacked bars per backend: network alone (raw graph) and the rest of the end-to-end time (post-processing)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(bars) + 2), 4.4))
    labels = [b[0] for b in bars]
    network = [min(b[1], b[2]) for b in bars]
    post = [max(b[2] - b[1], 0.0) for b in bars]
    xs = list(range(len(bars)))
    ax.bar(xs, network, label="network alone (raw graph)", color="#4c72b0")
    ax.bar(xs, post, bottom=network, label="post-processing (end to end - network)", color="#dd8452")
    for x, (label, raw, e2e) in zip(xs, bars):
        share = (e2e - raw) / e2e if e2e > 0 else 0.0
        ax.text(x, e2e, f"{100 * share:.0f}%", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(xs)
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("median latency (ms)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    return _save(fig, path)


def overlay_grid(images: Sequence[tuple[str, Path]], path: Path, title: str) -> Path:
    """The pipeline's overlay PNGs side by side, one panel per backend."""
    plt = _pyplot()
    import matplotlib.image as mpimg

    count = max(len(images), 1)
    cols = min(count, 4)
    rows = (count + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (label, png) in zip(axes.flat, images):
        ax.imshow(mpimg.imread(str(png)))
        ax.set_title(label, fontsize=9)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)
