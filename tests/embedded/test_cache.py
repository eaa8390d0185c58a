"""The cache folder of the embedded assets and the lock around their builds."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorsa_hf.embedded import cache


def test_cache_folder_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LORSA_HF_CACHE", str(tmp_path / "elsewhere"))
    assert cache.default_cache_dir() == tmp_path / "elsewhere"
    assert cache.resolve_cache_dir(None) == tmp_path / "elsewhere"
    assert cache.resolve_cache_dir(tmp_path / "given") == tmp_path / "given"
    monkeypatch.delenv("LORSA_HF_CACHE")
    assert cache.default_cache_dir() == Path.home() / ".cache" / "lorsa_hf"


def test_exclusive_creates_the_cache_and_a_lock_file_per_asset(tmp_path: Path) -> None:
    folder = tmp_path / "new" / "cache"
    with cache.exclusive(folder, "SmolLM2-135M"):
        assert folder.is_dir()
    with cache.exclusive(folder, "SmolLM2-135M"):  # released: a second build of the same asset may take it
        pass
    assert sorted(p.name for p in folder.iterdir()) == [".SmolLM2-135M.build.lock"]


def test_sha256_file(tmp_path: Path) -> None:
    path = tmp_path / "data.bin"
    path.write_bytes(b"abc")
    assert cache.sha256_file(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
