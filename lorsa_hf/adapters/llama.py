"""Llama: `model.layers[i].self_attn`, RMSNorm input, full rotary (llama3 scaling), cache as
`past_key_values` (transformers <= 5.23) or `cache` (5.24)."""

import torch
from torch import nn

from ._base import ArchitectureAdapter, AttentionWeights, BaseAttention


def _per_head(linear: nn.Linear, heads: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An input projection [heads * hd, d] -> [heads, d, hd] and its bias -> [heads, hd]."""
    weight = linear.weight.detach().float()
    per_head = weight.view(heads, -1, weight.shape[1]).transpose(-1, -2).contiguous()
    bias = linear.bias.detach().float().view(heads, -1) if linear.bias is not None else None
    return per_head, bias


def _read_attention_weights(attention: nn.Module, base: BaseAttention) -> AttentionWeights:
    """Separate q/k/v/o projections; k and v have `num_key_value_heads` heads (grouped-query attention)."""
    q, q_bias = _per_head(attention.q_proj, base.num_attention_heads)
    k, k_bias = _per_head(attention.k_proj, base.num_key_value_heads)
    v, v_bias = _per_head(attention.v_proj, base.num_key_value_heads)
    o_weight = attention.o_proj.weight.detach().float()  # [d, n * hd]
    o = o_weight.t().reshape(base.num_attention_heads, base.head_dim, o_weight.shape[0]).contiguous()
    o_bias = attention.o_proj.bias.detach().float() if attention.o_proj.bias is not None else None
    return AttentionWeights(q=q, k=k, v=v, o=o, q_bias=q_bias, k_bias=k_bias, v_bias=v_bias, o_bias=o_bias)


ADAPTER = ArchitectureAdapter(
    model_type="llama",
    model_classes=("LlamaForCausalLM", "LlamaModel"),
    attention_attribute="self_attn",
    input_norm_attribute="input_layernorm",
    cache_arguments=("past_key_values", "cache"),
    read_attention_weights=_read_attention_weights,
)
