"""FastCAP (CAP paper, Appendix B): one B x B Fisher shared by all blocks of a layer and a
SparseGPT-style column sweep with error compensation. Sparsity is uniform per layer.

Unlike the released reference code, the updated weights are what gets written back (the reference
writes the original weights, which reduces it to magnitude pruning).
"""

from __future__ import annotations

import torch

from cap_hf.methods.base import Layer, PruningMethod, lowest_k_mask, register_method
from cap_hf.methods.cap import CITATION


def fastcap_sweep(w: torch.Tensor, upper: torch.Tensor, kept: torch.Tensor, sparsity: float,
                  column_block: int) -> torch.Tensor:
    """Prune (n, B) weights to `sparsity` with the upper Cholesky factor of the inverse Fisher.

    In each chunk of columns, the weights with the lowest w^2 / U_jj^2 go (chunk-wide threshold, so
    the ratio is uniform per chunk and adaptive over rows and columns); each pruned column's error is
    spread over the later columns.
    """
    w = w.clone()
    n, size = w.shape
    done = 0
    for c1 in range(0, size, column_block):
        c2 = min(c1 + column_block, size)
        block = w[:, c1:c2].clone()
        u_block = upper[c1:c2, c1:c2]
        errors = torch.zeros_like(block)
        score = block.pow(2) / u_block.diagonal().pow(2)
        already = ~kept[:, c1:c2]
        score[already] = float("-inf")
        # cumulative rounding, so the layer as a whole hits round(sparsity * numel) exactly
        k = max(round(sparsity * n * c2) - done, int(already.sum()))
        prune = lowest_k_mask(score, k)
        done += k
        for i in range(c2 - c1):
            col = block[:, i]
            q = torch.where(prune[:, i], torch.zeros_like(col), col)
            err = (col - q) / u_block[i, i]
            block[:, i:] -= err.unsqueeze(1) * u_block[i, i:].unsqueeze(0)
            block[:, i] = q
            errors[:, i] = err
        w[:, c1:c2] = block
        w[:, c2:] -= errors @ upper[c1:c2, c2:]
    return w


@register_method
class FastCAP(PruningMethod):
    """Keeps one B x B factor per layer (in memory: it is tiny)."""

    name = "fastcap"
    title = "FastCAP (CAP with a shared Fisher)"
    citation = CITATION
    aliases = ("fast_cap",)
    fisher = "shared"

    @classmethod
    def describe_dampening(cls, config) -> str:
        return f"{config.fastcap_damp:g} x the mean Fisher diagonal (FastCAP)"

    def __init__(self, config):
        super().__init__(config)
        self.uppers: dict[str, torch.Tensor] = {}

    def prepare_layer(self, layer: Layer) -> None:
        h = layer.fisher["shared"].clone()
        diag = h.diagonal()
        diag[diag == 0] = 1.0  # columns that never saw a gradient
        diag += self.config.fastcap_damp * diag.mean()
        chol, info = torch.linalg.cholesky_ex(h)
        if int(info):
            raise FloatingPointError(f"FastCAP Fisher of {layer.name} is not positive definite; raise --fastcap_damp.")
        self.uppers[layer.name] = torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)
        return None

    def apply_layer(self, layer: Layer, pruned: torch.Tensor | None, sparsity: float) -> torch.Tensor:
        w = layer.weights
        column_block = self.config.fastcap_column_block or w.shape[1]
        return fastcap_sweep(w, self.uppers[layer.name].to(w.device), w != 0, sparsity, column_block)
