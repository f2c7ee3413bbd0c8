"""The structured methods, named once: what the script accepts and lists, and what a model card calls them."""

from __future__ import annotations

# score the channels of a trained model and remove the lowest (prune_channels)
CHANNEL_METHODS = {
    "dfpc": "DFPC (data-free saliency of coupled channels, BGSC)",
    "l1": "L1 norm of the filters",
    "random": "random scores",
}
# search an architecture and train it from scratch (pfs.prune_from_scratch, pfs.uniform_architecture)
SCRATCH_METHODS = {
    "pfs": "Pruning from Scratch (channel gates learnt on random weights)",
    "uniform": "uniform widths (the Pruning from Scratch baseline)",
}
METHODS = {**CHANNEL_METHODS, **SCRATCH_METHODS}


def check_structured_method(method: str) -> None:
    """ValueError naming every structured method when `method` is none of them."""
    if method not in METHODS:
        raise ValueError(f"Unknown structured method {method!r}; choose one of {', '.join(METHODS)} "
                         f"({', '.join(CHANNEL_METHODS)} prune a trained model; {', '.join(SCRATCH_METHODS)} train "
                         "an architecture from scratch).")
