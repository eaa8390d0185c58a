"""The layout the Llama-Scope-2 Lorsas are published in, `lorsa/{E}x/k{K}/layer{L}_lorsa_{E}x_k{K}/`: converted by
`lorsa-hf convert --subfolder`, loaded on the fly by `from_pretrained` and `load_spliced`, from a folder or from a
Hub repo id served by a Hugging Face cache on disk (offline), on the Qwen3 fixture (`qwen3/hub_repo/`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch

from lorsa_hf import CheckpointError, LorsaForReplacement, convert_checkpoint, load_spliced, spliced_layers
from lorsa_hf.cli import main
from tests.conftest import make_base

from .conftest import LAYER, copy_checkpoint, hub_cache

ATOL = 1e-4
SUBFOLDER = "lorsa/2x/k8"
LAYER_FOLDER = "layer1_lorsa_2x_k8"
REPO = "OpenMOSS-Team/Llama-Scope-2-Qwen3-tiny"
BASE_REPO = "Qwen/Qwen3-tiny"


@pytest.fixture
def published(fixtures: Path, tmp_path: Path) -> Path:
    """The fixture's published repo with a second layer folder (layer 0, the same weights claiming layer 0) and
    the transcoders' folder llamascopium publishes beside the Lorsas."""
    repo = tmp_path / "Llama-Scope-2-Qwen3-tiny"
    shutil.copytree(fixtures / "qwen3" / "hub_repo", repo)
    for file in repo.rglob("*"):
        file.chmod(0o755 if file.is_dir() else 0o644)
    layer0 = copy_checkpoint(repo / SUBFOLDER / LAYER_FOLDER, repo / SUBFOLDER / "layer0_lorsa_2x_k8")
    config = json.loads((layer0 / "config.json").read_text())
    config.update(hook_point_in="blocks.0.ln1.hook_normalized", hook_point_out="blocks.0.hook_attn_out")
    (layer0 / "config.json").write_text(json.dumps(config))
    (repo / "transcoder" / "2x").mkdir(parents=True)
    return repo


@pytest.fixture
def hub(fixtures: Path, published: Path, tmp_path: Path, monkeypatch) -> Path:
    """A Hugging Face cache holding the published repo and the base model, as HF_HUB_CACHE (offline)."""
    cache = tmp_path / "hub-cache"
    hub_cache(cache, REPO, {"": published})
    hub_cache(cache, BASE_REPO, {"": fixtures / "base" / "qwen3"})
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def _output(lorsa: LorsaForReplacement, recorded: dict[str, torch.Tensor], layer: int = LAYER):
    with torch.no_grad():
        return lorsa(recorded["hf_attn_in"], layer=layer, output_activations=True)


def _assert_reproduces(lorsa: LorsaForReplacement, recorded: dict[str, torch.Tensor]) -> None:
    """The recorded Lorsa output, activations and active set (relations R1, R2 of the fixtures README)."""
    output = _output(lorsa, recorded)
    torch.testing.assert_close(output.hidden_states, recorded["lorsa_out_llamascopium"], atol=ATOL, rtol=0)
    active = torch.zeros_like(recorded["lorsa_acts"], dtype=torch.bool).scatter(-1, output.top_k_indices, True)
    assert torch.equal(active, recorded["lorsa_acts"] != 0)
    torch.testing.assert_close(output.activations(), recorded["lorsa_acts"], atol=ATOL, rtol=0)


def test_convert_every_layer_folder_under_the_subfolder(published: Path, io, bases) -> None:
    recorded = io["qwen3"]
    conversion = convert_checkpoint(published, bases["qwen3"], subfolder=SUBFOLDER)
    lorsa = conversion.lorsa
    assert lorsa.config.layers == [0, 1] and lorsa.config.base_model_type == "qwen3"
    assert lorsa.config.use_qk_norm and lorsa.config.rope_parameters["rope_theta"] == 1000000
    _assert_reproduces(lorsa, recorded)
    alone = convert_checkpoint(published / SUBFOLDER / "layer0_lorsa_2x_k8", bases["qwen3"]).lorsa
    torch.testing.assert_close(_output(lorsa, recorded, 0).hidden_states, _output(alone, recorded, 0).hidden_states)

    layer_report = conversion.report.layers[1]
    assert layer_report.source == str(published / SUBFOLDER / LAYER_FOLDER)
    assert layer_report.input_scale == layer_report.output_scale == 1.0  # norm_activation 'inference'
    assert "stored norms ignored" in layer_report.dataset_norm
    assert "trained on 'tiny-random-qwen3-open' (as its lm_config.json records)" in layer_report.notes


def test_cli_convert_with_subfolder_and_layer(fixtures: Path, published: Path, io, tmp_path: Path, capsys) -> None:
    base = str(fixtures / "base" / "qwen3")
    everything, one = tmp_path / "all", tmp_path / "one"
    assert main(["convert", str(published), str(everything), "--base", base, "--subfolder", SUBFOLDER]) == 0
    assert LorsaForReplacement.from_pretrained(everything).config.layers == [0, 1]
    assert main(["convert", str(published), str(one), "--base", base, "--subfolder", SUBFOLDER, "--layer", "1"]) == 0
    assert "layer 1: llamascopium checkpoint" in capsys.readouterr().out
    reloaded = LorsaForReplacement.from_pretrained(one)
    assert reloaded.config.layers == [1]
    _assert_reproduces(reloaded, io["qwen3"])


def test_from_pretrained_converts_the_published_layout_on_the_fly(fixtures: Path, published: Path, hub, io) -> None:
    local = LorsaForReplacement.from_pretrained(published, subfolder=SUBFOLDER, base_model=fixtures / "base" / "qwen3")
    assert local.config.layers == [0, 1]
    _assert_reproduces(local, io["qwen3"])
    by_id = LorsaForReplacement.from_pretrained(REPO, subfolder=SUBFOLDER, base_model=BASE_REPO, layers=[1])
    assert by_id.config.layers == [1] and by_id.config.base_model_name_or_path == BASE_REPO
    _assert_reproduces(by_id, io["qwen3"])


def test_load_spliced_from_the_hub_cache_reproduces_the_spliced_logits(hub, io) -> None:
    """The README's three lines, with the tiny fixture in place of Qwen3-1.7B and its Llama-Scope-2 Lorsas."""
    recorded = io["qwen3"]
    model = load_spliced(BASE_REPO, REPO, lorsa_subfolder=SUBFOLDER, layers=[1], attn_implementation="eager")
    assert spliced_layers(model) == [1]
    with torch.no_grad():
        logits = model(recorded["tokens"]).logits
    torch.testing.assert_close(logits, recorded["hf_spliced_logits"], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits.log_softmax(-1), recorded["spliced_logits"].log_softmax(-1), atol=ATOL, rtol=0)
    assert len(model.model.layers[1].self_attn.lorsa.b_O) == 64
    assert sorted(p.name for p in (hub / f"models--{REPO.replace('/', '--')}").glob("snapshots/*/lorsa/2x/k8/*"))


def test_a_layer_folder_without_weights_is_named(published: Path, bases) -> None:
    (published / SUBFOLDER / "layer0_lorsa_2x_k8" / "sae_weights.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"layer0_lorsa_2x_k8 has a llamascopium config.json but no sae_weights"):
        convert_checkpoint(published, bases["qwen3"], subfolder=SUBFOLDER)
    assert convert_checkpoint(published, bases["qwen3"], subfolder=SUBFOLDER, layers=[1]).lorsa.config.layers == [1]


def test_a_subfolder_without_layer_folders_points_one_level_down(published: Path, bases) -> None:
    with pytest.raises(CheckpointError, match=r"lorsa/2x holds no Lorsa checkpoint.*one level further down, in k8"):
        convert_checkpoint(published, bases["qwen3"], subfolder="lorsa/2x")
    with pytest.raises(CheckpointError, match=r"transcoder/2x holds no Lorsa checkpoint"):
        convert_checkpoint(published, bases["qwen3"], subfolder="transcoder/2x")


def test_a_base_model_of_another_hidden_size_is_named(published: Path) -> None:
    narrow = make_base("qwen3", hidden_size=32, intermediate_size=64)
    with pytest.raises(CheckpointError, match="trained for d_model 64 but the base model .* has hidden size 32"):
        convert_checkpoint(published, narrow, subfolder=SUBFOLDER)
