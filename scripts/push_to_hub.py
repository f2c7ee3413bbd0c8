"""Publish a pruned checkpoint folder to the Hugging Face Hub.

  python scripts/push_to_hub.py outputs/deit-small-cap75 --repo_id me/deit-small-cap-75 [--private]
      [--revision BRANCH] [--create_pr] [--commit_message "..."] [--token hf_...]

The folder must be a pruned checkpoint (config.json, safetensors weights, sparsity_config.json whose
per-layer sparsity matches the weights' zeros, README.md card) or a structured_prune.py output; all of that,
and that the token may write to the repo, is checked before anything is uploaded, and the folder is only read.
"""

from __future__ import annotations

import logging

from cap_hf.cli.parser import ArgumentParser, HelpFormatter, run
from cap_hf.io.checkpoint import CheckpointError
from cap_hf.io.hub import HubError, push_checkpoint
from cap_hf.masks import SparsityMismatchError


def main(argv: list[str] | None = None, api=None):
    parser = ArgumentParser(prog="python scripts/push_to_hub.py", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("folder", help="Output folder of scripts/prune.py (or save_sparse_checkpoint).")
    parser.add_argument("--repo_id", required=True, help="'user-or-org/model-name'; created if missing.")
    parser.add_argument("--private", action="store_true", help="Create the repo as private.")
    parser.add_argument("--revision", default=None, help="Branch to push to (created if missing).")
    parser.add_argument("--create_pr", action="store_true", help="Open a pull request instead of committing.")
    parser.add_argument("--commit_message", default=None)
    parser.add_argument("--token", default=None, help="Default: the token of `hf auth login`.")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        info = push_checkpoint(args.folder, args.repo_id, private=args.private or None, revision=args.revision,
                               create_pr=args.create_pr, commit_message=args.commit_message, token=args.token,
                               api=api)
    except (HubError, CheckpointError, SparsityMismatchError) as err:
        raise SystemExit(f"error: {err} Fix the cause and run this command again: it only reads the folder.") from None
    print(f"pushed {args.folder} -> {getattr(info, 'pr_url', None) or getattr(info, 'commit_url', args.repo_id)}")
    return info


if __name__ == "__main__":
    run(main)
