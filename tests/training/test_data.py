"""Text sources, packing with an exact resume position, and the packer a recipe's data section describes."""

from __future__ import annotations

import json

import pytest
import torch

from lorsa_hf.training.data import (
    FileTextSource,
    ListTextSource,
    PackerState,
    RepeatedTextSource,
    SequencePacker,
    SkipTextSource,
    TakeTextSource,
    batches,
    heldout_batches,
    loss_mask,
    packer,
    text_sources,
)
from lorsa_hf.training.recipe import DataSection

from .conftest import make_text


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


@pytest.mark.parametrize("streaming", [False, True])
def test_hf_dataset_source_from_a_local_folder(tmp_path, streaming):
    from lorsa_hf.training.data import HFDatasetSource

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


def test_packer_follows_the_data_section(tokenizer):
    texts = documents()
    data = DataSection(context_length=16, pack=False, prepend_bos=False)
    direct = list(SequencePacker(ListTextSource(texts), tokenizer, context_length=16, pack=False, prepend_bos=False))
    assert list(packer(ListTextSource(texts), tokenizer, data)) == direct
    assert list(packer(ListTextSource(texts), tokenizer, data, PackerState(documents_consumed=4))) == direct[4:]


def test_heldout_batches_are_whole_batches_covering_eval_sequences(tokenizer):
    data = DataSection(context_length=24, batch_size=8)
    found = heldout_batches(ListTextSource(documents()), tokenizer, data, eval_sequences=20)
    assert len(found) == 3 and all(ids.shape == (8, 24) for ids, _ in found)
    with pytest.raises(ValueError, match="hold out more documents"):
        heldout_batches(ListTextSource(["Alice sat"]), tokenizer, data, eval_sequences=8)


def test_epochs_read_the_training_text_again_and_never_the_heldout(tmp_path):
    (tmp_path / "train.txt").write_text("one\ntwo\nthree\n")
    (tmp_path / "heldout.txt").write_text("held\n")
    files = {"files": [str(tmp_path / "train.txt")], "heldout_files": [str(tmp_path / "heldout.txt")]}
    data = DataSection(source="files", **files)
    train, heldout = text_sources(DataSection(**{**vars(data), "epochs": 3}))
    assert list(train.documents()) == ["one", "two", "three"] * 3
    assert list(train.documents(4)) == ["two", "three", "one", "two", "three"]
    assert list(heldout.documents()) == ["held"]
    assert list(text_sources(data)[0].documents()) == ["one", "two", "three"]


@pytest.mark.parametrize("where", ["first pass", "at the boundary", "second pass"])
def test_packing_runs_across_the_pass_boundary_and_resumes_exactly(tokenizer, where):
    texts = documents()
    once = list(SequencePacker(ListTextSource(texts), tokenizer, context_length=24))
    twice = list(SequencePacker(RepeatedTextSource(ListTextSource(texts), 2), tokenizer, context_length=24))
    assert len(twice) in (2 * len(once), 2 * len(once) + 1) and twice[: len(once)] == once
    stop = {"first pass": 5, "at the boundary": len(once) - 1, "second pass": len(once) + 7}[where]
    stream = [t for ids, _ in twice for t in ids[1:]]
    single = [t for ids, _ in once for t in ids[1:]]
    assert stream[len(single) : len(single) + 50] != single[:50]  # the leftover tokens carry into the second pass
    packer = SequencePacker(RepeatedTextSource(ListTextSource(texts), 2), tokenizer, context_length=24)
    for index, _ in enumerate(packer):
        if index == stop:
            break
    state = PackerState.from_dict(json.loads(json.dumps(packer.state.to_dict())))
    resumed = SequencePacker(RepeatedTextSource(ListTextSource(texts), 2), tokenizer, context_length=24, state=state)
    assert list(resumed) == twice[stop + 1 :]
