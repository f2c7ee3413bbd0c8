"""Where the removals go: cost tables of the model's parts at each width, and the search under a budget.

A *unit* is the smallest module that holds every layer of some structure groups (a ViT layer's attention,
its MLP, the convolutions of a ResNet block): its cost depends only on its own widths and on the widths of
the residual streams it reads or writes. A stream's layers outside every such unit (a stem, a projection
shortcut, the classifier) form units of their own, one per parent module. Each unit has *options* (one kept
width per group it depends on, from `kept_widths`; a stream's widths are the same in every unit); its cost
at each option is measured on the unit alone, sliced to those widths (MACs and parameters are counted;
latency is timed on this machine, options taking turns, at the batch size of the target). The model's cost
is a fixed part (what no unit holds: activations, pooling, the adds of the residuals) plus the units'
costs. `allocate` picks one option per unit that minimises the summed error under a budget by dynamic
programming over discretised costs (SPDY's search, exact up to the discretisation, which rounds every cost
up so that the budget always holds); with streams, the programme also carries the width of the stream at
hand, stream after stream (a unit depends on at most two consecutive streams: a ResNet block reads one
stage's stream and writes the next one).
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
from cap_hf.structured.groups import ChannelGraph, Member
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


def _within(name: str, unit: str) -> bool:
    return name == unit or name.startswith(unit + ".")


@dataclass
class Unit:
    """A module whose cost depends on the widths of `structures` only (its own groups first, then the streams
    it reads or writes); `options[o]` gives each one's kept width, `costs[metric][o]` the unit's cost at it.
    Option 0 keeps the fewest channels of every group, the last option keeps them all."""

    name: str
    module: nn.Module
    structures: list[Structures]
    options: list[tuple[int, ...]]
    costs: dict[str, np.ndarray] = field(default_factory=dict)

    def members(self, s: Structures) -> list[tuple[Member, str]]:
        """The layers of group `s` inside this unit, each with "out" (producers, norms) or "in" (readers)."""
        g = s.group
        return [(m, side) for members, side in ((g.producers, "out"), (g.norms, "out"), (g.consumers, "in"))
                for m in members if _within(m.name, self.name)]


def stream_widths(s: Structures, levels: int, round_to: int = 1) -> list[int]:
    """A stream's widths: half as many as a unit's own group gets (every unit that reads or writes the stream
    multiplies its options by them)."""
    return kept_widths(s.group.size, max(2, levels // 2), round_to)


def find_units(model: nn.Module, found: Sequence[Structures], levels: int, round_to: int = 1) -> list[Unit]:
    """The units of `found` (structures that share a module, or nest in each other's, are one unit; a stream's
    layers outside them are grouped by parent module). A unit has at most 4 x levels^2 options: its streams'
    widths times its own groups' (at most `levels` each, fewer when they are several or the streams many)."""
    prefixes = []
    own = [s for s in found if not s.stream]
    for s in own:
        members = s.group.producers + s.group.consumers + s.group.norms
        prefixes.append(_common_prefix([m.name for m in members]))
    units: dict[str, list[Structures]] = {}
    for prefix, s in sorted(zip(prefixes, own, strict=True), key=lambda item: len(item[0])):
        outer = next((name for name in units if _within(prefix, name)), prefix)
        units.setdefault(outer, []).append(s)
    inner = list(units)
    depends: dict[str, list[Structures]] = {name: [] for name in units}
    for s in (s for s in found if s.stream):
        for m in s.group.producers + s.group.norms + s.group.consumers:
            name = next((u for u in inner if _within(m.name, u)), None)
            if name is None:  # outside every unit: its parent module, unless that holds a unit (then itself)
                parent = m.name.rpartition(".")[0]
                name = m.name if not parent or any(_within(u, parent) for u in inner) else parent
                name = next((u for u in depends if u not in inner and _within(name, u)), name)
            if s not in depends.setdefault(name, []):
                depends[name].append(s)
    modules = dict(model.named_modules())
    result = []
    for name, streams in depends.items():
        members = units.get(name, [])
        choices = [stream_widths(s, levels, round_to) for s in streams]
        room = 4 * levels ** 2 / math.prod(len(c) for c in choices)  # the options left to the unit's own groups
        per = min(levels, max(2, math.floor(room ** (1 / max(1, len(members)) + 1e-9))))
        choices = [kept_widths(s.group.size, per, round_to) for s in members] + choices
        result.append(Unit(name, modules[name], members + streams, list(itertools.product(*choices))))
    order = {s.name: i for i, s in enumerate(found)}
    return sorted(result, key=lambda u: min(order[s.name] for s in u.structures))


def _local(unit: Unit, name: str) -> str:
    if name == unit.name:
        return ""
    return name[len(unit.name) + 1:] if unit.name else name


@torch.no_grad()
def sliced(graph: ChannelGraph, unit: Unit, widths: Sequence[int]) -> nn.Module:
    """A copy of the unit's module with each group cut to the given width (its first channels: the cost does
    not depend on which)."""
    work = copy.deepcopy(unit.module)
    for s, width in zip(unit.structures, widths, strict=True):
        drop = list(range(width, s.group.size))
        if not drop:
            continue
        for member, side in unit.members(s):
            pruner = graph.dependencies.get_pruner_of_module(member.module)
            target = work.get_submodule(_local(unit, member.name))
            cut = pruner.prune_out_channels if side == "out" else pruner.prune_in_channels
            cut(target, s.group.indices(member, drop))
    return work.eval()


def _read_stream(unit: Unit) -> int | None:
    """The position in unit.structures of the stream the unit reads from its input, if any."""
    read = [i for i, s in enumerate(unit.structures) if s.stream and any(side == "in" for _, side in unit.members(s))]
    if len(read) > 1:
        raise ValueError(f"{unit.name} reads {len(read)} residual streams; a unit may read one.")
    return read[0] if read else None


def _cut(args: tuple, size: int, width: int) -> tuple:
    """The unit's input with the read stream cut to `width` channels (dimension 1, where the dense input has
    the stream's `size`)."""
    first, *rest = args
    if not torch.is_tensor(first) or first.dim() < 2 or first.shape[1] != size:
        raise ValueError(f"A unit's input of shape {tuple(getattr(first, 'shape', ()))} does not carry the stream's "
                         f"{size} channels in dimension 1.")
    return (first[:, :width].contiguous(), *rest)


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


CHUNK = 64  # options sliced and timed together (their copies are held at once)


def measure_units(graph: ChannelGraph, units: Sequence[Unit], metric: str, batch_size: int = 64, repeats: int = 10
                  ) -> None:
    """Fill unit.costs[metric] for every option (latency in ms at `batch_size`, MACs per image, parameters)."""
    inputs = unit_inputs(graph.model, units, graph.image_size)
    for unit in units:
        args, kwargs = inputs[unit.name]
        if metric == "latency":
            args, kwargs = _batched(args, batch_size), {k: _batched(v, batch_size) for k, v in kwargs.items()}
        read = _read_stream(unit)
        values = []
        for first in range(0, len(unit.options), CHUNK):
            options = unit.options[first:first + CHUNK]
            parts = [sliced(graph, unit, widths) for widths in options]
            given = [args if read is None else _cut(args, unit.structures[read].group.size, widths[read])
                     for widths in options]
            if metric == "params":
                values += [sum(p.numel() for p in part.parameters()) for part in parts]
            elif metric == "macs":
                values += [module_macs(part, a, kwargs) for part, a in zip(parts, given, strict=True)]
            else:
                calls = [functools.partial(part, *a, **kwargs) for part, a in zip(parts, given, strict=True)]
                values += time_calls(calls, repeats, warmup=2, cuda=next(unit.module.parameters()).is_cuda)
        unit.costs[metric] = np.asarray(values, dtype=np.float64)


def _fold(best: np.ndarray, ticks: np.ndarray, errors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """best[b] = the least error using b buckets so far; add one unit with these options: (new best, the option
    behind each entry or -1)."""
    buckets = len(best) - 1
    new = np.full(buckets + 1, np.inf)
    choice = np.full(buckets + 1, -1, dtype=np.int32)
    for option, (tick, err) in enumerate(zip(ticks, errors, strict=True)):
        if tick > buckets:
            continue
        candidate = np.full(buckets + 1, np.inf)
        candidate[tick:] = best[:buckets + 1 - tick] + err
        better = candidate < new
        new[better], choice[better] = candidate[better], option
    return new, choice


def allocate(costs: Sequence[np.ndarray], errors: Sequence[np.ndarray], budget: float, buckets: int = BUCKETS,
             stream_errors: Sequence[np.ndarray] = (), stream_options: Sequence[np.ndarray] | None = None
             ) -> list[int] | None:
    """One option per unit minimising the summed error with summed cost <= budget (None when no choice fits).

    Costs are rounded up to multiples of budget / buckets, so the answer always fits; the dynamic program
    keeps, for every used number of buckets, the least error and the option that gave it. With streams,
    `stream_errors[k][a]` is stream k's error at its width a and `stream_options[u][o, k]` the width of
    stream k that option o of unit u implies (-1: u does not depend on k). A unit depends on at most two
    streams, consecutive in the order given; the program carries the current stream's width.
    """
    if budget <= 0:
        return None
    step = budget / buckets
    ticks = [np.maximum(np.ceil(np.asarray(c) / step - 1e-9), 0).astype(np.int64) for c in costs]
    errors = [np.asarray(e, dtype=np.float64) for e in errors]
    streams = len(stream_errors)
    links = stream_options if stream_options is not None else [np.full((len(c), 0), -1) for c in costs]
    depends = [np.flatnonzero((np.asarray(link) >= 0).any(axis=0)).tolist() for link in links]
    for u, d in enumerate(depends):
        if len(d) > 2 or (len(d) == 2 and d[1] != d[0] + 1):
            raise ValueError(f"Unit {u} depends on streams {d}; at most two consecutive streams are supported.")
    last = [d[-1] if d else -1 for d in depends]

    def fold_units(vec, units, previous, current, k):
        """Fold `units` (last stream k) at stream widths (previous, current): the new vector, each unit's choices."""
        choices = []
        for u in units:
            if k < 0:
                idx = np.arange(len(ticks[u]))
            else:
                mask = links[u][:, k] == current
                if k - 1 in depends[u]:
                    mask &= links[u][:, k - 1] == previous
                idx = np.flatnonzero(mask)
            vec, choice = _fold(vec, ticks[u][idx], errors[u][idx])
            choices.append(np.where(choice >= 0, idx[np.maximum(choice, 0)] if len(idx) else -1, -1))
        return vec, choices

    start = np.full(buckets + 1, np.inf)
    start[0] = 0.0
    free = [u for u in range(len(costs)) if last[u] == -1]
    vec, free_choices = fold_units(start, free, None, None, -1)
    states = {-1: vec}  # the stream width so far -> least error per used bucket
    trail = []
    for k in range(streams):
        units = [u for u in range(len(costs)) if last[u] == k]
        new_states, back = {}, {}
        for a, stream_error in enumerate(stream_errors[k]):
            best, arg, per_previous = None, None, {}
            for previous, before in states.items():
                vec, choices = fold_units(before + stream_error, units, previous, a, k)
                per_previous[previous] = choices
                if best is None:
                    best, arg = vec, np.full(buckets + 1, previous, dtype=np.int32)
                else:
                    better = vec < best
                    best[better], arg[better] = vec[better], previous
            new_states[a], back[a] = best, (arg, per_previous)
        trail.append((units, back))
        states = new_states
    current = min(states, key=lambda a: states[a].min())
    end = int(np.argmin(states[current]))
    if not np.isfinite(states[current][end]):
        return None
    picked = [-1] * len(costs)

    def unfold(units, choices, end):
        for u, choice in zip(reversed(units), reversed(choices), strict=True):
            picked[u] = int(choice[end])
            end -= int(ticks[u][picked[u]])
        return end

    for k in reversed(range(streams)):
        units, back = trail[k]
        arg, per_previous = back[current]
        previous = int(arg[end])
        end = unfold(units, per_previous[previous], end)
        current = previous
    unfold(free, free_choices, end)
    return picked
