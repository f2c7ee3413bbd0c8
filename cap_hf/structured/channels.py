"""One structured pruning run: groups -> scores (once) -> the global greedy order -> how many channels
to remove (a ratio, or the fewest that reach a FLOPs ratio or a measured speed-up) -> a physically smaller model."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from cap_hf.structured.config import StructuredConfig, as_config, removal_record
from cap_hf.structured.groups import ChannelGraph, remove_channels
from cap_hf.structured.measure import count_macs, latencies_ms
from cap_hf.structured.order import (
    channel_scores,
    check_method,
    prunable_channels,
    removal_order,
    removal_plan,
    resolve_normalize,
)

logger = logging.getLogger(__name__)

CONFIRM_PASSES = 3  # the speed-up search's answer is re-measured with this many times the passes
CONFIRM_STEPS = 50  # and, when it falls short, moved along the order by 1/50 of the removable channels


@dataclass
class ChannelPruning:
    """What a run removed: `removed` channels of `prunable` (the channels of the groups it may prune),
    `plan` = {group index: channels}, and the speed-up search's measurements [(removed, speed-up)]."""

    method: str
    normalize: str
    uncoupled_only: bool
    removed: int
    prunable: int
    plan: dict[int, list[int]]
    widths: dict[str, tuple[int, int]]  # group name -> (channels before, after)
    units: dict[str, int] = field(default_factory=dict)  # group name -> indices per channel, for attention heads
    search: list[tuple[int, float]] = field(default_factory=list)
    round_to: int = 1

    @property
    def ratio(self) -> float:
        return self.removed / self.prunable

    def results(self) -> dict:
        """The keys of structured_prune.py's results.json that this run fills."""
        return {**removal_record(self.removed, self.prunable, self.widths, self.units), "round_to": self.round_to,
                "normalize": self.normalize,
                "speedup_search": [{"removed_channels": c, "speedup": s} for c, s in self.search]}


def _reachable_error(what: str, wanted: float, best: float, uncoupled_only: bool) -> ValueError:
    scope = "uncoupled channels only" if uncoupled_only else "every group"
    return ValueError(f"{what} {wanted:g} cannot be reached without emptying a channel group ({scope}); the largest "
                      f"reachable is {best:.3g}.")


def fewest(enough, high: int) -> int:
    """The smallest count in (0, high] for which enough(count) holds, by bisection; enough(high) is known to hold."""
    low = 0
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if enough(middle) else (middle, high)
    return high


def prune_channels(
    model: nn.Module,
    image_size: int | Sequence[int],
    config: StructuredConfig | str = "dfpc",
    *,
    seed: int = 0,
    **fields,
) -> tuple[nn.Module, ChannelPruning]:
    """A physically smaller copy of `model` (eval mode) and what was removed.

    `config`: a StructuredConfig, or a method name ("dfpc", "l1", "random") with its fields as keywords
    (`prune_channels(model, 224, "dfpc", target_speedup=1.5)`). One of `pruning_ratio` (the fraction of the
    prunable channels to remove), `flops_ratio` (the fewest channels whose removal leaves at most this
    fraction of the dense model's MACs) and `target_speedup` (the measured latency of the dense model over the
    pruned one at `speedup_batch_size`, on this machine and thread count, at least this). `round_to` keeps
    every group's width a multiple of it (or whole); `normalize` is channel_scores' (each group's scores over
    their mean, raw as in the paper, or auto: the one measured best for the architecture, recorded resolved in
    the result). The
    speed-up search bisects the number of channels taken from the front of the removal order (the order
    is fixed once the scores are), measuring every candidate, the dense and the pruned model taking turns:
    about log2(channels) candidates of `search_repeats` timed passes each. The answer is then re-measured with
    3 x `search_repeats` passes and, if that reading falls short (timing noise), moved along the order in steps
    of 2% of the removable channels until it holds.
    """
    config = as_config(config, **fields)
    check_method(config.method)
    method, uncoupled_only, round_to = config.method, config.uncoupled_only, config.round_to
    pruning_ratio, flops_ratio, target_speedup = config.pruning_ratio, config.flops_ratio, config.target_speedup
    speedup_batch_size, repeats = config.speedup_batch_size, config.search_repeats
    graph = ChannelGraph(model, image_size)
    normalize = resolve_normalize(graph, config.normalize)
    order = removal_order(graph.groups, channel_scores(graph, method, seed, normalize), uncoupled_only)
    prunable = prunable_channels(graph.groups, uncoupled_only)
    sizes = {g.index: g.size for g in graph.groups}
    search: list[tuple[int, float]] = []

    def plan_for(count: int) -> dict[int, list[int]]:
        return removal_plan(order, count, sizes, round_to)

    if pruning_ratio is not None:
        count = round(pruning_ratio * prunable)
        if count > len(order):
            raise _reachable_error("pruning_ratio", pruning_ratio, len(order) / prunable, uncoupled_only)
    elif flops_ratio is not None:
        dense_macs = count_macs(model, image_size)

        def macs_ratio(count: int) -> float:
            return count_macs(remove_channels(model, graph, plan_for(count)), image_size) / dense_macs

        lowest = macs_ratio(len(order))
        if lowest > flops_ratio:
            raise ValueError(f"flops_ratio {flops_ratio:g} cannot be reached without emptying a channel group; the "
                             f"lowest reachable is {lowest:.3g}.")
        count = fewest(lambda c: macs_ratio(c) <= flops_ratio, len(order))
    else:
        def speedup(count: int, passes: int = repeats) -> float:
            small = remove_channels(model, graph, plan_for(count))
            dense, pruned = latencies_ms([model, small], image_size, speedup_batch_size, passes)
            value = dense / pruned
            search.append((count, value))
            logger.info("%d of %d channels removed: %.2fx measured at batch %d", count, prunable, value,
                        speedup_batch_size)
            return value

        best = speedup(len(order))
        if best < target_speedup:
            raise _reachable_error("target_speedup", target_speedup, best, uncoupled_only)
        count = fewest(lambda c: speedup(c) >= target_speedup, len(order))
        # every reading above is one noisy measurement (a small model's pass takes milliseconds): re-measure
        # the answer with CONFIRM_PASSES x the passes, and follow the order further until that holds too
        step = max(1, len(order) // CONFIRM_STEPS)
        while speedup(count, CONFIRM_PASSES * repeats) < target_speedup:
            if count == len(order):
                raise _reachable_error("target_speedup", target_speedup, search[-1][1], uncoupled_only)
            count = min(len(order), count + step)

    plan = plan_for(count)
    small = remove_channels(model, graph, plan)
    widths = {g.name: (g.size, g.size - len(plan.get(g.index, []))) for g in graph.groups}
    removed = sum(len(channels) for channels in plan.values())
    units = {g.name: g.unit for g in graph.groups if g.unit > 1}
    return small, ChannelPruning(method, normalize, uncoupled_only, removed, prunable, plan, widths, units=units,
                                 search=search, round_to=round_to)
