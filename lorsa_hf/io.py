"""Atomic writes of files and checkpoint folders.

A folder save writes everything into a hidden staging folder beside the target, then swaps the two in one
step (Linux `renameat2(RENAME_EXCHANGE)`), so a reader always finds a complete checkpoint under the target's
name. Savers of one target take turns through a lock file beside it, and each one removes the staging folders
that killed savers left behind. Where the exchange is not available (another OS, a file system without it), the
swap falls back to two renames under the same lock: savers stay safe, readers may miss the folder for an
instant.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fnmatch
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

# Files a save of model weights writes: a new save owns these names, so one it does not write again (an old
# shard, a `.bin` beside a new `.safetensors`) is removed rather than carried over and loaded
WEIGHT_FILE_PATTERNS = (
    "*.safetensors",
    "*.safetensors.index.json",
    "*.bin",
    "*.bin.index.json",
    "*.pt",
    "*.pth",
    "*.ckpt",
    "*.h5",
    "*.msgpack",
    "*.gguf",
)

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_NOT_SUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV}


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
    target = Path(os.path.realpath(path))
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
def folder_lock(target: Path) -> Iterator[None]:
    """Hold an exclusive lock on `.{name}.lock` beside `target` (POSIX `flock`; without it, no lock). The lock
    file is removed on release; a waiter that then finds it replaced takes the new one instead."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; saves there are atomic but not serialized
        yield
        return
    lock_path = target.parent / f".{target.name}.lock"
    while True:
        handle = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            same = os.path.samestat(os.fstat(handle), os.stat(lock_path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(handle)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(lock_path)
        os.close(handle)


def _exchange(first: Path, second: Path) -> bool:
    """Swap two existing paths in one step (Linux renameat2); False where the platform or file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in _NOT_SUPPORTED:
        return False
    raise OSError(code, f"Cannot swap {first} into place: {os.strerror(code)}", str(second))


def _remove_stale_staging(target: Path) -> None:
    """Remove what killed saves of `target` left beside it (only called under the target's lock)."""
    for pattern in (f".{target.name}.saving-*", f".{target.name}.old-*"):
        for stale in target.parent.glob(pattern):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)


def _carry_over(target: Path, staging: Path, owned: Iterable[str]) -> None:
    """Copy into `staging` what `target` holds and the new save did not write, except files the save owns."""
    owned = tuple(owned)
    for entry in target.iterdir():
        if (staging / entry.name).exists() or any(fnmatch.fnmatch(entry.name, pattern) for pattern in owned):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, staging / entry.name, symlinks=True)
        else:
            shutil.copy2(entry, staging / entry.name, follow_symlinks=False)


def _swap_into_place(staging: Path, target: Path) -> None:
    """Put `staging` at `target`; afterwards `staging` holds the old folder (or nothing)."""
    cwd = os.getcwd()
    if not target.exists():
        os.replace(staging, target)
    elif not _exchange(staging, target):
        retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, retired / target.name)
        os.replace(staging, target)
        os.replace(retired / target.name, staging)
        retired.rmdir()
    if cwd == str(target) or cwd.startswith(str(target) + os.sep):  # the process stood in the old folder
        os.chdir(cwd if os.path.isdir(cwd) else target)


@contextlib.contextmanager
def atomic_save_directory(
    directory: str | os.PathLike, owned: Iterable[str] = WEIGHT_FILE_PATTERNS
) -> Iterator[str]:
    """Yield a staging folder beside `directory`; on success it takes `directory`'s place in one exchange.

    A process killed while writing leaves only a hidden staging folder, removed by the next save, never a
    `directory` with half its files. Files already in `directory` that the new save does not write (a README,
    metrics) are kept, except those matching `owned` (weight files by default), so an old shard never loads
    beside new weights. A symlinked `directory` stays a link (the folder it points to is replaced), and `.`
    works (the process is moved into the new folder).
    """
    target = Path(os.path.realpath(directory))
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"Cannot save into {directory}: it exists and is not a folder.")
    if target.parent == target:
        raise ValueError(f"Cannot save into {directory}: the root of a file system cannot be replaced.")
    target.parent.mkdir(parents=True, exist_ok=True)
    with folder_lock(target):
        _remove_stale_staging(target)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.saving-", dir=target.parent))
        _umask_permissions(staging)
        try:
            yield str(staging)
            if target.exists():
                _carry_over(target, staging, owned)
            _swap_into_place(staging, target)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)


__all__ = ["WEIGHT_FILE_PATTERNS", "atomic_save_directory", "atomic_write_path", "atomic_write_text", "folder_lock"]
