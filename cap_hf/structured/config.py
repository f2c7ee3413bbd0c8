"""StructuredConfig: the request of a structured pruning run, declared once.

The same dataclass is the argument of `prune_channels` and `prune_second_order` and is parsed by
HfArgumentParser in scripts/structured_prune.py, so every field is a flag with one default and one check
(`check`), and the judgement of the target on the built model (`judge_target`) is the library's.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

from cap_hf.structured.registry import check_structured_method, methods

logger = logging.getLogger(__name__)

NORMALIZERS = ("auto", "mean", "none")
LEVELS = 16  # second order: widths per group in the cost tables (every width for groups of up to 16 channels)
RELATIVE_DAMP = 0.01  # second order: dampening, this fraction of the curvature's mean diagonal (ZipLM's)
TARGETS = ("pruning_ratio", "flops_ratio", "target_speedup", "params_ratio")
KIND_TARGETS = {"channels": ("pruning_ratio", "target_speedup", "flops_ratio"),  # the targets each kind takes
                "second_order": ("target_speedup", "flops_ratio", "params_ratio"), "scratch": ("flops_ratio",)}


@dataclass
class StructuredConfig:
    """What to remove and to which target. Exactly one target; which ones a method takes: `targets_of`."""

    method: str = field(default="dfpc", metadata={
        "help": "dfpc (data-free BGSC saliency), l1 or random on a trained model; obs or cap (second-order: removal "
                "with compensation, from calibration data); pfs (Pruning from Scratch) or uniform (its baseline: every "
                "gated width scaled alike) from a config, trained from scratch."})
    pruning_ratio: float | None = field(default=None, metadata={
        "help": "dfpc / l1 / random: fraction of the prunable channels to remove."})
    flops_ratio: float | None = field(default=None, metadata={
        "help": "MACs of the pruned model over the dense (for pfs: the original, unexpanded) model's, in (0, 1)."})
    target_speedup: float | None = field(default=None, metadata={
        "help": "Reach this speed-up, measured at --speedup_batch_size on this machine."})
    params_ratio: float | None = field(default=None, metadata={
        "help": "obs / cap: keep at most this fraction of the dense model's parameters."})
    uncoupled_only: bool = field(default=False, metadata={
        "help": "Keep the residual streams whole (prune block-internal channels, heads and MLP neurons only)."})
    normalize: str = field(default="auto", metadata={
        "help": "dfpc / l1 / random: each group's scores over their mean (mean), raw as in the DFPC paper (none), or "
                "auto: mean for a ResNet, none for a ViT (the better of the two on each, docs/benchmarks.md)."})
    round_to: int = field(default=1, metadata={
        "help": "Keep every group's width a multiple of this (e.g. 8: kernels run slower on odd widths)."})
    calibration_samples: int = field(default=512, metadata={
        "help": "obs: calibration images of the layer-wise Hessian; cap: per-image gradients of the Fisher."})
    levels: int = field(default=LEVELS, metadata={
        "help": "obs / cap: widths per group in the cost tables and the search (every width for smaller groups)."})
    relative_damp: float = field(default=RELATIVE_DAMP, metadata={
        "help": "obs / cap: dampening, this fraction of each curvature's mean diagonal."})
    max_memory_gb: float | None = field(default=None, metadata={
        "help": "obs / cap: refuse before any data is read when the curvatures need more memory than this."})
    speedup_batch_size: int = field(default=64, metadata={"help": "Batch size the speed-up target is measured at."})
    search_repeats: int = field(default=10, metadata={"help": "Timed passes per candidate of the speed-up search."})

    @property
    def kind(self) -> str:
        """"channels" (scores, then the greedy order), "second_order" or "scratch" (registry.KINDS)."""
        return methods()[self.method].kind

    @property
    def target(self) -> tuple[str, float]:
        """(field name, value) of the one target given (check first)."""
        return next((name, getattr(self, name)) for name in TARGETS if getattr(self, name) is not None)

    def replace(self, **changes) -> StructuredConfig:
        return dataclasses.replace(self, **changes)

    def check(self) -> None:
        """ValueError for a request that cannot be run, before anything is loaded."""
        check_structured_method(self.method)
        check_normalize(self.normalize)
        if self.round_to < 1:
            raise ValueError(f"round_to must be a positive number of channels, got {self.round_to}.")
        allowed = targets_of(self.method)
        given = [name for name in TARGETS if getattr(self, name) is not None]
        wrong = [name for name in given if name not in allowed]
        if wrong and self.kind == "second_order":
            raise ValueError(f"--method {self.method} spends its removals where they cost least: give --target_speedup, "
                             f"--flops_ratio or --params_ratio instead of --{wrong[0]}.")
        if wrong:
            raise ValueError(f"--{wrong[0]} is not a target of {self.method}, which takes "
                             f"{' or '.join('--' + name for name in allowed)}.")
        if len(given) != 1:
            raise ValueError(f"Give exactly one of {', '.join(allowed[:-1])} and {allowed[-1]}."
                             if len(allowed) > 1 else f"--method {self.method} takes --{allowed[0]}.")
        name, value = self.target
        if name == "target_speedup" and not value > 1:
            raise ValueError(f"target_speedup must be above 1, got {value}.")
        if name != "target_speedup" and not 0 < value < 1:
            raise ValueError(f"{name} must be in (0, 1), got {value}.")
        if self.speedup_batch_size < 1 or self.search_repeats < 1:
            raise ValueError("speedup_batch_size and search_repeats must be positive.")
        if self.kind == "second_order":
            if self.normalize != "auto":
                raise ValueError(f"normalize is DFPC's; {self.method} ranks channels by its own errors.")
            if self.levels < 2:
                raise ValueError(f"levels must be at least 2 widths per group, got {self.levels}.")
            if not self.relative_damp > 0:
                raise ValueError(f"relative_damp must be positive, got {self.relative_damp}.")
            if self.calibration_samples < 1:
                raise ValueError(f"calibration_samples must be positive, got {self.calibration_samples}.")


def check_normalize(normalize: str) -> None:
    if normalize not in NORMALIZERS:
        raise ValueError(f"Unknown normalize {normalize!r}; choose one of {', '.join(NORMALIZERS)}.")


def removal_record(removed: int, prunable: int, widths: dict, units: dict) -> dict:
    """The results.json keys every structured run fills: channels removed of those it may prune, each group's
    width before and after, and the groups whose channels are attention heads (indices per channel)."""
    return {"removed_channels": removed, "prunable_channels": prunable, "pruning_ratio": removed / prunable,
            "group_widths": {name: list(w) for name, w in widths.items()}, "head_groups": units}


def targets_of(method: str) -> tuple[str, ...]:
    """The targets a method takes (every target for a name no method has)."""
    known = methods()
    return KIND_TARGETS[known[method].kind] if method in known else TARGETS


def as_config(config: StructuredConfig | str, **fields) -> StructuredConfig:
    """A checked StructuredConfig from a config or a method name, with `fields` replaced."""
    config = StructuredConfig(method=config, **fields) if isinstance(config, str) else config.replace(**fields)
    config.check()
    return config


def judge_target(config: StructuredConfig, results: dict) -> dict:
    """What was asked and what the final measurement of the built model gives (results: params_*, macs_*,
    speedup by batch size, and for a ratio removed / prunable channels): {"target": {kind, value, achieved,
    met, ...}, "target_met"}. A speed-up is judged at `speedup_batch_size`, where the search measured it; a miss
    is logged as a warning."""
    name, value = config.target
    if name == "target_speedup":
        confirmed = results.get("speedup_search", [])
        target = {"kind": "speedup", "value": value, "batch_size": config.speedup_batch_size,
                  "achieved": results["speedup"][str(config.speedup_batch_size)],
                  "search": next((c for c in confirmed if c.get("kept")), confirmed[-1])["speedup"] if confirmed else None}
        target["met"] = target["achieved"] >= value
    elif name in ("flops_ratio", "params_ratio"):
        which = "macs" if name == "flops_ratio" else "params"
        target = {"kind": name, "value": value, "achieved": results[f"{which}_pruned"] / results[f"{which}_dense"]}
        target["met"] = target["achieved"] <= value + 1e-9
    else:
        target = {"kind": "pruning_ratio", "value": value, "achieved": results["pruning_ratio"]}
        target["met"] = results["removed_channels"] >= round(value * results["prunable_channels"])
    if not target["met"]:
        logger.warning("The final measurement misses the target: %s.%s", describe_target(target),
                       " Small models' speed-ups move by about 0.1x between measurements; raise --search_repeats and "
                       "--latency_repeats, or aim higher." if target["kind"] == "speedup" else "")
    return {"target": target, "target_met": bool(target["met"])}


def describe_target(target: dict) -> str:
    """One line on a judged target (judge_target's "target")."""
    if target["kind"] == "speedup":
        search = f"; the search confirmed {target['search']:.2f}x" if target.get("search") else ""
        return (f"--target_speedup {target['value']:g} at batch {target['batch_size']}, final measurement "
                f"{target['achieved']:.2f}x{search}")
    return f"--{target['kind']} {target['value']:g}, achieved {target['achieved']:.3f}"
