"""Top-1 / top-5 accuracy without the Hub (evaluate.load('accuracy') needs a download)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int = 1) -> float:
    logits, labels = np.asarray(logits), np.asarray(labels)
    k = min(k, logits.shape[-1])
    top = np.argpartition(-logits, kth=k - 1, axis=-1)[:, :k]
    return float((top == labels[:, None]).any(axis=1).mean())


def compute_metrics(eval_pred) -> dict[str, float]:
    """For Trainer(compute_metrics=...): accuracy (top-1) and top5_accuracy."""
    logits, labels = eval_pred.predictions, eval_pred.label_ids
    if isinstance(logits, tuple):
        logits = logits[0]
    return {"accuracy": topk_accuracy(logits, labels, 1), "top5_accuracy": topk_accuracy(logits, labels, 5)}


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, loader, device: torch.device | str | None = None) -> float:
    """Top-1 accuracy of a classifier over a DataLoader of {'pixel_values', 'labels'} batches."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = total = 0
    for batch in loader:
        logits = model(pixel_values=batch["pixel_values"].to(device)).logits
        correct += int((logits.argmax(-1).cpu() == batch["labels"]).sum())
        total += batch["labels"].numel()
    model.train(was_training)
    if total == 0:
        raise ValueError("The evaluation data is empty.")
    return correct / total
