"""Charts written next to results (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path


def _figure(size: tuple[float, float]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=size, dpi=120)


def _save(fig, ax, path: str | Path, title: str) -> Path:
    import matplotlib.pyplot as plt

    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_accuracy_lines(series: dict[str, list[tuple[float, float]]], path: str | Path, xlabel: str, title: str,
                        dense: float | None = None, ylabel: str = "top-1 accuracy (%)") -> Path:
    """One line of (x, y %) points per label (y: top-1 unless `ylabel` says), and the dense model's as a
    dashed line."""
    fig, ax = _figure((6, 4))
    for label, points in series.items():
        points = sorted(points)
        ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=label)
    if dense is not None:
        ax.axhline(dense, color="gray", linestyle="--", label="dense")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return _save(fig, ax, path, title)


def plot_accuracy_vs_sparsity(records: list[dict], path: str | Path, title: str = "One-shot pruning",
                              metric: str = "accuracy") -> Path:
    """One line per method of `metric` (a fraction: top-1, k-NN top-1, feature cosine) x 100 vs sparsity."""
    dense = [r for r in records if r["method"] == "dense"]
    series = {method: [(100 * r["sparsity"], 100 * r[metric]) for r in records if r["method"] == method]
              for method in dict.fromkeys(r["method"] for r in records if r["method"] != "dense")}
    return plot_accuracy_lines(series, path, "sparsity of pruned layers (%)", title,
                               100 * dense[0][metric] if dense else None, ylabel=f"{metric} (%)")


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


def plot_group_widths(widths: list[tuple[str, int, int]], path: str | Path, title: str = "Channels per group") -> Path:
    """Horizontal bars: channels before (light) and after (dark) pruning, one row per channel group."""
    fig, ax = _figure((7, 0.3 * len(widths) + 1.2))
    rows = list(range(len(widths)))
    ax.barh(rows, [b for _, b, _ in widths], color="#c6dbef", label="before")
    ax.barh(rows, [a for _, _, a in widths], color="#2171b5", label="after")
    ax.set_yticks(rows, [n.replace("resnet.encoder.", "") for n, _, _ in widths], fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("channels")
    return _save(fig, ax, path, title)

