"""The lm-eval path, the one-call suite, its report and model card, and `lorsa-hf eval` end to end (offline)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lorsa_hf.evals import EvalOptions, evaluate_lorsa, lm_eval_deltas, model_card, original_attention, perplexity_task
from lorsa_hf.evals.lm_eval import default_tasks_dir, make_task_manager
from lorsa_hf.evals.report import load_results, render_markdown
from lorsa_hf.evals.synthetic import induction_docs, ioi_docs, successor_docs
from tests.conftest import make_lorsa
from tests.evals.conftest import make_lm, sample_texts

LAYERS = [0, 2]
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
RESULT_KEYS = {
    "schema_version", "created", "seed", "base_model", "lorsa", "data", "reconstruction", "downstream", "saelens",
    "lm_eval", "versions", "timings_s",
}
RECONSTRUCTION_KEYS = {
    "n_tokens", "fvu", "explained_variance", "mse", "cosine_similarity", "relative_norm", "l0", "dead_fraction",
    "dead_heads", "n_heads", "frequency_histogram", "mean_target_norm", "mean_prediction_norm",
}
DOWNSTREAM_KEYS = {
    "layers", "ce_spliced", "ce_zero", "ce_mean", "kl_spliced", "kl_zero", "kl_mean", "ce_increase",
    "loss_recovered_zero", "loss_recovered_mean",
}


def test_synthetic_tasks_are_deterministic_and_answerable():
    assert induction_docs(20, seed=3) == induction_docs(20, seed=3) != induction_docs(20, seed=4)
    for doc in induction_docs(50):
        words = doc["context"].split()
        answer = doc["choices"][doc["label"]]
        prefix = len(words) - 10
        assert words[prefix] == answer and len(set(doc["choices"])) == 4
    for doc in ioi_docs(50):
        answer, other = doc["choices"][doc["label"]], doc["choices"][1 - doc["label"]]
        assert doc["context"].count(other) == 2 and doc["context"].count(answer) == 1
    for doc in successor_docs(50):
        assert len(set(doc["choices"])) == 4 and doc["context"].endswith(",")


def test_project_tasks_are_found_without_lm_eval_defaults():
    manager = make_task_manager(["lorsa_induction", "lorsa_ioi", "lorsa_successor", "lorsa_heldout_ppl"])
    assert default_tasks_dir().is_dir()
    assert {"lorsa_induction", "lorsa_heldout_ppl"} <= set(manager.all_tasks)
    with pytest.raises(ValueError, match="Unknown lm-eval task"):
        make_task_manager(["lorsa_no_such_task"])


def test_lm_eval_identical_for_clean_and_identity_spliced(tokenizer, monkeypatch):
    for name, value in OFFLINE.items():
        monkeypatch.setenv(name, value)
    model = make_lm("llama", tokenizer)
    tasks = ["lorsa_induction", "lorsa_ioi", "lorsa_successor", perplexity_task(sample_texts(2)[:4])]
    result = lm_eval_deltas(model, tokenizer, original_attention(model, LAYERS), tasks, limit=6, bootstrap_iters=50)
    table = result["tasks"]
    assert set(table) == {"lorsa_induction", "lorsa_ioi", "lorsa_successor", "lorsa_text_ppl"}
    for task, metrics in table.items():
        for metric, entry in metrics.items():
            assert entry["spliced"] == entry["clean"] and entry["delta"] == 0.0, (task, metric)
            assert entry["n_samples"] == (4 if task == "lorsa_text_ppl" else 6)
    assert table["lorsa_induction"]["acc"]["clean_stderr"] > 0
    assert table["lorsa_induction"]["acc"]["delta_stderr"] == 0.0
    assert table["lorsa_text_ppl"]["bits_per_byte"]["clean_stderr"] > 0


def test_evaluate_lorsa_results_report_and_card(arch, tokenizer, tmp_path):
    model = make_lm(arch, tokenizer)
    lorsa = make_lorsa(model.config, LAYERS)
    options = EvalOptions(
        tasks=["lorsa_induction"], n_tokens=256, mean_tokens=64, seq_len=32, batch_size=4, lm_eval_limit=4,
        bootstrap_iters=20, progress=False,
    )
    results = evaluate_lorsa(model, lorsa, options, tokenizer=tokenizer, texts=sample_texts(), output_dir=tmp_path)
    assert set(results) == RESULT_KEYS
    assert results["data"]["n_eval_tokens"] == 256 and results["data"]["n_mean_tokens"] == 64
    counted = results["data"]["n_counted_tokens"]
    assert 200 < counted <= 256 - 8  # one BOS per row, and the end-of-text separators between documents
    for layer in map(str, LAYERS):
        assert set(results["reconstruction"][layer]) == RECONSTRUCTION_KEYS
        assert results["reconstruction"][layer]["n_tokens"] == counted
        assert set(results["downstream"]["layer_sets"][layer]) == DOWNSTREAM_KEYS
    assert results["downstream"]["layer_sets"]["all"]["layers"] == LAYERS
    assert set(results["saelens"]) == {*map(str, LAYERS), "all"}
    assert results["saelens"]["0"]["cossim"] == results["reconstruction"]["0"]["cosine_similarity"]
    assert 40 < results["downstream"]["n_mean_tokens"] <= 64 - 2
    assert results["lm_eval"]["tasks"]["lorsa_induction"]["acc"]["n_samples"] == 4
    assert {"torch", "transformers", "lm-eval", "lorsa-hf"} <= set(results["versions"])

    saved = load_results(tmp_path / "results.json")
    assert saved["reconstruction"]["0"]["fvu"] == pytest.approx(results["reconstruction"]["0"]["fvu"])
    report = (tmp_path / "report.md").read_text()
    assert report == render_markdown(saved)
    assert "## Reconstruction" in report and "## Downstream loss" in report and "lorsa_induction" in report
    for plot in ("fvu_loss_recovered.png", "head_frequency.png"):
        assert (tmp_path / plot).read_bytes()[:4] == b"\x89PNG"
    card = (tmp_path / "model_card.md").read_text()
    assert card == model_card(saved) and card.startswith("---\nlibrary_name: lorsa_hf")
    assert "load_spliced" in card and not list(tmp_path.glob(".*"))  # no staging files left behind


def test_cli_end_to_end_offline(tokenizer, tmp_path):
    model = make_lm("gpt_neox", tokenizer)
    lorsa = make_lorsa(model.config, [1])
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    lorsa.save_pretrained(tmp_path / "lorsa")
    (tmp_path / "heldout.txt").write_text("\n".join(sample_texts()))
    command = [
        sys.executable, "-m", "lorsa_hf.cli", "eval", "--base", str(tmp_path / "base"), "--lorsa",
        str(tmp_path / "lorsa"), "--text-file", str(tmp_path / "heldout.txt"), "--tokens", "128", "--mean-tokens",
        "32", "--seq-len", "32", "--tasks", "lorsa_ioi", "--limit", "4", "--bootstrap-iters", "20", "--no-progress",
        "--output", str(tmp_path / "out"),
    ]
    root = Path(__file__).parents[2]
    env = {**os.environ, **OFFLINE}
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=root)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "layer 1: FVU" in completed.stdout
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["lorsa"]["layers"] == [1] and "all" not in results["downstream"]["layer_sets"]
    assert results["data"]["source"] == "text files heldout.txt"
    assert results["lm_eval"]["tasks"]["lorsa_ioi"]["acc"]["n_samples"] == 4
