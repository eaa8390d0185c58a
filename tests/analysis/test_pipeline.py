"""`analyze_layer` writes the store, the report, the viewer and heat maps, and a second call resumes the store."""

from __future__ import annotations

import json

import pytest
import torch

from lorsa_hf.analysis import (
    AnalysisOptions,
    CorpusOptions,
    HeadActivationStore,
    ReportOptions,
    analyze_corpus,
    analyze_layer,
    z_pattern,
)
from lorsa_hf.analysis.pipeline import z_pattern_window
from lorsa_hf.analysis.reading import LayerReader, spliced_at


def small_options(n_rows: int) -> AnalysisOptions:
    return AnalysisOptions(
        corpus=CorpusOptions(seq_len=16, n_tokens=16 * n_rows, batch_size=4), report=ReportOptions(heads=6, contexts=3),
        top_n=4, sample_size=8, probes=3, probe_length=10, progress=False, heatmaps=2,
    )


@pytest.fixture
def report(model, lorsa, tokenizer, texts, tmp_path):
    return analyze_layer(model, tokenizer, lorsa, 1, texts, tmp_path, small_options(6)), tmp_path


def test_the_output_folder_holds_store_report_viewer_and_heatmaps(report):
    summary, folder = report
    assert {p.name for p in folder.iterdir()} >= {"store.safetensors", "report.json", "viewer.html"}
    assert len(summary["heatmaps"]) == 2 and all((folder / name).is_file() for name in summary["heatmaps"])
    saved = json.loads((folder / "report.json").read_text())
    assert saved["n_tokens"] == HeadActivationStore.load(folder / "store.safetensors").n_tokens > 0
    assert set(saved["counts"]["lorsa"]) == set(saved["counts"]["base"]) == set(saved["detectors"])
    assert len(saved["lorsa_scores"]["induction"]) == 32 and len(saved["base_scores"]["induction"]) == 4
    page = (folder / "viewer.html").read_text()
    assert "http://" not in page and "https://" not in page and "<script src" not in page


def test_a_second_call_continues_the_stored_pass(report, model, lorsa, tokenizer, texts):
    _, folder = report
    summary = analyze_layer(model, tokenizer, lorsa, 1, texts, folder, small_options(10))
    fresh = analyze_layer(model, tokenizer, lorsa, 1, texts, folder / "fresh", small_options(10))
    assert HeadActivationStore.load(folder / "store.safetensors").metadata["rows_read"] == 10
    assert summary["frequency"] == fresh["frequency"]


def test_a_layer_the_lorsa_does_not_replace_is_refused(model, lorsa, tokenizer, texts, tmp_path):
    with pytest.raises(ValueError, match="does not replace layer 0"):
        analyze_layer(model, tokenizer, lorsa, 0, texts, tmp_path, small_options(4))


def test_a_top_n_that_is_not_positive_is_refused():
    with pytest.raises(ValueError, match="top_n must be a positive number"):
        AnalysisOptions(top_n=0)


def test_a_heat_map_keeps_the_earlier_tokens_that_contribute_beyond_its_window(model, lorsa, tokenizer, texts):
    store = analyze_corpus(model, lorsa, 1, texts, tokenizer, CorpusOptions(seq_len=16, n_tokens=64, batch_size=4),
                           progress=False)
    head = int(store.frequency().argmax())
    context = max(store.top_contexts(head), key=lambda c: c.position)
    module = lorsa.layer(1)
    with spliced_at(model, lorsa, 1):
        matrix, queries, keys = z_pattern_window(model, module, context, ReportOptions(before=2), fraction=0.0)
        read = LayerReader(model, module)(torch.tensor([context.token_ids]))
        full = z_pattern(module, read.hidden_states, **read.arguments).contributions(head)
    assert queries == list(range(context.position - 2, context.position + 1))
    assert keys == sorted(keys) and keys[-3:] == queries and int(full[context.position].abs().argmax()) in keys
    assert torch.equal(matrix, full[queries][:, keys])
