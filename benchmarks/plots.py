"""The page's figures (matplotlib, written as PNG without a display): ratio bars and curves."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 (after the backend is chosen)


def ratio_bars(path: Path, labels: list[str], ratios: list[dict], title: str, targets: list[float | None] = (),
               xlabel: str = "speed-up (x)") -> str:
    """Horizontal bars of the median ratios with their minimum marked, a dashed line at 1x and ticks at the
    targets; returns the Markdown image line."""
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(labels) + 1.4))
    rows = range(len(labels))[::-1]
    ax.barh(rows, [r["median"] for r in ratios], color="tab:blue", label="median")
    ax.plot([r["min"] for r in ratios], rows, "k|", markersize=18, label="min")
    marked = [(target, row) for row, target in zip(rows, targets) if target]
    if marked:
        ax.plot(*zip(*marked), "rv", markersize=9, label="target")
    ax.axvline(1.0, color="gray", linestyle="--", linewidth=1)
    ax.set_yticks(list(rows), labels)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    return save(fig, path, title)


def curves(path: Path, x: list, panels: dict[str, dict[str, list[float]]], xlabel: str, title: str,
           log_x: bool = True, target: float | None = None) -> str:
    """One panel per entry of ``panels`` (its y label -> one line per series) against ``x``. Panels whose label
    ends in "(x)" are ratios: they start at 0 and get a line at 1x and at ``target``."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    for ax, (ylabel, series) in zip(axes[0], panels.items()):
        for name, values in series.items():
            ax.plot(x, values, "o-", label=name)
        if ylabel.endswith("(x)"):
            ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
            if target:
                ax.axhline(target, color="red", linestyle=":", linewidth=1, label=f"target {target:g}x")
            ax.set_ylim(0, max(ax.get_ylim()[1], 1.15 * (target or 1)))
        if log_x:
            ax.set_xscale("log", base=2)
        ax.set_xticks(x, [str(v) for v in x])
        ax.minorticks_off()
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return save(fig, path, title)


def save(fig, path: Path, title: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"![{title}](benchmarks/{path.name})"
