"""Plot helpers shared by hypotheses and the site (matplotlib, headless)."""

from __future__ import annotations

from typing import Iterable, Mapping

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
