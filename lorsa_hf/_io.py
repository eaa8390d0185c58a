"""Atomic writes of checkpoint folders."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _umask_permissions(path: str | os.PathLike, mode: int = 0o777) -> None:
    """mkdtemp/mkstemp make their result private (0700/0600); give what is published the permissions a plain
    mkdir or open would (`mode` less the umask), so checkpoints and caches shared between users stay readable."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, mode & ~mask)


@contextlib.contextmanager
def atomic_write_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary file path beside `path`; on success that file replaces `path` in one rename, so readers
    never see a half-written file. On failure it is removed."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{target.name}.", suffix=target.suffix, dir=target.parent)
    os.close(handle)
    try:
        yield staging
        _umask_permissions(staging, 0o666)
        os.replace(staging, target)
    finally:
        if os.path.exists(staging):
            os.remove(staging)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    with atomic_write_path(path) as staging:
        Path(staging).write_text(text, encoding="utf-8")


@contextlib.contextmanager
def atomic_save_directory(directory: str | os.PathLike) -> Iterator[str]:
    """Yield a staging folder beside `directory`; on success it takes `directory`'s place in one rename.

    A process killed while writing leaves only a hidden staging folder, never a `directory` with half its
    files. Files already in `directory` that the new save does not write (a README, metrics) are kept.
    """
    target = Path(directory)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"Cannot save into {target}: it exists and is not a folder.")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.saving-", dir=target.parent))
    _umask_permissions(staging)
    try:
        yield str(staging)
        if not target.exists():
            os.replace(staging, target)
            return
        for entry in target.iterdir():
            if not (staging / entry.name).exists():
                if entry.is_dir():
                    shutil.copytree(entry, staging / entry.name)
                else:
                    shutil.copy2(entry, staging / entry.name)
        retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, retired / target.name)
        os.replace(staging, target)
        shutil.rmtree(retired, ignore_errors=True)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
