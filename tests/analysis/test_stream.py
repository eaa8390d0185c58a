"""Streaming a corpus through the spliced model up to the analysed layer fills the store exactly as running the
whole model on every row at once would, and a resumed or split run gives the same store."""

from __future__ import annotations

import itertools

import pytest
import torch

from lorsa_hf.analysis import CorpusOptions, HeadActivationStore, analyze_corpus, gather_store
from lorsa_hf.analysis.reading import LayerReader, spliced_at
from lorsa_hf.analysis.stream import counted_positions
from lorsa_hf.training import ListTextSource, SequencePacker


def assert_same_store(one: HeadActivationStore, other: HeadActivationStore) -> None:
    for name in ("primary", "row", "position", "value"):
        assert torch.equal(getattr(one.top, name), getattr(other.top, name)), name
        assert torch.equal(getattr(one.sample, name), getattr(other.sample, name)), name
    assert torch.equal(one.n_active, other.n_active)
    assert torch.allclose(one.activation_sum, other.activation_sum, rtol=0, atol=1e-9)
    assert one.n_tokens == other.n_tokens


def brute_force(model, lorsa, tokenizer, texts, n_rows, seq_len):
    """The whole spliced model run on all rows at once, activations read from the Lorsa layer's output."""
    rows = list(itertools.islice(SequencePacker(ListTextSource(texts), tokenizer, seq_len), n_rows))
    ids = torch.tensor([tokens for tokens, _ in rows])
    mask = torch.tensor([m for _, m in rows])
    captured = {}
    with spliced_at(model, lorsa, 1) as module:
        handle = module.register_forward_hook(lambda m, a, o: captured.update(out=o))
        handle_pre = module.register_forward_pre_hook(
            lambda m, a, kw: (a, {**kw, "output_activations": True}), with_kwargs=True
        )
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
        handle.remove()
        handle_pre.remove()
    store = HeadActivationStore.create(lorsa.config.n_ov_heads, 1, top_n=5, sample_size=6)
    counted = counted_positions(ids, mask, [tokenizer.bos_token_id])
    store.update(ids, torch.arange(len(rows)), counted, captured["out"].top_k_values, captured["out"].top_k_indices)
    return store


def test_a_streamed_corpus_gives_the_brute_force_store(model, lorsa, tokenizer, texts):
    options = CorpusOptions(seq_len=16, n_tokens=16 * 10, batch_size=3)
    store = analyze_corpus(model, lorsa, 1, texts, tokenizer, options, top_n=5, sample_size=6, progress=False)
    assert_same_store(store, brute_force(model, lorsa, tokenizer, texts, 10, 16))
    assert store.metadata["rows_read"] == 10


def test_the_forward_stops_after_the_analysed_layer(model, lorsa, tokenizer):
    ran = []
    for index, layer in enumerate(model.model.layers):
        layer.register_forward_hook(lambda m, a, o, index=index: ran.append(index))
    with spliced_at(model, lorsa, 1) as module:
        LayerReader(model, module)(torch.tensor([[0, 5, 6, 7]]))
    assert ran == [0]  # layer 1 stops inside its attention; layer 2 never runs
    assert model.model.layers[1].self_attn.__class__.__name__ != "LorsaSplicedAttention"


def test_a_resumed_run_and_two_processes_merged_give_the_single_run_store(model, lorsa, tokenizer, texts, tmp_path):
    single = analyze_corpus(model, lorsa, 1, texts, tokenizer, CorpusOptions(16, 16 * 9, 2), top_n=5,
                            sample_size=6, progress=False)
    first = analyze_corpus(model, lorsa, 1, texts, tokenizer, CorpusOptions(16, 16 * 4, 2), top_n=5,
                           sample_size=6, progress=False)
    first.save(tmp_path / "store.safetensors")
    resumed = analyze_corpus(model, lorsa, 1, texts, tokenizer, CorpusOptions(16, 16 * 9, 2),
                             store=HeadActivationStore.load(tmp_path / "store.safetensors"), progress=False)
    assert_same_store(resumed, single)
    halves = [
        analyze_corpus(model, lorsa, 1, texts, tokenizer, CorpusOptions(16, 16 * 9, 2, rank=rank, world_size=2),
                       top_n=5, sample_size=6, progress=False)
        for rank in (0, 1)
    ]
    assert_same_store(gather_store(halves[0], None).merge(halves[1]), single)


def test_a_layer_the_lorsa_does_not_replace_is_refused(model, lorsa, tokenizer, texts):
    with pytest.raises(ValueError, match=r"does not replace layer 2: it replaces layers \[1\]"):
        analyze_corpus(model, lorsa, 2, texts, tokenizer, CorpusOptions(16, 64), progress=False)


@pytest.mark.parametrize("texts", [[], ["", "  "]])
def test_an_empty_corpus_is_refused(model, lorsa, tokenizer, texts):
    with pytest.raises(ValueError, match="corpus is empty"):
        analyze_corpus(model, lorsa, 1, texts, tokenizer, CorpusOptions(16, 64), progress=False)


def test_a_corpus_too_short_for_one_row_is_refused(model, lorsa, tokenizer):
    with pytest.raises(ValueError, match="gave no tokens"):
        analyze_corpus(model, lorsa, 1, ["a cat"], tokenizer, CorpusOptions(64, 640), progress=False)
