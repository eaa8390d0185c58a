"""Text sources, packing with an exact resume position, and the base-model activation source."""

from __future__ import annotations

import json

import pytest
import torch

from lorsa_hf.adapters import get_adapter
from lorsa_hf.training.activations import (
    ActivationSource,
    FileTextSource,
    ListTextSource,
    PackerState,
    SequencePacker,
    SkipTextSource,
    TakeTextSource,
    batches,
    loss_mask,
)

from .conftest import make_model, make_text


def documents():
    texts = make_text(30, seed=5)
    texts[7] = "\n".join(make_text(150, seed=6))  # a long document, tokenized in pieces
    return texts


def test_packed_rows_are_the_document_stream(tokenizer):
    texts = documents()
    rows = list(SequencePacker(ListTextSource(texts), tokenizer, context_length=24))
    assert rows and all(len(ids) == 24 and ids[0] == tokenizer.bos_token_id and sum(m) == 24 for ids, m in rows)
    stream = [t for ids, _ in rows for t in ids[1:]]
    assert 1 < sum(t == tokenizer.eos_token_id for t in stream)
    text_back = tokenizer.decode(stream)
    assert text_back.startswith(texts[0] + tokenizer.eos_token + texts[1])


@pytest.mark.parametrize("stop", [0, 3, 40, 95])
def test_packer_state_resumes_exactly(tokenizer, stop):
    texts = documents()
    full = list(SequencePacker(ListTextSource(texts), tokenizer, context_length=24))
    assert len(full) > 100
    packer = SequencePacker(ListTextSource(texts), tokenizer, context_length=24)
    for index, _ in enumerate(packer):
        if index == stop:
            break
    state = PackerState.from_dict(json.loads(json.dumps(packer.state.to_dict())))
    resumed = list(SequencePacker(ListTextSource(texts), tokenizer, context_length=24, state=state))
    assert resumed == full[stop + 1 :]


def test_unpacked_rows_are_padded_and_masked(tokenizer):
    rows = list(SequencePacker(ListTextSource(["Alice sat", "x " * 100]), tokenizer, context_length=16, pack=False))
    (ids, mask), (long_ids, long_mask) = rows
    length = sum(mask)
    assert ids[0] == tokenizer.bos_token_id and ids[length:] == [tokenizer.pad_token_id] * (16 - length)
    assert mask == [1] * length + [0] * (16 - length) and sum(long_mask) == 16
    ids_t, mask_t = torch.tensor([ids]), torch.tensor([mask])
    expected = [False] + [True] * (length - 1) + [False] * (16 - length)
    assert loss_mask(ids_t, mask_t, tokenizer.bos_token_id)[0].tolist() == expected


def test_batches_drop_the_incomplete_last_batch(tokenizer):
    packer = SequencePacker(ListTextSource(documents()), tokenizer, context_length=24)
    rows = len(list(SequencePacker(ListTextSource(documents()), tokenizer, context_length=24)))
    found = list(batches(packer, 8))
    assert len(found) == rows // 8 and found[0][0].shape == (8, 24)


def test_file_sources_and_held_out_split(tmp_path):
    (tmp_path / "a.txt").write_text("one\n\ntwo\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "three"}) + "\n" + json.dumps({"body": "four"}) + "\n")
    source = FileTextSource([tmp_path / "a.txt", tmp_path / "b.jsonl"], text_field="body")
    assert list(source.documents()) == ["one", "two", "three", "four"]
    assert list(source.documents(3)) == ["four"]
    assert list(TakeTextSource(source, 2).documents()) == ["one", "two"]
    assert list(SkipTextSource(source, 2).documents(1)) == ["four"]
    with pytest.raises(KeyError, match="data.text_field"):
        list(FileTextSource([tmp_path / "b.jsonl"]).documents())
    (tmp_path / "c.csv").write_text("x\n")
    with pytest.raises(ValueError, match="must end in .txt"):
        FileTextSource([tmp_path / "c.csv"])
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        FileTextSource([tmp_path / "missing.txt"])


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_activation_source_captures_attention_and_stops_early(tokenizer, arch):
    model = make_model(arch, tokenizer, layers=4)
    adapter = get_adapter(model)
    ids = torch.randint(3, len(tokenizer), (2, 12))
    attention = torch.ones_like(ids)
    reference = {}

    def keep(layer):
        def hook(module, args, kwargs, output):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            reference[layer] = (hidden.clone(), output[0].clone())

        return hook

    handles = [adapter.get_attention(model, i).register_forward_hook(keep(i), with_kwargs=True) for i in range(4)]
    with torch.no_grad():
        model(input_ids=ids, attention_mask=attention)
    for handle in handles:
        handle.remove()

    ran = []
    later = adapter.decoder_layers(model)[3].register_forward_pre_hook(lambda *args: ran.append(3))
    captured = ActivationSource(model, [2, 0])(ids, attention)
    later.remove()
    assert sorted(captured) == [0, 2] and ran == []
    for layer in (0, 2):
        assert torch.equal(captured[layer].inputs, reference[layer][0])
        assert torch.equal(captured[layer].outputs, reference[layer][1])
    assert all(not p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="layers 0..3"):
        ActivationSource(model, [4])


@pytest.mark.parametrize("streaming", [False, True])
def test_hf_dataset_source_from_a_local_folder(tmp_path, streaming):
    from lorsa_hf.training.activations import HFDatasetSource

    folder = tmp_path / "dataset"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps({"content": f"doc {i}"}) + "\n" for i in range(5)))
    (folder / "test.jsonl").write_text(json.dumps({"content": "held out"}) + "\n")
    source = HFDatasetSource(str(folder), split="train", text_field="content", streaming=streaming)
    assert list(source.documents()) == [f"doc {i}" for i in range(5)]
    assert list(source.documents(3)) == ["doc 3", "doc 4"]
    assert list(HFDatasetSource(str(folder), split="test", text_field="content").documents()) == ["held out"]
    if not streaming:
        with pytest.raises(KeyError, match="no column 'text'"):
            HFDatasetSource(str(folder), split="train")
