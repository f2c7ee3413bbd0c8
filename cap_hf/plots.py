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


def plot_layer_sparsity(per_layer: dict[str, float], path: str | Path, title: str = "Sparsity per layer") -> Path:
    """Horizontal bars, one per pruned weight matrix, in model order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(per_layer)
    height = max(2.5, 0.22 * len(names) + 1.0)
    fig, ax = plt.subplots(figsize=(7, height), dpi=110)
    ax.barh(range(len(names)), [100 * per_layer[n] for n in names], color="#4C72B0")
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("sparsity (%)")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
