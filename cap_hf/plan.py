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

from cap_hf.fisher import (
    INVERSION_CHUNK,
    WOODBURY_BLOCKS,
    WOODBURY_RANK,
    batch_loss,
    divisor_block_size,
    gradient_rows,
    gradients_only_for,
)
from cap_hf.memory import GB, device_memory_bytes, hwm_bytes, reset_hwm, rss_bytes
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
        if self.adjusted:
            lines.append("block size adjusted to divide the layer: "
                         + ", ".join(f"{n} -> {b}" for n, b in self.adjusted.items()))
        return "; ".join(lines)


def fisher_kinds(methods: Sequence[PruningMethod]) -> list[str]:
    return sorted({m.fisher for m in methods if m.fisher})


def layer_bytes(numel: int, block: int, kinds: Sequence[str], config) -> int:
    """Peak bytes one layer adds to its group: its Fisher blocks (turned into the inverse in place), the
    gradient buffers and autograd's gradient; then the inverse with the kernels' weights and scores."""
    chunk = gradient_rows(config.grad_chunk_size, config.num_grads, config.accumulation, kinds)
    fisher = block if "block" in kinds else 0
    gradients = numel * FLOAT * (fisher + chunk + 1)
    prepare = numel * FLOAT * fisher + numel * (FLOAT + FLOAT + 8)
    return max(gradients, prepare)


def overhead_bytes(numels: Mapping[str, int], blocks: Mapping[str, int], methods: Sequence[PruningMethod],
                   config) -> int:
    """The largest chunk's working memory: inversion, Woodbury update, the kernels' own chunks."""
    kinds = fisher_kinds(methods)
    worst = 0
    for name, numel in numels.items():
        block = blocks[name]
        count = numel // block
        if "block" in kinds:
            worst = max(worst, min(count, INVERSION_CHUNK) * block * block * FLOAT * 4,
                        min(count, WOODBURY_BLOCKS) * block * WOODBURY_RANK * FLOAT * 6)
        worst = max(worst, *(m.work_bytes(numel, block) for m in methods))
    return worst


def kept_bytes(total: int, methods: Sequence[PruningMethod]) -> int:
    """Scores and the like for the whole step, and the global threshold at apply time."""
    return int(total * (sum(m.kept_bytes_per_weight() for m in methods) + SELECTION_PER_WEIGHT)) + MARGIN_BYTES


def store_bytes(numels: Mapping[str, int], blocks: Mapping[str, int], methods: Sequence[PruningMethod]) -> dict:
    return {name: int(numel * sum(m.stored_bytes_per_weight(blocks[name]) for m in methods))
            for name, numel in numels.items()}


def all_at_once_bytes(numels: Mapping[str, int], blocks: Mapping[str, int], methods: Sequence[PruningMethod],
                      config) -> int:
    """Estimated peak of a one-group step on top of what the process holds: every layer's Fisher and
    gradient buffers at once (or, when larger, all the kernels' results), scores and working memory."""
    kinds = fisher_kinds(methods)
    fishers = sum(layer_bytes(numels[n], blocks[n], kinds, config) for n in numels) if kinds else 0
    results = sum(store_bytes(numels, blocks, methods).values())
    return max(fishers, results) + kept_bytes(sum(numels.values()), methods) + \
        overhead_bytes(numels, blocks, methods, config)


def available_bytes(device: torch.device) -> int:
    """Memory this process may still take where the Fisher lives: free CUDA memory, or the host's
    available memory shared among the processes of this node (LOCAL_WORLD_SIZE)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return int(psutil.virtual_memory().available) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def _agree(values: list[int], op: str, device: torch.device) -> list[int]:
    """The same numbers on every process (MIN or MAX over ranks), so that every rank makes the same plan."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    shared = torch.tensor(values, dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
    torch.distributed.all_reduce(shared, op=getattr(torch.distributed.ReduceOp, op))
    return [int(v) for v in shared.tolist()]


def _partition(order: list[str], sizes: Mapping[str, int], group_limit: int, total_limit: int | None = None,
               extra: Mapping[str, int] | None = None) -> tuple[list[list[str]], list[int]] | None:
    """Consecutive groups (in the given order) of at most `group_limit` bytes. With `extra`, bytes kept
    after each layer (results in memory) are carried into every later group, and a group plus what is
    carried must stay within `total_limit`. None when a layer cannot fit."""
    total_limit = group_limit if total_limit is None else total_limit
    groups, totals, current, total, carried = [], [], [], 0, 0
    for name in order:
        need = sizes[name]
        if current and (total + need > group_limit or carried + total + need > total_limit):
            groups.append(current)
            totals.append(total)
            carried += sum(extra[n] for n in current) if extra else 0
            current, total = [], 0
        if need > group_limit or carried + need > total_limit:
            return None
        current.append(name)
        total += need
    if current:
        groups.append(current)
        totals.append(total)
    return groups, totals


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
) -> MemoryPlan:
    """One group when the step fits (`config.max_memory_gb`, or else the memory available now); otherwise
    groups within the budget (90% of what this process holds plus what is available, when none was
    given, with a warning). `probe()` gives a calibration batch to measure a backward pass (needed for
    several groups). `max_group_bytes` caps a group's Fisher further and `store` forces where results go
    (tests and experiments: more groups, other stores, the same result)."""
    device = device or next(model.parameters()).device
    numels = {name: module.weight.numel() for name, module in targets.items()}
    blocks = dict(block_sizes)
    adjusted = {name: b for name, b in blocks.items() if b != config.fisher_block_size}
    kinds = fisher_kinds(methods)
    results = store_bytes(numels, blocks, methods)
    budget = None if config.max_memory_gb is None else int(config.max_memory_gb * GB)
    if budget is None or not kinds:
        need = all_at_once_bytes(numels, blocks, methods, config)
        if not kinds or max_group_bytes is None:
            base, free = _agree([device_memory_bytes(device)], "MAX", device)[0], \
                _agree([available_bytes(device)], "MIN", device)[0]
            if not kinds or need <= free:
                return MemoryPlan(groups=[list(targets)], store=store or "device", block_sizes=blocks,
                                  group_bytes=[need], store_bytes=sum(results.values()), adjusted=adjusted)
            budget = int(0.9 * (base + free))
            logger.warning("The pruning step needs about %.1f GB at once but %.1f GB are available on %s: pruning "
                           "the layers in groups within max_memory_gb=%.1f (same result; set max_memory_gb to "
                           "choose).", need / GB, free / GB, device, budget / GB)
        else:
            budget = device_memory_bytes(device) + available_bytes(device)
    plan = [model, targets, methods, config, blocks, adjusted, numels, results, budget]
    if probe is not None:  # what cannot fit fails before any batch is read
        _plan_groups(*plan, None, loss_fn, device, max_group_bytes, store)
    return _plan_groups(*plan, probe, loss_fn, device, max_group_bytes, store)


def _plan_groups(model, targets, methods, config, blocks, adjusted, numels, results, budget, probe, loss_fn, device,
                 max_group_bytes, store) -> MemoryPlan:
    budget_gb = f"{budget / GB:.3g}"
    total = sum(numels.values())
    base = device_memory_bytes(device)
    kept = kept_bytes(total, methods)
    where = "GPU memory" if device.type == "cuda" else "host memory (RSS)"
    if base + kept > budget:
        raise MemoryBudgetError(
            f"max_memory_gb={budget_gb} cannot be met: this process already holds {base / GB:.2f} GB of {where} "
            f"(model, data, libraries) and the scores of the {total / 1e6:.1f} M target weights and their global "
            f"threshold need {kept / GB:.2f} GB more. Raise max_memory_gb to at least {(base + kept) / GB + 1:.1f}.")
    activation = 0
    if probe is not None:
        first = next(iter(targets))
        activation = _probe_activation_bytes(model, targets[first], probe(), loss_fn, config.label_free_fisher,
                                             device)
    base, activation = _agree([base, activation], "MAX", device)
    overhead = overhead_bytes(numels, blocks, methods, config)
    available = budget - base - kept - activation - overhead
    kinds = fisher_kinds(methods)
    sizes = {name: layer_bytes(numels[name], blocks[name], kinds, config) for name in targets}
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
    groups, totals = _partition(order, sizes, group_limit)
    in_memory = _partition(order, sizes, group_limit, available, results)  # results carried group to group
    fits = in_memory is not None and len(in_memory[0]) == len(groups)  # costs no extra gradient pass
    store_total = sum(results.values())
    if store is None:
        if fits:
            store = "device"
        elif device.type == "cuda" and available_bytes(torch.device("cpu")) > 1.1 * store_total:
            store = "host"
        else:
            store = "disk"
    if store in ("device", "host") and (device.type != "cuda" or store == "device"):
        if in_memory is None:
            raise MemoryBudgetError(f"The results ({store_total / GB:.2f} GB) do not fit in memory next to the "
                                    "Fisher groups; let them go to disk (store='disk').")
        groups, totals = in_memory
    if store == "disk":
        folder = config.offload_dir or tempfile.gettempdir()
        free = shutil.disk_usage(folder).free
        if free < store_total * 1.05:
            raise MemoryBudgetError(
                f"The budget needs {len(groups)} layer groups and {store_total / GB:.1f} GB of results on disk, but "
                f"{folder} has {free / GB:.1f} GB free. Point offload_dir to a larger disk, raise max_memory_gb, "
                "or lower fisher_block_size.")
    return MemoryPlan(groups=groups, store=store, block_sizes=blocks, budget_bytes=budget, base_bytes=base,
                      activation_bytes=activation, kept_bytes=kept + overhead, available_bytes=available,
                      group_bytes=totals, store_bytes=store_total, adjusted=adjusted)


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
    plan_step(model, targets, kernels, config, blocks)
