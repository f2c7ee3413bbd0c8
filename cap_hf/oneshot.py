"""One-shot pruning: `oneshot_prune` (one step, in place) and `oneshot_sweep` (methods x sparsities on
copies of a model, each evaluated), both on the engine's Pruner."""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from cap_hf.config import PruningConfig
from cap_hf.engine.pruner import Batches, Pruner
from cap_hf.masks import SparsityReport, sparsity_report

logger = logging.getLogger(__name__)


def oneshot_prune(
    model: nn.Module,
    config: PruningConfig,
    calibration_batches: Batches | None = None,
    *,
    loss_fn: Callable[[nn.Module, Mapping[str, torch.Tensor]], torch.Tensor] | None = None,
    progress: bool = False,
) -> SparsityReport:
    """Prune `model` in place to `config.sparsity` with `config.method`; returns the measured sparsity.

    Methods with a Fisher need `calibration_batches` (dicts with 'pixel_values' and 'labels', one batch
    per gradient). `loss_fn(model, batch)` replaces the default cross-entropy of the logits. The step runs
    all at once when it fits the memory available (or `config.max_memory_gb`), else in layer groups with
    the same result (the batches are then read once per group and must be the same each time).
    """
    with Pruner(model, config, loss_fn=loss_fn) as pruner:
        pruner.prepare(calibration_batches, progress)
        return pruner.apply()


# what an evaluation reports: a classifier's top-1, or a backbone's (cap_hf.evaluation.features.FeatureEvaluator)
METRICS = ("accuracy", "knn_accuracy", "linear_probe_accuracy", "feature_cosine")


def metrics(result: float | Mapping[str, float]) -> dict[str, float]:
    """An evaluation's result as record fields: a number is the top-1 `accuracy`."""
    return dict(result) if isinstance(result, Mapping) else {"accuracy": result}


def main_metric(records: list[dict]) -> str:
    """The first of METRICS the records have (what a plot shows)."""
    return next(k for k in METRICS if any(k in r for r in records))


def oneshot_sweep(
    model: nn.Module,
    config: PruningConfig,
    methods: Sequence[str],
    sparsities: Sequence[float],
    calibration_batches: Batches | None,
    evaluate: Callable[[nn.Module], float | Mapping[str, float]],
    loss_fn: Callable | None = None,
    progress: bool = False,
) -> list[dict]:
    """Prune fresh copies of `model` with every method at every sparsity and evaluate each.

    One Pruner prepares all methods: one gradient pass per layer group and dampening gives the Fisher of
    every method that needs one (each method at its own default dampening unless the config sets one), and
    each method's sparsity-independent work is done once for all sparsities. `prune_seconds` counts what one
    such prune costs on its own: its Fisher (for methods that use one) + the method's preparation + one
    application. Records: method, sparsity, achieved_sparsity,
    what `evaluate` returns (a top-1 `accuracy`, or a dict of METRICS), timings; `dense` first.
    """
    methods, levels = config.sweep(list(methods), list(sparsities))
    records = [{"method": "dense", "sparsity": 0.0, **metrics(evaluate(model)), "prune_seconds": 0.0,
                "achieved_sparsity": None}]
    with Pruner(model, config.replace(sparsity=levels[0]), methods, loss_fn=loss_fn) as pruner:
        records[0]["achieved_sparsity"] = sparsity_report(pruner.targets).overall
        pruner.prepare(calibration_batches, progress)
        for method in methods:
            own_fisher = pruner.fisher_seconds_of(method)
            prepare_seconds = pruner.prepare_seconds(method)
            for sparsity in levels:
                pruned = copy.deepcopy(model)
                start = time.perf_counter()
                report = pruner.apply(sparsity, method, model=pruned)
                apply_seconds = time.perf_counter() - start
                record = {
                    "method": method, "sparsity": sparsity, "achieved_sparsity": report.overall,
                    **metrics(evaluate(pruned)), "prune_seconds": own_fisher + prepare_seconds + apply_seconds,
                    "fisher_seconds": own_fisher, "prepare_seconds": prepare_seconds, "apply_seconds": apply_seconds,
                    "structure": config.structure,
                }
                damps = pruner.damps.get(method)
                if damps:  # the dampening each layer's block Fisher got
                    record["damp_range"] = [min(damps.values()), max(damps.values())]
                    record["dampening"] = pruner.configs[method].describe_dampening()
                records.append(record)
                logger.info("%s at %.2f: %s (prepare %.1f s, apply %.1f s)", method, sparsity,
                            ", ".join(f"{k} {record[k]:.4f}" for k in METRICS if k in record), prepare_seconds,
                            apply_seconds)
                del pruned
    return records
