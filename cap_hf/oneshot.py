"""One-shot pruning: the user-facing entry point."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from cap_hf.config import PruningConfig
from cap_hf.fisher import BlockFisher, collect_fisher
from cap_hf.masks import SparsityReport, current_masks, sparsity_report
from cap_hf.pruners import get_pruner
from cap_hf.streaming import STREAMING_METHODS, StreamingPruner, prune_step, resolve_budget
from cap_hf.targets import find_targets

logger = logging.getLogger(__name__)


def compute_fisher(
    model: nn.Module,
    config: PruningConfig,
    calibration_batches: Iterable[Mapping[str, torch.Tensor]],
    kinds: Iterable[str] = ("block",),
    targets: Mapping[str, nn.Module] | None = None,
    loss_fn: Callable | None = None,
    progress: bool = False,
) -> dict[str, BlockFisher]:
    """The Fisher statistics of `kinds` ('block' for CAP/OBS, 'shared' for FastCAP) in one pass."""
    targets = targets if targets is not None else find_targets(model, config.targets, config.ignore)
    return collect_fisher(
        model, targets, calibration_batches, num_grads=config.num_grads, block_size=config.fisher_block_size,
        kinds=tuple(kinds), masks=current_masks(targets), label_free=config.label_free_fisher, loss_fn=loss_fn,
        grad_chunk_size=config.grad_chunk_size, device=config.device, seed=config.seed, progress=progress,
        accumulate=config.accumulation, damp=config.damp,
    )


def oneshot_prune(
    model: nn.Module,
    config: PruningConfig,
    calibration_batches: Iterable[Mapping[str, torch.Tensor]] | None = None,
    *,
    loss_fn: Callable | None = None,
    fisher: BlockFisher | None = None,
    progress: bool = False,
) -> SparsityReport:
    """Prune `model` in place to `config.sparsity` with `config.method`; returns the measured sparsity.

    Second-order methods need `calibration_batches` (dicts with 'pixel_values' and 'labels', one
    batch per Fisher gradient) or a precomputed `fisher`. `loss_fn(model, batch)` replaces the default
    cross-entropy of the logits. With `config.max_memory_gb`, CAP and OBS run in layer groups within
    that budget (cap_hf.streaming.prune_step); the batches are then read once per group. Without it they
    do the same within the memory available when the all-at-once step would not fit.
    """
    config.validate()
    targets = find_targets(model, config.targets, config.ignore)
    if fisher is None:
        config = resolve_budget(config, targets)  # streams when the all-at-once step would not fit
    if config.max_memory_gb is not None and config.method in STREAMING_METHODS and fisher is None:
        if calibration_batches is None:
            raise ValueError(f"Method {config.method!r} needs calibration data for its Fisher: pass "
                             "calibration_batches (e.g. cap_hf.data.calibration_loader(...)).")
        return prune_step(model, config, calibration_batches, targets=targets, loss_fn=loss_fn, progress=progress)
    pruner = get_pruner(config)
    if pruner.fisher_kind is not None and fisher is None:
        if calibration_batches is None:
            raise ValueError(f"Method {config.method!r} needs calibration data for its Fisher: pass "
                             "calibration_batches (e.g. cap_hf.data.calibration_loader(...)).")
        fisher = compute_fisher(model, config, calibration_batches, (pruner.fisher_kind,), targets, loss_fn,
                                progress)[pruner.fisher_kind]
    pruner.prepare(targets, fisher)
    pruner.apply(targets, config.sparsity)
    return sparsity_report(targets)


def oneshot_sweep(
    model: nn.Module,
    base_config: PruningConfig,
    methods: list[str],
    sparsities: list[float],
    calibration_batches: Callable[[], Iterable[Mapping[str, torch.Tensor]]] | None,
    evaluate: Callable[[nn.Module], float],
    loss_fn: Callable | None = None,
    progress: bool = False,
) -> list[dict]:
    """Prune fresh copies of `model` with every method at every sparsity and evaluate each.

    The Fisher is collected once for all methods that need it (one pass gives both kinds), and each
    method's sparsity-independent work (scores, CAP's eliminations) is done once for all sparsities.
    `prune_seconds` counts what one such prune costs on its own: Fisher + preparation + application.
    With `max_memory_gb`, CAP and OBS collect their own Fisher per layer group (counted in `prepare`).
    Returns records with method, sparsity, achieved_sparsity, accuracy and timings; `dense` first.
    """
    import copy
    import time

    n_m = base_config.n_m
    levels = [1.0 - n_m[0] / n_m[1]] if n_m is not None else list(sparsities)
    configs = {m: base_config.replace(method=m, sparsity=levels[0]) for m in methods}  # validated up front
    for s in levels:
        base_config.replace(sparsity=s)
    targets = find_targets(model, base_config.targets, base_config.ignore)
    configs = {m: resolve_budget(c, targets) for m, c in configs.items()}
    records = [{"method": "dense", "sparsity": 0.0, "achieved_sparsity": sparsity_report(targets).overall,
                "accuracy": evaluate(model), "prune_seconds": 0.0}]
    streamed = {m for m, c in configs.items() if c.max_memory_gb is not None and m in STREAMING_METHODS}
    kinds = sorted({c.needs_fisher for m, c in configs.items() if c.needs_fisher and m not in streamed})
    fishers, fisher_seconds = {}, 0.0
    if kinds:
        if calibration_batches is None:
            raise ValueError(f"Methods {methods} need calibration data for the Fisher.")
        start = time.perf_counter()
        fishers = compute_fisher(model, base_config, calibration_batches(), kinds, targets, loss_fn, progress)
        fisher_seconds = time.perf_counter() - start
    for method, config in configs.items():
        pruner = None
        try:
            start = time.perf_counter()
            if method in streamed:  # gradients, Fisher and eliminations per layer group, within the budget
                if calibration_batches is None:
                    raise ValueError(f"Method {method} needs calibration data for the Fisher.")
                pruner = StreamingPruner(config)
                pruner.prepare(model, targets, calibration_batches, loss_fn, progress)
            else:
                pruner = get_pruner(config)
                pruner.prepare(targets, fishers.get(pruner.fisher_kind))
            prepare_seconds = time.perf_counter() - start
            for sparsity in levels:
                pruned = copy.deepcopy(model)
                pruned_targets = find_targets(pruned, config.targets, config.ignore)
                start = time.perf_counter()
                pruner.apply(pruned_targets, sparsity)
                apply_seconds = time.perf_counter() - start
                own_fisher = fisher_seconds if method not in streamed and config.needs_fisher else 0.0
                record = {
                    "method": method, "sparsity": sparsity,
                    "achieved_sparsity": sparsity_report(pruned_targets).overall,
                    "accuracy": evaluate(pruned),
                    "prune_seconds": own_fisher + prepare_seconds + apply_seconds,
                    "fisher_seconds": own_fisher, "prepare_seconds": prepare_seconds, "apply_seconds": apply_seconds,
                    "structure": config.structure,
                }
                records.append(record)
                logger.info("%s at %.2f: top-1 %.4f (prepare %.1f s, apply %.1f s)", method, sparsity,
                            record["accuracy"], prepare_seconds, apply_seconds)
                del pruned
        finally:
            if isinstance(pruner, StreamingPruner):
                pruner.close()  # removes the offload folder
            del pruner
    return records
