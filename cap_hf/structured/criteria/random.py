"""Random scores: the floor every criterion must beat (a baseline of the DFPC paper), seeded."""

from __future__ import annotations

import torch

from cap_hf.structured.criteria.base import Criterion, register
from cap_hf.structured.groups import ChannelGraph, ChannelGroup


def random_scores(graph: ChannelGraph, group: ChannelGroup, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(group.size, generator=generator, dtype=torch.float64)


register(Criterion("random", "random scores", "", random_scores))
