"""One-shot pruning: the user-facing entry point."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from cap_hf.config import PruningConfig
from cap_hf.fisher import BlockFisher, collect_fisher
from cap_hf.masks import SparsityReport, current_masks, sparsity_report
from cap_hf.pruners import get_pruner
from cap_hf.targets import find_targets


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
    cross-entropy of the logits.
    """
    config.validate()
    targets = find_targets(model, config.targets, config.ignore)
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
