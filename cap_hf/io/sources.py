"""Where a model or a dataset comes from, checked before any work: a local folder, or a Hub id.

One cheap look per name and no retry loop. A name that is a path, or looks like one, must be an existing
folder. A Hub id must be in the local Hugging Face cache or, online, answer one metadata request
(HfApi.auth_check: it also tells a missing or private repo from a gated one). Without this check,
transformers retries a missing file for about half a minute per file and then reports a missing
preprocessor_config.json, and a missing folder is taken for a Hub id.
"""

from __future__ import annotations

import os
from pathlib import Path

BUILTIN_PREFIX = "builtin:"  # cap_hf's offline data sets (cap_hf.io.data.BUILTIN_DATASETS)


class SourceError(ValueError):
    """A model or dataset that cannot be found; the message says what was tried and what to do."""


def hub_offline() -> bool:
    """Whether the Hub may not be asked (HF_HUB_OFFLINE, read by huggingface_hub or set since)."""
    from huggingface_hub import constants

    return bool(constants.is_offline_mode()) or \
        os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def is_repo_id(name: str) -> bool:
    """Whether `name` is a syntactically valid Hub repo id ('name' or 'namespace/name')."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def looks_like_path(name: str) -> bool:
    """A name meant as a local folder: it exists, starts like a path ('.', '/', '~'), has more than one '/'
    or a backslash, is no valid Hub id, or starts with a folder that exists here ('data/x' when data/ does)."""
    if Path(name).expanduser().exists() or name.startswith((".", "/", "~")) or "\\" in name:
        return True
    parts = name.split("/")
    return len(parts) > 2 or not is_repo_id(name) or (len(parts) == 2 and Path(parts[0]).expanduser().is_dir())


def _cached(repo_id: str, repo_type: str) -> bool:
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return (Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type=repo_type)).is_dir()


def check_hub_repo(repo_id: str, repo_type: str = "model", token: str | bool | None = None, api=None) -> None:
    """A Hub id that the run can read: cached locally, or (online) readable on the Hub with this token.
    SourceError otherwise, in one line, after at most one request."""
    kind = "dataset" if repo_type == "dataset" else "model"
    if _cached(repo_id, repo_type):
        return
    if hub_offline():
        raise SourceError(f"{kind} {repo_id!r} not found locally or on the Hub: it is no local folder, it is not in the "
                          "Hugging Face cache, and offline mode is on (HF_HUB_OFFLINE=1), so the Hub was not asked. "
                          "Pass a local folder, or unset HF_HUB_OFFLINE to download it.")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    api = api if api is not None else HfApi()
    page = f"https://huggingface.co/{'datasets/' if kind == 'dataset' else ''}{repo_id}"
    try:
        api.auth_check(repo_id, repo_type=repo_type, token=token)
    except GatedRepoError:
        raise SourceError(f"{kind} {repo_id!r} is gated on the Hub and this token may not read it: accept its "
                          f"conditions on {page}, then log in with `hf auth login` (or set HF_TOKEN).") from None
    except RepositoryNotFoundError:
        raise SourceError(f"{kind} {repo_id!r} not found locally or on the Hub: no such folder here, and no such "
                          "repository on the Hub (or a private one: log in with `hf auth login` or set HF_TOKEN). "
                          "Check the spelling.") from None
    except HfHubHTTPError as err:
        raise SourceError(f"The Hub refused to look up {kind} {repo_id!r}: {err}") from None
    except Exception as err:  # DNS, connection refused, timeout: the Hub cannot be reached
        raise SourceError(f"could not reach the Hub to find {kind} {repo_id!r} ({type(err).__name__}: {err}), and it "
                          "is not in the local cache. Check the network, pass a local folder, or set HF_HUB_OFFLINE=1 "
                          "to work from the cache only.") from None


def check_model_source(name: str, token: str | bool | None = None, api=None) -> None:
    """A model's `--model_name_or_path` (or teacher): a folder with config.json, or a readable Hub id."""
    if looks_like_path(name):
        path = Path(name).expanduser()
        if not path.is_dir():
            raise SourceError(f"model folder {name!r} does not exist. Pass a folder written by save_pretrained (e.g. by "
                              "scripts/train_dense.py) or a Hub model id.")
        if not (path / "config.json").is_file():
            raise SourceError(f"{name!r} has no config.json; pass a folder written by save_pretrained (e.g. by "
                              "scripts/train_dense.py) or a Hub model id.")
        return
    check_hub_repo(name, "model", token, api)


def check_dataset_source(name: str, token: str | bool | None = None, api=None) -> None:
    """A `--dataset_name`: a builtin data set, an existing folder, or a readable Hub dataset id."""
    if name.startswith(BUILTIN_PREFIX):
        return
    if looks_like_path(name):
        if not Path(name).expanduser().is_dir():
            raise SourceError(f"dataset folder {name!r} does not exist (or is not a folder). Pass a save_to_disk "
                              "folder, an imagefolder folder, a Hub dataset id, or builtin:digits / "
                              "builtin:fashion-mnist.")
        return
    check_hub_repo(name, "dataset", token, api)


def check_sources(model: str | None = None, dataset: str | None = None, teacher: str | None = None) -> None:
    """What a script reads, checked before any work: its model, its distillation teacher and its dataset (each
    when given)."""
    for name in (model, teacher):
        if name:
            check_model_source(name)
    if dataset:
        check_dataset_source(dataset)
