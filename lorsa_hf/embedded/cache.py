"""The cache folder the embedded model and corpus are built into, and the lock that serialises those builds."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path


class EmbeddedAssetError(RuntimeError):
    """The embedded model or corpus cannot be found, fetched or built; the message says how to fix it."""


def default_cache_dir() -> Path:
    """`$LORSA_HF_CACHE` if set, else `~/.cache/lorsa_hf`."""
    env = os.environ.get("LORSA_HF_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lorsa_hf"


def resolve_cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    """`cache_dir` when given, else `default_cache_dir()`."""
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


@contextlib.contextmanager
def exclusive(cache: Path, name: str) -> Iterator[None]:
    """Serialise builds of `name` across processes (e.g. the ranks of `accelerate launch`); no-op without fcntl."""
    cache.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: the atomic rename alone still prevents half-written folders.
        yield
        return
    with open(cache / f".{name}.build.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def utc_now() -> str:
    """The current UTC time, ISO 8601 to the second (the manifests' `built_at`)."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
