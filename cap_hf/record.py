"""The sparsity record of a pruned checkpoint (sparsity_config.json): its schema and how it is read."""

from __future__ import annotations

import json
from pathlib import Path

SCHEMA = "cap_hf.sparsity_config"
SCHEMA_VERSION = 1
SPARSITY_FILE = "sparsity_config.json"


class CheckpointError(ValueError):
    """A folder is not a usable pruned checkpoint; the message says what is missing or wrong."""


def load_sparsity_config(folder: str | Path) -> dict:
    """Read and check sparsity_config.json of a checkpoint folder (or the file itself)."""
    path = Path(folder)
    path = path / SPARSITY_FILE if path.is_dir() else path
    if not path.is_file():
        raise CheckpointError(f"{path.parent if path.name == SPARSITY_FILE else path} is not a pruned checkpoint: "
                              f"it has no {SPARSITY_FILE}. Save it with cap_hf.io.checkpoint.save_sparse_checkpoint "
                              "or scripts/prune.py.")
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); it may have been edited by hand.") from None
    if not isinstance(record, dict) or record.get("schema") != SCHEMA:
        raise CheckpointError(f"{path} is not a cap_hf sparsity record (schema {SCHEMA!r} expected).")
    if int(record.get("version", 0)) > SCHEMA_VERSION:
        raise CheckpointError(f"{path} has schema version {record['version']}, newer than this cap_hf understands "
                              f"({SCHEMA_VERSION}); upgrade cap_hf.")
    missing = [k for k in ("method", "structure", "per_layer", "overall_sparsity") if k not in record]
    if missing:
        raise CheckpointError(f"{path} lacks the fields {missing}.")
    return record
