"""Publish a pruned checkpoint folder to the Hugging Face Hub (HfApi.create_repo + upload_folder).

Everything is checked before the first network call: the repo id, offline mode, the folder's files,
its model card, and that its zeros agree with sparsity_config.json. Publishing only reads the
folder, so a failed push leaves it exactly as it was.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from cap_hf.checkpoint import CheckpointError, check_checkpoint

logger = logging.getLogger(__name__)

# Trainer leftovers that do not belong in a published model repo
IGNORE_PATTERNS = ["checkpoint-*", "runs/*", "_*", ".*", "*.tmp", "training_args.bin", "optimizer.pt",
                   "scheduler.pt", "rng_state*.pth"]


class HubError(RuntimeError):
    """Publishing failed or cannot start; the local folder is unchanged."""


def check_repo_id(repo_id: str | None) -> str:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not repo_id:
        raise HubError("No repo id given: pass --repo_id (or --hub_model_id) as 'user-or-org/model-name'.")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise HubError(f"{repo_id!r} is not a valid Hub repo id ({err}). Use 'user-or-org/model-name' with "
                       "letters, digits, '-', '_' and '.' only.") from None
    return repo_id


def check_online() -> None:
    from huggingface_hub import constants

    if constants.is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        raise HubError("HF_HUB_OFFLINE is set, so nothing can be published. Unset it (and log in with "
                       "`hf auth login` or pass a token) to push; the local folder is unchanged.")


def check_publishable(folder: str | Path) -> dict:
    """The checks of a pruned checkpoint plus its model card; returns the sparsity record."""
    folder = Path(folder)
    record = check_checkpoint(folder)
    if not (folder / "README.md").is_file():
        raise CheckpointError(f"{folder} has no model card (README.md). Write it with "
                              f"`python -m model_cards {folder} --base_model ID --dataset ID`.")
    return record


def push_checkpoint(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    token: str | None = None,
    api=None,
):
    """Create the repo if needed and upload the folder; returns upload_folder's CommitInfo.

    `api` is an `huggingface_hub.HfApi` (default: a new one); tests pass a test double.
    """
    check_repo_id(repo_id)
    if api is None:
        check_online()
    record = check_publishable(folder)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    message = commit_message or (f"Upload {record['method']} {record['structure']} model at "
                                 f"{100 * record['overall_sparsity']:.1f}% sparsity (cap_hf)")
    try:
        url = api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
        repo_id = getattr(url, "repo_id", None) or repo_id
        if revision:
            api.create_branch(repo_id=repo_id, branch=revision, exist_ok=True, repo_type="model")
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=message,
                                 revision=revision, create_pr=create_pr, repo_type="model",
                                 ignore_patterns=IGNORE_PATTERNS)
    except Exception as err:
        raise HubError(f"Pushing {folder} to {repo_id} failed: {type(err).__name__}: {err}. The local folder is "
                       "unchanged; fix the cause and run the same command again.") from err
    logger.info("Pushed %s to %s (%s)", folder, repo_id, getattr(info, "pr_url", None) or getattr(info, "commit_url", ""))
    return info
