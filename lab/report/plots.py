"""Plot helpers shared by hypotheses and the site (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def line_figure(
    lines: Mapping[str, tuple[Iterable[float], Iterable[float]]],
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
    logx: bool = False,
    logy: bool = False,
    hlines: Mapping[str, float] | None = None,
):
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for label, (xs, ys) in lines.items():
        xs, ys = list(xs), list(ys)
        ax.plot(xs, ys, label=label, marker="o" if len(xs) <= 12 else None, linewidth=1.5)
    for i, (label, y) in enumerate((hlines or {}).items()):
        ax.axhline(y, linestyle="--", color=f"C{(i + len(lines)) % 10}", linewidth=1, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if lines or hlines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def bar_figure(labels, values, *, errors=None, ylabel: str, title: str = ""):
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.bar(range(len(values)), values, yerr=errors, capsize=4, color="C0")
    ax.set_xticks(range(len(values)), labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig


def heatmap_grid(
    grid,
    *,
    row_labels=None,
    col_labels=None,
    tick_labels=None,
    title: str = "",
    vmin: float | None = 0.0,
    vmax: float | None = None,
    cmap: str = "viridis",
    cell: float = 1.6,
):
    """A rows x cols grid of heatmaps (e.g. layers x heads of attention patterns): grid is a
    nested sequence of 2-D arrays. tick_labels (e.g. the tokens) label both axes of each."""
    rows, cols = len(grid), len(grid[0])
    fig, axes = plt.subplots(rows, cols, figsize=(cell * cols + 0.6, cell * rows + 0.4), squeeze=False)
    image = None
    for r in range(rows):
        for c in range(cols):
            ax = axes[r][c]
            image = ax.imshow(grid[r][c], vmin=vmin, vmax=vmax, cmap=cmap, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if tick_labels is not None and rows * cols == 1:
                ax.set_xticks(range(len(tick_labels)), tick_labels, rotation=90, fontsize=6)
                ax.set_yticks(range(len(tick_labels)), tick_labels, fontsize=6)
            if r == 0 and col_labels is not None:
                ax.set_title(col_labels[c], fontsize=8)
            if c == 0 and row_labels is not None:
                ax.set_ylabel(row_labels[r], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.colorbar(image, ax=axes, shrink=0.6)
    return fig


def scatter_grid(points, colors, *, titles, label: str = "", title: str = "", cmap: str = "viridis"):
    """One scatter per panel (e.g. per layer): points[i] is (n, 2), colors[i] (n,)."""
    n = len(points)
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.8 * rows), squeeze=False)
    image = None
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.axis("off")
            continue
        xy = points[i]
        image = ax.scatter(xy[:, 0], xy[:, 1], c=colors[i], s=4, cmap=cmap, alpha=0.7)
        ax.set_title(titles[i], fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.6, label=label)
    return fig
