"""A deliberately plain implementation of the paper's CAP step and the closed forms, for the tests and
scripts/bench/bench_pruning_step.py only (not part of the package).

It follows the released code's shape (docs: cap-method.md sections 1.2-1.4): the inverse Fisher of every
block starts at I/damp and takes one Sherman-Morrison update per gradient with the 1/m scaling; the greedy
elimination runs over all blocks of a tensor at once and keeps every snapshot ((B+1) * d floats); one
global threshold over the cumulative losses picks each block's snapshot. Nothing here is used by the
library; it is what the library is checked against.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


class RankOneFisherInverse:
    """F^-1 = (damp*I + (1/m) sum g g^T)^-1 per block, built one gradient at a time (Sherman-Morrison)."""

    def __init__(self, numel: int, block_size: int, num_grads: int, damp: float,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if numel % block_size:
            raise ValueError(f"block size {block_size} does not divide {numel}")
        self.block_size = block_size
        self.num_grads = num_grads
        eye = torch.eye(block_size, dtype=dtype, device=device) / damp
        self.inverse = eye.repeat(numel // block_size, 1, 1)
        self.count = 0

    @torch.no_grad()
    def update(self, grad: torch.Tensor) -> None:
        """F^-1 <- F^-1 - (F^-1 g)(F^-1 g)^T / (m + g^T F^-1 g), in every block."""
        g = grad.reshape(-1, self.block_size, 1).to(self.inverse.dtype)
        v = torch.bmm(self.inverse, g)  # (n, B, 1)
        denom = self.num_grads + torch.bmm(g.transpose(1, 2), v)  # (n, 1, 1)
        self.inverse.baddbmm_(v, v.transpose(1, 2) / denom, alpha=-1.0)
        self.count += 1


@torch.no_grad()
def reference_eliminate(w: torch.Tensor, inverse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy OBS elimination of all B weights in every block; returns (losses (n, B), traces (B+1, n, B)).

    losses[b, j] is the block's cumulative loss when weight j went; traces[k] the weights after k removals.
    `inverse` is modified in place.
    """
    w = w.clone()
    n, size = w.shape
    rows = torch.arange(n, device=w.device)
    losses = torch.zeros(n, size, dtype=w.dtype, device=w.device)
    traces = torch.empty(size + 1, n, size, dtype=w.dtype, device=w.device)
    traces[0] = w
    alive = torch.ones(n, size, dtype=torch.bool, device=w.device)
    total = torch.zeros(n, dtype=w.dtype, device=w.device)
    for k in range(size):
        diag = torch.diagonal(inverse, dim1=1, dim2=2)
        saliency = torch.where(alive, w * w / diag, torch.full_like(w, float("inf")))
        p = torch.argmin(saliency, dim=1)
        total = total + saliency[rows, p] / 2
        losses[rows, p] = total
        column = inverse[rows, :, p].clone()  # (n, B)
        pivot = column[rows, p]
        w = w - (w[rows, p] / pivot).unsqueeze(1) * column
        inverse -= column.unsqueeze(2) * column.unsqueeze(1) / pivot.view(-1, 1, 1)
        alive[rows, p] = False
        w[~alive] = 0.0
        inverse[rows, p, :] = 0.0
        inverse[rows, :, p] = 0.0
        inverse[rows, p, p] = 1.0
        traces[k + 1] = w
    return losses, traces


def reference_select(scores: Mapping[str, torch.Tensor], zeros: Mapping[str, torch.Tensor],
                     sparsity: float) -> dict[str, torch.Tensor]:
    """One global threshold over all scores (already-zero weights first): the pruned weights per tensor.
    For CAP the scores are cumulative losses, so each block's pruned set is a prefix of its order and
    `mask.sum(dim=1)` is the snapshot to take."""
    flat = torch.cat([torch.where(zeros[n], torch.full_like(v, float("-inf")), v).reshape(-1).cpu()
                      for n, v in scores.items()])
    k = round(sparsity * flat.numel())
    order = torch.argsort(flat, stable=True)
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[order[:k]] = True
    masks, offset = {}, 0
    for name, v in scores.items():
        masks[name] = chosen[offset:offset + v.numel()].reshape(v.shape).to(v.device)
        offset += v.numel()
    return masks


@torch.no_grad()
def reference_obs(w: torch.Tensor, inverse: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """WoodFisher: w - sum over removed q of (w_q / [F^-1]_qq) F^-1 e_q, then the removed weights set to 0."""
    diag = torch.diagonal(inverse, dim1=1, dim2=2)
    coef = torch.where(removed, w / diag, torch.zeros_like(w))
    new = w - torch.bmm(inverse, coef.unsqueeze(2)).squeeze(2)
    new[removed] = 0.0
    return new


def joint_obs_solution(w: torch.Tensor, inverse: torch.Tensor, removed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed form for one block: w - Q[:, P] (Q[P, P])^-1 w_P and the loss 1/2 w_P^T (Q[P, P])^-1 w_P."""
    idx = removed.nonzero().squeeze(-1)
    qpp = inverse[idx][:, idx]
    solve = torch.linalg.solve(qpp, w[idx])
    new = w - inverse[:, idx] @ solve
    new[idx] = 0.0
    return new, 0.5 * (w[idx] @ solve)
