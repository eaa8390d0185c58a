"""`evaluate_lorsa`: every eval of a Lorsa in one call (what `lorsa-hf eval` runs), one function per phase."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ..modeling_lorsa import LorsaForReplacement
from .card import write_model_card
from .data import EvalBatches, pack_texts, position_mask
from .downstream import attention_output_means, default_layer_sets, downstream_metrics
from .lm_eval import lm_eval_deltas
from .options import EvalOptions
from .reconstruction import reconstruction_metrics
from .replacements import lorsa_replacements
from .report import write_report
from .saelens import saelens_metrics

EMBEDDED = "embedded"
"""`base` value that selects the embedded model (SmolLM2-135M) and, by default, the embedded held-out text."""
SCHEMA_VERSION = 1


@dataclass
class EvalSetup:
    """The models of one run, ready: the base model and tokenizer, the Lorsa beside it, and the replacements."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    base_name: str
    lorsa: LorsaForReplacement
    lorsa_name: str
    layers: list[int]
    replacements: dict[int, nn.Module]


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("lorsa-hf", "torch", "transformers", "lm-eval", "datasets", "tokenizers"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def load_base(
    base: str | os.PathLike | PreTrainedModel,
    tokenizer: str | os.PathLike | PreTrainedTokenizerBase | None,
    dtype: torch.dtype,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    """The base model in eval mode, its tokenizer (the given one, else the model's) and a name for reports;
    `base` is a loaded model, a folder or Hub id, or "embedded" (the embedded SmolLM2-135M)."""
    if isinstance(base, PreTrainedModel):
        if tokenizer is None:
            raise ValueError("Pass the tokenizer along with an already loaded base model (tokenizer=...).")
        name = getattr(base.config, "_name_or_path", "") or type(base).__name__
    elif str(base) == EMBEDDED:
        from ..embedded.model import EMBEDDED_MODEL_ID, load_embedded_model

        base, embedded_tokenizer = load_embedded_model(dtype=dtype)
        tokenizer = tokenizer if tokenizer is not None else embedded_tokenizer
        name = f"{EMBEDDED_MODEL_ID} (embedded)"
    else:
        name = str(base)
        base = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).eval()
        tokenizer = tokenizer if tokenizer is not None else name
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    return base.eval(), tokenizer, name


def _heldout_texts(texts: Sequence[str] | None) -> tuple[Sequence[str], str]:
    if texts is not None:
        return texts, "texts given by the caller"
    from ..embedded.corpus import embedded_corpus, embedded_corpus_info

    info = embedded_corpus_info()
    return embedded_corpus("heldout"), f"embedded corpus, held-out split ({info['source']}; {info['heldout_rule']})"


def prepare(
    base: str | os.PathLike | PreTrainedModel,
    lorsa: str | os.PathLike | LorsaForReplacement,
    tokenizer: str | os.PathLike | PreTrainedTokenizerBase | None,
    options: EvalOptions,
) -> EvalSetup:
    """Load what is not loaded yet, put the Lorsa on the base model's device and dtype, build the replacements."""
    model, tokenizer, base_name = load_base(base, tokenizer, options.dtype)
    if options.device is not None:
        model.to(options.device)
    if not isinstance(lorsa, LorsaForReplacement):
        lorsa_name = str(lorsa)
        lorsa = LorsaForReplacement.from_pretrained(lorsa)
    else:
        lorsa_name = getattr(lorsa, "name_or_path", "") or "in-memory Lorsa"
    reference = next(model.parameters())
    lorsa.to(device=reference.device, dtype=reference.dtype).eval()
    layers = sorted(lorsa.config.layers if options.layers is None else options.layers)
    replacements = lorsa_replacements(model, lorsa, layers)
    return EvalSetup(model, tokenizer, base_name, lorsa, lorsa_name, layers, replacements)


def run_reconstruction(setup: EvalSetup, batches: EvalBatches, options: EvalOptions) -> dict[str, Any]:
    """Reconstruction metrics of each layer's Lorsa at its own attention block, by layer."""
    accumulators = reconstruction_metrics(
        setup.model, setup.replacements, batches.eval_rows, batches.exclude_token_ids, progress=options.progress
    )
    return {str(layer): accumulators[layer].compute() for layer in setup.layers}


def run_downstream(setup: EvalSetup, batches: EvalBatches, options: EvalOptions) -> dict[str, Any]:
    """Next-token CE and KL of the model with each layer, and all layers at once, spliced or ablated."""
    means, n_mean_counted = attention_output_means(
        setup.model, setup.layers, batches.mean_rows, batches.exclude_token_ids, progress=options.progress
    ) if batches.mean_rows else (None, 0)
    downstream = downstream_metrics(
        setup.model, setup.replacements, batches.eval_rows, means=means, layer_sets=default_layer_sets(setup.layers),
        exclude_token_ids=batches.exclude_token_ids, progress=options.progress,
    )
    downstream["n_mean_tokens"] = n_mean_counted
    return downstream


def run_lm_eval_tasks(setup: EvalSetup, options: EvalOptions) -> dict[str, Any] | None:
    """lm-eval deltas with all evaluated layers spliced; None when `options.tasks` is empty."""
    if not options.tasks:
        return None
    results = lm_eval_deltas(
        setup.model, setup.tokenizer, setup.replacements, list(options.tasks), include_path=options.include_path,
        limit=options.lm_eval_limit, batch_size=options.lm_eval_batch_size,
        bootstrap_iters=options.bootstrap_iters, seed=options.seed,
    )
    results["spliced_layers"] = setup.layers
    return results


def _describe_run(
    setup: EvalSetup, batches: EvalBatches, options: EvalOptions, text_source: str
) -> dict[str, Any]:
    """The `results.json` entries that say what was evaluated on what: base model, Lorsa and data."""
    model, config = setup.model, setup.lorsa.config
    reference = next(model.parameters())
    return {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seed": options.seed,
        "base_model": {
            "name_or_path": setup.base_name,
            "model_type": model.config.model_type,
            "num_hidden_layers": model.config.num_hidden_layers,
            "hidden_size": model.config.hidden_size,
            "dtype": str(reference.dtype).removeprefix("torch."),
            "device": str(reference.device),
        },
        "lorsa": {
            "name_or_path": setup.lorsa_name,
            "layers": setup.layers,
            "n_ov_heads": config.n_ov_heads,
            "n_qk_heads": config.n_qk_heads,
            "d_qk_head": config.d_qk_head,
            "top_k": config.top_k,
            "activation": config.activation,
            "base_model_name_or_path": config.base_model_name_or_path,
        },
        "data": {
            "source": text_source,
            "seq_len": options.seq_len,
            "batch_size": options.batch_size,
            "n_eval_tokens": batches.n_eval_tokens,
            "n_counted_tokens": int(sum(position_mask(r, batches.exclude_token_ids).sum() for r in batches.eval_rows)),
            "n_mean_tokens": batches.n_mean_tokens,
            "excluded_token_ids": list(batches.exclude_token_ids),
        },
    }


def write_outputs(results: dict[str, Any], output_dir: str | os.PathLike) -> None:
    """`results.json`, `report.md`, the plots and `model_card.md` in `output_dir`."""
    write_report(results, output_dir)
    write_model_card(results, Path(output_dir) / "model_card.md")


def _timed(timings: dict[str, float], name: str, phase: Callable[[], Any]) -> Any:
    start = time.time()
    result = phase()
    timings[name] = time.time() - start
    return result


@torch.no_grad()
def evaluate_lorsa(
    base: str | os.PathLike | PreTrainedModel,
    lorsa: str | os.PathLike | LorsaForReplacement,
    options: EvalOptions | None = None,
    *,
    tokenizer: str | os.PathLike | PreTrainedTokenizerBase | None = None,
    texts: Sequence[str] | None = None,
    text_source: str | None = None,
    output_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Reconstruction per layer, downstream loss per layer and with all layers spliced at once, and lm-eval
    deltas with all layers spliced; return every number (the `results.json` content) and, with `output_dir`,
    write `results.json`, `report.md`, the plots and a model card there.

    Args:
        base: The base model: a loaded model, a local folder or Hub id, or `"embedded"` (SmolLM2-135M).
        lorsa: The Lorsa: a loaded `LorsaForReplacement` or a folder / Hub id.
        options: What to measure and with how much data (default: `EvalOptions()`).
        tokenizer: Defaults to the base model's.
        texts: Held-out documents for reconstruction and downstream loss (default: the embedded held-out split);
            `text_source` is how the results describe them.
    """
    options = EvalOptions() if options is None else options
    started = time.time()
    torch.manual_seed(options.seed)
    setup = prepare(base, lorsa, tokenizer, options)
    texts, source = _heldout_texts(texts)
    batches = pack_texts(
        texts, setup.tokenizer, options.seq_len, options.n_tokens, mean_tokens=options.mean_tokens,
        batch_size=options.batch_size,
    )
    timings: dict[str, float] = {}
    reconstruction = _timed(timings, "reconstruction", lambda: run_reconstruction(setup, batches, options))
    downstream = _timed(timings, "downstream", lambda: run_downstream(setup, batches, options))
    lm_eval_results = (
        _timed(timings, "lm_eval", lambda: run_lm_eval_tasks(setup, options)) if options.tasks else None
    )
    timings["total"] = time.time() - started
    results = {
        **_describe_run(setup, batches, options, text_source or source),
        "reconstruction": reconstruction,
        "downstream": downstream,
        "saelens": saelens_metrics(reconstruction, downstream),
        "lm_eval": lm_eval_results,
        "versions": _versions(),
        "timings_s": timings,
    }
    if output_dir is not None:
        write_outputs(results, output_dir)
    return results


__all__ = [
    "EMBEDDED",
    "SCHEMA_VERSION",
    "EvalOptions",
    "EvalSetup",
    "evaluate_lorsa",
    "load_base",
    "prepare",
    "run_downstream",
    "run_lm_eval_tasks",
    "run_reconstruction",
    "write_outputs",
]
