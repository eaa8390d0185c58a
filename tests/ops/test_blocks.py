"""Blocks of query rows skip the keys a causal mask hides from the whole block."""

from __future__ import annotations

import torch

from lorsa_hf.ops.blocks import query_blocks


def test_blocked_attention_skips_the_keys_a_causal_block_cannot_see():
    causal = torch.ones(256, 256, dtype=torch.bool).tril()[None, None]
    # (first row, end row, keys seen, first key column to mask)
    assert query_blocks(causal, 256, 256) == [
        (0, 64, 64, 1), (64, 128, 128, 65), (128, 192, 192, 129), (192, 256, 256, 193)
    ]
    after_prefix = torch.ones(64, 320, dtype=torch.bool).tril(256)[None, None]
    assert query_blocks(after_prefix, 64, 320) == [(0, 64, 320, 257)]
    assert query_blocks(None, 1, 300) == [(0, 1, 300, 300)]  # a decode step sees every cached key
