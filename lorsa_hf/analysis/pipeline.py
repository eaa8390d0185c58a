"""`analyze_layer`: read every head of one Lorsa layer and write the report (what `lorsa-hf analyze` runs).

Output folder: `store.safetensors` (the activation store: reload it to resume or to merge), `report.json`
(every number), `viewer.html` (open it with a double click) and `zpattern-*.png` heat maps.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..io import atomic_write_text
from ..modeling_lorsa import LorsaForReplacement, LorsaLayer
from .detectors import DETECTORS, score_heads
from .logits import Unembedding, logit_effects
from .probes import ordinary_tokens, probe_sequences, tokenizer_families
from .reading import LayerReader, check_layer, spliced_at
from .readings import base_readings, lorsa_readings
from .report import (
    DETECTION_THRESHOLD,
    ReportOptions,
    chosen_heads,
    detection_counts,
    earlier_contributions,
    head_entries,
    token_strings,
)
from .store import Context, HeadActivationStore
from .stream import CorpusOptions, analyze_corpus
from .viewer import write_viewer, write_z_pattern_heatmap
from .zpattern import z_pattern

STORE_FILE = "store.safetensors"


@dataclass
class AnalysisOptions:
    """Everything `analyze_layer` can be told: the corpus pass, the store's size per head, the detector probes
    (`probes` sequences of `probe_length` tokens) and what the report shows."""

    corpus: CorpusOptions = field(default_factory=CorpusOptions)
    report: ReportOptions = field(default_factory=ReportOptions)
    top_n: int = 16
    sample_size: int = 32
    probes: int = 16
    probe_length: int = 32
    seed: int = 0
    resume: bool = True
    progress: bool = True
    heatmaps: int = 3

    def __post_init__(self) -> None:
        if self.top_n <= 0:
            raise ValueError(f"top_n must be a positive number of contexts per head, got {self.top_n}.")


def detector_scores(
    model: PreTrainedModel, lorsa: LorsaForReplacement, layer: int, tokenizer: PreTrainedTokenizerBase,
    options: AnalysisOptions,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The detectors' scores for every Lorsa head of `layer` and for every head of the base model there."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    probes = probe_sequences(
        ordinary_tokens(tokenizer), bos, tokenizer_families(tokenizer), n=options.probes,
        length=options.probe_length, seed=options.seed,
    )
    unembedding = Unembedding.from_model(model)
    base = score_heads(lambda ids, mask: base_readings(model, layer, unembedding, ids, mask), probes)
    with spliced_at(model, lorsa, layer) as module:
        reader = LayerReader(model, module)

        def inputs(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
            read = reader(ids, mask)
            return read.hidden_states, read.arguments

        ours = score_heads(lambda ids, mask: lorsa_readings(module, inputs, unembedding, ids, mask), probes)
    return ours, base


@torch.no_grad()
def z_pattern_window(
    model: PreTrainedModel, module: LorsaLayer, context: Context, options: ReportOptions,
    fraction: float = 0.05, extra_keys: int = 8,
) -> tuple[torch.Tensor, list[int], list[int]]:
    """A head's contributions over the window before its context's position: [queries, keys], with the query
    positions and the key positions. The keys are the window's, plus (up to `extra_keys`) earlier tokens whose
    contribution to the context's position is at least `fraction` of its largest one: an induction head's
    earlier occurrence usually lies outside any short window."""
    first = max(0, context.position - options.before)
    read = LayerReader(model, module)(torch.tensor([context.token_ids]))
    contributions = z_pattern(module, read.hidden_states, **read.arguments).contributions(context.head)
    earlier = earlier_contributions(contributions[context.position], first, context.token_ids, fraction, extra_keys)
    queries = list(range(first, context.position + 1))
    keys = [int(position) for position, _, _ in earlier] + queries
    return contributions[queries][:, keys], queries, keys


def _heatmaps(
    model: PreTrainedModel, module: LorsaLayer, store: HeadActivationStore, tokenizer: PreTrainedTokenizerBase,
    picks: list[tuple[str, int]], output: Path, options: ReportOptions,
) -> list[str]:
    written = []
    for label, head in picks:
        contexts = store.top_contexts(head)
        if not contexts:
            continue
        tokens = contexts[0].token_ids
        matrix, queries, keys = z_pattern_window(model, module, contexts[0], options)
        labels = [tokenizer.decode([tokens[q]]) for q in queries]
        key_labels = [tokenizer.decode([tokens[k]]) if k >= queries[0] else f"[{k}] {tokenizer.decode([tokens[k]])}"
                      for k in keys]
        name = f"zpattern-{label}-head{head}.png"
        title = f"layer {store.layer} head {head} ({label}): z-pattern of its top context"
        write_z_pattern_heatmap(output / name, matrix, labels, title, key_labels=key_labels)
        written.append(name)
    return written


def _load_or_create_store(output: Path, lorsa: LorsaForReplacement, layer: int, options: AnalysisOptions):
    path = output / STORE_FILE
    if options.resume and path.is_file():
        store = HeadActivationStore.load(path)
        if (store.top_n, store.sample.size) == (options.top_n, options.sample_size):
            return store
    return HeadActivationStore.create(lorsa.config.n_ov_heads, layer, options.top_n, options.sample_size)


def analyze_layer(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, lorsa: LorsaForReplacement, layer: int,
    texts: list[str], output_dir: str | os.PathLike, options: AnalysisOptions | None = None,
    description: str = "",
) -> dict[str, Any]:
    """Stream `texts` through `model` with `lorsa` at `layer`, score the detectors, and write the store, the
    report, the viewer and heat maps into `output_dir`; return the report's summary."""
    options = options or AnalysisOptions()
    module = check_layer(lorsa, layer)
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    store = _load_or_create_store(output, lorsa, layer, options)
    store = analyze_corpus(model, lorsa, layer, texts, tokenizer, options.corpus, store=store,
                           progress=options.progress)
    store.save(output / STORE_FILE)
    corpus_seconds = time.perf_counter() - started
    ours, base = detector_scores(model, lorsa, layer, tokenizer, options)
    effects = logit_effects(lorsa, layer, Unembedding.from_model(model))
    heads = chosen_heads(store, ours, options.report)
    with spliced_at(model, lorsa, layer):
        entries = head_entries(model, module, store, heads, effects, ours, options.report)
        best = [(name, int(values.argmax())) for name, values in ours.items()][: options.heatmaps]
        heatmaps = _heatmaps(model, module, store, tokenizer, best, output, options.report)
    counts = {"lorsa": detection_counts(ours), "base": detection_counts(base)}
    meta = {
        "layer": layer, "n_heads": lorsa.config.n_ov_heads, "n_base_heads": len(next(iter(base.values()))),
        "n_tokens": store.n_tokens, "top_k": lorsa.config.top_k, "activation": lorsa.config.activation,
        "detectors": [name for name in DETECTORS if name in ours], "threshold": DETECTION_THRESHOLD,
        "description": description or f"layer {layer}, {store.n_tokens:,} tokens analysed",
    }
    data = {"meta": meta, "counts": counts, "heads": entries, "tokens": token_strings(tokenizer, entries)}
    write_viewer(output / "viewer.html", data, f"Lorsa heads of layer {layer}")
    summary = {
        **meta, "counts": counts, "heatmaps": heatmaps, "options": asdict(options),
        "best_heads": {name: [int(h) for h in values.argsort(descending=True)[:10]] for name, values in ours.items()},
        "lorsa_scores": {name: values.tolist() for name, values in ours.items()},
        "base_scores": {name: values.tolist() for name, values in base.items()},
        "frequency": store.frequency().tolist(), "mean_activation": store.mean_activation().tolist(),
        "seconds": {"corpus": corpus_seconds, "total": time.perf_counter() - started},
    }
    text = json.dumps(summary, indent=1) + "\n"
    atomic_write_text(output / "report.json", text)
    return summary


__all__ = ["STORE_FILE", "AnalysisOptions", "analyze_layer", "detector_scores", "z_pattern_window"]
