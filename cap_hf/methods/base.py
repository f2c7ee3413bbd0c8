"""The interface of a pruning method and the registry that finds methods by name.

A method is a small per-layer kernel; the engine (cap_hf/engine/pruner.py) does everything around it: the
memory plan, the gradient passes, the Fisher and its inverse, the store, the global selection and the
write-back. To add a method, write one file:

    @register_method
    class MyMethod(PruningMethod):
        name = "mine"
        title = "my method"       # what model cards call it
        citation = "@article{...}"  # BibTeX for the cards ("" for none)
        fisher = "block"          # what prepare_layer needs: "block" (inverse of each B x B Fisher
                                  # block), "shared" (one B x B Fisher per layer) or None
        def prepare_layer(self, layer):   # once per layer, independent of the sparsity
            ...                           # keep what apply needs: layer.put(key, rows) or on self
            return scores                 # (n, B), lower = pruned first; or None to choose on its own
        def apply_layer(self, layer, pruned, sparsity):   # at every sparsity
            return new_weights            # (n, B)

and import it (cap_hf.methods imports the built-in ones). PruningConfig, the scripts and the model cards
ask this registry for everything else (tests/test_checkpoint.py registers one from outside the package).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:  # the engine hands a Store in; a kernel only calls put / chunks
    from cap_hf.engine.store import Store


@dataclass
class Layer:
    """One target layer as a kernel sees it. Kernels never modify `weights` or `fisher` in place: several
    methods of a sweep read the same tensors."""

    name: str
    weights: torch.Tensor  # (n, B) fp32 blocks of the flattened weight, on the compute device
    store: Store
    store_prefix: str
    fisher: Mapping[str, torch.Tensor] = field(default_factory=dict)  # "block": (n, B, B) F^-1; "shared": (B, B) F

    def put(self, key: str, rows: torch.Tensor) -> None:
        """Keep rows (one per block, in block order, appended chunk by chunk) for apply_layer."""
        self.store.append(f"{self.store_prefix}/{key}", rows)

    def chunks(self, key: str) -> Iterator[torch.Tensor]:
        """What put() kept, chunk by chunk, on the compute device."""
        for rows in self.store.read(f"{self.store_prefix}/{key}"):
            yield rows.to(self.weights.device)


class PruningMethod:
    """A pruning method: prepare_layer() once per layer, apply_layer() at each sparsity."""

    name: ClassVar[str]
    title: ClassVar[str] = ""  # what a model card calls it (default: the name)
    citation: ClassVar[str] = ""  # BibTeX for the model card ("" for none)
    aliases: ClassVar[tuple[str, ...]] = ()
    fisher: ClassVar[str | None] = None
    supports_n_m: ClassVar[bool] = False
    # the dampening of its block Fisher when the recipe gives none, as collect_fisher takes it:
    # {"damp": absolute} or {"relative_damp": fraction of each layer's mean Fisher diagonal; PruningConfig.dampening
    # raises it SINGULAR_DAMP_FACTOR-fold when there are fewer gradients than the block size}
    default_dampening: ClassVar[dict[str, float]] = {"relative_damp": 1e-3}

    def __init__(self, config):
        self.config = config  # a cap_hf.config.PruningConfig (which validates method names with this registry)

    @classmethod
    def describe_dampening(cls, config) -> str:
        """The dampening a PruningConfig gives this method, in words (model cards, logs)."""
        if cls.fisher != "block":
            return "none (no Fisher)"
        damping = config.dampening
        if damping["damp"] is not None:
            return f"{damping['damp']:g} (absolute)"
        return f"{damping['relative_damp']:g} x each layer's mean Fisher diagonal"

    def prepare_layer(self, layer: Layer) -> torch.Tensor | None:
        """Sparsity-independent work. Returns a score per weight (the engine gives weights already at zero
        -inf and picks the lowest globally or per layer), or None when apply_layer chooses by itself."""
        return None

    def apply_layer(self, layer: Layer, pruned: torch.Tensor | None, sparsity: float) -> torch.Tensor:
        """The layer's new (n, B) weights; `pruned` marks the weights to remove when prepare gave scores."""
        raise NotImplementedError

    # ---- what the memory plan needs ------------------------------------------------------------------
    def kept_bytes_per_weight(self) -> float:
        """Bytes per target weight kept in memory for the whole step (scores and the like)."""
        return 0.0

    def stored_bytes_per_weight(self, block_size: int) -> float:
        """Bytes per target weight that prepare_layer puts into the store."""
        return 0.0

    def work_bytes(self, numel: int, block_size: int) -> int:
        """Peak working memory of prepare_layer on one layer, besides its inputs and its results."""
        return 0


METHODS: dict[str, type[PruningMethod]] = {}
ALIASES: dict[str, str] = {}


def register_method(cls: type[PruningMethod]) -> type[PruningMethod]:
    """Class decorator: make a method available to PruningConfig(method=...) and every script."""
    if cls.fisher not in (None, "block", "shared"):
        raise ValueError(f"{cls.__name__}.fisher must be None, 'block' or 'shared', got {cls.fisher!r}.")
    METHODS[cls.name] = cls
    for alias in cls.aliases:
        ALIASES[alias] = cls.name
    return cls


def canonical_name(name: str) -> str:
    """The registered name for `name` or one of its aliases; ValueError listing the registered methods."""
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key not in METHODS:
        raise ValueError(f"Unknown pruning method {name!r}; registered methods: {', '.join(METHODS)} "
                         f"(aliases: {', '.join(f'{a}={n}' for a, n in ALIASES.items())}).")
    return key


def get_method(name: str) -> type[PruningMethod]:
    return METHODS[canonical_name(name)]


def lowest_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of exactly k entries with the lowest scores, ties broken by position (a stable sort)."""
    flat = scores.detach().reshape(-1)
    mask = torch.zeros(flat.shape, dtype=torch.bool, device=flat.device)
    k = int(min(max(k, 0), flat.numel()))
    mask[torch.argsort(flat, stable=True)[:k]] = True
    return mask.reshape(scores.shape)


def nm_prune_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Prune the M-N lowest scores in every group of M consecutive weights (row-major order)."""
    flat = scores.reshape(-1)
    if flat.numel() % m:
        raise ValueError(f"A layer with {flat.numel()} weights cannot be split into groups of M={m}.")
    groups = flat.reshape(-1, m)
    order = groups.argsort(dim=1)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(1, order[:, : m - n], True)
    return mask.reshape(scores.shape)
