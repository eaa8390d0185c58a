"""Initialisation from the base model's heads: exact with every head active, and a better start than random."""

from __future__ import annotations

import pytest
import torch

from lorsa_hf import LorsaConfig, LorsaForReplacement
from lorsa_hf.training import LorsaTrainer, recipe_from_dict
from lorsa_hf.training.activations import ActivationSource
from lorsa_hf.training.init import initialize_layer
from lorsa_hf.training.recipe import InitSection

from .conftest import ARCHITECTURES, make_model, tiny_recipe_dict

MHSA = {"qk": "base", "ov": "base", "b_o": "mean", "match_norm": True}


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("n_qk_heads,n_ov_heads", [(4, 32), (4, 64), (8, 64)])
def test_base_init_reproduces_the_attention_block_with_every_head_active(tokenizer, arch, n_qk_heads, n_ov_heads):
    """With K = n_ov the heads of a group sum to their base head's OV circuit (a Parseval frame when g >= hd).
    Grouped-query key/value heads are expanded to the query heads reading them; Qwen2's q/k/v biases and
    Qwen3's q/k norm gains (shared by its heads) are copied."""
    model = make_model(arch, tokenizer)
    config = LorsaConfig.from_base_config(
        model.config, [1], n_qk_heads=n_qk_heads, n_ov_heads=n_ov_heads, top_k=n_ov_heads
    )
    layer = LorsaForReplacement(config).layer(1)
    ids = torch.randint(3, len(tokenizer), (2, 20))
    attention = torch.ones_like(ids)
    acts = ActivationSource(model, [1])(ids, attention)[1]
    mask = torch.ones_like(ids, dtype=torch.bool)
    options = InitSection(qk="base", ov="base", b_o="mean")
    calibration = (acts.inputs, acts.outputs, mask, None)
    initialize_layer(layer, options, model, seed=0, calibration=calibration, top_k=n_ov_heads)
    with torch.no_grad():
        prediction = layer(acts.inputs).hidden_states
    torch.testing.assert_close(prediction, acts.outputs, atol=2e-5, rtol=1e-4)


def test_base_qk_needs_the_base_head_geometry(tokenizer):
    model = make_model("llama", tokenizer)
    layer = LorsaForReplacement(LorsaConfig.from_base_config(model.config, [0], d_qk_head=4, n_ov_heads=32)).layer(0)
    with pytest.raises(ValueError, match="d_qk_head is 4 but the base head dimension is 8.*init.qk: random"):
        initialize_layer(layer, InitSection(qk="base"), model, seed=0, calibration=None, top_k=8)


def test_base_qk_of_qwen3_needs_its_q_k_norm(tokenizer):
    """Qwen3 normalises q and k inside its attention: copying its heads needs a Lorsa QK-norm with its eps."""
    model = make_model("qwen3", tokenizer)
    for overrides, message in (
        ({"use_qk_norm": False}, "the base attention normalises q and k but lorsa.use_qk_norm is false"),
        ({"qk_norm_eps": 1e-5}, "lorsa.qk_norm_eps is 1e-05 but the base q/k norm's eps is 1e-06"),
    ):
        config = LorsaConfig.from_base_config(model.config, [0], n_ov_heads=32, **overrides)
        layer = LorsaForReplacement(config).layer(0)
        with pytest.raises(ValueError, match=message):
            initialize_layer(layer, InitSection(qk="base"), model, seed=0, calibration=None, top_k=8)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_mhsa_init_starts_at_lower_fvu_than_random(tiny_files, tmp_path, arch):
    fvu = {}
    for name, init in (("random", {}), ("mhsa", MHSA)):
        recipe = recipe_from_dict(tiny_recipe_dict(tiny_files, tmp_path / name, arch=arch, init=init))
        trainer = LorsaTrainer(recipe)
        fvu[name] = trainer.evaluate()["heldout/fvu"]
    assert fvu["mhsa"] < 0.75 * fvu["random"], fvu


def test_same_layer_same_init_whatever_else_is_trained(tiny_files, tmp_path):
    """Each layer draws from its own generator, so layer 1 starts equal alone or next to layer 0."""
    starts = []
    for layers in ([0, 1], [1]):
        values = tiny_recipe_dict(tiny_files, tmp_path / str(len(layers)), init=MHSA)
        values["lorsa"]["layers"] = layers
        starts.append(LorsaTrainer(recipe_from_dict(values)).lorsa.layer(1).state_dict())
    assert all(torch.equal(starts[0][k], starts[1][k]) for k in starts[0])


def test_from_pretrained_continues_from_a_saved_lorsa(tiny_files, tmp_path):
    """init.from_pretrained starts every layer at the saved weights (bf16 cast up), not at the MHSA init."""
    first = LorsaTrainer(recipe_from_dict(tiny_recipe_dict(tiny_files, tmp_path / "first", init=MHSA)))
    saved = first.lorsa
    with torch.no_grad():
        for parameter in saved.parameters():
            parameter.add_(torch.randn_like(parameter))
    saved.to(torch.bfloat16).save_pretrained(tmp_path / "saved")
    init = {**MHSA, "from_pretrained": str(tmp_path / "saved"), "freeze_qk": True}
    second = LorsaTrainer(recipe_from_dict(tiny_recipe_dict(tiny_files, tmp_path / "second", init=init)))
    for layer in (0, 1):
        started, expected = second.lorsa.layer(layer).state_dict(), saved.layer(layer).state_dict()
        assert all(torch.equal(started[k], expected[k].float()) for k in expected)
        assert not second.lorsa.layer(layer).W_Q.requires_grad and second.lorsa.layer(layer).W_V.requires_grad


@pytest.mark.parametrize(
    "lorsa,message",
    [
        ({"n_ov_heads": 32}, "n_ov_heads is 64 there but 32 in the recipe"),
        ({"layers": [0, 2]}, r"it has no layer \[2\]"),
        ({"activation": "topk_relu"}, "activation is 'topk_abs' there"),
    ],
)
def test_from_pretrained_refuses_a_lorsa_of_another_shape(tiny_files, tmp_path, lorsa, message):
    LorsaTrainer(recipe_from_dict(tiny_recipe_dict(tiny_files, tmp_path / "first"))).lorsa.save_pretrained(
        tmp_path / "saved"
    )
    values = tiny_recipe_dict(tiny_files, tmp_path / "second", init={"from_pretrained": str(tmp_path / "saved")})
    values["lorsa"].update(lorsa)
    with pytest.raises(ValueError, match=message):
        LorsaTrainer(recipe_from_dict(values))


def test_from_pretrained_refuses_a_lorsa_of_another_base_model(tiny_files, tmp_path):
    neox = LorsaTrainer(recipe_from_dict(tiny_recipe_dict(tiny_files, tmp_path / "neox", arch="gpt_neox")))
    neox.lorsa.save_pretrained(tmp_path / "saved")
    values = tiny_recipe_dict(tiny_files, tmp_path / "llama", init={"from_pretrained": str(tmp_path / "saved")})
    with pytest.raises(ValueError, match="base_model_type is 'gpt_neox' there but 'llama'"):
        LorsaTrainer(recipe_from_dict(values))
