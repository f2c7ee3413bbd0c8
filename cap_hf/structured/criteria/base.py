"""What a channel criterion is: a name, the words a model card uses, its citation, and one score per channel.

A criterion scores every channel of one group of a trained model (lower goes first); the global greedy order,
the normalisation across groups and the removal are the same for all of them (cap_hf.structured.order). To add
one, write a file in this folder that calls `register` and import it in `__init__.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from cap_hf.structured.groups import ChannelGraph, ChannelGroup

Score = Callable[[ChannelGraph, ChannelGroup, torch.Generator], torch.Tensor]


@dataclass(frozen=True)
class Criterion:
    """`score(graph, group, generator)` gives one float64 score per channel of `group` (a head counts once)."""

    name: str
    title: str  # what the model card calls it
    citation: str  # BibTeX for the card, "" for none
    score: Score


CRITERIA: dict[str, Criterion] = {}


def register(criterion: Criterion) -> Criterion:
    if criterion.name in CRITERIA:
        raise ValueError(f"A channel criterion named {criterion.name!r} is registered already.")
    CRITERIA[criterion.name] = criterion
    return criterion


def per_channel(group: ChannelGroup, scores: torch.Tensor) -> torch.Tensor:
    """Index scores [size * unit] summed into channel scores [size] (a head's indices into the head)."""
    return scores.reshape(group.size, group.unit).sum(1)
