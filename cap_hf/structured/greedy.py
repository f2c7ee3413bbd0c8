"""The second-order removal of whole structures from one layer: the OBS update for a group of columns.

A layer reads its input through the columns of W (d_out x d_in; a convolution's input channel is its
k x k columns). A structure (an attention head, an MLP neuron, a block channel) is a set Q of columns.
With a curvature H of the layer's input (the Hessian of the reconstruction X X^T / n, or a Fisher),
removing Q and updating the other columns optimally costs, summed over the rows,

    error(Q) = sum_rows w_Q^T ([H^-1]_QQ)^-1 w_Q,      dW = -W_Q ([H^-1]_QQ)^-1 [H^-1]_Q:

and H^-1 of the remaining columns is H^-1 - [H^-1]_:Q ([H^-1]_QQ)^-1 [H^-1]_Q: (a Schur complement).
`greedy_removal` removes the cheapest structure, updates W and H^-1 in place of a recomputation, and
repeats: the order and the cumulative error at every level are the layer's database. The weights of a
level are replayed from the same curvature (`stop=`), which gives the same arithmetic and costs no
memory per level. A structure read by several layers (a residual-stream channel) costs the sum of its
readers' errors, each divided by its reader's scale, and every reader is updated with its own curvature.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class Removal:
    """A greedy removal: `order[i]` is the i-th structure removed, `errors[k]` the cumulative (scaled, summed
    over readers) error after k removals (errors[0] = 0), `weights[r]` reader r's weights after `len(order)`
    removals."""

    order: list[int]
    errors: list[float]
    weights: list[torch.Tensor]


def inverse_curvature(curvature: torch.Tensor, relative_damp: float) -> torch.Tensor:
    """(H + lambda I)^-1 in float64 with lambda = relative_damp x the mean diagonal (ZipLM's rule); columns
    that never saw a non-zero input get 1 on the diagonal (nothing to learn from them)."""
    h = curvature.double().clone()
    diagonal = h.diagonal()
    dead = diagonal == 0
    diagonal[dead] = 1.0
    diagonal += relative_damp * float(diagonal.mean())
    return torch.cholesky_inverse(torch.linalg.cholesky(h))


class _Reader:
    """One reader's state during the removal: its weights, its inverse curvature, the columns of each
    structure and of the removed ones."""

    def __init__(self, weight: torch.Tensor, inverse: torch.Tensor, columns: torch.Tensor, scale: float):
        self.w = weight.double().clone()
        self.hinv = inverse.double().clone()
        self.columns = columns
        self.scale = scale
        self.gone = torch.zeros(self.w.shape[1], dtype=torch.bool, device=self.w.device)
        self.eye = torch.eye(columns.shape[1], dtype=self.hinv.dtype, device=self.hinv.device)

    def scores(self, removed: torch.Tensor) -> torch.Tensor:
        """Every structure's error (scaled); keeps what the update of the chosen one needs."""
        q = self.columns
        blocks = self.hinv[q.unsqueeze(2), q.unsqueeze(1)]  # (n, u, u)
        blocks[removed] = self.eye  # removed structures: any invertible block, never chosen
        self.inverse_blocks = torch.cholesky_inverse(torch.linalg.cholesky(blocks))
        columns = self.w[:, q].permute(1, 0, 2)  # (n, d_out, u)
        self.scaled = columns @ self.inverse_blocks  # w_Q ([H^-1]_QQ)^-1 for every row
        return (self.scaled * columns).sum(dim=(1, 2)) / self.scale

    def remove(self, j: int) -> None:
        q = self.columns[j]
        rows = self.hinv[q]  # (u, d_in)
        self.w -= self.scaled[j] @ rows
        self.hinv -= rows.T @ self.inverse_blocks[j] @ rows
        self.gone[q] = True
        self.w[:, self.gone] = 0.0  # exactly: rounding would leave ~1e-17 in columns removed before
        self.hinv[self.gone] = 0.0
        self.hinv[:, self.gone] = 0.0


@torch.no_grad()
def greedy_removal(weights: Sequence[torch.Tensor], inverses: Sequence[torch.Tensor],
                   structures: Sequence[torch.Tensor], stop: int, scales: Sequence[float] | None = None) -> Removal:
    """Remove `stop` structures one at a time, each the cheapest at its turn.

    Per reader r: `weights[r]` (d_out, d_in) and `inverses[r]` (d_in, d_in; H^-1 with its dampening), which are
    not modified; `structures[r]` (n, u_r) the column indices of each of the n structures; `scales[r]` divides
    its errors (1 by default). Columns in no structure (a bias column, say) are never removed but are updated
    with the others.
    """
    readers = [_Reader(w, h, q, 1.0 if scales is None else float(scales[i]))
               for i, (w, h, q) in enumerate(zip(weights, inverses, structures, strict=True))]
    n = structures[0].shape[0]
    if not 0 <= stop <= n:
        raise ValueError(f"stop must be in [0, {n}], got {stop}.")
    removed = torch.zeros(n, dtype=torch.bool, device=readers[0].w.device)
    order, errors = [], [0.0]
    for _ in range(stop):
        scores = sum(reader.scores(removed) for reader in readers)
        scores[removed] = torch.inf
        j = int(scores.argmin())
        for reader in readers:
            reader.remove(j)
        removed[j] = True
        order.append(j)
        errors.append(errors[-1] + float(scores[j]))
    return Removal(order, errors, [reader.w.to(weight.dtype) for reader, weight in zip(readers, weights, strict=True)])
