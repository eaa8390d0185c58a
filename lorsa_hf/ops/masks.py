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


def causal_mask_after(
    query_start: int | torch.Tensor,
    key_start: int | torch.Tensor,
    query_length: int,
    key_length: int,
    device: torch.device,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """[1, 1, T, S] boolean mask (True = attend) where query s sits at position `query_start + s` and key t at
    `key_start + t`: a query sees the keys at its own position and before, and with a `sliding_window` only those
    fewer than `sliding_window` positions back (the window transformers' sliding masks draw).

    For keys that are not the last S positions up to the queries, such as a static cache's preallocated buffer,
    whose slots after the filled ones lie in the future of every query. The starts may be 0-dim tensors (a
    static cache's counter): nothing reads their values in Python, so torch.compile traces it without a break."""
    query_positions = torch.arange(query_length, device=device) + query_start
    key_positions = torch.arange(key_length, device=device) + key_start
    distance = query_positions[:, None] - key_positions[None, :]
    mask = distance >= 0
    if sliding_window is not None:
        mask = mask & (distance < sliding_window)
    return mask[None, None]


def _padding_columns(padding: torch.Tensor, key_start: int, key_length: int) -> torch.Tensor:
    """The columns of a 2-D padding mask [B, positions] (True = real token) for the keys at positions
    key_start ... key_start + key_length - 1, as [B, 1, 1, S] booleans; positions past its end (a static buffer's
    slots not yet written) count as padding, as transformers pads it."""
    padding = padding.to(torch.bool)
    missing = key_start + key_length - padding.shape[-1]
    if missing > 0:
        padding = torch.cat((padding, padding.new_zeros(padding.shape[0], missing)), dim=-1)
    return padding[:, None, None, key_start : key_start + key_length]


def mask_over_buffer(
    attention_mask: object,
    batch_size: int,
    query_start: int | torch.Tensor,
    key_start: int,
    query_length: int,
    key_length: int,
    device: torch.device,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """The boolean mask [B or 1, 1, T, S] over keys at positions `key_start + t` for queries at `query_start + s`
    (a static cache's buffer): `causal_mask_after` within the given mask. None adds nothing (sdpa's causal flag
    means the upper-left corner, which over a buffer is not the queries' place); a 2-D padding mask is read at the
    keys' positions; a 4-D or flex-attention mask transformers drew over these keys is read as
    `boolean_attention_mask` reads it."""
    mask = causal_mask_after(query_start, key_start, query_length, key_length, device, sliding_window)
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
        return mask & _padding_columns(attention_mask.to(device), key_start, key_length)
    if attention_mask is not None:
        return mask & boolean_attention_mask(attention_mask, batch_size, query_length, key_length, device)
    return mask


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
