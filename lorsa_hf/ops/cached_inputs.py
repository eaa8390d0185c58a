"""A cache of the layer's input x instead of the n_ov values per token, and attention over it (docs/method.md §1b).

The cache holds x as [B, H', S, d / H'] next to keys of n_qk heads (`inputs_for_cache`), and
`input_form_attention` computes z from it: the softmax rows sum to one, so attending over x and projecting with
W_V afterwards is exact. This module is the only one that knows the cached layout.
"""

from __future__ import annotations

import torch

from .masks import boolean_attention_mask


def inputs_for_cache(hidden_states: torch.Tensor, n_qk: int) -> torch.Tensor:
    """x [B, T, d] as cache values [B, n_qk, T, d / n_qk], a shape a cache layer can hold next to keys with n_qk
    heads ([B, 1, T, d] when n_qk does not divide d, which only a cache that takes any shape per layer holds)."""
    batch_size, seq_len, d = hidden_states.shape
    heads = n_qk if d % n_qk == 0 else 1
    return hidden_states.view(batch_size, seq_len, heads, d // heads).transpose(1, 2)


def input_form_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    inputs: torch.Tensor,
    W_V: torch.Tensor,
    b_V: torch.Tensor,
    attention_mask: object,
    scale: float,
) -> torch.Tensor:
    """z from cached inputs: z_i[s] = (sum_t A_h(i)[s, t] x[t]) . W_V[i] + b_V[i], exact because softmax rows sum to 1.

    q [B, n_qk, T, d_qk], k [B, n_qk, S, d_qk], inputs: the cached x as [B, H', S, d / H'] (any H' dividing d)
    -> z [B, n_qk, T, g], the layout `group_attention` returns. One mixing matmul over x serves all groups;
    the projection afterwards reads W_V once. Query rows with no key to attend to give zeros, as in
    `group_attention`.
    """
    batch_size, n_qk, query_length, _ = query.shape
    key_length = key.shape[-2]
    x = inputs.transpose(1, 2).reshape(batch_size, key_length, -1)  # [B, S, d]
    d = x.shape[-1]
    logits = torch.matmul(query, key.transpose(-1, -2)) * scale  # [B, n_qk, T, S]
    mask = boolean_attention_mask(attention_mask, batch_size, query_length, key_length, query.device)
    if mask is not None:
        logits = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
    pattern = torch.softmax(logits, dim=-1)
    mixed = torch.bmm(pattern.reshape(batch_size, n_qk * query_length, key_length), x.to(pattern.dtype))
    mixed = mixed.view(batch_size, n_qk, query_length, d).transpose(0, 1).reshape(n_qk, -1, d)  # [n_qk, B*T, d]
    weight = W_V.view(n_qk, -1, d)  # [n_qk, g, d]: head i = group * g + j
    z = torch.baddbmm(b_V.view(n_qk, 1, -1), mixed, weight.transpose(1, 2))  # [n_qk, B*T, g]
    z = z.view(n_qk, batch_size, query_length, -1).transpose(0, 1)
    if mask is not None:
        z = z.masked_fill(~mask.any(-1)[..., None], 0.0)
    return z
