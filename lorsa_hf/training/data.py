"""Text to train on: document sources and packing into fixed-length token rows, built from the data section.

Text sources iterate documents from any document index, so a resumed run continues exactly where the killed
one stopped. `SequencePacker` turns documents into fixed-length rows and records its position (documents
consumed and the tokens left over) after every row. `packer` is the one place a packer is built from a
recipe's `data` section.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from .recipe import DataSection


class TextSource:
    """Documents in a fixed order; `documents(start)` skips the first `start` of them."""

    def documents(self, start: int = 0) -> Iterator[str]:
        raise NotImplementedError


class ListTextSource(TextSource):
    """Documents held in memory (the embedded corpus, tests)."""

    def __init__(self, texts: Sequence[str]) -> None:
        self.texts = list(texts)

    def documents(self, start: int = 0) -> Iterator[str]:
        return iter(self.texts[start:])


class FileTextSource(TextSource):
    """`.txt` files (one document per non-empty line) and `.jsonl` files (one JSON object per line, text in
    `text_field`), read in the order given."""

    def __init__(self, paths: Sequence[str | Path], text_field: str = "text") -> None:
        self.paths = [Path(p) for p in paths]
        self.text_field = text_field
        for path in self.paths:
            if not path.is_file():
                raise FileNotFoundError(f"Text file {path} does not exist.")
            if path.suffix not in (".txt", ".jsonl"):
                raise ValueError(f"Text file {path} must end in .txt (one document per line) or .jsonl.")

    def _all(self) -> Iterator[str]:
        for path in self.paths:
            with path.open(encoding="utf-8") as handle:
                for number, line in enumerate(handle, 1):
                    if not line.strip():
                        continue
                    if path.suffix == ".txt":
                        yield line.rstrip("\n")
                        continue
                    record = json.loads(line)
                    if self.text_field not in record:
                        raise KeyError(f"{path}:{number} has no field {self.text_field!r} (set data.text_field).")
                    yield record[self.text_field]

    def documents(self, start: int = 0) -> Iterator[str]:
        return itertools.islice(self._all(), start, None)


class HFDatasetSource(TextSource):
    """A Hugging Face dataset (Hub id or local path), optionally streamed."""

    def __init__(
        self, path: str, split: str = "train", config_name: str | None = None, text_field: str = "text",
        streaming: bool = False,
    ) -> None:
        try:
            import datasets
        except ImportError as error:
            raise ImportError("data.source 'hf' needs the datasets package: pip install 'lorsa-hf[train]'.") from error
        self.dataset = datasets.load_dataset(path, config_name, split=split, streaming=streaming)
        self.text_field = text_field
        columns = getattr(self.dataset, "column_names", None)
        if columns is not None and text_field not in columns:
            raise KeyError(f"Dataset {path} ({split}) has no column {text_field!r}; columns: {columns}.")

    def documents(self, start: int = 0) -> Iterator[str]:
        dataset = self.dataset.skip(start) if start else self.dataset
        return (record[self.text_field] for record in dataset)


class SkipTextSource(TextSource):
    """Another source without its first `skip` documents (the training side of a held-out split)."""

    def __init__(self, source: TextSource, skip: int) -> None:
        self.source, self.skip = source, skip

    def documents(self, start: int = 0) -> Iterator[str]:
        return self.source.documents(self.skip + start)


class TakeTextSource(TextSource):
    """The first `take` documents of another source (a held-out split)."""

    def __init__(self, source: TextSource, take: int) -> None:
        self.source, self.take = source, take

    def documents(self, start: int = 0) -> Iterator[str]:
        return itertools.islice(self.source.documents(start), max(self.take - start, 0))


class RepeatedTextSource(TextSource):
    """`epochs` passes over another source, read as one document sequence: a run longer than its corpus sees
    every document once per pass, in the same order, and rows pack across the boundary between passes."""

    def __init__(self, source: TextSource, epochs: int) -> None:
        self.source, self.epochs = source, epochs

    def documents(self, start: int = 0) -> Iterator[str]:
        index = 0
        for _ in range(self.epochs):
            for text in self.source.documents(0):
                if index >= start:
                    yield text
                index += 1


@dataclass
class PackerState:
    """Where a packer stands: documents fully read, pieces read of the current one, tokens not yet in a row."""

    documents_consumed: int = 0
    pieces_consumed: int = 0
    buffer: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "documents_consumed": self.documents_consumed, "pieces_consumed": self.pieces_consumed,
            "buffer": list(self.buffer),
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PackerState:
        buffer = [int(t) for t in values["buffer"]]
        return cls(int(values["documents_consumed"]), int(values["pieces_consumed"]), buffer)


def split_pieces(text: str, max_chars: int = 4000) -> list[str]:
    """Cut a document at line ends into pieces of at most about `max_chars` characters (their concatenation is
    the document), so that a book-length document is tokenized, and its position recorded, piece by piece."""
    if len(text) <= max_chars:
        return [text]
    pieces, current = [], ""
    for line in text.splitlines(keepends=True):
        if current and len(current) + len(line) > max_chars:
            pieces.append(current)
            current = ""
        current += line
    if current:
        pieces.append(current)
    return pieces


class SequencePacker:
    """Tokenize documents and cut them into rows of `context_length` tokens.

    Packed (default): documents are concatenated, each followed by EOS, and every row starts with BOS (when
    `prepend_bos` and the tokenizer has one). Long documents are tokenized in pieces cut at line ends.
    Unpacked: one row per document, truncated, right-padded. Each row comes with its attention mask
    (0 = padding). `state`, read right after a row, resumes right after that row.
    """

    def __init__(
        self,
        source: TextSource,
        tokenizer: PreTrainedTokenizerBase,
        context_length: int,
        pack: bool = True,
        prepend_bos: bool = True,
        state: PackerState | None = None,
    ) -> None:
        self.source = source
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.pack = pack
        self.bos = tokenizer.bos_token_id if prepend_bos else None
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.eos or 0)
        self.state = state or PackerState()

    def _tokens(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def __iter__(self) -> Iterator[tuple[list[int], list[int]]]:
        state = self.state
        prefix = [self.bos] if self.bos is not None else []
        body = self.context_length - len(prefix)
        documents = self.source.documents(state.documents_consumed)
        if not self.pack:
            for text in documents:
                tokens = (prefix + self._tokens(text))[: self.context_length]
                state.documents_consumed += 1
                padding = self.context_length - len(tokens)
                yield tokens + [self.pad] * padding, [1] * len(tokens) + [0] * padding
            return
        buffer = list(state.buffer)
        for text in documents:
            pieces = split_pieces(text)
            for index in range(state.pieces_consumed, len(pieces)):
                buffer.extend(self._tokens(pieces[index]))
                if index == len(pieces) - 1:
                    if self.eos is not None:
                        buffer.append(self.eos)
                    state.documents_consumed += 1
                    state.pieces_consumed = 0
                else:
                    state.pieces_consumed = index + 1
                while len(buffer) >= body:
                    row, buffer = buffer[:body], buffer[body:]
                    state.buffer = list(buffer)
                    yield prefix + row, [1] * self.context_length
            state.pieces_consumed = 0
        state.buffer = buffer


def batches(
    packer: SequencePacker, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor, PackerState]]:
    """Rows grouped into [batch_size, T] `input_ids` and `attention_mask`, with the packer state after them.

    A final incomplete batch is dropped, so every step sees the same number of rows.
    """
    rows = iter(packer)
    while True:
        chunk = list(itertools.islice(rows, batch_size))
        if len(chunk) < batch_size:
            return
        ids = torch.tensor([row for row, _ in chunk], dtype=torch.long)
        mask = torch.tensor([m for _, m in chunk], dtype=torch.long)
        yield ids, mask, PackerState.from_dict(packer.state.to_dict())


def loss_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor, bos_token_id: int | None) -> torch.Tensor:
    """True on the positions the loss and metrics count: not padding, not BOS (they still act as keys)."""
    mask = attention_mask.bool()
    if bos_token_id is not None:
        mask = mask & (input_ids != bos_token_id)
    return mask


def packer(
    source: TextSource, tokenizer: PreTrainedTokenizerBase, data: DataSection, state: PackerState | None = None
) -> SequencePacker:
    """The packer a recipe's `data` section describes, reading `source` from `state` (the start when None)."""
    return SequencePacker(source, tokenizer, data.context_length, data.pack, data.prepend_bos, state=state)


def text_sources(data: DataSection) -> tuple[TextSource, TextSource]:
    """(training, held-out) text for a recipe's `data` section; the two never share a document, and the
    training text is read `data.epochs` times (the held-out text never repeats)."""
    train, heldout = _split_sources(data)
    return (train if data.epochs == 1 else RepeatedTextSource(train, data.epochs)), heldout


def _split_sources(data: DataSection) -> tuple[TextSource, TextSource]:
    """One pass of the training text, and the held-out text."""
    if data.source == "embedded":
        from ..embedded import embedded_corpus

        return ListTextSource(embedded_corpus("train")), ListTextSource(embedded_corpus("heldout"))
    if data.source == "hf":
        train = HFDatasetSource(data.path, data.split, data.config_name, data.text_field, data.streaming)
        if data.heldout_split:
            heldout = HFDatasetSource(data.path, data.heldout_split, data.config_name, data.text_field, data.streaming)
            return train, heldout
    else:
        train = FileTextSource(data.files, data.text_field)
        if data.heldout_files:
            return train, FileTextSource(data.heldout_files, data.text_field)
    return SkipTextSource(train, data.heldout_documents), TakeTextSource(train, data.heldout_documents)


def first_batch(
    source: TextSource, tokenizer: PreTrainedTokenizerBase, data: DataSection, rows: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The first `rows` rows of `source` as one batch (calibration rows), or None when it has fewer."""
    found = next(batches(packer(source, tokenizer, data), rows), None)
    return None if found is None else found[:2]


def heldout_batches(
    source: TextSource, tokenizer: PreTrainedTokenizerBase, data: DataSection, eval_sequences: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The held-out batches every evaluation runs on: at least `eval_sequences` rows, in whole batches."""
    count = max(1, math.ceil(eval_sequences / data.batch_size))
    rows = itertools.islice(batches(packer(source, tokenizer, data), data.batch_size), count)
    found = [(ids, attention) for ids, attention, _ in rows]
    if not found:
        raise ValueError(
            f"The held-out text gives fewer than data.batch_size={data.batch_size} rows of "
            f"{data.context_length} tokens: hold out more documents (data.heldout_documents)."
        )
    return found


__all__ = [
    "FileTextSource", "HFDatasetSource", "ListTextSource", "PackerState", "SequencePacker", "SkipTextSource",
    "TakeTextSource", "TextSource", "batches", "first_batch", "heldout_batches", "loss_mask", "packer",
    "split_pieces", "text_sources",
]
