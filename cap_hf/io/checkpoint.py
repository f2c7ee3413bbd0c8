"""Sparse checkpoints: plain `save_pretrained` folders plus a sparsity record.

The weights stay dense safetensors with exact zeros, so `from_pretrained` loads them anywhere with no
extra package (compressed-tensors no longer has sparse formats, see docs/design.md). Beside them:

  sparsity_config.json   our versioned schema: method, structure, overall and per-layer sparsity, targets
  cap_recipe.yaml        the recipe actually used (pruning config, schedule, distillation, command)
  eval_results.json      the evaluation (Trainer.save_metrics layout), read by the model card
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Mapping
from pathlib import Path

import torch
import yaml
from torch import nn

from cap_hf.config import parse_structure
from cap_hf.masks import sparsity_report, verify_sparsity
from cap_hf.record import SCHEMA, SCHEMA_VERSION, SPARSITY_FILE, CheckpointError, load_sparsity_config
from cap_hf.targets import find_targets

RECIPE_FILE = "cap_recipe.yaml"
EVAL_FILE = "eval_results.json"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
__all__ = ["EVAL_FILE", "RECIPE_FILE", "SCHEMA", "SCHEMA_VERSION", "SPARSITY_FILE", "CheckpointError", "check_checkpoint",
           "load_pruned_model", "load_sparsity_config", "save_sparse_checkpoint", "write_sparsity_files"]


def _write_atomic(path: Path, text: str) -> None:
    """Write a file whole or not at all: a crash never leaves a half-written record."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _versions() -> dict[str, str]:
    import transformers

    import cap_hf

    return {"cap_hf": cap_hf.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
            "python": platform.python_version()}


def build_sparsity_config(
    targets: Mapping[str, nn.Module],
    method: str,
    structure: str = "unstructured",
    *,
    target_pattern: str | list[str] | None = None,
    ignore: str | None = None,
    sparsity_distribution: str | None = None,
    base_model: str | None = None,
) -> dict:
    """The sparsity record of the current weights (measured from their zeros, never assumed)."""
    parse_structure(structure)
    report = sparsity_report(targets)
    return {
        "schema": SCHEMA,
        "version": SCHEMA_VERSION,
        "format": "dense",  # dense safetensors with exact zeros
        "method": method,
        "structure": structure,
        "sparsity_distribution": sparsity_distribution,
        "overall_sparsity": report.overall,
        "num_weights": report.num_weights,
        "num_zeros": report.num_zeros,
        "per_layer": report.per_layer,
        "targets": target_pattern if target_pattern is not None else sorted(targets),
        "ignore": ignore,
        "base_model": base_model,
        "versions": _versions(),
    }


def write_sparsity_files(
    model: nn.Module,
    output_dir: str | Path,
    *,
    method: str,
    structure: str = "unstructured",
    targets: Mapping[str, nn.Module] | str | list[str] | None = None,
    ignore: str | None = None,
    sparsity_distribution: str | None = None,
    recipe: Mapping | None = None,
    base_model: str | None = None,
) -> dict:
    """Write sparsity_config.json (and cap_recipe.yaml when given) next to weights already saved."""
    pattern = None if isinstance(targets, Mapping) else targets
    modules = targets if isinstance(targets, Mapping) else find_targets(model, targets, ignore)
    record = build_sparsity_config(modules, method, structure, target_pattern=pattern, ignore=ignore,
                                   sparsity_distribution=sparsity_distribution, base_model=base_model)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / SPARSITY_FILE, json.dumps(record, indent=2) + "\n")
    if recipe is not None:
        _write_atomic(out / RECIPE_FILE, yaml.safe_dump(_plain(recipe), sort_keys=False))
    return record


def _plain(value):
    """YAML-safe copy: tuples to lists, paths and other objects to strings."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def save_sparse_checkpoint(
    model: nn.Module,
    output_dir: str | Path,
    *,
    image_processor=None,
    eval_results: Mapping | None = None,
    **record,
) -> Path:
    """save_pretrained (safetensors, exact zeros) + processor + sparsity_config.json and recipe (`record`:
    the keyword arguments of write_sparsity_files: method, structure, targets, ...) + eval results."""
    quant = getattr(getattr(model, "config", None), "quantization_config", None)
    if quant:
        raise CheckpointError("The model config carries a quantization_config; sparse checkpoints are saved as "
                              "plain dense safetensors. Remove model.config.quantization_config first.")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    if image_processor is not None:
        image_processor.save_pretrained(out)
    write_sparsity_files(model, out, **record)
    if eval_results is not None:
        _write_atomic(out / EVAL_FILE, json.dumps(dict(eval_results), indent=2) + "\n")
    return out


def check_weights_present(folder: str | Path) -> None:
    """config.json and safetensors weights (single file, or an index with all its shards)."""
    out = Path(folder)
    if not out.is_dir():
        raise CheckpointError(f"{out} is not a folder; pass the output folder of a pruning run.")
    if not (out / "config.json").is_file():
        raise CheckpointError(f"{out} has no config.json, so it is not a model folder written by save_pretrained.")
    if (out / "model.safetensors").is_file():
        return
    index = out / "model.safetensors.index.json"
    if not index.is_file():
        found = sorted(p.name for p in out.glob("*.bin")) or "nothing"
        raise CheckpointError(f"{out} is missing its weights: no model.safetensors or model.safetensors.index.json "
                              f"(found {found}). Save the model with save_pretrained(..., safe_serialization=True).")
    shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
    absent = sorted(s for s in shards if not (out / s).is_file())
    if absent:
        raise CheckpointError(f"{out} is missing weight shards {absent[:5]} listed in model.safetensors.index.json.")


def load_pruned_model(folder: str | Path, **kwargs) -> nn.Module:
    """from_pretrained with the right Auto class, refusing any missing, unexpected or resized weight."""
    from transformers import AutoConfig

    import cap_hf.modeling  # noqa: F401  registers the physically smaller model classes
    from cap_hf.io.models import from_pretrained_as_saved

    check_weights_present(folder)
    config = AutoConfig.from_pretrained(folder)
    quant = getattr(config, "quantization_config", None)
    if quant:
        raise CheckpointError(f"{folder}/config.json has a quantization_config ({dict(quant).get('quant_method')}); "
                              "cap_hf checkpoints are plain dense safetensors.")
    model, info = from_pretrained_as_saved(str(folder), **kwargs)
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        raise CheckpointError(f"{folder} does not load cleanly: {problems}.")
    return model


def check_checkpoint(folder: str | Path) -> dict:
    """Everything a publishable pruned checkpoint needs; returns its sparsity record.

    Checks the files first (cheap), then loads the model and compares its zeros with the record.
    """
    check_weights_present(folder)
    record = load_sparsity_config(folder)
    model = load_pruned_model(folder)
    verify_sparsity(model, folder)
    return record
