"""Publish a pruned folder to the Hugging Face Hub (HfApi.create_repo + upload_folder).

Everything is checked before the first network call: the repo id, offline mode, the folder's files,
its model card, and that the weights agree with the record: a sparse checkpoint's zeros with
sparsity_config.json, a structurally pruned model's parameter count with structured_prune.py's
results.json. Publishing only reads the folder, so a failed push leaves it exactly as it was.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from cap_hf.io.checkpoint import CheckpointError, check_checkpoint, check_weights_present
from cap_hf.io.sources import hub_offline

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
    if hub_offline():
        raise HubError("HF_HUB_OFFLINE is set, so nothing can be published. Unset it (and log in with "
                       "`hf auth login` or pass a token) to push; the local folder is unchanged.")


def _can_write(whoami: dict, namespace: str) -> str | None:
    """Why the logged-in user cannot create or write a repo in `namespace`, or None when it can (as far as
    whoami tells: the token's role, its fine-grained scopes, the user's organisations and role in them)."""
    user = whoami.get("name")
    orgs = {o.get("name"): o for o in whoami.get("orgs") or [] if isinstance(o, dict)}
    if namespace != user and namespace not in orgs:
        return (f"the token belongs to {user!r}, who is not a member of {namespace!r} (its namespaces: "
                f"{', '.join(n for n in [user, *orgs] if n)})")
    if namespace in orgs and str(orgs[namespace].get("roleInOrg", "")).lower() == "read":
        return f"{user!r} has the read role in the organisation {namespace!r}"
    token = (whoami.get("auth") or {}).get("accessToken") or {}
    role = token.get("role")
    if role == "read":
        return "the token is read-only (role 'read'); create one with the 'write' role"
    if role == "fineGrained":
        grants = token.get("fineGrained") or {}
        scoped = [s for s in grants.get("scoped") or []
                  if (s.get("entity") or {}).get("name") == namespace and "repo.write" in (s.get("permissions") or [])]
        if not scoped:
            return f"the fine-grained token has no 'repo.write' permission on {namespace!r}"
    return None


def check_push(training_args, api=None) -> str | None:
    """Before any work, for a script's --push_to_hub / --hub_model_id: everything the push at the end will need,
    with two cheap calls: a valid repo id, a reachable Hub, a token (whoami) whose user may write in the repo's
    namespace, and, for a repo that exists already, write access to it (auth_check). Returns the repo id
    (None without --push_to_hub). The script pushes its finished folder itself (push_checkpoint), so the
    Trainer's own pushes (which skip our records) are turned off."""
    if not training_args.push_to_hub:
        return None
    repo_id = check_repo_id(training_args.hub_model_id)
    token = getattr(training_args, "hub_token", None)
    if api is None:
        check_online()
        from huggingface_hub import HfApi

        api = HfApi()
    check_write_access(repo_id, token, api)
    training_args.push_to_hub = False
    return repo_id


def check_write_access(repo_id: str, token: str | None, api) -> None:
    """HubError unless `token` (default: the logged-in one) may push to `repo_id` (see check_push)."""
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, RepositoryNotFoundError

    try:
        who = api.whoami(token=token)
    except LocalTokenNotFoundError:
        raise HubError(f"No Hugging Face token, so {repo_id} cannot be pushed to: log in with `hf auth login`, set "
                       "HF_TOKEN, or pass --hub_token (a token with the 'write' role).") from None
    except HfHubHTTPError as err:
        raise HubError(f"The Hub refused the token ({err}). Log in again with `hf auth login` or pass another "
                       "--hub_token.") from None
    except Exception as err:  # DNS, connection, timeout
        raise HubError(f"Could not reach the Hub to check the push to {repo_id} ({type(err).__name__}: {err}). Check "
                       "the network, or drop --push_to_hub and publish the folder later with scripts/push_to_hub.py."
                       ) from None
    namespace = repo_id.split("/")[0] if "/" in repo_id else who.get("name")
    why = _can_write(who, namespace)
    if why:
        raise HubError(f"Cannot push to {repo_id}: {why}. Choose a --hub_model_id in a namespace you may write to.")
    try:
        api.auth_check(repo_id, repo_type="model", token=token, write=True)
    except RepositoryNotFoundError:
        return  # a new repo: the push creates it in a namespace checked above
    except HfHubHTTPError as err:
        raise HubError(f"{repo_id} exists on the Hub and this token may not write to it ({err}). Choose another "
                       "--hub_model_id, or ask its owner for write access.") from None


def check_structured(folder: Path) -> dict:
    """A structurally pruned folder: weights, results.json, and a model that loads with exactly the
    parameter count the results describe. Returns the results."""
    from transformers import AutoModel, AutoModelForImageClassification

    check_weights_present(folder)
    try:
        results = json.loads((folder / "results.json").read_text())
        expected = int(results["params_pruned"])
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{folder}/results.json is not a structured_prune.py record ({err}).") from None
    try:
        model = AutoModelForImageClassification.from_pretrained(folder)
    except ValueError:  # a backbone
        model = AutoModel.from_pretrained(folder)
    found = sum(p.numel() for p in model.parameters())
    if found != expected:
        raise CheckpointError(f"{folder}: results.json describes {expected} parameters but the weights have {found}; "
                              "the folder was changed after the run. Run scripts/structured_prune.py again.")
    return results


def check_publishable(folder: str | Path) -> dict:
    """The checks of a pruned folder plus its model card; returns its record (sparsity_config.json, or
    results.json with "structured": True for a structurally pruned model)."""
    folder = Path(folder)
    if not (folder / "sparsity_config.json").is_file() and (folder / "results.json").is_file():
        record = {**check_structured(folder), "structured": True}
    else:
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
    check_write_access(repo_id, token, api)
    if record.get("structured"):
        speedup = max(record.get("speedup", {}).items(), key=lambda kv: int(kv[0]), default=None)
        default = (f"Upload {record['method']} channel-pruned model: {record['params_pruned']} parameters"
                   + (f", {float(speedup[1]):.2f}x at batch {speedup[0]}" if speedup else "") + " (cap_hf)")
    else:
        default = (f"Upload {record['method']} {record['structure']} model at "
                   f"{100 * record['overall_sparsity']:.1f}% sparsity (cap_hf)")
    message = commit_message or default
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
                       "unchanged.") from err
    logger.info("Pushed %s to %s (%s)", folder, repo_id, getattr(info, "pr_url", None) or getattr(info, "commit_url", ""))
    return info
