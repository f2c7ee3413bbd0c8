"""Which weights go: the lowest scores globally or per layer, or N:M patterns; and the (n, B) block view
of a weight that every method works on."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import nn

logger = logging.getLogger(__name__)


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
    """Pick the weights to prune: the lowest scores, over all layers at once ('global') or per layer ('uniform').

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
    """Prune the M-N lowest scores in every group of M consecutive weights (row-major order)."""
    flat = scores.reshape(-1)
    if flat.numel() % m:
        raise ValueError(f"A layer with {flat.numel()} weights cannot be split into groups of M={m}.")
    groups = flat.reshape(-1, m)
    order = groups.argsort(dim=1)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(1, order[:, : m - n], True)
    return mask.reshape(scores.shape)


def weight_blocks(module: nn.Module, block_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The weight flattened row-major and cut into (d/B, B) blocks, as an fp32 copy."""
    weight = module.weight.detach()
    return weight.reshape(-1, block_size).to(device or weight.device, torch.float32, copy=True)


@torch.no_grad()
def write_blocks(module: nn.Module, blocks: torch.Tensor) -> None:
    weight = module.weight
    weight.copy_(blocks.reshape(weight.shape).to(weight.device, weight.dtype))
