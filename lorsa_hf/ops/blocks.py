"""Blocks of query rows for the fast attention, and the softmax pattern of one block.

The fast attention (`lorsa_hf.ops.attention`) runs its forward and both backward routes block by block, each
block against only the keys its mask lets some row of it see, so that it neither does the work a causal mask
makes void nor keeps a [T, S] pattern.
"""

from __future__ import annotations

import torch

ATTENTION_BLOCK_ROWS = 64


def query_blocks(mask: torch.Tensor | None, query_length: int, key_length: int) -> list[tuple[int, int, int, int]]:
    """Blocks of query rows [start, stop) with the number of leading keys `end` that some row of the block may
    see, and the first key column `masked_from` that some row of the block may not see. Under a causal mask
    the keys after `end` are masked for the whole block, so it skips them (with blocks of 64 rows at
    T = S = 256 the attention does 62.5% of the full T x S work), and only the columns from `masked_from` on
    (the block's diagonal) need the mask. Both are read from the mask, so no key a row may see is skipped."""
    rows = max(ATTENTION_BLOCK_ROWS, -(-query_length // 8))
    starts = range(0, query_length, rows)
    if mask is None:
        return [(start, min(start + rows, query_length), key_length, key_length) for start in starts]
    mask = mask.reshape(-1, query_length, key_length)
    seen, hidden = mask.any(0), ~mask.all(0)  # [T, S]: a key some sequence's row may see / may not see
    blocks = []
    for start in starts:
        stop = min(start + rows, query_length)
        visible, masked = seen[start:stop].any(0).nonzero(), hidden[start:stop].any(0).nonzero()
        end = int(visible[-1]) + 1 if len(visible) else 1
        blocks.append((start, stop, end, min(int(masked[0]), end) if len(masked) else end))
    return blocks


def one_sequence_mask(mask: torch.Tensor | None, b: int) -> torch.Tensor | None:
    """Sequence b's [T, S] slice of a boolean mask [B or 1, 1, T, S] (None stays None)."""
    return None if mask is None else mask[b if mask.shape[0] > 1 else 0, 0]


def block_pattern(
    query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, block: tuple[int, int, int, int],
    scale: float, empty_rows: bool,
) -> torch.Tensor:
    """Softmax pattern P [H, rows, end] of one sequence's query rows start:stop (q [H, T, d_qk]) against its first
    `end` keys (k [H, S, d_qk]); mask [T, S] or None. Rows that may see no key (`empty_rows`) get zeros."""
    start, stop, end, masked_from = block
    logits = torch.matmul(query[:, start:stop], key[:, :end].transpose(-1, -2)).mul_(scale)
    if mask is not None and masked_from < end:
        hidden = ~mask[start:stop, masked_from:end]
        logits[..., masked_from:].masked_fill_(hidden, torch.finfo(logits.dtype).min)
    pattern = torch.softmax(logits, dim=-1)
    if empty_rows:
        pattern.masked_fill_(~mask[start:stop, :end].any(-1, keepdim=True), 0.0)
    return pattern
