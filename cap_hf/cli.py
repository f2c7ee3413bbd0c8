"""Command-line parsing shared by the scripts: HfArgumentParser over the scripts' dataclasses (the
pruning recipe is PruningConfig itself), plus `--recipe FILE`.

- `script.py config.yaml` (or .json): every flag from the file, as HfArgumentParser does it.
- `script.py --recipe recipe.yaml --flag value ...`: the file's values become the defaults and the flags
  given on the command line win (each conflict is logged). The file is a mapping of flag names, or a
  checkpoint's cap_recipe.yaml, whose `pruning` section is taken (its other sections record the run).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import yaml
from transformers import HfArgumentParser

from cap_hf.config import upgrade_recipe

logger = logging.getLogger(__name__)

RECIPE_RECORD_SECTIONS = ("schedule", "distillation", "training", "command", "base_model", "dataset")


def load_recipe(path: str | os.PathLike, known: set[str]) -> dict:
    """The flag values of a recipe file, checked against the script's flags."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--recipe {path}: no such file.")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ValueError(f"--recipe {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {err}") \
            from None
    if not isinstance(data, dict):
        raise ValueError(f"--recipe {path} must hold a mapping of flag names to values.")
    values = {k: v for k, v in data.items() if k != "pruning" and k not in RECIPE_RECORD_SECTIONS}
    pruning = data.get("pruning") or {}
    if not isinstance(pruning, dict):
        raise ValueError(f"--recipe {path}: its 'pruning' section must be a mapping.")
    values.update(upgrade_recipe(pruning))
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"--recipe {path} sets {unknown}, which are not flags of this script (see --help).")
    return values


def _given_flags(argv: Sequence[str]) -> set[str]:
    names = set()
    for token in argv:
        if token.startswith("--"):
            name = token[2:].split("=", 1)[0].replace("-", "_")
            names.add(name[3:] if name.startswith("no_") else name)
    return names


def parse_args(types: tuple, argv: Sequence[str], defaults: dict | None = None) -> tuple:
    """The scripts' dataclasses from `argv` (see the module docstring). `defaults` are the script's own
    defaults for some flags (a benchmark's, say). Bad values raise ValueError."""
    parser = HfArgumentParser(types)
    if defaults:
        parser.set_defaults(**defaults)
    argv = list(argv)
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
        loader = parser.parse_json_file if argv[0].endswith(".json") else parser.parse_yaml_file
        return tuple(loader(os.path.abspath(argv[0])))
    parser.add_argument("--recipe", default=None, help="YAML/JSON file of flag values (or a checkpoint's "
                        "cap_recipe.yaml); flags given on the command line win over it.")
    recipe = None
    if "--recipe" in argv or any(a.startswith("--recipe=") for a in argv):
        index = next(i for i, a in enumerate(argv) if a == "--recipe" or a.startswith("--recipe="))
        if argv[index] == "--recipe":
            if index + 1 >= len(argv):
                raise ValueError("--recipe needs a file.")
            recipe, argv = argv[index + 1], argv[:index] + argv[index + 2:]
        else:
            recipe, argv = argv[index].split("=", 1)[1], argv[:index] + argv[index + 1:]
    values = {}
    if recipe is not None:
        values = load_recipe(recipe, {action.dest for action in parser._actions})
        for action in parser._actions:
            if action.dest in values:
                action.required = False  # given by the recipe
        parser.set_defaults(**values)
        logger.info("Recipe %s: %s", recipe, ", ".join(f"{k}={v!r}" for k, v in values.items()))
    outputs = tuple(parser.parse_args_into_dataclasses(args=argv)[:len(types)])
    for name in sorted(set(values) & _given_flags(argv)):
        flag = next(getattr(o, name) for o in outputs if hasattr(o, name))
        logger.warning("%s is set both in the recipe %s (%r) and on the command line (%r): the command line wins.",
                       name, recipe, values[name], flag)
    return outputs
