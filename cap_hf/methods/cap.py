"""CAP: correlation-aware pruning (Kuznedelev et al., NeurIPS 2023).

Inside every Fisher block, weights are removed greedily one at a time with exact OBS updates and
inverse downdates, so each removal sees the saliencies left by the previous ones. Each weight's score
is the cumulative loss of the block at its removal; one global threshold over all scores gives every
block a prefix of its elimination order, and the block's new weights are the state of the greedy loop
after that many steps (the exact joint OBS solution for that prefix).

Packed snapshots. After k removals a block's weights are zero at the first k positions of its
elimination order, so written in that order the snapshots form a triangle: B(B+1)/2 floats per block,
half of the d*B inverse and half of the reference code's (B+1)*B. Reading a block's weights back at
any sparsity is a gather, not a second elimination.
"""

from __future__ import annotations

import torch

from cap_hf.methods.base import Layer, PruningMethod, register_method

_TINY = 1e-30


def greedy_eliminate(
    w: torch.Tensor,
    inverse: torch.Tensor,
    steps: int | None = None,
    n_m: tuple[int, int] | None = None,
    traces: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy OBS elimination in every block at once. Modifies `w` (n, B) and `inverse` (n, B, B) in place.

    Returns (scores, order): scores[b, j] is the block's cumulative loss when weight j was removed;
    order[b, k] is the index removed at step k. Weights that are already zero go first at zero cost.
    With n_m=(N, M) a weight is eligible only while its group of M has fewer than M-N removals.
    With `traces` (steps+1, n, B), the weights after every step are written there.
    """
    n, size = w.shape
    steps = size if steps is None else steps
    rows = torch.arange(n, device=w.device)
    removed = torch.zeros(n, size, dtype=torch.bool, device=w.device)
    scores = torch.full((n, size), float("inf"), dtype=w.dtype, device=w.device)
    order = torch.empty(n, steps, dtype=torch.long, device=w.device)
    cumulative = torch.zeros(n, dtype=w.dtype, device=w.device)
    if n_m is not None:
        group_of = torch.arange(size, device=w.device) // n_m[1]
        group_removed = torch.zeros(n, size // n_m[1], dtype=torch.long, device=w.device)
    if traces is not None:
        traces[0].copy_(w)
    for k in range(steps):
        diag = inverse.diagonal(dim1=1, dim2=2)
        rho = w.pow(2) / diag.clamp_min(_TINY)
        rho.masked_fill_(removed, float("inf"))
        if n_m is not None:
            full = group_removed.gather(1, group_of.expand(n, -1)) >= n_m[1] - n_m[0]
            rho.masked_fill_(full, float("inf"))
        p = rho.argmin(dim=1)
        cumulative += 0.5 * rho[rows, p]
        scores[rows, p] = cumulative
        order[:, k] = p
        _remove(w, inverse, rows, p)
        removed[rows, p] = True
        if n_m is not None:
            group_removed[rows, group_of[p]] += 1
        if traces is not None:
            traces[k + 1].copy_(w)
    return scores, order


def _remove(w: torch.Tensor, inverse: torch.Tensor, rows: torch.Tensor, p: torch.Tensor) -> None:
    """One OBS step per block: w -= w_p/Q_pp * Q[:, p]; Q -= Q[:, p] Q[p, :] / Q_pp; then decouple p."""
    column = inverse[rows, :, p]  # (n, B)
    pivot = column[rows, p].clamp_min(_TINY).unsqueeze(1)
    w.sub_((w[rows, p].unsqueeze(1) / pivot) * column)
    inverse.baddbmm_((column / pivot).unsqueeze(2), column.unsqueeze(1), alpha=-1.0)
    w[rows, p] = 0.0
    inverse[rows, p, :] = 0.0
    inverse[rows, :, p] = 0.0
    inverse[rows, p, p] = 1.0


def pack_traces(traces: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """(B+1, n, B) snapshots -> (n, B(B+1)/2): row k holds the weights at order[k:] after k removals."""
    size = order.shape[1]
    in_order = traces[:size].permute(1, 0, 2).gather(2, order.unsqueeze(1).expand(-1, size, -1))
    rows, cols = torch.triu_indices(size, size, device=order.device)
    return in_order[:, rows, cols]


def unpack_weights(packed: torch.Tensor, order: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The weights of every block after counts[b] removals, from pack_traces' output."""
    n, size = order.shape
    j = torch.arange(size, device=packed.device)
    k = counts.to(packed.device, torch.long).unsqueeze(1)
    index = k * size - k * (k - 1) // 2 + (j - k)  # start of row k, then the offset inside it
    values = packed.gather(1, index.clamp(0, packed.shape[1] - 1))
    values = torch.where(j >= k, values, torch.zeros_like(values))
    return torch.zeros(n, size, dtype=packed.dtype, device=packed.device).scatter_(1, order.long(), values)


CITATION = """@inproceedings{kuznedelev2023cap,
  title     = {{CAP}: Correlation-Aware Pruning for Highly-Accurate Sparse Vision Models},
  author    = {Kuznedelev, Denis and Kurtic, Eldar and Frantar, Elias and Alistarh, Dan},
  booktitle = {Advances in Neural Information Processing Systems},
  year      = {2023},
  eprint    = {2210.09223},
  archivePrefix = {arXiv}
}"""


@register_method
class CAP(PruningMethod):
    """Keeps, per weight, its score (fp32) and its place in the block's order (int16); per block, the packed
    snapshots (unstructured) or the final N:M weights, in the store."""

    name = "cap"
    title = "CAP (correlation-aware pruning)"
    citation = CITATION
    default_dampening = {"relative_damp": 1e-3}  # x10 with fewer gradients than B (PruningConfig.dampening);
    # scripts/bench/bench_damp.py: best or within 0.1 point of it on the ViT and the ResNet
    fisher = "block"
    supports_n_m = True

    def __init__(self, config):
        super().__init__(config)
        self.orders: dict[str, torch.Tensor] = {}

    def _steps(self, size: int, name: str) -> int:
        n_m = self.config.n_m
        if n_m is not None and size % n_m[1]:
            raise ValueError(f"Layer {name}: Fisher block size {size} is not a multiple of M={n_m[1]}.")
        if size > torch.iinfo(torch.int16).max:
            raise ValueError(f"Layer {name}: block size {size} is too large for the int16 elimination order.")
        return size * (n_m[1] - n_m[0]) // n_m[1] if n_m is not None else size

    def prepare_layer(self, layer: Layer) -> torch.Tensor | None:
        w, inverse = layer.weights, layer.fisher["block"]
        n, size = w.shape
        n_m = self.config.n_m
        steps = self._steps(size, layer.name)
        chunk = self.config.elimination_chunk_size
        scores = torch.empty_like(w)
        order = torch.empty(n, steps, dtype=torch.int16)
        traces = None if n_m is not None else torch.empty(steps + 1, min(chunk, n), size, dtype=w.dtype,
                                                          device=w.device)
        for start in range(0, n, chunk):
            sl = slice(start, start + chunk)
            wc = w[sl].clone()
            part = traces[:, : wc.shape[0]] if traces is not None else None
            scores[sl], chunk_order = greedy_eliminate(wc, inverse[sl].clone(), steps, n_m, part)
            order[sl] = chunk_order.to("cpu", torch.int16)
            layer.put("weights" if n_m is not None else "packed", wc if n_m is not None
                      else pack_traces(part, chunk_order))
        if n_m is not None:
            return None  # the N:M weights are final
        self.orders[layer.name] = order
        return scores

    def apply_layer(self, layer: Layer, pruned: torch.Tensor | None, sparsity: float) -> torch.Tensor:
        if pruned is None:  # N:M
            return torch.cat(list(layer.chunks("weights")))
        order = self.orders[layer.name]
        counts = pruned.sum(dim=1)
        w = torch.empty_like(layer.weights)
        start = 0
        for packed in layer.chunks("packed"):
            sl = slice(start, start + packed.shape[0])
            w[sl] = unpack_weights(packed, order[sl].to(packed.device, torch.long), counts[sl])
            start = sl.stop
        return w

    def kept_bytes_per_weight(self) -> float:
        return 0.0 if self.config.n_m is not None else 4.0 + 2.0

    def stored_bytes_per_weight(self, block_size: int) -> float:
        return 4.0 if self.config.n_m is not None else 4.0 * (block_size + 1) / 2

    def work_bytes(self, numel: int, block_size: int) -> int:
        """A chunk's traces, its packed triangle, the gather and the clones of its weights and inverse."""
        blocks = min(numel // block_size, self.config.elimination_chunk_size)
        return blocks * (block_size + 1) * block_size * 4 * 4
