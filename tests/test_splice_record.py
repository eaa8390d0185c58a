"""Saving a spliced model writes the clean base model and the Lorsa beside it, and `load_spliced` brings it back."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from lorsa_hf import load_spliced, spliced_layers
from tests.conftest import VOCAB, make_base, make_lorsa

LAYERS = [0, 2]


def _ids() -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(_ids()).logits


def test_the_saved_folder_loads_as_the_clean_base_and_load_spliced_restores_the_splice(arch, tmp_path):
    model = make_base(arch)
    clean = _logits(model)
    make_lorsa(model.config, LAYERS).splice(model)
    spliced = _logits(model)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in (tmp_path / "lorsa").iterdir()) == ["config.json", "model.safetensors"]
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path).eval()), clean)
    restored = load_spliced(tmp_path).eval()
    assert spliced_layers(restored) == LAYERS
    assert torch.equal(_logits(restored), spliced)


def test_saving_into_the_folder_the_base_came_from_keeps_its_weights(tmp_path):
    make_base("llama").save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    clean = _logits(model)
    make_lorsa(model.config, LAYERS).splice(model).save_pretrained(tmp_path)
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path).eval()), clean)
    assert torch.equal(_logits(load_spliced(tmp_path).eval()), _logits(model))


def test_the_config_records_the_splice_until_it_is_undone(tmp_path):
    model = make_base("llama")
    lorsa = make_lorsa(model.config, LAYERS, top_k=5)
    lorsa.splice(model, layers=[2])
    assert model.config.lorsa_splice == [
        {"subfolder": "lorsa", "layers": [2], "n_ov_heads": 128, "top_k": 5, "activation": "topk_abs"}
    ]
    other = make_lorsa(model.config, [0], seed=1)
    other.splice(model)
    assert [(entry["subfolder"], entry["layers"]) for entry in model.config.lorsa_splice] == [
        ("lorsa-0", [0]), ("lorsa-1", [2])
    ]
    model.save_pretrained(tmp_path)
    assert torch.equal(_logits(load_spliced(tmp_path).eval()), _logits(model))
    lorsa.unsplice(model)
    other.unsplice(model)
    assert not hasattr(model.config, "lorsa_splice") and "save_pretrained" not in vars(model)


def test_a_save_of_the_unspliced_model_drops_the_old_lorsa_subfolders(tmp_path):
    model = make_base("llama")
    lorsa = make_lorsa(model.config, LAYERS)
    lorsa.splice(model).save_pretrained(tmp_path)
    other = make_lorsa(model.config, [1], seed=3)
    lorsa.unsplice(model)
    other.splice(model).save_pretrained(tmp_path)
    restored = load_spliced(tmp_path)
    assert spliced_layers(restored) == [1]


def test_a_state_dict_of_the_saved_base_reloads_into_the_spliced_model(tmp_path):
    model = make_base("gpt_neox")
    lorsa = make_lorsa(model.config, LAYERS)
    lorsa.splice(model)
    model.save_pretrained(tmp_path)
    state = AutoModelForCausalLM.from_pretrained(tmp_path).state_dict()
    with pytest.raises(RuntimeError, match="none of the trainable Lorsa spliced there"):
        model.load_state_dict(state, strict=False)
    lorsa.requires_grad_(False)
    result = model.load_state_dict(state, strict=False)
    assert result.unexpected_keys == [] and all(".lorsa." in key for key in result.missing_keys)


def test_load_spliced_without_a_lorsa_needs_a_recorded_splice(tmp_path):
    make_base("llama").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="records no splice"):
        load_spliced(tmp_path)
