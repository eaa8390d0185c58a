"""`LorsaForReplacement.from_pretrained` refuses, by name, every folder that would load with random weights."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorsa_hf import LorsaForReplacement, LorsaLoadError, load_spliced
from tests.conftest import make_base, make_lorsa, tiny_llama_config


@pytest.fixture
def saved(tmp_path):
    make_lorsa(tiny_llama_config(), [0, 1]).save_pretrained(tmp_path)
    return tmp_path


def _edit_config(folder, **values):
    config = json.loads((folder / "config.json").read_text())
    config.update(values)
    (folder / "config.json").write_text(json.dumps(config))


def _edit_weights(folder, edit):
    weights = load_file(folder / "model.safetensors")
    edit(weights)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


def test_a_complete_folder_loads(saved):
    model, info = LorsaForReplacement.from_pretrained(saved, output_loading_info=True)
    assert info["missing_keys"] == set() and model.config.layers == [0, 1]


def test_a_folder_without_config_json_is_refused(saved):
    (saved / "config.json").unlink()
    with pytest.raises(LorsaLoadError, match="has no config.json"):
        LorsaForReplacement.from_pretrained(saved)


def test_a_missing_tensor_is_refused(saved):
    _edit_weights(saved, lambda weights: weights.pop("layers.1.W_O"))
    with pytest.raises(LorsaLoadError, match=r"missing \(they would be random\): layers.1.W_O"):
        LorsaForReplacement.from_pretrained(saved)


def test_a_renamed_tensor_is_refused(saved):
    _edit_weights(saved, lambda weights: weights.__setitem__("layers.1.W_out", weights.pop("layers.1.W_O")))
    with pytest.raises(LorsaLoadError, match="not part of this Lorsa: layers.1.W_out"):
        LorsaForReplacement.from_pretrained(saved)


def test_hand_edited_layers_are_refused(saved):
    _edit_config(saved, layers=[0, 2])
    with pytest.raises(LorsaLoadError, match="layers.2.W_Q.*not part of this Lorsa: layers.1"):
        LorsaForReplacement.from_pretrained(saved)


def test_use_qk_norm_without_norm_weights_is_refused(saved):
    _edit_config(saved, use_qk_norm=True)
    with pytest.raises(LorsaLoadError, match="q_norm_weight"):
        LorsaForReplacement.from_pretrained(saved)


def test_a_base_model_folder_given_as_the_lorsa_is_refused(tmp_path):
    base = make_base("llama")
    base.save_pretrained(tmp_path)
    with pytest.raises(LorsaLoadError, match="holds a 'llama' model, not a Lorsa"):
        LorsaForReplacement.from_pretrained(tmp_path)
    with pytest.raises(LorsaLoadError, match="not a Lorsa"):
        load_spliced(tmp_path, tmp_path)


def test_nan_weights_are_refused(saved):
    _edit_weights(saved, lambda weights: weights["layers.0.W_V"].view(-1)[3].fill_(float("nan")))
    with pytest.raises(LorsaLoadError, match="layers.0.W_V holds NaN"):
        LorsaForReplacement.from_pretrained(saved)


def test_integer_weights_are_refused(saved):
    _edit_weights(saved, lambda weights: weights.__setitem__("layers.0.b_O", weights["layers.0.b_O"].to(torch.int32)))
    with pytest.raises(LorsaLoadError, match="layers.0.b_O is I32"):
        LorsaForReplacement.from_pretrained(saved)
