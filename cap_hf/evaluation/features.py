"""A backbone's output features, and the DINO evaluations built on them (weighted k-NN, linear probe, feature
cosine, linear CKA; FeatureEvaluator). The Fisher of the features is the engine's (engine/feature_fisher.py), the
scripts' flags for all this are cli/backbone.py's.

Which features: the last hidden state (after the final norm) of the model's base model, so a classifier
(its head dropped) and a backbone (ViTModel, Dinov2Model, Dinov2WithRegistersModel, ResNetModel, ...) give
the same thing. `pooling`:
- "cls": the CLS token, the feature of DINO's k-NN and linear probes (the default);
- "mean": the average of the patch tokens (register and distillation tokens left out, as the DINOv2
  authors do);
- "tokens": the CLS token and every patch token, (batch, 1 + patches, dim): what dense tasks use.
Convolutional backbones have one feature per image whatever the pooling: the base model's pooled output.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from cap_hf.config import POOLINGS

logger = logging.getLogger(__name__)


def prefix_tokens(config) -> int:
    """Tokens before the patches: CLS, DeiT's distillation token, DINOv2's registers."""
    extra = 1 if getattr(config, "model_type", None) == "deit" else 0
    return 1 + extra + int(getattr(config, "num_register_tokens", 0) or 0)


def is_backbone(model: nn.Module) -> bool:
    """A transformers base model (no task head): ViTModel, Dinov2Model, ResNetModel, ..."""
    base = getattr(model, "base_model", None)
    return base is model


def extract_features(model: nn.Module, pixel_values: torch.Tensor, pooling: str = "cls") -> torch.Tensor:
    """The features of a batch: (batch, dim), or (batch, 1 + patches, dim) for pooling='tokens'."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}.")
    base = getattr(model, "base_model", model)
    outputs = base(pixel_values=pixel_values)
    hidden = getattr(outputs, "last_hidden_state", None)
    if hidden is None:
        raise ValueError(f"{type(base).__name__} returns no last_hidden_state, so it has no features to prune for. "
                         "Pass a transformers vision backbone or classifier (ViT, DeiT, DINOv2, ResNet, ConvNeXt).")
    if hidden.dim() == 4:  # a convolutional feature map (batch, channels, h, w): the pooled feature
        pooled = getattr(outputs, "pooler_output", None)
        return (pooled if pooled is not None else hidden.mean(dim=(2, 3))).flatten(1)
    if pooling == "cls":
        return hidden[:, 0]
    patches = hidden[:, prefix_tokens(getattr(base, "module", base).config):]  # (DDP keeps the model in .module)
    if pooling == "mean":
        return patches.mean(dim=1)
    return torch.cat([hidden[:, :1], patches], dim=1)


@torch.no_grad()
def collect_features(model: nn.Module, loader, pooling: str = "cls", device: torch.device | str | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(features (n, dim) in fp32 on the CPU, labels (n,) or None) over a DataLoader of {'pixel_values',
    ['labels']} batches, in eval mode."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    features, labels = [], []
    try:
        for batch in loader:
            features.append(extract_features(model, batch["pixel_values"].to(device), pooling).float().cpu())
            if "labels" in batch:
                labels.append(batch["labels"].cpu())
    finally:
        model.train(was_training)
    if not features:
        raise ValueError("The data for the features is empty.")
    return torch.cat(features), (torch.cat(labels) if len(labels) == len(features) else None)


def knn_accuracy(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, labels: torch.Tensor,
                 k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> float:
    """Weighted k-NN top-1 (DINO's protocol): features L2-normalised, each query's k nearest bank features
    by cosine similarity vote for their labels with weight exp(similarity / temperature)."""
    if bank.shape[0] == 0 or queries.shape[0] == 0:
        raise ValueError("k-NN needs a non-empty bank and query set.")
    k = min(k, bank.shape[0])
    bank = F.normalize(bank.flatten(1).double(), dim=1)
    num_classes = int(max(bank_labels.max(), labels.max())) + 1
    correct = 0
    for start in range(0, queries.shape[0], chunk):
        query = F.normalize(queries[start:start + chunk].flatten(1).double(), dim=1)
        similarity, index = (query @ bank.T).topk(k, dim=1)
        votes = torch.zeros(query.shape[0], num_classes, dtype=torch.float64)
        votes.scatter_add_(1, bank_labels[index].long(), (similarity / temperature).exp())
        correct += int((votes.argmax(1) == labels[start:start + chunk]).sum())
    return correct / queries.shape[0]


def feature_cosine(features: torch.Tensor, reference: torch.Tensor) -> float:
    """The mean cosine similarity of matching features (per image, or per token for token features)."""
    if features.shape != reference.shape:
        raise ValueError(f"Feature shapes differ: {tuple(features.shape)} vs {tuple(reference.shape)}.")
    return float(F.cosine_similarity(features.double(), reference.double(), dim=-1).mean())


def linear_cka(features: torch.Tensor, reference: torch.Tensor) -> float:
    """Linear CKA (Kornblith et al., 2019) of two sets of features of the same images, of any widths: 1 when one
    is a rotation and scaling of the other, 0 when unrelated. What compares a backbone whose output width
    changed (a pruned last stream) with its dense self, where a cosine cannot."""
    a = features.flatten(1).double()
    b = reference.flatten(1).double()
    a, b = a - a.mean(dim=0), b - b.mean(dim=0)
    return float((b.T @ a).pow(2).sum() / ((a.T @ a).norm() * (b.T @ b).norm()).clamp_min(1e-12))


def linear_probe_accuracy(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, labels: torch.Tensor,
                          weight_decay: float = 1e-4, iterations: int = 200, seed: int = 0) -> float:
    """Top-1 of a linear classifier (multinomial logistic regression, full-batch L-BFGS, features
    standardised with the training statistics) trained on frozen `train` features."""
    mean, std = train.mean(0, keepdim=True), train.std(0, keepdim=True).clamp_min(1e-6)
    x, x_test = ((train - mean) / std).float(), ((test - mean) / std).float()
    num_classes = int(max(train_labels.max(), labels.max())) + 1
    generator = torch.Generator().manual_seed(seed)
    probe = nn.Linear(x.shape[1], num_classes)
    with torch.no_grad():
        probe.weight.normal_(0, 0.01, generator=generator)
        probe.bias.zero_()
    optimizer = torch.optim.LBFGS(probe.parameters(), lr=1, max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(probe(x), train_labels.long()) + weight_decay * probe.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        return float((probe(x_test).argmax(1) == labels).float().mean())


class FeatureEvaluator:
    """A backbone judged the way DINO users judge one, against its dense self; labels only here.

    `evaluator(model)` -> {'feature_cosine': mean cosine of the model's and the dense model's features
    on the query images (`pooling`; 'feature_cka', their linear CKA, when the widths differ), and, when the bank and the queries have labels: 'knn_accuracy'
    (weighted k-NN, k=20, T=0.07, bank = `bank_loader`), 'linear_probe_accuracy' (a linear classifier
    on the frozen bank features)}. k-NN and probe use the CLS token of the last layer (the patch average
    with pooling='mean'): DINO's k-NN feature; for the probe, the simplest of the DINO variants."""

    def __init__(self, dense_model: nn.Module, bank_loader, query_loader, pooling: str = "cls", k: int = 20,
                 temperature: float = 0.07, probe: bool = True, device: torch.device | str | None = None):
        self.bank_loader, self.query_loader = bank_loader, query_loader
        self.pooling, self.k, self.temperature, self.probe, self.device = pooling, k, temperature, probe, device
        self.dense = self._features(dense_model, query_loader, pooling)[0]

    def _features(self, model, loader, pooling):
        return collect_features(model, loader, pooling, self.device)

    def __call__(self, model: nn.Module) -> dict[str, float]:
        queries, labels = self._features(model, self.query_loader, self.pooling)
        if queries.shape == self.dense.shape:
            metrics = {"feature_cosine": feature_cosine(queries, self.dense)}
        else:  # the output width changed (structured pruning of the last stream): no cosine, the linear CKA
            metrics = {"feature_cka": linear_cka(queries, self.dense)}
        if labels is None or self.bank_loader is None:
            return metrics
        bank, bank_labels = self._features(model, self.bank_loader, "mean" if self.pooling == "mean" else "cls")
        if bank_labels is None:
            return metrics
        if self.pooling == "tokens":
            queries = queries[:, 0]
        metrics["knn_accuracy"] = knn_accuracy(bank, bank_labels, queries, labels, self.k, self.temperature)
        if self.probe:
            metrics["linear_probe_accuracy"] = linear_probe_accuracy(bank, bank_labels, queries, labels)
        return metrics
