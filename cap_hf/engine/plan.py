"""The memory plan of a pruning step: which layers share a gradient pass, and where results wait.

The Fisher of all targets is d*B floats (DeiT-Base at B=192: 65 GB). When the whole step fits the
memory available (or `max_memory_gb`), the plan is one group: one pass over the calibration batches
for all layers. Otherwise the layers are split into groups of consecutive layers, from the output to
the input, each group's Fisher and gradient buffers within the budget; every group takes its own pass
over the same batches, and the results of the method kernels wait in the store ("device", "host" or
"disk"). Impossible budgets fail here, before any long work, with what would fit.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import psutil
import torch
from torch import nn

from cap_hf.engine.fisher import (
    INVERSION_CHUNK,
    WOODBURY_BLOCKS,
    WOODBURY_RANK,
    divisor_block_size,
    gradient_rows,
)
from cap_hf.engine.gradients import batch_loss, gradients_only_for
from cap_hf.engine.memory import GB, device_memory_bytes, hwm_bytes, reset_hwm, rss_bytes
from cap_hf.engine.ranks import Ranks, assign_owners, initialised, rows_per_rank
from cap_hf.methods import PruningMethod, get_method
from cap_hf.targets import find_targets

logger = logging.getLogger(__name__)

FLOAT = 4
SELECTION_PER_WEIGHT = 20  # the global threshold: concatenated scores, kthvalue's copy, masks, int64 cumsum of ties
MARGIN_BYTES = 256 * 1024 ** 2  # allocator slack and small tensors


class MemoryBudgetError(ValueError):
    """The memory budget cannot be met; raised before any long work."""


@dataclass
class MemoryPlan:
    groups: list[list[str]]
    store: str  # "device", "host" or "disk"
    block_sizes: dict[str, int]
    budget_bytes: int | None = None  # None: no budget was needed (all at once, within the memory available)
    base_bytes: int = 0
    activation_bytes: int = 0
    kept_bytes: int = 0
    available_bytes: int = 0
    group_bytes: list[int] = field(default_factory=list)
    store_bytes: int = 0
    adjusted: dict[str, int] = field(default_factory=dict)  # layers whose block size is not B
    owners: dict[str, int] = field(default_factory=dict)  # the rank that builds each layer's Fisher and prunes it
    world: int = 1

    def describe(self) -> str:
        if self.budget_bytes is None:
            lines = [f"all {sum(map(len, self.groups))} layers at once (about {self.group_bytes[0] / GB:.2f} GB), "
                     f"results kept on the {self.store}"]
        else:
            lines = [f"memory budget {self.budget_bytes / GB:.2f} GB: in use {self.base_bytes / GB:.2f} GB, "
                     f"activations {self.activation_bytes / GB:.2f} GB, scores and working memory "
                     f"{self.kept_bytes / GB:.2f} GB, left for the Fisher {self.available_bytes / GB:.2f} GB",
                     f"{len(self.groups)} layer group(s), Fisher + working memory per group (GB): "
                     + ", ".join(f"{b / GB:.2f}" for b in self.group_bytes),
                     f"results kept in {self.store} ({self.store_bytes / GB:.2f} GB)"]
        if self.world > 1:
            lines.append(f"{self.world} ranks, sizes per rank (the busiest), layers per rank: "
                         + ", ".join(str(sum(1 for o in self.owners.values() if o == r)) for r in range(self.world)))
        if self.adjusted:
            shown = ", ".join(f"{n} -> {b}" for n, b in list(self.adjusted.items())[:3])
            more = len(self.adjusted) - 3
            lines.append("block size adjusted to divide the layer: " + shown + (
                f" and {more} more (-> {', '.join(map(str, sorted(set(self.adjusted.values()))))})" if more > 0 else ""))
        return "; ".join(lines)


def fisher_kinds(methods: Sequence[PruningMethod]) -> list[str]:
    return sorted({m.fisher for m in methods if m.fisher})


@dataclass(frozen=True)
class LayerCost:
    """Bytes one layer adds to a group: on every rank during the gradient pass (its gradient rows, autograd's
    gradient), on its owner during the pass (its Fisher blocks, and with several ranks the rows received for
    it), and on its owner afterwards (the inverse with the kernels' weights and scores)."""

    every: int
    owner: int
    prepare: int


def layer_cost(numel: int, block: int, kinds: Sequence[str], config, world: int = 1) -> LayerCost:
    rows = gradient_rows(config.grad_chunk_size, config.num_grads, config.accumulation, kinds)
    fisher = block if "block" in kinds else 0
    copies = 2 if world > 1 else 1  # two buffers of each under several processes: exchanges overlap the work
    return LayerCost(every=numel * FLOAT * (copies * rows_per_rank(rows, world) + 1),
                     owner=numel * FLOAT * (fisher + (copies * rows_per_rank(rows, world) * world if world > 1 else 0)),
                     prepare=numel * FLOAT * fisher + numel * (FLOAT + FLOAT + 8))


def balance_cost(numels: Mapping[str, int], blocks: Mapping[str, int]) -> dict[str, int]:
    """What the owners are balanced on: each layer's Fisher size (memory, accumulation and elimination all grow
    with it)."""
    return {name: numels[name] * blocks[name] for name in numels}


def rank_bytes(group: Sequence[str], owners: Mapping[str, int], costs: Mapping[str, LayerCost], world: int) -> list[int]:
    """Peak bytes of a group on each rank: every layer's gradient rows plus the owned layers' Fisher during the
    pass, or the owned layers' inverses and kernels after it."""
    every = sum(costs[name].every for name in group)
    return [max(every + sum(costs[n].owner for n in group if owners[n] == r),
                sum(costs[n].prepare for n in group if owners[n] == r)) for r in range(world)]


def overhead_bytes(numels: Mapping[str, int], blocks: Mapping[str, int], methods: Sequence[PruningMethod],
                   config, world: int = 1) -> int:
    """The largest chunk's working memory: inversion, Woodbury update, the kernels' own chunks, and with several
    ranks one layer's received rows put in order."""
    kinds = fisher_kinds(methods)
    rows = gradient_rows(config.grad_chunk_size, config.num_grads, config.accumulation, kinds)
    worst = 0
    for name, numel in numels.items():
        block = blocks[name]
        count = numel // block
        if "block" in kinds:
            worst = max(worst, min(count, INVERSION_CHUNK) * block * block * FLOAT * 4,
                        min(count, WOODBURY_BLOCKS) * block * WOODBURY_RANK * FLOAT * 6)
        if world > 1 and kinds:
            worst = max(worst, rows_per_rank(rows, world) * world * numel * FLOAT)
        worst = max(worst, *(m.work_bytes(numel, block) for m in methods))
    return worst


def kept_bytes(numels: Mapping[str, int], methods: Sequence[PruningMethod], world: int = 1) -> int:
    """Scores and the like of the layers a rank owns, and the global threshold at apply time: at most a
    rank's even share plus the largest layer (the balance of assign_owners)."""
    total = sum(numels.values())
    share = total if world == 1 else -(-total // world) + max(numels.values(), default=0)
    return int(min(total, share) * (sum(m.kept_bytes_per_weight() for m in methods) + SELECTION_PER_WEIGHT)) + \
        MARGIN_BYTES


def store_bytes(numels: Mapping[str, int], blocks: Mapping[str, int], methods: Sequence[PruningMethod]) -> dict:
    return {name: int(numel * sum(m.stored_bytes_per_weight(blocks[name]) for m in methods))
            for name, numel in numels.items()}


def per_rank(values: Mapping[str, int], owners: Mapping[str, int], world: int) -> list[int]:
    return [sum(v for name, v in values.items() if owners[name] == r) for r in range(world)]


def all_at_once_bytes(numels: Mapping[str, int], blocks: Mapping[str, int], methods: Sequence[PruningMethod],
                      config, world: int = 1) -> int:
    """Estimated peak of a one-group step on the busiest rank, on top of what the process holds: every
    layer's gradient rows and its own layers' Fisher at once (or, when larger, its kernels' results), scores
    and working memory."""
    kinds = fisher_kinds(methods)
    owners = assign_owners(balance_cost(numels, blocks), world)
    costs = {n: layer_cost(numels[n], blocks[n], kinds, config, world) for n in numels}
    fishers = rank_bytes(list(numels), owners, costs, world) if kinds else [0] * world
    results = per_rank(store_bytes(numels, blocks, methods), owners, world)
    return max(max(f, r) for f, r in zip(fishers, results, strict=True)) + kept_bytes(numels, methods, world) + \
        overhead_bytes(numels, blocks, methods, config, world)


def available_bytes(device: torch.device) -> int:
    """Memory this process may still take where the Fisher lives: free CUDA memory, or the host's
    available memory shared among the processes of this node (LOCAL_WORLD_SIZE)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return int(psutil.virtual_memory().available) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def _agree(values: list[int], op: str, ranks: Ranks) -> list[int]:
    """The same numbers on every process (MIN or MAX over ranks), so that every rank makes the same plan. (A plan
    made for ranks without a process group, as a what-if, takes this process's numbers.)"""
    if not (ranks.distributed and initialised()):
        return values
    shared = torch.tensor(values, dtype=torch.float64, device=ranks.device)
    return [int(v) for v in ranks.all_reduce(shared, "memory plan", op).tolist()]


def _partition(order: list[str], group_bytes: Callable[[list[str]], list[int]], group_limit: int,
               total_limit: int | None = None, carried_bytes: Callable[[list[str]], list[int]] | None = None,
               world: int = 1) -> tuple[list[list[str]], list[int]] | None:
    """Consecutive groups (in the given order) of at most `group_limit` bytes on any rank (`group_bytes(group)`:
    one number per rank). With `carried_bytes`, what each rank keeps after a group (results in memory) is
    carried into every later group, and a group plus what is carried must stay within `total_limit` on every
    rank. None when a layer cannot fit."""
    total_limit = group_limit if total_limit is None else total_limit

    def fits(group: list[str], carried: list[int]) -> bool:
        cost = group_bytes(group)
        return max(cost) <= group_limit and all(c + x <= total_limit for c, x in zip(carried, cost, strict=True))

    groups, current, carried = [], [], [0] * world
    for name in order:
        if current and not fits(current + [name], carried):
            groups.append(current)
            if carried_bytes is not None:
                carried = [c + x for c, x in zip(carried, carried_bytes(current), strict=True)]
            current = []
        if not fits([name], carried):
            return None
        current.append(name)
    if current:
        groups.append(current)
    return groups, [max(group_bytes(g)) for g in groups]


def _probe_activation_bytes(model: nn.Module, target: nn.Module, batch: Mapping, loss_fn: Callable | None,
                            label_free: bool, device: torch.device) -> int:
    """Peak extra memory of one forward + backward pass down to the first target (with gradients for it)."""
    cuda = device.type == "cuda"
    with gradients_only_for(model, [target.weight]):
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        else:
            hwm = reset_hwm()
            before = rss_bytes()
        generator = torch.Generator(device=target.weight.device).manual_seed(0) if label_free else None
        (grad,) = torch.autograd.grad(batch_loss(model, batch, loss_fn, label_free, generator), [target.weight])
        del grad
    if cuda:
        return max(0, torch.cuda.max_memory_allocated(device) - before)
    after = hwm_bytes() if hwm else None
    return max(0, (after if after is not None else rss_bytes()) - before)


def plan_step(
    model: nn.Module,
    targets: Mapping[str, nn.Module],
    methods: Sequence[PruningMethod],
    config,
    block_sizes: Mapping[str, int],
    *,
    probe: Callable[[], Mapping] | None = None,
    loss_fn: Callable | None = None,
    device: torch.device | None = None,
    max_group_bytes: int | None = None,
    store: str | None = None,
    ranks: Ranks | None = None,
) -> MemoryPlan:
    """One group when the step fits (`config.max_memory_gb`, or else the memory available now); otherwise
    groups within the budget (90% of what this process holds plus what is available, when none was
    given, with a warning). `probe()` gives a calibration batch to measure a backward pass (needed for
    several groups). `max_group_bytes` caps a group's Fisher further and `store` forces where results go
    (tests and experiments: more groups, other stores, the same result). Under several processes (`ranks`)
    each layer of a group gets an owner rank (assign_owners) and the memory counted is the busiest rank's:
    the budget applies per rank."""
    ranks = ranks or Ranks()
    world = ranks.world
    device = device or next(model.parameters()).device
    numels = {name: module.weight.numel() for name, module in targets.items()}
    blocks = dict(block_sizes)
    adjusted = {name: b for name, b in blocks.items() if b != config.fisher_block_size}
    kinds = fisher_kinds(methods)
    results = store_bytes(numels, blocks, methods)
    budget = None if config.max_memory_gb is None else int(config.max_memory_gb * GB)
    if budget is None or not kinds:
        need = all_at_once_bytes(numels, blocks, methods, config, world)
        if not kinds or max_group_bytes is None:
            base, free = _agree([device_memory_bytes(device)], "MAX", ranks)[0], \
                _agree([available_bytes(device)], "MIN", ranks)[0]
            if not kinds or need <= free:
                owners = assign_owners(balance_cost(numels, blocks), world)
                return MemoryPlan(groups=[list(targets)], store=store or "device", block_sizes=blocks,
                                  group_bytes=[need], store_bytes=max(per_rank(results, owners, world)),
                                  adjusted=adjusted, owners=owners, world=world)
            budget = int(0.9 * (base + free))
            logger.warning("The pruning step needs about %.1f GB at once but %.1f GB are available on %s: pruning "
                           "the layers in groups within max_memory_gb=%.1f (same result; set max_memory_gb to "
                           "choose).", need / GB, free / GB, device, budget / GB)
        else:
            budget = device_memory_bytes(device) + available_bytes(device)
    plan = [model, targets, methods, config, blocks, adjusted, numels, results, budget]
    if probe is not None:  # what cannot fit fails before any batch is read
        _plan_groups(*plan, None, loss_fn, device, max_group_bytes, store, ranks)
    return _plan_groups(*plan, probe, loss_fn, device, max_group_bytes, store, ranks)


def _plan_groups(model, targets, methods, config, blocks, adjusted, numels, results, budget, probe, loss_fn, device,
                 max_group_bytes, store, ranks) -> MemoryPlan:
    world = ranks.world
    budget_gb = f"{budget / GB:.3g}"
    total = sum(numels.values())
    base = device_memory_bytes(device)
    kept = kept_bytes(numels, methods, world)
    where = "GPU memory" if device.type == "cuda" else "host memory (RSS)"
    if base + kept > budget:
        raise MemoryBudgetError(
            f"max_memory_gb={budget_gb} cannot be met: this process already holds {base / GB:.2f} GB of {where} "
            f"(model, data, libraries) and the scores of the {total / 1e6:.1f} M target weights "
            f"{'' if world == 1 else f'(its share of {world} ranks) '}and their global threshold need "
            f"{kept / GB:.2f} GB more. Raise max_memory_gb to at least {(base + kept) / GB + 1:.1f}.")
    activation = 0
    if probe is not None:
        first = next(iter(targets))
        activation = _probe_activation_bytes(model, targets[first], probe(), loss_fn, config.label_free_fisher,
                                             device)
    base, activation = _agree([base, activation], "MAX", ranks)
    overhead = overhead_bytes(numels, blocks, methods, config, world)
    available = budget - base - kept - activation - overhead
    kinds = fisher_kinds(methods)
    costs = {name: layer_cost(numels[name], blocks[name], kinds, config, world) for name in targets}
    balance = balance_cost(numels, blocks)

    def owners_of(group: list[str]) -> dict[str, int]:
        return assign_owners({name: balance[name] for name in group}, world)

    def owners_in(groups: list[list[str]]) -> dict[str, int]:  # in model order
        owners = {name: owner for group in groups for name, owner in owners_of(group).items()}
        return {name: owners[name] for name in targets}

    def group_bytes(group: list[str]) -> list[int]:
        return rank_bytes(group, owners_of(group), costs, world)

    def carried(group: list[str]) -> list[int]:
        return per_rank({name: results[name] for name in group}, owners_of(group), world)

    sizes = {name: max(group_bytes([name])) for name in targets}
    biggest = max(sizes, key=sizes.get)
    if sizes[biggest] > available:
        chunk = gradient_rows(config.grad_chunk_size, config.num_grads, config.accumulation, kinds)
        fitting_block = max(0, available) // (FLOAT * numels[biggest]) - chunk - 1
        hint = (f"lower fisher_block_size (at most {fitting_block} fits what is left)" if fitting_block >= 1 else
                "lower fisher_block_size (no block size fits what is left)")
        raise MemoryBudgetError(
            f"max_memory_gb={budget_gb} cannot be met: the Fisher of layer {biggest} ({numels[biggest] / 1e6:.2f} M "
            f"weights, block size {blocks[biggest]}) needs {sizes[biggest] / GB:.2f} GB with its gradient buffers, "
            f"but only {max(available, 0) / GB:.2f} GB are left after {base / GB:.2f} GB in use, "
            f"{activation / GB:.2f} GB for a backward pass and {(kept + overhead) / GB:.2f} GB for scores and "
            f"working memory. To fit, {hint}, or raise max_memory_gb to at least "
            f"{(budget - available + sizes[biggest]) / GB + 0.5:.1f}, or lower grad_chunk_size.")
    group_limit = available if max_group_bytes is None else min(available, max(int(max_group_bytes), sizes[biggest]))
    order = list(reversed(list(targets)))  # output first: those groups backpropagate the least
    groups, totals = _partition(order, group_bytes, group_limit, world=world)
    in_memory = _partition(order, group_bytes, group_limit, available, carried, world)  # results carried along
    fits = in_memory is not None and len(in_memory[0]) == len(groups)  # costs no extra gradient pass
    if store is None:
        if fits:
            store = "device"
        elif device.type == "cuda" and available_bytes(torch.device("cpu")) > 1.1 * max(per_rank(
                results, owners_in(groups), world)) * \
                int(os.environ.get("LOCAL_WORLD_SIZE", "1")):
            store = "host"
        else:
            store = "disk"
    if store in ("device", "host") and (device.type != "cuda" or store == "device"):
        if in_memory is None:
            raise MemoryBudgetError(f"The results ({sum(results.values()) / GB:.2f} GB in all) do not fit in memory "
                                    "next to the Fisher groups; let them go to disk (store='disk').")
        groups, totals = in_memory
    owners = owners_in(groups)
    store_total = max(per_rank(results, owners, world))
    if store == "disk":
        folder = config.offload_dir or tempfile.gettempdir()
        free = shutil.disk_usage(folder).free // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        if free < store_total * 1.05:
            raise MemoryBudgetError(
                f"The budget needs {len(groups)} layer groups and {store_total / GB:.1f} GB of results on disk "
                f"{'' if world == 1 else 'per rank '}, but {folder} has {free / GB:.1f} GB free"
                f"{'' if world == 1 else ' per rank on this node'}. Point offload_dir to a larger disk, raise "
                "max_memory_gb, or lower fisher_block_size.")
    return MemoryPlan(groups=groups, store=store, block_sizes=blocks, budget_bytes=budget, base_bytes=base,
                      activation_bytes=activation, kept_bytes=kept + overhead, available_bytes=available,
                      group_bytes=totals, store_bytes=store_total, adjusted=adjusted, owners=owners, world=world)


def check_budget(model: nn.Module, config, methods: Sequence[str] | None = None,
                 targets: Mapping[str, nn.Module] | None = None) -> None:
    """The cheap part of the plan (no data, no backward pass), for scripts and the Trainer to call before
    loading data or training: MemoryBudgetError now for a budget that can never be met."""
    if config.max_memory_gb is None:
        return
    kernels = [get_method(name)(config.replace(method=get_method(name).name)) for name in (methods or [config.method])]
    if not fisher_kinds(kernels):
        return
    targets = targets if targets is not None else find_targets(model, config.targets, config.ignore)
    blocks = {name: divisor_block_size(m.weight.numel(), config.fisher_block_size) for name, m in targets.items()}
    plan_step(model, targets, kernels, config, blocks, ranks=Ranks.current())
