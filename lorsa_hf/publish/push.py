"""`push_folder`: a shipped Lorsa folder uploaded to the Hub, once it is known to load and its card to match."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..modeling_lorsa import LorsaForReplacement
from ..publishing import PublishError, check_sidecars, upload_folder


def check_loadable(folder: str | os.PathLike) -> LorsaForReplacement:
    """Load the Lorsa in `folder` and return it; `PublishError` unless it loads with exactly the weights its
    config asks for, all finite (`from_pretrained`'s own checks)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise PublishError(f"{folder} has no config.json: it is not a Lorsa folder (save one with save_pretrained).")
    try:
        return LorsaForReplacement.from_pretrained(folder)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
        raise PublishError(
            f"{folder} is not a loadable Lorsa: {error} Save the Lorsa again with save_pretrained, or rebuild the "
            "folder with `lorsa-hf ship`."
        ) from error


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    subfolder: str = "",
    token: bool | str | None = None,
) -> Any:
    """Upload the published files of `folder` (config.json, model.safetensors, training_recipe.json,
    results.json, README.md) to `repo_id` in one commit; refuse a folder whose Lorsa does not load, that lacks
    one of the files, or whose card's numbers are not those of its own results.json."""
    check_loadable(folder)
    files = check_sidecars(folder)
    return upload_folder(
        folder, repo_id, files, private=private, revision=revision, commit_message=commit_message,
        subfolder=subfolder, token=token,
    )


__all__ = ["check_loadable", "push_folder"]
