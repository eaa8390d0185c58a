"""A sweep's command line expands as written: grid order, list mode, fixed keys, YAML values, the QK budget."""

from __future__ import annotations

import json

import pytest
import yaml

from lorsa_hf.sweeps import expand, make_plan, parse_arguments, qk_parameters, with_qk_budget
from lorsa_hf.sweeps.grid import split_values
from lorsa_hf.training.recipe import RecipeError

from ..training.conftest import tiny_recipe_dict


def test_a_grid_expands_every_combination_with_the_first_key_slowest():
    fixed, axes = parse_arguments(["lorsa.top_k=4,8", "training.lr=1e-3,3e-3", "training.max_steps=5"])
    assert fixed == {"training.max_steps": 5}
    assert expand(axes) == [
        {"lorsa.top_k": 4, "training.lr": 1e-3}, {"lorsa.top_k": 4, "training.lr": 3e-3},
        {"lorsa.top_k": 8, "training.lr": 1e-3}, {"lorsa.top_k": 8, "training.lr": 3e-3},
    ]


def test_a_list_takes_the_values_together_and_needs_equal_lengths():
    _, axes = parse_arguments(["lorsa.n_qk_heads=4,2", "lorsa.d_qk_head=8,16"])
    assert expand(axes, "list") == [
        {"lorsa.n_qk_heads": 4, "lorsa.d_qk_head": 8}, {"lorsa.n_qk_heads": 2, "lorsa.d_qk_head": 16},
    ]
    _, uneven = parse_arguments(["lorsa.top_k=4,8,16", "training.lr=1e-3,3e-3"])
    with pytest.raises(RecipeError, match="same number of values"):
        expand(uneven, "list")


def test_values_are_yaml_split_outside_brackets_and_quotes():
    assert split_values("[0],[0, 1],'a,b',{x: 1, y: 2}") == ["[0]", "[0, 1]", "'a,b'", "{x: 1, y: 2}"]
    _, axes = parse_arguments(["lorsa.layers=[0],[0,1]", "init.qk=random,base"])
    assert [axis.values for axis in axes] == [[[0], [0, 1]], ["random", "base"]]
    for bad in ("lorsa.top_k", "=4,8", "lorsa.top_k=[4,8"):
        with pytest.raises(RecipeError):
            parse_arguments([bad])
    with pytest.raises(RecipeError, match="given twice"):
        parse_arguments(["lorsa.top_k=4,8", "lorsa.top_k=16,32"])


def test_a_qk_budget_trades_groups_against_their_dimension():
    recipe = {"lorsa": {"n_ov_heads": 4608, "n_qk_heads": 9, "d_qk_head": 64}}
    derived = [with_qk_budget({"lorsa.d_qk_head": d}, 1152, recipe)["lorsa.n_qk_heads"] for d in (8, 16, 32, 64, 128)]
    assert derived == [144, 72, 36, 18, 9]
    assert with_qk_budget({"lorsa.n_qk_heads": 18}, 576, recipe) == {"lorsa.n_qk_heads": 18, "lorsa.d_qk_head": 32}
    assert {qk_parameters(n, 1152 // n, 576) for n in derived} == {1152 * (2 * 576 + 2)}
    with pytest.raises(RecipeError, match="does not divide the QK budget"):
        with_qk_budget({"lorsa.d_qk_head": 128}, 576, recipe)
    with pytest.raises(RecipeError, match="does not divide lorsa.n_ov_heads"):
        with_qk_budget({"lorsa.d_qk_head": 4}, 28, {"lorsa": {"n_ov_heads": 64}})
    with pytest.raises(RecipeError, match="not both"):
        with_qk_budget({"lorsa.d_qk_head": 8, "lorsa.n_qk_heads": 4}, 32, recipe)


def test_a_plan_gives_each_configuration_its_folder_recipe_and_the_shared_store(tiny_files, tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe_dict(tiny_files, tmp_path / "run", lorsa={"d_qk_head": 8})))
    plan = make_plan(str(path), ["lorsa.d_qk_head=4,8,16", "training.max_steps=7"], qk_budget="auto")
    assert plan.qk_budget == 4 * 8  # the tiny recipe: 4 groups of the base head dimension 8
    assert plan.output_dir == str(tmp_path / "run") + "-sweep" and plan.store == plan.output_dir + "/store"
    assert [c.name for c in plan.configurations] == [
        "000-d_qk_head=4_n_qk_heads=8", "001-d_qk_head=8_n_qk_heads=4", "002-d_qk_head=16_n_qk_heads=2",
    ]
    recipes = plan.recipes()
    assert [(r.lorsa.n_qk_heads, r.lorsa.d_qk_head, r.training.max_steps) for r in recipes] == [
        (8, 4, 7), (4, 8, 7), (2, 16, 7),
    ]
    assert {r.store.path for r in recipes} == {plan.store}
    assert [r.output_dir for r in recipes] == [f"{plan.output_dir}/runs/{c.name}" for c in plan.configurations]
    store = plan.store_recipe()
    assert store.store.layers == [0, 1] and store.store.train_tokens == 7 * 8 * 32
    live = make_plan(str(path), ["lorsa.top_k=2,4"], output_dir=str(tmp_path / "s"), live=True)
    assert live.store is None and {r.store.path for r in live.recipes()} == {None}
    with pytest.raises(RecipeError, match="cannot share the activation store"):
        make_plan(str(path), ["data.context_length=16,32"]).store_recipe()
    with pytest.raises(RecipeError, match="lorsa.top_k"):
        make_plan(str(path), ["lorsa.top_k=4,zero"])


def test_the_command_line_takes_sweep_arguments_before_and_after_options(tiny_files, tmp_path, capsys):
    from lorsa_hf.cli import main

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe_dict(tiny_files, tmp_path / "run")))
    assert main(["sweep", str(path), "lorsa.top_k=2,4", "--print-plan", "--list", "training.max_steps=3"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["mode"] == "list" and plan["fixed"] == {"training.max_steps": 3}
    assert [c["overrides"] for c in plan["configurations"]] == [{"lorsa.top_k": 2}, {"lorsa.top_k": 4}]
    with pytest.raises(SystemExit):
        main(["sweep", str(path), "lorsa.top_k=2,4", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
