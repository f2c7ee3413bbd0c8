"""Which weights go: the lowest scores over all layers (under several processes too) or per layer; and the
(n, B) block view of a weight that every method works on. The selections inside one tensor (lowest_k_mask,
nm_prune_mask) are the kernels' own, in cap_hf.methods.base."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import nn

from cap_hf.engine.ranks import Ranks
from cap_hf.methods.base import lowest_k_mask

logger = logging.getLogger(__name__)


def _order_keys(scores: torch.Tensor) -> torch.Tensor:
    """int32 keys in the order of the float32 scores (-0.0 counted as 0.0, as comparisons do)."""
    bits = (scores.detach().reshape(-1).to(torch.float32) + 0.0).view(torch.int32).long()
    return torch.where(bits >= 0, bits, -bits - 2 ** 31 - 1).to(torch.int32)


def lowest_k_masks(scores: Mapping[str, torch.Tensor], k: int, sizes: Mapping[str, int] | None = None,
                   ranks: Ranks | None = None) -> dict[str, torch.Tensor]:
    """Boolean masks of exactly k entries with the lowest scores over all tensors at once, ties broken by
    position in the concatenation of the tensors in `sizes`' order (default: `scores`' order).

    With `ranks` (cap_hf.engine.ranks) each process holds the scores of its own layers and `sizes` names every
    layer of every rank: the k-th value is found by bisection over the scores' int32 order keys (32 sums
    over the ranks) and the ties by their counts per layer, so no rank ever holds the other ranks' scores."""
    ranks = ranks or Ranks()
    sizes = dict(sizes) if sizes is not None else {name: t.numel() for name, t in scores.items()}
    k = int(min(max(k, 0), sum(sizes.values())))
    if k == 0:  # k is the same on every rank: none skips a collective the others call
        return {name: torch.zeros(t.shape, dtype=torch.bool, device=t.device) for name, t in scores.items()}
    keys = {name: _order_keys(t) for name, t in scores.items()}

    def count(test) -> int:
        local = sum(int(test(key).sum()) for key in keys.values())
        return int(ranks.sum([local], "global threshold", torch.int64)[0])

    low, high = -2 ** 31, 2 ** 31 - 1  # the smallest key t with at least k keys <= t
    while low < high:
        middle = (low + high) // 2
        if count(lambda key, t=middle: key <= t) >= k:
            high = middle
        else:
            low = middle + 1
    tied = {name: key == low for name, key in keys.items()}
    counts = ranks.sum([int(tied[name].sum()) if name in tied else 0 for name in sizes],
                       "ties of the global threshold", torch.int64)
    masks, left = {}, k - count(lambda key: key < low)  # ties still to take, earliest positions first
    for name, ties in zip(sizes, counts, strict=True):
        if name in keys:
            tie = tied[name]
            take = min(max(left, 0), int(ties))
            masks[name] = ((keys[name] < low) | (tie & (torch.cumsum(tie, 0) <= take))).reshape(scores[name].shape)
        left -= int(ties)
    return masks


def select_pruned(scores: Mapping[str, torch.Tensor], sparsity: float, distribution: str,
                  sizes: Mapping[str, int] | None = None, ranks: Ranks | None = None) -> dict[str, torch.Tensor]:
    """Pick the weights to prune: the lowest scores, over all layers at once ('global') or per layer ('uniform').

    Already-pruned weights must carry -inf so they stay pruned. A target below the current sparsity
    keeps what is already pruned (pruning never revives weights). Under several processes (`ranks`), each
    passes the scores of its own layers and `sizes` of every layer in model order (see lowest_k_masks).
    """
    if distribution == "uniform":
        result = {}
        for name, s in scores.items():
            k = max(round(sparsity * s.numel()), int(torch.isneginf(s).sum()))
            result[name] = lowest_k_mask(s, k)
        return result
    ranks = ranks or Ranks()
    sizes = dict(sizes) if sizes is not None else {name: t.numel() for name, t in scores.items()}
    total = sum(sizes.values())
    already = int(ranks.sum([sum(int(torch.isneginf(s).sum()) for s in scores.values())], "current sparsity",
                            torch.int64)[0])
    k = round(sparsity * total)
    if k < already:
        if ranks.rank == 0:
            logger.warning("Target sparsity %.4f is below the current %.4f; keeping the current masks.",
                           sparsity, already / total)
        k = already
    return lowest_k_masks(scores, k, sizes, ranks)


def weight_blocks(module: nn.Module, block_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The weight flattened row-major and cut into (d/B, B) blocks, as an fp32 copy."""
    weight = module.weight.detach()
    return weight.reshape(-1, block_size).to(device or weight.device, torch.float32, copy=True)


@torch.no_grad()
def write_blocks(module: nn.Module, blocks: torch.Tensor) -> None:
    weight = module.weight
    weight.copy_(blocks.reshape(weight.shape).to(weight.device, weight.dtype))
