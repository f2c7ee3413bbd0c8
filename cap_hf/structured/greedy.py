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
memory per level.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Removal:
    """One layer's greedy removal: `order[i]` is the i-th structure removed, `errors[k]` the cumulative
    error after k removals (errors[0] = 0), `weight` the layer's weights after `len(order)` removals."""

    order: list[int]
    errors: list[float]
    weight: torch.Tensor


def inverse_curvature(curvature: torch.Tensor, relative_damp: float) -> torch.Tensor:
    """(H + lambda I)^-1 in float64 with lambda = relative_damp x the mean diagonal (ZipLM's rule); columns
    that never saw a non-zero input get 1 on the diagonal (nothing to learn from them)."""
    h = curvature.double().clone()
    diagonal = h.diagonal()
    dead = diagonal == 0
    diagonal[dead] = 1.0
    diagonal += relative_damp * float(diagonal.mean())
    return torch.cholesky_inverse(torch.linalg.cholesky(h))


@torch.no_grad()
def greedy_removal(weight: torch.Tensor, inverse: torch.Tensor, structures: torch.Tensor, stop: int) -> Removal:
    """Remove `stop` structures one at a time, each the cheapest at its turn.

    `weight` (d_out, d_in) and `inverse` (d_in, d_in; H^-1 with its dampening) are not modified;
    `structures` (n, u) holds the column indices of each of n structures of u columns. Columns in no
    structure (a bias column, say) are never removed but are updated with the others.
    """
    n, unit = structures.shape
    if not 0 <= stop <= n:
        raise ValueError(f"stop must be in [0, {n}], got {stop}.")
    w = weight.double().clone()
    hinv = inverse.double().clone()
    removed = torch.zeros(n, dtype=torch.bool, device=w.device)
    gone = torch.zeros(w.shape[1], dtype=torch.bool, device=w.device)  # the columns of removed structures
    order, errors = [], [0.0]
    eye = torch.eye(unit, dtype=hinv.dtype, device=hinv.device)
    for _ in range(stop):
        blocks = hinv[structures.unsqueeze(2), structures.unsqueeze(1)]  # (n, u, u)
        blocks[removed] = eye  # removed structures: any invertible block, never chosen
        inverse_blocks = torch.cholesky_inverse(torch.linalg.cholesky(blocks))
        columns = w[:, structures].permute(1, 0, 2)  # (n, d_out, u)
        scaled = columns @ inverse_blocks  # (n, d_out, u): w_Q ([H^-1]_QQ)^-1 for every row
        scores = (scaled * columns).sum(dim=(1, 2))
        scores[removed] = torch.inf
        j = int(scores.argmin())
        q = structures[j]
        rows = hinv[q]  # (u, d_in)
        w -= scaled[j] @ rows
        hinv -= rows.T @ inverse_blocks[j] @ rows
        gone[q] = True
        w[:, gone] = 0.0  # exactly: rounding would leave ~1e-17 in columns removed before
        hinv[gone] = 0.0
        hinv[:, gone] = 0.0
        removed[j] = True
        order.append(j)
        errors.append(errors[-1] + float(scores[j]))
    return Removal(order, errors, w.to(weight.dtype))
