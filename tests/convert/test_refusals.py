"""Corrupt, truncated, mismatched or unsupported inputs are refused with an error naming the problem."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorsa_hf import CheckpointError, convert_checkpoint
from lorsa_hf.convert.foreign import rotary_settings

from ..conftest import make_base
from .conftest import LAYER, copy_checkpoint


@dataclass
class NotATensor:
    """Pickled into a final.pth, it can only be loaded with unrestricted unpickling."""

    value: int = 1


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _edit_weights(folder: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(folder / "sae_weights.safetensors")
    edit(tensors)
    save_file(tensors, folder / "sae_weights.safetensors", metadata={"format": "pt"})


@pytest.fixture
def llamascopium(fixtures: Path, tmp_path: Path) -> Path:
    return copy_checkpoint(fixtures / "gpt_neox" / "lorsa_llamascopium_unfolded", tmp_path / "llamascopium")


@pytest.fixture
def paper_era(fixtures: Path, tmp_path: Path) -> Path:
    return copy_checkpoint(fixtures / "gpt_neox" / "lorsa_paper_era", tmp_path / "paper_era")


def _refused(folder: Path, base, match: str, **kwargs) -> None:
    with pytest.raises(CheckpointError, match=match):
        convert_checkpoint(folder, base, **kwargs)


def test_truncated_safetensors(llamascopium: Path, bases) -> None:
    file = llamascopium / "sae_weights.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    _refused(llamascopium, bases["gpt_neox"], "corrupt or truncated")


def test_truncated_and_garbage_final_pth(paper_era: Path, bases) -> None:
    file = paper_era / "final.pth"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    _refused(paper_era, bases["gpt_neox"], "corrupt or truncated")
    file.write_bytes(b"not a torch file at all")
    _refused(paper_era, bases["gpt_neox"], "corrupt or truncated")


def test_final_pth_needing_unrestricted_unpickling(paper_era: Path, bases) -> None:
    state_dict = torch.load(paper_era / "final.pth", weights_only=True)
    torch.save({**state_dict, "extra": NotATensor()}, paper_era / "final.pth")
    _refused(paper_era, bases["gpt_neox"], "unrestricted unpickling")


def test_truncated_config(llamascopium: Path, bases) -> None:
    text = (llamascopium / "config.json").read_text()
    (llamascopium / "config.json").write_text(text[: len(text) // 2])
    _refused(llamascopium, bases["gpt_neox"], "not valid JSON")


def test_missing_weights_file_and_tensor(llamascopium: Path, paper_era: Path, bases) -> None:
    _edit_weights(llamascopium, lambda tensors: tensors.pop("W_K"))
    _refused(llamascopium, bases["gpt_neox"], r"lacks \['W_K'\]")
    (paper_era / "final.pth").unlink()
    _refused(paper_era, bases["gpt_neox"], "no final.pth")


def test_config_and_weights_mismatch(llamascopium: Path, paper_era: Path, bases) -> None:
    _edit_config(llamascopium, n_qk_heads=8)
    _refused(llamascopium, bases["gpt_neox"], r"W_Q has shape \(4, 64, 16\).*implies \(8, 64, 16\)")
    _edit_config(paper_era, n_ov_heads=256)
    _refused(paper_era, bases["gpt_neox"], r"W_V has shape .*config implies")


def test_unexpected_tensor(llamascopium: Path, bases) -> None:
    _edit_weights(llamascopium, lambda tensors: tensors.update({"ln_q.w": torch.ones(4, 16)}))
    _refused(llamascopium, bases["gpt_neox"], "ln_q.w.*does not account for")


def test_non_finite_weights(llamascopium: Path, bases) -> None:
    def poison(tensors):
        tensors["W_V"][3, 5] = float("nan")

    _edit_weights(llamascopium, poison)
    _refused(llamascopium, bases["gpt_neox"], "W_V contains NaN")


def test_rotary_settings_that_do_not_match_the_stored_tables(llamascopium: Path, paper_era: Path, bases) -> None:
    _edit_config(llamascopium, rotary_base=500000)
    _refused(llamascopium, bases["gpt_neox"], "rotary tables differ")
    _edit_config(paper_era, rotary_adjacent_pairs=True)
    _refused(paper_era, bases["gpt_neox"], "rotary tables differ")


def test_missing_dataset_norm(llamascopium: Path, bases) -> None:
    _edit_weights(llamascopium, lambda tensors: tensors.pop("dataset_average_activation_norm.blocks.1.hook_attn_out"))
    _refused(llamascopium, bases["gpt_neox"], "lacks 'dataset_average_activation_norm.blocks.1.hook_attn_out'")


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"act_fn": "batchtopk"}, "act_fn 'batchtopk' is not supported"),
        ({"norm_activation": "token-wise"}, "norm_activation 'token-wise'"),
        ({"hook_point_in": "blocks.1.hook_resid_pre"}, "hook points .* are not supported"),
        ({"hook_point_out": "blocks.0.hook_attn_out"}, "name different layers"),
        ({"sae_type": "sae"}, "'sae' sparse dictionary, not a Lorsa"),
        ({"rotary_scale": 2}, "rotary_scale 2"),
        ({"use_post_qk_ln": True, "normalization_type": "LN"}, "normalization_type 'LN'"),
    ],
)
def test_unsupported_llamascopium_settings(llamascopium: Path, bases, changes: dict, match: str) -> None:
    _edit_config(llamascopium, **changes)
    _refused(llamascopium, bases["gpt_neox"], match)


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"mode": "default"}, "mode 'default'"),
        ({"virtual_kv_num": 4}, "virtual_kv_num 4"),
        ({"avg_norm": {"in": 0.0, "out": 1.0}}, "avg_norm\\['in'\\] is 0.0"),
        ({"layer": None}, "records no layer"),
    ],
)
def test_unsupported_paper_era_settings(paper_era: Path, bases, changes: dict, match: str) -> None:
    _edit_config(paper_era, **changes)
    _refused(paper_era, bases["gpt_neox"], match)


def test_paper_era_without_recorded_layer_takes_it_from_the_caller(paper_era: Path, bases) -> None:
    _edit_config(paper_era, layer=None)
    assert convert_checkpoint(paper_era, bases["gpt_neox"], layers=[LAYER]).lorsa.config.layers == [LAYER]


def test_wrong_layer_requested(llamascopium: Path, bases) -> None:
    _refused(llamascopium, bases["gpt_neox"], "trained for layer 1, not \\[0\\]", layers=[0])


def test_base_model_that_does_not_fit(llamascopium: Path, bases) -> None:
    narrow = make_base("gpt_neox", hidden_size=32, num_attention_heads=4)
    _refused(llamascopium, narrow, "d_model 64 but the base model .* hidden size 32")
    shallow = make_base("gpt_neox", num_hidden_layers=1)
    _refused(llamascopium, shallow, "replaces layer 1 but the base model .* has 1 layers")


def test_zero_gain_is_refused(llamascopium: Path, bases) -> None:
    base = make_base("gpt_neox")
    with torch.no_grad():
        base.gpt_neox.layers[LAYER].input_layernorm.weight[[3, 7]] = 0.0
    _refused(llamascopium, base, r"zero gain in dimensions \[3, 7\]")


def test_not_a_lorsa_folder(tmp_path: Path, bases) -> None:
    _refused(tmp_path / "missing", bases["gpt_neox"], "neither an existing local folder nor a valid Hub repo id")
    (tmp_path / "empty").mkdir()
    _refused(tmp_path / "empty", bases["gpt_neox"], "holds no Lorsa checkpoint")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    _refused(tmp_path / "other", bases["gpt_neox"], "neither a llamascopium Lorsa")


def test_native_folder_is_not_converted(tmp_path: Path, fixtures: Path, bases) -> None:
    converted = convert_checkpoint(fixtures / "gpt_neox" / "lorsa_paper_era", bases["gpt_neox"], tmp_path / "native")
    _refused(tmp_path / "native", bases["gpt_neox"], "already is a lorsa_hf checkpoint")
    assert converted.lorsa.config.layers == [LAYER]


def test_rotary_settings_parse_ntk_by_parts(tmp_path: Path) -> None:
    config = {
        "positional_embedding_type": "rotary",
        "rotary_dim": 16,
        "rotary_base": 500000,
        "rotary_adjacent_pairs": False,
        "use_NTK_by_parts_rope": True,
        "NTK_by_parts_factor": 8.0,
        "NTK_by_parts_low_freq_factor": 1.0,
        "NTK_by_parts_high_freq_factor": 4.0,
        "old_context_len": 8192,
    }
    rotary_dim, adjacent, rope = rotary_settings(config, 16, tmp_path)
    assert (rotary_dim, adjacent) == (16, False)
    assert rope == {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    with pytest.raises(CheckpointError, match="must be below"):
        rotary_settings({**config, "NTK_by_parts_low_freq_factor": 4.0}, 16, tmp_path)


def test_a_base_of_another_architecture_than_the_recorded_one(paper_era: Path, bases) -> None:
    """The paper-era fixture records model_name 'tiny-neox-open': a Llama base of the same width is refused."""
    _refused(paper_era, bases["llama"], r"trained on 'tiny-neox-open' \(a gpt_neox model.*a llama model")
    _edit_config(paper_era, model_name="EleutherAI/pythia-160m")
    _refused(paper_era, bases["llama"], r"trained on 'EleutherAI/pythia-160m'.*a llama model")
    assert convert_checkpoint(paper_era, bases["gpt_neox"]).lorsa.config.hidden_size == 64
