"""The block-diagonal empirical Fisher built from gradients, and its dampening.

F = damp * I + (1/m) sum_i g_i g_i^T, kept only on B x B diagonal blocks of each flattened weight:
either as a *sum* of outer products plus a count (inverted in batch by Cholesky), or as its inverse,
updated 16 gradients at a time with the Woodbury identity. Both are built with batched matrix products
over chunks of gradients instead of one update per gradient. The gradients come from
cap_hf.engine.gradients.iter_gradients; cap_hf.engine.collect.collect_fisher feeds them in (and, under
several processes, sends each layer's rows to its owner).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import torch

from cap_hf.config import DAMP_ESTIMATE_ROWS

logger = logging.getLogger(__name__)


def divisor_block_size(numel: int, block_size: int) -> int:
    """B itself when it divides the tensor, else the smallest divisor in [B, 2B], else the largest below B."""
    if numel % block_size == 0:
        return block_size
    for size in range(block_size + 1, min(numel, 2 * block_size) + 1):
        if numel % size == 0:
            return size
    return next(size for size in range(min(block_size, numel), 0, -1) if numel % size == 0)


def choose_block_sizes(numels: Mapping[str, int], block_size: int) -> dict[str, int]:
    """divisor_block_size for every tensor, with one warning for all those whose block is not B: the layers,
    grouped by their size and the block they got."""
    chosen = {name: divisor_block_size(numel, block_size) for name, numel in numels.items()}
    adjusted: dict[tuple[int, int], list[str]] = {}
    for name, size in chosen.items():
        if size != block_size:
            adjusted.setdefault((numels[name], size), []).append(name)
    if adjusted:
        parts = [f"{len(names)} layer(s) of {numel} weights -> {size} ({_names(names)})"
                 for (numel, size), names in adjusted.items()]
        message = (f"Fisher block size {block_size} does not divide {'; '.join(parts)}; those use the block size "
                   "shown (the smallest divisor in [B, 2B], else the largest below B).")
        if message not in _WARNED:  # said once per process, not at every pruning step
            _WARNED.add(message)
            logger.warning(message)
    return chosen


_WARNED: set[str] = set()


def _names(names: list[str], shown: int = 3) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


INVERSION_CHUNK = 256  # blocks inverted at once by pop_inverse (4 temporary copies of B x B each)


class BlockFisher:
    """The block-diagonal empirical Fisher of several tensors, F = damp*I + (1/m) sum_i g_i g_i^T.

    kind="block": one (d/B, B, B) stack per tensor (CAP, OBS).
    kind="shared": one (B, B) matrix per tensor, summed over its blocks (FastCAP).

    accumulate="sum" keeps the running sums of outer products and a count (one baddbmm per chunk of
    gradients), and inverse() inverts by Cholesky. Forming F
    in fp32 costs accuracy when damp is tiny next to the gradients: at condition numbers ~1e5 (damp 1e-7,
    ViT gradients) the inverse is off by ~1e-3 relative, enough to change a few greedy choices.
    accumulate="inverse" (kind "block") keeps F^-1 itself, starting at I/damp and updated
    per WOODBURY_RANK gradients with the Woodbury identity, Q <- Q - Q G^T (I + G Q G^T)^-1 G Q with
    G = gradients/sqrt(m): the paper's Sherman-Morrison estimator, 16 updates at a time, with its
    accuracy (~3e-5 there) for about twice the arithmetic of "sum" and no inversion at the end. It needs
    `damp` and the final number of gradients `num_grads` up front.
    `damp`: one value for all tensors or one per tensor (collect_fisher's relative dampening); kept in
    `damps` and used by inverse() / pop_inverse() unless they are given another (sums only).
    """

    def __init__(self, numels: Mapping[str, int], block_size: int | Mapping[str, int], kind: str = "block",
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, *,
                 accumulate: str = "sum", damp: float | Mapping[str, float] | None = None,
                 num_grads: int | None = None):
        if kind not in ("block", "shared"):
            raise ValueError(f"kind must be 'block' or 'shared', got {kind!r}")
        if accumulate not in ("sum", "inverse"):
            raise ValueError(f"accumulate must be 'sum' or 'inverse', got {accumulate!r}")
        self.damps = None if damp is None else {
            name: float(damp[name] if isinstance(damp, Mapping) else damp) for name in numels}
        if accumulate == "inverse" and (kind != "block" or self.damps is None or not num_grads
                                        or not all(v > 0 for v in self.damps.values())):
            raise ValueError("accumulate='inverse' needs kind='block', a positive damp and num_grads.")
        self.kind = kind
        self.accumulate = accumulate
        self.num_grads = num_grads
        if isinstance(block_size, Mapping):  # sizes already chosen (and reported) per tensor
            self.block_sizes = {name: int(block_size[name]) for name in numels}
            bad = [name for name, n in numels.items() if n % self.block_sizes[name]]
            if bad:
                raise ValueError(f"Block sizes do not divide the tensors {bad[:3]}.")
        else:
            self.block_sizes = choose_block_sizes(numels, block_size)
        self.sums: dict[str, torch.Tensor] = {}  # running sums, or running inverses (accumulate="inverse")
        for name, n in numels.items():
            b = self.block_sizes[name]
            if accumulate == "inverse":
                eye = torch.eye(b, device=device, dtype=dtype) / self.damps[name]
                self.sums[name] = eye.expand(n // b, b, b).clone()
            else:
                shape = (n // b, b, b) if kind == "block" else (b, b)
                self.sums[name] = torch.zeros(shape, device=device, dtype=dtype)
        self.count = 0

    @torch.no_grad()
    def add(self, grads: Mapping[str, torch.Tensor]) -> None:
        """Add a chunk of gradients: each value is (c, numel), the same c for all tensors."""
        chunk = None
        for name, g in grads.items():
            total = self.sums[name]
            b = self.block_sizes[name]
            g = g.to(device=total.device, dtype=total.dtype)
            chunk = g.shape[0]
            if self.accumulate == "inverse":
                blocks = g.reshape(chunk, -1, b).transpose(0, 1)  # (nb, c, B)
                for start in range(0, blocks.shape[0], WOODBURY_BLOCKS):
                    sl = slice(start, start + WOODBURY_BLOCKS)
                    for first in range(0, chunk, WOODBURY_RANK):
                        woodbury_update(total[sl], blocks[sl, first:first + WOODBURY_RANK], self.num_grads)
            elif self.kind == "block":
                blocks = g.reshape(chunk, -1, b).transpose(0, 1)  # (nb, c, B)
                total.baddbmm_(blocks.transpose(1, 2), blocks)
            else:
                rows = g.reshape(-1, b)
                total.addmm_(rows.T, rows)
        if chunk is not None:
            self.count += chunk

    def mean(self, name: str) -> torch.Tensor:
        if self.accumulate == "inverse":
            raise RuntimeError("This Fisher keeps its inverse (accumulate='inverse'); use inverse().")
        if self.count == 0:
            raise RuntimeError("The Fisher has no gradients yet; call add() first.")
        return self.sums[name] / self.count

    def damp_of(self, name: str, damp: float | None = None) -> float:
        """The dampening of one tensor: `damp` when given, else the one this Fisher was built with."""
        if damp is None:
            if self.damps is None:
                raise ValueError("This Fisher was built without a damp; pass one.")
            return self.damps[name]
        if self.accumulate == "inverse" and damp != self.damps[name]:
            raise ValueError(f"The inverse Fisher of {name} was built with damp={self.damps[name]}, not {damp}.")
        return float(damp)

    def _check_inverse(self) -> None:
        if self.count != self.num_grads:
            raise RuntimeError(f"The inverse Fisher was built for num_grads={self.num_grads} (its 1/m scaling) but "
                               f"received {self.count} gradients.")

    def inverse(self, name: str, damp: float | None = None) -> torch.Tensor:
        """(damp*I + sum/m)^-1 for every block of one tensor (kind='block'); damp: default, the Fisher's own.
        With accumulate='inverse' this is the stored tensor itself (do not modify it)."""
        damp = self.damp_of(name, damp)
        if self.accumulate == "inverse":
            self._check_inverse()
            return self.sums[name]
        return invert_spd(self.mean(name), damp, name)

    @torch.no_grad()
    def pop_inverse(self, name: str, damp: float | None = None, chunk_blocks: int = INVERSION_CHUNK) -> torch.Tensor:
        """Like inverse(), but turns the stored sum into the inverse in place, chunk by chunk, and drops it
        from this Fisher: no second d*B copy is ever made (what bounds the memory of a step)."""
        damp = self.damp_of(name, damp)
        if self.accumulate == "inverse":
            self._check_inverse()
            return self.sums.pop(name)
        if self.count == 0:
            raise RuntimeError("The Fisher has no gradients yet; call add() first.")
        total = self.sums.pop(name)
        for start in range(0, total.shape[0], chunk_blocks):
            part = total[start:start + chunk_blocks]
            part.copy_(invert_spd(part / self.count, damp, name))
        return total


WOODBURY_BLOCKS = 1024  # blocks updated at once (bounds the (blocks, B, c) temporaries)
# Gradients per Woodbury update. The rounding error of an update grows with its rank (the gradients of a
# chunk are nearly collinear); measured on DeiT-Tiny fc2 (N=256, B=192, damp 1e-7), max relative error
# of F^-1 vs fp64: rank 8: 1.4e-5, 16: 3.2e-5, 32: 4.3e-5, 64: 1.0e-4 (rank-1 reference: 1.7e-5).
WOODBURY_RANK = 16


@torch.no_grad()
def woodbury_update(inverse: torch.Tensor, grads: torch.Tensor, num_grads: int) -> None:
    """inverse <- (inverse^-1 + G^T G / m)^-1 in place, for every block: (n, B, B) and grads (n, c, B).

    Q - W W^T with V = Q G^T, K = I + G V = L L^T and W = V L^-T: a symmetric downdate, like the
    rank-1 formula. The small c x c factor is inverted in fp64; the two large products stay fp32."""
    g = grads * num_grads ** -0.5
    v = torch.bmm(inverse, g.transpose(1, 2))  # (n, B, c)
    k = torch.bmm(g, v).double()  # (n, c, c)
    k = 0.5 * (k + k.transpose(1, 2))
    k.diagonal(dim1=1, dim2=2).add_(1.0)
    chol, info = torch.linalg.cholesky_ex(k)
    if bool((info > 0).any()):
        raise FloatingPointError("The inverse Fisher lost positive definiteness during the chunked update; use a "
                                 "larger --relative_damp (or --damp), or --fisher_accumulation sum.")
    eye = torch.eye(k.shape[-1], dtype=k.dtype, device=k.device).expand_as(k)
    chol_inv = torch.linalg.solve_triangular(chol, eye, upper=False)
    w = torch.bmm(v, chol_inv.transpose(1, 2).to(inverse.dtype))
    inverse.baddbmm_(w, w.transpose(1, 2), alpha=-1.0)


def invert_spd(matrices: torch.Tensor, damp: float, name: str = "", max_tries: int = 6) -> torch.Tensor:
    """Batched inverse of (matrices + damp*I) by Cholesky.

    A block that is not positive definite gets 10x the dampening (up to `max_tries` times) with a
    warning naming the layer, and the inversion goes on.
    """
    matrices = matrices.clone()
    eye = torch.eye(matrices.shape[-1], dtype=matrices.dtype, device=matrices.device)
    matrices.add_(eye, alpha=damp)
    chol, info = torch.linalg.cholesky_ex(matrices)
    extra = damp
    for _ in range(max_tries):
        bad = info > 0
        if not bool(bad.any()):
            break
        extra *= 10
        logger.warning("Fisher of %s: %d block(s) not positive definite; raising their dampening to %.1e.",
                       name or "a layer", int(bad.sum()), extra)
        fixed = matrices[bad] + eye * (extra - damp)
        chol_bad, info_bad = torch.linalg.cholesky_ex(fixed)
        chol[bad] = chol_bad
        info = torch.zeros_like(info)
        info[bad] = info_bad
    else:
        if bool((info > 0).any()):
            raise FloatingPointError(f"Fisher of {name} is not positive definite even with damp {extra:.1e}; "
                                     "check the gradients for overflow or use a larger --relative_damp (or --damp).")
    return torch.cholesky_inverse(chol)


def gradient_rows(grad_chunk_size: int, num_grads: int, accumulate: str = "sum", kinds: Iterable[str] = ("block",)) -> int:
    """Gradients buffered before each Fisher update: grad_chunk_size, but no more than one Woodbury update
    takes when the block inverse is updated directly (a larger buffer would only cost memory)."""
    rows = max(1, min(grad_chunk_size, num_grads))
    return min(rows, WOODBURY_RANK) if accumulate == "inverse" and "block" in kinds else rows


def relative_dampening(grads: Mapping[str, torch.Tensor], fraction: float,
                       masks: Mapping[str, torch.Tensor] | None = None) -> dict[str, float]:
    """damp = fraction * the mean of each layer's Fisher diagonal over its weights still kept, estimated
    from the first DAMP_ESTIMATE_ROWS rows of `grads` ({name: (c, numel)}, the step's first chunk of
    gradients, already masked). The mean over kept weights keeps the dampening of a layer the same at any sparsity.
    Under several processes the owner of a layer estimates it from the same rows one process would use."""
    damps = {}
    for name, rows in grads.items():
        rows = rows[:DAMP_ESTIMATE_ROWS]
        mask = masks.get(name) if masks else None
        kept = rows.shape[1] if mask is None else int(mask.sum())
        if kept == 0:  # every weight already pruned: nothing is scored, any dampening will do
            damps[name] = 1.0
            continue
        mean = float(rows.double().square().sum()) / (rows.shape[0] * kept)
        if not mean > 0:
            raise ValueError(
                f"Layer {name} got all-zero gradients in the first {rows.shape[0]} calibration batches, so a relative "
                "dampening (a fraction of its Fisher diagonal) has no scale. If the loss does not depend on this "
                "layer, exclude it with --ignore; otherwise give an absolute --damp.")
        damps[name] = fraction * mean
    return damps
