"""Linear probe on frozen features: gives a backbone (DINO, DINOv2) the head that the Fisher's
cross-entropy and the evaluation need, before pruning."""

from __future__ import annotations

import os

from torch import nn
from transformers import Trainer, TrainingArguments

from cap_hf.evaluation.metrics import compute_metrics
from cap_hf.io.data import collate
from cap_hf.io.models import head_parameters


def train_linear_probe(model: nn.Module, train_dataset, eval_dataset, base_args: TrainingArguments,
                       epochs: float = 3.0, learning_rate: float = 1e-3) -> dict[str, float]:
    """Train only the classifier for `epochs` with the backbone frozen; returns its eval metrics."""
    head = head_parameters(model)
    if not head:
        raise ValueError(f"{type(model).__name__} has no `classifier` parameters to train as a probe.")
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in head:
        p.requires_grad_(True)
    args = TrainingArguments(
        output_dir=os.path.join(base_args.output_dir, "probe"), num_train_epochs=epochs, learning_rate=learning_rate,
        weight_decay=0.0, per_device_train_batch_size=base_args.per_device_train_batch_size,
        per_device_eval_batch_size=base_args.per_device_eval_batch_size, use_cpu=base_args.use_cpu,
        ddp_backend=base_args.ddp_backend, save_strategy="no", report_to="none", remove_unused_columns=False,
        logging_steps=base_args.logging_steps, disable_tqdm=base_args.disable_tqdm, seed=base_args.seed)
    try:
        trainer = Trainer(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                          data_collator=collate, compute_metrics=compute_metrics)
        trainer.train()
        metrics = trainer.evaluate(metric_key_prefix="probe") if eval_dataset is not None else {}
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return metrics
