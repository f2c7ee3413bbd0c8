"""Which weights are prunable, per model family (transformers 5.x in-memory module names)."""

from __future__ import annotations

import re

from torch import nn

# ViT, DeiT, DINO (ViTModel), DINOv2 and relatives: attention q/k/v/o and the MLP, in every layer.
# transformers 5 names them `vit.layers.N.attention.q_proj`, `vit.layers.N.mlp.fc1`,
# `encoder.layer.N.mlp.{gate,up,down}_proj` (DINOv2 SwiGLU), ...
TRANSFORMER_TARGETS = r".*\.attention\.(q_proj|k_proj|v_proj|o_proj)|.*\.mlp\.(fc1|fc2|gate_proj|up_proj|down_proj)"
# Never pruned by default: patch/stem embeddings and classification heads (the paper keeps them dense).
DEFAULT_IGNORE = r"(.*\.)?(embeddings?|embedder|patch_embeddings?|stem)(\..*)?|(.*\.)?(classifier|head|heads|pooler|fc_norm)(\..*)?"
TRANSFORMER_FAMILIES = {"vit", "deit", "dinov2", "dinov2_with_registers", "vit_msn", "vit_mae", "beit", "dino", "pruned_vit",
                       "pruned_dinov2"}  # cap_hf.modeling: structurally pruned ViTs and DINOv2s

PRUNABLE_TYPES = (nn.Linear, nn.Conv2d)


def _is_prunable_module(module: nn.Module) -> bool:
    if isinstance(module, nn.Conv2d):
        return module.groups == 1  # depthwise convs are kept dense (CAP's ConvNeXt recipes)
    return isinstance(module, nn.Linear)


def default_target_pattern(model: nn.Module) -> str | None:
    """The paper's default selection for known families; None means the generic Linear/Conv2d fallback."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return TRANSFORMER_TARGETS if model_type in TRANSFORMER_FAMILIES else None


def find_targets(
    model: nn.Module, targets: str | list[str] | None = None, ignore: str | None = None
) -> dict[str, nn.Module]:
    """Return {module name: module} of the weights to prune, in model order.

    `targets` is a regex matched in full against module names, or a list of exact module names.
    Without it, the family default applies (see TRANSFORMER_TARGETS), else every Linear / Conv2d
    outside embeddings and heads.
    """
    named = dict(model.named_modules())
    if isinstance(targets, (list, tuple)):
        missing = [name for name in targets if name not in named]
        if missing:
            raise ValueError(f"Target modules not found in {type(model).__name__}: {missing[:5]}. "
                             f"Module names look like {list(named)[1:4]}.")
        bad = [name for name in targets if not _is_prunable_module(named[name])]
        if bad:
            raise ValueError(f"Targets must be nn.Linear or non-grouped nn.Conv2d modules; not: {bad[:5]}.")
        selected = {name: named[name] for name in targets}
    else:
        pattern = targets if targets is not None else default_target_pattern(model)
        ignore_re = re.compile(ignore if ignore is not None else DEFAULT_IGNORE)
        target_re = re.compile(pattern) if pattern is not None else None
        selected = {}
        for name, module in named.items():
            if not name or not _is_prunable_module(module):
                continue
            if target_re is not None:
                if target_re.fullmatch(name) and not (ignore is not None and ignore_re.fullmatch(name)):
                    selected[name] = module
            elif not ignore_re.fullmatch(name):
                selected[name] = module
    if not selected:
        model_type = getattr(getattr(model, "config", None), "model_type", "unknown")
        examples = [n for n, m in named.items() if isinstance(m, PRUNABLE_TYPES)][:5]
        raise ValueError(
            f"No prunable weights found in {type(model).__name__} (model_type={model_type!r}) with "
            f"targets={targets!r}. Choose them with a regex or a list of module names (PruningConfig.targets / "
            f"--targets); Linear/Conv2d modules of this model include {examples}."
        )
    return selected
