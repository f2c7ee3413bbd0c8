"""PruningConfig: the recipe of a pruning step, declared once, in the CAP/SparseML vocabulary.

The same dataclass is the argument of `oneshot_prune` / `Pruner` / `CAPPruningCallback` / `CAPTrainer`
and is parsed by HfArgumentParser in scripts/prune.py and scripts/oneshot.py, so every field is a flag
of every script with one default.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cap_hf.methods import METHODS, canonical_name, get_method

logger = logging.getLogger(__name__)

FISHER_OBJECTIVES = ("auto", "cross_entropy", "features")
POOLINGS = ("cls", "mean", "tokens")  # what a backbone's features are (evaluation.features.extract_features)
# a relative dampening reads the Fisher diagonal from the first this many gradients of a step, before any Fisher
# update (the inverse accumulation starts from I/damp): engine.fisher.relative_dampening
DAMP_ESTIMATE_ROWS = 16
# A default relative dampening is raised this much when num_grads < fisher_block_size: each block's empirical
# Fisher then has rank <= num_grads, and the dampening alone fills the directions no gradient reached
# (scripts/bench/bench_damp.py: 1e-2 beat 1e-3 by 4.7 points on the ResNet with 128 gradients at B=192, while with
# 512 or 1024 gradients 1e-3 was as good or better on both models).
SINGULAR_DAMP_FACTOR = 10
# Fields of earlier versions that recipes may still carry: why they are gone.
REMOVED_FIELDS = {
    "trace_mode": "CAP now always keeps packed snapshots (B(B+1)/2 floats per block: less memory than either "
                  "old mode, and apply is a gather)",
}

def parse_structure(structure: str) -> tuple[int, int] | None:
    """'unstructured' -> None; 'N:M' -> (N, M): at most N non-zeros in every M consecutive weights."""
    if structure == "unstructured":
        return None
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", structure)
    if not match:
        raise ValueError(f"structure must be 'unstructured' or 'N:M' such as '2:4', got {structure!r}.")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ValueError(f"structure {structure!r}: need 0 < N < M (N non-zeros kept in every M weights).")
    return n, m


def upgrade_recipe(data: dict) -> dict:
    """A pruning recipe of an earlier cap_hf in today's field names (removed fields dropped, with why)."""
    data = dict(data)
    for name, why in REMOVED_FIELDS.items():
        if name in data:
            data.pop(name)
            logger.warning("Recipe field %r is no longer used and is ignored: %s.", name, why)
    if "seed" in data and "calibration_seed" not in data:  # cap_hf 0.1
        data["calibration_seed"] = data.pop("seed")
    return data


@dataclass
class PruningConfig:
    """One pruning step. Field names follow the CAP / SparseML recipes users already know."""

    method: str = field(default="cap", metadata={
        "help": "magnitude | obs (WoodFisher) | cap | fastcap, or any method registered with "
                "cap_hf.methods.register_method."})
    sparsity: float = field(default=0.5, metadata={
        "help": "Fraction of the target weights set to zero, in [0, 1): the one-shot target, and the final "
                "sparsity of gradual pruning (scripts/prune.py)."})
    sparsity_distribution: str = field(default="global", metadata={
        "help": "global: one threshold over all targets; uniform: the same sparsity in every layer. FastCAP is "
                "always uniform."})
    structure: str = field(default="unstructured", metadata={
        "help": "'unstructured' or 'N:M' (e.g. '2:4': at most N non-zeros in every M consecutive weights); N:M "
                "fixes the sparsity to 1 - N/M."})
    targets: str | None = field(default=None, metadata={
        "help": "Regex matched in full against module names (transformers-5 in-memory names such as "
                "vit.layers.3.mlp.fc1), or from Python a list of module names. Default: the model family's "
                "attention q/k/v/o and MLP weights; every Linear/Conv2d outside stem and head otherwise."})
    ignore: str | None = field(default=None, metadata={"help": "Regex of module names never to prune."})
    num_grads: int = field(default=1024, metadata={
        "help": "Mini-batch gradients for the empirical Fisher (m), in all: each process computes its share."})
    grad_batch_size: int = field(default=32, metadata={"help": "Images per Fisher gradient."})
    fisher_block_size: int = field(default=192, metadata={"help": "Fisher block size B (paper: 192 for ViT)."})
    damp: float | None = field(default=None, metadata={
        "help": "Absolute dampening lambda added to the Fisher diagonal (CAP/OBS), the paper's form (its ViT "
                "recipes: 1e-8); its effect depends on the scale of the gradients. Give one of --damp and "
                "--relative_damp; neither: the method's default (cap: --relative_damp 1e-3, or 1e-2 with fewer "
                "gradients than --fisher_block_size; obs: --damp 1e-7; chosen by scripts/bench/bench_damp.py, README "
                "'Defaults')."})
    relative_damp: float | None = field(default=None, metadata={
        "help": "CAP/OBS dampening as a fraction of each layer's mean Fisher diagonal over its kept weights, "
                "estimated from the step's first gradients (grad_chunk_size of them, at most "
                f"{DAMP_ESTIMATE_ROWS}): lambda = relative_damp * mean(diag F). See --damp for the defaults."})
    fastcap_damp: float = field(default=1e-2, metadata={
        "help": "FastCAP relative dampening, times the mean Fisher diagonal."})
    fastcap_column_block: int | None = field(default=None, metadata={
        "help": "FastCAP column chunk; default: the whole Fisher block (one chunk)."})
    label_free_fisher: bool = field(default=False, metadata={
        "help": "Sample the Fisher's labels from the model's own predictions instead of using dataset labels "
                "(unlabelled data, self-supervised backbones with a probe head)."})
    fisher_objective: str = field(default="auto", metadata={
        "help": "What the Fisher measures: 'cross_entropy' of the logits (with dataset labels, or sampled ones with "
                "--label_free_fisher); 'features': the Gauss-Newton matrix of the backbone's output features "
                "(--feature_pooling), from random projections, no labels and no head needed (cap_hf.evaluation.features); "
                "'auto': 'features' for a backbone without a head (ViTModel, Dinov2Model, ...), else cross_entropy."})
    feature_pooling: str = field(default="cls", metadata={
        "help": "The features of the 'features' objective (and of k-NN / cosine evaluation): 'cls' (the CLS token "
                "of the last layer, DINO's k-NN feature), 'mean' (patch-token average, registers left out) or "
                "'tokens' (CLS and every patch token, for dense tasks)."})
    fisher_accumulation: str = field(default="auto", metadata={
        "help": "CAP/OBS: 'inverse' updates F^-1 directly, 16 gradients at a time (Woodbury; as accurate as the "
                "paper's one-at-a-time Sherman-Morrison); 'sum' accumulates outer products and inverts by Cholesky "
                "(~1e-3 relative error in F^-1 when damp is tiny next to the gradients); 'auto': 'inverse'. Under "
                "several processes each layer's Fisher is built by one rank from every rank's gradients, so both "
                "work there as in one process."})
    grad_chunk_size: int = field(default=32, metadata={
        "help": "Gradients buffered per batched Fisher update (at most 16, one Woodbury update, with 'inverse')."})
    elimination_chunk_size: int = field(default=64, metadata={
        "help": "CAP: Fisher blocks eliminated at once; 64 keeps B=192 chunks in CPU cache (fastest on 2 cores, "
                "see docs/benchmarks.md)."})
    max_memory_gb: float | None = field(default=None, metadata={
        "help": "Peak memory (GB) of a pruning step where the Fisher lives (process RSS on the CPU, allocated "
                "memory on CUDA). When the step does not fit, the layers are pruned in groups, one gradient pass "
                "each over the same calibration batches, with identical results (docs/design.md). Default: the "
                "memory available (all at once when it fits, else in groups within 90% of it)."})
    offload_dir: str | None = field(default=None, metadata={
        "help": "Folder for results that do not fit in memory under max_memory_gb (default: the system temp "
                "folder). Always removed after the step."})
    dist_timeout: float | None = field(default=None, metadata={
        "help": "Under several processes: seconds a rank waits for the others in the pruning step's collectives "
                "before it stops with an error naming the step's phase (a failed or stuck rank). Default: the "
                "process group's own timeout (accelerate's, or --ddp_timeout: 30 min). Ranks wait for each other "
                "between layer groups, so allow for the slowest rank's share of a group."})
    device: str | None = field(default=None, metadata={"help": "Device for the Fisher math (default: the model's)."})
    calibration_seed: int | None = field(default=None, metadata={
        "help": "Seed of the calibration batches' order and of label-free Fisher labels (with the pruning step and "
                "the process rank: cap_hf.engine.calibration.calibration_seed). Default: the run's --seed (0 from Python)."})

    def __post_init__(self) -> None:
        self.method = canonical_name(self.method)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError with what is wrong and what to do, before any long work starts."""
        method = get_method(self.method)
        if not (0.0 <= float(self.sparsity) < 1.0):
            raise ValueError(
                f"sparsity must be in [0, 1) (a fraction of weights to zero), got {self.sparsity}. "
                "Use e.g. 0.75 for 75%."
            )
        if self.fisher_objective not in FISHER_OBJECTIVES:
            raise ValueError(f"fisher_objective must be one of {FISHER_OBJECTIVES}, got {self.fisher_objective!r}.")
        if self.feature_pooling not in POOLINGS:
            raise ValueError(f"feature_pooling must be one of {POOLINGS}, got {self.feature_pooling!r}.")
        if self.fisher_objective == "features" and self.label_free_fisher:
            raise ValueError("label_free_fisher samples labels for the cross-entropy Fisher; the 'features' objective "
                             "needs no labels at all. Give one of them.")
        if self.sparsity_distribution not in ("global", "uniform"):
            raise ValueError(f"sparsity_distribution must be 'global' or 'uniform', got {self.sparsity_distribution!r}.")
        nm = parse_structure(self.structure)
        if nm is not None and not method.supports_n_m:
            supported = ", ".join(name for name, cls in METHODS.items() if cls.supports_n_m)
            raise ValueError(f"structure {self.structure!r} is supported by {supported}, not {self.method}.")
        for name in ("num_grads", "grad_batch_size", "fisher_block_size", "grad_chunk_size", "elimination_chunk_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}.")
        if nm is not None and abs(self.sparsity - self.fixed_sparsity) > 1e-9:
            raise ValueError(f"structure {self.structure!r} means sparsity {self.fixed_sparsity:g}; "
                             f"got sparsity={self.sparsity}. Set sparsity to {self.fixed_sparsity:g}.")
        if nm is not None and self.fisher_block_size % nm[1]:
            raise ValueError(
                f"fisher_block_size {self.fisher_block_size} must be a multiple of M={nm[1]} for {self.structure}."
            )
        for name in ("damp", "relative_damp", "fastcap_damp"):
            value = getattr(self, name)
            if value is not None and not (0 < float(value) < float("inf")):
                raise ValueError(f"{name} must be a positive number (it keeps the Fisher invertible), got {value}.")
        if self.damp is not None and self.relative_damp is not None:
            raise ValueError(f"damp={self.damp} (absolute) and relative_damp={self.relative_damp} are both set; give "
                             "one of them.")
        if self.max_memory_gb is not None and not (0 < float(self.max_memory_gb) < float("inf")):
            raise ValueError(f"max_memory_gb must be a positive number of GB (or None for no limit), "
                             f"got {self.max_memory_gb}.")
        if self.dist_timeout is not None and not (0 < float(self.dist_timeout) < float("inf")):
            raise ValueError(f"dist_timeout must be a positive number of seconds, got {self.dist_timeout}.")
        if self.fisher_accumulation not in ("auto", "inverse", "sum"):
            raise ValueError(f"fisher_accumulation must be 'auto', 'inverse' or 'sum', got {self.fisher_accumulation!r}.")

    @property
    def n_m(self) -> tuple[int, int] | None:
        return parse_structure(self.structure)

    @property
    def fixed_sparsity(self) -> float | None:
        """The sparsity an N:M structure implies (1 - N/M); None when unstructured."""
        n_m = self.n_m
        return None if n_m is None else 1.0 - n_m[0] / n_m[1]

    def sparsity_levels(self, requested: list[float]) -> list[float]:
        """The levels a sweep or a schedule can reach: N:M allows only its own."""
        return [self.fixed_sparsity] if self.n_m is not None else list(requested)

    def sweep(self, methods: list[str], sparsities: list[float]) -> tuple[list[str], list[float]]:
        """The methods (by their canonical names) and the sparsity levels of a sweep, every pair checked as a
        recipe of its own before any work (the one check of a grid: scripts/oneshot.py and oneshot_sweep)."""
        methods = [canonical_name(m) for m in methods]
        levels = self.sparsity_levels(list(sparsities))
        for method in methods:
            for level in levels:
                self.replace(method=method, sparsity=level)
        return methods, levels

    @property
    def accumulation(self) -> str:
        """fisher_accumulation with 'auto' resolved ('inverse')."""
        return "inverse" if self.fisher_accumulation == "auto" else self.fisher_accumulation

    @property
    def dampening(self) -> dict[str, float | None]:
        """The Fisher's dampening as collect_fisher takes it ({'damp': absolute} or {'relative_damp': r}, the
        other None): the recipe's, else the method's default (a relative one x SINGULAR_DAMP_FACTOR when
        num_grads < fisher_block_size). num_grads is the total over processes (each computes its share)."""
        if self.damp is not None:
            return {"damp": float(self.damp), "relative_damp": None}
        if self.relative_damp is not None:
            return {"damp": None, "relative_damp": float(self.relative_damp)}
        default = get_method(self.method).default_dampening
        relative = default.get("relative_damp")
        if relative is not None and self.num_grads < self.fisher_block_size:  # singular blocks: more dampening
            relative *= SINGULAR_DAMP_FACTOR
        return {"damp": default.get("damp"), "relative_damp": relative}

    def describe_dampening(self) -> str:
        """The dampening in words (model cards, logs): the method's own words for it."""
        return get_method(self.method).describe_dampening(self)

    @property
    def needs_fisher(self) -> str | None:
        """Which Fisher statistic the method needs: 'block', 'shared' or None."""
        return get_method(self.method).fisher

    def replace(self, **changes) -> PruningConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PruningConfig:
        data = upgrade_recipe(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown PruningConfig keys {unknown}; valid keys: {sorted(known)}.")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        text = json.dumps(self.to_dict(), indent=2) if path.suffix == ".json" else yaml.safe_dump(self.to_dict())
        path.write_text(text)

    @classmethod
    def load(cls, path: str | Path) -> PruningConfig:
        text = Path(path).read_text()
        data = json.loads(text) if Path(path).suffix == ".json" else yaml.safe_load(text)
        return cls.from_dict(data)
