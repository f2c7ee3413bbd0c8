"""Magnitude pruning: the baseline. Global or uniform, unstructured or N:M."""

from __future__ import annotations

import torch

from cap_hf.methods.base import Layer, PruningMethod, nm_prune_mask, register_method


@register_method
class Magnitude(PruningMethod):
    name = "magnitude"
    title = "magnitude pruning"
    citation = """@article{zhu2017prune,
  title   = {To prune, or not to prune: exploring the efficacy of pruning for model compression},
  author  = {Zhu, Michael and Gupta, Suyog},
  journal = {arXiv preprint arXiv:1710.01878},
  year    = {2017}
}"""
    aliases = ("gm",)
    supports_n_m = True

    def prepare_layer(self, layer: Layer) -> torch.Tensor | None:
        return layer.weights.abs() if self.config.n_m is None else None

    def apply_layer(self, layer: Layer, pruned: torch.Tensor | None, sparsity: float) -> torch.Tensor:
        w = layer.weights
        if pruned is None:  # N:M
            scores = w.abs().masked_fill(w == 0, float("-inf"))
            pruned = nm_prune_mask(scores, *self.config.n_m)
        return w.masked_fill(pruned, 0.0)

    def kept_bytes_per_weight(self) -> float:
        return 4.0 if self.config.n_m is None else 0.0
