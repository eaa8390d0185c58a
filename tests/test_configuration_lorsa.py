"""LorsaConfig: validated at construction, derived from base configs, saved and loaded through the Auto classes."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoConfig, AutoModel, GPT2Config

from lorsa_hf import LorsaConfig, LorsaForReplacement
from tests.conftest import BASE_CONFIGS, make_lorsa, tiny_gpt_neox_config, tiny_llama_config


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("n_ov_heads", 130, "n_ov_heads: must be divisible by n_qk_heads"),
        ("top_k", 200, "top_k: must be at most n_ov_heads"),
        ("top_k", 0, "top_k: must be a positive integer"),
        ("activation", "relu", "activation: must be one of"),
        ("attn_scale", -1.0, "attn_scale: must be positive"),
        ("rotary_dim", 3, "rotary_dim: must be an even number"),
        ("rotary_dim", 64, "rotary_dim: must be an even number between 0 and d_qk_head"),
        ("layers", [5], "layers: index 5 is out of range for a base model with 3 layers"),
        ("layers", [1, 1], "layers: must be a non-empty list of distinct"),
        ("d_qk_head", 0, "d_qk_head: must be a positive integer"),
    ],
)
def test_invalid_values_raise_naming_the_field(field, value, message):
    values = dict(hidden_size=64, num_hidden_layers=3, n_ov_heads=128, n_qk_heads=4, d_qk_head=16, top_k=8)
    values[field] = value
    with pytest.raises(ValueError, match=f"LorsaConfig.{message}"):
        LorsaConfig(**values)


def test_from_base_config_gpt_neox_uses_the_paper_defaults():
    config = LorsaConfig.from_base_config(tiny_gpt_neox_config(), layers=[2])
    assert config.base_model_type == "gpt_neox"
    assert (config.hidden_size, config.num_hidden_layers, config.layers) == (64, 3, [2])
    assert (config.n_qk_heads, config.d_qk_head) == (4, 16)  # as many groups as base heads, base head dim
    assert config.n_ov_heads == 8 * 64
    assert config.top_k == 64
    assert config.rotary_dim == 4  # rotary_pct 0.25 of 16
    assert config.attn_scale == math.sqrt(16)
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}


def test_from_base_config_llama_keeps_llama3_scaling_and_caps_top_k():
    config = LorsaConfig.from_base_config(tiny_llama_config(), layers=1, n_ov_heads=32)
    assert config.layers == [1] and config.top_k == 32
    assert (config.base_num_attention_heads, config.base_num_key_value_heads, config.base_head_dim) == (4, 2, 16)
    assert config.rotary_dim == 16
    assert config.rope_parameters["rope_type"] == "llama3" and config.rope_parameters["factor"] == 8.0


@pytest.mark.parametrize(
    "arch, qk_norm, rope_theta", [("qwen3", True, 1e6), ("qwen2", False, 10000.0), ("mistral", False, 10000.0)]
)
def test_from_base_config_of_the_grouped_query_architectures(arch, qk_norm, rope_theta):
    """Qwen3 normalises q and k inside its attention, so its Lorsa does too by default (with the base's eps)."""
    config = LorsaConfig.from_base_config(BASE_CONFIGS[arch](rms_norm_eps=1e-5), layers=[0, 2])
    assert config.base_model_type == arch and config.layers == [0, 2]
    assert (config.base_num_attention_heads, config.base_num_key_value_heads, config.base_head_dim) == (4, 2, 16)
    assert (config.n_qk_heads, config.d_qk_head, config.rotary_dim, config.n_ov_heads) == (4, 16, 16, 512)
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": rope_theta}
    assert config.use_qk_norm is qk_norm
    assert config.qk_norm_eps == (1e-5 if qk_norm else 1e-6)
    assert LorsaConfig.from_base_config(BASE_CONFIGS[arch](), layers=[0], use_qk_norm=False).use_qk_norm is False


def test_from_base_config_rotates_the_same_fraction_of_a_wider_qk_head():
    assert LorsaConfig.from_base_config(tiny_gpt_neox_config(), layers=[0], d_qk_head=64).rotary_dim == 16
    assert LorsaConfig.from_base_config(tiny_llama_config(), layers=[0], d_qk_head=32).rotary_dim == 32


def test_from_base_config_refuses_an_unsupported_architecture():
    with pytest.raises(ValueError, match="Unsupported base architecture 'gpt2'"):
        LorsaConfig.from_base_config(GPT2Config(), layers=[0])


def test_save_and_load_through_the_auto_classes_is_exact(tmp_path):
    lorsa = make_lorsa(tiny_llama_config(), [0, 2], use_qk_norm=True, activation="topk_relu")
    lorsa.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "lorsa" and saved["top_k"] == 8 and saved["layers"] == [0, 2]

    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, LorsaConfig) and config.top_k == 8 and config.activation == "topk_relu"
    loaded = AutoModel.from_pretrained(tmp_path)
    assert isinstance(loaded, LorsaForReplacement)
    expected = lorsa.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    x = torch.randn(1, 5, 64)
    assert torch.equal(loaded(x, layer=2).hidden_states, lorsa(x, layer=2).hidden_states)


def test_a_saved_config_with_invalid_values_is_refused_on_load(tmp_path):
    make_lorsa(tiny_llama_config(), [0]).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["top_k"] = 10_000
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="LorsaConfig.top_k"):
        AutoModel.from_pretrained(tmp_path)


def test_a_killed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    target = tmp_path / "lorsa"
    first = make_lorsa(tiny_llama_config(), [0], seed=1)
    first.save_pretrained(target)
    (target / "README.md").write_text("model card")

    second = make_lorsa(tiny_llama_config(), [0], seed=2)
    import transformers.modeling_utils

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing weights")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        second.save_pretrained(target)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lorsa"]  # no staging folder left behind
    reloaded = LorsaForReplacement.from_pretrained(target)
    assert torch.equal(reloaded.layer(0).W_O, first.layer(0).W_O)

    second.save_pretrained(target)
    assert torch.equal(LorsaForReplacement.from_pretrained(target).layer(0).W_O, second.layer(0).W_O)
    assert (target / "README.md").read_text() == "model card"  # files the save does not write are kept


def test_a_saved_checkpoint_gets_the_usual_folder_permissions(tmp_path):
    import os
    import stat

    make_lorsa(tiny_llama_config(), [0]).save_pretrained(tmp_path / "lorsa")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "lorsa").stat().st_mode) == 0o777 & ~mask


def test_config_validates_implementation_and_cache_format():
    with pytest.raises(ValueError, match="LorsaConfig.implementation"):
        LorsaConfig(implementation="fast")
    with pytest.raises(ValueError, match="LorsaConfig.cache_format"):
        LorsaConfig(cache_format="x")
    assert LorsaConfig().implementation == "sparse"

@pytest.mark.parametrize(
    "field, value, message",
    [
        ("use_qk_norm", "false", "use_qk_norm: must be true or false"),
        ("rotary_adjacent_pairs", 1, "rotary_adjacent_pairs: must be true or false"),
        ("top_k", 2.5, "top_k: must be an integer"),
        ("top_k", True, "top_k: must be an integer"),
        ("hidden_size", "64", "hidden_size: must be an integer"),
        ("qk_norm_eps", "1e-6", "qk_norm_eps: must be a number"),
        ("layers", [0.0], "layers: must be a list of integer layer indices"),
        ("rope_parameters", "default", "rope_parameters: must be a dict"),
        ("activation", None, "activation: must be a string"),
    ],
)
def test_values_of_the_wrong_type_raise_naming_the_field(field, value, message):
    values = dict(hidden_size=64, num_hidden_layers=3, n_ov_heads=128, n_qk_heads=4, d_qk_head=16, top_k=8)
    values[field] = value
    with pytest.raises(TypeError, match=f"LorsaConfig.{message}"):
        LorsaConfig(**values)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("qk_norm_eps", -1.0, "qk_norm_eps: must be positive and finite"),
        ("qk_norm_eps", float("nan"), "qk_norm_eps: must be positive and finite"),
        ("attn_scale", float("inf"), "attn_scale: must be positive and finite"),
        ("initializer_range", -0.02, "initializer_range: must be a finite number >= 0"),
        ("base_num_attention_heads", 0, "base_num_attention_heads: must be a positive integer"),
        ("rope_parameters", {"rope_type": "default", "rope_theta": -1.0}, "rope_parameters: rope_theta must be"),
    ],
)
def test_values_out_of_range_raise_naming_the_field(field, value, message):
    values = dict(hidden_size=64, num_hidden_layers=3, n_ov_heads=128, n_qk_heads=4, d_qk_head=16, top_k=8)
    values[field] = value
    with pytest.raises(ValueError, match=f"LorsaConfig.{message}"):
        LorsaConfig(**values)


def test_unknown_keyword_arguments_are_refused_with_a_hint():
    with pytest.raises(TypeError, match=r"unknown argument\(s\) 'n_ov_head' \(did you mean 'n_ov_heads'\?\)"):
        LorsaConfig(n_ov_head=256)


def test_a_value_assigned_after_construction_is_checked_on_save(tmp_path):
    config = LorsaConfig(hidden_size=64, num_hidden_layers=3, n_ov_heads=128, n_qk_heads=4, d_qk_head=16, top_k=8)
    config.use_qk_norm = "false"
    with pytest.raises(TypeError, match="use_qk_norm"):
        config.save_pretrained(tmp_path)


@pytest.mark.parametrize("field", ["top_k", "rope_parameters", "layers"])
def test_a_saved_config_missing_a_field_is_refused_on_load(tmp_path, field):
    make_lorsa(tiny_llama_config(), [0]).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config[field]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"config.json lacks {field}"):
        LorsaConfig.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=f"config.json lacks {field}"):
        AutoConfig.from_pretrained(tmp_path)


def test_a_saved_config_round_trips_exactly(tmp_path):
    config = make_lorsa(tiny_llama_config(), [0, 2], use_qk_norm=True, qk_norm_eps=1e-5).config
    config.save_pretrained(tmp_path)
    assert LorsaConfig.from_pretrained(tmp_path).to_dict() == config.to_dict()
