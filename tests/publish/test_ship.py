"""`ship_run` / `lorsa-hf ship`: a training run's final folder becomes a published folder."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors import safe_open

from lorsa_hf import LorsaForReplacement
from lorsa_hf.cli import main
from lorsa_hf.publish import ship_run
from lorsa_hf.publishing import (
    OPTIONAL_FILES,
    PUBLISHED_FILES,
    PublishError,
    card_mismatches,
    check_sidecars,
    headline_metrics,
)
from tests.evals.conftest import sample_texts
from tests.publish.conftest import LAYERS, TINY_OPTIONS, write_run_final


def test_the_folder_holds_bf16_weights_recipe_results_and_card(shipped, run_final):
    assert sorted(path.name for path in shipped.iterdir()) == sorted(PUBLISHED_FILES)
    with safe_open(shipped / "model.safetensors", "pt") as weights:
        assert {weights.get_tensor(name).dtype for name in weights.keys()} == {torch.bfloat16}
    trained = LorsaForReplacement.from_pretrained(run_final)
    cast = LorsaForReplacement.from_pretrained(shipped)
    for name, value in trained.state_dict().items():
        assert torch.equal(cast.state_dict()[name], value.to(torch.bfloat16))
    assert json.loads((shipped / "training_recipe.json").read_text()) == json.loads(
        (run_final / "training_recipe.json").read_text()
    )
    assert check_sidecars(shipped) == list(PUBLISHED_FILES)


def test_results_are_those_of_the_shipped_weights(shipped, base_model, tokenizer):
    from lorsa_hf.evals import evaluate_lorsa
    from tests.evals.conftest import sample_texts

    results = json.loads((shipped / "results.json").read_text())
    assert results["lorsa"]["name_or_path"] == "tiny-lorsa" and results["lorsa"]["layers"] == LAYERS
    again = evaluate_lorsa(base_model, LorsaForReplacement.from_pretrained(shipped), TINY_OPTIONS, tokenizer=tokenizer,
                           texts=sample_texts())
    for layer in map(str, LAYERS):
        assert results["reconstruction"][layer]["fvu"] == pytest.approx(again["reconstruction"][layer]["fvu"], rel=1e-9)
    assert set(results["saelens"]) == {"0", "2", "all"}


def test_the_card(shipped):
    text = (shipped / "README.md").read_text()
    card = ModelCard(text)
    assert text.startswith("---\nlibrary_name: lorsa_hf\n")
    assert card.data.library_name == "lorsa_hf" and card.data.base_model == "tiny-llama"
    assert card.data.tags == ["lorsa", "interpretability", "sparse-dictionary"]
    assert card.data.license == "apache-2.0" and card.data.datasets
    results = json.loads((shipped / "results.json").read_text())
    index = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert index == {e["type"]: e["value"] for e in headline_metrics(results)}
    assert index["layer_0/fvu"] == results["reconstruction"]["0"]["fvu"]
    assert index["layer_2/cossim"] == results["reconstruction"]["2"]["cosine_similarity"]
    assert index["all_layers/ce_loss_score"] == results["saelens"]["all"]["ce_loss_score"]
    assert card_mismatches(text, results) == []
    assert 'model = load_spliced("tiny-llama", "me/tiny-lorsa")' in card.text
    assert "## Evaluation" in card.text and "## Training" in card.text and "4,096 tokens" in card.text
    assert "explained_variance" in card.text and "held-out FVU 0.5000" in card.text


def test_a_run_folder_without_its_recipe_is_refused(run_final, tmp_path, base_model, tokenizer):
    folder = tmp_path / "final"
    shutil.copytree(run_final, folder)
    (folder / "training_recipe.json").unlink()
    with pytest.raises(PublishError, match="training_recipe.json: pass the final/ folder"):
        ship_run(folder, tmp_path / "out", base=base_model, tokenizer=tokenizer, options=TINY_OPTIONS)
    assert not (tmp_path / "out").exists()


def test_cli_ship_offline(run_final, base_model, tokenizer, tmp_path, capsys):
    from tests.evals.conftest import sample_texts

    base_model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    (tmp_path / "heldout.txt").write_text("\n".join(sample_texts()))
    code = main([
        "ship", str(run_final), str(tmp_path / "out"), "--base", str(tmp_path / "base"), "--text-file",
        str(tmp_path / "heldout.txt"), "--tokens", "128", "--mean-tokens", "32", "--seq-len", "32", "--tasks",
        "none", "--no-progress", "--report-dir", str(tmp_path / "report"),
    ])
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(PUBLISHED_FILES)
    assert (tmp_path / "report" / "report.md").is_file()
    assert f"wrote {tmp_path / 'out'}" in capsys.readouterr().out
    assert main(["ship", str(tmp_path / "nowhere"), str(tmp_path / "out2")]) == 2


def test_a_continued_run_ships_its_history_and_the_card_tells_every_stage(shipped, run_final):
    assert (shipped / "training_history.json").read_bytes() == (run_final / "training_history.json").read_bytes()
    card = (shipped / "README.md").read_text()
    assert "Trained in 2 stages; the earlier ones are in `training_history.json`:" in card
    assert "1. `runs/first/final`: Trained with `lorsa-hf train`" in card and "2,048 tokens" in card
    assert "starting from the Lorsa `runs/first/final` (a warm restart: fresh Adam and schedules)" in card
    assert "(2 passes over its training text)" in card and "K 64 throughout" in card
    assert "In all, 6,144 training tokens per layer (2,048 + 4,096)." in card


def test_a_run_from_scratch_ships_no_history(tmp_path, base_model, tokenizer):
    run = write_run_final(tmp_path / "final", base_model, continued=False)
    ship_run(run, tmp_path / "out", base=base_model, tokenizer=tokenizer, texts=sample_texts(), options=TINY_OPTIONS)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        name for name in PUBLISHED_FILES if name not in OPTIONAL_FILES
    )
    card = (tmp_path / "out" / "README.md").read_text()
    assert "stages" not in card and "in `training_recipe.json`" in card and "K annealed from 512 to 64" in card
