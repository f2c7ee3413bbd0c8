"""Where the removals go: cost tables of the model's parts at each width, and the search under a budget.

A *unit* is the smallest module that holds every layer of some structure groups (a ViT layer's attention,
its MLP, a ResNet block): its cost depends only on its own widths. Each unit has *options* (one kept width
per group in it, from `kept_widths`); its cost at each option is measured on the unit alone, sliced to
those widths (MACs and parameters are counted; latency is timed on this machine, options taking turns, at
the batch size of the target). The model's cost is a fixed part (embeddings, stem, heads, norms: the dense
total minus the units) plus the units' costs; `allocate` picks one option per unit that minimises the
summed error under a budget by dynamic programming over discretised costs (SPDY's search, exact up to the
discretisation, which rounds every cost up so that the budget always holds).
"""

from __future__ import annotations

import copy
import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from cap_hf.structured.curvature import Structures
from cap_hf.structured.groups import ChannelGraph
from cap_hf.structured.measure import images, module_macs, time_calls

METRICS = ("latency", "macs", "params")
BUCKETS = 10_000  # cost resolution of the search: 1/10,000 of the budget


def kept_widths(size: int, levels: int, round_to: int = 1) -> list[int]:
    """The widths a group of `size` channels may keep: every width when size <= levels, else `levels` widths
    spread evenly (multiples of round_to where possible), always with size itself and never 0."""
    if size <= levels:
        widths = set(range(1, size + 1))
    else:
        widths = {max(1, round(size * i / levels)) for i in range(1, levels + 1)}
    if round_to > 1:
        widths = {min(size, max(round_to, round_to * round(w / round_to))) for w in widths}
    return sorted(widths | {size})


def _common_prefix(names: Sequence[str]) -> str:
    parts = [name.split(".") for name in names]
    common = []
    for pieces in zip(*parts, strict=False):
        if len(set(pieces)) != 1:
            break
        common.append(pieces[0])
    return ".".join(common)


@dataclass
class Unit:
    """A module whose cost depends on the widths of `structures` only; `options[o]` gives each one's kept
    width, `costs[metric][o]` the unit's cost at it."""

    name: str
    module: nn.Module
    structures: list[Structures]
    options: list[tuple[int, ...]]
    costs: dict[str, np.ndarray] = field(default_factory=dict)


def find_units(model: nn.Module, found: Sequence[Structures], levels: int, round_to: int = 1) -> list[Unit]:
    """The units of `found` (structures that share a module, or nest in each other's, are one unit). Each
    unit's widths per structure: `levels` for a unit of one, fewer for more (at most levels^2 options)."""
    prefixes = []
    for s in found:
        members = s.group.producers + s.group.consumers + s.group.norms
        prefixes.append(_common_prefix([m.name for m in members]))
    units: dict[str, list[Structures]] = {}
    for prefix, s in sorted(zip(prefixes, found, strict=True), key=lambda item: len(item[0])):
        outer = next((name for name in units if prefix == name or prefix.startswith(name + ".")), prefix)
        units.setdefault(outer, []).append(s)
    modules = dict(model.named_modules())
    result = []
    for name, members in units.items():
        per = levels if len(members) == 1 else max(2, math.floor(levels ** (2 / len(members))))
        choices = [kept_widths(s.group.size, per, round_to) for s in members]
        result.append(Unit(name, modules[name], members, list(itertools.product(*choices))))
    order = {s.name: i for i, s in enumerate(found)}
    return sorted(result, key=lambda u: min(order[s.name] for s in u.structures))


def _local(unit: Unit, name: str) -> str:
    return name[len(unit.name) + 1:] if unit.name else name


@torch.no_grad()
def sliced(graph: ChannelGraph, unit: Unit, widths: Sequence[int]) -> nn.Module:
    """A copy of the unit's module with each structure group cut to the given width (its first channels: the
    cost does not depend on which)."""
    work = copy.deepcopy(unit.module)
    for s, width in zip(unit.structures, widths, strict=True):
        drop = list(range(width, s.group.size))
        if not drop:
            continue
        for members, side in ((s.group.producers, "out"), (s.group.norms, "out"), (s.group.consumers, "in")):
            for member in members:
                pruner = graph.dependencies.get_pruner_of_module(member.module)
                target = work.get_submodule(_local(unit, member.name))
                cut = pruner.prune_out_channels if side == "out" else pruner.prune_in_channels
                cut(target, s.group.indices(member, drop))
    return work.eval()


def unit_inputs(model: nn.Module, units: Sequence[Unit], image_size) -> dict[str, tuple[tuple, dict]]:
    """The positional and keyword arguments each unit's module receives for one image."""
    captured = {}

    def capture(name):
        def hook(module, args, kwargs):
            captured.setdefault(name, (args, kwargs))
        return hook

    hooks = [u.module.register_forward_pre_hook(capture(u.name), with_kwargs=True) for u in units]
    try:
        with torch.inference_mode():
            model(pixel_values=images(model, 1, image_size))
    finally:
        for hook in hooks:
            hook.remove()
    return captured


def _batched(value, batch_size: int):
    if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == 1:
        return value.expand(batch_size, *value.shape[1:]).clone()
    if isinstance(value, tuple):
        return tuple(_batched(v, batch_size) for v in value)
    return value


def measure_units(graph: ChannelGraph, units: Sequence[Unit], metric: str, batch_size: int = 64, repeats: int = 10
                  ) -> None:
    """Fill unit.costs[metric] for every option (latency in ms at `batch_size`, MACs per image, parameters)."""
    inputs = unit_inputs(graph.model, units, graph.image_size)
    for unit in units:
        args, kwargs = inputs[unit.name]
        parts = [sliced(graph, unit, widths) for widths in unit.options]
        if metric == "params":
            values = [sum(p.numel() for p in part.parameters()) for part in parts]
        elif metric == "macs":
            values = [module_macs(part, args, kwargs) for part in parts]
        else:
            args, kwargs = _batched(args, batch_size), {k: _batched(v, batch_size) for k, v in kwargs.items()}
            calls = [functools.partial(part, *args, **kwargs) for part in parts]
            values = time_calls(calls, repeats, warmup=2, cuda=next(unit.module.parameters()).is_cuda)
        unit.costs[metric] = np.asarray(values, dtype=np.float64)


def allocate(costs: Sequence[np.ndarray], errors: Sequence[np.ndarray], budget: float, buckets: int = BUCKETS
             ) -> list[int] | None:
    """One option per unit minimising the summed error with summed cost <= budget (None when no choice fits).

    Costs are rounded up to multiples of budget / buckets, so the answer always fits; the dynamic program
    keeps, for every used number of buckets, the least error and the option that gave it.
    """
    if budget <= 0:
        return None
    step = budget / buckets
    best = np.full(buckets + 1, np.inf)
    best[0] = 0.0
    choices = []
    for cost, error in zip(costs, errors, strict=True):
        ticks = np.ceil(np.asarray(cost) / step - 1e-9).astype(np.int64)
        new = np.full(buckets + 1, np.inf)
        choice = np.full(buckets + 1, -1, dtype=np.int64)
        for option, (tick, err) in enumerate(zip(ticks, error, strict=True)):
            if tick > buckets:
                continue
            candidate = np.full(buckets + 1, np.inf)
            candidate[max(tick, 0):] = best[:buckets + 1 - max(tick, 0)] + err
            better = candidate < new
            new[better], choice[better] = candidate[better], option
        best = new
        choices.append(choice)
    end = int(np.argmin(best))
    if not np.isfinite(best[end]):
        return None
    picked = []
    for cost, choice in zip(reversed(costs), reversed(choices), strict=True):
        option = int(choice[end])
        picked.append(option)
        end -= max(int(np.ceil(np.asarray(cost)[option] / step - 1e-9)), 0)
    return picked[::-1]
