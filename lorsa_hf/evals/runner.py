"""`evaluate_lorsa`: every eval of a Lorsa in one call (what `lorsa-hf eval` runs)."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ..modeling_lorsa import LorsaForReplacement
from .data import pack_texts, position_mask
from .downstream import attention_output_means, default_layer_sets, downstream_metrics
from .lm_eval import DEFAULT_TASKS, lm_eval_deltas
from .reconstruction import reconstruction_metrics
from .replacements import lorsa_replacements

EMBEDDED = "embedded"
"""`base` value that selects the embedded model (SmolLM2-135M) and, by default, the embedded held-out text."""
SCHEMA_VERSION = 1


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("lorsa-hf", "torch", "transformers", "lm-eval", "datasets", "tokenizers"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def _load_base(
    base: str | os.PathLike | PreTrainedModel,
    tokenizer: str | os.PathLike | PreTrainedTokenizerBase | None,
    dtype: torch.dtype,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
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


@torch.no_grad()
def evaluate_lorsa(
    base: str | os.PathLike | PreTrainedModel,
    lorsa: str | os.PathLike | LorsaForReplacement,
    *,
    tokenizer: str | os.PathLike | PreTrainedTokenizerBase | None = None,
    layers: Sequence[int] | None = None,
    tasks: Sequence[str | dict[str, Any]] | None = DEFAULT_TASKS,
    texts: Sequence[str] | None = None,
    text_source: str | None = None,
    n_tokens: int = 16_384,
    mean_tokens: int = 4_096,
    seq_len: int = 256,
    batch_size: int = 8,
    lm_eval_limit: int | float | None = None,
    lm_eval_batch_size: int = 8,
    bootstrap_iters: int = 1000,
    include_path: str | os.PathLike | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    output_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Reconstruction per layer, downstream loss per layer and with all `layers` spliced at once, and lm-eval
    deltas with all `layers` spliced; return every number (the `results.json` content) and, with `output_dir`,
    write `results.json`, `report.md`, the plots and a model card there.

    Args:
        base: The base model: a loaded model, a local folder or Hub id, or `"embedded"` (SmolLM2-135M).
        lorsa: The Lorsa: a loaded `LorsaForReplacement` or a folder / Hub id.
        tokenizer: Defaults to the base model's.
        layers: Which of the Lorsa's layers to evaluate (default: all).
        tasks: lm-eval task names or inline configs; empty or None skips lm-eval.
        texts: Held-out documents for reconstruction and downstream loss (default: the embedded held-out split).
        n_tokens, mean_tokens: Tokens for the metrics and, before them, for the mean-ablation statistics.
        lm_eval_limit: Documents per lm-eval task (default: all).
    """
    started = time.time()
    torch.manual_seed(seed)
    model, tokenizer, base_name = _load_base(base, tokenizer, dtype)
    if device is not None:
        model.to(device)
    if not isinstance(lorsa, LorsaForReplacement):
        lorsa_name = str(lorsa)
        lorsa = LorsaForReplacement.from_pretrained(lorsa)
    else:
        lorsa_name = getattr(lorsa, "name_or_path", "") or "in-memory Lorsa"
    reference = next(model.parameters())
    lorsa.to(device=reference.device, dtype=reference.dtype).eval()
    layers = sorted(lorsa.config.layers if layers is None else layers)
    replacements = lorsa_replacements(model, lorsa, layers)

    texts, source = _heldout_texts(texts)
    batches = pack_texts(texts, tokenizer, seq_len, n_tokens, mean_tokens=mean_tokens, batch_size=batch_size)
    timings: dict[str, float] = {}

    start = time.time()
    accumulators = reconstruction_metrics(
        model, replacements, batches.eval_rows, batches.exclude_token_ids, progress=progress
    )
    reconstruction = {str(layer): accumulators[layer].compute() for layer in layers}
    timings["reconstruction"] = time.time() - start

    start = time.time()
    means, n_mean_counted = attention_output_means(
        model, layers, batches.mean_rows, batches.exclude_token_ids, progress=progress
    ) if batches.mean_rows else (None, 0)
    downstream = downstream_metrics(
        model, replacements, batches.eval_rows, means=means, layer_sets=default_layer_sets(layers),
        exclude_token_ids=batches.exclude_token_ids, progress=progress,
    )
    downstream["n_mean_tokens"] = n_mean_counted
    timings["downstream"] = time.time() - start

    lm_eval_results = None
    if tasks:
        start = time.time()
        lm_eval_results = lm_eval_deltas(
            model, tokenizer, replacements, list(tasks), include_path=include_path, limit=lm_eval_limit,
            batch_size=lm_eval_batch_size, bootstrap_iters=bootstrap_iters, seed=seed,
        )
        lm_eval_results["spliced_layers"] = layers
        timings["lm_eval"] = time.time() - start
    timings["total"] = time.time() - started

    config = lorsa.config
    results: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seed": seed,
        "base_model": {
            "name_or_path": base_name,
            "model_type": model.config.model_type,
            "num_hidden_layers": model.config.num_hidden_layers,
            "hidden_size": model.config.hidden_size,
            "dtype": str(reference.dtype).removeprefix("torch."),
            "device": str(reference.device),
        },
        "lorsa": {
            "name_or_path": lorsa_name,
            "layers": layers,
            "n_ov_heads": config.n_ov_heads,
            "n_qk_heads": config.n_qk_heads,
            "d_qk_head": config.d_qk_head,
            "top_k": config.top_k,
            "activation": config.activation,
            "base_model_name_or_path": config.base_model_name_or_path,
        },
        "data": {
            "source": text_source or source,
            "seq_len": seq_len,
            "batch_size": batch_size,
            "n_eval_tokens": batches.n_eval_tokens,
            "n_counted_tokens": int(sum(position_mask(r, batches.exclude_token_ids).sum() for r in batches.eval_rows)),
            "n_mean_tokens": batches.n_mean_tokens,
            "excluded_token_ids": list(batches.exclude_token_ids),
        },
        "reconstruction": reconstruction,
        "downstream": downstream,
        "lm_eval": lm_eval_results,
        "versions": _versions(),
        "timings_s": timings,
    }
    if output_dir is not None:
        from .card import write_model_card
        from .report import write_report

        write_report(results, output_dir)
        write_model_card(results, Path(output_dir) / "model_card.md")
    return results


__all__ = ["EMBEDDED", "SCHEMA_VERSION", "evaluate_lorsa"]
