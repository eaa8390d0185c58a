"""Eval data: held-out text packed into fixed-length token rows, and which positions count.

Rows are packed without padding (documents joined with the end-of-text token), each starting with the BOS
token, so every position is real text. Metrics skip the positions that hold the BOS token (and any padding
token, for batches built elsewhere), as in training.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase


@dataclass
class EvalBatches:
    """Token rows for the evals: `mean_rows` (for mean ablation) and `eval_rows` never share a token."""

    eval_rows: list[torch.Tensor]
    mean_rows: list[torch.Tensor]
    exclude_token_ids: tuple[int, ...]
    seq_len: int

    @property
    def n_eval_tokens(self) -> int:
        return sum(row.numel() for row in self.eval_rows)

    @property
    def n_mean_tokens(self) -> int:
        return sum(row.numel() for row in self.mean_rows)


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    """The BOS and padding token ids of a tokenizer (those it has)."""
    ids = {tokenizer.bos_token_id, tokenizer.pad_token_id}
    return tuple(sorted(i for i in ids if i is not None))


def row_start_token(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The token every packed row starts with: BOS, else end-of-text (as models without BOS are trained)."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def pack_texts(
    texts: Iterable[str],
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int,
    n_tokens: int,
    mean_tokens: int = 0,
    batch_size: int = 8,
) -> EvalBatches:
    """Tokenise `texts` in order and pack them into rows of `seq_len` tokens: first `mean_tokens` worth of rows
    for the mean-ablation statistics, then `n_tokens` worth for the metrics, in batches of `batch_size` rows."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}.")
    start = row_start_token(tokenizer)
    separator = tokenizer.eos_token_id
    body = seq_len - (start is not None)
    n_mean_rows = -(-mean_tokens // seq_len) if mean_tokens > 0 else 0
    n_eval_rows = max(1, -(-n_tokens // seq_len))
    wanted = (n_mean_rows + n_eval_rows) * body
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if separator is not None:
            stream.append(separator)
        if len(stream) >= wanted:
            break
    n_rows = len(stream) // body
    if n_rows < n_mean_rows + 1:
        raise ValueError(
            f"The eval text has {len(stream)} tokens: not enough for {n_mean_rows} mean-ablation rows and at least "
            f"one eval row of {seq_len} tokens. Pass more text or lower --tokens / --mean-tokens / --seq-len."
        )
    rows = torch.tensor(stream[: n_rows * body], dtype=torch.long).view(n_rows, body)
    if start is not None:
        rows = torch.cat([torch.full((n_rows, 1), start, dtype=torch.long), rows], dim=1)
    mean_part, eval_part = rows[:n_mean_rows], rows[n_mean_rows : n_mean_rows + n_eval_rows]
    return EvalBatches(
        eval_rows=list(eval_part.split(batch_size)),
        mean_rows=list(mean_part.split(batch_size)) if n_mean_rows else [],
        exclude_token_ids=tuple(sorted(set(special_token_ids(tokenizer)) | ({start} if start is not None else set()))),
        seq_len=seq_len,
    )


def position_mask(input_ids: torch.Tensor, exclude_token_ids: Sequence[int]) -> torch.Tensor:
    """True at the positions that count: every position whose token is not BOS or padding. [B, T] bool."""
    mask = torch.ones_like(input_ids, dtype=torch.bool)
    for token in set(exclude_token_ids):
        mask &= input_ids != token
    return mask


__all__ = ["EvalBatches", "pack_texts", "position_mask", "row_start_token", "special_token_ids"]
