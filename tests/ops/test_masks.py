"""Every attention-mask form transformers hands an attention module means the same thing to a Lorsa."""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import create_block_mask

from lorsa_hf.ops.masks import boolean_attention_mask, group_attention


def expected_mask(padding: torch.Tensor, query_length: int) -> torch.Tensor:
    """[B, S] padding -> [B, 1, T, S]: the last T positions read real keys at or before themselves."""
    key_length = padding.shape[1]
    causal = torch.ones(query_length, key_length, dtype=torch.bool).tril(key_length - query_length)
    return (causal[None] & padding.bool()[:, None, :])[:, None]


PADDING = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])


def test_none_means_causal_and_a_single_query_reads_everything():
    assert torch.equal(boolean_attention_mask(None, 2, 6, 6, torch.device("cpu"))[0, 0], torch.ones(6, 6).tril().bool())
    chunk = boolean_attention_mask(None, 2, 2, 6, torch.device("cpu"))[0, 0]
    assert torch.equal(chunk, torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]).bool())
    assert boolean_attention_mask(None, 2, 1, 6, torch.device("cpu")) is None


def test_flash_style_padding_mask():
    assert torch.equal(boolean_attention_mask(PADDING, 2, 6, 6, torch.device("cpu")), expected_mask(PADDING, 6))
    assert torch.equal(boolean_attention_mask(PADDING, 2, 1, 6, torch.device("cpu")), expected_mask(PADDING, 1))


def test_boolean_and_additive_4d_masks():
    boolean = expected_mask(PADDING, 6)
    additive = torch.zeros(boolean.shape).masked_fill(~boolean, torch.finfo(torch.float32).min)
    assert torch.equal(boolean_attention_mask(boolean, 2, 6, 6, torch.device("cpu")), boolean)
    assert torch.equal(boolean_attention_mask(additive, 2, 6, 6, torch.device("cpu")), boolean)


def test_flex_attention_block_mask():
    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (PADDING[b, kv_idx] == 1)

    block_mask = create_block_mask(mask_mod, 2, None, 6, 6, device="cpu")
    assert torch.equal(boolean_attention_mask(block_mask, 2, 6, 6, torch.device("cpu")), expected_mask(PADDING, 6))


def test_value_width_may_differ_and_fully_masked_rows_give_zeros():
    query, key = torch.randn(2, 3, 6, 8), torch.randn(2, 3, 6, 8)
    value = torch.randn(2, 3, 6, 5)
    out = group_attention(query, key, value, expected_mask(PADDING, 6), scale=0.5)
    assert out.shape == (2, 3, 6, 5)
    assert torch.equal(out[0, :, :2], torch.zeros(3, 2, 5))  # padding queries read no key
    logits = (query[1] @ key[1].transpose(-1, -2) * 0.5).masked_fill(~torch.ones(6, 6).tril().bool(), float("-inf"))
    torch.testing.assert_close(out[1], logits.softmax(-1) @ value[1])
