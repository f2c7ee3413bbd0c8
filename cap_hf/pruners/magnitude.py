"""Magnitude pruning: the baseline. Global or uniform, unstructured or N:M."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from cap_hf.pruners.base import Pruner, nm_prune_mask, select_pruned


class MagnitudePruner(Pruner):
    fisher_kind = None

    @torch.no_grad()
    def apply(self, targets: Mapping[str, nn.Module], sparsity: float) -> None:
        scores = {}
        for name, module in targets.items():
            weight = module.weight.detach().float()
            score = weight.abs()
            score[weight == 0] = float("-inf")
            scores[name] = score
        n_m = self.config.n_m
        if n_m is not None:
            pruned = {name: nm_prune_mask(s, *n_m) for name, s in scores.items()}
        else:
            pruned = select_pruned(scores, sparsity, self.config.sparsity_distribution)
        for name, module in targets.items():
            module.weight.masked_fill_(pruned[name].to(module.weight.device), 0.0)
