"""`lorsa-hf push` / `push_folder` / `LorsaForReplacement.push_to_hub`: what reaches the Hub, what is refused, and
that a pushed repo, once in the Hub cache, loads offline by repo id, subfolder and revision. Only the Hub's HTTP
API is replaced (tests/hub_recorder.py)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file

from lorsa_hf import LorsaForReplacement, load_spliced
from lorsa_hf.cli import main
from lorsa_hf.publish import push_folder
from lorsa_hf.publishing import PUBLISHED_FILES, PublishError
from tests.hub_recorder import write_hub_cache


def test_push_uploads_the_five_files_under_the_subfolder_on_the_branch(hub, shipped):
    push_folder(shipped, "me/tiny-lorsa", private=True, revision="v1", commit_message="ship it", subfolder="L0-2")
    assert hub.repos == ["me/tiny-lorsa"] and hub.repo_options[0]["private"] is True
    assert hub.branches == [("me/tiny-lorsa", "v1")]
    (commit,) = hub.commits
    assert commit["commit_message"] == "ship it" and commit["revision"] == "v1"
    assert sorted(commit["files"]) == sorted(f"L0-2/{name}" for name in PUBLISHED_FILES)
    for name in PUBLISHED_FILES:
        assert commit["files"][f"L0-2/{name}"] == (shipped / name).read_bytes()
    card = ModelCard(commit["files"]["L0-2/README.md"].decode())
    assert card.data.library_name == "lorsa_hf" and "lorsa" in card.data.tags


def test_push_to_hub_of_a_loaded_lorsa_uploads_the_same_files(hub, shipped):
    lorsa = LorsaForReplacement.from_pretrained(shipped)
    lorsa.push_to_hub("me/tiny-lorsa", commit_message="from memory")
    (commit,) = hub.commits
    assert sorted(commit["files"]) == sorted(PUBLISHED_FILES)
    for name in ("training_recipe.json", "results.json", "README.md"):
        assert commit["files"][name] == (shipped / name).read_bytes()


def test_the_cli_pushes_and_reports_the_commit(hub, shipped, capsys):
    assert main(["push", str(shipped), "me/tiny-lorsa", "--private", "--revision", "v2", "--subfolder", "s"]) == 0
    assert "pushed" in capsys.readouterr().out and hub.branches == [("me/tiny-lorsa", "v2")]
    assert sorted(hub.commits[0]["files"]) == sorted(f"s/{name}" for name in PUBLISHED_FILES)


def _copy(shipped, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(shipped, folder)
    return folder


def test_a_card_whose_numbers_are_not_its_results_is_refused(hub, shipped, tmp_path):
    folder = _copy(shipped, tmp_path)
    results = json.loads((folder / "results.json").read_text())
    results["reconstruction"]["0"]["fvu"] *= 0.5  # results.json changed after the card was written
    (folder / "results.json").write_text(json.dumps(results))
    with pytest.raises(PublishError, match="layer_0/fvu: card says .* results.json says"):
        push_folder(folder, "me/tiny-lorsa")
    assert main(["push", str(folder), "me/tiny-lorsa"]) == 2
    (folder / "results.json").unlink()
    with pytest.raises(PublishError, match="no results.json"):
        push_folder(folder, "me/tiny-lorsa")
    assert hub.commits == []


def test_a_folder_that_is_not_a_loadable_lorsa_is_refused(hub, shipped, tmp_path):
    folder = _copy(shipped, tmp_path)
    weights = load_file(folder / "model.safetensors")
    del weights["layers.2.W_O"]
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(PublishError, match="not a loadable Lorsa: .*layers.2.W_O"):
        push_folder(folder, "me/tiny-lorsa")
    (folder / "config.json").unlink()
    with pytest.raises(PublishError, match="no config.json"):
        push_folder(folder, "me/tiny-lorsa")
    with pytest.raises(PublishError, match="has no training_recipe.json"):
        push_folder(_strip(shipped, tmp_path, "training_recipe.json"), "me/tiny-lorsa")
    assert hub.commits == []


def _strip(shipped, tmp_path, name):
    folder = tmp_path / f"without-{name}"
    shutil.copytree(shipped, folder)
    (folder / name).unlink()
    return folder


def test_a_pushed_repo_loads_offline_from_the_hub_cache_by_id_subfolder_and_revision(
    hub, shipped, tmp_path, monkeypatch, base_model
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    push_folder(shipped, "me/tiny-lorsa", revision="v1", subfolder="L0-2")
    cache = tmp_path / "hub-cache"
    write_hub_cache(cache, "me/tiny-lorsa", hub.commits[0]["files"], revision="v1", commit="b" * 40)
    write_hub_cache(cache, "me/tiny-lorsa", {"README.md": b"main has no Lorsa"}, revision="main", commit="c" * 40)
    lorsa = LorsaForReplacement.from_pretrained("me/tiny-lorsa", subfolder="L0-2", revision="v1", cache_dir=cache)
    expected = LorsaForReplacement.from_pretrained(shipped)
    for name, value in expected.state_dict().items():
        assert torch.equal(lorsa.state_dict()[name], value)
    by_commit = LorsaForReplacement.from_pretrained(
        "me/tiny-lorsa", subfolder="L0-2", revision="b" * 40, cache_dir=cache
    )
    assert by_commit.config.layers == [0, 2]
    with pytest.raises(OSError):
        LorsaForReplacement.from_pretrained("me/tiny-lorsa", subfolder="L0-2", cache_dir=cache)  # not on main
    spliced = load_spliced(
        base_model, "me/tiny-lorsa", lorsa_subfolder="L0-2", lorsa_revision="v1", cache_dir=cache
    )
    from lorsa_hf import spliced_layers, unsplice

    assert spliced_layers(spliced) == [0, 2]
    unsplice(spliced)
