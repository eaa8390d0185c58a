"""Atomic writes of checkpoint folders."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


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
