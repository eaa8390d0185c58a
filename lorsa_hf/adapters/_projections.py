"""Per-head weights of an attention module with separate `q_proj`, `k_proj`, `v_proj`, `o_proj` (Llama and the
architectures built like it: Mistral, Qwen2, Qwen3)."""

from __future__ import annotations

import torch
from torch import nn

from ._base import AttentionWeights, BaseAttention


def _per_head(linear: nn.Linear, heads: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An input projection [heads * hd, d] -> [heads, d, hd] and its bias -> [heads, hd]."""
    weight = linear.weight.detach().float()
    per_head = weight.view(heads, -1, weight.shape[1]).transpose(-1, -2).contiguous()
    bias = linear.bias.detach().float().view(heads, -1) if linear.bias is not None else None
    return per_head, bias


def read_separate_projections(attention: nn.Module, base: BaseAttention) -> AttentionWeights:
    """Separate q/k/v/o projections; k and v have `num_key_value_heads` heads (grouped-query attention); the
    per-head-dim q/k RMS norms (`q_norm`, `k_norm`, as Qwen3 has) when the module holds them."""
    q, q_bias = _per_head(attention.q_proj, base.num_attention_heads)
    k, k_bias = _per_head(attention.k_proj, base.num_key_value_heads)
    v, v_bias = _per_head(attention.v_proj, base.num_key_value_heads)
    o_weight = attention.o_proj.weight.detach().float()  # [d, n * hd]
    o = o_weight.t().reshape(base.num_attention_heads, base.head_dim, o_weight.shape[0]).contiguous()
    o_bias = attention.o_proj.bias.detach().float() if attention.o_proj.bias is not None else None
    q_norm, k_norm = getattr(attention, "q_norm", None), getattr(attention, "k_norm", None)
    return AttentionWeights(
        q=q, k=k, v=v, o=o, q_bias=q_bias, k_bias=k_bias, v_bias=v_bias, o_bias=o_bias,
        q_norm=None if q_norm is None else q_norm.weight.detach().float(),
        k_norm=None if k_norm is None else k_norm.weight.detach().float(),
    )
