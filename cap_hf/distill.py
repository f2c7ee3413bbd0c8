"""Knowledge distillation from the dense model: (1 - alpha) * CE + alpha * T^2 * KL(teacher || student)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None,
                      temperature: float = 2.0, alpha: float = 0.5) -> torch.Tensor:
    """Per-batch mean. With alpha=1 (or no labels) the loss is pure distillation."""
    t = float(temperature)
    kd = F.kl_div(F.log_softmax(student_logits.float() / t, dim=-1), F.log_softmax(teacher_logits.float() / t, dim=-1),
                  reduction="batchmean", log_target=True) * (t * t)
    if labels is None or alpha >= 1.0:
        return kd
    ce = F.cross_entropy(student_logits.float(), labels)
    return (1.0 - alpha) * ce + alpha * kd
