"""Batch-norm statistics re-estimated on the pruned model (label-free, no weight is trained).

Removing channels (and, with obs / cap, compensating the layers that read them) changes what every later
batch norm sees; its running mean and variance still describe the dense model. Re-estimating them from a
few hundred unlabelled images, with the model's weights fixed, removes that shift (EagleEye's "adaptive
batch norm", Li et al., ECCV 2020). Only the batch norms run in training mode (a cumulative average over
the batches, each weighing the same, not a momentum); dropout and everything else stay in eval mode. Models without batch norms
(ViTs) are left as they are.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from cap_hf.engine.calibration import first_images

BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@torch.no_grad()
def recalibrate_batch_norms(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], images: int) -> int:
    """Re-estimate every batch norm's running statistics of `model` (in place) from the first `images` images
    of `batches`; returns the number of batch norms re-estimated (0: nothing to do, the data is not read). The
    model is left in eval mode."""
    if images < 1:
        raise ValueError(f"images must be positive, got {images}.")
    norms = [m for m in model.modules() if isinstance(m, BATCH_NORMS) and m.track_running_stats]
    if not norms:
        return 0
    model.eval()
    saved = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the batches
        norm.train()
    device = next(model.parameters()).device
    seen = 0
    try:
        for batch in first_images(batches, images):
            model(pixel_values=batch["pixel_values"].to(device))
            seen += batch["pixel_values"].shape[0]
    finally:
        for norm, momentum in zip(norms, saved, strict=True):
            norm.momentum = momentum
        model.eval()
    if seen == 0:
        raise ValueError("The batches held no images to re-estimate the batch norms from.")
    return len(norms)
