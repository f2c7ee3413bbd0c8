"""WoodFisher / OBS: score every weight once with w^2 / (2 [F^-1]_qq), prune the lowest, and apply the
sum of the single-weight OBS updates (correlations between the removed weights are ignored)."""

from __future__ import annotations

import torch

from cap_hf.methods.base import Layer, PruningMethod, register_method

ROWS_PER_PUT = 4096  # inverse blocks per stored chunk


def obs_update(w: torch.Tensor, inverse: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """w - sum over removed q of (w_q / [F^-1]_qq) F^-1 e_q, the removed weights then set to 0 (per block)."""
    coef = torch.where(removed, w / inverse.diagonal(dim1=1, dim2=2), torch.zeros_like(w))
    new = w - torch.bmm(inverse, coef.unsqueeze(-1)).squeeze(-1)
    return new.masked_fill(removed, 0.0)


@register_method
class OBS(PruningMethod):
    name = "obs"
    title = "WoodFisher / OBS"
    citation = """@inproceedings{singh2020woodfisher,
  title     = {{WoodFisher}: Efficient Second-Order Approximation for Neural Network Compression},
  author    = {Singh, Sidak Pal and Alistarh, Dan},
  booktitle = {Advances in Neural Information Processing Systems},
  year      = {2020}
}"""
    default_dampening = {"damp": 1e-7}  # scripts/bench/bench_damp.py: its summed updates want the absolute form
    aliases = ("woodfisher", "wf")
    fisher = "block"

    def prepare_layer(self, layer: Layer) -> torch.Tensor:
        inverse = layer.fisher["block"]
        for start in range(0, inverse.shape[0], ROWS_PER_PUT):
            layer.put("inverse", inverse[start:start + ROWS_PER_PUT])
        return layer.weights.pow(2) / (2 * inverse.diagonal(dim1=1, dim2=2))

    def apply_layer(self, layer: Layer, pruned: torch.Tensor | None, sparsity: float) -> torch.Tensor:
        w = layer.weights.clone()
        start = 0
        for inverse in layer.chunks("inverse"):
            sl = slice(start, start + inverse.shape[0])
            w[sl] = obs_update(w[sl], inverse, pruned[sl])
            start = sl.stop
        return w

    def kept_bytes_per_weight(self) -> float:
        return 4.0

    def stored_bytes_per_weight(self, block_size: int) -> float:
        return 4.0 * block_size
