"""DFPC (Narshana, Murti, Bhattacharyya, ICLR 2023): data-free saliency of coupled channels, and the
channel criterion of this project's DFPC runs (the global greedy order is cap_hf.structured.order's).

BGSC, the data-free saliency, bounds how much removing channel k of a group can change the
pre-activations of the layers that read it, for bounded inputs. Every operation on the path is
written as a non-negative matrix: a convolution as |T(W)| (its unrolled Toeplitz matrix with absolute
weights), a batch norm as diag(|gamma| / sqrt(var + eps)), ReLU and the residual add as the identity
(1-Lipschitz), max-pooling as the average pooling of the same window, global average pooling as the
averaging matrix. For producer a (convolution + its batch norm, M_a) and consumer b (N_b) the
contribution of channel k is 1^T N_b[:, P(k)] M_a[P(k), :] 1, summed over every pair (a, b) whose
data flows from a to b (b runs after a). Because all entries are non-negative this is
sum_p rowsum(M_a)[k, p] * colsum(N_b)[k, p] over the positions p of channel k, and both factors are one
convolution of an all-ones input with |W_a| and one transposed convolution of an all-ones output with
|W_b|: exact at borders and strides, no Toeplitz matrix is ever built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cap_hf.structured.criteria.base import Criterion, per_channel, register
from cap_hf.structured.groups import ChannelGraph, ChannelGroup, Member

CITATION = """@inproceedings{narshana2023dfpc,
  title     = {{DFPC}: Data flow driven pruning of coupled channels without data},
  author    = {Narshana, Tanay and Murti, Chaitanya and Bhattacharyya, Chiranjib},
  booktitle = {International Conference on Learning Representations},
  year      = {2023}
}"""


def _norm_scale(norm: Member | None) -> torch.Tensor | None:
    """The non-negative diagonal a norm layer is bounded by, at its group channels: |gamma| / sqrt(running_var
    + eps) for a batch norm; |gamma| for a LayerNorm (the surrogate: its division by the token's standard
    deviation is one factor shared by every channel of the token, so it cannot reorder them, and its
    mean-centring is left out)."""
    if norm is None:
        return None
    module = norm.module
    gamma = module.weight.detach().float().abs() if module.weight is not None else None
    if isinstance(module, nn.BatchNorm2d):
        var = module.running_var.float()
        scale = (gamma if gamma is not None else torch.ones_like(var)) / torch.sqrt(var + module.eps)
    elif isinstance(module, nn.LayerNorm):
        if gamma is None:
            return None
        scale = gamma.reshape(-1)
    else:
        raise NotImplementedError(f"BGSC cannot bound {norm.name} ({type(module).__name__}).")
    return scale[norm.channels]


def _producer_map(graph: ChannelGraph, group: ChannelGroup, producer: Member) -> torch.Tensor:
    """rowsum(M_a) for the group's indices: [indices, H, W] (a Linear producer: [indices, 1, 1])."""
    module, (in_shape, _) = producer.module, graph.shapes[producer.name]
    weight = module.weight.detach().float().abs()
    if isinstance(module, nn.Conv2d):
        ones = torch.ones(1, *in_shape, device=weight.device)
        rows = F.conv2d(ones, weight, None, module.stride, module.padding, module.dilation, module.groups)[0]
    else:
        rows = weight.sum(1)[:, None, None]
    rows = rows[producer.channels]
    scale = _norm_scale(graph.norm_after(producer, group))
    return rows if scale is None else rows * scale[:, None, None]


def _consumer_map(graph: ChannelGraph, consumer: Member) -> torch.Tensor:
    """colsum(N_b) for the group's indices at b's input positions: [indices, H, W] ([indices, 1, 1] for a Linear)."""
    module, (in_shape, out_shape) = consumer.module, graph.shapes[consumer.name]
    weight = module.weight.detach().float().abs()
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise NotImplementedError(f"BGSC for grouped convolutions ({consumer.name}) is not written yet.")
        ones = torch.ones(1, *out_shape, device=weight.device)
        natural = [(o - 1) * s - 2 * p + d * (k - 1) + 1 for o, s, p, d, k in zip(
            out_shape[1:], module.stride, module.padding, module.dilation, module.kernel_size, strict=True)]
        extra = [i - n for i, n in zip(in_shape[1:], natural, strict=True)]  # rows a strided conv never reads
        cols = F.conv_transpose2d(ones, weight, None, module.stride, module.padding, extra, 1, module.dilation)[0]
    else:
        cols = weight.sum(0)[:, None, None]
    return cols[consumer.channels]


def _carry(graph: ChannelGraph, producer: Member, consumer: Member, rows: torch.Tensor) -> torch.Tensor:
    """rowsum(M_a) carried through the pooling layers between a and b (max-pooling as average pooling)."""
    for name, pool in graph.pools_between(producer.name, consumer.name):
        if tuple(graph.shapes[name][0][1:]) != tuple(rows.shape[1:]):
            continue
        if isinstance(pool, nn.AdaptiveAvgPool2d):
            rows = F.adaptive_avg_pool2d(rows[None], pool.output_size)[0]
        else:
            rows = F.avg_pool2d(rows[None], pool.kernel_size, pool.stride, pool.padding, ceil_mode=pool.ceil_mode)[0]
    if isinstance(consumer.module, nn.Linear) and rows.shape[1:] != (1, 1):
        rows = rows.mean((1, 2), keepdim=True)  # flatten after a global pool the graph did not show
    want = graph.shapes[consumer.name][0]
    if isinstance(consumer.module, nn.Conv2d) and tuple(rows.shape[1:]) != tuple(want[1:]):
        raise NotImplementedError(f"BGSC: the data from {producer.name} ({tuple(rows.shape[1:])}) reaches "
                                  f"{consumer.name} at {tuple(want[1:])} through an operation it cannot bound.")
    return rows


VALUE_PROJECTIONS = ("v_proj", "value")


def _linear_producers(group: ChannelGroup) -> list[Member]:
    """The producers whose data reaches the consumers through linear (or 1-Lipschitz) steps. In an attention
    group that is the value projection alone: the query and key only set the attention weights, which mix
    the values convexly (each output is an average of values, bounded by the largest)."""
    if group.unit == 1:
        return group.producers
    values = [p for p in group.producers if p.name.rpartition(".")[2] in VALUE_PROJECTIONS]
    if not values:
        raise NotImplementedError(f"BGSC: no value projection ({' or '.join(VALUE_PROJECTIONS)}) among the "
                                  f"producers of the attention group {group.name}.")
    return values


@torch.no_grad()
def bgsc_scores(graph: ChannelGraph, group: ChannelGroup, generator: torch.Generator | None = None) -> torch.Tensor:
    """DFPC's data-free saliency of every channel of `group` (sum over producer/consumer pairs)."""
    scores = torch.zeros(group.size * group.unit, dtype=torch.float64)
    readers = [(consumer, _consumer_map(graph, consumer), graph.norm_before(consumer, group))
               for consumer in group.consumers]
    for producer in _linear_producers(group):
        rows = _producer_map(graph, group, producer)
        after = graph.norm_after(producer, group)
        for consumer, cols, before in readers:
            if graph.order[consumer.name] <= graph.order[producer.name]:
                continue  # the data of a later block never reaches an earlier one
            scale = _norm_scale(before) if before is not after else None  # a pre-norm: the LayerNorm in front of b
            if scale is not None:
                cols = cols * scale[:, None, None]
            carried = _carry(graph, producer, consumer, rows)
            scores += (carried * cols).sum((1, 2)).double().cpu()
    return per_channel(group, scores)


register(Criterion("dfpc", "DFPC (data-free saliency of coupled channels, BGSC)", CITATION, bgsc_scores))
