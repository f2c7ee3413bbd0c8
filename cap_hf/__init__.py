"""cap_hf: correlation-aware second-order pruning (CAP) for Hugging Face vision models."""

import cap_hf.modeling  # noqa: F401  registers the per-layer-size model classes with the Auto classes
from cap_hf.checkpoint import load_pruned_model, load_sparsity_config, save_sparse_checkpoint
from cap_hf.config import PruningConfig
from cap_hf.fisher import BlockFisher, collect_fisher
from cap_hf.masks import SparsityMismatchError, SparsityReport, sparsity_report, verify_sparsity
from cap_hf.oneshot import compute_fisher, oneshot_prune
from cap_hf.pruners import PRUNERS, get_pruner
from cap_hf.targets import find_targets

__version__ = "0.1.0"

__all__ = [
    "PRUNERS", "BlockFisher", "PruningConfig", "SparsityMismatchError", "SparsityReport", "collect_fisher",
    "compute_fisher", "find_targets", "get_pruner", "load_pruned_model", "load_sparsity_config", "oneshot_prune",
    "save_sparse_checkpoint", "sparsity_report", "verify_sparsity",
]
