"""WoodFisher / OBS: score every weight once with w^2 / (2 [F^-1]_qq), prune the lowest globally and
apply the sum of the single-weight OBS updates (correlations between removed weights are ignored)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from cap_hf.fisher import BlockFisher
from cap_hf.pruners.base import Pruner, select_pruned, weight_blocks, write_blocks


class OBSPruner(Pruner):
    fisher_kind = "block"

    def _prepare(self, targets: Mapping[str, nn.Module], fisher: BlockFisher | None) -> None:
        self.block_sizes = dict(fisher.block_sizes)
        self.inverses: dict[str, torch.Tensor] = {}
        self.scores: dict[str, torch.Tensor] = {}
        for name, module in targets.items():
            inverse = fisher.inverse(name, self.config.damp)
            w = weight_blocks(module, self.block_sizes[name]).to(inverse.device)
            diag = inverse.diagonal(dim1=1, dim2=2)
            score = w.pow(2) / (2 * diag)
            score[w == 0] = float("-inf")
            self.inverses[name] = inverse
            self.scores[name] = score

    @torch.no_grad()
    def apply(self, targets: Mapping[str, nn.Module], sparsity: float) -> None:
        pruned = select_pruned(self.scores, sparsity, self.config.sparsity_distribution)
        chunk = self.config.elimination_chunk_size
        for name, module in targets.items():
            inverse = self.inverses[name]
            w = weight_blocks(module, self.block_sizes[name]).to(inverse.device)
            removed = pruned[name]
            for start in range(0, w.shape[0], chunk):
                q = inverse[start:start + chunk]
                wc, rc = w[start:start + chunk], removed[start:start + chunk]
                coef = torch.where(rc, wc / q.diagonal(dim1=1, dim2=2), torch.zeros_like(wc))
                wc -= torch.bmm(q, coef.unsqueeze(-1)).squeeze(-1)
                wc[rc] = 0.0
            write_blocks(module, w)
