"""Masks derived from the weights' zeros, sparsity measurement, and `verify_sparsity`."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from cap_hf.config import parse_structure
from cap_hf.record import load_sparsity_config
from cap_hf.targets import find_targets


def current_masks(targets: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
    """True where a weight is kept. The zeros of the weights are the single source of truth."""
    return {name: module.weight.detach() != 0 for name, module in targets.items()}


@dataclass
class SparsityReport:
    overall: float
    per_layer: dict[str, float]
    num_weights: int
    num_zeros: int
    mismatches: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"overall": self.overall, "num_weights": self.num_weights, "num_zeros": self.num_zeros,
                "per_layer": self.per_layer}


class SparsityMismatchError(ValueError):
    """The zeros in the weights disagree with the sparsity they are expected to have."""


def sparsity_report(targets: Mapping[str, nn.Module]) -> SparsityReport:
    per_layer, zeros, total = {}, 0, 0
    for name, module in targets.items():
        weight = module.weight.detach()
        z = int((weight == 0).sum())
        per_layer[name] = z / weight.numel()
        zeros += z
        total += weight.numel()
    return SparsityReport(overall=zeros / max(total, 1), per_layer=per_layer, num_weights=total, num_zeros=zeros)


def verify_sparsity(
    model: nn.Module,
    expected: float | Mapping[str, float] | str | os.PathLike | None = None,
    targets: str | list[str] | Mapping[str, nn.Module] | None = None,
    tolerance: float | None = None,
    n_m: tuple[int, int] | None = None,
) -> SparsityReport:
    """Measure the sparsity of the target weights and check it against what is expected.

    `expected` is an overall fraction, a {layer: fraction} mapping, or a checkpoint folder whose
    sparsity_config.json gives the layers, their sparsities and the structure (checked exactly unless
    `tolerance` is given); `n_m` checks an N:M pattern. Raises SparsityMismatchError naming the layers
    that drifted (for example after fine-tuning without masks); returns the report otherwise.
    """
    if isinstance(expected, (str, os.PathLike)):  # a checkpoint: its layers, exactly, and its structure
        record = load_sparsity_config(expected)
        modules = dict(model.named_modules())
        targets = {name: modules[name] for name in record["per_layer"] if name in modules}
        expected = {name: float(v) for name, v in record["per_layer"].items()}
        tolerance = tolerance or 0.0
        n_m = parse_structure(record["structure"])
    tolerance = 1e-3 if tolerance is None else tolerance

    if not isinstance(targets, Mapping):
        targets = find_targets(model, targets)
    report = sparsity_report(targets)
    problems = []
    if isinstance(expected, Mapping):
        for name, want in expected.items():
            have = report.per_layer.get(name)
            if have is None:
                problems.append(f"{name}: expected {want:.4f}, layer not among the targets")
            elif abs(have - want) > tolerance:
                problems.append(f"{name}: expected {want:.4f}, found {have:.4f}")
    elif expected is not None and abs(report.overall - float(expected)) > tolerance:
        problems.append(f"overall: expected {float(expected):.4f}, found {report.overall:.4f}")
    if n_m is not None:
        n, m = n_m
        for name, module in targets.items():
            weight = module.weight.detach().reshape(-1)
            if weight.numel() % m:
                problems.append(f"{name}: {weight.numel()} weights not divisible by M={m}")
                continue
            nonzeros = (weight.reshape(-1, m) != 0).sum(dim=1)
            if bool((nonzeros > n).any()):
                problems.append(f"{name}: {int((nonzeros > n).sum())} groups of {m} with more than {n} non-zeros")
    report.mismatches = problems
    if problems:
        raise SparsityMismatchError("Sparsity check failed:\n  " + "\n  ".join(problems))
    return report
