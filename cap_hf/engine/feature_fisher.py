"""The Fisher of a backbone without labels: the Gauss-Newton matrix of its output features, estimated from
random projections (FeatureFisherLoss), and which objective a recipe gives a model (fisher_objective, fisher_loss)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from cap_hf.config import POOLINGS
from cap_hf.engine.ranks import Ranks
from cap_hf.evaluation.features import extract_features, is_backbone


class FeatureFisherLoss:
    """A label-free Fisher objective: loss_fn(model, batch) = v . f(x) / sqrt(b) with v ~ N(0, I) drawn
    afresh for every image (and token), so the batch gradient g = sum_i J_i^T v_i / sqrt(b) has
    E[g g^T] = mean_i J_i^T J_i, the Gauss-Newton matrix (= Fisher of a Gaussian output model) of the
    features: no labels, and unlike a distillation loss at the dense point, not zero. With pooling='tokens'
    every token counts 1/tokens, so an image weighs the same at any resolution. One backward pass per
    batch, like a labelled gradient: CAP, OBS and FastCAP take it unchanged (Pruner(loss_fn=...)).
    Each process draws its own v (seed + rank)."""

    def __init__(self, pooling: str = "cls", seed: int = 0):
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}.")
        self.pooling, self.seed = pooling, int(seed)
        self.generator: torch.Generator | None = None

    def __call__(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        features = extract_features(model, batch["pixel_values"], self.pooling).float()
        if self.generator is None or self.generator.device != features.device:
            rank = Ranks.current().rank
            self.generator = torch.Generator(device=features.device).manual_seed(self.seed + rank)
        v = torch.randn(features.shape, generator=self.generator, device=features.device)
        scale = features.shape[0] * (features.shape[1] if features.dim() == 3 else 1)
        return (features * v).sum() / math.sqrt(scale)


def fisher_objective(config, model: nn.Module) -> str:
    """The recipe's (a PruningConfig) objective for this model: 'auto' is 'features' for a backbone without a
    head (unless label_free_fisher asks for sampled labels), else 'cross_entropy'."""
    if config.fisher_objective != "auto":
        return config.fisher_objective
    return "features" if is_backbone(model) and not config.label_free_fisher else "cross_entropy"


def fisher_loss(config, model: nn.Module) -> FeatureFisherLoss | None:
    """The Fisher's loss_fn: FeatureFisherLoss for the 'features' objective, None for the default
    cross-entropy of the logits (cap_hf.engine.gradients.default_loss)."""
    if fisher_objective(config, model) != "features":
        return None
    return FeatureFisherLoss(config.feature_pooling, seed=int(config.calibration_seed or 0))
