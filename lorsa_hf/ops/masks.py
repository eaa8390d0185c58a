"""Causal attention of Lorsa QK groups over the attention masks transformers produces.

transformers hands an attention module a mask whose form depends on the attention implementation the model
was loaded with: None (plain causal), an additive float mask [B, 1, T, S] (eager), a boolean mask
[B, 1, T, S] (sdpa), a 2-D padding mask [B, S] (flash attention) or a flex-attention BlockMask. All are
turned into one boolean mask and run through PyTorch's fused attention, whose value width may differ from
the query/key width, as a QK group's stacked scalar values need.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _causal(query_length: int, key_length: int, device: torch.device) -> torch.Tensor:
    """[T, S] boolean mask: query s (the last T of S positions) sees keys t <= s."""
    return torch.ones(query_length, key_length, dtype=torch.bool, device=device).tril(key_length - query_length)


def boolean_attention_mask(
    attention_mask: object, batch_size: int, query_length: int, key_length: int, device: torch.device
) -> torch.Tensor | None:
    """Any transformers attention mask -> boolean [B or 1, 1, T, S] (True = attend), or None for 'all keys'."""
    if attention_mask is None:
        return None if query_length == 1 else _causal(query_length, key_length, device)[None, None]
    if not isinstance(attention_mask, torch.Tensor):
        from torch.nn.attention.flex_attention import BlockMask, create_mask

        if isinstance(attention_mask, BlockMask):
            return create_mask(attention_mask.mask_mod, batch_size, None, query_length, key_length, device=device)
        raise TypeError(f"Unsupported attention mask of type {type(attention_mask).__name__}.")
    if attention_mask.dim() == 2:  # flash-attention style padding mask [B, S], 1 = real token
        padding = attention_mask[:, None, None, -key_length:].to(device=device, dtype=torch.bool)
        return padding & _causal(query_length, key_length, device)
    if attention_mask.dim() != 4:
        raise ValueError(f"Expected a 2-D or 4-D attention mask, got shape {tuple(attention_mask.shape)}.")
    mask = attention_mask[:, :, -query_length:, :key_length]
    if mask.dtype != torch.bool:  # additive: 0 where attended, a large negative number where masked
        mask = mask > torch.finfo(mask.dtype).min / 2
    return mask


def group_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: object, scale: float
) -> torch.Tensor:
    """softmax(q k^T * scale) v per QK group: q [B, H, T, d_qk], k [B, H, S, d_qk], v [B, H, S, g] -> [B, H, T, g].

    Query rows that may attend to no key at all (padding) give zeros rather than NaN.
    """
    batch_size, _, query_length, _ = query.shape
    key_length = key.shape[-2]
    mask = boolean_attention_mask(attention_mask, batch_size, query_length, key_length, query.device)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)
