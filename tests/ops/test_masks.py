"""Every attention-mask form transformers hands an attention module means the same thing to a Lorsa."""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import create_block_mask
from transformers.masking_utils import sliding_window_causal_mask_function

from lorsa_hf.ops.masks import boolean_attention_mask, causal_mask_after, group_attention, mask_over_buffer


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


def test_causal_mask_after_reads_the_filled_slots_of_a_buffer_only():
    """Two queries at positions 3 and 4 over a static cache's 8 slots, of which 5 are written: each reads the slots
    at or before its position, none of the three unwritten ones; the same from a 0-dim tensor counter."""
    expected = torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]]).bool()
    assert torch.equal(causal_mask_after(3, 0, 2, 8, torch.device("cpu")), expected[None, None])
    assert torch.equal(causal_mask_after(torch.tensor(3), 0, 2, 8, torch.device("cpu")), expected[None, None])


def test_causal_mask_after_equals_the_plain_causal_mask_when_the_keys_end_at_the_queries():
    assert torch.equal(causal_mask_after(4, 0, 2, 6, torch.device("cpu")), boolean_attention_mask(None, 1, 2, 6, "cpu"))


def test_causal_mask_after_draws_the_sliding_window_transformers_draws():
    """Keys from position 3 on (a full sliding buffer), queries at 7 and 8, window 4: transformers' sliding mask
    function at those positions."""
    window = sliding_window_causal_mask_function(4)
    queries, keys = torch.arange(7, 9)[:, None], torch.arange(3, 9)[None, :]
    expected = window(torch.tensor(0), torch.tensor(0), queries, keys)
    mask = causal_mask_after(7, 3, 2, 6, torch.device("cpu"), sliding_window=4)
    assert torch.equal(mask[0, 0], expected) and expected.sum(-1).tolist() == [4, 4]


def test_a_mask_over_a_buffer_keeps_the_padding_and_hides_the_slots_not_yet_written():
    """One query at position 3 over a 6-slot buffer of which 4 are written, the first a pad in sequence 0: the
    2-D padding mask (as flash attention gets it) and the 4-D one drawn over the buffer give the same mask."""
    padding = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    expected = torch.tensor([[0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0]]).bool()[:, None, None]
    drawn = torch.cat((padding, torch.zeros(2, 2, dtype=torch.long)), -1).bool()[:, None, None]
    for given in (padding, drawn):
        assert torch.equal(mask_over_buffer(given, 2, 3, 0, 1, 6, torch.device("cpu")), expected)
    assert torch.equal(mask_over_buffer(None, 2, 3, 0, 1, 6, torch.device("cpu")), expected[1:])
