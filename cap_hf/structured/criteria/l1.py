"""The L1 criterion (Li et al., ICLR 2017; the baseline of the DFPC paper): a channel's score is the sum over its
producers of the L1 norm of the weights that write it."""

from __future__ import annotations

import torch

from cap_hf.structured.criteria.base import Criterion, per_channel, register
from cap_hf.structured.groups import ChannelGraph, ChannelGroup

CITATION = """@inproceedings{li2017pruning,
  title     = {Pruning Filters for Efficient ConvNets},
  author    = {Li, Hao and Kadav, Asim and Durdanovic, Igor and Samet, Hanan and Graf, Hans Peter},
  booktitle = {International Conference on Learning Representations},
  year      = {2017}
}"""


@torch.no_grad()
def l1_scores(graph: ChannelGraph, group: ChannelGroup, generator: torch.Generator | None = None) -> torch.Tensor:
    scores = torch.zeros(group.size * group.unit, dtype=torch.float64)
    for producer in group.producers:
        weight = producer.module.weight.detach().abs()
        scores += weight.reshape(weight.shape[0], -1).sum(1)[producer.channels].double().cpu()
    return per_channel(group, scores)


register(Criterion("l1", "L1 norm of the filters", CITATION, l1_scores))
