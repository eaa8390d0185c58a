"""Training on a tiny model: FVU falls, metrics are what they claim, kill-and-resume is bit-identical."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lorsa_hf import LorsaForReplacement
from lorsa_hf.cli import main
from lorsa_hf.training import LorsaTrainer, recipe_from_dict
from lorsa_hf.training.recipe import RecipeError
from lorsa_hf.training.step import aux_loss

from .conftest import make_model, tiny_recipe_dict


def test_short_run_lowers_fvu_well_below_start(tiny_files, tmp_path):
    recipe = recipe_from_dict(tiny_recipe_dict(tiny_files, tmp_path, training={"lr": 3e-2, "max_steps": 40}))
    trainer = LorsaTrainer(recipe)
    start = trainer.evaluate()
    final = trainer.train()
    assert final["heldout/fvu"] < 0.5 * start["heldout/fvu"], (start["heldout/fvu"], final["heldout/fvu"])
    assert final["heldout/l0"] == pytest.approx(4.0)

    logs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [entry for entry in logs if "loss" in entry]
    assert [entry["step"] for entry in steps] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert steps[0]["k"] > steps[-1]["k"] == 4
    for key in ("tokens", "tokens_per_s", "fvu", "l0", "dead_fraction", "lr", "layer0/fvu", "layer1/dead_fraction"):
        assert key in steps[-1]

    folder = tmp_path / "final"
    lorsa = LorsaForReplacement.from_pretrained(folder)
    assert lorsa.config.layers == [0, 1] and lorsa.config.top_k == 4
    assert json.loads((folder / "training_recipe.json").read_text())["training"]["max_steps"] == 40
    assert json.loads((folder / "final_metrics.json").read_text())["heldout/fvu"] == final["heldout/fvu"]


def test_heldout_metrics_are_computed_as_defined(tiny_files, tmp_path):
    """FVU = sum |y - y_hat|^2 / sum |y - mean y|^2 over non-BOS tokens; L0 = active heads per token."""
    recipe = recipe_from_dict(tiny_recipe_dict(tiny_files, tmp_path, lorsa={"activation": "topk_relu", "top_k": 48}))
    trainer = LorsaTrainer(recipe)
    metrics = trainer.evaluate()
    for layer in (0, 1):
        errors, targets, active, fired = [], [], [], torch.zeros(64, dtype=torch.bool)
        for ids, attention in trainer.heldout:
            acts = trainer.source(ids, attention)[layer]
            mask = ids != trainer.tokenizer.bos_token_id
            with torch.no_grad():
                out = trainer.lorsa(acts.inputs, layer=layer)
            errors.append((out.hidden_states - acts.outputs)[mask].double())
            targets.append(acts.outputs[mask].double())
            activations = out.activations()[mask]
            active.append((activations != 0).sum(-1).double())
            fired |= (activations != 0).any(0)
        target = torch.cat(targets)
        fvu = torch.cat(errors).pow(2).sum() / (target - target.mean(0)).pow(2).sum()
        assert metrics[f"heldout/layer{layer}/fvu"] == pytest.approx(float(fvu), rel=1e-6)
        assert metrics[f"heldout/layer{layer}/l0"] == pytest.approx(float(torch.cat(active).mean()), rel=1e-6)
        assert metrics[f"heldout/layer{layer}/dead_fraction"] == pytest.approx(1 - float(fired.double().mean()))
    assert metrics[f"heldout/layer{layer}/l0"] < 48  # topk_relu: negative selected activations are zero


def test_aux_loss_trains_only_dead_heads_and_freeze_qk(tiny_files, tmp_path):
    values = tiny_recipe_dict(
        tiny_files, tmp_path, training={"aux_loss_coef": 1.0, "k_aux": 8, "max_steps": 3}, init={"freeze_qk": True}
    )
    trainer = LorsaTrainer(recipe_from_dict(values))
    ids, attention = trainer.heldout[0]
    batch = trainer.prepare_batch(ids, attention)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[10:30] = True
    trainer.dead_heads.tokens_since_fired[0][dead] = trainer.recipe.training.dead_tokens
    layer = trainer.lorsa.layer(0)
    outputs = trainer.forward(batch, top_k=4, with_auxiliary=True)
    prediction, _, _, reconstruction = outputs[0]
    assert reconstruction is not None and outputs[1][3] is None  # layer 1 has no dead heads yet
    mask, target = batch.loss_mask, batch.activations[0].outputs
    error = (prediction - target)[mask]
    aux = aux_loss(reconstruction[mask], error, target[mask], int(dead.sum()), trainer.k_aux)
    aux.backward()
    assert aux > 0
    rows_with_grad = layer.W_O.grad.abs().sum(-1) > 0
    assert rows_with_grad[dead].any() and not rows_with_grad[~dead].any()

    w_q = layer.W_Q.detach().clone()
    trainer.train()
    assert torch.equal(layer.W_Q, w_q) and not layer.W_Q.requires_grad


def test_bad_settings_fail_before_training(tiny_files, tmp_path):
    with pytest.raises(RecipeError, match="k_initial must be between 1 and lorsa n_ov_heads"):
        LorsaTrainer(recipe_from_dict(tiny_recipe_dict(tiny_files, tmp_path, training={"k_initial": 1000})))
    with pytest.raises(RecipeError, match=r"data.context_length \(4096\) is beyond the \d+ positions"):
        LorsaTrainer(recipe_from_dict(tiny_recipe_dict(tiny_files, tmp_path, data={"context_length": 4096})))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        LorsaTrainer(recipe_from_dict(tiny_recipe_dict(tiny_files, tmp_path))).train(resume=True)


def test_refuses_rows_longer_than_a_sliding_window_the_spliced_layer_reads(tiny_files, tmp_path, tokenizer):
    """Mistral with a 16-token window: 32-token rows would teach the Lorsa keys it never sees once spliced."""
    model = make_model("mistral", tokenizer)
    model.config.sliding_window = 16
    recipe = tiny_recipe_dict(tiny_files, tmp_path, arch="mistral")
    with pytest.raises(RecipeError, match=r"sliding window of 16 tokens.*data.context_length <= 16"):
        LorsaTrainer(recipe_from_dict(recipe), model=model, tokenizer=tokenizer)
    recipe["data"]["context_length"] = 16
    LorsaTrainer(recipe_from_dict(recipe), model=model, tokenizer=tokenizer)


def _final_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(output_dir / "final" / "model.safetensors"))


def test_kill_and_resume_gives_bit_identical_weights(tiny_files, tmp_path):
    """A run SIGKILLed after a checkpoint and resumed with --resume ends with exactly the uninterrupted weights
    (K annealing, LR schedule, Adam state, dead-head tracker with the auxiliary loss, data position)."""
    values = tiny_recipe_dict(
        tiny_files, tmp_path / "killed",
        training={"max_steps": 60, "checkpoint_every": 4, "keep_checkpoints": 2, "k_anneal_fraction": 0.3,
                  "aux_loss_coef": 0.5, "dead_tokens": 300, "lr": 1e-2},
        init={"b_o": "mean", "match_norm": True},
    )
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(values))

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "lorsa_hf.cli", "train", str(path)], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    checkpoint = tmp_path / "killed" / "checkpoints" / "step-00000008"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate()
    assert checkpoint.exists(), stderr.decode()[-2000:]
    assert not (tmp_path / "killed" / "final").exists(), "the run finished before it could be killed"

    assert main(["train", str(path), "--resume"]) == 0
    assert main(["train", str(path), f"output_dir={tmp_path / 'uninterrupted'}"]) == 0

    logged = [json.loads(x)["step"] for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert logged.count(5) == 1, "the resumed run started from scratch instead of the checkpoint"
    resumed, uninterrupted = _final_weights(tmp_path / "killed"), _final_weights(tmp_path / "uninterrupted")
    assert resumed.keys() == uninterrupted.keys()
    for name in resumed:
        assert torch.equal(resumed[name], uninterrupted[name]), name


def test_resume_refuses_a_changed_recipe(tiny_files, tmp_path):
    values = tiny_recipe_dict(tiny_files, tmp_path, training={"max_steps": 4, "checkpoint_every": 2})
    LorsaTrainer(recipe_from_dict(values)).train()
    values["training"]["lr"] = 1.0
    values["training"]["log_every"] = 1
    with pytest.raises(RecipeError, match=r"training.lr: 0.003 -> 1.0"):
        LorsaTrainer(recipe_from_dict(values)).train(resume=True)


def test_missing_logger_is_named(tiny_files, tmp_path):
    from accelerate.utils import is_tensorboard_available

    if is_tensorboard_available():
        pytest.skip("tensorboard is installed")
    with pytest.raises(RecipeError, match="pip install tensorboard"):
        LorsaTrainer(recipe_from_dict(tiny_recipe_dict(tiny_files, tmp_path, training={"loggers": ["tensorboard"]})))


def test_bf16_autocast_run_through_the_cli(tiny_files, tmp_path):
    """Mixed precision needs its own process (accelerate's state is process-wide)."""
    values = tiny_recipe_dict(tiny_files, tmp_path, training={"max_steps": 3, "mixed_precision": "bf16"})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(values))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "lorsa_hf.cli", "train", str(path)], env=env, capture_output=True, text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["step"] == 3 and summary["heldout/fvu"] < 10
    lorsa = LorsaForReplacement.from_pretrained(tmp_path / "final")
    assert lorsa.layer(0).W_Q.dtype == torch.float32


def test_lorsa_implementation_is_a_recipe_switch(tiny_files, tmp_path):
    """`lorsa.implementation` picks the layer's sparse or dense path; both give the same losses, and weights equal
    up to float rounding that Adam amplifies (a near-zero gradient whose sign flips moves a weight by ~2 lr)."""
    weights, losses = {}, {}
    for implementation in ("sparse", "dense"):
        values = tiny_recipe_dict(
            tiny_files, tmp_path / implementation, lorsa={"implementation": implementation},
            training={"max_steps": 4, "log_every": 1},
        )
        trainer = LorsaTrainer(recipe_from_dict(values))
        assert trainer.lorsa.config.implementation == implementation
        trainer.train()
        weights[implementation] = _final_weights(tmp_path / implementation)
        lines = (tmp_path / implementation / "metrics.jsonl").read_text().splitlines()
        losses[implementation] = [entry["loss"] for entry in map(json.loads, lines) if "loss" in entry]
    assert len(losses["dense"]) == 4 and losses["dense"] == pytest.approx(losses["sparse"], rel=1e-4)
    for name, value in weights["sparse"].items():
        torch.testing.assert_close(weights["dense"][name], value, atol=1e-2, rtol=1e-2)


def test_a_new_run_into_a_folder_holding_a_run_is_refused_unless_overwritten(tiny_files, tmp_path):
    values = tiny_recipe_dict(tiny_files, tmp_path / "run", training={"max_steps": 4, "checkpoint_every": 2})
    LorsaTrainer(recipe_from_dict(values)).train()
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    with pytest.raises(FileExistsError, match=r"already holds a run .*--resume.*another folder.*--overwrite"):
        LorsaTrainer(recipe_from_dict(values)).train()
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == checkpoints
    values["training"]["max_steps"] = 2
    LorsaTrainer(recipe_from_dict(values)).train(overwrite=True)
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 2 and not (tmp_path / "run" / "checkpoints").exists()


def test_the_cli_names_the_choices_for_a_folder_holding_a_run(tiny_files, tmp_path, capsys):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe_dict(tiny_files, tmp_path / "run")))
    with pytest.raises(SystemExit):
        main(["train", str(path)])
    assert "already holds a run (checkpoints)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", str(path), "--resume", "--overwrite"])
    assert "pass only one" in capsys.readouterr().err
