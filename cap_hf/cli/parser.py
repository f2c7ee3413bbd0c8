"""What every script shares on the command line: parsing, help, and how an error reaches the user.

- `parse_args`: HfArgumentParser over the scripts' dataclasses (the pruning recipe is PruningConfig itself),
  plus `--recipe FILE`:
  - `script.py config.yaml` (or .json): every flag from the file, as HfArgumentParser does it.
  - `script.py --recipe recipe.yaml --flag value ...`: the file's values become the defaults and the flags
    given on the command line win (each conflict is logged). The file is a mapping of flag names, or a
    checkpoint's cap_recipe.yaml, whose `pruning` section is taken (its other sections record the run).
- `ArgumentParser` / `ScriptParser` (argparse / HfArgumentParser): help strings are made safe for argparse's
  %-formatting (a bare "%" in a field's help crashed --help), and a usage error is one short line, printed
  by the main process only.
- `run(main)`: a script's entry point. A `SystemExit("message")` raised anywhere before or during the work
  is printed once, by the main process (under `accelerate launch` every process stops; one speaks; another
  speaks only when the error was its own), as `error: message`, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import yaml
from transformers import HfArgumentParser

from cap_hf.config import upgrade_recipe

logger = logging.getLogger(__name__)

RECIPE_RECORD_SECTIONS = ("schedule", "distillation", "training", "command", "base_model", "dataset")

_BARE_PERCENT = re.compile(r"(?<!%)%(?![(%])")  # a "%" that is neither "%%" nor a "%(name)s" placeholder


def argparse_safe(text: str | None) -> str | None:
    """Help text with every bare "%" doubled: argparse %-formats help strings when it prints them."""
    return text if not isinstance(text, str) else _BARE_PERCENT.sub("%%", text)


def is_main_process() -> bool:
    """Whether this process speaks for its machine: local rank 0 under torchrun / `accelerate launch`, or the
    only process. Read from the launcher's environment, so it holds before any process group exists. (Per
    machine rather than rank 0 alone: on several machines, an error that only one machine meets, such as a
    folder missing there, is still said.)"""
    for name in ("LOCAL_RANK", "RANK"):
        value = os.environ.get(name)
        if value not in (None, ""):
            return value.strip() == "0"
    return True


# How long another process waits before it speaks: the main process meets the same error at the same point and
# says it, and the launcher (torchrun) then stops every process, so this one never does. It speaks only when the
# error was its own (the main process went on).
QUIET_SECONDS = 10.0


def report_error(message: str) -> None:
    """`error: message` on stderr, once: by the main process of the machine (is_main_process); another process
    says it (with its rank) only if it is still running QUIET_SECONDS later, i.e. the error was its alone."""
    text = str(message).strip()
    text = text[len("error:"):].strip() if text.startswith("error:") else text
    if is_main_process():
        print(f"error: {text}", file=sys.stderr, flush=True)
        return
    time.sleep(QUIET_SECONDS)
    print(f"error (process {os.environ.get('RANK', '?')}): {text}", file=sys.stderr, flush=True)


def run(main: Callable[[], object]) -> None:
    """A script's entry point (`if __name__ == "__main__": run(main)`): a SystemExit with a message is printed
    once (report_error) and becomes exit status 1; any other exit or exception passes through unchanged."""
    try:
        main()
    except SystemExit as stop:
        if isinstance(stop.code, str):
            report_error(stop.code)
            raise SystemExit(1) from None
        raise


class _ScriptParsing:
    """What the scripts' parsers add to argparse: safe help strings and short usage errors."""

    def _safe_help(self) -> None:
        for action in self._actions:
            action.help = argparse_safe(action.help)

    def parse_known_args(self, args=None, namespace=None):
        self._safe_help()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._safe_help()
        return super().format_help()

    hint: str | None = None  # a sentence added to usage errors

    def error(self, message: str):
        """One line, not the whole usage (the scripts have over a hundred flags), printed by the main process."""
        report_error(f"{message}. {self.hint + ' ' if self.hint else ''}Run `{self.prog} --help` for every flag.")
        raise SystemExit(2)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The script's docstring as written, and every flag's default."""


class ArgumentParser(_ScriptParsing, argparse.ArgumentParser):
    """argparse.ArgumentParser for the scripts (see _ScriptParsing)."""


class ScriptParser(_ScriptParsing, HfArgumentParser):
    """HfArgumentParser for the scripts (see _ScriptParsing)."""


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


def config_file(argv: Sequence[str]) -> str | None:
    """The config file when the whole command line is one (`script.py config.yaml`), else None."""
    return argv[0] if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")) else None


def given_flags(argv: Sequence[str]) -> set[str]:
    """The names of the flags on a command line, as dataclass fields (`--no_x` counts as x)."""
    names = set()
    for token in argv:
        if token.startswith("--"):
            name = token[2:].split("=", 1)[0].replace("-", "_")
            names.add(name[3:] if name.startswith("no_") else name)
    return names


def parse_args(types: tuple, argv: Sequence[str], defaults: dict | None = None, description: str | None = None,
               prog: str | None = None, hint: str | None = None) -> tuple:
    """The scripts' dataclasses from `argv` (see the module docstring). `defaults` are the script's own
    defaults for some flags (a benchmark's, say); `description` heads --help (the script's docstring), `hint`
    is added to usage errors. Bad values raise ValueError; unknown flags and missing required ones are usage
    errors (one line, SystemExit 2)."""
    parser = ScriptParser(types, description=description, prog=prog, formatter_class=HelpFormatter)
    parser.hint = hint
    if defaults:
        parser.set_defaults(**defaults)
    argv = list(argv)
    if config_file(argv):
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
    *outputs, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    outputs = tuple(outputs[:len(types)])
    for name in sorted(set(values) & given_flags(argv)):
        flag = next(getattr(o, name) for o in outputs if hasattr(o, name))
        logger.warning("%s is set both in the recipe %s (%r) and on the command line (%r): the command line wins.",
                       name, recipe, values[name], flag)
    return outputs
