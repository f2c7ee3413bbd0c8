"""The global greedy order of a channel run: every group's channels scored once by a criterion (criteria/),
normalised across groups, lowest first, never a group's last channel; and how many of them go."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from cap_hf.structured.config import check_normalize
from cap_hf.structured.criteria import CRITERIA
from cap_hf.structured.groups import ChannelGraph, ChannelGroup
from cap_hf.structured.registry import check_structured_method


def check_method(method: str) -> None:
    check_structured_method(method)
    if method not in CRITERIA:
        raise ValueError(f"{method!r} does not score a trained model's channels ({', '.join(CRITERIA)} do): "
                         "prune_second_order runs obs / cap, cap_hf.structured.pfs searches an architecture.")


def resolve_normalize(graph: ChannelGraph, normalize: str) -> str:
    """'auto' -> the normalisation measured best for the architecture (docs/benchmarks.md, structured pruning):
    'mean' for a ResNet, 'none' for a ViT. Raw BGSC sums over a channel's positions, so on a ResNet the
    channels of the low-resolution (cheap) stages score lowest and the last stage empties first; a ViT has
    one position per token everywhere, and the raw sums over every producer/consumer pair are what keep the
    residual stream and the heads (read by every layer) above the MLP neurons (read by one)."""
    check_normalize(normalize)
    if normalize != "auto":
        return normalize
    return "none" if any(g.unit > 1 for g in graph.groups) else "mean"


def channel_scores(graph: ChannelGraph, method: str, seed: int = 0, normalize: str = "auto") -> dict[int, torch.Tensor]:
    """{group index: one score per channel} by the criterion `method` (CRITERIA: dfpc, l1, random). Lower goes first.

    normalize="mean" divides each group's scores by their mean before the global comparison (Torch-Pruning's
    default); "none" compares raw scores across groups, as the paper's code does; "auto" picks per
    architecture (resolve_normalize).
    """
    check_method(method)
    normalize = resolve_normalize(graph, normalize)
    generator = torch.Generator().manual_seed(seed)
    scores = {g.index: CRITERIA[method].score(graph, g, generator) for g in graph.groups}
    if normalize == "mean":
        scores = {i: s / s.mean() if s.mean() > 0 else s for i, s in scores.items()}
    return scores


def removal_order(groups: Sequence[ChannelGroup], scores: Mapping[int, torch.Tensor],
                  uncoupled_only: bool = False) -> list[tuple[int, int]]:
    """(group, channel) in the order the global greedy removes them: lowest score first, scores
    computed once (as in the paper), never the last channel of a group; with `uncoupled_only`, only
    groups with one producer and one consumer (the paper's baseline that leaves coupled channels)."""
    allowed = [g for g in groups if not (uncoupled_only and g.coupled)]
    left = {g.index: g.size for g in allowed}
    order = []
    candidates = sorted((float(scores[g.index][c]), g.index, c) for g in allowed for c in range(g.size))
    for _, index, channel in candidates:
        if left[index] > 1:
            left[index] -= 1
            order.append((index, channel))
    return order


def removal_plan(order: Sequence[tuple[int, int]], count: int, sizes: Mapping[int, int] | None = None,
                 round_to: int = 1) -> dict[int, list[int]]:
    """The first `count` removals of `order` as {group index: channels}. With `round_to` > 1 every group
    keeps a multiple of it (or all its channels): the last channels taken from a group (its highest scores
    among those removed) are given back, since CPU and GPU kernels run much slower on odd widths."""
    plan: dict[int, list[int]] = {}
    for index, channel in order[:count]:
        plan.setdefault(index, []).append(channel)
    if round_to > 1:
        if sizes is None:
            raise ValueError("removal_plan needs the group sizes to round widths.")
        for index, channels in list(plan.items()):
            kept = sizes[index] - len(channels)
            rounded = min(sizes[index], -(-kept // round_to) * round_to)
            plan[index] = channels[: len(channels) - (rounded - kept)]
            if not plan[index]:
                del plan[index]
    return plan


def prunable_channels(groups: Sequence[ChannelGroup], uncoupled_only: bool = False) -> int:
    """Channels in the groups a method may prune: the denominator of a pruning ratio."""
    return sum(g.size for g in groups if not (uncoupled_only and g.coupled))
