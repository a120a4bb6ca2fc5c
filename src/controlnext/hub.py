"""``--push-to-hub``: upload a training run's outputs to a hub model repository.

:func:`check_push` runs before training, so that a run that cannot upload (offline, not logged in) fails in one
line before hours of training; :func:`push_outputs` uploads the exported files (not the checkpoints) at the end.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["check_push", "hub_repo_id", "push_outputs", "train_and_push"]

# What is left out of the upload: resumable checkpoints, the output lock and logs (the exports and card go up).
IGNORE = ["checkpoints/**", "logs/**", "*.lock", ".*", ".*/**"]


def hub_repo_id(output_dir: str, hub_model_id: str | None) -> str:
    """The repository to push to: ``--hub-model-id``, else the output folder's name (as diffusers' scripts do)."""
    return hub_model_id or Path(output_dir).resolve().name


def check_push(output_dir: str, hub_model_id: str | None) -> str:
    """Raise ValueError (one line) when an upload at the end could not work; returns the repository id."""
    from huggingface_hub import constants, get_token

    repo = hub_repo_id(output_dir, hub_model_id)
    if constants.HF_HUB_OFFLINE:
        raise ValueError(
            f"--push-to-hub needs the hub, but HF_HUB_OFFLINE is set (offline): unset it, or train without "
            f"--push-to-hub and upload {output_dir} later with `hf upload {repo} {output_dir}`."
        )
    if get_token() is None:
        raise ValueError("--push-to-hub needs a hub token: run `hf auth login` or set HF_TOKEN, then start again.")
    return repo


def push_outputs(output_dir: str, hub_model_id: str | None) -> str:
    """Create the repository if needed and upload the outputs; returns the repository's URL."""
    from huggingface_hub import create_repo, upload_folder

    repo = hub_repo_id(output_dir, hub_model_id)
    try:
        url = create_repo(repo, exist_ok=True).repo_id
        upload_folder(repo_id=url, folder_path=output_dir, ignore_patterns=IGNORE, commit_message="controlnext train")
    except Exception as err:  # network, permissions: the run itself succeeded, say how to retry
        raise ValueError(
            f"training finished but the upload to {repo} failed ({str(err).splitlines()[0]}); retry with "
            f"`hf upload {repo} {output_dir}`."
        ) from None
    return f"https://huggingface.co/{url}"


def train_and_push(train: Callable[[Any], Any], cfg: Any) -> Any:
    """``train(cfg)``; with ``cfg.push_to_hub`` the upload is checked before and made after, by the main process."""
    if cfg.push_to_hub:
        check_push(cfg.output_dir, cfg.hub_model_id)  # before training: an upload that cannot work fails now
    result = train(cfg)
    if cfg.push_to_hub and os.environ.get("RANK", "0") == "0":  # one process of a launch uploads
        print(f"uploaded to {push_outputs(cfg.output_dir, cfg.hub_model_id)}")
    return result
