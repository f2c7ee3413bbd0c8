"""Charts written next to results (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path


def plot_accuracy_vs_sparsity(records: list[dict], path: str | Path, title: str = "One-shot pruning") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    dense = [r for r in records if r["method"] == "dense"]
    for method in dict.fromkeys(r["method"] for r in records if r["method"] != "dense"):
        rows = sorted((r for r in records if r["method"] == method), key=lambda r: r["sparsity"])
        ax.plot([100 * r["sparsity"] for r in rows], [100 * r["accuracy"] for r in rows], marker="o", label=method)
    if dense:
        ax.axhline(100 * dense[0]["accuracy"], color="gray", linestyle="--", label="dense")
    ax.set_xlabel("sparsity of pruned layers (%)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
