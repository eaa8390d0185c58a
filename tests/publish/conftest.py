"""A tiny trained-run folder (`final/` as `lorsa-hf train` leaves it) and the folder `ship_run` makes of it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorsa_hf.evals import EvalOptions
from lorsa_hf.publish import ship_run
from lorsa_hf.training import load_recipe
from tests.conftest import make_lorsa
from tests.evals.conftest import make_lm, sample_texts, tokenizer  # noqa: F401  (tokenizer: the fixture)

LAYERS = [0, 2]
TINY_OPTIONS = EvalOptions(tasks=[], n_tokens=256, mean_tokens=64, seq_len=32, batch_size=4, progress=False)


@pytest.fixture(scope="module")
def base_model(tokenizer):  # noqa: F811
    return make_lm("llama", tokenizer)


def write_run_final(folder: Path, model, continued: bool = True) -> Path:
    """What `lorsa-hf train` leaves in `output_dir/final`: the Lorsa, its recipe and its final metrics; when
    `continued`, a run that started from an earlier Lorsa (`init.from_pretrained`), with that one's history."""
    lorsa = make_lorsa(model.config, LAYERS)
    lorsa.config.base_model_name_or_path = "tiny-llama"
    lorsa.save_pretrained(folder)
    overrides = [f"lorsa.layers={LAYERS}", "training.total_tokens=4096"]
    first = load_recipe("smollm2-135m", [*overrides, "training.total_tokens=2048"]).to_dict()
    if continued:
        overrides += ["init.from_pretrained=runs/first/final", "data.epochs=2", "training.k_initial=null"]
        stage = {"source": "runs/first/final", "recipe": first, "final_metrics": {"step": 1, "tokens": 2048}}
        (folder / "training_history.json").write_text(json.dumps({"stages": [stage]}))
    recipe = load_recipe("smollm2-135m", overrides).to_dict()
    (folder / "training_recipe.json").write_text(json.dumps(recipe))
    (folder / "final_metrics.json").write_text(json.dumps({"step": 2, "tokens": 4096, "heldout/fvu": 0.5}))
    return folder


@pytest.fixture(scope="module")
def run_final(tmp_path_factory, base_model) -> Path:
    return write_run_final(tmp_path_factory.mktemp("run") / "final", base_model)


@pytest.fixture(scope="module")
def shipped(tmp_path_factory, run_final, base_model, tokenizer) -> Path:  # noqa: F811
    folder = tmp_path_factory.mktemp("ship") / "tiny-lorsa"
    ship_run(
        run_final, folder, base=base_model, tokenizer=tokenizer, texts=sample_texts(), options=TINY_OPTIONS,
        repo_id="me/tiny-lorsa",
    )
    return folder
