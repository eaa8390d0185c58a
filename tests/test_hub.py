"""Publishing with push_to_hub; only the Hub's HTTP API is replaced by a recorder (tests/hub_recorder.py)."""

from __future__ import annotations

from safetensors.torch import load_file

from tests.conftest import make_lorsa, tiny_llama_config


def test_push_to_hub_uploads_config_and_safetensors(hub, tmp_path):
    lorsa = make_lorsa(tiny_llama_config(), [1])
    lorsa.push_to_hub("me/tiny-lorsa", commit_message="first Lorsa")
    assert hub.repos == ["me/tiny-lorsa"]
    (commit,) = hub.commits
    assert commit["repo_id"] == "me/tiny-lorsa" and commit["commit_message"] == "first Lorsa"
    assert {"config.json", "model.safetensors"} <= set(commit["files"])
    (tmp_path / "model.safetensors").write_bytes(commit["files"]["model.safetensors"])
    assert set(load_file(tmp_path / "model.safetensors")) == {
        f"layers.1.{name}" for name in ("W_Q", "b_Q", "W_K", "b_K", "W_V", "b_V", "W_O", "b_O")
    }


def test_save_pretrained_with_push_to_hub_saves_locally_then_uploads(hub, tmp_path):
    lorsa = make_lorsa(tiny_llama_config(), [1])
    lorsa.save_pretrained(tmp_path / "tiny-lorsa", push_to_hub=True, commit_message="from a folder")
    assert (tmp_path / "tiny-lorsa" / "model.safetensors").exists()
    assert hub.repos == ["tiny-lorsa"]
    assert hub.commits[0]["commit_message"] == "from a folder"
