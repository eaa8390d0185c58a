"""Recipe files: bundled recipes load; unknown keys, wrong types and impossible combinations fail clearly."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from lorsa_hf.configuration_lorsa import LorsaConfig
from lorsa_hf.training.recipe import LorsaSection, RecipeError, load_recipe, recipe_from_dict

MINIMAL = {"lorsa": {"layers": [0]}, "training": {"max_steps": 10}}


@pytest.mark.parametrize("name", ["smollm2-135m", "pythia-160m", "llama-3.1-8b"])
def test_bundled_recipes_validate(name):
    recipe = load_recipe(name)
    assert recipe.name == name
    assert recipe.total_steps > 0
    assert recipe.init.qk == "base" and recipe.init.ov == "base"


def test_pythia_recipe_is_the_paper_era_setup():
    recipe = load_recipe("pythia-160m")
    assert recipe.lorsa.layers == list(range(12))
    assert (recipe.lorsa.n_ov_heads, recipe.lorsa.top_k, recipe.training.clip_grad_norm) == (6144, 64, 0.15)
    assert recipe.training.total_tokens == 800_000_000
    assert load_recipe("llama-3.1-8b").training.distribute == "layers"


def test_overrides_are_parsed_as_yaml():
    recipe = load_recipe("smollm2-135m", ["training.lr=3e-3", "lorsa.layers=[1, 2]", "data.batch_size=4"])
    assert recipe.training.lr == 3e-3
    assert recipe.lorsa.layers == [1, 2]
    assert recipe.data.batch_size == 4


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({**MINIMAL, "trainig": {}}, "Unknown recipe key 'trainig'. Did you mean 'training'?"),
        ({**MINIMAL, "training": {"max_steps": 10, "learning_rate": 1}}, "Unknown recipe key 'training.learning_rate'"),
        ({**MINIMAL, "lorsa": {"layers": [0], "topk": 8}}, "Did you mean 'top_k'?"),
        ({**MINIMAL, "training": {"max_steps": 10, "lr": "fast"}}, "training.lr must be a number, got 'fast'"),
        ({**MINIMAL, "training": {"max_steps": 10, "k_anneal": "cubic"}}, "training.k_anneal must be one of"),
        ({**MINIMAL, "training": {"max_steps": 10, "total_tokens": 100}}, "exactly one of training.total_tokens"),
        ({"lorsa": {}, "training": {"max_steps": 10}}, "Set lorsa.layers"),
        ({**MINIMAL, "data": {"source": "hf"}}, "set data.path"),
        ({**MINIMAL, "data": {"batch_size": 0}}, "data.batch_size must be positive"),
        ({**MINIMAL, "data": {"epochs": 0}}, "data.epochs must be positive"),
        ({**MINIMAL, "init": {"qk": "copy"}}, "init.qk must be one of ['random', 'base']"),
        ({**MINIMAL, "data": "embedded"}, "Recipe section 'data' must be a mapping"),
        ({**MINIMAL, "lorsa": {"layers": [0], "top_k": "64"}}, "lorsa.top_k must be an integer, got '64'"),
        ({**MINIMAL, "lorsa": {"layers": [0], "activation": "relu"}}, "lorsa.activation must be one of"),
        ({**MINIMAL, "lorsa": {"layers": "all"}}, "lorsa.layers must be a layer index or a non-empty list"),
        ({**MINIMAL, "training": {"max_steps": 10, "clip_grad_norm": -0.15}}, "clip_grad_norm must be a positive"),
        ({**MINIMAL, "training": {"max_steps": 10, "clip_grad_norm": 0}}, "clip_grad_norm must be a positive"),
        ({**MINIMAL, "training": {"max_steps": 10, "lr": float("nan")}}, "training.lr must be"),
        ({**MINIMAL, "training": {"max_steps": 10, "aux_loss_coef": -1}}, "aux_loss_coef must be a number >= 0"),
        ({**MINIMAL, "training": {"max_steps": 10, "dead_tokens": 0}}, "training.dead_tokens must be positive"),
        ({**MINIMAL, "training": {"max_steps": 10, "k_initial": -4}}, "training.k_initial must be positive"),
        ({**MINIMAL, "training": {"max_steps": 10, "eval_sequences": 0}}, "training.eval_sequences must be positive"),
        ({**MINIMAL, "lorsa": {"layers": [0], "use_qk_norm": "false"}}, "lorsa.use_qk_norm must be true or false"),
    ],
)
def test_invalid_recipes_name_the_problem(values, message):
    with pytest.raises(RecipeError) as error:
        recipe_from_dict(values)
    assert message in str(error.value)


def test_yaml_and_toml_files(tmp_path):
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({**MINIMAL, "training": {"max_steps": 10, "lr": 1}}))
    assert load_recipe(tmp_path / "r.yaml").training.lr == 1.0
    (tmp_path / "r.toml").write_text('[lorsa]\nlayers = [2]\n[training]\ntotal_tokens = 1000\n[data]\nbatch_size = 2\n')
    recipe = load_recipe(tmp_path / "r.toml")
    assert recipe.lorsa.layers == [2] and recipe.total_steps == 2  # ceil(1000 / (2 * 256))
    (tmp_path / "bad.yaml").write_text("training: {max_steps: 10, lr: [}\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(tmp_path / "bad.yaml")
    with pytest.raises(RecipeError, match="bundled recipes"):
        load_recipe("no-such-recipe")


def test_lorsa_section_is_typed_and_lists_only_what_it_sets():
    recipe = recipe_from_dict({"lorsa": {"layers": 3, "top_k": 8, "attn_scale": 4}, "training": {"max_steps": 1}})
    assert recipe.lorsa == LorsaSection(layers=[3], top_k=8, attn_scale=4.0)
    assert recipe.to_dict()["lorsa"] == {"layers": [3], "top_k": 8, "attn_scale": 4.0}
    assert recipe.lorsa.config_overrides() == {"top_k": 8, "attn_scale": 4.0}


def test_lorsa_section_has_every_field_a_recipe_may_set():
    """Every LorsaConfig field except those that describe the base model."""
    from_base = {
        "base_model_name_or_path", "base_model_revision", "base_model_type", "hidden_size", "num_hidden_layers",
        "base_num_attention_heads", "base_num_key_value_heads", "base_head_dim", "max_position_embeddings",
        "model_type", "rope_parameters",
    }
    config_fields = {name for name in vars(LorsaConfig)["__annotations__"] if not name.startswith("_")}
    assert {f.name for f in dataclasses.fields(LorsaSection)} == config_fields - from_base


def test_the_store_section_defaults_to_training_live_and_round_trips():
    recipe = recipe_from_dict(MINIMAL)
    assert recipe.store.path is None and recipe.store.layers is None and recipe.store.dtype is None
    stored = recipe_from_dict({**MINIMAL, "store": {"path": "runs/store", "layers": 3, "dtype": "bfloat16"}})
    assert stored.store.layers == [3]
    for values in (recipe.to_dict(), stored.to_dict()):
        assert recipe_from_dict(values).to_dict() == values
    with pytest.raises(RecipeError, match="store.shard_mb must be positive"):
        recipe_from_dict({**MINIMAL, "store": {"shard_mb": 0}})
    with pytest.raises(RecipeError, match="Unknown recipe key 'store.pth'"):
        recipe_from_dict({**MINIMAL, "store": {"pth": "x"}})
