"""cap_hf: correlation-aware second-order pruning (CAP) for Hugging Face vision models.

One entry per job: `oneshot_prune(model, config, batches)` for one step, `Pruner` to prepare once and
apply at several sparsities (or with several methods), and `trainer_plugins.CAPPruningCallback` /
`cap_hf.trainer.CAPTrainer` for gradual pruning during training.
"""

import cap_hf.modeling  # noqa: F401  registers the per-layer-size model classes with the Auto classes
from cap_hf.config import PruningConfig
from cap_hf.engine.plan import MemoryBudgetError
from cap_hf.engine.pruner import Pruner
from cap_hf.io.checkpoint import load_pruned_model, load_sparsity_config, save_sparse_checkpoint
from cap_hf.masks import SparsityMismatchError, SparsityReport, sparsity_report, verify_sparsity
from cap_hf.methods import METHODS, PruningMethod, register_method
from cap_hf.oneshot import oneshot_prune, oneshot_sweep
from cap_hf.targets import find_targets

__version__ = "0.2.0"

__all__ = [
    "METHODS", "MemoryBudgetError", "Pruner", "PruningConfig", "PruningMethod", "SparsityMismatchError",
    "SparsityReport", "find_targets", "load_pruned_model", "load_sparsity_config", "oneshot_prune", "oneshot_sweep",
    "register_method", "save_sparse_checkpoint", "sparsity_report", "verify_sparsity",
]
