"""CAP / OBS pruning steps under a memory budget: layer groups streamed one after another.

The Fisher of all targets is d*B floats (DeiT-Base at B=192: 65 GB). With `PruningConfig.max_memory_gb`
the targets are split into groups whose Fisher fits the budget, ordered from the output to the input.
Each group gets its own gradient pass over the same calibration batches (same order, same RNG states,
checked by a fingerprint of every batch) with gradients only for its weights, so a group near the
output backpropagates through part of the network only. Per group: build the Fisher, invert it in
place, run the greedy elimination, keep the scores (fp32) and the elimination order (int16), and store
the block snapshots packed (below), then drop the inverse. When every group is done, one global
threshold over all scores gives each block its count, and the weights are read back from the snapshots.

Packed snapshots. After k removals a block's weights are zero at the first k positions of its
elimination order, so written in that order the snapshots form a triangle: B(B+1)/2 floats per block,
half of the inverse and half of the reference code's (B+1)*B. They go to host memory when that costs
no extra gradient pass, else to a temporary folder (`offload_dir`) that is always removed. Reading a
block's weights back is a gather, not a second elimination, and a second gradient pass is never needed.

OBS (WoodFisher) streams the same way; its update needs the inverse itself, which is what it stores.
Results equal the in-memory CAPPruner / OBSPruner up to floating-point rounding (tests/test_scale.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import torch
from torch import nn

from cap_hf.config import PruningConfig
from cap_hf.fisher import (
    WOODBURY_BLOCKS,
    WOODBURY_RANK,
    check_enough_batches,
    choose_block_size,
    collect_fisher,
    default_loss,
    divisor_block_size,
)
from cap_hf.masks import SparsityReport, current_masks, sparsity_report
from cap_hf.memory import GB, PhaseProfiler, device_memory_bytes, hwm_bytes, maybe_phase, reset_hwm, rss_bytes
from cap_hf.pruners.base import select_pruned, weight_blocks, write_blocks
from cap_hf.pruners.cap import greedy_eliminate
from cap_hf.targets import find_targets

logger = logging.getLogger(__name__)

FLOAT = 4
STREAMING_METHODS = ("cap", "obs")
# Bytes per target weight kept for the whole step (scores fp32 + order int16) and used by the global
# threshold (concatenated scores, kthvalue's copy, comparison masks, a cumulative sum of ties in int64).
KEPT_PER_WEIGHT = {"cap": FLOAT + 2, "obs": FLOAT}
SELECTION_PER_WEIGHT = 20
MARGIN_BYTES = 256 * 1024 ** 2  # allocator slack and small tensors
INVERSION_CHUNK = 256  # blocks inverted at once (4 temporary copies of B x B each)


# ---------------------------------------------------------------------------------------------------
# packed snapshots


def pack_traces(traces: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """(B+1, n, B) snapshots -> (n, B(B+1)/2): row k holds the weights at order[k:] after k removals."""
    size = order.shape[1]
    in_order = traces[:size].permute(1, 0, 2).gather(2, order.unsqueeze(1).expand(-1, size, -1))
    rows, cols = torch.triu_indices(size, size, device=order.device)
    return in_order[:, rows, cols]


def unpack_weights(packed: torch.Tensor, order: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The weights of every block after counts[b] removals, from pack_traces' output."""
    n, size = order.shape
    j = torch.arange(size, device=packed.device)
    k = counts.to(packed.device, torch.long).unsqueeze(1)
    index = k * size - k * (k - 1) // 2 + (j - k)  # start of row k, then the offset inside it
    valid = j >= k
    values = packed.gather(1, index.clamp(0, packed.shape[1] - 1))
    values = torch.where(valid, values, torch.zeros_like(values))
    return torch.zeros(n, size, dtype=packed.dtype, device=packed.device).scatter_(1, order.long(), values)


class _Store:
    """Per-layer float32 rows, appended chunk by chunk and read back in order; host memory or files."""

    def __init__(self, where: str, offload_dir: str | None):
        self.where = where
        self._memory: dict[str, list[torch.Tensor]] = {}
        self._files: dict[str, Path] = {}
        self._tmp = None
        if where == "disk":
            self._tmp = tempfile.TemporaryDirectory(prefix="cap_hf_offload_", dir=offload_dir)
            self.path = Path(self._tmp.name)

    def append(self, name: str, rows: torch.Tensor) -> None:
        rows = rows.detach().to("cpu", torch.float32).contiguous()
        if self.where == "memory":
            self._memory.setdefault(name, []).append(rows)
            return
        path = self._files.setdefault(name, self.path / f"{len(self._files):04d}.bin")
        with open(path, "ab") as handle:
            rows.numpy().tofile(handle)

    def read(self, name: str, width: int, rows_per_read: int) -> Iterable[torch.Tensor]:
        """Yield (rows_per_read, width) tensors in the order they were appended."""
        if self.where == "memory":  # the chunks as they were stored (no concatenated copy)
            yield from self._memory[name]
            return
        total = os.path.getsize(self._files[name]) // (FLOAT * width)
        with open(self._files[name], "rb") as handle:
            for start in range(0, total, rows_per_read):
                count = min(rows_per_read, total - start)
                yield torch.from_numpy(np.fromfile(handle, dtype=np.float32, count=count * width)).view(count, width)

    def close(self) -> None:
        self._memory.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


# ---------------------------------------------------------------------------------------------------
# the same calibration batches for every group


class _Replay:
    """Iterates the calibration batches once per layer group, identically: restores the RNG states
    (torch, CUDA, numpy, random, the DataLoader's generator) before every pass and checks a fingerprint
    of every batch against the first pass."""

    def __init__(self, batches: Iterable | Callable[[], Iterable]):
        self.factory = batches if callable(batches) and not hasattr(batches, "__iter__") else None
        if self.factory is None and isinstance(batches, Iterator):  # iter() itself could draw from an RNG
            raise ValueError("With max_memory_gb the calibration batches are read once per layer group, so they must "
                             "be re-iterable: pass a list, a DataLoader, or a callable returning a fresh iterable "
                             "(not a generator or an iterator).")
        self.batches = batches
        self.generators = [g for g in (getattr(batches, "generator", None),
                                       getattr(getattr(batches, "sampler", None), "generator", None))
                           if isinstance(g, torch.Generator)]
        self.states = self._capture()
        self.fingerprints: list[tuple] | None = None
        self._current: list[tuple] = []

    def _capture(self):
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        return (torch.get_rng_state(), cuda, np.random.get_state(), random.getstate(),
                [g.get_state() for g in self.generators])

    def _restore(self) -> None:
        cpu, cuda, np_state, py_state, gens = self.states
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        np.random.set_state(np_state)
        random.setstate(py_state)
        for g, state in zip(self.generators, gens, strict=True):
            g.set_state(state)

    def __call__(self) -> Iterable:
        if self._current:
            self.fingerprints = self.fingerprints or self._current
        self._current = []
        self._restore()
        return self.factory() if self.factory is not None else self.batches

    def check(self, index: int, batch: Mapping) -> None:
        values = tuple((k, tuple(v.shape), float(v.detach().double().sum())) for k, v in sorted(batch.items())
                       if torch.is_tensor(v))
        self._current.append(values)
        if self.fingerprints is not None and (index >= len(self.fingerprints) or self.fingerprints[index] != values):
            raise ValueError(
                f"Calibration batch {index} differs between passes over the layer groups. With max_memory_gb every "
                "group re-reads the calibration data, which must give the same batches each time: use a DataLoader "
                "without random augmentation (or with a seeded generator and num_workers=0), or a list of batches."
            )

    def __len__(self) -> int:
        return len(self.factory() if self.factory is not None else self.batches)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------
# memory plan


class MemoryBudgetError(ValueError):
    """The memory budget cannot be met; raised before any long work."""


@dataclass
class MemoryPlan:
    budget_bytes: int
    base_bytes: int
    activation_bytes: int
    kept_bytes: int
    available_bytes: int
    groups: list[list[str]]
    group_bytes: list[int]
    store: str  # "memory" or "disk"
    store_bytes: int
    block_sizes: dict[str, int] = field(default_factory=dict)
    adjusted: dict[str, int] = field(default_factory=dict)  # layers whose block size is not B

    def describe(self) -> str:
        lines = [f"memory budget {self.budget_bytes / GB:.2f} GB: in use {self.base_bytes / GB:.2f} GB, activations "
                 f"{self.activation_bytes / GB:.2f} GB, scores and threshold {self.kept_bytes / GB:.2f} GB, "
                 f"left for the Fisher {self.available_bytes / GB:.2f} GB",
                 f"{len(self.groups)} layer group(s), Fisher + working memory per group (GB): "
                 + ", ".join(f"{b / GB:.2f}" for b in self.group_bytes),
                 f"snapshots kept in {self.store} ({self.store_bytes / GB:.2f} GB)"]
        if self.adjusted:
            lines.append("block size adjusted to divide the layer: "
                         + ", ".join(f"{n} -> {b}" for n, b in self.adjusted.items()))
        return "; ".join(lines)


def layer_bytes(numel: int, block: int, config: PruningConfig) -> int:
    """Peak bytes one layer adds to its group: Fisher sums (turned into the inverse in place), the
    gradient buffers and autograd's gradient, and the elimination's weights, scores and order."""
    chunk = min(config.grad_chunk_size, config.num_grads)
    gradients = numel * FLOAT * (block + chunk + 1)
    elimination = numel * FLOAT * block + numel * (FLOAT + FLOAT + 8)
    return max(gradients, elimination)


def group_overhead(numels: Mapping[str, int], block_sizes: Mapping[str, int], config: PruningConfig) -> int:
    """The largest chunk's working memory of the inversion and of the elimination (a chunk's snapshots)."""
    worst = 0
    for name, numel in numels.items():
        block = block_sizes[name]
        blocks = numel // block
        inversion = min(blocks, INVERSION_CHUNK) * block * block * FLOAT * 4
        elimination = min(blocks, config.elimination_chunk_size) * (block + 1) * block * FLOAT * 4
        woodbury = min(blocks, WOODBURY_BLOCKS) * block * WOODBURY_RANK * FLOAT * 6
        worst = max(worst, inversion, elimination, woodbury)
    return worst


def store_bytes_per_weight(method: str, block: int) -> float:
    return FLOAT * ((block + 1) / 2 if method == "cap" else block)


def _partition(order: list[str], sizes: Mapping[str, int], group_limit: int, total_limit: int | None = None,
               extra: Mapping[str, int] | None = None) -> tuple[list[list[str]], list[int]] | None:
    """Consecutive groups (in the given order) of at most `group_limit` bytes. With `extra`, bytes kept
    after each layer (snapshots in memory) are carried into every later group, and a group plus what is
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
    param = next(model.parameters())
    batch = {k: v.to(param.device) if torch.is_tensor(v) else v for k, v in batch.items()}
    saved = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    cuda = device.type == "cuda"
    try:
        for p in saved:
            p.requires_grad_(p is target.weight)
        model.eval()
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        else:
            hwm = reset_hwm()
            before = rss_bytes()
        with torch.enable_grad(), torch.autocast(device_type=param.device.type, enabled=False):
            generator = torch.Generator(device=param.device).manual_seed(0) if label_free else None
            loss = loss_fn(model, batch) if loss_fn is not None else default_loss(model, batch, label_free, generator)
            (grad,) = torch.autograd.grad(loss, [target.weight])
        del loss, grad
        if cuda:
            return max(0, torch.cuda.max_memory_allocated(device) - before)
        after = hwm_bytes() if hwm else None
        return max(0, (after if after is not None else rss_bytes()) - before)
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)
        model.train(was_training)


def plan_memory(
    model: nn.Module,
    targets: Mapping[str, nn.Module],
    config: PruningConfig,
    probe_batch: Mapping | None = None,
    loss_fn: Callable | None = None,
    device: torch.device | None = None,
    block_sizes: Mapping[str, int] | None = None,
    max_group_bytes: int | None = None,
    store: str | None = None,
) -> MemoryPlan:
    """Split the targets into groups (output to input) that fit `config.max_memory_gb`, or raise
    MemoryBudgetError saying what does not fit and what to change. Without `probe_batch` the memory of a
    backward pass is taken as zero (the cheap checks that run before any data is touched).
    `max_group_bytes` caps a group's Fisher further (tests and experiments: more groups, same result);
    `store` ("memory" or "disk") overrides where the snapshots go."""
    method = config.method
    if method not in STREAMING_METHODS:
        raise ValueError(f"The memory budget applies to {STREAMING_METHODS}; {method} keeps only a B x B Fisher "
                         "per layer and needs none.")
    device = device or next(model.parameters()).device
    budget = int(config.max_memory_gb * GB)
    numels = {name: module.weight.numel() for name, module in targets.items()}
    blocks = dict(block_sizes) if block_sizes is not None else {
        name: choose_block_size(n, config.fisher_block_size, name) for name, n in numels.items()}
    adjusted = {name: b for name, b in blocks.items() if b != config.fisher_block_size}
    total = sum(numels.values())
    base = device_memory_bytes(device)
    kept = total * (KEPT_PER_WEIGHT[method] + SELECTION_PER_WEIGHT) + MARGIN_BYTES
    if config.n_m is not None:
        kept += total * FLOAT  # the N:M weights are final after the elimination
    where = "GPU memory" if device.type == "cuda" else "host memory (RSS)"
    if base + kept > budget:
        raise MemoryBudgetError(
            f"max_memory_gb={config.max_memory_gb:g} cannot be met: this process already holds "
            f"{base / GB:.2f} GB of {where} (model, data, libraries) and the scores of the "
            f"{total / 1e6:.1f} M target weights and their global threshold need {kept / GB:.2f} GB more. "
            f"Raise max_memory_gb to at least {(base + kept) / GB + 1:.1f}.")
    activation = 0
    if probe_batch is not None:
        first = next(iter(targets))
        activation = _probe_activation_bytes(model, targets[first], probe_batch, loss_fn, config.label_free_fisher,
                                             device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        shared = torch.tensor([base, activation], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(shared, op=torch.distributed.ReduceOp.MAX)  # one plan on every rank
        base, activation = int(shared[0]), int(shared[1])
    overhead = group_overhead(numels, blocks, config)
    available = budget - base - kept - activation - overhead
    sizes = {name: layer_bytes(numels[name], blocks[name], config) for name in targets}
    biggest = max(sizes, key=sizes.get)
    if sizes[biggest] > available:
        chunk = min(config.grad_chunk_size, config.num_grads)
        fitting_block = max(0, available) // (FLOAT * numels[biggest]) - chunk - 1
        hint = (f"lower fisher_block_size (at most {fitting_block} fits what is left)" if fitting_block >= 1 else
                "lower fisher_block_size (no block size fits what is left)")
        raise MemoryBudgetError(
            f"max_memory_gb={config.max_memory_gb:g} cannot be met: the Fisher of layer {biggest} "
            f"({numels[biggest] / 1e6:.2f} M weights, block size {blocks[biggest]}) needs {sizes[biggest] / GB:.2f} GB "
            f"with its gradient buffers, but only {max(available, 0) / GB:.2f} GB are left after {base / GB:.2f} GB in "
            f"use, {activation / GB:.2f} GB for a backward pass and {(kept + overhead) / GB:.2f} GB for scores and "
            f"working memory. To fit, {hint}, or raise max_memory_gb to at least "
            f"{(budget - available + sizes[biggest]) / GB + 0.5:.1f}, or lower grad_chunk_size.")
    group_limit = available if max_group_bytes is None else min(available, max(int(max_group_bytes), sizes[biggest]))
    order = list(reversed(list(targets)))  # output first: those groups backpropagate the least
    groups, totals = _partition(order, sizes, group_limit)
    # snapshots stay in memory when that costs no extra gradient pass, else they go to disk
    snapshot = {name: int(numels[name] * store_bytes_per_weight(method, blocks[name])) for name in targets}
    in_memory = _partition(order, sizes, group_limit, available, snapshot)
    if store is None:
        store = "memory" if in_memory is not None and len(in_memory[0]) == len(groups) else "disk"
    elif store not in ("memory", "disk"):
        raise ValueError(f"store must be 'memory' or 'disk', got {store!r}.")
    if store == "memory" and in_memory is None:
        raise MemoryBudgetError("The snapshots do not fit in memory next to the Fisher groups; let them go to disk.")
    if store == "memory":
        groups, totals = in_memory
    store_total = sum(snapshot.values())
    if store == "disk":
        folder = config.offload_dir or tempfile.gettempdir()
        free = shutil.disk_usage(folder).free
        if free < store_total * 1.05:
            raise MemoryBudgetError(
                f"The budget needs {len(groups)} layer groups and {store_total / GB:.1f} GB of snapshots on disk, but "
                f"{folder} has {free / GB:.1f} GB free. Point offload_dir to a larger disk, raise max_memory_gb, "
                "or lower fisher_block_size.")
    return MemoryPlan(budget_bytes=budget, base_bytes=base, activation_bytes=activation, kept_bytes=kept + overhead,
                      available_bytes=available, groups=groups, group_bytes=totals, store=store,
                      store_bytes=store_total, block_sizes=blocks, adjusted=adjusted)


def check_budget(model: nn.Module, config: PruningConfig, targets: Mapping[str, nn.Module] | None = None) -> None:
    """The cheap part of plan_memory (no data, no backward pass), for scripts and the Trainer to call
    before loading data or training: MemoryBudgetError now for a budget that can never be met."""
    if config.max_memory_gb is None or config.method not in STREAMING_METHODS:
        return
    targets = targets if targets is not None else find_targets(model, config.targets, config.ignore)
    blocks = {name: divisor_block_size(m.weight.numel(), config.fisher_block_size) for name, m in targets.items()}
    plan_memory(model, targets, config, block_sizes=blocks)


def in_memory_bytes(targets: Mapping[str, nn.Module], config: PruningConfig) -> int:
    """Estimated peak bytes of the all-at-once CAPPruner / OBSPruner step (no budget) on top of the model:
    the Fisher of every target (three d*B copies with 'sum': sums, mean, inverse), gradient buffers,
    scores and orders, and CAP's (B+1)*d snapshots in trace_mode 'snapshot'."""
    total = 0
    chunk = min(config.grad_chunk_size, config.num_grads)
    copies = 1 if config.accumulation == "inverse" else 3
    for module in targets.values():
        numel = module.weight.numel()
        block = divisor_block_size(numel, config.fisher_block_size)  # the step itself warns when it is not B
        total += numel * FLOAT * (copies * block + chunk + 1) + numel * (FLOAT + 8)
        if config.method == "cap" and config.trace_mode == "snapshot" and config.n_m is None:
            total += numel * FLOAT * (block + 1)
    return total + MARGIN_BYTES


def available_bytes(device: torch.device) -> int:
    """Memory this process may still take where the Fisher lives: free CUDA memory, or the host's
    available memory shared among the processes of this node (LOCAL_WORLD_SIZE)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return int(psutil.virtual_memory().available) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def resolve_budget(config: PruningConfig, targets: Mapping[str, nn.Module],
                   device: torch.device | str | None = None) -> PruningConfig:
    """`config` itself when it has a budget, or when its method does not stream, or when the all-at-once
    step fits in the memory available now; otherwise a copy with max_memory_gb set to 90% of what this
    process holds plus what is available (the same decision on every process), so that a DeiT-Base step
    streams in layer groups instead of running out of memory after its gradient pass."""
    if config.max_memory_gb is not None or config.method not in STREAMING_METHODS or not targets:
        return config
    if device is None:
        device = config.device or next(iter(targets.values())).weight.device
    device = torch.device(device)
    need = in_memory_bytes(targets, config)
    free = available_bytes(device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        shared = torch.tensor([free], dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
        torch.distributed.all_reduce(shared, op=torch.distributed.ReduceOp.MIN)
        free = int(shared.item())
    if need <= free:
        return config
    budget = 0.9 * (device_memory_bytes(device) + free) / GB
    logger.warning("The %s step needs about %.1f GB at once but %.1f GB are available on %s: streaming it in layer "
                   "groups within max_memory_gb=%.1f (same result; set max_memory_gb yourself to choose).",
                   config.method, need / GB, free / GB, device, budget)
    return config.replace(max_memory_gb=round(budget, 2))


# ---------------------------------------------------------------------------------------------------
# the pruner


def eliminate_layer(
    w: torch.Tensor,
    inverse: torch.Tensor,
    chunk: int,
    n_m: tuple[int, int] | None = None,
    on_chunk: Callable[[torch.Tensor], None] | None = None,
    profiler: PhaseProfiler | None = None,
    name: str = "",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """CAP's greedy elimination of one layer's (n, B) weight blocks, `chunk` blocks at a time; consumes
    `inverse` (modified in place, never copied). Returns (scores with -inf for weights already zero,
    the elimination order as int16 on the CPU, and for N:M the final weights). Without N:M each chunk's
    packed snapshots go to `on_chunk` (timed as the phase "offload")."""
    size = w.shape[1]
    if n_m is not None and size % n_m[1]:
        raise ValueError(f"Layer {name}: Fisher block size {size} is not a multiple of M={n_m[1]}.")
    if size > torch.iinfo(torch.int16).max:
        raise ValueError(f"Layer {name}: block size {size} is too large for the int16 elimination order.")
    steps = size * (n_m[1] - n_m[0]) // n_m[1] if n_m is not None else size
    zero = w == 0
    scores = torch.empty_like(w)
    order = torch.empty(w.shape[0], steps, dtype=torch.int16, device="cpu")
    final = w.clone() if n_m is not None else None
    traces = None if n_m is not None else torch.empty(steps + 1, min(chunk, w.shape[0]), size, dtype=w.dtype,
                                                      device=w.device)
    for start in range(0, w.shape[0], chunk):
        sl = slice(start, start + chunk)
        with maybe_phase(profiler, "elimination"):
            wc = w[sl].clone()
            part = traces[:, : wc.shape[0]] if traces is not None else None
            scores[sl], o = greedy_eliminate(wc, inverse[sl], steps, n_m, part)
            order[sl] = o.to("cpu", torch.int16)
            if final is not None:
                final[sl] = wc
            packed = pack_traces(part, o) if part is not None else None
        if packed is not None and on_chunk is not None:
            with maybe_phase(profiler, "offload"):
                on_chunk(packed)
    scores[zero] = float("-inf")
    return scores, order, final



class StreamingPruner:
    """CAP or OBS under `config.max_memory_gb`. prepare() runs the gradient passes (one per layer group)
    and the eliminations; apply() may then be called at several sparsities; close() (or a `with`
    block) removes the offload folder.

        with StreamingPruner(config) as pruner:
            pruner.prepare(model, targets, batches)
            pruner.apply(targets, 0.5)
    """

    def __init__(self, config: PruningConfig, profiler: PhaseProfiler | None = None,
                 max_group_bytes: int | None = None, store: str | None = None):
        config.validate()
        self.max_group_bytes = max_group_bytes
        self.store = store
        if config.max_memory_gb is None:
            raise ValueError("StreamingPruner needs config.max_memory_gb; without a budget use get_pruner(config).")
        self.config = config
        self.profiler = profiler
        self.plan: MemoryPlan | None = None
        self.scores: dict[str, torch.Tensor] = {}
        self.orders: dict[str, torch.Tensor] = {}
        self.nm_weights: dict[str, torch.Tensor] = {}
        self.block_sizes: dict[str, int] = {}
        self.num_grads = 0
        self._store: _Store | None = None

    def __enter__(self) -> StreamingPruner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    def __del__(self) -> None:  # pragma: no cover - the `with` block is the normal path
        with contextlib.suppress(Exception):
            self.close()

    def _phase(self, name: str):
        return maybe_phase(self.profiler, name)

    def prepare(self, model: nn.Module, targets: Mapping[str, nn.Module],
                batches: Iterable[Mapping[str, torch.Tensor]] | Callable[[], Iterable],
                loss_fn: Callable | None = None, progress: bool = False) -> MemoryPlan:
        cfg = self.config
        self.close()
        replay = _Replay(batches)
        check_enough_batches(replay, cfg.num_grads)
        device = torch.device(cfg.device) if cfg.device is not None else next(model.parameters()).device
        with self._phase("plan"):
            blocks = {name: choose_block_size(m.weight.numel(), cfg.fisher_block_size, name)
                      for name, m in targets.items()}
            plan_memory(model, targets, cfg, None, loss_fn, device, blocks, self.max_group_bytes,
                        self.store)  # before any data
            first = next(iter(replay()), None)
            if first is None:
                raise ValueError("The calibration data is empty.")
            self.plan = plan = plan_memory(model, targets, cfg, first, loss_fn, device, blocks,
                                           self.max_group_bytes, self.store)
        logger.info("Streaming %s step: %s", cfg.method, plan.describe())
        self.block_sizes = plan.block_sizes
        self._store = _Store(plan.store, cfg.offload_dir)
        self.scores, self.orders, self.nm_weights = {}, {}, {}
        for index, group in enumerate(plan.groups):
            group_targets = {name: targets[name] for name in group}
            fisher = collect_fisher(
                model, group_targets, replay(), num_grads=cfg.num_grads,
                block_size={name: plan.block_sizes[name] for name in group}, kinds=("block",),
                masks=current_masks(group_targets), label_free=cfg.label_free_fisher, loss_fn=loss_fn,
                grad_chunk_size=cfg.grad_chunk_size, device=device, seed=cfg.seed, progress=progress,
                profiler=self.profiler, on_batch=replay.check, accumulate=cfg.accumulation, damp=cfg.damp,
            )["block"]
            self.num_grads = fisher.count
            for name in group:
                with self._phase("inversion"):
                    inverse = fisher.pop_inverse(name, cfg.damp, INVERSION_CHUNK)
                if cfg.method == "cap":
                    self._eliminate(name, targets[name], inverse)
                else:
                    self._obs_scores(name, targets[name], inverse)
                del inverse
            del fisher
            logger.info("Layer group %d/%d done (%d layers).", index + 1, len(plan.groups), len(group))
        return plan

    def _eliminate(self, name: str, module: nn.Module, inverse: torch.Tensor) -> None:
        size = self.block_sizes[name]
        w = weight_blocks(module, size).to(inverse.device)
        scores, order, final = eliminate_layer(
            w, inverse, self.config.elimination_chunk_size, self.config.n_m,
            on_chunk=lambda packed: self._store.append(name, packed), profiler=self.profiler, name=name)
        self.scores[name], self.orders[name] = scores.cpu(), order
        if final is not None:
            self.nm_weights[name] = final.cpu()

    def _obs_scores(self, name: str, module: nn.Module, inverse: torch.Tensor) -> None:
        size = self.block_sizes[name]
        with self._phase("elimination"):
            w = weight_blocks(module, size).to(inverse.device)
            score = w.pow(2) / (2 * inverse.diagonal(dim1=1, dim2=2))
            score[w == 0] = float("-inf")
            self.scores[name] = score.cpu()
        with self._phase("offload"):
            for start in range(0, inverse.shape[0], 4096):
                self._store.append(name, inverse[start:start + 4096].reshape(-1, size * size))

    @torch.no_grad()
    def apply(self, targets: Mapping[str, nn.Module], sparsity: float) -> None:
        """Write the pruned weights at `sparsity` into `targets` (this model or a copy of it)."""
        if self._store is None:
            raise RuntimeError("Call prepare() first (or the pruner was closed).")
        if self.config.n_m is not None:
            with self._phase("write-back"):
                for name, module in targets.items():
                    write_blocks(module, self.nm_weights[name])
            return
        with self._phase("selection"):
            pruned = select_pruned(self.scores, sparsity, self.config.sparsity_distribution)
            counts = {name: mask.sum(dim=1) for name, mask in pruned.items()}
            obs_masks = pruned if self.config.method == "obs" else None
            del pruned
        for name, module in targets.items():
            with self._phase("write-back"):
                size = self.block_sizes[name]
                if self.config.method == "cap":
                    self._write_cap(name, module, size, counts[name])
                else:
                    self._write_obs(name, module, size, obs_masks[name])

    def _write_cap(self, name: str, module: nn.Module, size: int, counts: torch.Tensor) -> None:
        width = size * (size + 1) // 2
        rows = max(1, (64 * 1024 ** 2) // (FLOAT * width))
        order = self.orders[name]
        w = torch.empty(order.shape[0], size)
        start = 0
        for packed in self._store.read(name, width, rows):
            sl = slice(start, start + packed.shape[0])
            w[sl] = unpack_weights(packed, order[sl].long(), counts[sl].cpu())
            start += packed.shape[0]
        write_blocks(module, w)

    def _write_obs(self, name: str, module: nn.Module, size: int, removed: torch.Tensor) -> None:
        w = weight_blocks(module, size)
        removed = removed.cpu()
        start = 0
        for flat in self._store.read(name, size * size, 4096):
            q = flat.view(-1, size, size)
            sl = slice(start, start + q.shape[0])
            wc, rc = w[sl], removed[sl]
            coef = torch.where(rc, wc / q.diagonal(dim1=1, dim2=2), torch.zeros_like(wc))
            wc -= torch.bmm(q, coef.unsqueeze(-1)).squeeze(-1)
            wc[rc] = 0.0
            start += q.shape[0]
        write_blocks(module, w)


def prune_step(
    model: nn.Module,
    config: PruningConfig,
    calibration_batches: Iterable[Mapping[str, torch.Tensor]] | Callable[[], Iterable],
    sparsity: float | None = None,
    *,
    targets: Mapping[str, nn.Module] | None = None,
    loss_fn: Callable | None = None,
    profiler: PhaseProfiler | None = None,
    progress: bool = False,
) -> SparsityReport:
    """One CAP / OBS pruning step within `config.max_memory_gb`; prunes `model` in place to `sparsity`
    (default `config.sparsity`). `calibration_batches` must give the same batches each time it is
    iterated (a list, a DataLoader without random augmentation), or be a callable returning them."""
    targets = targets if targets is not None else find_targets(model, config.targets, config.ignore)
    with StreamingPruner(config, profiler) as pruner:
        pruner.prepare(model, targets, calibration_batches, loss_fn, progress)
        pruner.apply(targets, config.sparsity if sparsity is None else sparsity)
    return sparsity_report(targets)
