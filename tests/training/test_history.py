"""A run continued from a saved Lorsa records the stages that trained it, oldest first, beside its weights."""

from __future__ import annotations

import json

from lorsa_hf.training import LorsaTrainer, recipe_from_dict
from lorsa_hf.training.history import earlier_stages

from .conftest import tiny_recipe_dict

SHORT = {"max_steps": 2, "k_initial": None, "warmup_fraction": 0.0}


def _train(tiny_files, folder, start=None):
    init = {"from_pretrained": str(start)} if start else {}
    LorsaTrainer(recipe_from_dict(tiny_recipe_dict(tiny_files, folder, init=init, training=SHORT))).train()
    return folder / "final"


def test_each_continued_run_carries_every_earlier_stage(tiny_files, tmp_path):
    first = _train(tiny_files, tmp_path / "first")
    assert not (first / "training_history.json").exists()
    second = _train(tiny_files, tmp_path / "second", start=first)
    third = _train(tiny_files, tmp_path / "third", start=second)
    (one,) = json.loads((second / "training_history.json").read_text())["stages"]
    assert one["source"] == str(first)
    assert one["recipe"] == json.loads((first / "training_recipe.json").read_text())
    assert one["final_metrics"] == json.loads((first / "final_metrics.json").read_text())
    stages = json.loads((third / "training_history.json").read_text())["stages"]
    assert [stage["source"] for stage in stages] == [str(first), str(second)]
    assert stages[1]["recipe"]["init"]["from_pretrained"] == str(first)


def test_a_start_without_a_recipe_is_one_stage_of_unknown_training(tiny_files, tmp_path):
    trainer = LorsaTrainer(recipe_from_dict(tiny_recipe_dict(tiny_files, tmp_path / "run")))
    trainer.lorsa.save_pretrained(tmp_path / "imported")
    assert earlier_stages(str(tmp_path / "imported")) == [
        {"source": str(tmp_path / "imported"), "recipe": None, "final_metrics": None}
    ]


def test_a_resumed_run_keeps_the_history_it_started_with(tiny_files, tmp_path):
    """The stages are read once, when the run starts; a start folder changed before --resume does not rewrite them."""
    first = _train(tiny_files, tmp_path / "first")
    training = {**SHORT, "max_steps": 4, "checkpoint_every": 2}
    values = tiny_recipe_dict(tiny_files, tmp_path / "second", init={"from_pretrained": str(first)}, training=training)
    killed = LorsaTrainer(recipe_from_dict(values))
    for ids, attention, state in killed.train_batches():
        killed.train_step(ids, attention)
        killed.packer_state = state
        if killed.step == 2:
            killed.save_checkpoint()
            break
    recipe = json.loads((first / "training_recipe.json").read_text())
    (first / "training_recipe.json").write_text(json.dumps({**recipe, "name": "changed"}))
    LorsaTrainer(recipe_from_dict(values)).train(resume=True)
    (stage,) = json.loads((tmp_path / "second" / "final" / "training_history.json").read_text())["stages"]
    assert stage["recipe"] == recipe
