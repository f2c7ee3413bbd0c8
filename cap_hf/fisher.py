"""Block-diagonal empirical Fisher from mini-batch gradients.

F = damp * I + (1/m) sum_i g_i g_i^T, kept only on B x B diagonal blocks of each flattened weight.
The statistic is kept as a *sum* of outer products plus a count, so ranks can all-reduce it, and it is
built with batched matrix products over chunks of gradients (one `baddbmm` per chunk) instead of one
Sherman-Morrison update per gradient. Blocks are inverted in batch with Cholesky.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)


def choose_block_size(numel: int, block_size: int, name: str = "") -> int:
    """B itself when it divides the tensor, else the smallest divisor in [B, 2B], else the largest below B."""
    if numel % block_size == 0:
        return block_size
    for size in range(block_size + 1, min(numel, 2 * block_size) + 1):
        if numel % size == 0:
            chosen = size
            break
    else:
        chosen = next(size for size in range(min(block_size, numel), 0, -1) if numel % size == 0)
    logger.warning("Fisher block size %d does not divide %s (%d weights); using %d instead.",
                   block_size, name or "a layer", numel, chosen)
    return chosen


class BlockFisher:
    """Running sums of gradient outer products for several tensors.

    kind="block": one (d/B, B, B) stack per tensor (CAP, OBS).
    kind="shared": one (B, B) matrix per tensor, summed over its blocks (FastCAP).
    """

    def __init__(self, numels: Mapping[str, int], block_size: int, kind: str = "block",
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        if kind not in ("block", "shared"):
            raise ValueError(f"kind must be 'block' or 'shared', got {kind!r}")
        self.kind = kind
        self.block_sizes = {name: choose_block_size(n, block_size, name) for name, n in numels.items()}
        self.sums: dict[str, torch.Tensor] = {}
        for name, n in numels.items():
            b = self.block_sizes[name]
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
            if self.kind == "block":
                blocks = g.reshape(chunk, -1, b).transpose(0, 1)  # (nb, c, B)
                total.baddbmm_(blocks.transpose(1, 2), blocks)
            else:
                rows = g.reshape(-1, b)
                total.addmm_(rows.T, rows)
        if chunk is not None:
            self.count += chunk

    def all_reduce(self) -> None:
        """Sum the statistics over all processes of an initialised torch.distributed group."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        for total in self.sums.values():
            torch.distributed.all_reduce(total)
        count = torch.tensor([self.count], dtype=torch.float64, device=next(iter(self.sums.values())).device)
        torch.distributed.all_reduce(count)
        self.count = int(count.item())

    def mean(self, name: str) -> torch.Tensor:
        if self.count == 0:
            raise RuntimeError("The Fisher has no gradients yet; call add() first.")
        return self.sums[name] / self.count

    def inverse(self, name: str, damp: float) -> torch.Tensor:
        """(damp*I + sum/m)^-1 for every block of one tensor (kind='block')."""
        return invert_spd(self.mean(name), damp, name)


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
                                     "check the gradients for overflow or use a larger --damp.")
    return torch.cholesky_inverse(chol)


def default_loss(model: nn.Module, batch: Mapping[str, torch.Tensor], label_free: bool,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Cross-entropy of the model's logits; with label_free, labels sampled from its own softmax."""
    outputs = model(pixel_values=batch["pixel_values"])
    logits = getattr(outputs, "logits", None)
    if logits is None:
        raise ValueError(f"{type(model).__name__} returns no logits, so the Fisher has no loss. Give the backbone "
                         "a classification head (e.g. a linear probe), or pass loss_fn(model, batch).")
    if label_free:
        probs = torch.softmax(logits.detach().float(), dim=-1)
        labels = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    else:
        if "labels" not in batch:
            raise ValueError("The calibration batch has no 'labels'; pass a dataset with a label column or "
                             "use label_free_fisher=True (labels sampled from the model's predictions).")
        labels = batch["labels"]
    return F.cross_entropy(logits.float(), labels.to(logits.device))


@torch.no_grad()
def _stack_grads(names: list[str], grads: tuple[torch.Tensor, ...], buffers: dict[str, torch.Tensor], row: int,
                 masks: Mapping[str, torch.Tensor] | None, step: int) -> None:
    for name, grad in zip(names, grads, strict=True):
        flat = grad.detach().reshape(-1).float()
        if not bool(torch.isfinite(flat).all()):
            raise FloatingPointError(
                f"Non-finite gradient in layer {name} at calibration batch {step}. Check the model for "
                "inf/NaN weights, and compute the Fisher in fp32 (no fp16 autocast)."
            )
        if masks is not None and name in masks:
            flat = flat * masks[name].reshape(-1).to(flat.device, flat.dtype)
        buffers[name][row].copy_(flat)


def collect_fisher(
    model: nn.Module,
    targets: Mapping[str, nn.Module],
    batches: Iterable[Mapping[str, torch.Tensor]],
    num_grads: int,
    block_size: int,
    kinds: Iterable[str] = ("block",),
    masks: Mapping[str, torch.Tensor] | None = None,
    label_free: bool = False,
    loss_fn: Callable[[nn.Module, Mapping[str, torch.Tensor]], torch.Tensor] | None = None,
    grad_chunk_size: int = 32,
    device: torch.device | str | None = None,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, BlockFisher]:
    """Run `num_grads` backward passes in eval mode and fp32 and accumulate the requested Fisher kinds.

    Gradients are multiplied by `masks` (True = kept) so pruned weights contribute nothing. They come
    from torch.autograd.grad, so nothing is accumulated into .grad and no DDP reducer hook fires (each
    process computes its own share; the sums are all-reduced at the end). The model's train/eval mode
    and requires_grad flags are restored afterwards.
    """
    param = next(model.parameters())
    device = torch.device(device) if device is not None else param.device
    numels = {name: module.weight.numel() for name, module in targets.items()}
    fishers = {kind: BlockFisher(numels, block_size, kind, device=device) for kind in kinds}
    chunk = max(1, min(grad_chunk_size, num_grads))
    buffers = {name: torch.empty(chunk, n, device=device) for name, n in numels.items()}
    generator = torch.Generator(device=param.device).manual_seed(seed) if label_free else None

    names = list(targets)
    weights = [targets[name].weight for name in names]
    was_training = model.training
    saved_flags = {w: w.requires_grad for w in weights}
    for w in weights:
        w.requires_grad_(True)
    model.eval()
    collected, row = 0, 0
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=num_grads, desc="Fisher gradients")
    try:
        for batch in batches:
            if collected >= num_grads:
                break
            batch = {k: v.to(param.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            with torch.enable_grad(), torch.autocast(device_type=param.device.type, enabled=False):
                loss = loss_fn(model, batch) if loss_fn is not None else default_loss(model, batch, label_free, generator)
                grads = torch.autograd.grad(loss, weights, allow_unused=True)
            missing = [name for name, g in zip(names, grads, strict=True) if g is None]
            if missing:
                raise RuntimeError(f"Layers {missing[:3]} received no gradient; are they used in the forward pass?")
            _stack_grads(names, grads, buffers, row, masks, collected)
            row += 1
            collected += 1
            if row == chunk or collected == num_grads:
                for fisher in fishers.values():
                    fisher.add({name: buf[:row] for name, buf in buffers.items()})
                row = 0
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        for w, flag in saved_flags.items():
            w.requires_grad_(flag)
        model.train(was_training)
    if collected < num_grads:
        raise ValueError(f"The calibration data gave only {collected} batches, but num_grads={num_grads} were "
                         "requested. Lower --num_grads or --grad_batch_size, or use a larger calibration split.")
    for fisher in fishers.values():
        fisher.all_reduce()
    return fishers
