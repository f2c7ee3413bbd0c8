"""Knowledge distillation from the dense model: (1 - alpha) * CE + alpha * T^2 * KL(teacher || student) for a
classifier; for a backbone without a head, distillation of its features (no labels)."""

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


def feature_distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """A backbone's loss without labels, from cap_hf.evaluation.features.extract_features(..., 'tokens') of the student
    and the frozen dense teacher: 1 - cosine of the CLS tokens (the feature of k-NN and linear probes) + the
    mean squared error of the layer-normalised patch tokens (the features dense tasks use; normalised so that
    their scale, which differs from layer to layer and model to model, does not set the weighting).
    Convolutional backbones have one pooled feature per image (batch, dim): 1 - cosine alone."""
    student, teacher = student.float(), teacher.float()
    if student.dim() == 2:
        return 1 - F.cosine_similarity(student, teacher, dim=-1).mean()
    cls = 1 - F.cosine_similarity(student[:, 0], teacher[:, 0], dim=-1).mean()
    if student.shape[1] == 1:
        return cls
    size = student.shape[-1:]
    patches = F.mse_loss(F.layer_norm(student[:, 1:], size), F.layer_norm(teacher[:, 1:], size))
    return cls + patches
