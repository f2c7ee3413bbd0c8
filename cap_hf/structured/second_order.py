"""Second-order structured pruning: whole heads, neurons and block channels removed, the remaining weights
compensated (the OBS update of a group of columns), the removals spent where they cost least per unit of
the target (latency measured on this machine, MACs or parameters). ZipLM's recipe (Kurtic et al., 2023)
on the project's channel groups, with the layer-wise Hessian ("obs") or the empirical Fisher ("cap").

```
prune_second_order(model, image_size, batches, "obs", target_speedup=1.5)
  graph = ChannelGraph(model)                  # groups.py; the groups and their readers (streams: several)
  units = find_units(...)                      # allocate.py; widths per group, cost tables per unit
  check: the target is reachable, the calibration data and the memory are enough
  curvature = hessians(...) | fishers(...)     # curvature.py
  database = greedy_removal(...) per group     # greedy.py: order + cumulative error at every width
  options = allocate(costs, errors, budget)    # allocate.py: dynamic programming (carrying stream widths)
  small = remove_channels(compensated copy)    # the weights of each chosen width, replayed; then sliced
  (latency) measure; if short, tighten the budget by what the prediction missed and search again
  with streams: one such search per weight of the streams' errors (STREAM_WEIGHTS); the model whose output
  is closest to the dense model's on the first calibration images is kept
```
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from cap_hf.engine.calibration import first_images
from cap_hf.engine.feature_fisher import FeatureFisherLoss
from cap_hf.engine.plan import MemoryBudgetError
from cap_hf.evaluation.features import linear_cka
from cap_hf.structured.allocate import Unit, allocate, find_units, measure_units, stream_widths
from cap_hf.structured.config import StructuredConfig, as_config, removal_record
from cap_hf.structured.curvature import (
    Structures,
    find_structures,
    fishers,
    hessians,
    images_needed,
)
from cap_hf.structured.greedy import greedy_removal, inverse_curvature
from cap_hf.structured.groups import ChannelGraph, remove_channels
from cap_hf.structured.measure import count_macs, count_parameters, latencies_ms

logger = logging.getLogger(__name__)

CORRECTIONS = 4  # latency targets: searches after the first (the budget scaled by the miss, then bisected)
SLACK = 0.05  # a measured speed-up this far above the target is close enough (else the budget is loosened)
STREAM_WEIGHTS = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)  # the streams' errors times each, one search each: the layer-wise errors miss
# how a stream's loss builds up through the depth; the model closest to the dense one on the calibration images wins
SELECTION_IMAGES = 256  # calibration images that choose among them


@dataclass
class SecondOrderPruning:
    """What a run did: per group its channels before and after and its error; the search's steps."""

    method: str
    metric: str
    target: float  # the speed-up, or the ratio of MACs / parameters asked for
    calibration: int  # images (obs) or gradients (cap)
    relative_damp: float
    levels: int
    round_to: int
    plan: dict[int, list[int]]
    widths: dict[str, tuple[int, int]]
    units: dict[str, int]
    errors: dict[str, float]
    table: list[dict] = field(default_factory=list)  # per unit: options, costs, chosen
    search: list[dict] = field(default_factory=list)  # per search: budget, predicted, measured; "kept" marks the result
    seconds: dict[str, float] = field(default_factory=dict)
    layer_scales_folded: int = 0  # a DINOv2's layer scales, folded into the weights before them (fold_layer_scales)
    fisher_objective: str = "cross_entropy"  # cap: the loss of the gradients ("features": a backbone's, no labels)

    @property
    def removed(self) -> int:
        return sum(len(channels) for channels in self.plan.values())

    @property
    def prunable(self) -> int:
        return sum(before for before, _ in self.widths.values())

    def results(self) -> dict:
        """The keys of structured_prune.py's results.json that this run fills."""
        return {**removal_record(self.removed, self.prunable, self.widths, self.units), "round_to": self.round_to,
                "normalize": None,
                "speedup_search": [{"removed_channels": s["removed"], "speedup": s["measured"], "kept": s["kept"]}
                                   for s in self.search if self.metric == "latency"],
                "second_order": {"curvature": self.method, "metric": self.metric, "target": self.target,
                                 "calibration": self.calibration, "relative_damp": self.relative_damp,
                                 "levels": self.levels, "group_errors": self.errors, "cost_table": self.table,
                                 "searches": self.search, "seconds": self.seconds,
                                 "layer_scales_folded": self.layer_scales_folded,
                                 **({"fisher_objective": self.fisher_objective} if self.method == "cap" else {})}}


def curvature_bytes(found: Sequence[Structures]) -> tuple[int, str, int]:
    """(bytes of every curvature held at once, the widest reader, the bytes while its group is pruned): float64
    d_in x d_in per reader; pruning a group holds, per reader, its curvature, the inverse and a working copy."""
    readers = [r for s in found for r in s.readers]
    total = sum(8 * r.d_in ** 2 for r in readers)
    widest = max(readers, key=lambda r: r.d_in)
    peak = max(sum(3 * 8 * r.d_in ** 2 for r in s.readers) for s in found)
    return total, widest.name, peak


def _describe(metric: str, value: float) -> str:
    return {"latency": "target_speedup", "macs": "flops_ratio", "params": "params_ratio"}[metric] + f" {value:g}"


def _reachable(metric: str, value: float, best: float) -> ValueError:
    what = f"{best:.3g}x" if metric == "latency" else f"{best:.3g}"
    limit = "largest" if metric == "latency" else "lowest"
    return ValueError(f"{_describe(metric, value)} cannot be reached by removing heads, MLP neurons, block channels "
                      f"and residual-stream channels (every group keeps at least one; streams through a LayerNorm "
                      f"are kept whole): the {limit} reachable is {what}.")


def prune_second_order(
    model: nn.Module,
    image_size: int | Sequence[int],
    batches: Iterable[Mapping[str, torch.Tensor]] | Callable[[], Iterable[Mapping[str, torch.Tensor]]],
    config: StructuredConfig | str = "obs",
    *,
    label_free: bool = False,
    loss_fn: Callable | None = None,
    seed: int = 0,
    **fields,
) -> tuple[nn.Module, SecondOrderPruning]:
    """A physically smaller, compensated copy of `model` (eval mode) and what was done.

    `config`: a StructuredConfig, or "obs" / "cap" with its fields as keywords (`prune_second_order(model, 224,
    batches, "obs", flops_ratio=0.5, calibration_samples=512)`). `batches` (or a callable returning them) are
    calibration batches of {"pixel_values"[, "labels"]}: `calibration_samples` images in all for "obs" (the
    Hessian), as many batches = gradients for "cap" (the Fisher; labels, or `label_free` / `loss_fn` as in
    cap_hf.engine.gradients.iter_gradients). One target:
    `target_speedup` (measured at `speedup_batch_size` on this machine: the cost tables are timed, the built
    model is measured, and up to CORRECTIONS further searches move the budget: scaled by what the prediction
    missed, then bisected between one that met the target and one that missed), `flops_ratio` or `params_ratio` (counted). Checked before the curvature is collected: the
    target can be reached, `calibration_samples` is enough for the widest reader's curvature, the curvatures fit in
    `max_memory_gb`. `uncoupled_only` keeps the residual streams whole; a stream whose reader's curvature needs
    more calibration than given is kept whole with a warning. With streams, the search runs once per weight
    of their errors against the others' (STREAM_WEIGHTS) and keeps the model (among those that met the target)
    whose output is closest to the dense model's on the first SELECTION_IMAGES calibration images
    (`output_distance`: no labels).
    """
    config = as_config(config, **fields)
    if config.kind != "second_order":
        raise ValueError(f"prune_second_order takes obs or cap, got {config.method!r} (prune_channels scores channels).")
    method, calibration, levels, round_to = config.method, config.calibration_samples, config.levels, config.round_to
    relative_damp, uncoupled_only, max_memory_gb = config.relative_damp, config.uncoupled_only, config.max_memory_gb
    speedup_batch_size, repeats = config.speedup_batch_size, config.search_repeats
    name, target = config.target
    metric = {"target_speedup": "latency", "flops_ratio": "macs", "params_ratio": "params"}[name]
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    model, folded_scales = fold_layer_scales(model)
    graph = ChannelGraph(model, image_size)
    found = find_structures(graph, shift=method == "obs", streams=not uncoupled_only)
    if not found:
        raise ValueError(f"{type(model).__name__} has no heads, MLP neurons or block channels to remove.")
    what = "calibration images" if method == "obs" else "Fisher gradients (calibration batches)"
    needed, widest = images_needed(graph, [s for s in found if not s.stream], method)
    if calibration < needed:
        raise ValueError(f"{calibration} {what} cannot give a full-rank curvature of {widest}: it needs at least "
                         f"{needed}. Give more calibration data.")
    for stream in [s for s in found if s.stream]:
        stream_needs, reader = images_needed(graph, [stream], method)
        if calibration < stream_needs:  # a wide stream read by a classifier on pooled features: one row an image
            logger.warning("The residual stream %s is kept whole: the curvature of its reader %s needs at least %d %s "
                           "(given %d).", stream.name, reader, stream_needs, what, calibration)
            found.remove(stream)
        needed = max(needed, stream_needs if stream in found else 0)
    units = find_units(model, found, levels, round_to)
    if max_memory_gb is not None:
        total, name, peak = curvature_bytes(found)
        if total + peak > max_memory_gb * 2 ** 30:
            raise MemoryBudgetError(
                f"max_memory_gb {max_memory_gb:g} is too small for the curvatures: {total / 2 ** 30:.2f} GB for all "
                f"readers plus {peak / 2 ** 30:.2f} GB while the largest group is pruned (the widest reader is "
                f"{name}); give at least {(total + peak) / 2 ** 30:.2f}.")

    measure_units(graph, units, metric, speedup_batch_size, repeats)
    if metric == "latency":
        dense_total = latencies_ms([model], image_size, speedup_batch_size, repeats)[0]
    else:
        dense_total = float(count_macs(model, image_size) if metric == "macs" else count_parameters(model))
    fixed = dense_total - sum(float(u.costs[metric][-1]) for u in units)  # the last option keeps every width
    lowest = fixed + sum(float(u.costs[metric][0]) for u in units)  # option 0: the fewest channels everywhere
    reachable = dense_total / lowest if metric == "latency" else lowest / dense_total
    budget = dense_total / target if metric == "latency" else dense_total * target
    if metric == "latency" and reachable < target:
        # the units timed alone can miss the model's time (call overheads): measure the smallest model before refusing
        smallest = {s.group.index: list(range(s.group.size - width)) for u in units
                    for s, width in zip(u.structures, u.options[0], strict=True)}
        dense_ms, pruned_ms = latencies_ms([model, remove_channels(model, graph, smallest)], image_size,
                                           speedup_batch_size, repeats)
        reachable = dense_ms / pruned_ms
        if reachable >= target:  # the target's time in the tables' units: their ratio to the measured time,
            wanted = dense_ms / target  # interpolated between the smallest model and the dense one
            share = (wanted - pruned_ms) / (dense_ms - pruned_ms)
            budget = wanted * (lowest / pruned_ms + share * (dense_total / dense_ms - lowest / pruned_ms))
    if (metric == "latency" and reachable < target) or (metric != "latency" and reachable > target):
        raise _reachable(metric, target, reachable)
    seconds["tables"] = time.perf_counter() - start

    start = time.perf_counter()
    source = batches() if callable(batches) else batches
    held: list[torch.Tensor] = []  # the first calibration images, to choose the streams' weight on
    if method == "obs":
        curvatures, seen = hessians(model, found, _keeping(first_images(source, calibration), held))
    else:
        curvatures, seen = fishers(model, found, _keeping(source, held), calibration, label_free=label_free,
                                   loss_fn=loss_fn, seed=seed), calibration
    if seen < needed:
        raise ValueError(f"The calibration batches held {seen} images; the curvature of {widest} needs at least {needed}.")
    seconds["curvature"] = time.perf_counter() - start

    start = time.perf_counter()
    orders, errors, inverses, scales_of = {}, {}, {}, {}
    for s in found:
        weights = [r.weight(model) for r in s.readers]
        scales = [1.0] * len(s.readers)
        for i, r in enumerate(s.readers):
            inverses[r.name] = inverse_curvature(curvatures[r.name], relative_damp)
            if method == "obs":  # the output lost, as a fraction of the layer's output: layers of any scale compare
                w = weights[i].double()
                scales[i] = float(torch.einsum("ij,jk,ik->", w, curvatures[r.name], w)) or 1.0
            del curvatures[r.name]
        removal = greedy_removal(weights, [inverses[r.name] for r in s.readers], [r.columns for r in s.readers],
                                 stop=s.group.size - 1, scales=scales)
        orders[s.name], errors[s.name], scales_of[s.name] = removal.order, np.asarray(removal.errors), scales
    seconds["database"] = time.perf_counter() - start

    streams = [s for s in found if s.stream]
    unit_errors = [np.asarray([sum(errors[s.name][s.group.size - w] for s, w in zip(u.structures, option, strict=True)
                                   if not s.stream) for option in u.options]) for u in units]
    widths_of = {st.name: stream_widths(st, levels, round_to) for st in streams}
    stream_options = [_stream_options(u, streams, widths_of) for u in units]
    stream_errors = [np.asarray([errors[st.name][st.group.size - w] for w in widths_of[st.name]]) for st in streams]
    replays: dict = {}  # (group, removals) -> the replayed Removal, shared by every build

    def search_budget(weight: float) -> tuple[nn.Module, dict, list[int], list[dict], dict]:
        """The model for one weight of the streams' errors: one DP for a counted target; for latency, up to
        1 + CORRECTIONS builds, each measured, keeping the one that met the target with the largest budget."""
        steps, current = [], budget
        met_at, missed_at = None, None  # the largest budget whose model met the target, the smallest that missed
        kept = None
        for attempt in range(1 + (CORRECTIONS if metric == "latency" else 0)):
            picked = allocate([u.costs[metric] for u in units], unit_errors, current - fixed,
                              stream_errors=[weight * e for e in stream_errors], stream_options=stream_options)
            if picked is None:  # below the tables' smallest model (the checks above found it reaches the target)
                picked = [0] * len(units)
            small, plan = _build(model, graph, units, picked, orders, inverses, scales_of, replays)
            error = sum(e[o] for e, o in zip(unit_errors, picked, strict=True))
            error += sum(float(errors[st.name][len(plan.get(st.group.index, []))]) for st in streams)
            predicted = fixed + sum(float(u.costs[metric][o]) for u, o in zip(units, picked, strict=True))
            step = {"kept": False, "stream_weight": weight, "budget": current, "predicted": predicted,
                    "removed": sum(map(len, plan.values())), "error": float(error)}
            steps.append(step)
            if metric != "latency":
                step["measured"] = step["predicted"] / dense_total
                return small, plan, picked, steps, step
            dense_ms, pruned_ms = latencies_ms([model, small], image_size, speedup_batch_size, 3 * repeats)
            step.update(measured=dense_ms / pruned_ms, predicted_speedup=dense_total / predicted)
            logger.info("Streams' errors x%g, search %d: predicted %.2fx, measured %.2fx at batch %d", weight,
                        attempt + 1, step["predicted_speedup"], step["measured"], speedup_batch_size)
            if step["measured"] >= target:
                kept = (small, plan, picked, steps, step)
                met_at = current
                if step["measured"] <= target * (1 + SLACK):
                    break
            else:
                missed_at = current
            if met_at is not None and missed_at is not None:
                current = (met_at + missed_at) / 2  # bisection between a budget that met and one that missed
            else:  # units timed alone miss the model's real time: the target's time at this build's ratio of the two
                current = dense_ms / target * predicted / pruned_ms
        return kept or (small, plan, picked, steps, step)

    start = time.perf_counter()
    search: list[dict] = []
    weights = STREAM_WEIGHTS if streams and held else (1.0,)
    best = None
    for weight in weights:
        small, plan, picked, steps, step = search_budget(weight)
        search += steps
        met = metric != "latency" or step["measured"] >= target
        if len(weights) > 1:
            step["output_distance"] = output_distance(model, small, held)
        key = (not met, step.get("output_distance", 0.0))
        if best is None or key < best[0]:
            best = (key, small, plan, picked, step)
    _, small, plan, picked, step = best
    step["kept"] = True
    seconds["search"] = time.perf_counter() - start

    widths = {g.name: (g.size, g.size - len(plan.get(g.index, []))) for g in (s.group for s in found)}
    table = [{"unit": u.name, "groups": [s.group.name for s in u.structures], "options": [list(o) for o in u.options],
              metric: u.costs[metric].tolist(), "chosen": int(o)} for u, o in zip(units, picked, strict=True)]
    group_errors = {s.group.name: float(errors[s.name][s.group.size - widths[s.group.name][1]]) for s in found}
    record = SecondOrderPruning(method, metric, target, seen, relative_damp, levels, round_to, plan, widths,
                                {s.group.name: s.group.unit for s in found if s.group.unit > 1}, group_errors, table,
                                search, seconds, folded_scales,
                                "features" if isinstance(loss_fn, FeatureFisherLoss) else
                                "label_free" if label_free or loss_fn is not None else "cross_entropy")
    return small, record


@torch.no_grad()
def fold_layer_scales(model: nn.Module) -> tuple[nn.Module, int]:
    """(`model` itself, 0) when it has no layer scales; else (a copy that computes the same function with every
    layer scale (a DINOv2 layer's lambda1 after o_proj, and after the MLP's fc2 / down_proj) folded into the
    weights before it and set to 1, how many were folded). The readers' reconstruction errors are then those of
    what each layer adds to the residual stream, so a layer the stream barely hears costs little to prune."""
    if not any(hasattr(m, "layer_scale1") for m in model.modules()):
        return model, 0
    model = copy.deepcopy(model)
    layers = [m for m in model.modules() if hasattr(m, "layer_scale1")]
    for layer in layers:
        mlp_out = layer.mlp.down_proj if hasattr(layer.mlp, "down_proj") else layer.mlp.fc2
        for scale, linear in ((layer.layer_scale1.lambda1, layer.attention.o_proj), (layer.layer_scale2.lambda1, mlp_out)):
            linear.weight.mul_(scale.unsqueeze(1))
            if linear.bias is not None:
                linear.bias.mul_(scale)
            scale.fill_(1.0)
    return model, 2 * len(layers)


def _keeping(batches: Iterable[Mapping[str, torch.Tensor]], held: list[torch.Tensor], count: int = SELECTION_IMAGES):
    """The batches as they are, the first `count` images appended to `held` on the way."""
    kept = 0
    for batch in batches:
        if kept < count:
            pixels = batch["pixel_values"][:count - kept].detach()
            held.append(pixels)
            kept += pixels.shape[0]
        yield batch


def _features(output) -> torch.Tensor:
    """(images, features): the logits, else the pooled output, else the last hidden state averaged over positions."""
    value = getattr(output, "logits", None)
    if value is None:
        value = getattr(output, "pooler_output", None)
    if value is None:
        value = output.last_hidden_state
    if value.dim() == 4:  # (batch, channels, h, w)
        value = value.mean(dim=(2, 3))
    elif value.dim() == 3:  # (batch, tokens, hidden)
        value = value.mean(dim=1)
    return value.flatten(1).double()


@torch.no_grad()
def output_distance(dense: nn.Module, pruned: nn.Module, images: Sequence[torch.Tensor], batch_size: int = 64
                    ) -> float:
    """How far the pruned model's output is from the dense model's on `images` (no labels): the squared error of
    the logits over their energy, or, when the widths differ (a backbone whose last stream was pruned), 1 - the
    linear CKA of the features."""
    device = next(dense.parameters()).device
    pairs = [(_features(dense(pixel_values=x.to(device))), _features(pruned(pixel_values=x.to(device))))
             for x in torch.cat(list(images)).split(batch_size)]
    a, b = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
    if a.shape == b.shape:
        return float((a - b).pow(2).sum() / a.pow(2).sum().clamp_min(1e-12))
    return 1.0 - linear_cka(b, a)


def _stream_options(unit: Unit, streams: Sequence[Structures], widths: Mapping[str, list[int]]) -> np.ndarray:
    """(options, streams): the position of each stream's width in its width list, per option of the unit (-1 for
    the streams the unit does not depend on)."""
    table = np.full((len(unit.options), len(streams)), -1, dtype=np.int64)
    for k, stream in enumerate(streams):
        if stream in unit.structures:
            at = unit.structures.index(stream)
            table[:, k] = [widths[stream.name].index(option[at]) for option in unit.options]
    return table


def _build(model: nn.Module, graph: ChannelGraph, units: Sequence[Unit], picked: Sequence[int],
           orders: Mapping[str, list[int]], inverses: Mapping[str, torch.Tensor],
           scales: Mapping[str, list[float]], replays: dict
           ) -> tuple[nn.Module, dict]:
    """The model with each group cut to its chosen width: the readers' weights of that level replayed from the
    database's curvatures (once per width: `replays` keeps them), written into a copy, then the removed
    channels sliced away."""
    chosen: dict[str, tuple[Structures, int]] = {}
    for unit, option in zip(units, picked, strict=True):
        for s, width in zip(unit.structures, unit.options[option], strict=True):
            if chosen.setdefault(s.name, (s, width))[1] != width:
                raise RuntimeError(f"The search gave the stream {s.name} two widths; please report this.")
    work = copy.deepcopy(model)
    plan = {}
    for s, width in chosen.values():
        count = s.group.size - width
        if not count:
            continue
        removal = replays.get((s.name, count))
        if removal is None:  # the latency search builds several models: each width is replayed once
            removal = replays[(s.name, count)] = greedy_removal(
                [r.weight(model) for r in s.readers], [inverses[r.name] for r in s.readers],
                [r.columns for r in s.readers], stop=count, scales=scales[s.name])
        if removal.order != orders[s.name][:count]:
            raise RuntimeError(f"The replayed removal of {s.name} differs from its database; please report this.")
        for reader, weight in zip(s.readers, removal.weights, strict=True):
            reader.write(work, weight)
        plan[s.group.index] = removal.order
    return remove_channels(work, graph, plan), plan
