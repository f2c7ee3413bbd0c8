"""CAP: correlation-aware pruning (Kuznedelev et al., NeurIPS 2023).

Inside every Fisher block, weights are removed greedily one at a time with exact OBS updates and
inverse downdates, so each removal sees the saliencies left by the previous ones. Each weight's score
is the cumulative loss of the block at its removal; one global threshold over all scores gives every
block a prefix of its elimination order, and the block's new weights are the exact joint OBS solution
for that prefix (equal to the state of the greedy loop after that many steps).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from cap_hf.fisher import BlockFisher
from cap_hf.pruners.base import Pruner, select_pruned, weight_blocks, write_blocks

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


def _remove(w: torch.Tensor, inverse: torch.Tensor, rows: torch.Tensor, p: torch.Tensor,
            active: torch.Tensor | None = None) -> None:
    """One OBS step per block: w -= w_p/Q_pp * Q[:, p]; Q -= Q[:, p] Q[p, :] / Q_pp; then decouple p."""
    column = inverse[rows, :, p]  # (n, B)
    pivot = column[rows, p].clamp_min(_TINY).unsqueeze(1)
    scale = w[rows, p].unsqueeze(1) / pivot
    ratio = column / pivot
    if active is not None:
        keep = active.unsqueeze(1)
        scale = torch.where(keep, scale, torch.zeros_like(scale))
        ratio = torch.where(keep, ratio, torch.zeros_like(ratio))
    w.sub_(scale * column)
    inverse.baddbmm_(ratio.unsqueeze(2), column.unsqueeze(1), alpha=-1.0)
    sel = rows if active is None else rows[active]
    psel = p if active is None else p[active]
    w[sel, psel] = 0.0
    inverse[sel, psel, :] = 0.0
    inverse[sel, :, psel] = 0.0
    inverse[sel, psel, psel] = 1.0


def eliminate_prefix(w: torch.Tensor, inverse: torch.Tensor, order: torch.Tensor, counts: torch.Tensor) -> None:
    """Re-run the elimination along a known order, stopping block b after counts[b] removals (in place)."""
    rows = torch.arange(w.shape[0], device=w.device)
    for k in range(int(counts.max()) if counts.numel() else 0):
        active = counts > k
        _remove(w, inverse, rows, order[:, k], active)


def joint_obs_solution(w: torch.Tensor, inverse: torch.Tensor, removed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed form for one block: w - Q[:, P] (Q[P, P])^-1 w_P and the loss 1/2 w_P^T (Q[P, P])^-1 w_P."""
    idx = removed.nonzero().squeeze(-1)
    qpp = inverse[idx][:, idx]
    solve = torch.linalg.solve(qpp, w[idx])
    new = w - inverse[:, idx] @ solve
    new[idx] = 0.0
    return new, 0.5 * (w[idx] @ solve)


class CAPPruner(Pruner):
    fisher_kind = "block"

    def _prepare(self, targets: Mapping[str, nn.Module], fisher: BlockFisher | None) -> None:
        cfg = self.config
        self.block_sizes = dict(fisher.block_sizes)
        self.scores: dict[str, torch.Tensor] = {}
        self.orders: dict[str, torch.Tensor] = {}
        self.inverses: dict[str, torch.Tensor] = {}
        self.traces: dict[str, torch.Tensor] = {}
        self.nm_weights: dict[str, torch.Tensor] = {}
        n_m = cfg.n_m
        chunk = cfg.elimination_chunk_size
        for name, module in targets.items():
            inverse = fisher.inverse(name, cfg.damp)
            size = self.block_sizes[name]
            if n_m is not None and size % n_m[1]:
                raise ValueError(f"Layer {name}: Fisher block size {size} is not a multiple of M={n_m[1]}.")
            w = weight_blocks(module, size).to(inverse.device)
            zero = w == 0
            steps = size * (n_m[1] - n_m[0]) // n_m[1] if n_m is not None else size
            snapshot = cfg.trace_mode == "snapshot" and n_m is None
            traces = torch.empty(steps + 1, *w.shape, dtype=w.dtype) if snapshot else None
            scores = torch.empty_like(w)
            order = torch.empty(w.shape[0], steps, dtype=torch.long, device=w.device)
            for start in range(0, w.shape[0], chunk):
                sl = slice(start, start + chunk)
                wc, qc = w[sl].clone(), inverse[sl].clone()
                chunk_traces = traces[:, sl] if traces is not None else None  # host memory, like the paper
                scores[sl], order[sl] = greedy_eliminate(wc, qc, steps, n_m, chunk_traces)
                if n_m is not None:
                    w[sl] = wc
            scores[zero] = float("-inf")
            self.scores[name], self.orders[name] = scores, order
            if n_m is not None:
                self.nm_weights[name] = w
            elif snapshot:
                self.traces[name] = traces
            else:
                self.inverses[name] = inverse

    @torch.no_grad()
    def apply(self, targets: Mapping[str, nn.Module], sparsity: float) -> None:
        if self.config.n_m is not None:
            for name, module in targets.items():
                write_blocks(module, self.nm_weights[name])
            return
        pruned = select_pruned(self.scores, sparsity, self.config.sparsity_distribution)
        chunk = self.config.elimination_chunk_size
        for name, module in targets.items():
            counts = pruned[name].sum(dim=1)
            if name in self.traces:
                traces = self.traces[name]
                w = traces[counts.cpu(), torch.arange(traces.shape[1])]
            else:
                inverse = self.inverses[name]
                w = weight_blocks(module, self.block_sizes[name]).to(inverse.device)
                for start in range(0, w.shape[0], chunk):
                    sl = slice(start, start + chunk)
                    wc = w[sl].clone()
                    eliminate_prefix(wc, inverse[sl].clone(), self.orders[name][sl], counts[sl])
                    w[sl] = wc
            write_blocks(module, w)
