"""The structured methods, named once: what the script accepts and lists, and what a model card calls them."""

from __future__ import annotations

# score the channels of a trained model and remove the lowest (prune_channels)
CHANNEL_METHODS = {
    "dfpc": "DFPC (data-free saliency of coupled channels, BGSC)",
    "l1": "L1 norm of the filters",
    "random": "random scores",
}
# remove heads, MLP neurons and block channels with second-order compensation, to a target (second_order.py)
SECOND_ORDER_METHODS = {
    "obs": "second-order structured pruning with the layer-wise Hessian (ZipLM's OBS update of whole structures)",
    "cap": "second-order structured pruning with the empirical Fisher (a structured CAP)",
}
# search an architecture and train it from scratch (pfs.prune_from_scratch, pfs.uniform_architecture)
SCRATCH_METHODS = {
    "pfs": "Pruning from Scratch (channel gates learnt on random weights)",
    "uniform": "uniform widths (the Pruning from Scratch baseline)",
}
METHODS = {**CHANNEL_METHODS, **SECOND_ORDER_METHODS, **SCRATCH_METHODS}


def check_structured_method(method: str) -> None:
    """ValueError naming every structured method when `method` is none of them."""
    if method not in METHODS:
        raise ValueError(f"Unknown structured method {method!r}; choose one of {', '.join(METHODS)} "
                         f"({', '.join(CHANNEL_METHODS)} score the channels of a trained model; {', '.join(SECOND_ORDER_METHODS)} "
                         f"remove and compensate with calibration data; {', '.join(SCRATCH_METHODS)} train an "
                         "architecture from scratch).")
