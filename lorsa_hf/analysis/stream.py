"""Stream a corpus through a base model with a Lorsa spliced into one layer, into a `HeadActivationStore`.

Rows are numbered in corpus order; that number identifies a context everywhere (ties, merges, resumes). With
`world_size` processes, process `rank` takes the rows whose number is `rank` modulo `world_size`, and
`gather_store` merges their stores. A store saved by `analyze_corpus` records how many rows it has read and the
packer's position after them, so a second call with that store continues where the first stopped.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..modeling_lorsa import LorsaForReplacement
from ..training import ListTextSource, PackerState, SequencePacker
from .reading import LayerReader, spliced_at
from .store import HeadActivationStore


@dataclass
class CorpusOptions:
    """How a corpus becomes rows: `seq_len` tokens each, `n_tokens` in all (rounded down to whole rows),
    `batch_size` rows per forward; `rank` / `world_size` split the rows between processes."""

    seq_len: int = 256
    n_tokens: int = 1_048_576
    batch_size: int = 8
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if self.seq_len <= 1 or self.batch_size <= 0:
            raise ValueError(f"seq_len must exceed 1 and batch_size be positive, got {self.seq_len}/{self.batch_size}.")
        if self.n_tokens < self.seq_len:
            raise ValueError(f"n_tokens ({self.n_tokens}) must be at least one row of seq_len ({self.seq_len}) tokens.")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in 0..world_size-1, got rank {self.rank} of {self.world_size}.")

    @property
    def n_rows(self) -> int:
        return self.n_tokens // self.seq_len


def counted_positions(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, exclude_token_ids: Sequence[int]
) -> torch.Tensor:
    """[B, T] True where a position counts: not padding, not one of `exclude_token_ids` (BOS)."""
    counted = attention_mask.bool()
    for token in exclude_token_ids:
        counted &= input_ids != token
    return counted


def _rows(
    texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, options: CorpusOptions, store: HeadActivationStore
) -> Iterator[tuple[int, list[int], list[int], PackerState]]:
    """(row number, tokens, mask, packer state right after the row), from where `store` stopped."""
    state = store.metadata.get("packer_state")
    packer = SequencePacker(
        ListTextSource(texts), tokenizer, options.seq_len, state=PackerState.from_dict(state) if state else None
    )
    row_id = int(store.metadata.get("rows_read", 0))
    if row_id >= options.n_rows:
        return
    for tokens, mask in packer:
        yield row_id, tokens, mask, PackerState.from_dict(packer.state.to_dict())
        row_id += 1
        if row_id >= options.n_rows:
            return


@dataclass
class _Batch:
    row_ids: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    rows_read: int
    packer_state: PackerState


def _batches(rows: Iterator, options: CorpusOptions) -> Iterator[_Batch]:
    """This process's rows in batches, each with the number of rows read and the packer state after it."""
    chunk: list[tuple[int, list[int], list[int]]] = []
    last = None
    for row_id, tokens, mask, state in rows:
        last = (row_id + 1, state)
        if row_id % options.world_size == options.rank:
            chunk.append((row_id, tokens, mask))
        if len(chunk) == options.batch_size:
            yield _Batch(*(torch.tensor(column) for column in zip(*chunk, strict=True)), *last)
            chunk = []
    if chunk:
        yield _Batch(*(torch.tensor(column) for column in zip(*chunk, strict=True)), *last)


def analyze_corpus(
    model: PreTrainedModel,
    lorsa: LorsaForReplacement,
    layer: int,
    texts: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    options: CorpusOptions | None = None,
    store: HeadActivationStore | None = None,
    top_n: int = 16,
    sample_size: int = 32,
    progress: bool = True,
) -> HeadActivationStore:
    """Every head's top and sampled activations, frequency and mean over `texts`, for Lorsa layer `layer`.

    Only the base model's layers up to `layer` run. BOS positions and padding do not count. Pass a `store`
    that an earlier call returned (or `HeadActivationStore.load`) to continue it.
    """
    options = options or CorpusOptions()
    if not texts or not any(text.strip() for text in texts):
        raise ValueError("The corpus is empty: pass at least one non-empty text to analyse.")
    n_heads = lorsa.config.n_ov_heads
    store = store or HeadActivationStore.create(n_heads, layer, top_n=top_n, sample_size=sample_size)
    if store.layer != layer or store.n_heads != n_heads:
        raise ValueError(f"The store holds layer {store.layer} ({store.n_heads} heads), not layer {layer} ({n_heads}).")
    if store.metadata.get("seq_len", options.seq_len) != options.seq_len:
        raise ValueError(
            f"The store was filled with rows of {store.metadata['seq_len']} tokens; continue it with that seq_len, "
            f"not {options.seq_len}."
        )
    exclude = [t for t in (tokenizer.bos_token_id,) if t is not None]
    rows_read = int(store.metadata.get("rows_read", 0))
    store.metadata.update(seq_len=options.seq_len, world_size=options.world_size)
    with spliced_at(model, lorsa, layer) as module:
        reader = LayerReader(model, module)
        bar = tqdm(total=options.n_rows * options.seq_len, initial=rows_read * options.seq_len, unit="tok",
                   disable=not progress, desc=f"layer {layer}")
        for batch in _batches(_rows(texts, tokenizer, options, store), options):
            output = reader(batch.input_ids, batch.attention_mask).output
            counted = counted_positions(batch.input_ids, batch.attention_mask, exclude)
            store.update(batch.input_ids, batch.row_ids, counted, output.top_k_values, output.top_k_indices)
            bar.update((batch.rows_read - rows_read) * options.seq_len)
            rows_read = batch.rows_read
            store.metadata.update(rows_read=rows_read, packer_state=batch.packer_state.to_dict())
        bar.close()
    if store.n_tokens == 0:
        raise ValueError(
            f"The corpus gave no tokens to analyse (rows of {options.seq_len} tokens): pass more text or a "
            "smaller seq_len."
        )
    return store


def gather_store(store: HeadActivationStore, accelerator: object) -> HeadActivationStore:
    """The merge of every process's store (each process gets the same result), through `accelerate`."""
    from accelerate.utils import gather_object

    states = gather_object([store.state()]) if getattr(accelerator, "num_processes", 1) > 1 else [store.state()]
    merged = HeadActivationStore.from_state(states[0])
    for state in states[1:]:
        merged = merged.merge(HeadActivationStore.from_state(state))
    return merged


__all__ = ["CorpusOptions", "analyze_corpus", "counted_positions", "gather_store"]
