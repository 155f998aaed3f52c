"""`push_to_hub` and `hub_*`: uploads to the Hugging Face Hub through `huggingface_hub`, as transformers'
Trainer makes them. Called on rank 0 only, always after the local save, so a failed upload never loses a model.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

# What a checkpoint's model upload takes: the Hugging Face model directory, never the DeepSpeed state.
MODEL_FILES = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "adapter/*"]
# What an upload of output_dir leaves out, as transformers does: checkpoints and private files.
OUTPUT_DIR_IGNORE = ["checkpoint-*", "_*", "latest"]


class HubPushError(RuntimeError):
    """An upload failed; the message names the folder, the repository and the cause."""


def repo_name(args) -> str:
    """`hub_model_id`, or (transformers' default) the output directory's name."""
    return args.hub_model_id or Path(args.output_dir).absolute().name


def upload(args, folder: str | Path, *, path_in_repo: Optional[str] = None, commit_message: str,
           token: Optional[str] = None, revision: Optional[str] = None, private: Optional[bool] = None,
           model_only: bool = False) -> str:
    """Create the repository if needed and upload `folder` into it; returns the repository id."""
    from huggingface_hub import HfApi

    api = HfApi(token=token or args.hub_token)
    repo = repo_name(args)
    try:
        repo = api.create_repo(repo, private=args.hub_private_repo if private is None else private,
                               exist_ok=True).repo_id
        api.upload_folder(repo_id=repo, folder_path=str(folder), path_in_repo=path_in_repo, revision=revision,
                          commit_message=commit_message, allow_patterns=MODEL_FILES if model_only else None,
                          ignore_patterns=None if model_only else OUTPUT_DIR_IGNORE)
    except Exception as exc:  # offline, no token, no permission, ...: all end here with the same story
        raise HubPushError(f"push_to_hub: uploading {folder} to the Hub repository {repo!r} failed "
                           f"({type(exc).__name__}: {exc}); the model is saved locally in {folder}") from exc
    return repo


def push_checkpoint(args, folder: Path) -> None:
    """transformers' `hub_strategy` at each save: `every_save` uploads the checkpoint's model to the repository
    root, `checkpoint` also the whole checkpoint as `last-checkpoint`, `all_checkpoints` each checkpoint under
    its own name; `end` nothing (the final push_to_hub does)."""
    strategy = args.hub_strategy
    if strategy == "end":
        return
    message = f"Training in progress, step {folder.name.split('-')[-1]}"
    if strategy == "all_checkpoints":
        upload(args, folder, path_in_repo=folder.name, commit_message=message)
        return
    upload(args, folder, commit_message=message, model_only=True)
    if strategy == "checkpoint":
        upload(args, folder, path_in_repo="last-checkpoint", commit_message=message)
