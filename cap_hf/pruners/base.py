"""The pruner interface and the score-threshold selection shared by all methods."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping

import torch
from torch import nn

from cap_hf.config import PruningConfig
from cap_hf.fisher import BlockFisher

logger = logging.getLogger(__name__)


class Pruner(ABC):
    """prepare() does the sparsity-independent work once (scores, eliminations); apply() prunes the
    given target weights in place to one sparsity. apply() may be called on several copies of the
    same model (one-shot at several sparsities)."""

    fisher_kind: str | None = None

    def __init__(self, config: PruningConfig):
        self.config = config

    def prepare(self, targets: Mapping[str, nn.Module], fisher: BlockFisher | None = None) -> None:
        if self.fisher_kind is not None and fisher is None:
            raise ValueError(f"{type(self).__name__} needs a {self.fisher_kind!r} Fisher; got none.")
        self._prepare(targets, fisher)

    def _prepare(self, targets: Mapping[str, nn.Module], fisher: BlockFisher | None) -> None:  # noqa: B027
        pass

    @abstractmethod
    def apply(self, targets: Mapping[str, nn.Module], sparsity: float) -> None:
        """Zero the chosen weights (and update the rest, for second-order methods) in place."""


def lowest_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of exactly k entries with the lowest scores (ties broken by position)."""
    flat = scores.reshape(-1)
    k = int(min(max(k, 0), flat.numel()))
    if k == 0:
        return torch.zeros_like(flat, dtype=torch.bool).reshape(scores.shape)
    threshold = torch.kthvalue(flat, k).values
    below = flat < threshold
    ties = flat == threshold
    need = k - int(below.sum())
    mask = below | (ties & (torch.cumsum(ties, 0) <= need))
    return mask.reshape(scores.shape)


def select_pruned(scores: Mapping[str, torch.Tensor], sparsity: float, distribution: str) -> dict[str, torch.Tensor]:
    """Pick the weights to prune: the lowest scores, globally or per layer.

    Already-pruned weights must carry -inf so they stay pruned. A target below the current sparsity
    keeps what is already pruned (pruning never revives weights).
    """
    if distribution == "uniform":
        result = {}
        for name, s in scores.items():
            k = max(round(sparsity * s.numel()), int(torch.isneginf(s).sum()))
            result[name] = lowest_k_mask(s, k)
        return result
    names = list(scores)
    flat = torch.cat([scores[n].reshape(-1).to("cpu", torch.float32) for n in names])
    already = int(torch.isneginf(flat).sum())
    k = round(sparsity * flat.numel())
    if k < already:
        logger.warning("Target sparsity %.4f is below the current %.4f; keeping the current masks.",
                       sparsity, already / flat.numel())
        k = already
    mask = lowest_k_mask(flat, k)
    result, offset = {}, 0
    for n in names:
        size = scores[n].numel()
        result[n] = mask[offset:offset + size].reshape(scores[n].shape).to(scores[n].device)
        offset += size
    return result


def nm_prune_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Prune the M-N lowest scores in every group of M consecutive weights."""
    flat = scores.reshape(-1)
    if flat.numel() % m:
        raise ValueError(f"A layer with {flat.numel()} weights cannot be split into groups of M={m}.")
    groups = flat.reshape(-1, m)
    order = groups.argsort(dim=1)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(1, order[:, : m - n], True)
    return mask.reshape(scores.shape)


def weight_blocks(module: nn.Module, block_size: int) -> torch.Tensor:
    """The weight flattened row-major and cut into (d/B, B) blocks, as an fp32 copy."""
    return module.weight.detach().reshape(-1, block_size).float().clone()


@torch.no_grad()
def write_blocks(module: nn.Module, blocks: torch.Tensor) -> None:
    weight = module.weight
    weight.copy_(blocks.reshape(weight.shape).to(weight.dtype))
