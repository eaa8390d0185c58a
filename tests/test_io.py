"""Atomic folder saves: the target always holds one complete save, and nothing of an older save loads."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch

from lorsa_hf import LorsaForReplacement
from lorsa_hf.io import atomic_save_directory, atomic_write_text
from tests.conftest import make_lorsa, tiny_llama_config


def _save_text(folder: Path, text: str) -> None:
    with atomic_save_directory(folder) as staging:
        Path(staging, "a.txt").write_text(text)
        Path(staging, "b.txt").write_text(text)


def _same_weights(first: LorsaForReplacement, second: LorsaForReplacement) -> bool:
    ours, theirs = first.state_dict(), second.state_dict()
    return ours.keys() == theirs.keys() and all(torch.equal(ours[key], theirs[key]) for key in ours)


def test_a_smaller_sharded_save_replaces_every_weight_file_of_the_one_before(tmp_path):
    first, second = (make_lorsa(tiny_llama_config(), [0, 1], seed=seed) for seed in (0, 1))
    first.save_pretrained(tmp_path)
    second.save_pretrained(tmp_path, max_shard_size="20KB")
    assert not (tmp_path / "model.safetensors").exists()
    assert _same_weights(LorsaForReplacement.from_pretrained(tmp_path), second)
    first.save_pretrained(tmp_path)  # and back: no shard index or shard of the sharded save is left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert _same_weights(LorsaForReplacement.from_pretrained(tmp_path), first)


def test_files_the_save_does_not_own_are_kept(tmp_path):
    _save_text(tmp_path / "run", "one")
    (tmp_path / "run" / "README.md").write_text("notes")
    _save_text(tmp_path / "run", "two")
    assert (tmp_path / "run" / "README.md").read_text() == "notes"
    assert (tmp_path / "run" / "a.txt").read_text() == "two"


def test_a_failed_save_leaves_the_previous_one_and_no_staging_folder(tmp_path):
    _save_text(tmp_path / "run", "one")
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_save_directory(tmp_path / "run") as staging:
            Path(staging, "a.txt").write_text("half")
            raise RuntimeError("killed")
    assert (tmp_path / "run" / "a.txt").read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_staging_folders_of_killed_saves_are_removed_by_the_next_save(tmp_path):
    for stale in (".run.saving-abc123", ".run.old-def456"):
        (tmp_path / stale / "big").mkdir(parents=True)
    (tmp_path / ".other.saving-keep").mkdir()
    _save_text(tmp_path / "run", "one")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.saving-keep", "run"]


def test_readers_always_find_a_complete_save_while_it_is_replaced(tmp_path):
    folder = tmp_path / "run"
    _save_text(folder, "0")
    misses, done = [], threading.Event()

    def read() -> None:
        while not done.is_set():
            try:
                (folder / "a.txt").read_text()
            except FileNotFoundError:
                misses.append("missing")

    reader = threading.Thread(target=read)
    reader.start()
    for step in range(1, 60):
        _save_text(folder, str(step))
    done.set()
    reader.join()
    assert misses == []
    assert (folder / "a.txt").read_text() == "59"


def test_concurrent_savers_take_turns(tmp_path):
    folder = tmp_path / "run"
    errors = []

    def save(tag: str) -> None:
        try:
            for step in range(15):
                _save_text(folder, f"{tag}{step}")
        except Exception as error:  # noqa: BLE001 - the test reports any failure of either saver
            errors.append(error)

    savers = [threading.Thread(target=save, args=(tag,)) for tag in "xy"]
    for saver in savers:
        saver.start()
    for saver in savers:
        saver.join()
    assert errors == []
    assert (folder / "a.txt").read_text() == (folder / "b.txt").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_saving_into_the_current_folder_works_and_leaves_the_process_in_it(tmp_path, monkeypatch):
    folder = tmp_path / "run"
    _save_text(folder, "one")
    monkeypatch.chdir(folder)
    lorsa = make_lorsa(tiny_llama_config(), [0])
    lorsa.save_pretrained(".")
    assert Path(os.getcwd()) == folder and Path("config.json").is_file()
    assert _same_weights(LorsaForReplacement.from_pretrained("."), lorsa)
    assert Path("a.txt").read_text() == "one"


def test_a_symlinked_target_stays_a_link_to_the_new_save(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    _save_text(tmp_path / "link", "one")
    assert (tmp_path / "link").is_symlink()
    assert (tmp_path / "real" / "a.txt").read_text() == "one"
    atomic_write_text(tmp_path / "link" / "a.txt", "two")
    assert (tmp_path / "real" / "a.txt").read_text() == "two"


def test_a_file_in_the_way_is_refused_by_name(tmp_path):
    (tmp_path / "run").write_text("not a folder")
    with pytest.raises(NotADirectoryError, match="is not a folder"):
        _save_text(tmp_path / "run", "one")
