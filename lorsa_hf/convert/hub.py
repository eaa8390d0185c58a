"""Sources given as a local folder or as a Hub repo id (+ subfolder + revision), resolved to local files through
huggingface_hub (and its cache) so that offline use and private repos work as for any transformers model."""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import hf_hub_download, snapshot_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

from .foreign import CheckpointError


def is_local(source: str | os.PathLike) -> bool:
    return os.path.isdir(os.fspath(source))


def _hub_error(source: str, what: str, error: Exception) -> CheckpointError:
    if isinstance(error, HFValidationError):
        return CheckpointError(f"{source!r} is neither an existing local folder nor a valid Hub repo id.")
    return CheckpointError(
        f"Cannot fetch {what} of {source!r}: it is no local folder and the Hub answered: "
        f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''} "
        "(check the repo id, subfolder and revision, your token, or that the files are cached when offline)."
    )


def fetch_file(
    source: str | os.PathLike,
    filename: str,
    subfolder: str = "",
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    required: bool = False,
) -> Path | None:
    """Local path of `subfolder/filename` in a folder or Hub repo; None when the repo has no such file (an error
    when `required`)."""
    if is_local(source):
        path = Path(source, subfolder, filename)
        if path.is_file():
            return path
        if required:
            raise CheckpointError(f"{path} does not exist.")
        return None
    try:
        return Path(
            hf_hub_download(
                os.fspath(source),
                filename,
                subfolder=subfolder or None,
                revision=revision,
                cache_dir=cache_dir,
                token=token,
            )
        )
    except EntryNotFoundError as error:
        if required:
            raise _hub_error(os.fspath(source), filename, error) from error
        return None
    except (HFValidationError, HfHubHTTPError, LocalEntryNotFoundError, OSError) as error:
        raise _hub_error(os.fspath(source), filename, error) from error


def fetch_folder(
    source: str | os.PathLike,
    patterns: list[str],
    subfolder: str = "",
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
) -> Path:
    """Local folder for `source/subfolder`; for a Hub repo only the files matching `patterns` (relative to the
    subfolder) are downloaded."""
    if is_local(source):
        folder = Path(source, subfolder)
        if not folder.is_dir():
            raise CheckpointError(f"{folder} is not a folder; check the subfolder.")
        return folder
    prefix = f"{subfolder.strip('/')}/" if subfolder.strip("/") else ""
    try:
        snapshot = snapshot_download(
            os.fspath(source),
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            allow_patterns=[prefix + pattern for pattern in patterns],
        )
    except (HFValidationError, HfHubHTTPError, LocalEntryNotFoundError, OSError) as error:
        raise _hub_error(os.fspath(source), f"{prefix or 'the root'}", error) from error
    folder = Path(snapshot, subfolder)
    if not folder.is_dir():
        raise CheckpointError(
            f"Hub repo {os.fspath(source)!r} (revision {revision or 'main'}) has no Lorsa files under "
            f"{subfolder or 'its root'!r}; check the subfolder."
        )
    return folder


def split_source(source: str | os.PathLike, subfolder: str = "") -> tuple[str | os.PathLike, str]:
    """(source, subfolder), accepting llamascopium's `repo_id:subfolder` spelling of a Hub checkpoint."""
    if is_local(source) or not isinstance(source, str) or ":" not in source:
        return source, subfolder
    repo_id, inside = source.split(":", 1)
    return repo_id, "/".join(part for part in (subfolder.strip("/"), inside.strip("/")) if part)
